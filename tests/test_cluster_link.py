"""The node-to-node cluster link (tunnel.server.clusterlink, clusterwire) and
YamuxStream.detach: handshake, requests, link reuse, failures; in memory on
one Clock (tests/memory.py), plus real loopback sockets end to end."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.koding.identifiers import TunnelKey
from tunnel.koding.states import ClientState
from tunnel.koding.wire import TransportProtocol
from tunnel.server.clusterlink import (
    MAX_HANDSHAKES,
    MAX_HANDSHAKES_PER_ADDRESS,
    ClusterLinks,
    LinkState,
    NodeUnreachable,
    default_dial,
)
from tunnel.server.clusterstreams import STATUS_ERRORS
from tunnel.server.clusterwire import (
    MAGIC,
    REQUEST_SIZE,
    BadRequest,
    HandshakeError,
    Op,
    Role,
    Status,
    encode_hello,
    open_request,
    parse_hello,
    parse_request,
    parse_status,
    probe_request,
    proof,
)
from tunnel.server.errors import NoClientSession, TooManyPendingTunnels, TunnelTimeout
from tunnel.yamux import StreamServerEndpoint, YamuxSession

from .helpers import Collect
from .loopback import BoundedEcho, Sender, SessionPair
from .memory import HalfClosePeer, MemoryNetwork, MemoryTunnel, Peer

SECRET = b"cluster secret for the tests 0123"
KEY = TunnelKey.of(MemoryTunnel.IDENT)
HTTP = TransportProtocol.HTTP


class FakeLocal:
    """A LocalTunnels whose answers the test gives."""

    def __init__(self) -> None:
        self.requests: list[tuple[TunnelKey, int, int, Deferred]] = []
        self.alive: set[TunnelKey] = set()
        self.cancelled = 0

    def serve_remote(self, key, protocol, port):
        d = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.requests.append((key, protocol, port, d))
        return d

    def probe_local(self, key):
        return succeed(key in self.alive)


class ServerLocal:
    """LocalTunnels over a real TunnelServer (as the lead will wire it)."""

    def __init__(self, server) -> None:
        self.server = server

    def serve_remote(self, key, protocol, port):
        return self.server.open_tunnel(key, protocol, port)

    def probe_local(self, key):
        return succeed(self.server.state(key) == ClientState.CONNECTED)


class Cluster:
    """Nodes on one MemoryNetwork: node ``n`` listens on 127.0.0.1:7000+n."""

    def __init__(self, net: MemoryNetwork | None = None) -> None:
        self.net = net or MemoryNetwork()
        self.nodes: dict[str, ClusterLinks] = {}
        self.ports = []

    def dial(self, address: str):
        host, port = address.rsplit(":", 1)
        return TCP4ClientEndpoint(self.net, host, int(port))

    def add(self, name: str, local=None, secret: bytes = SECRET, **kw) -> ClusterLinks:
        node = ClusterLinks(
            name=name,
            secret=secret,
            local=local or FakeLocal(),
            reactor=self.net.clock,
            dial=self.dial,
            **kw,
        )
        self.nodes[name] = node
        self.ports.append(
            self.net.listenTCP(self.port(name), node.listening_factory(), interface="127.0.0.1")
        )
        return node

    def port(self, name: str) -> int:
        return 7000 + sorted(self.nodes).index(name)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.port(name)}"

    def open(self, src: str, dst: str, key=KEY, protocol=HTTP, port=0, timeout=10.0):
        return self.nodes[src].open_tunnel(dst, self.address(dst), key, protocol, port, timeout)

    def probe(self, src: str, dst: str, key=KEY, timeout=10.0):
        return self.nodes[src].probe(dst, self.address(dst), key, timeout)

    def outcome(self, d: Deferred, limit: float = 0.0):
        """(True, result) or (False, Failure) once the network settled."""
        box = []
        d.addBoth(box.append)
        if limit:
            self.net.run_until(lambda: bool(box), limit)
        else:
            self.net.flush()
        assert box, "not fired"
        return (not isinstance(box[0], Failure), box[0])

    def stop(self, env: MemoryTunnel | None = None) -> None:
        """Close every node (and ``env``), then check nothing is left behind."""
        for node in self.nodes.values():
            self.net.result(node.close(grace=1.0), limit=5)
        for port in self.ports:
            port.stopListening()
        self.net.flush()
        if env is not None:
            env.stop()
        self.net.assert_clean()


def _error(cluster: Cluster, d: Deferred, limit: float = 0.0):
    ok, value = cluster.outcome(d, limit)
    assert not ok, f"expected a failure, got {value!r}"
    return value


@pytest.fixture
def logs():
    collect = Collect()
    globalLogPublisher.addObserver(collect)
    yield collect
    globalLogPublisher.removeObserver(collect)


# -- handshake -------------------------------------------------------------------


def test_handshake_links_both_nodes_and_probes_both_ways():
    c = Cluster()
    a, b = c.add("a"), c.add("b")
    b.local.alive.add(KEY)
    assert c.net.result(c.probe("a", "b")) is True
    assert c.net.result(c.probe("b", "a")) is False  # the link accepted from a serves b too
    assert [(i.peer, i.state, i.dialed_by) for i in a.links()] == [("b", LinkState.OPEN, "a")]
    assert [(i.peer, i.state, i.dialed_by) for i in b.links()] == [("a", LinkState.OPEN, "a")]
    assert len(c.net.open_connections()) == 1
    c.stop()


@pytest.mark.parametrize("wrong", ["dialer", "listener"])
def test_a_wrong_secret_is_refused_without_the_secret_in_the_log(logs, wrong):
    c = Cluster()
    c.add("a", secret=b"other secret" if wrong == "dialer" else SECRET)
    c.add("b", secret=b"other secret" if wrong == "listener" else SECRET)
    failure = _error(c, c.probe("a", "b"))
    assert failure.check(NodeUnreachable) and failure.check(NoClientSession)
    assert c.nodes["a"].links() == [] and c.nodes["b"].links() == []
    assert not c.net.open_connections()
    text = "\n".join(logs.lines)
    assert "wrong proof" in text
    assert "secret for the tests" not in text and "other secret" not in text
    c.stop()


def test_a_failed_dial_fails_fast_for_a_while_then_is_retried():
    c = Cluster()
    c.add("a")
    c.add("b", secret=b"other secret")
    assert _error(c, c.probe("a", "b")).check(NodeUnreachable)
    dialled = len(c.net.connections)
    c.net.advance(0.5)
    failure = _error(c, c.probe("a", "b"))  # no new connection: fails at once
    assert "wrong proof" in failure.getErrorMessage() or "closed" in failure.getErrorMessage()
    assert len(c.net.connections) == dialled
    c.net.advance(0.6)
    _error(c, c.probe("a", "b"))
    assert len(c.net.connections) == dialled + 1
    c.stop()


def test_a_peer_with_another_name_is_refused():
    c = Cluster()
    c.add("a")
    c.add("b")
    d = c.nodes["a"].probe("c", c.address("b"), KEY, 5.0)  # "c" is expected, "b" answers
    failure = _error(c, d)
    assert "expected node c" in failure.getErrorMessage()
    c.stop()


def _raw(c: Cluster, name: str) -> Peer:
    peer = c.net.connect(c.port(name))
    assert peer.failed is None
    return peer


def test_bad_magic_and_oversized_name_are_refused_at_once(logs):
    c = Cluster()
    c.add("a")
    peer = _raw(c, "a")
    assert peer.received.startswith(MAGIC)
    peer.send(b"GET / HTTP/1.1\r\n\r\n")
    c.net.flush()
    assert peer.closed
    peer = _raw(c, "a")
    peer.send(MAGIC + b"\x01" + b"n" * 32 + b"\x41")  # a name of 65 bytes
    c.net.flush()
    assert peer.closed
    peer = _raw(c, "a")
    peer.send(MAGIC + b"\x02")  # another version
    c.net.flush()
    assert peer.closed
    text = "\n".join(logs.lines)
    assert "bad magic" in text and "name length 65" in text and "version 2" in text
    c.stop()


def _raw_from(c: Cluster, name: str, source: str) -> Peer:
    c.net.client_ip = source
    try:
        peer = c.net.connect(c.port(name))
    finally:
        c.net.client_ip = "127.0.0.1"
    c.net.flush()
    return peer


def test_handshakes_under_way_are_bounded_and_free_their_place_when_done(logs):
    c = Cluster()
    c.add("a")
    sources = [f"127.0.1.{n}" for n in range(MAX_HANDSHAKES // MAX_HANDSHAKES_PER_ADDRESS)]
    silent = [_raw_from(c, "a", src) for src in sources for _ in range(MAX_HANDSHAKES_PER_ADDRESS)]
    assert len(silent) == MAX_HANDSHAKES and all(peer.open for peer in silent)
    one_too_many = _raw_from(c, "a", "127.0.2.1")  # a new address: the places are all taken
    assert one_too_many.closed
    assert "64 handshakes under way" in "\n".join(logs.lines)
    silent[0].close()
    c.net.flush()
    fifth = _raw_from(c, "a", sources[1])  # a place is free, but not for a fifth from there
    assert fifth.closed
    c.add("b")
    assert c.outcome(c.probe("b", "a"))[0]  # another address gets the free place
    c.stop()


def test_a_wrong_proof_gets_no_proof_back():
    c = Cluster()
    c.add("a")
    peer = _raw(c, "a")
    hello, _ = parse_hello(peer.take())
    peer.send(encode_hello(os.urandom(32), "z") + os.urandom(32))  # a guessed proof
    c.net.flush()
    assert peer.take() == b"" and peer.closed  # nothing to test a guess on offline
    c.stop()


def test_a_slow_handshake_times_out_exactly():
    c = Cluster()
    c.add("a", handshake_timeout=5.0)
    peer = _raw(c, "a")
    peer.send(encode_hello(os.urandom(32), "x"))  # a HELLO, then never a PROOF
    c.net.advance(4.999)
    assert peer.open
    c.net.advance(0.001)
    assert peer.closed
    c.stop()


def test_bytes_right_after_the_proof_reach_the_session():
    """A hand-rolled dialer sends its PROOF and a yamux SYN in one write."""
    c = Cluster()
    a = c.add("a")
    a.local.alive.add(KEY)
    peer = _raw(c, "a")
    hello, size = parse_hello(peer.take())
    nonce = os.urandom(32)
    peer.send(encode_hello(nonce, "z"))
    c.net.flush()
    assert peer.take() == b""  # the dialer proves first: the listener says nothing yet
    mine = proof(SECRET, Role.DIALER, nonce, hello.nonce, "z", "a")
    # the yamux SYN+data for stream 1, carrying a PROBE
    request = probe_request(KEY).encode()
    syn = bytes([0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, len(request)])  # Data, SYN, sid 1
    peer.send(mine + syn + request)
    c.net.flush()
    answer = peer.take()
    their_proof = proof(SECRET, Role.LISTENER, hello.nonce, nonce, "a", "z")
    assert answer.startswith(their_proof)  # the listener's proof, once ours was good
    assert bytes([Status.ALIVE]) in answer[len(their_proof) :]
    assert [i.peer for i in a.links()] == ["z"]
    peer.abort()
    c.stop()


# -- requests -------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class EchoUntilEOF(Protocol):
    """Echoes, and after the peer's EOF says b"bye" and closes."""

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def _two_nodes_with_a_client(local_factory=None):
    net = MemoryNetwork()
    env = MemoryTunnel(network=net)
    env.start_with_local(Factory.forProtocol(local_factory or EchoUntilEOF), 9000)
    c = Cluster(net)
    c.add("a")
    c.add("b", local=ServerLocal(env.server))
    return env, c


