"""The in-memory network of tests/memory.py behaves like Twisted's TCP:
half-close, abort, resets, backpressure, refused and hanging connects, and
timers that run at their own time."""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from .memory import BUFFER_SIZE, HalfClosePeer, MemoryNetwork, Peer


class Accepted:
    """A factory that keeps the server-side protocols it builds."""

    def __init__(self, make=Peer) -> None:
        self.protocols: list = []
        self.factory = Factory.forProtocol(self._build)
        self._make = make

    def _build(self):
        protocol = self._make()
        self.protocols.append(protocol)
        return protocol


def pair(half_close_server: bool = False, **network_kwargs):
    net = MemoryNetwork(**network_kwargs)
    accepted = Accepted(HalfClosePeer if half_close_server else Peer)
    net.listenTCP(1234, accepted.factory, interface="127.0.0.1")
    client = net.connect(1234, half_close=True)
    return net, client, accepted.protocols[0]


def test_bytes_move_only_when_flushed_and_in_order():
    net, client, server = pair(read_size=3)
    client.send(b"hello ")
    client.send(b"world")
    assert server.received == b""  # nothing moves by itself
    assert net.flush()
    assert server.received == b"hello world"
    assert not net.flush()  # settled
    assert net.clock.seconds() == 0
    client.close()
    net.flush()
    assert client.clean and server.clean
    assert net.problems(listeners=False) == []


def test_half_close_in_both_directions():
    net, client, server = pair(half_close_server=True)
    client.send(b"request")
    client.shutdown()
    net.flush()
    assert server.received == b"request" and server.eof and server.open
    server.send(b"answer")  # the other direction still works
    server.shutdown()
    net.flush()
    assert client.received == b"answer" and client.eof
    # both directions are shut, yet, as with Twisted's TCP, the sockets stay
    # open until their protocols close them
    assert client.open and server.open
    client.close()
    server.close()
    net.flush()
    assert client.clean and server.clean


def test_a_plain_protocol_is_closed_by_the_fin():
    net, client, server = pair()  # the server is not half-closeable
    client.send(b"last words")
    client.shutdown()
    net.flush()
    assert server.received == b"last words" and server.clean
    assert client.eof  # the server's socket closed, so the client read EOF too
    client.close()
    net.flush()
    assert client.clean


def test_abort_resets_the_peer_and_drops_what_was_not_read():
    net, client, server = pair()
    server.send(b"never read")
    server.abort()
    assert server.open  # as Twisted: lost on the next turn
    net.flush()
    assert server.reason.check(ConnectionAborted)
    assert client.reason.check(ConnectionLost)
    assert client.received == b""


def test_closing_with_unread_bytes_resets_the_connection():
    net, client, server = pair()
    server.transport.pauseProducing()
    client.send(b"pipelined")
    net.flush()
    server.close()
    net.flush()
    assert server.clean  # our side closed normally ...
    assert client.reason.check(ConnectionLost)  # ... but TCP sent a reset
    assert server.received == b""


def test_writing_to_a_closed_socket_resets():
    net, client, server = pair()
    server.close()
    net.flush()
    assert client.eof and client.open  # half-closeable: the client may still write
    client.send(b"too late")
    net.flush()
    assert client.reason.check(ConnectionLost)


@implementer(IHalfCloseableProtocol)
class Producing(Protocol):
    """Writes while not paused, as a streaming producer of its own transport."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.paused = False
        self.pauses = 0

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left:
            n = min(16384, self.left)
            self.left -= n
            self.transport.write(b"x" * n)
        if not self.left:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.left = 0

    def readConnectionLost(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        pass


class SlowReader(Peer):
    """Does not read until told to."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()


