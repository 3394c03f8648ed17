"""A whole tunnel in memory, on one Clock: no sockets, no reactor, no real time.

``MemoryNetwork`` stands in for the reactor's TCP: it provides
``IReactorTCP`` (``listenTCP``, ``connectTCP``), so Twisted's ``TCP4``
endpoints and ``clientFromString(network, "tcp:127.0.0.1:8000")`` work on it
unchanged.  Each connection is a pair of ``MemoryTransport`` objects that
behave like Twisted's TCP transports (see ``twisted.internet.abstract`` and
``tcp``): writes are buffered and a streaming producer is paused beyond 64
KiB; ``loseConnection`` stops reading, flushes, then closes;
``loseWriteConnection`` sends a FIN after the buffer (``writeConnectionLost``
/ ``readConnectionLost`` for ``IHalfCloseableProtocol``, plain
``connectionLost(ConnectionDone)`` otherwise); ``abortConnection`` resets the
peer (``ConnectionLost``) and ends with ``ConnectionAborted``;
``pauseProducing`` stops reading.  Between the two ends each direction holds
up to ``socket_buffer`` bytes in flight (the kernel's buffers), and a reader
gets at most ``read_size`` bytes per ``dataReceived``.  Closing a socket
with unread bytes, or writing to a closed one, resets the connection, as
TCP does.

Nothing moves by itself.  ``flush()`` runs what is due now on the Clock and
moves bytes until nothing moves any more; time never passes in it.
``advance(seconds)`` moves the Clock forward timer by timer, each timer at
its own time with the network settled after it, so a test can say exactly
when something happens.  ``run_until(predicate)`` does the same until a
condition holds and returns the time.  ``freeze()`` on a connection stops
everything between its ends (a half-open link); ``blackhole()`` makes
connects to an address hang until their timeout.

``MemoryTunnel`` wires the real pieces on one network and one Clock::

    public Peer -> TunnelSite(TunnelResource(TunnelServer)) on 127.0.0.1:80
        <- yamux -> TunnelClientService -> LocalForwarder(LocalTargets)
        -> origin twisted.web Site on 127.0.0.1:8000

    with MemoryTunnel() as env:                 # start(), then stop() + checks
        response = env.request(b"GET /echo?echo=hi HTTP/1.1\\r\\nHost: app.localhost\\r\\n\\r\\n")

``stop()`` shuts the client and the server down gracefully, stops the
listeners and then asserts that every connection is closed, no connect is
pending, no DelayedCall is left on the Clock and no protocol raised.

Why not ``twisted.test.iosim``: its FakeTransport ignores
``loseWriteConnection``, treats ``abortConnection`` as ``loseConnection``,
never pauses a producer and keeps delivering while paused, and IOPump
advances the Clock by itself; the tunnel's half-close, reset and
backpressure paths need all of these.  ``twisted.internet.testing``'s
MemoryReactor only records connects.
"""

from __future__ import annotations

