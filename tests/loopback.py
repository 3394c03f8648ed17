"""Two yamux sessions over a real 127.0.0.1 TCP connection, for tests and benches."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tunnel.client.local import LocalForwarder
from tunnel.koding.wire import ControlMessage, TransportProtocol
from tunnel.yamux import YamuxConfig, YamuxSession
from tunnel.yamux.frame import FLAG_SYN, TYPE_WINDOW_UPDATE

from .helpers import Wire, frame
from .live import until


class SessionPair:
    """A client and a server session joined by a loopback TCP connection."""

    def __init__(self, config: YamuxConfig | None = None) -> None:
        self.config = config
        self.client: YamuxSession | None = None
        self.server: YamuxSession | None = None
        self.port = None

    async def start(self) -> SessionPair:
        accepted: defer.Deferred = defer.Deferred()

        def build():
            s = YamuxSession(False, config=self.config)
            accepted.callback(s)
            return s

        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.client = YamuxSession(True, config=self.config)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(endpoint, self.client)
        self.server = await accepted
        return self

    async def stop(self) -> None:
        waits = [s.when_closed() for s in (self.client, self.server) if s is not None]
        for s in (self.client, self.server):
            if s is not None:
                s.close()
        await defer.gatherResults(waits)
        await self.port.stopListening()


@implementer(IPushProducer)
class SliceProducer:
    """Writes ``size`` bytes taken cyclically from ``block`` while not paused."""

    def __init__(self, transport, block: bytes, offset: int, size: int, chunk: int = 65536):
        self.transport = transport
        self.block = memoryview(block)
        self.offset = offset % len(block)
        self.left = size
        self.chunk = chunk
        self.paused = False
        self.sha = hashlib.sha256()
        self.done: defer.Deferred = defer.Deferred()
        self.pauses = 0

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def stopProducing(self) -> None:
        self.left = 0

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            n = min(self.chunk, self.left, len(self.block) - self.offset)
            piece = self.block[self.offset : self.offset + n].tobytes()
            self.offset = (self.offset + n) % len(self.block)
            self.left -= n
            self.sha.update(piece)
            self.transport.write(piece)
        if self.left == 0 and not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(self.sha.hexdigest())


@implementer(IHalfCloseableProtocol)
class BoundedEcho(Protocol):
    """Echoes with backpressure: the stream pauses itself when its buffer fills."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.unregisterProducer()
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Sender(Protocol):
    """Sends a slice, half-closes, and hashes what comes back."""

    def __init__(self, block: bytes, offset: int, size: int) -> None:
        self.block, self.offset, self.size = block, offset, size
        self.received = 0
        self.sha = hashlib.sha256()
        self.sent: defer.Deferred | None = None
        self.finished: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        producer = SliceProducer(self.transport, self.block, self.offset, self.size)
        self.sent = producer.done
        self.sent.addCallback(self._sent)
        producer.start()

    def _sent(self, digest: str) -> str:
        self.transport.loseWriteConnection()
        return digest

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.sha.update(data)

    def readConnectionLost(self) -> None:
        # the echo is complete (it ends after our own EOF): close our side
        # (a TCP transport needs this; a yamux stream has ended already)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if not self.finished.called:
            self.finished.callback((self.received, self.sha.hexdigest(), reason))


@asynccontextmanager
async def forwarded_local(config: YamuxConfig | None = None) -> AsyncIterator:
    """The client's real local path: a server opens a stream (a SYN on a
    client session), ``LocalForwarder`` connects it to a local server on
    127.0.0.1; yields the transport of that local connection (the splice's
    other side), and closes everything after."""
    accepted: defer.Deferred = defer.Deferred()

    class Local(Protocol):
        def connectionMade(self):
            accepted.callback(self)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Local)
    )
    wire = Wire(True) if config is None else Wire(True, config=config)
    streams: list = []
    wire.session.set_stream_handler(streams.append)
    wire.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0))
    (stream,) = streams
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    try:
        LocalForwarder(lambda message: endpoint)(
            stream, ControlMessage(1, TransportProtocol.HTTP, 80)
        )
        await accepted
        await until(lambda: stream.protocol is not None)
        yield stream.protocol.peer.transport
    finally:
        stream.abortConnection()
        wire.lose()
        await port.stopListening()