def test_a_streaming_producer_is_paused_until_a_slow_reader_reads():
    net = MemoryNetwork(socket_buffer=100_000)
    fast, slow = Accepted(), Accepted(SlowReader)
    net.listenTCP(1234, fast.factory)
    net.listenTCP(1235, slow.factory)
    unhindered = net.connect(1234, protocol=Producing(1_000_000))
    assert len(fast.protocols[0].received) == 1_000_000
    assert unhindered.pauses >= 1 and unhindered.transport.reason.check(ConnectionDone)
    held_back = net.connect(1235, protocol=Producing(1_000_000))
    # what is held: the pipe (socket_buffer) and a user-space buffer; the
    # producer was paused when that passed BUFFER_SIZE (by at most one write)
    # and, as with Twisted, is resumed only once it is empty
    assert held_back.paused
    held = 1_000_000 - held_back.left
    assert held == 100_000 + held_back.transport.buffered
    assert 0 < held_back.transport.buffered <= BUFFER_SIZE + 16384
    reader = slow.protocols[0]
    reader.transport.resumeProducing()
    net.flush()
    assert len(reader.received) == 1_000_000 and held_back.transport.reason.check(ConnectionDone)
    for protocol in fast.protocols + slow.protocols:
        protocol.close()
    net.flush()
    assert net.problems(listeners=False) == []


def test_refused_hanging_and_cancelled_connects():
    net = MemoryNetwork()
    refused = net.connect(80)
    assert refused.failed.check(ConnectionRefusedError)
    net.blackhole("192.0.2.1", 80)
    endpoint = TCP4ClientEndpoint(net, "192.0.2.1", 80, timeout=3)
    failures = []
    endpoint.connect(Factory.forProtocol(Peer)).addErrback(failures.append)
    net.advance(2.999)
    assert failures == []
    net.advance(0.001)
    assert failures[0].check(TimeoutError) and net.clock.seconds() == 3
    d = endpoint.connect(Factory.forProtocol(Peer))
    d.addErrback(failures.append)
    net.flush()
    d.cancel()
    assert failures[1].check(ConnectingCancelledError)
    assert net.problems() == []


def test_timers_run_at_their_own_time_with_the_network_settled():
    net, client, server = pair()
    seen = []

    def tick(n):
        seen.append((net.clock.seconds(), server.received))
        client.send(b"%d" % n)

    for n in (1, 2, 3):
        net.clock.callLater(n, tick, n)
    net.advance(10)  # Clock.advance(10) alone would run them all at 10, unsettled
    assert seen == [(1.0, b""), (2.0, b"1"), (3.0, b"12")]
    assert server.received == b"123" and net.clock.seconds() == 10
    assert net.run_until(lambda: server.received) == 10  # holds now: no time passes
    with pytest.raises(AssertionError, match="not reached"):
        net.run_until(lambda: False, limit=5)
    client.close()
    net.flush()


def test_a_frozen_link_moves_nothing_until_thawed():
    net, client, server = pair()
    connection = net.connections[0]
    connection.freeze()
    client.send(b"stuck")
    net.advance(60)
    assert server.received == b""
    connection.thaw()
    net.flush()
    assert server.received == b"stuck"
    connection.freeze()
    client.abort()  # each end can still close itself ...
    net.flush()
    assert client.closed and server.open  # ... the other one does not hear of it
    connection.thaw()
    net.flush()
    assert server.reason.check(ConnectionLost)


def test_problems_name_what_a_test_left_behind():
    net, client, server = pair()
    call = net.clock.callLater(5, lambda: None)
    problems = "\n".join(net.problems())
    assert "connections still open" in problems and "Peer" in problems
    assert "DelayedCalls still pending" in problems
    assert "still listening" in problems
    call.cancel()
    client.close()
    for listener in list(net.listeners.values()):
        listener.stopListening()
    net.flush()
    net.assert_clean()


def test_an_exception_in_a_protocol_fails_the_flush_and_drops_the_connection():
    class Broken(Peer):
        def dataReceived(self, data):
            raise ValueError("boom")

    net = MemoryNetwork()
    accepted = Accepted(Broken)
    net.listenTCP(1234, accepted.factory)
    client = net.connect(1234)
    client.send(b"x")
    with pytest.raises(AssertionError, match="boom"):
        net.flush()
    assert accepted.protocols[0].reason.check(ValueError)