def test_open_carries_bytes_both_ways_and_a_half_close():
    env, c = _two_nodes_with_a_client()
    stream = c.net.result(c.open("a", "b"))
    peer = HalfClosePeer()
    stream.attach(peer)
    peer.send(b"hello")
    c.net.flush()
    assert peer.take() == b"hello"
    peer.shutdown()  # EOF through both nodes and the client
    c.net.flush()
    assert peer.take() == b"bye" and peer.eof and peer.closed and peer.clean
    c.stop(env)


class Blast(Protocol):
    """Sends ``size`` patterned bytes and closes."""

    size = 8 * 1024 * 1024

    def connectionMade(self):
        self.transport.write(_pattern(self.size))
        self.transport.loseConnection()


def _pattern(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def test_a_large_transfer_respects_backpressure_and_arrives_intact():
    env, c = _two_nodes_with_a_client(Blast)
    stream = c.net.result(c.open("a", "b"))
    peer = HalfClosePeer()
    stream.pauseProducing()  # a reader that does not read
    stream.attach(peer)
    c.net.flush()
    # what waits at a is bounded by the stream's window, not the 8 MiB sent
    held = stream.buffered[1]
    assert 0 < held <= stream.window_size
    assert peer.received == b""
    stream.resumeProducing()
    c.net.flush()
    assert hashlib.sha256(peer.received).digest() == hashlib.sha256(_pattern(Blast.size)).digest()
    assert peer.eof
    c.stop(env)


@pytest.mark.parametrize(
    "error, expected",
    [
        (NoClientSession(), NoClientSession),
        (TunnelTimeout(), TunnelTimeout),
        (TooManyPendingTunnels(), TooManyPendingTunnels),
        (RuntimeError("boom"), NoClientSession),
    ],
)
def test_each_failure_status_maps_to_its_error(error, expected):
    c = Cluster()
    c.add("a")
    b = c.add("b")
    d = c.open("a", "b")
    c.net.flush()
    (key, protocol, port, pending) = b.local.requests[0]
    assert (key, protocol, port) == (KEY, HTTP, 0)
    pending.errback(error)
    failure = _error(c, d)
    assert failure.check(expected) and not failure.check(NodeUnreachable)
    assert [i.streams for i in c.nodes["a"].links()] == [0]
    c.stop()


def test_a_real_server_without_the_client_says_no_client():
    env, c = _two_nodes_with_a_client()
    failure = _error(c, c.open("a", "b", key=TunnelKey.of("nobody")))
    assert failure.check(NoClientSession) and not failure.check(NodeUnreachable)
    assert c.net.result(c.probe("a", "b")) is True
    assert c.net.result(c.probe("a", "b", key=TunnelKey.of("nobody"))) is False
    c.stop(env)


def test_cancel_resets_the_stream_and_cancels_the_remote_wait():
    c = Cluster()
    c.add("a")
    b = c.add("b")
    d = c.open("a", "b")
    c.net.flush()
    d.cancel()
    c.net.flush()
    assert b.local.cancelled == 1
    assert [i.streams for i in b.links()] == [0]
    failure = _error(c, d)
    assert failure.check(CancelledError)
    c.stop()


def test_the_timeout_bounds_a_request_and_the_remote_wait_is_withdrawn():
    c = Cluster()
    c.add("a")
    b = c.add("b")
    d = c.open("a", "b", timeout=3.0)
    failure = _error(c, d, limit=3.0)
    assert failure.check(TunnelTimeout)
    assert c.net.clock.seconds() == 3.0 and b.local.cancelled == 1
    c.stop()


def test_one_link_carries_many_requests_and_shares_the_dial():
    c = Cluster()
    c.add("a")
    b = c.add("b")
    b.local.alive.add(KEY)
    probes = [c.probe("a", "b") for _ in range(20)]  # before the dial finished
    assert all(c.net.result(p) for p in probes)
    assert all(c.net.result(c.probe("a", "b")) for _ in range(5))
    assert len(c.net.connections) == 1
    c.stop()


def test_crossed_dials_end_with_one_link_dialed_by_the_smaller_name():
    c = Cluster()
    a, b = c.add("a"), c.add("b")
    a.local.alive.add(KEY)
    b.local.alive.add(KEY)
    first, second = c.probe("a", "b"), c.probe("b", "a")  # both dial at once
    assert c.net.result(first) is True and c.net.result(second) is True
    c.net.flush()
    assert len(c.net.connections) == 2  # two dials crossed
    assert len(c.net.open_connections()) == 1
    for node in (a, b):
        assert [(i.dialed_by, i.state) for i in node.links()] == [("a", LinkState.OPEN)]
    assert c.net.result(c.probe("b", "a")) is True
    assert len(c.net.open_connections()) == 1
    c.stop()


def test_a_killed_peer_fails_pending_and_new_requests_fast():
    c = Cluster()
    c.add("a")
    c.add("b")
    pending = c.open("a", "b")
    c.net.flush()
    (conn,) = c.net.open_connections()
    (b_port,) = [p for p in c.ports if p.getHost().port == c.port("b")]
    b_port.stopListening()  # b is gone
    c.ports.remove(b_port)
    conn.server.abortConnection()  # b's process dies: a reset reaches a
    failure = _error(c, pending)
    assert failure.check(NodeUnreachable)
    failure = _error(c, c.open("a", "b"))  # the dial is refused: at once
    assert failure.check(NodeUnreachable)
    started = len(c.net.connections)
    _error(c, c.open("a", "b"))  # remembered: not even dialled
    assert len(c.net.connections) == started
    c.nodes.pop("b")
    c.stop()


# -- YamuxStream.detach -------------------------------------------------------------


class Prefix(Protocol):
    """Reads a 1-byte prefix, then hands the stream on with what followed."""

    def __init__(self, then):
        self.then = then

    def dataReceived(self, data):
        self.transport.detach(data[1:])
        self.transport.attach(self.then)


def _session_pair(net: MemoryNetwork):
    server = YamuxSession(False, clock=net.clock)
    client = YamuxSession(True, clock=net.clock)
    port = net.listenTCP(6000, Factory.forProtocol(lambda: server))
    net.connect(6000, protocol=client)
    return client, server, port


class OneStream:
    """Two sessions on a MemoryNetwork and one stream between them: ``out``
    (the client's, its reader a Peer) and ``inbound`` (the server's, no
    protocol attached yet)."""

    def __init__(self) -> None:
        self.net = MemoryNetwork()
        self.client, self.server, self.port = _session_pair(self.net)
        streams: list = []
        self.server.set_stream_handler(streams.append)
        self.out = self.client.open_stream()
        self.out.attach(Peer())
        self.net.flush()
        (self.inbound,) = streams

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.port.stopListening()
        self.net.flush()


def test_detach_hands_unread_bytes_on_in_order_with_credit_right():
    pair = OneStream()
    net, out, inbound = pair.net, pair.out, pair.inbound
    reader = Peer()
    inbound.attach(Prefix(reader))
    body = _pattern(300 * 1024)  # more than one window: credit must flow after the swap
    out.write(b"S" + body)
    net.flush()
    assert reader.received == body
    assert inbound.buffered == (0, 0)
    # every byte consumed was credited back: at most half a window is owed
    owed = inbound.window_size - inbound.receive_window
    assert 0 <= owed < inbound.window_size // 2
    assert out.send_window == inbound.receive_window
    pair.close()


def test_detach_inside_a_delivery_of_buffered_data_hands_the_rest_on():
    pair = OneStream()
    net, out, inbound = pair.net, pair.out, pair.inbound
    inbound.pauseProducing()  # data piles up: it is delivered from the buffer later
    reader = Peer()
    inbound.attach(Prefix(reader))
    for piece in (b"Sa", b"bc", b"de"):
        out.write(piece)
        net.flush()
    assert inbound.buffered[1] == 6
    inbound.resumeProducing()
    assert reader.received == b"abcde" and reader.transport is inbound
    assert inbound.buffered == (0, 0)
    pair.close()


def test_detach_pauses_delivery_until_the_next_attach():
    pair = OneStream()
    net, out, inbound = pair.net, pair.out, pair.inbound
    first = Peer()
    inbound.attach(first)
    out.write(b"one")
    net.flush()
    inbound.detach(b"ne")
    out.write(b"two")
    out.loseWriteConnection()
    net.flush()
    assert first.received == b"one" and not first.closed  # let go: hears nothing more
    assert inbound.buffered[1] == 5
    second = HalfClosePeer()
    inbound.attach(second)
    assert second.received == b"netwo" and second.eof
    with pytest.raises(RuntimeError):
        inbound.attach(Peer())  # one protocol at a time still
    pair.close()


def test_detach_is_refused_after_a_close():
    net = MemoryNetwork()
    client, server, port = _session_pair(net)
    out = client.open_stream()
    peer = Peer()
    out.attach(peer)
    out.loseConnection()
    with pytest.raises(RuntimeError):
        out.detach()
    client.close()
    server.close()
    port.stopListening()
    net.flush()


# -- parsers ---------------------------------------------------------------------------


def test_request_round_trip_and_refusals():
    request = open_request(KEY, TransportProtocol.TCP, 8080)
    assert parse_request(request.encode()) == request
    assert len(request.encode()) == REQUEST_SIZE == 36
    assert parse_request(probe_request(KEY).encode()).op is Op.PROBE
    with pytest.raises(BadRequest):
        parse_request(b"\x03" + request.encode()[1:])
    with pytest.raises(BadRequest):
        parse_request(b"\x01" + KEY.digest + b"\x07\x00\x00")
    with pytest.raises(BadRequest):
        parse_request(b"\x02" + KEY.digest + b"\x01\x00\x00")
    with pytest.raises(ValueError):
        open_request(KEY, 9, 80)
    assert parse_status(0x10, Op.PROBE) is Status.ALIVE
    with pytest.raises(BadRequest):
        parse_status(0x10, Op.OPEN)
    with pytest.raises(BadRequest):
        parse_status(0x99, Op.OPEN)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_break_the_hello_parser(data):
    try:
        parsed = parse_hello(data)
    except HandshakeError:
        return
    if parsed is not None:
        hello, size = parsed
        assert data[:size] == encode_hello(hello.nonce, hello.name)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=REQUEST_SIZE, max_size=REQUEST_SIZE), st.integers(0, 255))
