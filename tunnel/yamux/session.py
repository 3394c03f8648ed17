"""A yamux session: one connection multiplexed into streams.

``YamuxSession`` is a Twisted Protocol for the underlying connection (TCP,
TLS, or the raw socket left after an HTTP CONNECT) and is that transport's
push producer.  It never pauses reading the socket, since pings must be
answered; backpressure is per stream, by window credit (see ``stream.py``).

Sending is fair: while the socket accepts data a stream's writes go straight
out (within its window, in frames of at most ``max_frame_size``); once the
transport pauses us, streams queue and are drained round-robin, one frame
each, when it resumes.

The seam between session and stream
-----------------------------------
As with twisted.web's H2Connection and H2Stream, the two classes talk only
through a small set of public methods; neither touches the other's
underscore attributes.  The session owns the connection, the frame codec,
the stream table and the fair send queue; a stream owns its windows, its
buffers, its lifecycle (``Phase``, see ``stream.py``) and its protocol.

The session calls on a stream (frame events, already routed by stream id):

- ``YamuxStream(session, id, outbound=..., window=...)``: a stream we open
  (its SYN goes out next) or one the peer opened (ACKed at once), with the
  receive window the session chose (``max_stream_window`` within
  ``receive_budget``), announced by the SYN/ACK delta;
- ``data_header(length)``: a Data header arrived; the stream checks it
  against its receive window and returns the sink for the body
  (``data_received``) or None to skip it;
- ``data_received(data)``: a piece of that body;
- ``window_received(delta)``: send credit from WindowUpdate, SYN or ACK;
- ``ack_received()``: the peer ACKed our SYN (once; the session counts
  pending opens itself);
- ``check_fin()`` at the header (a second FIN is a protocol error), then
  ``fin_received()`` after the frame's payload; ``reset_received()``: RST;
- ``session_lost(reason)``: the connection ended under the stream;
- ``send_frame(budget)``: the stream's round-robin turn to send one frame;
- ``open_timed_out()``: our SYN got no ACK within ``stream_open_timeout``;
  ``close_timed_out()``: no FIN came within ``stream_close_timeout`` of
  ``expect_fin``.  The session keeps these deadlines for all its streams
  on one DelayedCall per kind (``timers.Deadlines``), so a stream that
  opens and closes in time arms no timer of its own.

A stream calls on its session (what it needs from the connection):

- ``config``, ``clock``, ``peer_address``, ``host_address``: attributes;
- ``can_send_now()`` and ``write_data(id, data)``: write Data straight out
  while the socket takes it and no stream is queued (fairness);
- ``schedule_send(stream)``: queue the stream for the round-robin drain;
- ``send_window_update(id, flags, delta)``: credit, FIN or RST (control
  frames are never queued behind data);
- ``grow_window(stream, extra)``: may the stream's receive window grow
  (``max_grown_window``) by ``extra``, within ``receive_budget``?
- ``expect_fin(stream)``: our side is fully closed; wait for the peer's FIN;
- ``stream_ended(stream)``: the stream is over; forget it.

Frame routing, stream ids, accept/refuse, and the SYN/ACK frames stay with
the session (they decide whether a stream exists at all); everything that
depends on one stream's state stays with the stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import RateLimitedLog
from ..observe import OneShot
from ..timers import Deadlines, cancel
from ..writethrough import write_through
from .config import YamuxConfig
from .errors import (
    DuplicateStream,
    InvalidStreamId,
    KeepAliveTimeout,
    PingTimeout,
    ProtocolError,
    RemoteGoAway,
    SessionClosed,
    SessionLost,
    TooManyStreams,
    YamuxError,
)
from .frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GOAWAY_NORMAL,
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_STREAM_ID,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_NAMES,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameParser,
    Header,
    encode,
)
from .sizing import size_transport
from .stream import YamuxStream

StreamHandler = Callable[[YamuxStream], None]


@implementer(IPushProducer)
class YamuxSession(Protocol):
    """One end of a yamux connection.

    :param is_client: True for the side created with ``yamux.Client`` (odd
        stream ids), False for the server side (even ids).
    :param clock: the reactor's IReactorTime (inject a Clock in tests).
    :param on_stream: called with each stream the peer opens; until a handler
        is set, up to ``accept_backlog`` streams wait (see ``set_stream_handler``).
    :param quiet_until_peer_speaks: send nothing (no keepalive) until the
        peer's first frame arrives; the koding server needs this because the
        Go client drops bytes that arrive with the CONNECT reply.
    """

    log = Logger()

    # one session per tunnel, most of them idle: no instance dict for these
    # (``transport`` and ``connected`` are BaseProtocol's)
    __slots__ = (
        "transport",
        "connected",
        "clock",
        "_late_frames_log",
        "config",
        "is_client",
        "_next_id",
        "_last_remote_id",
        "_streams",
        "_handler",
        "_backlog",
        "_unacked",
        "_fin_deadlines",
        "_open_waiters",
        "_release_call",
        "_parser",
        "_quiet",
        "_heard_peer",
        "_write_paused",
        "_ready",
        "_draining",
        "_control_backlog",
        "_max_frame",
        "_window_delta",
        "_extra_window",
        "local_go_away",
        "remote_go_away",
        "_closing",
        "_closed",
        "_close_reason",
        "_close_timer",
        "_closed_event",
        "_go_away_event",
        "_idle_events",
        "_ping_id",
        "_pings",
        "_keepalive_timer",
        "_peer_address",
        "host_address",
        "bytes_sent",
        "bytes_received",
    )

    def __init__(
        self,
        is_client: bool,
        *,
        clock: IReactorTime | None = None,
        config: YamuxConfig | None = None,
        on_stream: StreamHandler | None = None,
        quiet_until_peer_speaks: bool = False,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: PLC0415
        self.transport: Any = None
        self.connected = 0
        self.clock = clock
        #: frames for streams already gone are routine after a reset, one per
        #: reset: a peer resetting streams on purpose must not fill the log
        #: (a RateLimitedLog, made when the first such frame comes)
        self._late_frames_log: RateLimitedLog | None = None
        self.config = config or YamuxConfig()
        self.is_client = is_client
        self._next_id = 1 if is_client else 2
        self._last_remote_id = 0
        self._streams: dict[int, YamuxStream] = {}
        self._handler = on_stream
        self._backlog: list[YamuxStream] = []
        #: our streams whose SYN awaits an ACK (bounded by max_pending_opens),
        #: each reset if not ACKed within stream_open_timeout; made on first open
        self._unacked: Deadlines | None = None
        #: our streams fully closed, waiting for the peer's FIN up to
        #: stream_close_timeout; made on first use
        self._fin_deadlines: Deadlines | None = None
        #: request_stream() calls waiting for a slot (a deque once needed)
        self._open_waiters: deque[Deferred] | None = None
        self._release_call: Any = None
        self._parser = FrameParser(self)
        self._quiet = quiet_until_peer_speaks
        self._heard_peer = False
        # sending
        self._write_paused = False
        self._ready: dict[YamuxStream, None] = {}
        self._draining = False
        self._control_backlog = 0
        self._max_frame = self.config.max_frame_size
        self._window_delta = self.config.max_stream_window - INITIAL_WINDOW
        #: window beyond INITIAL_WINDOW granted to the open streams (receive_budget)
        self._extra_window = 0
        # lifecycle
        self.local_go_away = False
        self.remote_go_away: int | None = None
        self._closing = False
        self._closed: Failure | None = None
        self._close_reason: Failure | None = None
        self._close_timer: Any = None
        self._closed_event = OneShot()
        self._go_away_event: OneShot | None = None  # made when someone waits for it
        #: when_idle(n) waiters, one OneShot per threshold n
        self._idle_events: dict[int, OneShot] = {}
        # pings
        self._ping_id = 0
        self._pings: dict[int, tuple[Deferred, float, Any]] = {}
        self._keepalive_timer: Any = None
        self._peer_address: Any = None
        self.host_address: Any = None
        #: payload bytes of the Data frames sent and received (traffic counters)
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<YamuxSession {role} streams={len(self._streams)}>"

    # -- public API ----------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The transport's peer (asked for at first use, then kept)."""
        address = self._peer_address
        if address is None and self.transport is not None:
            address = self._peer_address = self.transport.getPeer()
        return address

    @property
    def streams(self) -> dict[int, YamuxStream]:
        """The open streams by id (a copy)."""
        return dict(self._streams)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> BaseException | None:
        """Why the session ended (e.g. KeepAliveTimeout), once it has."""
        return self._closed.value if self._closed is not None else None

    def open_stream(self) -> YamuxStream:
        """Open a stream: the SYN goes out now and data may follow before the ACK.

        Raises SessionClosed, RemoteGoAway or TooManyStreams.
        """
        refusal = self._cannot_open()
        if refusal is not None:
            raise refusal
        unacked = self._unacked
        if unacked is None:
            unacked = self._unacked = Deadlines(
                self.clock, self.config.stream_open_timeout, YamuxStream.open_timed_out
            )
        if len(unacked) >= self.config.max_pending_opens:
            raise TooManyStreams(f"{len(unacked)} opens already await an ACK")
        if len(self._streams) >= self.config.max_streams:
            raise TooManyStreams(f"{len(self._streams)} streams are open")
        sid = self._next_id
        if sid >= MAX_STREAM_ID - 1:
            raise TooManyStreams("stream ids exhausted")
        self._next_id = sid + 2
        delta = self._reserve_window()
        stream = YamuxStream(self, sid, outbound=True, window=INITIAL_WINDOW + delta)
        self._streams[sid] = stream
        unacked.add(stream)
        self.send_window_update(sid, FLAG_SYN, delta)
        return stream

    def request_stream(self) -> Deferred:
        """Like ``open_stream``, but wait for a slot when too many opens are pending.

        The Deferred fires with the new stream, in request order, as soon as
        fewer than ``max_pending_opens`` SYNs await an ACK; it fails if the
        session ends or the peer sends GoAway first.  Cancelling it withdraws
        the request.
        """
        if not self._open_waiters and self._pending_opens() < self.config.max_pending_opens:
            try:
                return succeed(self.open_stream())
            except Exception as e:
                return fail(e)
        refusal = self._cannot_open()
        if refusal is not None:
            return fail(refusal)
        waiters = self._open_waiters
        if waiters is None:
            waiters = self._open_waiters = deque()
        d: Deferred = Deferred(waiters.remove)
        waiters.append(d)
        return d

    def _cannot_open(self) -> YamuxError | None:
        """Why no stream can be opened now at all (limits aside), if so."""
        if self._closing or self._closed is not None or self.transport is None:
            return SessionClosed("the session is closed")
        if self.remote_go_away is not None:
            return RemoteGoAway(self.remote_go_away)
        return None

    def _release_open_waiters(self) -> None:
        waiters = self._open_waiters
        while waiters and self._pending_opens() < self.config.max_pending_opens:
            d = waiters.popleft()
            try:
                stream = self.open_stream()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(stream)

    def _pending_opens(self) -> int:
        """How many of our SYNs await an ACK."""
        return 0 if self._unacked is None else len(self._unacked)

    def _release_later(self) -> None:
        self._release_call = None
        self._release_open_waiters()

    def _fail_open_waiters(self, error: Exception) -> None:
        waiters, self._open_waiters = self._open_waiters, None
        for d in waiters or ():
            d.errback(Failure(error))

    def set_stream_handler(self, handler: StreamHandler | None) -> None:
        """Hand streams the peer opens to ``handler``; waiting ones go first.

        With no handler, new streams wait (ACKed, data buffered within their
        window) up to ``accept_backlog``; beyond that they are refused with RST.
        """
        self._handler = handler
        while handler is not None and self._backlog and self._handler is handler:
            stream = self._backlog.pop(0)
            if self._streams.get(stream.id) is stream:  # still open
                self._hand_over(handler, stream)

    def go_away(self, code: int = GOAWAY_NORMAL) -> None:
        """Tell the peer we accept no new streams; existing ones carry on."""
        if self.local_go_away or self._closed is not None or self.transport is None:
            return
        self.local_go_away = True
        self._send_control(encode(TYPE_GO_AWAY, 0, 0, code))

    def close(self, code: int = GOAWAY_NORMAL) -> None:
        """Orderly close: GoAway(code), then close the connection once flushed.

        Streams still open end with ``SessionLost``.  If the peer does not
        let the socket flush within ``close_timeout`` the connection is aborted.
        """
        if self._closing or self._closed is not None:
            return
        self._closing = True
        if self.transport is None:
            return
        if not (self._quiet and not self._heard_peer):
            self.go_away(code)
        self._stop_keepalive()
        self._parser.stop()
        # a transport may wait for its producer to go before it closes (TLS does)
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(self.config.close_timeout, self._abort)

    def abort(self, reason: Exception | None = None) -> None:
        """Drop the connection at once, without GoAway."""
        if self._closed is not None:
            return
        if reason is not None and self._close_reason is None:
            self._close_reason = Failure(reason)
        self._closing = True
        self._parser.stop()
        self._abort()

    def when_closed(self) -> Deferred:
        """A Deferred that fires once the session ends.

        Its result is the exception that ended it (``ConnectionDone`` for a
        clean close); it never errbacks.
        """
        return self._closed_event.when()

    def when_go_away(self) -> Deferred:
        """Fires with the code of the peer's GoAway once it arrives, or with
        None if the session ends without one."""
        if self.remote_go_away is not None:
            return succeed(self.remote_go_away)
        if self._closed is not None:
            return succeed(None)
        if self._go_away_event is None:
            self._go_away_event = OneShot()
        return self._go_away_event.when()

    def when_idle(self, streams: int = 0) -> Deferred:
        """Fires once at most ``streams`` streams are open, or the session ended.

        For graceful shutdown: ``go_away()``, wait for this, then ``close()``.
        """
        if len(self._streams) <= streams or self._closed is not None:
            return succeed(None)
        event = self._idle_events.get(streams)
        if event is None:
            event = self._idle_events[streams] = OneShot()
        return event.when()

    def _check_idle(self) -> None:
        count = len(self._streams)
        closed = self._closed is not None
        for streams in [n for n in self._idle_events if count <= n or closed]:
            self._idle_events.pop(streams).fire(None)

    def ping(self, timeout: float | None = None) -> Deferred:
        """Send a ping; the Deferred fires with the round-trip time in seconds.

        It fails with PingTimeout after ``timeout`` (default: keepalive_timeout).
        """
        if self._closing or self._closed is not None or self.transport is None:
            return fail(SessionClosed("the session is closed"))
        if len(self._pings) >= self.config.max_pings:
            return fail(TooManyStreams("too many pings outstanding"))
        opaque = self._ping_id
        self._ping_id = (opaque + 1) & 0xFFFFFFFF
        if timeout is None:
            timeout = self.config.keepalive_timeout

        def withdraw(d: Deferred) -> None:
            entry = self._pings.pop(opaque, None)
            if entry is not None:
                cancel(entry[2])

        d: Deferred = Deferred(withdraw)
        timer = self.clock.callLater(timeout, self._ping_timed_out, opaque)
        self._pings[opaque] = (d, self.clock.seconds(), timer)
        self._send_control(encode(TYPE_PING, FLAG_SYN, 0, opaque))
        return d

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        # small frames (ACKs, credit, pings, requests) must not wait for Nagle
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        size_transport(transport, self.config.read_size, self.config.send_size)
        # frames leave in the turn that wrote them, not on the next one
        write_through(transport)
        self.host_address = transport.getHost()
        transport.registerProducer(self, True)
        if not self._quiet:
            self._start_keepalive()

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except ProtocolError as e:
            self._protocol_error(e)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._closed is not None:
            return
        if reason is None:
            reason = Failure(ConnectionDone())
        if self._close_reason is not None:
            reason = self._close_reason
        self._closed = reason
        self._closing = True
        self._parser.stop()
        self._stop_keepalive()
        cancel(self._close_timer)
        self._close_timer = None
        pings, self._pings = self._pings, {}
        for d, _, timer in pings.values():
            cancel(timer)
            d.errback(Failure(SessionClosed("the session ended before the ping reply")))
        cancel(self._release_call)
        self._release_call = None
        self._fail_open_waiters(SessionClosed("the session ended"))
        lost = Failure(SessionLost(f"the session ended: {reason.getErrorMessage()}"))
        for stream in list(self._streams.values()) + self._backlog:
            stream.session_lost(lost)
        self._streams.clear()
        self._backlog.clear()
        self._ready.clear()
        for deadlines in (self._unacked, self._fin_deadlines):
            if deadlines is not None:
                deadlines.clear()
        self._check_idle()
        if self._go_away_event is not None:
            self._go_away_event.fire(None)
        self._closed_event.fire(reason.value)

    # -- IPushProducer (the transport tells us when its buffer is full) ------

    def pauseProducing(self) -> None:
        self._write_paused = True

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._control_backlog = 0
        if self._ready:
            self._drain()

    def stopProducing(self) -> None:
        self._write_paused = True

    # -- FrameReceiver -------------------------------------------------------

    def dataHeaderReceived(self, header: Header) -> Callable[[bytes], None] | None:
        if not self._heard_peer:
            self._heard()
        self.bytes_received += header.length
        stream = self._process_flags(header)
        if stream is None:
            return None
        return stream.data_header(header.length)

    def dataFrameEnded(self, header: Header) -> None:
        if header.flags & FLAG_FIN:
            self._process_fin(header.stream_id)

    def controlFrameReceived(self, header: Header) -> None:
        if not self._heard_peer:
            self._heard()
        ftype = header.type
        if ftype == TYPE_WINDOW_UPDATE:
            self._window_update(header)
        elif ftype == TYPE_PING:
            self._ping_received(header)
        else:
            self._go_away_received(header.length)

    # -- frame handlers ------------------------------------------------------

    def _window_update(self, header: Header) -> None:
        stream = self._process_flags(header)
        if stream is None:
            return
        if header.length:
            stream.window_received(header.length)
        if header.flags & FLAG_FIN:
            self._process_fin(header.stream_id)

    def _process_flags(self, header: Header) -> YamuxStream | None:
        """The flags of a Data or WindowUpdate header (Go's processFlags).

        SYN, ACK and RST take effect here, and a second FIN is rejected here,
        as in Go, before any of the frame's payload (body or credit) is used.
        Returns the stream that payload is for, or None to ignore it.  A
        valid FIN takes effect in ``_process_fin``, once the payload is in: a
        Data frame's FIN follows its body.
        """
        sid, flags = header.stream_id, header.flags
        if sid == 0:
            raise InvalidStreamId(f"{TYPE_NAMES[header.type]} on stream 0")
        if flags & FLAG_SYN:
            stream = self._incoming(sid)
        else:
            stream = self._streams.get(sid)
            if stream is None:
                if self._late_frames_log is None:
                    self._late_frames_log = RateLimitedLog(self.log, clock=self.clock)
                self._late_frames_log.emit(
                    LogLevel.debug,
                    "unknown-stream",
                    "{type} for unknown stream {sid} ignored",
                    type=TYPE_NAMES[header.type],
                    sid=sid,
                )
        if stream is None:
            return None
        if flags & FLAG_ACK:
            self._acked(stream)
        if flags & FLAG_RST:
            stream.reset_received()
            return None
        if flags & FLAG_FIN:
            stream.check_fin()
        return stream

    def _process_fin(self, sid: int) -> None:
        """The FIN of a Data or WindowUpdate frame for ``sid``, after its payload."""
        stream = self._streams.get(sid)
        if stream is not None:
            stream.fin_received()

    def _incoming(self, sid: int) -> YamuxStream | None:
        """The peer opened ``sid``: accept (ACK) it, or refuse it with RST."""
        if sid in self._streams:
            raise DuplicateStream(f"SYN for stream {sid}, which is open")
        refusal = None
        if (sid & 1) == self.is_client:
            refusal = "has our parity"
        elif sid <= self._last_remote_id:
            refusal = "reuses an old id"
        elif self.local_go_away or self._closing:
            refusal = "arrived after GoAway"
        elif len(self._streams) >= self.config.max_streams:
            refusal = "exceeds max_streams"
        elif self._handler is None and len(self._backlog) >= self.config.accept_backlog:
            refusal = "overflows the accept backlog"
        if refusal is not None:
            self.log.info("refusing stream {sid}: the SYN {why}", sid=sid, why=refusal)
            self.send_window_update(sid, FLAG_RST)
            return None
        self._last_remote_id = sid
        delta = self._reserve_window()
        stream = YamuxStream(self, sid, outbound=False, window=INITIAL_WINDOW + delta)
        self._streams[sid] = stream
        self.send_window_update(sid, FLAG_ACK, delta)
        if self._handler is not None:
            self._hand_over(self._handler, stream)
        else:
            self._backlog.append(stream)
        return stream if self._streams.get(sid) is stream else None

    def _reserve_window(self) -> int:
        """The window delta for a new stream: max_stream_window's extra, within receive_budget."""
        delta = self._window_delta
        if delta and not self._reserve(delta):
            return 0
        return delta

    def _reserve(self, extra: int) -> bool:
        """Take ``extra`` bytes of receive window from the budget, if it has them."""
        budget = self.config.receive_budget
        if budget is not None and self._extra_window + extra > budget:
            return False
        self._extra_window += extra
        return True

    def _hand_over(self, handler: StreamHandler, stream: YamuxStream) -> None:
        """Give a new stream to the application; its failure costs that stream only."""
        try:
            handler(stream)
        except Exception:
            self.log.failure("stream handler failed for stream {sid}", sid=stream.id)
            stream.abortConnection()

    def _acked(self, stream: YamuxStream) -> None:
        unacked = self._unacked
        if unacked is None or not unacked.discard(stream):
            self.log.warn("unexpected ACK on stream {sid}", sid=stream.id)
            return
        stream.ack_received()
        if self._open_waiters:
            self._release_open_waiters()

    def _ping_received(self, header: Header) -> None:
        if header.flags & FLAG_SYN:
            self._send_control(encode(TYPE_PING, FLAG_ACK, 0, header.length))
            return
        entry = self._pings.pop(header.length, None)
        if entry is None:
            return
        d, sent, timer = entry
        cancel(timer)
        d.callback(self.clock.seconds() - sent)

    def _go_away_received(self, code: int) -> None:
        self.remote_go_away = code
        if self._go_away_event is not None:
            self._go_away_event.fire(code)
        if self._open_waiters:
            self._fail_open_waiters(RemoteGoAway(code))
        if code == GOAWAY_NORMAL:
            self.log.debug("peer sent GoAway: no new streams")
            return
        self.log.warn("peer sent GoAway with error code {code}, closing", code=code)
        self._close_reason = Failure(RemoteGoAway(code))
        self.close()

    def _protocol_error(self, error: ProtocolError) -> None:
        self.log.warn(
            "yamux protocol error from {peer}: {error}", peer=self.peer_address, error=error
        )
        if self._close_reason is None:
            self._close_reason = Failure(error)
        self.local_go_away = False  # a GoAway(0) already sent does not stop GoAway(1)
        self.close(error.code)

    # -- keepalive -----------------------------------------------------------

    def _heard(self) -> None:
        """The peer's first frame arrived."""
        self._heard_peer = True
        if self._quiet:
            self._start_keepalive()

    def _start_keepalive(self) -> None:
        if self.config.enable_keepalive and self._keepalive_timer is None and not self._closing:
            self._keepalive_timer = self.clock.callLater(
                self.config.keepalive_interval, self._keepalive
            )

    def _stop_keepalive(self) -> None:
        cancel(self._keepalive_timer)
        self._keepalive_timer = None

    def _keepalive(self) -> None:
        self._keepalive_timer = None
        d = self.ping(self.config.keepalive_timeout)
        d.addCallbacks(self._keepalive_ok, self._keepalive_failed)

    def _keepalive_ok(self, rtt: float) -> None:
        self._start_keepalive()

    def _keepalive_failed(self, failure: Failure) -> None:
        if failure.check(PingTimeout):
            self.log.warn("keepalive failed: no ping reply from {peer}", peer=self.peer_address)
            self.abort(KeepAliveTimeout("no keepalive reply from the peer"))
        else:
            # e.g. the ping table is full of user pings: try again next interval
            self._start_keepalive()

    def _ping_timed_out(self, opaque: int) -> None:
        entry = self._pings.pop(opaque, None)
        if entry is not None:
            entry[0].errback(Failure(PingTimeout(f"no reply to ping {opaque}")))

    # -- sending -------------------------------------------------------------

    def _send_control(self, frame: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed is not None:
            return
        transport.write(frame)
        if self._write_paused:
            self._control_backlog += HEADER_SIZE
            if self._control_backlog > self.config.max_control_backlog:
                self.log.warn(
                    "peer {peer} is not reading; dropping the session", peer=self.peer_address
                )
                self.abort(SessionLost("the peer stopped reading"))

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        ready = self._ready
        limit = self._max_frame
        try:
            while ready and not self._write_paused and self._closed is None:
                stream = next(iter(ready))
                del ready[stream]
                if stream.send_frame(limit):
                    ready[stream] = None
        finally:
            self._draining = False

    # -- the seam: what streams call (see the design comment at the top) -----

    def can_send_now(self) -> bool:
        """May a stream write straight out (the socket takes data, no stream queued)?"""
        return not self._write_paused and not self._ready and self.transport is not None

    def write_data(self, stream_id: int, data: bytes) -> bool:
        """Write one Data frame (within the stream's window); True while the socket takes more."""
        transport = self.transport
        if transport is not None and self._closed is None:
            self.bytes_sent += len(data)
            transport.writeSequence((encode(TYPE_DATA, 0, stream_id, len(data)), data))
        return not self._write_paused

    def send_window_update(self, stream_id: int, flags: int, delta: int = 0) -> None:
        """Send a WindowUpdate: credit, or SYN/ACK/FIN/RST (control: never queued)."""
        self._send_control(encode(TYPE_WINDOW_UPDATE, flags, stream_id, delta))

    def schedule_send(self, stream: YamuxStream) -> None:
        """``stream`` has queued data and window: send it when the socket allows."""
        self._ready[stream] = None
        if not self._write_paused:
            self._drain()

    def grow_window(self, stream: YamuxStream, extra: int) -> bool:
        """May ``stream``'s receive window grow by ``extra`` (within receive_budget)?

        The session counts it as the stream's until ``stream_ended``.
        """
        return self._closed is None and self._reserve(extra)

    def expect_fin(self, stream: YamuxStream) -> None:
        """``stream`` is fully closed by us: reset it unless the peer's FIN comes in time."""
        timeout = self.config.stream_close_timeout
        if timeout is None or self._closed is not None:
            return
        waiting = self._fin_deadlines
        if waiting is None:
            waiting = self._fin_deadlines = Deadlines(
                self.clock, timeout, YamuxStream.close_timed_out
            )
        waiting.add(stream)

    def stream_ended(self, stream: YamuxStream) -> None:
        """``stream`` is over: forget it (its id is not reused)."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self._extra_window -= stream.window_size - INITIAL_WINDOW
            unacked = self._unacked
            if unacked is not None and unacked.discard(stream):
                if self._open_waiters and self._release_call is None:
                    self._release_call = self.clock.callLater(0, self._release_later)
            if self._fin_deadlines is not None:
                self._fin_deadlines.discard(stream)
            if self._idle_events:
                self._check_idle()
        self._ready.pop(stream, None)
        if stream in self._backlog:
            self._backlog.remove(stream)

    def _abort(self) -> None:
        cancel(self._close_timer)
        self._close_timer = None
        transport = self.transport
        if transport is not None and self._closed is None:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                transport.loseConnection()
