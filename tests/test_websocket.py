"""WebSocket through the tunnel, with Twisted's own WebSocket client and server."""

from __future__ import annotations

import hashlib
import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.websocket import WebSocketClientEndpoint, WebSocketResource
from zope.interface import implementer

from .tunnel_env import RawClient, TunnelEnv, raw_exchange, until

MiB = 1024 * 1024


class EchoWS:
    """Server side: echoes every message."""

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def textMessageReceived(self, message):
        self.transport.sendTextMessage(message)

    def bytesMessageReceived(self, data):
        self.transport.sendBytesMessage(bytes(data))

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        pass


class Collector:
    """Client side: records what comes back."""

    def __init__(self):
        self.messages = []
        self.waiting: defer.Deferred | None = None
        self.expect = 0
        self.lost = defer.Deferred()

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def _got(self, message):
        self.messages.append(message)
        if self.waiting is not None and len(self.messages) >= self.expect:
            d, self.waiting = self.waiting, None
            d.callback(None)

    def textMessageReceived(self, message):
        self._got(message)

    def bytesMessageReceived(self, data):
        self._got(bytes(data))

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        self.lost.callback(reason.value)

    def wait_for(self, n):
        if len(self.messages) >= n:
            return defer.succeed(None)
        self.expect = n
        self.waiting = defer.Deferred()
        return self.waiting


class Factory:
    def __init__(self, make):
        self.make = make

    def buildProtocol(self, _):
        return self.make()


@implementer(IAgentEndpointFactory)
class ToPort:
    def __init__(self, port):
        self.port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


def with_ws(env: TunnelEnv) -> None:
    env.origin.isLeaf = False
    env.origin.putChild(b"ws", WebSocketResource(Factory(EchoWS)))