def test_random_bytes_never_break_the_request_parser(data, status):
    try:
        request = parse_request(data)
    except BadRequest:
        pass
    else:
        assert request.encode() == data
    for op in Op:
        try:
            parse_status(status, op)
        except BadRequest:
            pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_at_a_listener_end_in_a_clean_refusal(data):
    c = Cluster()
    c.add("a")
    peer = _raw(c, "a")
    peer.send(data)
    c.net.advance(5.0)
    assert peer.closed  # refused, or timed out: never linked, never raised
    assert c.nodes["a"].links() == []
    c.stop()


# -- shutdown ----------------------------------------------------------------------


class Silent(Protocol):
    """A listener that accepts and never says a word."""


def test_close_during_a_dial_fails_it_and_leaves_nothing_behind():
    c = Cluster()
    a = c.add("a")
    silent = c.net.listenTCP(7009, Factory.forProtocol(Silent), interface="127.0.0.1")
    d = a.probe("b", "127.0.0.1:7009", KEY, 10.0)
    c.net.flush()  # connected, the HELLO unanswered
    closed = a.close()
    assert _error(c, d).check(NodeUnreachable)
    assert c.net.result(closed) is None
    silent.stopListening()
    c.nodes.pop("a")
    c.stop()


def test_close_lets_an_open_request_finish_and_refuses_new_ones():
    env, c = _two_nodes_with_a_client()
    a, b = c.nodes["a"], c.nodes["b"]
    stream = c.net.result(c.open("a", "b"))
    peer = HalfClosePeer()
    stream.attach(peer)
    closing = b.close(grace=30.0)
    c.net.flush()
    assert not closing.called
    assert [i.state for i in a.links()] == [LinkState.DRAINING]
    peer.send(b"still here")
    c.net.flush()
    assert peer.take() == b"still here"
    # b is shutting down: a new request cannot have it
    assert _error(c, c.open("a", "b")).check(NodeUnreachable)
    peer.shutdown()
    c.net.flush()
    assert peer.take() == b"bye" and peer.closed
    assert closing.called and a.links() == []
    c.stop(env)


