"""A real tunnel on 127.0.0.1 for end-to-end tests: origin, server, client."""

from __future__ import annotations

import hashlib
import json

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from tunnel.client import TunnelClientService
from tunnel.client.backoff import exponential_backoff
from tunnel.client.local import LocalForwarder, LocalTargets
from tunnel.server import TunnelResource, TunnelServer

from .live import until as until  # re-exported: tests import it from here

BLOCK = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, deterministic


def pattern_digest(n: int) -> str:
    sha = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        sha.update(BLOCK)
    sha.update(BLOCK[:rest])
    return sha.hexdigest()


@implementer(IPushProducer)
class PatternProducer:
    """Writes ``n`` bytes of BLOCK to a request, honouring backpressure."""

    def __init__(self, request, n: int) -> None:
        self.request = request
        self.left = n
        self.offset = 0
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.left:
            n = min(65536, self.left, len(BLOCK) - self.offset)
            self.request.write(BLOCK[self.offset : self.offset + n])
            self.offset = (self.offset + n) % len(BLOCK)
            self.left -= n
        if not self.left and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()


class Origin(Resource):
    """The local site behind the tunnel."""

    isLeaf = True

    def __init__(self, clock=None) -> None:
        super().__init__()
        self.seen = []
        #: what /delay waits on (the reactor, or a test's Clock)
        self.clock = clock if clock is not None else reactor

    def render(self, request):
        self.seen.append(request)
        path = request.path
        arg = request.args.get(b"n", [b"0"])[0]
        if path == b"/echo":
            return request.args.get(b"echo", [b""])[0]
        if path == b"/headers":
            headers = {k.decode(): v.decode() for k, v in request.getAllHeaders().items()}
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(headers).encode()
        if path == b"/bytes":
            n = int(arg)
            request.setHeader(b"content-length", str(n).encode())
            if request.method == b"HEAD":
                return b""
            PatternProducer(request, n).start()
            return NOT_DONE_YET
        if path == b"/chunked":
            for piece in (b"first,", b"second,", b"third"):
                request.write(piece)
            request.finish()
            return NOT_DONE_YET
        if path == b"/upload":
            body = request.content.read()
            return f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode()
        if path == b"/status":
            request.setResponseCode(int(arg))
            return b""
        if path == b"/delay":
            d = task.deferLater(self.clock, float(arg), lambda: None)
            d.addCallback(lambda _: (request.write(b"late"), request.finish()))
            d.addErrback(lambda f: f.trap(defer.CancelledError))
            request.notifyFinish().addErrback(lambda _: d.cancel())
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"


class Recording(Resource):
    """Wraps the tunnel Resource (as an embedding Site would) and records requests."""

    isLeaf = True

    def __init__(self, inner, seen) -> None:
        super().__init__()
        self.inner = inner
        self.seen = seen

    def render(self, request):
        self.seen.append(request)
        return self.inner.render(request)


class TunnelEnv:
    """Origin + tunnel server + tunnel client, all on 127.0.0.1, ports from the OS."""

    HOST = "app.localhost"
    IDENT = "test-identifier-0123"

    def __init__(self, server_kwargs=None, resource_kwargs=None, **client_kwargs) -> None:
        self.server_kwargs = server_kwargs or {}
        self.resource_kwargs = resource_kwargs or {}
        self.client_kwargs = client_kwargs
        self.ports = []
        self.origin = Origin()
        self.client: TunnelClientService | None = None

    async def start(self, connect: bool = True) -> TunnelEnv:
        self.origin_port = await self._listen(Site(self.origin))
        self.server = TunnelServer(**self.server_kwargs)
        self.server.add_host(self.HOST, self.IDENT)
        self.public_requests = []
        self.site = Site(
            Recording(TunnelResource(self.server, **self.resource_kwargs), self.public_requests)
        )
        self.public_port = await self._listen(self.site)
        self.url = f"http://127.0.0.1:{self.public_port.getHost().port}"
        if connect:
            self.client = self.make_client()
            self.client.startService()
            await self.client.when_ready()
            await self.server.when_connected(self.IDENT)
        return self

    def make_client(self, identifier: str | None = None, local: str | None = None, tcp=None):
        port = self.public_port.getHost().port
        targets = LocalTargets(
            reactor,
            default=local or f"tcp:127.0.0.1:{self.origin_port.getHost().port}",
            tcp_ports=tcp,
        )
        kwargs = {"retry": exponential_backoff(initial=0.05, maximum=0.5)}
        kwargs.update(self.client_kwargs)
        return TunnelClientService(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
            identifier or self.IDENT,
            LocalForwarder(targets.endpoint_for),
            host=f"127.0.0.1:{port}",
            **kwargs,
        )

    async def _listen(self, factory):
        return await self.listen(factory)

    async def listen(self, factory):
        """Listen on 127.0.0.1, a port chosen by the OS; closed by stop()."""
        port = await TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1").listen(
            factory
        )
        self.ports.append(port)
        return port

    async def stop(self) -> None:
        if self.client is not None and self.client.running:
            await self.client.stopService()
        await self.server.stop(grace=1.0)
        for port in self.ports:
            await port.stopListening()


def gather(coroutines):
    """Run coroutines concurrently; fail on the first error."""
    ds = [defer.ensureDeferred(c) for c in coroutines]
    return defer.gatherResults(ds, consumeErrors=True)


class RawClient(Protocol):
    """A public client speaking raw bytes.

    ``done`` fires with everything received, once ``until(received)`` holds
    or the connection closes; ``on_data`` may react to what arrived.
    """

    def __init__(self, until=None, on_data=None) -> None:
        self.buf = b""
        self.done: defer.Deferred = defer.Deferred()
        self._until = until
        self._on_data = on_data

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self._on_data is not None:
            self._on_data(self)
        if self._until is not None and not self.done.called and self._until(self.buf):
            self.done.callback(self.buf)

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(self.buf)


async def raw_exchange(env: TunnelEnv, data: bytes, until=None, on_data=None):
    """Send ``data`` on a new public connection; return (client, bytes received)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", env.public_port.getHost().port)
    client = await connectProtocol(endpoint, RawClient(until, on_data))
    client.transport.write(data)
    received = await client.done
    return client, received
