"""The tunnel over TLS: ``ssl:`` listeners, ``tls:`` client endpoints, verification.

Every key and certificate is made here, per test, with ``cryptography``: a
throwaway CA and a server certificate for ``localhost`` (SAN DNS:localhost and
IP:127.0.0.1) signed by it, plus a second, unrelated CA.  Nothing is checked in.

1. A tunnel client dials ``tls:localhost:PORT:trustRoots=DIR`` and public
   requests go through it; the control connection really is TLS.
2. A client that expects another name (``tls:wrong.example:...:endpoint=...``)
   refuses the server, backs off and retries, and never sends its identifier.
3. A client that trusts another CA refuses the server in the same way.
4. ``twistd tunnel-server --listen ssl:...`` and ``twistd tunnel-client
   --server tls:...`` as child processes.

Two bugs found on the way stay pinned as regressions: stopping a TLS client
while it backs off crashed, and an orderly yamux close over TLS stalled until
``close_timeout`` aborted it (the session stayed the transport's producer).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import DNSMismatch
from twisted.internet import reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.ssl import Certificate
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import (
    BrowserLikePolicyForHTTPS,
    ResponseNeverReceived,
)
from twisted.web.resource import Resource
from twisted.web.server import Site

from tunnel.client import TunnelClientService
from tunnel.client.local import LocalForwarder, LocalTargets
from tunnel.koding.states import ClientState, StateChange
from tunnel.server import TunnelResource, TunnelServer
from tunnel.writethrough import WriteThroughMixin
from tunnel.yamux import YamuxConfig

from .live import http_client
from .pki import PKI, esc, make_pki, ssl_listen
from .processes import Twistd, free_port, reap_all, spawn_twistd, stop, until_children
from .test_plugins import IDENTIFIER
from .test_plugins import Origin as EchoOrigin
from .tunnel_env import Origin, RawClient, until

HOST = "app.localhost"
IDENT = "tls-test-identifier-0123"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path)


# -- an in-process tunnel over TLS ---------------------------------------------------

#: Over TLS an orderly yamux close stalls until ``close_timeout`` (see
#: test_stopping_a_tls_client_closes_the_session_promptly); the tests that are
#: not about that use a short one so they do not wait 10 s for the abort.
QUICK_CLOSE = YamuxConfig(close_timeout=1.0)


class Recording(Resource):
    """Wraps the tunnel Resource and records every request it is given."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bytes, bytes]] = []

    def render(self, request):
        self.seen.append((request.method, request.uri))
        return self.inner.render(request)


class RecordingRetry:
    """A retry policy that records the attempt numbers it is asked about (and when)."""

    def __init__(self, delay: float, give_up_after: int | None = None) -> None:
        self.delay = delay
        self.give_up_after = give_up_after
        self.attempts: list[int] = []
        self.asked_at: list[float] = []

    def __call__(self, attempt: int) -> float | None:
        self.attempts.append(attempt)
        self.asked_at.append(reactor.seconds())
        if self.give_up_after is not None and attempt > self.give_up_after:
            return None
        return self.delay


class TLSTunnel:
    """Origin, tunnel server (a TLS and a plain listener on one Site) and clients."""

    def __init__(self, pki: PKI, server_config: YamuxConfig | None = None) -> None:
        self.pki = pki
        self.server_config = server_config
        self.ports: list = []
        self.clients: list[TunnelClientService] = []

    async def start(self) -> TLSTunnel:
        self.origin = Origin()
        self.origin_port = await self._track(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(self.origin))
        )
        self.server = TunnelServer(yamux_config=self.server_config)
        self.server.add_host(HOST, IDENT)
        self.server_states: list[StateChange] = []
        self.server.observe_states(self.server_states.append)
        self.resource = Recording(TunnelResource(self.server))
        self.site = Site(self.resource)
        self.tls_port = await self._track(
            serverFromString(reactor, ssl_listen(self.pki)).listen(self.site)
        )
        self.plain_port = await self._track(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        )
        return self

    async def _track(self, d):
        port = await d
        self.ports.append(port)
        return port

    @property
    def port(self) -> int:
        return self.tls_port.getHost().port

    def client(
        self, description: str, retry: RecordingRetry, config: YamuxConfig = QUICK_CLOSE
    ) -> TunnelClientService:
        targets = LocalTargets(reactor, default=f"tcp:127.0.0.1:{self.origin_port.getHost().port}")
        client = TunnelClientService(
            clientFromString(reactor, description),
            IDENT,
            LocalForwarder(targets.endpoint_for),
            host=f"localhost:{self.port}",
            retry=retry,
            yamux_config=config,
            handshake_timeout=5.0,
        )
        client.changes = []  # (reactor.seconds(), StateChange), in order
        client.observe_states(lambda change: client.changes.append((reactor.seconds(), change)))
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            if client.running:
                await client.stopService()
        await self.server.stop(grace=1.0)
        for port in self.ports:
            await port.stopListening()