def test_a_request_read_after_close_began_gets_shutting_down():
    c = Cluster()
    a = c.add("a")
    b = c.add("b")
    link = c.net.result(a.link_to("b", c.address("b")))
    stream = link.open_stream()
    peer = Peer()
    stream.attach(peer)
    request = probe_request(KEY).encode()
    peer.send(request[:10])
    c.net.flush()
    b.close(grace=5.0)
    peer.send(request[10:])
    c.net.flush()
    assert peer.received == bytes([Status.SHUTTING_DOWN]) and peer.clean
    assert link.state is not LinkState.OPEN
    # and the opener's side maps that status to NodeUnreachable
    assert STATUS_ERRORS[Status.SHUTTING_DOWN]().__class__ is NodeUnreachable
    c.stop()


def test_a_request_that_never_completes_gets_bad_request_and_a_reset():
    c = Cluster()
    a = c.add("a", request_timeout=3.0)
    c.add("b")
    link = c.net.result(c.nodes["b"].link_to("a", c.address("a")))
    stream = link.open_stream()
    peer = Peer()
    stream.attach(peer)
    peer.send(b"\x01" + KEY.digest)  # 33 of 36 bytes
    c.net.advance(2.999)
    assert peer.received == b"" and not peer.closed
    c.net.advance(0.001)
    assert peer.received == bytes([Status.BAD_REQUEST]) and peer.closed and not peer.clean
    assert a.local.requests == []
    c.stop()


