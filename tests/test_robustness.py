"""Robustness on 127.0.0.1 with real sockets: a client SIGKILLed mid-download,
a server that goes away and comes back on the same port, a half-open link
found by keepalive, 1,000 connect/disconnect cycles without leaks, and
origins that answer garbage.

Every wait is bounded; the figures each test measures are printed (run with
``-s`` to see them) and asserted against the configured bounds.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, globalLogBeginner
from twisted.web.http import HTTPChannel, Request
from twisted.web.server import Site

from tunnel.client import TunnelClientProtocol, TunnelClientService
from tunnel.client.backoff import exponential_backoff
from tunnel.client.local import LocalForwarder, LocalTargets
from tunnel.koding.control import ControlProtocol
from tunnel.koding.identifiers import TunnelKey
from tunnel.koding.states import ClientState
from tunnel.server import ClientConnection, TunnelResource, TunnelServer
from tunnel.yamux import YamuxConfig, YamuxSession, YamuxStream

from .live import http_client
from .processes import Twistd, spawn_twistd
from .tunnel_env import TunnelEnv, pattern_digest, until

MiB = 1024 * 1024

#: short keepalives so dead links are found in about a second
SERVER_KEEPALIVE = YamuxConfig(keepalive_interval=0.5, keepalive_timeout=0.5)
CLIENT_KEEPALIVE = YamuxConfig(keepalive_interval=0.3, keepalive_timeout=0.3)
#: scheduling slack on a loaded machine, on top of the configured bounds
SLACK = 0.75


def report(name: str, **figures) -> None:
    """Print the measured figures of a test (visible with ``pytest -s``)."""
    text = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[robustness] {name}: {text}")


async def public_get(env: TunnelEnv, path: str, timeout: float = 10.0):
    response = await http_client().get(env.url + path, headers={"Host": env.HOST}, timeout=timeout)
    return response.code, await bounded(treq.content(response), timeout), response


def bounded(d: Deferred, seconds: float) -> Deferred:
    """``d`` with a deadline (the timer is cancelled when ``d`` fires)."""
    return d.addTimeout(seconds, reactor)


class StateLog:
    """Timestamped state changes of a client service or a server."""

    def __init__(self, source) -> None:
        self.changes: list[tuple[float, ClientState]] = []
        self.errors: list[BaseException | None] = []
        self.remove = source.observe_states(self._changed)

    def _changed(self, change) -> None:
        self.changes.append((reactor.seconds(), change.current))
        self.errors.append(change.error)

    def error(self, state: ClientState, after: float = 0.0) -> BaseException | None:
        for (t, s), e in zip(self.changes, self.errors, strict=True):
            if s == state and t >= after:
                return e
        return None

    def first(self, state: ClientState, after: float = 0.0) -> float | None:
        for t, s in self.changes:
            if s == state and t >= after:
                return t
        return None

    def states(self, after: float = 0.0) -> list[ClientState]:
        return [s for t, s in self.changes if t >= after]


# -- a twistd child process ----------------------------------------------------------


def spawn_client(server_port: int, identifier: str, local: str) -> Twistd:
    return spawn_twistd(
        "tunnel-client",
        *("--server", f"tcp:127.0.0.1:{server_port}", "--identifier", identifier),
        *("--local", local),
    )


# -- a raw public download ---------------------------------------------------------------


class Download(Protocol):
    """GET a large body on a raw connection, counting (not keeping) its bytes."""

    def __init__(self, request: bytes, notify_at: int) -> None:
        self.request = request
        self.notify_at = notify_at
        self.head = b""
        self.head_done = False
        self.body = 0
        self.sha = hashlib.sha256()
        self.started: Deferred = Deferred()  # fires once notify_at body bytes arrived
        self.done: Deferred = Deferred()  # fires when the connection is gone
        self.reason = None
        self.closed_at: float | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if not self.head_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, data = self.head[: end + 4], self.head[end + 4 :]
            self.head_done = True
        self.body += len(data)
        self.sha.update(data)
        if self.body >= self.notify_at and not self.started.called:
            self.started.callback(None)

    def connectionLost(self, reason) -> None:
        self.closed_at = reactor.seconds()
        self.reason = reason
        self.done.callback(None)

    def content_length(self) -> int | None:
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value.strip())
        return None


# -- 1. the client process is SIGKILLed mid-download ------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_sigkilled_mid_download_frees_everything_and_a_new_client_works():
    env = await TunnelEnv(server_kwargs={"yamux_config": SERVER_KEEPALIVE}).start(connect=False)
    server_states = StateLog(env.server)
    local = f"tcp:127.0.0.1:{env.origin_port.getHost().port}"
    public_port = env.public_port.getHost().port
    processes: list[Twistd] = []
    download = None
    n = 256 * MiB
    try:
        first = spawn_client(public_port, env.IDENT, local)
        processes.append(first)
        await until(
            lambda: env.server.state(env.IDENT) == ClientState.CONNECTED or not first.running,
            timeout=15,
        )
        assert first.running, first.log
        old = env.server.connection(env.IDENT)
        assert old is not None and old.ready

        download = Download(
            f"GET /bytes?n={n} HTTP/1.1\r\nHost: {env.HOST}\r\nConnection: close\r\n\r\n".encode(),
            notify_at=2 * MiB,
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", public_port)
        await connectProtocol(endpoint, download)
        await bounded(download.started, 15)
        assert len(old.session.streams) == 2  # the control stream and the download's
        killed_at = reactor.seconds()
        first.signal("KILL")

        # the public client sees the response cut short, promptly (no hang)
        await bounded(download.done, 10)
        public_closed = download.closed_at - killed_at
        assert download.head.startswith(b"HTTP/1.1 200 OK\r\n"), download.head
        assert download.content_length() == n
        assert 2 * MiB <= download.body < n  # truncated: Content-Length not satisfied
        assert download.sha.hexdigest() == pattern_digest(download.body)  # an exact prefix

        # the server lets the stream and the session go within interval + timeout
        bound = SERVER_KEEPALIVE.keepalive_interval + SERVER_KEEPALIVE.keepalive_timeout
        await until(lambda: env.server.connection(env.IDENT) is None, timeout=bound + SLACK)
        server_closed = server_states.first(ClientState.CLOSED, after=killed_at) - killed_at
        assert env.server.state(env.IDENT) == ClientState.CLOSED
        assert old.closed and not old.ready and old.session.closed
        assert old.session.streams == {} and old.pending == 0
        assert server_closed <= bound + SLACK
        await bounded(first.ended(), 10)
        assert first.reason.signal == signal.SIGKILL, first.reason
        # the origin's side of the download is over too (it stopped producing)
        origin_request = env.origin.seen[-1]
        await until(lambda: origin_request._disconnected, timeout=5)
        assert not origin_request.finished

        code, body, _ = await public_get(env, "/echo?echo=x")
        assert (code, body) == (502, b"no client session established\n")

        # a new client process serves again
        second = spawn_client(public_port, env.IDENT, local)
        processes.append(second)
        restarted_at = reactor.seconds()
        await until(
            lambda: env.server.state(env.IDENT) == ClientState.CONNECTED or not second.running,
            timeout=15,
        )
        assert second.running, second.log
        reconnect = reactor.seconds() - restarted_at
        code, body, _ = await public_get(env, f"/bytes?n={MiB}")
        assert code == 200 and hashlib.sha256(body).hexdigest() == pattern_digest(MiB)
        assert env.server.connection(env.IDENT) is not old
        report(
            "sigkill",
            bytes_before_cut=download.body,
            public_closed_after_kill_s=public_closed,
            server_closed_after_kill_s=server_closed,
            new_client_up_s=reconnect,
        )
    finally:
        for process in processes:
            await process.reap()
        if download is not None and download.transport is not None and not download.done.called:
            download.transport.abortConnection()
            await bounded(download.done, 5)
        await env.stop()


# -- 2. the server goes away and comes back on the same port -------------------------------


@pytest_twisted.ensureDeferred
async def test_server_restart_on_the_same_port_client_reconnects_with_jittered_backoff():
    initial, maximum, jitter = 0.05, 0.5, 0.5
    policy = exponential_backoff(initial=initial, maximum=maximum, jitter=jitter)
    delays: list[tuple[int, float]] = []

    def recording(attempt: int) -> float | None:
        delay = policy(attempt)
        delays.append((attempt, delay))
        return delay

    env = await TunnelEnv(retry=recording).start()
    states = StateLog(env.client)
    try:
        port_number = env.public_port.getHost().port
        old = env.server.connection(env.IDENT)
        # the server goes away: no listener, and the client's session is cut
        await env.public_port.stopListening()
        env.ports.remove(env.public_port)
        dropped_at = reactor.seconds()
        old.session.transport.abortConnection()
        await until(lambda: env.server.state(env.IDENT) == ClientState.CLOSED, timeout=5)
        # let several reconnect attempts be refused
        await until(lambda: len(delays) >= 6, timeout=10)
        assert env.client.state == ClientState.CONNECTING
        assert "refused" in str(env.client.last_error).lower(), env.client.last_error

        # the server is back, on the same port
        endpoint = TCP4ServerEndpoint(reactor, port_number, interface="127.0.0.1")
        env.public_port = await endpoint.listen(env.site)
        env.ports.append(env.public_port)
        listening_at = reactor.seconds()
        pending_delay = delays[-1][1]  # the retry timer running now
        await until(lambda: env.client.state == ClientState.CONNECTED, timeout=5)
        up_at = states.first(ClientState.CONNECTED, after=dropped_at)
        await until(lambda: env.server.state(env.IDENT) == ClientState.CONNECTED, timeout=5)
        code, body, _ = await public_get(env, "/echo?echo=back")
        assert (code, body) == (200, b"back")
        assert env.server.connection(env.IDENT) is not old

        # the client's story: lost, then one CONNECTING per attempt, then up
        seen = states.states(after=dropped_at)
        assert seen[0] == ClientState.DISCONNECTED
        assert seen[-1] == ClientState.CONNECTED
        assert set(seen[1:-1]) == {ClientState.CONNECTING}
        attempts = seen.count(ClientState.CONNECTING)
        assert [a for a, _ in delays] == list(range(1, attempts + 1))
        # it came back within the backoff bound: the pending timer, plus a handshake
        assert up_at - listening_at <= pending_delay + SLACK
        # the client really waited each delay between attempts
        starts = [t for t, s in states.changes if s == ClientState.CONNECTING and t >= dropped_at]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        lost_at = states.first(ClientState.DISCONNECTED, after=dropped_at)
        gaps.insert(0, starts[0] - lost_at)
        for (attempt, delay), gap in zip(delays, gaps, strict=True):
            assert delay * 0.99 <= gap <= delay + SLACK, (attempt, delay, gap)
        # delays grow exponentially (within jitter) and are jittered, not all equal
        ratios = []
        for attempt, delay in delays:
            nominal = min(maximum, initial * 1.5 ** (attempt - 1))
            assert nominal * (1 - jitter) <= delay <= nominal * (1 + jitter)
            ratios.append(delay / nominal)
        assert len({round(r, 6) for r in ratios}) > 1, ratios
        assert len({round(d, 6) for _, d in delays}) == len(delays)
        report(
            "server restart",
            attempts=attempts,
            delays_s=[round(d, 3) for _, d in delays],
            gaps_s=[round(g, 3) for g in gaps],
            jitter_ratios=[round(r, 2) for r in ratios],
            reconnected_after_relisten_s=up_at - listening_at,
            down_total_s=up_at - dropped_at,
        )
    finally:
        states.remove()
        await env.stop()


# -- 3. a half-open link, found by keepalive on both sides ------------------------------------


class _RelaySide(Protocol):
    """One connection of a relayed pair; forwards what it reads to its peer."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.peer: _RelaySide | None = None
        self.early: list[bytes] = []
        self.blackholed = False
        self.gone = False

    def connectionMade(self) -> None:
        self.relay.sides.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.blackholed:
            return  # swallowed: the sender believes it went out
        if self.peer is None:
            self.early.append(data)
        elif not self.peer.gone:
            self.peer.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.gone = True
        self.relay.sides.discard(self)
        # a black hole passes no FIN or RST on: the far end must find out itself
        if self.peer is not None and not self.peer.gone and not self.blackholed:
            self.peer.transport.loseConnection()