class Plain(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"plain page"


async def ws_connect(env, path="/ws", host=TunnelEnv.HOST):
    port = env.public_port.getHost().port
    endpoint = WebSocketClientEndpoint(ToPort(port), f"ws://{host}:{port}{path}")
    collector = Collector()
    await endpoint.connect(Factory(lambda: collector))
    return collector


@pytest.fixture
def origin_with_ws(monkeypatch):
    """TunnelEnv whose origin serves a WebSocket echo at /ws."""
    from . import tunnel_env

    class WSOrigin(tunnel_env.Origin):
        isLeaf = False

        def __init__(self):
            super().__init__()
            self.putChild(b"ws", WebSocketResource(Factory(EchoWS)))
            self.putChild(b"plain", Plain())

        def getChild(self, path, request):
            return self

    monkeypatch.setattr(tunnel_env, "Origin", WSOrigin)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thousand_messages_of_mixed_sizes_echo_then_close(origin_with_ws):
    env = await TunnelEnv().start()
    rng = random.Random(11)
    try:
        client = await ws_connect(env)
        sent = []
        for i in range(1000):
            # frame-length boundaries, and every 50th message up to 1 MiB
            # (wsproto masks in pure Python, so big ones are kept few)
            size = rng.choice([0, 1, 125, 126, 127, 4096, 65535, 65536])
            if i % 50 == 7:
                size = MiB if i == 7 else rng.randrange(MiB)
            if i % 3 == 0:
                message = f"t{i}-" + "x" * size
                client.transport.sendTextMessage(message)
            else:
                message = rng.randbytes(size)
                client.transport.sendBytesMessage(message)
            sent.append(message)
            if i % 50 == 49:
                await client.wait_for(i + 1)  # keep memory bounded
        await client.wait_for(1000)
        assert len(client.messages) == 1000
        for got, want in zip(client.messages, sent, strict=True):
            assert type(got) is type(want)
            assert hashlib.sha256(got if isinstance(got, bytes) else got.encode()).digest() == (
                hashlib.sha256(want if isinstance(want, bytes) else want.encode()).digest()
            )
        client.transport.loseConnection(1000)
        reason = await client.lost
        assert isinstance(reason, ConnectionDone)  # the close handshake completed
        connection = env.server.connection(env.IDENT)
        # the stream went away with the WebSocket: only the control stream is left
        await until_streams(connection, 1)
    finally:
        await env.stop()


async def until_streams(connection, n):
    from .tunnel_env import until

    await until(lambda: len(connection.session.streams) == n)


@pytest_twisted.ensureDeferred
async def test_refused_upgrade_is_an_ordinary_response(origin_with_ws):
    """No 101: the origin's answer comes back as HTTP; nothing is piped raw."""
    env = await TunnelEnv().start()
    try:
        proto, whole = await raw_exchange(
            env,
            b"GET /plain HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            # a second request: it must be parsed by the server, not piped raw
            b"GET /headers HTTP/1.1\r\nHost: app.localhost\r\n\r\n",
            until=lambda buf: buf.count(b"HTTP/1.1 200 OK") == 2 and buf.endswith(b"}"),
        )
        first, second = whole.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert first.endswith(b"\r\n\r\nplain page")
        assert b"upgrade" not in first.lower()
        # forwarded as its own request, through the proxy (headers added)
        assert b'"x-forwarded-for": "127.0.0.1"' in second
        proto.transport.loseConnection()
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upgrade_without_a_connected_client_gets_502(origin_with_ws):
    env = await TunnelEnv().start(connect=False)
    try:
        proto, whole = await raw_exchange(
            env,
            b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            until=lambda buf: buf.endswith(b"established\n"),
        )
        assert whole.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert whole.endswith(b"\r\n\r\nno client session established\n")
        proto.transport.loseConnection()
    finally:
        await env.stop()


# -- interim 1xx answers from the origin (RFC 9110 15.2) ----------------------------------------

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


class ScriptedOrigin(Protocol):
    """A raw origin: answers the upgrade request with ``answer``, then echoes what follows."""

    def __init__(self, answer: bytes, live: set) -> None:
        self.answer = answer
        self.live = live
        self.buf = b""
        self.answered = False

    def connectionMade(self) -> None:
        self.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            self.transport.write(data)
            return
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.answered = True
            self.transport.write(self.answer)

    def connectionLost(self, reason) -> None:
        self.live.discard(self)


async def scripted_env(answer: bytes, live: set, origin_class=None) -> TunnelEnv:
    """A tunnel whose local server is a ScriptedOrigin (or ``origin_class``)."""
    env = await TunnelEnv().start(connect=False)
    origin_class = origin_class or ScriptedOrigin
    factory = ServerFactory.forProtocol(lambda: origin_class(answer, live))
    origin = await env.listen(factory)
    env.client = env.make_client(local=f"tcp:127.0.0.1:{origin.getHost().port}")
    env.client.startService()
    await env.client.when_ready()
    await env.server.when_connected(env.IDENT)
    return env


@pytest_twisted.ensureDeferred
async def test_early_hints_then_101_switches_and_splices():
    """Before the fix the 103 was taken as the answer and the 101 was lost."""
    live: set[ScriptedOrigin] = set()
    env = await scripted_env(EARLY_HINTS + SWITCHING, live)
    try:

        def talk(client):
            if client.buf == SWITCHING:  # switched: now speak through the splice
                client.transport.write(b"through the splice")

        proto, whole = await raw_exchange(
            env, UPGRADE, until=lambda buf: buf.endswith(b"through the splice"), on_data=talk
        )
        assert whole == SWITCHING + b"through the splice"  # no 103, the origin's 101 as sent
        proto.transport.loseConnection()
        await until(lambda: not live)  # the splice passed the close on
    finally:
        await env.stop()


@pytest.mark.parametrize("interim", [EARLY_HINTS, b"HTTP/1.1 100 Continue\r\n\r\n" * 3])
@pytest_twisted.ensureDeferred
async def test_interim_then_404_is_an_ordinary_404(interim):
    live: set[ScriptedOrigin] = set()
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
    env = await scripted_env(interim + answer, live)
    try:
        proto, whole = await raw_exchange(env, UPGRADE, until=lambda buf: buf.endswith(b"found"))
        assert whole.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert whole.endswith(b"\r\n\r\nnot found")
        assert b" 103 " not in whole and b" 100 " not in whole
        proto.transport.loseConnection()
    finally:
        await env.stop()
    # the stream was kept for the next request: its local connection ends with the client
    await until(lambda: not live)


@pytest_twisted.ensureDeferred
async def test_refused_upgrade_carries_the_origins_fields_only():
    """A non-101 answer is relayed with the origin's header fields, not with
    twisted.web's Server and Date beside them (RFC 9110: one Date)."""
    live: set[ScriptedOrigin] = set()
    answer = (
        b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 08:00:00 GMT\r\nContent-Length: 5\r\n\r\nhello"
    )
    env = await scripted_env(answer, live)
    try:
        proto, whole = await raw_exchange(env, UPGRADE, until=lambda buf: buf.endswith(b"hello"))
        head = whole.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
        names = sorted(line.split(b":", 1)[0] for line in head[1:])
        assert names == [b"content-length", b"date"], whole
        assert b"date: mon, 30 nov 2026 08:00:00 gmt" in head
        proto.transport.loseConnection()
    finally:
        await env.stop()
    await until(lambda: not live)  # the kept stream's local connection, with the client


@implementer(IHalfCloseableProtocol)
class _HalfClosingOrigin(ScriptedOrigin):
    """Answers the upgrade, and says ``bye`` (then closes) once the public side's FIN arrives."""

    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _HalfClosingClient(RawClient):
    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_public_half_close_after_101_reaches_the_origin_which_may_still_answer():
    """On real sockets: the public FIN is a half-close, not the connection's end."""
    live: set[ScriptedOrigin] = set()
    env = await scripted_env(SWITCHING, live, _HalfClosingOrigin)
    try:

        def talk(client):
            if client.buf == SWITCHING:
                client.transport.loseWriteConnection()

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", env.public_port.getHost().port)
        client = await connectProtocol(endpoint, _HalfClosingClient(None, talk))
        client.transport.write(UPGRADE)
        assert await client.done == SWITCHING + b"bye"
        await until(lambda: not live)
    finally:
        await env.stop()