# -- addresses, and real sockets ------------------------------------------------------


def test_the_default_dial_parses_host_port_and_bracketed_ipv6():
    reactor = MemoryReactorClock()
    dial = default_dial(reactor, 2.5)
    dial("10.1.2.3:7946").connect(Factory.forProtocol(Protocol))
    dial("[::1]:7946").connect(Factory.forProtocol(Protocol))
    dial("node-b.example:80").connect(Factory.forProtocol(Protocol))
    assert [(h, p, t) for h, p, _, t, _ in reactor.tcpClients] == [
        ("10.1.2.3", 7946, 3),
        ("::1", 7946, 3),
        ("node-b.example", 80, 3),
    ]
    for bad in ("7946", "host:", "host:x", ":80", "host:70000"):
        with pytest.raises(ValueError):
            dial(bad)


class PairLocal:
    """Serves OPEN with a stream of a real loopback yamux session (a stand-in
    for a client session), whose far end echoes."""

    def __init__(self, pair) -> None:
        self.pair = pair

    def serve_remote(self, key, protocol, port):
        return succeed(self.pair.client.open_stream())

    def probe_local(self, key):
        return succeed(True)


async def _real_nodes(b_secret: bytes = SECRET):
    pair = await SessionPair().start()
    StreamServerEndpoint(pair.server).listen(Factory.forProtocol(BoundedEcho))
    a = ClusterLinks(name="a", secret=SECRET, local=FakeLocal(), reactor=reactor)
    b = ClusterLinks(name="b", secret=b_secret, local=PairLocal(pair), reactor=reactor)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = await endpoint.listen(b.listening_factory())
    return pair, a, b, port, f"127.0.0.1:{port.getHost().port}"