def https_client(pki: PKI) -> treq.client.HTTPClient:
    """treq trusting only the test CA."""
    return http_client(BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(pki.ca_pem)))


async def get(client: treq.client.HTTPClient, url: str) -> tuple[int, bytes]:
    response = await client.get(url, headers={"Host": HOST}, timeout=5)
    return response.code, await treq.content(response)


# -- 1. end to end -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tunnel_over_tls_end_to_end(pki):
    env = await TLSTunnel(pki).start()
    try:
        retry = RecordingRetry(0.05)
        client = env.client(f"tls:localhost:{env.port}:trustRoots={esc(pki.ca_dir)}", retry)
        client.startService()
        await client.when_ready()
        await env.server.when_connected(IDENT)
        assert client.state == ClientState.CONNECTED
        assert client.last_error is None and retry.attempts == []
        assert env.resource.seen == [(b"CONNECT", b"/_controlPath/")]

        # public HTTP on the plain listener goes through the TLS tunnel ...
        plain = env.plain_port.getHost().port
        code, body = await get(http_client(), f"http://127.0.0.1:{plain}/echo?echo=over-tls")
        assert (code, body) == (200, b"over-tls")
        # ... and so does public HTTPS on the TLS listener (verified by the IP SAN)
        code, body = await get(https_client(pki), f"https://127.0.0.1:{env.port}/echo?echo=both")
        assert (code, body) == (200, b"both")
        assert [(r.path, r.getHeader(b"host")) for r in env.origin.seen] == [
            (b"/echo", HOST.encode())
        ] * 2

        # the control connection really is TLS, on both ends
        connection = env.server.connection(IDENT)
        assert connection is not None and connection.ready
        server_transport = connection.session.transport
        assert isinstance(server_transport, TLSMemoryBIOProtocol)
        assert ISSLTransport.providedBy(server_transport)
        assert server_transport.getHost().port == env.port
        client_transport = client.protocol.transport
        assert isinstance(client_transport, TLSMemoryBIOProtocol)
        assert client_transport.getHandle().get_protocol_version_name().startswith("TLSv1.")
        # and the TCP connections below the TLS layer write through
        for transport in (server_transport, client_transport):
            assert isinstance(transport.transport, WriteThroughMixin)
        peer = client_transport.getPeerCertificate().to_cryptography()
        assert peer.public_bytes(serialization.Encoding.PEM) == pki.cert.read_bytes()

        # and the TLS port speaks only TLS: a plain-text CONNECT gets no tunnel
        raw = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", env.port), raw)
        raw.transport.write(
            b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: x\r\n"
            b"X-KTunnel-Identifier: someone-else\r\n\r\n"
        )
        received = await raw.done.addTimeout(5, reactor)
        assert b"HTTP/1.1" not in received
        assert [m for m, _ in env.resource.seen] == [b"CONNECT", b"GET", b"GET"]
        assert [c.current for c in env.server_states] == [ClientState.CONNECTED]
    finally:
        await env.stop()
    assert client.state == ClientState.CLOSED


# -- 2./3. verification failures -----------------------------------------------------


