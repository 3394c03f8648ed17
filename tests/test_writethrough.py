"""Writes that leave in the same reactor turn (tunnel/writethrough.py).

On real 127.0.0.1 connections: a written-through transport hands its bytes
to the kernel inside ``write()`` (nothing buffered, not registered for
writability) while an ordinary one waits for the next turn; once the
kernel's buffer is full the rest is buffered and later writes queue behind
it, in order; a streaming producer is paused on the same rule as before;
half-close, loseConnection, a pull producer and a reset peer behave as on
Twisted's own path.  And the tunnel's own connections (public, session,
the client's local ones) are the ones that write through.
"""

from __future__ import annotations

import hashlib
import socket

import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from tunnel.server import TunnelResource, TunnelServer, TunnelSite
from tunnel.writethrough import WriteThroughMixin, write_through

from .live import until
from .loopback import SessionPair, forwarded_local

KIB = 1024
MIB = 1024 * KIB


@implementer(IHalfCloseableProtocol)
class Sink(Protocol):
    """Keeps what it reads; can stop reading; hears EOF and the end."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.eof = False
        self.reason = None
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)


class Pair:
    """One accepted connection (``server``) and its client (``client``)."""

    async def start(self) -> Pair:
        accepted: defer.Deferred = defer.Deferred()

        def build():
            sink = Sink()
            sink.connectionMade = lambda: accepted.callback(sink)
            return sink

        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), Sink()
        )
        self.server = await accepted
        return self

    async def stop(self) -> None:
        for side in (self.client, self.server):
            side.transport.abortConnection()
        await self.port.stopListening()


def buffered(transport) -> int:
    """What a transport holds for a later turn."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def test_the_buffer_state_read_is_twisted_s():
    """write_through reads FileDescriptor's buffer state: fail loudly if a
    Twisted release renames it."""
    fd = FileDescriptor(reactor)
    assert (fd.dataBuffer, fd.offset, fd._tempDataLen) == (b"", 0, 0)
    assert fd._writeDisconnecting is False and fd._writeDisconnected is False
    assert fd.disconnecting == 0 and fd.producer is None
    assert tcp.Connection.TLS is False and tcp.Connection._aborting is False


def test_other_transports_are_left_alone():
    transport = StringTransport()
    assert write_through(transport) is False
    assert type(transport) is StringTransport


@pytest_twisted.ensureDeferred
async def test_a_write_leaves_inside_write_and_an_ordinary_one_waits():
    pair = await Pair().start()
    try:
        ordinary = pair.client.transport
        assert write_through(pair.server.transport) is True
        through = pair.server.transport
        assert isinstance(through, WriteThroughMixin) and isinstance(through, tcp.Server)
        assert through.getTcpNoDelay()
        assert type(ordinary) is tcp.Client  # only the one transport changed
        assert write_through(through) is True  # twice is once
        through.write(b"now")
        through.writeSequence([b" and ", b"then"])
        assert buffered(through) == 0 and through not in reactor.getWriters()
        ordinary.write(b"later")
        assert buffered(ordinary) == 5 and ordinary in reactor.getWriters()
        await until(lambda: bytes(pair.client.received) == b"now and then")
        await until(lambda: bytes(pair.server.received) == b"later")
    finally:
        await pair.stop()


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_buffered_and_later_writes_queue_behind():
    pair = await Pair().start()
    try:
        reader, transport = pair.client, pair.server.transport
        write_through(transport)
        producer = Producer()
        transport.registerProducer(producer, True)
        reader.transport.pauseProducing()  # the peer stops reading
        block = bytes(range(256)) * (32 * KIB)  # 8 MiB: more than the kernel holds
        transport.write(block)
        assert 0 < buffered(transport) < len(block)  # the kernel took a part
        assert transport in reactor.getWriters()
        assert producer.paused == 1  # more than bufferSize waits
        tail = [b"tail-%d" % i for i in range(100)]
        transport.write(tail[0])
        transport.writeSequence(tail[1:])
        assert buffered(transport) > len(b"".join(tail))  # queued, not sent past the block
        reader.transport.resumeProducing()
        expected = block + b"".join(tail)
        await until(lambda: len(reader.received) == len(expected))
        assert hashlib.sha256(reader.received).digest() == hashlib.sha256(expected).digest()
        await until(lambda: producer.resumed == 1)  # drained: asked for more
        transport.write(b"again")
        assert buffered(transport) == 0  # empty again: through at once
        transport.unregisterProducer()
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_gathered_write_is_sent_whole_and_in_order():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        chunks = [b"h" * 12, bytes(range(256)) * 1024, b"x" * 100_000, b"end"]
        transport.writeSequence(chunks)
        await until(lambda: len(pair.client.received) == sum(map(len, chunks)))
        assert bytes(pair.client.received) == b"".join(chunks)
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_half_close_and_lose_connection_keep_their_order():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        transport.write(b"before")
        transport.loseWriteConnection()
        transport.write(b" and queued")  # before the FIN, as on Twisted's path
        await until(lambda: pair.client.eof)
        assert bytes(pair.client.received) == b"before and queued"
        transport.write(b"after the FIN")  # dropped, as Twisted does
        pair.client.transport.write(b"still read")
        await until(lambda: bytes(pair.server.received) == b"still read")
        transport.loseConnection()
        await pair.server.lost
        assert pair.server.reason.check(ConnectionDone)
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_lose_connection_sends_what_was_written_first():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        transport.write(b"one")
        transport.loseConnection()
        transport.write(b"two")  # after loseConnection: buffered, still sent before the close
        await pair.server.lost
        await until(lambda: pair.client.eof)
        assert bytes(pair.client.received) == b"onetwo"
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_nothing_written_after_abort_connection_leaves():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        transport.write(b"sent")
        transport.abortConnection()
        transport.write(b"dropped")
        await pair.server.lost
        await until(lambda: pair.client.eof or pair.client.lost.called)
        assert bytes(pair.client.received) in (b"", b"sent")  # a reset may drop "sent" too
    finally:
        await pair.stop()


