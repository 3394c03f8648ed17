"""A yamux stream: one multiplexed connection, seen by its protocol as a transport.

Flow control follows ``twisted.web._http2.H2Stream`` and conch's
``SSHChannel``:

* sending: bytes go out only within the peer's window; the rest waits in the
  stream's buffer and the registered producer is paused once that buffer
  passes ``write_buffer_size``.  ``loseConnection`` sends FIN only after the
  buffer has drained.  A pull producer is driven as a push producer
  (``producers.PullToPush``), as H2Stream does.
* receiving: data reaches the protocol unless the stream is paused (or has no
  protocol yet); credit is returned to the peer only for bytes the protocol
  has consumed, so a consumer that stops reading stops the sender after one
  window.  With ``max_grown_window`` the window doubles each time the peer
  has sent a whole window's worth since it last grew (the extra goes out
  with the next credit), within the session's ``receive_budget``.

Lifecycle: a stream is in one ``Phase`` at a time and moves only along the
transition table below (``_move``); the public ``StreamState`` is derived
from the phase and from whether our SYN still awaits its ACK.  That
handshake is kept apart (``_awaiting_ack``), as Go keeps ``establishCh``
apart from its state: our FIN may go out before the peer's ACK comes in.

    phase          FIN_SENT      FIN_RECEIVED   EOF_DELIVERED   DETACHED
    OPEN           WRITE_CLOSED  READ_CLOSING   .               .
    WRITE_CLOSED   .             DRAINING       .               LINGERING
    LINGERING      .             CLOSING        .               .
    READ_CLOSING   DRAINING      (error)        READ_CLOSED     .
    READ_CLOSED    CLOSING       (error)        .               .
    DRAINING       .             (error)        CLOSING         .
    CLOSING        .             (error)        .               .

    any phase but CLOSED/RESET -> CLOSED: nothing left to do (a CLOSING
        stream at once; a DRAINING one without a protocol; loseConnection
        once both FINs passed), abortConnection, the session's end;
    any phase but CLOSED/RESET -> RESET: RST received, or sent on a timeout.

FIN_SENT: our FIN went out (after the queued data; loseWriteConnection or
loseConnection asked for it).  FIN_RECEIVED: the peer's FIN arrived; a
second one is a protocol error (``check_fin``, at the header).
EOF_DELIVERED: the protocol was told of that FIN (readConnectionLost, or
nothing after loseConnection), after every byte before it.  DETACHED:
after loseConnection, with our FIN out, the protocol is done
(connectionLost); we drop what the peer still sends and wait for its FIN,
up to ``stream_close_timeout``.

Besides the phase, ``_closing`` records what the protocol asked for (None,
a half-close or a full close), since the FIN it asked for may wait behind
queued data; ``_paused``, ``_delivering``, ``_producer_paused`` and
``_notified`` are flow control and callback bookkeeping, not lifecycle.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .errors import (
    StreamCloseTimeout,
    StreamOpenTimeout,
    StreamReset,
    UnexpectedFin,
    WindowExceeded,
)
from .frame import FLAG_FIN, FLAG_RST, INITIAL_WINDOW
from .producers import PullToPush

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocol

    from .session import YamuxSession


class StreamState(enum.Enum):
    """Go's stream states (INIT and SYN_RECEIVED are never seen here: the
    session sends our SYN, and its ACK of the peer's, as it creates a stream)."""

    INIT = "Init"
    SYN_SENT = "SYNSent"
    SYN_RECEIVED = "SYNReceived"
    ESTABLISHED = "Established"
    LOCAL_CLOSE = "LocalClose"
    REMOTE_CLOSE = "RemoteClose"
    CLOSED = "Closed"
    RESET = "Reset"


class Phase(enum.Enum):
    """Where a stream is in its life; see the module docstring for the table."""

    OPEN = "open"  # both directions open
    WRITE_CLOSED = "write closed"  # our FIN is out; we still read
    LINGERING = "lingering"  # loseConnection, our FIN out: protocol gone, awaiting peer FIN
    READ_CLOSING = "read closing"  # the peer's FIN is in, not yet told to the protocol
    READ_CLOSED = "read closed"  # the peer's FIN is in and told; we still write
    DRAINING = "draining"  # both FINs passed; data and EOF still to deliver
    CLOSING = "closing"  # both FINs passed and told: over once the callback returns
    CLOSED = "closed"  # over (cleanly, by abort, or by the session's end)
    RESET = "reset"  # over by RST, received or sent on a timeout

    # members are singletons: identity hashing keeps ``phase in _OVER`` cheap
    __hash__ = object.__hash__