async def assert_refused(env: TLSTunnel, description: str) -> TunnelClientService:
    """Start a client that must refuse the server; it retries, then gives up."""
    retry = RecordingRetry(0.2, give_up_after=2)
    client = env.client(description, retry)
    ready = client.when_ready()
    client.startService()
    await until(lambda: client.state == ClientState.CLOSED, timeout=10)

    # three attempts failed: the policy was asked about retries 1, 2 and 3 (gave up)
    assert retry.attempts == [1, 2, 3]
    states = [change.current for _, change in client.changes]
    assert states == [
        ClientState.STARTED,
        ClientState.CONNECTING,  # the first attempt
        ClientState.CONNECTING,  # retry 1
        ClientState.CONNECTING,  # retry 2
        ClientState.CLOSED,  # the policy gave up
    ]
    # each retry waited for the delay the policy asked for
    reconnects = [t for t, change in client.changes if change.current == ClientState.CONNECTING]
    for asked, reconnected in zip(retry.asked_at[:2], reconnects[1:], strict=True):
        assert reconnected - asked >= retry.delay * 0.9
    # the retries and the give-up carry the failure; so does when_ready()
    error = client.last_error
    assert error is not None
    assert [type(change.error) for _, change in client.changes[2:]] == [type(error)] * 3
    with pytest.raises(type(error)):
        await ready

    # the server never saw a request: the identifier was never sent
    assert env.resource.seen == []
    assert env.server_states == []
    assert env.server.connection(IDENT) is None
    assert env.server.state(IDENT) == ClientState.UNKNOWN
    return client


def wrong_name(env: TLSTunnel, pki: PKI) -> str:
    """Dial 127.0.0.1 but expect a certificate for wrong.example."""
    return (
        f"tls:wrong.example:{env.port}:trustRoots={esc(pki.ca_dir)}"
        f":endpoint=tcp\\:127.0.0.1\\:{env.port}"
    )


def other_ca(env: TLSTunnel, pki: PKI) -> str:
    """Expect the right name, but trust only an unrelated CA."""
    return f"tls:localhost:{env.port}:trustRoots={esc(pki.other_ca_dir)}"


@pytest_twisted.ensureDeferred
async def test_wrong_server_name_is_refused_and_retried(pki):
    env = await TLSTunnel(pki).start()
    try:
        client = await assert_refused(env, wrong_name(env, pki))
    finally:
        await env.stop()
    error = client.last_error
    assert isinstance(error, VerificationError), repr(error)
    assert [type(e) for e in error.errors] == [DNSMismatch]
    assert "wrong.example" in str(error)


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_refused_and_retried(pki):
    env = await TLSTunnel(pki).start()
    try:
        client = await assert_refused(env, other_ca(env, pki))
    finally:
        await env.stop()
    error = client.last_error
    assert isinstance(error, SSL.Error), repr(error)
    assert "certificate verify failed" in str(error)


# -- bugs found on the way -------------------------------------------------------------


@pytest.mark.parametrize("dial", [wrong_name, other_ca])
@pytest_twisted.ensureDeferred
async def test_stop_while_waiting_to_retry(pki, dial):
    env = await TLSTunnel(pki).start()
    try:
        retry = RecordingRetry(30.0)  # long: stop() comes while the client waits
        client = env.client(dial(env, pki), retry)
        client.startService()
        await until(lambda: retry.attempts == [1], timeout=10)
        assert client.state == ClientState.CONNECTING and client.last_error is not None
        await client.stopService()
        assert client.state == ClientState.CLOSED
        assert retry.attempts == [1]
    finally:
        await env.stop()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest_twisted.ensureDeferred