import errno
import itertools
from collections import deque
from typing import Any, NamedTuple

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import (
    IConnector,
    IConsumer,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import datetimeToString
from zope.interface import implementer

from tunnel.client import TunnelClientService
from tunnel.client.backoff import exponential_backoff
from tunnel.client.local import LocalForwarder, LocalTargets
from tunnel.koding.states import ClientState
from tunnel.server import TunnelResource, TunnelServer
from tunnel.server.site import TunnelSite

from .tunnel_env import Origin, Recording

log = Logger()

#: a Twisted TCP transport pauses its streaming producer beyond this
BUFFER_SIZE = 65536


class _Pipe:
    """One direction of a connection: bytes in flight, then a FIN or a reset."""

    __slots__ = ("chunks", "size", "fin", "rst")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.fin = False
        self.rst = False

    def put(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def take(self, n: int) -> bytes:
        out = []
        left = n
        while left and self.chunks:
            chunk = self.chunks.popleft()
            if len(chunk) > left:
                self.chunks.appendleft(chunk[left:])
                chunk = chunk[:left]
            out.append(chunk)
            left -= len(chunk)
        data = b"".join(out)
        self.size -= len(data)
        return data

    def clear(self) -> None:
        self.chunks.clear()
        self.size = 0


@implementer(ITCPTransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of a memory connection, behaving like a Twisted TCP transport."""

    bufferSize = BUFFER_SIZE

    def __init__(self, connection, protocol, host, peer, out_pipe, in_pipe) -> None:
        self.connection = connection
        self.protocol = protocol
        self._host = host
        self._peer = peer
        self._out = out_pipe
        self._in = in_pipe
        self.other: MemoryTransport | None = None
        self.connector: MemoryConnector | None = None
        self.connected = True
        self.disconnecting = False  # loseConnection() was called
        self.disconnected = False
        self.aborting = False
        self.reading = True
        self.write_closed = False  # our FIN is out
        self.read_closed = False  # the peer's FIN was read
        self.reason: Failure | None = None  # why it was lost
        self.lost_at: float | None = None  # the Clock's time then
        self._want_write = False
        self._write_requested = False
        self._unsent = _Pipe()  # Twisted's user-space write buffer
        self.producer = None
        self.streamingProducer = False
        self.producerPaused = False
        self._no_delay = False
        self._keepalive = False

    def __repr__(self) -> str:
        if self.disconnected:
            state = f"lost: {self.reason.type.__name__}"
        elif self.disconnecting:
            state = "closing"
        else:
            state = "open"
        return f"<{type(self.protocol).__name__} on {_addr(self._host)} ({state})>"

    # -- ITransport --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if not self.connected or self.write_closed or not data:
            return
        self._unsent.put(data)
        self._maybe_pause_producer()
        self._start_writing()

    def writeSequence(self, data) -> None:
        for piece in data:
            if not isinstance(piece, bytes):
                raise TypeError(f"data must be bytes, not {type(piece).__name__}")
        if not self.connected or self.write_closed:
            return
        for piece in data:
            if piece:
                self._unsent.put(piece)
        self._maybe_pause_producer()
        self._start_writing()

    def loseConnection(self) -> None:
        if not self.connected or self.disconnecting:
            return
        self.reading = False
        if self.write_closed:
            self._lost(error.ConnectionDone())  # as Twisted: nothing left to flush
            return
        self.disconnecting = True
        self._start_writing()

    def loseWriteConnection(self) -> None:
        self._write_requested = True
        self._start_writing()

    def abortConnection(self) -> None:
        if self.disconnected or self.aborting:
            return
        self.aborting = True
        self.reading = False
        self._want_write = False
        self._wake()

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def logPrefix(self) -> str:
        return "memory"

    # -- ITCPTransport -----------------------------------------------------------

    def getTcpNoDelay(self) -> bool:
        return self._no_delay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._no_delay = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self._keepalive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self._keepalive = bool(enabled)

    # -- IConsumer ---------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer"
                f" {self.producer} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streamingProducer = streaming
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        if self.connected and self.disconnecting:
            self._start_writing()

    # -- IPushProducer (reading) ---------------------------------------------------

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting and not self.aborting:
            self.reading = True
            self._wake()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- what the network does -------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes written but not yet handed to the connection (user space)."""
        return self._unsent.size

    def _wake(self) -> None:
        self.connection.network._wake(self.connection)

    def _start_writing(self) -> None:
        self._want_write = True
        self._wake()

    def _maybe_pause_producer(self) -> None:
        if self.producer is not None and self.streamingProducer:
            if self._unsent.size > self.bufferSize:
                self.producerPaused = True
                self.producer.pauseProducing()

    def _pump_write(self, room: int) -> bool:
        """Twisted's doWrite: hand the buffer over, then act on an empty one."""
        if not self.connected or self.aborting or not self._want_write:
            return False
        moved = False
        if self._unsent.size:
            if self.other.disconnected:
                self._lost(error.ConnectionLost())  # writing to a closed socket
                return True
            if room <= 0:
                return False
            self._out.put(self._unsent.take(room))
            self._wake()
            moved = True
            if self._unsent.size:
                return True
        self._want_write = False
        if self.producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            self._call(self.producer.resumeProducing)
            return True
        if self.disconnecting:
            self._lost(error.ConnectionDone())
            return True
        if self._write_requested and not self.write_closed:
            self.write_closed = True
            self._out.fin = True
            half = IHalfCloseableProtocol(self.protocol, None)
            if half is not None:
                self._call(half.writeConnectionLost)
            return True
        return moved

    def _pump_read(self, read_size: int) -> bool:
        """Twisted's doRead: deliver some bytes, the FIN, or a reset."""
        if not self.connected or self.aborting:
            return False
        pipe = self._in
        if pipe.rst:
            self._lost(error.ConnectionLost())
            return True
        if not self.reading or self.disconnecting:
            return False
        if pipe.size:
            data = pipe.take(read_size)
            self.other._wake()  # room in the pipe for the writer
            self._call(self.protocol.dataReceived, data)
            return True
        if pipe.fin and not self.read_closed:
            self.read_closed = True
            half = IHalfCloseableProtocol(self.protocol, None)
            if half is not None:
                self._call(half.readConnectionLost)
            else:
                self._lost(error.ConnectionDone())
            return True
        return False

    def _call(self, f, *args) -> None:
        """Call into the protocol as the reactor would: an exception is logged
        (and recorded, so the test fails) and drops the connection."""
        try:
            f(*args)
        except Exception:
            failure = Failure()
            self.connection.network._error(failure, f"{f!r} raised")
            self._lost(failure.value)

    def _lost(self, reason: BaseException) -> None:
        """The socket closes: FIN or reset to the peer, then connectionLost."""
        if not self.connected:
            return
        self.connected = False
        self.disconnected = True
        self.reading = False
        self._want_write = False
        self._unsent.clear()
        out = self._out
        if isinstance(reason, error.ConnectionAborted) or self._in.size:
            out.clear()  # a reset: what the peer has not read is gone
            out.rst = True
        else:
            out.fin = True
        self._in.clear()
        self.reason = Failure(reason)
        self.lost_at = self.connection.network.clock.seconds()
        self._wake()
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                self.connection.network._error(Failure(), "stopProducing raised")
        try:
            self.protocol.connectionLost(self.reason)
        except Exception:
            self.connection.network._error(Failure(), "connectionLost raised")
        if self.connector is not None:
            self.connector._lost(self.reason)


class MemoryConnection:
    """Two MemoryTransports, ``client`` and ``server``, joined by two pipes."""

    def __init__(self, network, client_protocol, server_protocol, client_addr, server_addr):
        self.network = network
        up, down = _Pipe(), _Pipe()
        self.client = MemoryTransport(self, client_protocol, client_addr, server_addr, up, down)
        self.server = MemoryTransport(self, server_protocol, server_addr, client_addr, down, up)
        self.client.other, self.server.other = self.server, self.client
        self.frozen = False

    def __repr__(self) -> str:
        return f"<connection {self.client!r} -> {self.server!r}>"

    @property
    def closed(self) -> bool:
        return self.client.disconnected and self.server.disconnected

    def freeze(self) -> None:
        """Stop everything between the two ends (bytes, FIN, reset), as a link
        that went dead without a word.  Each end can still close itself."""
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        self.network._wake(self)

    def pump(self, socket_buffer: int, read_size: int) -> bool:
        moved = False
        for end in (self.client, self.server):
            if end.aborting and end.connected:
                end._lost(error.ConnectionAborted())
                moved = True
        for end in (self.client, self.server):
            if self.frozen:
                # a dead link: our writes stay in our own buffer; closing
                # ourselves still works once the buffer need not drain
                if not end._unsent.size:
                    moved |= end._pump_write(0)
                continue
            moved |= end._pump_write(socket_buffer - end._out.size)
            moved |= end._pump_read(read_size)
        return moved


@implementer(IListeningPort)
class MemoryPort:
    """A listening port on the memory network."""

    def __init__(self, network, factory, interface: str, port: int) -> None:
        self.network = network
        self.factory = factory
        self.interface = interface
        self.port = port
        self.listening = True

    def __repr__(self) -> str:
        return f"<MemoryPort {_addr(self.getHost())} {type(self.factory).__name__}>"

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred:
        if self.listening:
            self.listening = False
            del self.network.listeners[(self.interface, self.port)]
            self.factory.doStop()
        return succeed(None)

    loseConnection = stopListening

    def getHost(self):
        return IPv4Address("TCP", self.interface or "0.0.0.0", self.port)


@implementer(IConnector)
class MemoryConnector:
    """An outgoing connection attempt (what ``connectTCP`` returns)."""

    def __init__(self, network, host: str, port: int, factory, timeout, bind) -> None:
        self.network = network
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.bind = bind
        self.state = "disconnected"
        self.transport: MemoryTransport | None = None
        self._timer = None

    def __repr__(self) -> str:
        return f"<MemoryConnector to {self.host}:{self.port} ({self.state})>"

    def connect(self) -> None:
        self.state = "connecting"
        self.factory.doStart()
        self.factory.startedConnecting(self)
        self.network._connecting.append(self)

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise error.NotConnectingError()
        self._failed(error.UserError())

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.state == "connected":
            self.transport.loseConnection()

    def getDestination(self):
        return IPv4Address("TCP", self.host, self.port)

    def _complete(self) -> None:
        if self.state != "connecting":
            return
        network = self.network
        if (self.host, self.port) in network.blackholes:
            if self.timeout:
                self._timer = network.clock.callLater(
                    self.timeout, self._failed, error.TimeoutError()
                )
            network._hanging.append(self)
            return
        listener = network._listener(self.host, self.port)
        if listener is None:
            self._failed(error.ConnectionRefusedError("nothing listens there"))
            return
        source = self.bind[0] if self.bind and self.bind[0] else network.client_ip
        client_addr = IPv4Address("TCP", source, next(network._ephemeral))
        server_addr = IPv4Address("TCP", self.host, self.port)
        client_protocol = self.factory.buildProtocol(server_addr)
        if client_protocol is None:
            self._failed(error.NoProtocol())
            return
        server_protocol = listener.factory.buildProtocol(client_addr)
        refused = server_protocol is None
        if refused:
            server_protocol = Protocol()  # accepted, then closed at once
        conn = MemoryConnection(network, client_protocol, server_protocol, client_addr, server_addr)
        network.connections.append(conn)
        self.state = "connected"
        self.transport = conn.client
        conn.client.connector = self
        for end in (conn.server, conn.client):
            end._call(end.protocol.makeConnection, end)
        if refused:
            conn.server.loseConnection()
        network._wake(conn)

    def _failed(self, reason: BaseException) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self in self.network._hanging:
            self.network._hanging.remove(self)
        if self in self.network._connecting:
            self.network._connecting.remove(self)
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(reason))
        if self.state == "disconnected":
            self.factory.doStop()

    def _lost(self, reason: Failure) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionLost(self, reason)
        if self.state == "disconnected":
            self.factory.doStop()


@implementer(IReactorTCP)
class MemoryNetwork:
    """TCP in memory, on one Clock; see the module docstring.

    :param socket_buffer: bytes each direction of a connection holds in
        flight (the kernel's send and receive buffers).
    :param read_size: the most one ``dataReceived`` gets (Twisted reads 64 KiB).
    """

    client_ip = "127.0.0.1"

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        socket_buffer: int = 256 * 1024,
        read_size: int = 65536,
        max_rounds: int = 1_000_000,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.socket_buffer = socket_buffer
        self.read_size = read_size
        self.max_rounds = max_rounds
        self.listeners: dict[tuple[str, int], MemoryPort] = {}
        self.connections: list[MemoryConnection] = []
        self.blackholes: set[tuple[str, int]] = set()
        self.errors: list[tuple[str, Failure]] = []
        self._dirty: dict[MemoryConnection, None] = {}
        self._connecting: deque[MemoryConnector] = deque()
        self._hanging: list[MemoryConnector] = []
        self._ports = itertools.count(40000)
        self._ephemeral = itertools.count(50000)

    # -- IReactorTCP ---------------------------------------------------------------

    def listenTCP(self, port: int, factory, backlog: int = 50, interface: str = "") -> MemoryPort:
        if port == 0:
            port = next(p for p in self._ports if not self._taken(interface, p))
        elif self._taken(interface, port):
            raise error.CannotListenError(
                interface, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        listener = MemoryPort(self, factory, interface, port)
        self.listeners[(interface, port)] = listener
        factory.doStart()
        return listener

    def connectTCP(self, host: str, port: int, factory, timeout: float = 30, bindAddress=None):
        connector = MemoryConnector(self, host, port, factory, timeout, bindAddress)
        connector.connect()
        return connector

    # -- for tests -------------------------------------------------------------------

    def connect(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        protocol=None,
        half_close: bool = False,
        settle: bool = True,
    ):
        """Connect a ``Peer`` (or ``protocol``) to ``host:port``; the connection
        is made when the network next moves (at once with ``settle``).  If it
        fails, the protocol's ``failed`` attribute holds the Failure."""
        peer = protocol if protocol is not None else (HalfClosePeer() if half_close else Peer())
        self.connectTCP(host, port, _OneShotFactory(peer))
        if settle:
            self.flush()
        return peer

    def blackhole(self, host: str, port: int) -> None:
        """Connects to ``host:port`` hang (no answer) until their timeout."""
        self.blackholes.add((host, port))

    def open_connections(self) -> list[MemoryConnection]:
        return [c for c in self.connections if not c.closed]

    def flush(self) -> bool:
        """Run what is due now and move bytes until nothing moves (time stands
        still); True if anything happened.  A protocol that raised fails it."""
        happened = False
        for _ in range(self.max_rounds):
            moved = self._run_due()
            while self._connecting:
                self._connecting.popleft()._complete()
                moved = True
            if self._dirty:
                batch = list(self._dirty)
                self._dirty.clear()
                for conn in batch:
                    if conn.pump(self.socket_buffer, self.read_size):
                        moved = True
                        self._dirty[conn] = None
            if not moved:
                break
            happened = True
        else:
            raise AssertionError(f"the network did not settle in {self.max_rounds} rounds")
        self._raise_errors()
        return happened

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: every timer runs at its own time, and the
        network settles after each."""
        if seconds < 0:
            raise ValueError("time does not go back")
        self.advance_to(self.clock.seconds() + seconds)

    def advance_to(self, when: float) -> None:
        """Let time pass up to the Clock time ``when`` (exact, unlike a sum of
        decimal steps), every timer at its own time, settling after each."""
        if when < self.clock.seconds():
            raise ValueError("time does not go back")
        self.flush()
        clock = self.clock
        while True:
            due = self._next_timer()
            if due is None or due > when:
                break
            clock.rightNow = max(clock.rightNow, due)
            clock.advance(0)
            self.flush()
        clock.rightNow = when
        self.flush()

    def run_until(self, predicate, limit: float = 3600.0) -> float:
        """Let time pass, timer by timer, until ``predicate()`` holds; return
        the Clock's time then.  Fails after ``limit`` seconds of Clock time."""
        clock = self.clock
        self.flush()
        deadline = clock.seconds() + limit
        while not predicate():
            due = self._next_timer()
            if due is None or due > deadline:
                raise AssertionError(
                    f"not reached within {limit} s of Clock time (now {clock.seconds()},"
                    f" next timer at {due})"
                )
            clock.rightNow = max(clock.rightNow, due)
            clock.advance(0)
            self.flush()
        return clock.seconds()

    def result(self, d: Deferred, limit: float = 0.0):
        """The result of ``d`` once the network settled (letting up to
        ``limit`` seconds pass for it); a failure is raised."""
        box: list[Any] = []
        d.addBoth(box.append)
        if limit:
            self.run_until(lambda: bool(box), limit)
        else:
            self.flush()
        assert box, f"{d!r} has not fired"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def problems(self, listeners: bool = True) -> list[str]:
        """What a finished test left behind."""
        out = []
        still_open = self.open_connections()
        if still_open:
            out.append(f"connections still open: {still_open!r}")
        pending = list(self._connecting) + self._hanging
        if pending:
            out.append(f"connects still pending: {pending!r}")
        calls = [c for c in self.clock.getDelayedCalls() if c.active()]
        if calls:
            out.append(f"DelayedCalls still pending on the Clock: {calls!r}")
        if listeners and self.listeners:
            out.append(f"still listening: {list(self.listeners.values())!r}")
        for what, failure in self.errors:
            out.append(f"{what}: {failure.getTraceback()}")
        return out

    def assert_clean(self, listeners: bool = True) -> None:
        problems = self.problems(listeners)
        assert not problems, "\n".join(problems)

    # -- internals ---------------------------------------------------------------------

    def _taken(self, interface: str, port: int) -> bool:
        wild = ("", "0.0.0.0")
        return any(
            p == port and (i == interface or i in wild or interface in wild)
            for i, p in self.listeners
        )

    def _listener(self, host: str, port: int) -> MemoryPort | None:
        return self.listeners.get((host, port)) or self.listeners.get(
            ("", port), self.listeners.get(("0.0.0.0", port))
        )

    def _wake(self, connection: MemoryConnection) -> None:
        self._dirty[connection] = None

    def _next_timer(self) -> float | None:
        # Clock keeps its calls sorted only after callLater and advance, not
        # after DelayedCall.reset(): look at all of them
        return min((c.getTime() for c in self.clock.getDelayedCalls()), default=None)

    def _run_due(self) -> bool:
        due = self._next_timer()
        if due is not None and due <= self.clock.seconds():
            self.clock.advance(0)
            return True
        return False

    def _error(self, failure: Failure, what: str) -> None:
        log.failure(what, failure)
        self.errors.append((what, failure))

    def _raise_errors(self) -> None:
        if self.errors:
            what, failure = self.errors[0]
            raise AssertionError(f"{what}:\n{failure.getTraceback()}")


class _OneShotFactory(ClientFactory):
    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance

    def clientConnectionFailed(self, connector, reason) -> None:
        self.protocol_instance.failed = reason


class Peer(Protocol):
    """A test's end of a connection: records what arrives, sends what it is
    told.  An EOF from the other side closes it (it is not half-closeable)."""

    failed: Failure | None = None

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.eof = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} received={len(self.received)} closed={self.closed}>"

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason

    @property
    def open(self) -> bool:
        """Connected and not closed yet."""
        return self.transport is not None and self.reason is None and self.failed is None

    @property
    def closed(self) -> bool:
        return self.reason is not None

    @property
    def closed_at(self) -> float | None:
        """The Clock's time when the connection was lost."""
        return self.transport.lost_at if self.closed else None

    @property
    def clean(self) -> bool:
        """Closed by a FIN (``ConnectionDone``), not a reset or an abort."""
        return self.reason is not None and self.reason.check(error.ConnectionDone) is not None

    def take(self) -> bytes:
        """What arrived since the last take()."""
        data, self.received = self.received, b""
        return data

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def shutdown(self) -> None:
        """Half-close: send a FIN, keep reading."""
        self.transport.loseWriteConnection()

    def abort(self) -> None:
        self.transport.abortConnection()


@implementer(IHalfCloseableProtocol)
class HalfClosePeer(Peer):
    """A Peer that sees the other side's FIN (``eof``) and stays open to send."""

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass


class Response(NamedTuple):
    code: int
    phrase: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    rest: bytes  # bytes after this response (the next pipelined one)

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return b", ".join(values) if values else None


def parse_response(raw: bytes, *, head_request: bool = False) -> Response:
    """One HTTP/1.1 response from ``raw`` (Content-Length, chunked, or to the end)."""
    end = raw.index(b"\r\n\r\n")
    lines = raw[:end].split(b"\r\n")
    _, code, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
    headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]
    rest = raw[end + 4 :]
    response = Response(int(code), phrase, headers, b"", b"")
    if head_request or response.code in (204, 304) or response.code < 200:
        return response._replace(rest=rest)
    if (response.header(b"transfer-encoding") or b"").lower() == b"chunked":
        body = b""
        while True:
            size_end = rest.index(b"\r\n")
            size = int(rest[:size_end].split(b";")[0], 16)
            chunk_start = size_end + 2
            body += rest[chunk_start : chunk_start + size]
            rest = rest[chunk_start + size + 2 :]
            if size == 0:
                return response._replace(body=body, rest=rest)
    length = response.header(b"content-length")
    if length is not None:
        n = int(length)
        return response._replace(body=rest[:n], rest=rest[n:])
    return response._replace(body=rest)


class ClockRequest(server.Request):
    """twisted.web's Request with its Date header read from the Site's clock
    (twisted.web reads ``time.time()``), so whole responses are exact bytes."""

    _clock_date = False

    def process(self):
        self._clock_date = True
        return super().process()

    def setHeader(self, name, value):
        if self._clock_date and name.lower() == b"date":
            self._clock_date = False
            value = datetimeToString(self.channel.site.reactor.seconds())
        return super().setHeader(name, value)


#: the Server header twisted.web writes
SERVER = server.version


class MemoryTunnel:
    """Origin + tunnel server + tunnel client on one MemoryNetwork and Clock.

    The origin (``tests.tunnel_env.Origin`` by default, on the Clock) listens
    on 127.0.0.1:8000, the public ``TunnelSite`` on port 80 of every address;
    the client connects to 127.0.0.1:80 and dials the origin through
    ``LocalTargets(network, ...)``.  Reconnect delays have no jitter
    (0.05 s growing by 1.5 up to 0.5 s).
    """

    HOST = "app.localhost"
    IDENT = "test-identifier-0123"
    PUBLIC_PORT = 80
    ORIGIN_PORT = 8000

    def __init__(
        self,
        *,
        server_kwargs: dict | None = None,
        resource_kwargs: dict | None = None,
        site_kwargs: dict | None = None,
        client_kwargs: dict | None = None,
        origin=None,
        network: MemoryNetwork | None = None,
    ) -> None:
        self.net = network if network is not None else MemoryNetwork()
        self.clock = self.net.clock
        self.server_kwargs = server_kwargs or {}
        self.resource_kwargs = resource_kwargs or {}
        self.site_kwargs = site_kwargs or {}
        self.client_kwargs = client_kwargs or {}
        self.origin = origin if origin is not None else Origin(clock=self.clock)
        self.client: TunnelClientService | None = None
        self.clients: list[TunnelClientService] = []
        self.ports: list[MemoryPort] = []
        self.public_requests: list = []
        self.started = False

    # -- life cycle --------------------------------------------------------------------

    def start(self, connect: bool = True) -> MemoryTunnel:
        self.started = True
        origin_site = server.Site(self.origin, requestFactory=ClockRequest, reactor=self.clock)
        self.origin_port = self.listen(origin_site, self.ORIGIN_PORT)
        self.server = TunnelServer(clock=self.clock, **self.server_kwargs)
        self.server.add_host(self.HOST, self.IDENT)
        self.resource = TunnelResource(self.server, **self.resource_kwargs)
        self.site = TunnelSite(
            Recording(self.resource, self.public_requests),
            reactor=self.clock,
            requestFactory=ClockRequest,
            **self.site_kwargs,
        )
        self.public_port = self.listen(self.site, self.PUBLIC_PORT, interface="")
        if connect:
            self.client = self.make_client()
            self.client.startService()
            self.flush()
            assert self.client.state == ClientState.CONNECTED, self.client.last_error
            assert self.server.state(self.IDENT) == ClientState.CONNECTED
        return self

    def start_with_local(self, factory, port: int) -> MemoryTunnel:
        """Start with ``factory`` on 127.0.0.1:``port`` as the client's local
        server (a raw origin, say) and the client connected to the tunnel."""
        self.start(connect=False)
        self.listen(factory, port)
        self.client = self.make_client(local=f"tcp:127.0.0.1:{port}")
        self.client.startService()
        self.flush()
        return self

    def make_client(
        self,
        identifier: str | None = None,
        *,
        local: str | None = None,
        ports: dict | None = None,
        tcp: dict | None = None,
        allow_any_port: bool = False,
        **kwargs,
    ) -> TunnelClientService:
        """A client service for this tunnel (not started); stop() stops it."""
        targets = LocalTargets(
            self.net,
            default=local or f"tcp:127.0.0.1:{self.ORIGIN_PORT}",
            ports=ports,
            tcp_ports=tcp,
            allow_any_port=allow_any_port,
        )
        options = {
            "clock": self.clock,
            "retry": exponential_backoff(initial=0.05, maximum=0.5, rng=lambda: 0.5),
        }
        options.update(self.client_kwargs)
        options.update(kwargs)
        client = TunnelClientService(
            TCP4ClientEndpoint(self.net, "127.0.0.1", self.PUBLIC_PORT),
            identifier or self.IDENT,
            LocalForwarder(targets.endpoint_for, clock=self.clock),
            host=f"127.0.0.1:{self.PUBLIC_PORT}",
            **options,
        )
        self.clients.append(client)
        return client

    def listen(self, factory, port: int = 0, interface: str = "127.0.0.1") -> MemoryPort:
        """Listen on the network (port 0: one is chosen); stop() closes it."""
        listener = self.net.listenTCP(port, factory, interface=interface)
        self.ports.append(listener)
        return listener

    def stop(self, check: bool = True, grace: float = 1.0) -> None:
        """Stop the clients and the server gracefully, stop listening, and
        (``check``) assert that nothing is left behind."""
        for client in self.clients:
            if client.running:
                self.net.result(client.stopService(), limit=client.stop_timeout + 1)
        if self.started:
            self.net.result(self.server.stop(grace=grace), limit=grace + 1)
        for listener in self.ports:
            listener.stopListening()
        self.ports = []
        self.flush()
        if check:
            self.net.assert_clean()

    def __enter__(self) -> MemoryTunnel:
        if not self.started:
            self.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.stop()
            return
        try:  # after a failure, clean up without piling a second error on it
            self.stop(check=False)
        except Exception:
            log.failure("stopping the memory tunnel after a failed test")

    # -- driving ------------------------------------------------------------------------

    def flush(self) -> bool:
        return self.net.flush()

    def advance(self, seconds: float) -> None:
        self.net.advance(seconds)

    def advance_to(self, when: float) -> None:
        self.net.advance_to(when)

    def run_until(self, predicate, limit: float = 3600.0) -> float:
        return self.net.run_until(predicate, limit)

    def result(self, d: Deferred, limit: float = 0.0):
        return self.net.result(d, limit)

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def connect(
        self, port: int | None = None, host: str = "127.0.0.1", *, half_close: bool = False
    ) -> Peer:
        """A public connection (to the TunnelSite unless ``port`` says otherwise)."""
        peer = self.net.connect(port or self.PUBLIC_PORT, host, half_close=half_close)
        assert peer.failed is None, peer.failed
        return peer

    def request(self, data: bytes, *, port: int | None = None, host: str = "127.0.0.1") -> bytes:
        """Send ``data`` on a new public connection and return every byte that
        came back once the network settled (no time passes).  A connection
        the server keeps open is then closed by the client."""
        peer = self.connect(port, host)
        peer.send(data)
        self.flush()
        if not peer.closed:
            peer.close()
            self.flush()
        return peer.received

    def get(self, path: bytes, host: bytes | None = None, headers: bytes = b"") -> Response:
        """``GET path`` on a new public connection; the parsed response."""
        host = host if host is not None else self.HOST.encode()
        raw = self.request(b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, host, headers))
        return parse_response(raw)

    def tunnel_connection(self) -> MemoryConnection:
        """The memory connection that carries the client's current session."""
        transport = self.client.protocol.transport
        return transport.connection


def _addr(address) -> str:
    return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