class _Event(enum.Enum):
    FIN_SENT = enum.auto()
    FIN_RECEIVED = enum.auto()
    EOF_DELIVERED = enum.auto()
    DETACHED = enum.auto()

    __hash__ = object.__hash__  # as Phase: _TRANSITIONS is looked up per event


_TRANSITIONS: dict[tuple[Phase, _Event], Phase] = {
    (Phase.OPEN, _Event.FIN_SENT): Phase.WRITE_CLOSED,
    (Phase.OPEN, _Event.FIN_RECEIVED): Phase.READ_CLOSING,
    (Phase.WRITE_CLOSED, _Event.FIN_RECEIVED): Phase.DRAINING,
    (Phase.WRITE_CLOSED, _Event.DETACHED): Phase.LINGERING,
    (Phase.LINGERING, _Event.FIN_RECEIVED): Phase.CLOSING,
    (Phase.READ_CLOSING, _Event.FIN_SENT): Phase.DRAINING,
    (Phase.READ_CLOSING, _Event.EOF_DELIVERED): Phase.READ_CLOSED,
    (Phase.READ_CLOSED, _Event.FIN_SENT): Phase.CLOSING,
    (Phase.DRAINING, _Event.EOF_DELIVERED): Phase.CLOSING,
}

#: the reason of every clean close, shared as twisted.internet.protocol's
#: ``connectionDone`` is (a Failure without a traceback is never changed)
STREAM_CLOSED = Failure(ConnectionDone("stream closed"))

_OVER = frozenset({Phase.CLOSED, Phase.RESET})
#: phases before our FIN went out
_WRITING = frozenset({Phase.OPEN, Phase.READ_CLOSING, Phase.READ_CLOSED})
#: phases before the peer's FIN came in
_READING = frozenset({Phase.OPEN, Phase.WRITE_CLOSED, Phase.LINGERING})
#: data from the peer reaches the protocol (a body never spans the peer's FIN)
_DELIVERING = frozenset({Phase.OPEN, Phase.WRITE_CLOSED})
#: the peer's FIN is in but not yet told to the protocol
_EOF_PENDING = frozenset({Phase.READ_CLOSING, Phase.DRAINING})

_PUBLIC = {
    Phase.WRITE_CLOSED: StreamState.LOCAL_CLOSE,
    Phase.LINGERING: StreamState.LOCAL_CLOSE,
    Phase.READ_CLOSING: StreamState.REMOTE_CLOSE,
    Phase.READ_CLOSED: StreamState.REMOTE_CLOSE,
    Phase.DRAINING: StreamState.CLOSED,
    Phase.CLOSING: StreamState.CLOSED,
    Phase.CLOSED: StreamState.CLOSED,
    Phase.RESET: StreamState.RESET,
}


class Closing(enum.Enum):
    """What the protocol asked for; the FIN it implies may wait for queued data."""

    WRITE = "write"  # loseWriteConnection: FIN, keep reading
    FULL = "full"  # loseConnection: FIN, and the protocol is done


@implementer(IAddress)
@dataclass(frozen=True)
class StreamAddress:
    """The address of one stream: the session's peer (or host) and the stream id."""

    session_address: Any
    stream_id: int