async def test_orderly_close_over_tls_is_prompt(pki, side):
    slow = YamuxConfig(close_timeout=3.0)
    env = await TLSTunnel(pki, server_config=slow).start()
    try:
        client = env.client(f"tls:localhost:{env.port}:trustRoots={esc(pki.ca_dir)}",
                            RecordingRetry(0.05), config=slow)  # fmt: skip
        client.startService()
        protocol = await client.when_ready()
        await env.server.when_connected(IDENT)
        client_closed = protocol.session.when_closed()
        server_closed = env.server.connection(IDENT).session.when_closed()
        started = reactor.seconds()
        stopped = client.stopService() if side == "client" else env.server.stop(grace=5.0)
        try:
            await until(lambda: client_closed.called and server_closed.called, timeout=1.5)
        finally:
            await stopped
        assert reactor.seconds() - started < 1.5
        # both ends saw a clean close, not an abort
        assert isinstance(await client_closed, ConnectionDone), repr(client_closed.result)
        assert isinstance(await server_closed, ConnectionDone), repr(server_closed.result)
    finally:
        await env.stop()


# -- 4. twistd tunnel-server --listen ssl: + twistd tunnel-client --server tls: -----------


async def start_tls_server(pki: PKI, processes: list[Twistd]) -> tuple[Twistd, int]:
    """twistd tunnel-server on a free port, TLS only (one retry if the port was taken)."""
    for attempt in range(2):
        port = free_port()
        server = spawn_twistd(
            "tunnel-server",
            "--listen", ssl_listen(pki, port),
            "--vhost", f"{HOST}={IDENTIFIER}",
            "--shutdown-grace", "5",
        )  # fmt: skip
        processes.append(server)

        async def listening(port=port):
            code, body = await get(https_client(pki), f"https://127.0.0.1:{port}/")
            return (code, body) if code == 502 else None

        try:
            code, body = await until_children("the server to listen", listening, server)
        except AssertionError:
            if attempt == 0 and not server.running and "Address already in use" in server.log:
                continue
            raise
        assert body == b"no client session established\n"
        return server, port
    raise AssertionError("unreachable")


@pytest_twisted.ensureDeferred
async def test_twistd_plugins_over_tls(pki, tmp_path):
    origin = EchoOrigin()
    connections = WrappingFactory(Site(origin))  # .protocols: the live connections
    origin_port = reactor.listenTCP(0, connections, interface="127.0.0.1")
    ident_file = tmp_path / "identifier"
    ident_file.write_text(IDENTIFIER + "\n")
    processes: list[Twistd] = []
    try:
        server, port = await start_tls_server(pki, processes)
        # the port speaks TLS only: plain HTTP gets no answer
        with pytest.raises(ResponseNeverReceived):
            await get(http_client(), f"http://127.0.0.1:{port}/")

        client = spawn_twistd(
            "tunnel-client",
            "--server", f"tls:localhost:{port}:trustRoots={esc(pki.ca_dir)}",
            "--identifier-file", str(ident_file),
            "--local", f"tcp:127.0.0.1:{origin_port.getHost().port}",
        )  # fmt: skip
        processes.append(client)

        async def served():
            code, body = await get(https_client(pki), f"https://127.0.0.1:{port}/ready")
            return (code, body) if code == 200 else None

        code, body = await until_children("the tunnel to come up", served, server, client)
        assert body == b"origin says hi: /ready host=app.localhost xff=127.0.0.1"
        code, body = await get(https_client(pki), f"https://localhost:{port}/via/tls?q=1")
        assert (code, body) == (
            200,
            b"origin says hi: /via/tls?q=1 host=app.localhost xff=127.0.0.1",
        )
        assert [s["uri"] for s in origin.seen][-2:] == [b"/ready", b"/via/tls?q=1"]
        assert "tunnel to the server is up" in client.log, client.log
        assert "connected" in server.log, server.log

        await stop(client)

        async def client_gone():
            code, body = await get(https_client(pki), f"https://127.0.0.1:{port}/")
            return True if body == b"no client session established\n" else None

        await until_children("the server to notice the client left", client_gone, server)
        await stop(server)
        assert f"Port {port} Closed" in server.log, server.log
        for p in processes:  # identifiers are secrets: the logs show a redacted form only
            assert IDENTIFIER not in p.log, p.log
    finally:
        await reap_all(processes)
        await origin_port.stopListening()
        for conn in list(connections.protocols):
            conn.transport.abortConnection()
        await until(lambda: not connections.protocols, timeout=10)