@implementer(IPullProducer)
class Pieces:
    """A pull producer: one piece per resumeProducing, then unregisters."""

    def __init__(self, transport, pieces: list[bytes]) -> None:
        self.transport, self.pieces = transport, list(pieces)

    def resumeProducing(self) -> None:
        if self.pieces:
            self.transport.write(self.pieces.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.pieces = []


@pytest_twisted.ensureDeferred
async def test_a_pull_producer_is_still_asked_for_each_piece():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        pieces = [b"piece %d;" % i for i in range(50)]
        transport.registerProducer(Pieces(transport, pieces), False)
        await until(lambda: bytes(pair.client.received) == b"".join(pieces))
        await until(lambda: transport.producer is None)
        transport.write(b"!")  # no producer: through at once again
        assert buffered(transport) == 0
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_a_reset_peer_ends_the_connection_on_the_reactor_s_path():
    pair = await Pair().start()
    try:
        transport = pair.server.transport
        write_through(transport)
        # the client closes with a reset (SO_LINGER 0)
        handle = pair.client.transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        pair.client.transport.loseConnection()
        await pair.client.lost
        for _ in range(20):  # no exception from write, whatever the kernel says
            transport.write(b"x" * 1000)
        await pair.server.lost
        assert not pair.server.reason.check(ConnectionDone)  # a loss, not a clean close
        assert not transport.connected
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_the_tunnel_s_connections_write_through():
    """Public connections (and so a taken-over tunnel connection), both ends
    of a yamux session over TCP."""
    accepted: list = []
    site = TunnelSite(TunnelResource(TunnelServer()))
    build = site.buildProtocol

    def keep(addr):
        channel = build(addr)
        accepted.append(channel)
        return channel

    site.buildProtocol = keep
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    client = await connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Sink()
    )
    pair = await SessionPair().start()
    try:
        await until(lambda: accepted and accepted[0].transport is not None)
        assert isinstance(accepted[0].transport, WriteThroughMixin)
        assert not isinstance(client.transport, WriteThroughMixin)
        for session in (pair.client, pair.server):
            assert isinstance(session.transport, WriteThroughMixin)
    finally:
        client.transport.abortConnection()
        await pair.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_client_s_local_connections_write_through():
    async with forwarded_local() as local:
        assert isinstance(local, WriteThroughMixin) and local.getTcpNoDelay()