@implementer(ITransport, IConsumer, IPushProducer)
class YamuxStream:
    """One stream of a YamuxSession; a Twisted transport for its protocol.

    Besides ITransport it offers ``loseWriteConnection()`` (send FIN, keep
    reading) and ``abortConnection()`` (send RST).  A protocol that provides
    IHalfCloseableProtocol sees the peer's FIN as ``readConnectionLost()``;
    any other protocol sees it as the end of the connection, as over TCP.
    """

    log = Logger()

    # many streams live at once (one per tunnel request, one control stream
    # per idle tunnel): no instance dict
    __slots__ = (
        "session",
        "id",
        "outbound",
        "protocol",
        "_phase",
        "_reason",
        "_awaiting_ack",
        "_closing",
        "_send_window",
        "_send_buf",
        "_send_buffered",
        "_high_water",
        "_producer",
        "_producer_paused",
        "_max_window",
        "_half_window",
        "_grow_limit",
        "_since_growth",
        "_recv_window",
        "_recv_buf",
        "_recv_buffered",
        "_paused",
        "_delivering",
        "_late_reason",
        "_notified",
    )

    def __init__(
        self,
        session: YamuxSession,
        stream_id: int,
        *,
        outbound: bool,
        window: int = INITIAL_WINDOW,
    ) -> None:
        config = session.config
        self.session = session
        self.id = stream_id
        self.outbound = outbound
        self.protocol: IProtocol | None = None
        self._phase = Phase.OPEN
        self._reason: Failure | None = None  # why it ended, once over
        self._awaiting_ack = outbound  # the session ACKs a peer's stream at once
        self._closing: Closing | None = None
        # sending
        self._send_window = INITIAL_WINDOW
        #: what waits for window or for the socket; a deque once needed
        self._send_buf: deque[bytes] | None = None
        self._send_buffered = 0
        self._high_water = config.write_buffer_size
        self._producer: Any = None
        self._producer_paused = False
        # receiving
        self._max_window = window
        self._half_window = window // 2
        #: the window may double up to this (0: it does not grow)
        self._grow_limit = config.max_grown_window or 0
        #: bytes credited back to the peer since the window last grew
        self._since_growth = 0
        self._recv_window = window
        #: what arrived while the protocol could not take it; a deque once needed
        self._recv_buf: deque[bytes] | None = None
        self._recv_buffered = 0
        self._paused = False
        self._delivering = False
        self._late_reason: Failure | None = None
        self._notified = False

    def __repr__(self) -> str:
        return f"<YamuxStream {self.id} {self.state.value}>"

    # -- state -----------------------------------------------------------

    @property
    def state(self) -> StreamState:
        phase = self._phase
        if phase is Phase.OPEN:
            return StreamState.SYN_SENT if self._awaiting_ack else StreamState.ESTABLISHED
        return _PUBLIC[phase]

    @property
    def phase(self) -> Phase:
        """The lifecycle phase (finer than ``state``)."""
        return self._phase

    @property
    def connected(self) -> bool:
        """ITransport: a protocol is attached and has not been told the end."""
        return self.protocol is not None and not self._notified and self._phase not in _OVER

    @property
    def disconnecting(self) -> bool:
        """ITransport: loseConnection was called and the stream is not over yet."""
        return self._closing is Closing.FULL and self._phase not in _OVER

    def _move(self, event: _Event) -> None:
        try:
            self._phase = _TRANSITIONS[self._phase, event]
        except KeyError:
            raise AssertionError(
                f"stream {self.id}: no transition from {self._phase.name} on {event.name}"
            ) from None

    @property
    def send_window(self) -> int:
        """Bytes the peer currently lets us send."""
        return self._send_window

    @property
    def receive_window(self) -> int:
        """Bytes the peer may still send before we grant more credit."""
        return self._recv_window

    @property
    def window_size(self) -> int:
        """The receive window we grant this stream (the session chose it; it
        may have grown since, see ``YamuxConfig.max_grown_window``)."""
        return self._max_window

    @property
    def buffered(self) -> tuple[int, int]:
        """(bytes waiting to be sent, bytes received but not yet consumed)."""
        return self._send_buffered, self._recv_buffered

    # -- attaching a protocol ------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to this stream; data that arrived earlier follows."""
        if self.protocol is not None:
            raise RuntimeError(f"{self!r} already has a protocol")
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._phase in _OVER:
            self._notify(self._reason)
            return
        if not self._paused:
            self._deliver_buffered()

    def detach(self, unread: bytes = b"") -> None:
        """Hand the stream over: the current protocol lets go of it, for the
        next ``attach``.

        For a protocol that reads a prefix (a status byte, say) and then
        gives the stream to another: ``unread``, the bytes it was given past
        that prefix, goes back in front of the receive buffer, so the next
        protocol gets them first and in order; they count as buffered, so no
        credit is granted for them until it consumes them.  Until ``attach``
        nothing is delivered (data waits within the window, as on a stream
        not yet attached) and nobody hears of the stream's end.  May be called
        from inside ``dataReceived``.  RuntimeError unless a protocol is
        attached, has not closed, has no producer registered, and the stream
        is open for reading and writing (or has a FIN not yet told).
        """
        if (
            self.protocol is None
            or self._phase not in (Phase.OPEN, Phase.READ_CLOSING)
            or self._closing is not None
            or self._producer is not None
            or self._notified
        ):
            raise RuntimeError(f"{self!r} cannot be detached now")
        self.protocol = None
        self._paused = False  # the old protocol's pause is not the next one's
        if unread:
            buf = self._recv_buf
            if buf is None:
                buf = self._recv_buf = deque()
            buf.appendleft(bytes(unread))
            self._recv_buffered += len(unread)

    # -- ITransport ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing is not None or self._phase in _OVER or not data:
            return
        if not self._send_buffered and self.session.can_send_now():
            data = self._send_now(data)
            if not data:
                return
        buf = self._send_buf
        if buf is None:
            buf = self._send_buf = deque()
        buf.append(data)
        self._send_buffered += len(data)
        if self._send_window > 0:
            self.session.schedule_send(self)
        if (
            self._send_buffered > self._high_water
            and self._producer is not None
            and not self._producer_paused
        ):
            self._producer_paused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send FIN once queued data has gone out; the protocol is then done."""
        if self._phase in _OVER or self._closing is Closing.FULL:
            return
        fin_asked = self._closing is Closing.WRITE
        self._closing = Closing.FULL
        if self._phase not in _WRITING:
            self._after_full_close()
        elif not fin_asked and not self._send_buffered:
            self._send_fin()

    def loseWriteConnection(self) -> None:
        """Half-close: send FIN once queued data has gone out; keep reading."""
        if self._phase in _OVER or self._closing is not None:
            return
        self._closing = Closing.WRITE
        if not self._send_buffered:
            self._send_fin()

    def abortConnection(self) -> None:
        """Abort both directions at once with RST; queued data is dropped."""
        if self._phase in _OVER:
            return
        self.session.send_window_update(self.id, FLAG_RST)
        self._end(Failure(ConnectionAborted("stream aborted")))

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.session.peer_address, self.id)

    def getHost(self) -> StreamAddress:
        return StreamAddress(self.session.host_address, self.id)

    # -- IConsumer -----------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, because producer "
                f"{self._producer!r} was never unregistered."
            )
        if self._phase in _OVER:
            producer.stopProducing()
            return
        pull = None
        if not streaming:
            producer = pull = PullToPush(producer, self, self.session.clock)
        self._producer = producer
        self._producer_paused = False
        if self._send_buffered > self._high_water:
            self._producer_paused = True
            producer.pauseProducing()
        if pull is not None:
            pull.start()

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        self._producer_paused = False
        if isinstance(producer, PullToPush):
            producer.stop()

    # -- IPushProducer (the protocol's consumer controls our delivery) -------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.protocol is not None:
            self._deliver_buffered()

    def stopProducing(self) -> None:
        """The consumer is gone (e.g. its TCP connection was reset): abort, as H2Stream does.

        A FIN here would make a truncated transfer look complete to the peer.
        """
        self.abortConnection()

    # -- the seam: what the session calls (see session.py's design comment) ----

    def data_header(self, length: int) -> Callable[[bytes], None] | None:
        """A Data header for us: where its body goes, or None to skip it.

        Raises WindowExceeded if ``length`` is more than we let the peer send.
        """
        if length > self._recv_window:
            raise WindowExceeded(
                f"stream {self.id}: Data of {length} bytes exceeds the window"
                f" of {self._recv_window}"
            )
        if self._phase not in _READING:
            if length:
                self.log.info("stream {sid}: Data after FIN dropped", sid=self.id)
            return None
        return self.data_received

    def data_received(self, data: bytes) -> None:
        """A piece of a Data body (its header passed ``data_header``)."""
        n = len(data)
        self._recv_window -= n
        phase = self._phase
        if phase not in _DELIVERING:
            if phase is Phase.LINGERING:
                # the protocol is gone; keep the peer moving until it sends FIN
                self._maybe_grant()
            return  # else over
        if self._paused or self.protocol is None or self._recv_buf or self._delivering:
            buf = self._recv_buf
            if buf is None:
                buf = self._recv_buf = deque()
            buf.append(data)
            self._recv_buffered += n
            return
        self._delivering = True
        try:
            self.protocol.dataReceived(data)
        except Exception:
            self._delivered()
            self.log.failure("protocol of stream {sid} failed in dataReceived", sid=self.id)
            self.abortConnection()
            return
        self._delivered()
        if self._phase in _OVER:
            return
        if self._recv_buf and not self._paused:
            self._deliver_buffered()
        else:
            self._maybe_grant()

    def window_received(self, delta: int) -> None:
        """The peer granted ``delta`` more bytes of window (WindowUpdate, SYN or ACK)."""
        had = self._send_window
        self._send_window = had + delta
        if had <= 0 and self._send_buffered:
            self.session.schedule_send(self)

    def ack_received(self) -> None:
        """The peer acknowledged our SYN (the session calls this once, for our streams)."""
        self._awaiting_ack = False
        if self._phase is Phase.LINGERING:
            self.session.expect_fin(self)

    def check_fin(self) -> None:
        """A frame for us carries FIN: raise UnexpectedFin if the peer's FIN came already."""
        if self._phase not in _READING and self._phase not in _OVER:
            raise UnexpectedFin(f"second FIN on stream {self.id}")

    def fin_received(self) -> None:
        """The peer's FIN (``check_fin`` passed at the header), after the frame's payload."""
        if self._phase in _OVER:
            return
        self._move(_Event.FIN_RECEIVED)
        if self._phase is Phase.CLOSING:
            # we were lingering: this FIN completes the close
            self._end(None)
        elif not self._recv_buf and not self._delivering:
            self._deliver_eof()

    def reset_received(self) -> None:
        """The peer sent RST."""
        self._end(Failure(StreamReset(f"stream {self.id} reset by peer")), reset=True)

    def session_lost(self, reason: Failure) -> None:
        """The session ended with the stream still open."""
        self._end(reason)

    def send_frame(self, budget: int) -> bool:
        """The session's turn for us: send one frame of at most ``budget`` bytes.

        Returns True if more could go (data queued and window left).
        """
        if self._phase in _OVER or not self._send_buffered or self._send_window <= 0:
            return False
        return self._send_some(budget)

    def _send_some(self, budget: int) -> bool:
        """Send one frame of at most ``budget`` bytes; return True if more can go."""
        window = self._send_window
        if budget > window:
            budget = window
        buf = self._send_buf
        chunk = buf[0]
        size = len(chunk)
        if size <= budget:
            buf.popleft()
            if type(chunk) is memoryview:
                chunk = chunk.tobytes()
        else:
            view = chunk if type(chunk) is memoryview else memoryview(chunk)
            size = budget
            buf[0] = view[size:]
            chunk = view[:size].tobytes()
        self._send_window = window - size
        self._send_buffered -= size
        self.session.write_data(self.id, chunk)
        if not self._send_buffered:
            self._drained()
            return False
        return self._send_window > 0

    def _drained(self) -> None:
        """The send buffer just became empty."""
        if self._closing is not None:
            self._send_fin()
            return
        producer = self._producer
        if producer is not None and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    # -- internals -----------------------------------------------------------

    def _send_now(self, data: bytes) -> bytes | memoryview:
        """Write what the window and the socket allow now; return the rest."""
        size = len(data)
        window = self._send_window
        limit = self.session.config.max_frame_size
        if size <= window and size <= limit:
            self._send_window = window - size
            self.session.write_data(self.id, data)
            return b""
        view = memoryview(data)
        offset = 0
        writable = True
        while offset < size and window > 0 and writable:
            n = min(size - offset, window, limit)
            writable = self.session.write_data(self.id, view[offset : offset + n].tobytes())
            offset += n
            window -= n
        self._send_window = window
        return view[offset:] if offset < size else b""

    def _deliver_buffered(self) -> None:
        if self._delivering or self._phase in _OVER:
            return
        buf = self._recv_buf
        self._delivering = True
        try:
            while buf and not self._paused and self._phase not in _OVER:
                protocol = self.protocol  # may change in dataReceived (detach, attach)
                if protocol is None:
                    break
                data = buf.popleft()
                self._recv_buffered -= len(data)
                protocol.dataReceived(data)
        except Exception:
            self._delivered()
            self.log.failure("protocol of stream {sid} failed in dataReceived", sid=self.id)
            self.abortConnection()
            return
        self._delivered()
        if self._phase in _OVER:
            return
        self._maybe_grant()
        if not buf:
            self._deliver_eof()

    def _maybe_grant(self) -> None:
        if self._phase not in _READING:
            return
        delta = self._max_window - self._recv_buffered - self._recv_window
        if delta >= self._half_window:
            if self._grow_limit > self._max_window:
                delta += self._grow(delta)
            self._recv_window += delta
            self.session.send_window_update(self.id, 0, delta)

    def _grow(self, credited: int) -> int:
        """The peer sent a whole window since the window last grew: double it
        (up to ``max_grown_window``, within the session's budget).  Returns the
        growth, which goes out with this credit."""
        since = self._since_growth + credited
        window = self._max_window
        if since < window:
            self._since_growth = since
            return 0
        self._since_growth = 0
        extra = min(window, self._grow_limit - window)
        if not self.session.grow_window(self, extra):
            return 0  # the budget is spent for now
        window += extra
        self._max_window = window
        self._half_window = window // 2
        return extra

    def _deliver_eof(self) -> None:
        """Tell the protocol of the peer's FIN, if it is in and not told yet."""
        if self._phase not in _EOF_PENDING:
            return
        if self.protocol is None:
            # nobody to tell yet (attach delivers it); both FINs: it is over
            if self._phase is Phase.DRAINING:
                self._end(None)
            return
        self._move(_Event.EOF_DELIVERED)
        if self._closing is Closing.FULL:
            # the protocol asked to close: nothing to tell it
            if self._phase is Phase.CLOSING:
                self._end(None)
            return
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            try:
                half.readConnectionLost()
            except Exception:
                self.log.failure("stream {sid}: readConnectionLost failed", sid=self.id)
                self.abortConnection()
                return
        if self._phase is Phase.CLOSING:
            self._end(None)
        elif half is None:
            self.loseConnection()

    def _send_fin(self) -> None:
        if self._phase not in _WRITING:
            return
        self._move(_Event.FIN_SENT)
        self.session.send_window_update(self.id, FLAG_FIN)
        if self._closing is Closing.FULL:
            self._after_full_close()
            return
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is not None:
            try:
                half.writeConnectionLost()
            except Exception:
                self.log.failure("stream {sid}: writeConnectionLost failed", sid=self.id)
                self.abortConnection()
                return
        phase = self._phase
        if phase is Phase.CLOSING or (phase is Phase.DRAINING and self.protocol is None):
            self._end(None)

    def _after_full_close(self) -> None:
        """Our FIN is out after loseConnection: the protocol is done with us."""
        if self._phase is not Phase.WRITE_CLOSED:
            # the peer's FIN is in too: nothing is left to do
            self._end(None)
            return
        self._move(_Event.DETACHED)
        self._notify(None)
        self._drop_received()
        self._maybe_grant()
        if not self._awaiting_ack:  # else the ACK starts the wait
            self.session.expect_fin(self)

    def _drop_received(self) -> None:
        """Forget what was received and not delivered (a delivery loop stops too)."""
        buf = self._recv_buf
        if buf is not None:
            buf.clear()
            self._recv_buf = None
        self._recv_buffered = 0

    def close_timed_out(self) -> None:
        """The peer's FIN did not come within ``stream_close_timeout`` of our full close."""
        if self._phase in _OVER:
            return
        self.log.info("stream {sid}: no FIN from the peer in time, resetting", sid=self.id)
        self.session.send_window_update(self.id, FLAG_RST)
        self._end(
            Failure(StreamCloseTimeout(f"stream {self.id}: no FIN from the peer")), reset=True
        )

    def open_timed_out(self) -> None:
        """Our SYN was not ACKed within ``stream_open_timeout``."""
        if self._phase in _OVER:
            return
        self.log.info("stream {sid}: no ACK from the peer in time, resetting", sid=self.id)
        self.session.send_window_update(self.id, FLAG_RST)
        self._end(Failure(StreamOpenTimeout(f"stream {self.id} was not acknowledged")), reset=True)

    def _end(self, reason: Failure | None, reset: bool = False) -> None:
        """The stream is over (both FINs, RST, abort or session loss): CLOSED or RESET."""
        if self._phase in _OVER:
            return
        if reason is None:
            reason = STREAM_CLOSED
        self._phase = Phase.RESET if reset else Phase.CLOSED
        self._reason = reason
        self._send_buf = None
        self._send_buffered = 0
        self._drop_received()
        self.session.stream_ended(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                self.log.failure("stream {sid}: producer failed to stop", sid=self.id)
        self._notify(reason)

    def _delivered(self) -> None:
        """dataReceived returned: tell the protocol of a close it caused inside it."""
        self._delivering = False
        late, self._late_reason = self._late_reason, None
        if late is not None:
            self._notify(late)

    def _notify(self, reason: Failure | None) -> None:
        if self._notified or self.protocol is None:
            return
        if self._delivering:
            # like TCP, never call connectionLost from inside dataReceived
            if self._late_reason is None:
                self._late_reason = reason or STREAM_CLOSED
            return
        self._notified = True
        protocol = self.protocol
        try:
            protocol.connectionLost(reason or STREAM_CLOSED)
        except Exception:
            self.log.failure("stream {sid}: connectionLost failed", sid=self.id)