class _Inbound(_RelaySide):
    def connectionMade(self) -> None:
        super().connectionMade()
        if self.relay.refusing:
            self.transport.abortConnection()  # the link is down for new connections
            return
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.target_port)
        connectProtocol(endpoint, _RelaySide(self.relay)).addCallbacks(self._joined, self._failed)

    def _joined(self, outbound: _RelaySide) -> None:
        if self.gone:
            outbound.transport.loseConnection()
            return
        self.peer, outbound.peer = outbound, self
        early, self.early = self.early, []
        for data in early:
            outbound.transport.write(data)
        self.transport.resumeProducing()

    def _failed(self, failure) -> None:
        self.transport.abortConnection()


class Relay:
    """A TCP relay between the tunnel client and the server, for cutting links.

    ``blackhole()`` makes every relayed connection silently swallow what
    either end sends and pass no close on (a half-open link, as when a NAT
    forgets a flow), and refuses new connections until ``heal()``.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sides: set[_RelaySide] = set()
        self.refusing = False
        self.port = None

    async def start(self) -> int:
        factory = Factory.forProtocol(lambda: _Inbound(self))
        factory.noisy = False
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return self.port.getHost().port

    def blackhole(self, refuse_new: bool = True) -> None:
        for side in self.sides:
            side.blackholed = True
        self.refusing = refuse_new

    def heal(self) -> None:
        self.refusing = False

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        for side in list(self.sides):
            side.transport.abortConnection()
        await until(lambda: not self.sides, timeout=5)


async def relayed_env():
    """Origin and server (short keepalive), a relay, and a client (short
    keepalive) that reaches the server through the relay."""
    env = await TunnelEnv(server_kwargs={"yamux_config": SERVER_KEEPALIVE}).start(connect=False)
    relay = Relay(env.public_port.getHost().port)
    relay_port = await relay.start()
    targets = LocalTargets(reactor, default=f"tcp:127.0.0.1:{env.origin_port.getHost().port}")
    env.client = TunnelClientService(
        TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port),
        env.IDENT,
        LocalForwarder(targets.endpoint_for),
        host=f"127.0.0.1:{relay_port}",
        retry=exponential_backoff(initial=0.05, maximum=0.5),
        yamux_config=CLIENT_KEEPALIVE,
    )
    return env, relay


@pytest_twisted.ensureDeferred
async def test_half_open_link_is_found_by_keepalive_on_both_sides():
    env, relay = await relayed_env()
    server_states = StateLog(env.server)
    client_states = StateLog(env.client)
    try:
        env.client.startService()
        await bounded(env.client.when_ready(), 10)
        await until(lambda: env.server.state(env.IDENT) == ClientState.CONNECTED, timeout=5)
        code, body, _ = await public_get(env, "/echo?echo=before")
        assert (code, body) == (200, b"before")
        old = env.server.connection(env.IDENT)
        old_protocol = env.client.protocol
        assert len(relay.sides) == 2

        cut_at = reactor.seconds()
        relay.blackhole()
        server_bound = SERVER_KEEPALIVE.keepalive_interval + SERVER_KEEPALIVE.keepalive_timeout
        client_bound = CLIENT_KEEPALIVE.keepalive_interval + CLIENT_KEEPALIVE.keepalive_timeout
        await until(
            lambda: (
                server_states.first(ClientState.CLOSED, after=cut_at) is not None
                and client_states.first(ClientState.DISCONNECTED, after=cut_at) is not None
            ),
            timeout=max(server_bound, client_bound) + SLACK,
        )
        server_detect = server_states.first(ClientState.CLOSED, after=cut_at) - cut_at
        client_detect = client_states.first(ClientState.DISCONNECTED, after=cut_at) - cut_at
        # found by a keepalive ping that timed out (not earlier), within interval + timeout
        assert SERVER_KEEPALIVE.keepalive_timeout * 0.95 <= server_detect <= server_bound + SLACK
        assert CLIENT_KEEPALIVE.keepalive_timeout * 0.95 <= client_detect <= client_bound + SLACK
        assert env.server.connection(env.IDENT) is None
        assert old.closed and old.session.streams == {}
        assert "keepalive" in str(old.session._closed.value).lower(), old.session._closed
        assert old_protocol.session.closed
        # the client keeps trying (refused while the link is down)
        await until(
            lambda: client_states.states(after=cut_at).count(ClientState.CONNECTING) >= 2,
            timeout=5,
        )
        code, body, _ = await public_get(env, "/echo?echo=down")
        assert (code, body) == (502, b"no client session established\n")

        healed_at = reactor.seconds()
        relay.heal()
        await until(lambda: env.server.state(env.IDENT) == ClientState.CONNECTED, timeout=5)
        await until(lambda: env.client.state == ClientState.CONNECTED, timeout=5)
        back = reactor.seconds() - healed_at
        code, body, _ = await public_get(env, "/echo?echo=after")
        assert (code, body) == (200, b"after")
        assert env.server.connection(env.IDENT) is not old
        seen = client_states.states(after=cut_at)
        assert seen[0] == ClientState.DISCONNECTED and seen[-1] == ClientState.CONNECTED
        assert set(seen[1:-1]) == {ClientState.CONNECTING}
        assert server_states.states(after=cut_at) == [ClientState.CLOSED, ClientState.CONNECTED]
        report(
            "half-open link",
            server_detect_s=server_detect,
            server_bound_s=server_bound,
            client_detect_s=client_detect,
            client_bound_s=client_bound,
            reconnected_after_heal_s=back,
        )
    finally:
        server_states.remove()
        client_states.remove()
        await env.stop()
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_half_open_session_replaced_by_the_reconnecting_client():
    """The client finds the dead link first (shorter keepalive) and comes back
    through a fresh relay connection while the server still holds the
    half-open session: the newcomer must wait for the old session to be found
    dead, take over, and the server must report the old one's end.

    Regression: at b629a9a TunnelServer.attach_session replaced the entry of
    the dead-but-not-yet-cleaned-up session without reporting CLOSED, and
    _connection_ended then skipped it (the entry was the newcomer's), so
    observers saw CONNECTED -> CONNECTED and on_disconnect never ran."""
    env, relay = await relayed_env()
    server_states = StateLog(env.server)
    client_states = StateLog(env.client)
    disconnects = []
    try:
        env.client.startService()
        await bounded(env.client.when_ready(), 10)
        await until(lambda: env.server.state(env.IDENT) == ClientState.CONNECTED, timeout=5)
        old = env.server.connection(env.IDENT)
        env.server.on_disconnect(env.IDENT, lambda: disconnects.append(reactor.seconds()))

        cut_at = reactor.seconds()
        relay.blackhole(refuse_new=False)  # only the existing link goes dark
        server_bound = SERVER_KEEPALIVE.keepalive_interval + SERVER_KEEPALIVE.keepalive_timeout
        await until(
            lambda: (
                (c := env.server.connection(env.IDENT)) is not None and c is not old and c.ready
            ),
            timeout=server_bound + SLACK,
        )
        replaced = reactor.seconds() - cut_at
        client_detect = client_states.first(ClientState.DISCONNECTED, after=cut_at) - cut_at
        assert old.closed and old.session.streams == {}
        assert "keepalive" in str(old.session._closed.value).lower(), old.session._closed
        assert replaced <= server_bound + SLACK
        code, body, _ = await public_get(env, "/echo?echo=after")
        assert (code, body) == (200, b"after")
        report(
            "half-open replaced",
            client_detect_s=client_detect,
            replaced_after_cut_s=replaced,
            server_states=[s.name for s in server_states.states(after=cut_at)],
            on_disconnect_calls=len(disconnects),
        )
        # the old session's end is reported before the new one's start
        seen = server_states.states(after=cut_at)
        assert seen == [ClientState.CLOSED, ClientState.CONNECTED], [s.name for s in seen]
        assert len(disconnects) == 1
    finally:
        server_states.remove()
        client_states.remove()
        await env.stop()
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_client_reports_a_keepalive_timeout_as_the_reason():
    """Regression: at b629a9a TunnelClientProtocol.connectionLost reported the
    transport's reason (ConnectionAborted), not the session's KeepAliveTimeout."""
    env, relay = await relayed_env()
    client_states = StateLog(env.client)
    try:
        env.client.startService()
        await bounded(env.client.when_ready(), 10)
        protocol = env.client.protocol
        cut_at = reactor.seconds()
        relay.blackhole()
        bound = CLIENT_KEEPALIVE.keepalive_interval + CLIENT_KEEPALIVE.keepalive_timeout
        await until(
            lambda: client_states.first(ClientState.DISCONNECTED, after=cut_at) is not None,
            timeout=bound + SLACK,
        )
        # the session knows why it ended ...
        assert "keepalive" in str(protocol.session._closed.value).lower()
        # ... the client service should say so too
        why = client_states.error(ClientState.DISCONNECTED, after=cut_at)
        assert "keepalive" in str(why).lower(), why
    finally:
        client_states.remove()
        await env.stop()
        await relay.stop()


# -- 4. 1,000 connect/disconnect cycles leak nothing ---------------------------------------

CYCLES = 1000
_TRACKED = (
    ClientConnection,
    YamuxSession,
    YamuxStream,
    ControlProtocol,
    TunnelClientProtocol,
    HTTPChannel,
    Request,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _flush_log_buffer() -> None:
    """Push old events out of Twisted's pre-logging history buffer.

    Until logging begins (it does not under pytest) ``globalLogBeginner``
    keeps the last 200 events, and each event holds its ``log_source`` (a
    session, a connection ...): a bounded retention by the harness, not a
    leak.  Harmless debug events replace them before objects are counted.
    """
    buffer = getattr(globalLogBeginner, "_initialBuffer", None)
    size = getattr(getattr(buffer, "_buffer", None), "maxlen", None) or 200
    log = Logger(namespace="tests.test_robustness")
    for i in range(size):
        log.debug("log buffer flush {i}", i=i)


def _live_objects() -> dict[str, int]:
    _flush_log_buffer()
    gc.collect()
    counts = dict.fromkeys((t.__name__ for t in _TRACKED), 0)
    for obj in gc.get_objects():
        for t in _TRACKED:
            if isinstance(obj, t):
                counts[t.__name__] += 1
    return counts


def _refuse_streams(stream, message) -> None:
    stream.abortConnection()  # no tunnel is requested in this test


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest_twisted.ensureDeferred
async def test_thousand_connect_disconnect_cycles_leak_nothing():
    ident = "cycling-identifier-0123"
    server = TunnelServer()
    server.add_host("cycle.localhost", ident)
    # a plain Site: TunnelEnv's recording resource would keep every request alive
    site = Site(TunnelResource(server))
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    host = f"127.0.0.1:{port.getHost().port}"
    try:
        fds_before = _open_fds()
        calls_before = len(reactor.getDelayedCalls())
        objects_before = _live_objects()
        started = reactor.seconds()
        ends = {"client close": 0, "server close": 0, "client abort": 0}
        for i in range(CYCLES):
            protocol = TunnelClientProtocol(ident, host, _refuse_streams, reactor, None, 5.0)
            await bounded(connectProtocol(endpoint, protocol), 5)
            await bounded(protocol.when_ready(), 5)
            connection = server.connection(ident)
            assert connection is not None and connection.ready
            assert server.state(ident) == ClientState.CONNECTED
            ended: Deferred = Deferred()
            server.on_disconnect(ident, lambda ended=ended: ended.callback(None))
            how = i % 3
            if how == 0:
                protocol.session.close()  # the client says GoAway and closes
                ends["client close"] += 1
            elif how == 1:
                connection.close()  # the server says GoAway and closes
                ends["server close"] += 1
            else:
                protocol.transport.abortConnection()  # RST, no GoAway
                ends["client abort"] += 1
            await bounded(protocol.when_lost(), 5)
            await bounded(ended, 5)
            assert server.connection(ident) is None
            assert connection.closed and connection.session.closed
        elapsed = reactor.seconds() - started
        del protocol, connection, ended
        # we run inside the last teardown's call stack (``ended`` fired from
        # connectionLost), whose frames hold that connection: leave it first
        await task.deferLater(reactor, 0, lambda: None)
        await until(lambda: len(reactor.getDelayedCalls()) <= calls_before, timeout=5)
        fds_after = _open_fds()
        calls_after = len(reactor.getDelayedCalls())
        objects_after = _live_objects()
        report(
            f"{CYCLES} cycles",
            elapsed_s=elapsed,
            per_cycle_ms=elapsed / CYCLES * 1000,
            ends=ends,
            fds=f"{fds_before}->{fds_after}",
            delayed_calls=f"{calls_before}->{calls_after}",
            objects_before=objects_before,
            objects_after=objects_after,
        )
        assert fds_after <= fds_before + 10
        assert calls_after <= calls_before
        assert server.connections() == []
        assert list(server._states) == [TunnelKey.of(ident)]  # the server keeps keys
        assert server.state(ident) == ClientState.CLOSED
        assert server._on_disconnect == {} and server._on_connect == {}
        for name, count in objects_after.items():
            assert count <= objects_before[name], (name, objects_before, objects_after)
    finally:
        await server.stop(grace=1.0)
        await port.stopListening()


# -- 5. an origin that answers garbage ------------------------------------------------------

HUGE = MiB


class BadOrigin(Protocol):
    """A raw "origin": its answer depends on the request path."""

    def __init__(self, live: set) -> None:
        self.live = live
        self.buf = b""
        self.paths: list[bytes] = []

    def connectionMade(self) -> None:
        self.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:  # keep-alive: one answer per request head
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self._answer(head.split(b" ", 2)[1])

    def _answer(self, path: bytes) -> None:
        self.paths.append(path)
        if path == b"/malformed-status":
            self.transport.write(b"HTTP/1.1 abc\r\n\r\n")
        elif path == b"/many-headers":  # 1 MiB of short header lines
            line = b"X-Filler: " + b"f" * 52 + b"\r\n"
            head = b"HTTP/1.1 200 OK\r\n" + line * (HUGE // len(line))
            self.transport.write(head + b"Content-Length: 2\r\n\r\nok")
        elif path == b"/long-header":  # one header line of 1 MiB
            head = b"HTTP/1.1 200 OK\r\nX-Long: " + b"l" * HUGE + b"\r\n"
            self.transport.write(head + b"Content-Length: 2\r\n\r\nok")
        elif path == b"/no-answer":
            self.transport.loseConnection()
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine")
        # what the tunnel does with it decides when this connection ends

    def connectionLost(self, reason) -> None:
        self.live.discard(self)


# Regressions, all failing at b629a9a:
# * /malformed-status answered "tunnel error: Connection was closed cleanly: stream
#   closed.": YamuxStream.loseConnection called connectionLost synchronously, inside
#   HTTP11ClientProtocol._giveUp, before it could hand the ParseError on;
# * /long-header gave the same misleading text (LineReceiver.MAX_LENGTH just closes);
# * /many-headers was buffered whole and forwarded as a 200: no bound on the
#   origin's response head.


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/no-answer", b"closed"),
        ("/malformed-status", b"status"),
        ("/long-header", b"header"),
        ("/many-headers", b"header"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_origin_answer_is_a_502_and_the_session_survives(path, names):
    env = await TunnelEnv().start(connect=False)
    live: set[BadOrigin] = set()
    factory = Factory.forProtocol(lambda: BadOrigin(live))
    factory.noisy = False
    origin = await env.listen(factory)
    env.client = env.make_client(local=f"tcp:127.0.0.1:{origin.getHost().port}")
    env.client.startService()
    try:
        await bounded(env.client.when_ready(), 10)
        await until(lambda: env.server.state(env.IDENT) == ClientState.CONNECTED, timeout=5)
        session = env.server.connection(env.IDENT)
        code, body, _ = await public_get(env, "/fine")
        assert (code, body) == (200, b"fine")

        started = reactor.seconds()
        code, body, response = await public_get(env, path)
        took = reactor.seconds() - started
        report(f"bad origin {path}", code=code, body=body[:100], took_s=took)
        assert code == 502, (code, body[:200])
        assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
        assert body.startswith(b"tunnel error: ") and body.endswith(b"\n"), body[:200]
        assert len(body) < 1000
        assert names in body.lower(), f"{body!r} does not say what was wrong ({names!r})"
        # the tunnel dropped the origin connection and the stream that carried
        # the bad answer; what is left is one stream kept per live connection
        await until(lambda: not any(path in p.paths for p in live), timeout=5)
        await until(lambda: len(session.session.streams) == 1 + len(live), timeout=5)

        # the same session carries the next request
        code, body, _ = await public_get(env, "/fine")
        assert (code, body) == (200, b"fine")
        assert env.server.connection(env.IDENT) is session and not session.closed
        assert env.client.state == ClientState.CONNECTED
    finally:
        await env.stop()
        for proto in list(live):
            proto.transport.abortConnection()
        await until(lambda: not live, timeout=5)