async def _stop_real(pair, a, b, port) -> None:
    await gatherResults([a.close(grace=2.0), b.close(grace=2.0)])
    await port.stopListening()
    await pair.stop()


@pytest_twisted.ensureDeferred
async def test_loopback_streams_echo_intact_over_one_real_link():
    pair, a, b, port, address = await _real_nodes()
    try:
        block = os.urandom(1024 * 1024)
        sizes = [0, 1, 3 * 1024 * 1024, 200_000]
        streams = await gatherResults(
            [a.open_tunnel("b", address, KEY, HTTP, 0, 10.0) for _ in sizes]
        )
        senders = [Sender(block, i * 7919, size) for i, size in enumerate(sizes)]
        for stream, sender in zip(streams, senders, strict=True):
            stream.attach(sender)
        results = await gatherResults([s.finished for s in senders])
        for size, sender, (received, digest, _) in zip(sizes, senders, results, strict=True):
            assert received == size and digest == sender.sent.result
        assert [(i.peer, i.state) for i in a.links()] == [("b", LinkState.OPEN)]
        assert await a.probe("b", address, KEY, 5.0) is True
    finally:
        await _stop_real(pair, a, b, port)


@pytest_twisted.ensureDeferred
async def test_loopback_wrong_secret_is_refused():
    pair, a, b, port, address = await _real_nodes(b_secret=b"not the same secret")
    try:
        with pytest.raises(NodeUnreachable):
            await a.open_tunnel("b", address, KEY, HTTP, 0, 5.0)
        assert a.links() == [] and b.links() == []
    finally:
        await _stop_real(pair, a, b, port)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=80))
def test_random_bytes_on_a_stream_get_a_clean_refusal_or_a_valid_answer(data):
    c = Cluster()
    a = c.add("a")
    c.add("b")
    link = c.net.result(c.nodes["b"].link_to("a", c.address("a")))
    stream = link.open_stream()
    peer = Peer()
    stream.attach(peer)
    peer.send(data)
    c.net.advance(5.0)
    try:
        request = parse_request(data)
    except BadRequest:  # malformed, too long, or too short (then: on the timeout)
        assert peer.received == bytes([Status.BAD_REQUEST]) and not peer.clean
    else:
        assert peer.received in (bytes([Status.GONE]), b"") and (
            request.op is Op.PROBE
            or [r[:3] for r in a.local.requests] == [(request.key, request.protocol, request.port)]
        )
    if not peer.closed:
        peer.abort()
    c.stop()


@pytest.mark.parametrize(
    "status, error",
    [
        (Status.NO_CLIENT, NoClientSession),
        (Status.TIMEOUT, TunnelTimeout),
        (Status.TOO_MANY_PENDING, TooManyPendingTunnels),
        (Status.SHUTTING_DOWN, NodeUnreachable),
        (Status.BAD_REQUEST, NodeUnreachable),
    ],
)
def test_the_opener_maps_every_refusal_to_the_registry_s_errors(status, error):
    made = STATUS_ERRORS[status]()
    assert type(made) is error and isinstance(made, NoClientSession) == (
        error in (NoClientSession, NodeUnreachable)
    )
    assert set(STATUS_ERRORS) == set(Status) - {Status.OK, Status.ALIVE, Status.GONE}
