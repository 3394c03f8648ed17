"""A twisted.web Site for the public side, hardened against hostile clients.

twisted.web restarts its idle timer on every byte, so a client trickling a
request head ("slowloris") holds a connection forever.  ``TunnelSite``
gives each request head a deadline (``head_timeout``, counted from the
connection's start or the end of the previous response) and keeps an idle
timeout on top.  Connections taken over (tunnel control, WebSocket) are
not affected: their heads are complete and no response ends on them.  It
also leaves out the per-request access log unless asked.

Its channel also answers what twisted.web drops without a word or with a
bare ``400``: a request line over the line limit gets ``414``, a header
line over it, too many header bytes or too many headers ``431``, and every
request refused for its framing (obsolete line folding, a Transfer-Encoding
other than one ``chunked``, ``Content-Length`` and ``Transfer-Encoding``
together, ...) a complete ``400``.  Each refusal is a whole response with
``Connection: close``; what the client still sends is read and discarded
for ``linger`` seconds before the connection closes, so the refusal is not
lost to a TCP reset.  ``Connection`` is read as a token list
(``keep-alive,close`` closes).  What an outsider can make it log is rate
limited (``tunnel.logs``).

The channel keeps one idle timer and one head timer per connection, moved
rather than replaced for each request, and can hold what is written to it
(``hold_writes``) so that a forwarder's response leaves in one send.

An observer given as ``events`` (a ``tunnel.server.events.ServerEvents``,
e.g. ``tunnel.server.metrics.Metrics``) hears of every request answered in
full (``request_done``, from ``Site.log``, with the seconds since its head
was complete) and of every head too slow or request refused here
(``error``).  Without one, nothing is timed.
"""

from __future__ import annotations

import re

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from ..logs import RateLimitedLog
from ..timers import cancel
from ..writethrough import write_through
from ..yamux.sizing import size_transport
from .bodies import StreamingChannel, streaming_request
from .events import ErrorKind, ServerEvents, report
from .headers import connection_tokens
from .pages import refusal_bytes

#: control characters a field value must not hold (HTAB is allowed)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: what a public connection reads and hands the kernel at once (as the tunnel's
#: own connections: ``yamux.config.LARGE_WINDOWS``, ``client.local``)
PUBLIC_READ_SIZE = 256 * 1024
PUBLIC_SEND_SIZE = 512 * 1024
#: the largest request Content-Length passed on (2**63 - 1, as Go's net/http)
MAX_CONTENT_LENGTH = 2**63 - 1


class HeadDeadlineChannel(HTTPChannel):
    """An HTTPChannel that drops clients too slow to send a request head and
    answers every request it refuses.

    It reads some of HTTPChannel's private state (``__first_line``,
    ``_receivedHeaderSize``, ``_receivedHeaderCount``, ``_version``) and
    replaces ``_respondToBadRequestAndDisconnect``; tests/test_public_framing.py
    fails loudly if a twisted.web release renames them.
    """

    head_timeout: float | None = 30.0
    #: seconds a refused connection is kept open (input discarded) so that
    #: the refusal reaches the client before the connection closes
    linger: float = 1.0
    #: the log for what peers cause; TunnelSite gives each channel its own site's
    public_log: RateLimitedLog = RateLimitedLog(Logger(namespace=__name__))
    _head_timer = None
    _head_due = False
    _linger_timer = None
    _idle_timer = None
    _refused = False
    _host = None
    _peer = None
    _secure: bool | None = None
    #: writes gathered while a forwarder holds them (``hold_writes``), or None
    _held: list[bytes] | None = None
    #: who hears of refusals and slow heads (TunnelSite gives its own), or None
    events: ServerEvents | None = None
    #: what the end of each head is timed on, or None not to time it
    #: (TunnelSite gives its reactor when it has events)
    head_clock = None
    #: when the current request's head was complete (``head_clock`` seconds);
    #: one request is handled at a time, the next head is read after it
    head_done_at: float = 0.0

    def connectionMade(self) -> None:
        super().connectionMade()
        # bulk bodies move in the pieces the tunnel's streams use (not
        # Twisted's 64 KiB reads and 128 KiB sends)
        size_transport(self.transport, PUBLIC_READ_SIZE, PUBLIC_SEND_SIZE)
        # responses leave in the turn that wrote them (and without Nagle)
        write_through(self.transport)
        self._arm()

    def getHost(self):
        """The local address, read once: twisted.web asks for it on every request
        (a ``getsockname`` system call each time)."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self):
        """The public client's address, made once per connection, not per request."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def isSecure(self) -> bool:
        """Whether the connection is TLS, asked of the transport once (an interface
        adaptation each time otherwise: X-Forwarded-Proto asks on every request)."""
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def _arm(self) -> None:
        """The next head is due within ``head_timeout`` from now.

        One timer per connection, moved rather than replaced: a keep-alive
        connection arms the deadline for every request, and a reset is much
        cheaper than a new DelayedCall and a cancelled one each time."""
        if self.head_timeout is None or self.transport is None:
            return
        self._head_due = True
        timer = self._head_timer
        if timer is not None and timer.active():
            timer.reset(self.head_timeout)
        else:
            self._head_timer = self.callLater(self.head_timeout, self._head_deadline)

    def _disarm(self) -> None:
        """No head is due (one is being processed): the timer, if it fires, stops."""
        self._head_due = False

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self._head_due:
            self._too_slow()

    # -- parsing the head -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the connection closes
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not self._HTTPChannel__first_line:  # a header line (or the end of the head)
            if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
                self._refuse(431, "request headers too large")
                return
            if line[:1] in (b" ", b"\t"):  # RFC 9112 5.2: reject or replace
                self._refuse(400, "obsolete line folding in the request headers")
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:
            self._refuse(414, "request-target too long")
        else:
            self._refuse(431, "request header line too long")

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, "too many request headers")
            return False
        name, colon, value = line.partition(b":")
        if colon and _CONTROL.search(value):
            # RFC 9110 5.5: reject or replace before forwarding (Go refuses);
            # twisted.web itself only refuses NUL, CR and LF
            self._refuse(400, "malformed request")
            return False
        if colon and name.lower() == b"content-length":
            # a length no 64-bit origin can hold: one that wraps would read the
            # rest of our stream as requests of its own (Go parses into 63 bits)
            digits = value.strip(b" \t")
            if digits.isdigit() and int(digits) > MAX_CONTENT_LENGTH:
                self._refuse(400, "malformed request")
                return False
        if colon and name.lower() == b"transfer-encoding":
            # only one "chunked" frames a request (RFC 9112 6.1); twisted.web
            # also lets "identity" through, and then uses Content-Length
            if self._version != b"HTTP/1.1":
                self._refuse(400, "Transfer-Encoding in an HTTP/1.0 request")
                return False
            if value.strip(b" \t").lower() != b"chunked":
                self._refuse(400, "unsupported Transfer-Encoding")
                return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._disarm()
        if self.head_clock is not None:
            # before render(), which runs (and may finish the request) within
            self.head_done_at = self.head_clock.seconds()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own refusals: a bare "400" without a length
        self._refuse(400, "malformed request")

    def checkPersistence(self, request, version: bytes) -> bool:
        """Persistent unless HTTP/1.0 or ``close`` is among the Connection tokens."""
        if version != b"HTTP/1.1":
            return False
        if b"close" in connection_tokens(request.requestHeaders.getRawHeaders(b"connection", [])):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def writeHeaders(self, version, code, reason, headers) -> None:
        if self._refused:
            return
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)  # sanitised there
            return
        if not self.persistent and version == b"HTTP/1.1":
            # say so, even when a forwarder replaced the response's headers
            values = headers.getRawHeaders(b"connection", [])
            if b"close" not in connection_tokens(values):
                headers.setRawHeaders(b"Connection", [b"close"])
        # HTTPChannel's serialisation, through this channel's own write path
        # (so that a held response head leaves with its body)
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        extend = head.extend
        for name, values in headers.getAllRawHeaders():
            for value in values:
                extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self.writeSequence(head)

    def write(self, data: bytes) -> None:
        if self._refused:
            return
        held = self._held
        if held is None:
            self.transport.write(data)
        elif data:
            held.append(data)

    def writeSequence(self, iovec) -> None:
        if self._refused:
            return
        held = self._held
        if held is None:
            self.transport.writeSequence(iovec)
        else:
            held.extend(iovec)

    # -- holding writes ---------------------------------------------------------------

    def hold_writes(self) -> None:
        """Gather what is written to this connection until ``release_writes``.

        A forwarder holds while it reads one piece of its tunnel stream, so
        that a small response's head, body and end leave in one send rather
        than three (each a system call, and a packet of its own without
        Nagle).  Everything this channel writes directly releases first,
        so the order on the wire is the order of writing.
        """
        if self._held is None:
            self._held = []

    def release_writes(self) -> None:
        """Send what was held, in one piece (nothing if nothing was held)."""
        held, self._held = self._held, None
        if held and self.transport is not None:
            self.transport.writeSequence(held)

    def loseConnection(self) -> None:
        self.release_writes()  # what was written before the close goes first
        super().loseConnection()

    def _send100Continue(self) -> None:
        self.release_writes()
        super()._send100Continue()

    # -- refusing ---------------------------------------------------------------------

    def _refuse(self, code: int, message: str, *, log: bool = True) -> None:
        """Answer ``code`` with Connection: close, then discard input and close
        (abort instead if a response is under way).  ``log``: say so in the
        public log (False if the caller logged a line of its own)."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self.persistent = False
        self._disarm()
        self.setTimeout(None)
        self.clearLineBuffer()
        report(self.events, ErrorKind.BODY_TIMEOUT if code == 408 else ErrorKind.BAD_REQUEST)
        if log:
            self.public_log.info(
                "refused-request",
                "refused a request from {peer}: {code} {why}",
                peer=self.transport.getPeer(),
                code=code,
                why=message,
            )
        if any(getattr(r, "startedWriting", False) for r in self.requests):
            self._held = None
            self.transport.abortConnection()  # a response is under way: no second one
            return
        self.release_writes()  # earlier responses (pipelined) before the refusal
        self.transport.write(refusal_bytes(code, message))
        self._linger_timer = self.callLater(self.linger, self._linger_over)

    def linger_then_close(self) -> None:
        """Close after ``linger`` seconds of reading and discarding what the client sends.

        Closing a socket with unread input resets the connection, and the reset
        can destroy an answer the client has not read yet (Go's server waits
        too, "rstAvoidanceDelay"): a response given before its request body
        ended closes this way.
        """
        if self._linger_timer is not None or self.transport is None:
            return
        self.release_writes()  # the answer goes before the close
        self._refused = True  # read and dropped from now on
        self.persistent = False
        self._disarm()
        self.setTimeout(None)
        self.clearLineBuffer()
        self._linger_timer = self.callLater(self.linger, self._linger_over)

    def _linger_over(self) -> None:
        self._linger_timer = None
        self.loseConnection()
        if self.abortTimeout is not None and self.transport.connected:
            # a client that does not read would keep the refusal unsent forever
            self._abortingCall = self.callLater(self.abortTimeout, self._abort_refused)

    def _abort_refused(self) -> None:
        self._abortingCall = None  # HTTPChannel.connectionLost would cancel it
        self.transport.abortConnection()

    # -- timers -----------------------------------------------------------------------

    def setTimeout(self, period: float | None) -> float | None:
        """TimeoutMixin's idle timeout, with one timer per connection that is
        moved rather than replaced: twisted.web turns the timeout off for
        each request and on again after it, which would otherwise cost a new
        DelayedCall and a cancelled one per request.  While the timeout is off
        the timer may still fire, and then does nothing."""
        previous, self.timeOut = self.timeOut, period
        if period is not None:
            timer = self._idle_timer
            if timer is not None and timer.active():
                timer.reset(period)
            else:
                self._idle_timer = self.callLater(period, self._idle_over)
        return previous

    def resetTimeout(self) -> None:
        timer = self._idle_timer
        if timer is not None and self.timeOut is not None and timer.active():
            timer.reset(self.timeOut)

    def _idle_over(self) -> None:
        self._idle_timer = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def requestDone(self, request) -> None:
        self._arm()  # the next head (maybe pipelined, parsed just below) is due
        super().requestDone(request)

    def handed_over(self) -> None:
        """The connection left twisted.web (``takeover``): send what was held,
        and stop our timers, since connectionLost will not reach this channel
        any more."""
        self.release_writes()
        self._stop_timers()

    def connectionLost(self, reason) -> None:
        self._stop_timers()
        super().connectionLost(reason)

    def _stop_timers(self) -> None:
        self._disarm()
        cancel(self._head_timer)
        self._head_timer = None
        cancel(self._linger_timer)
        self._linger_timer = None
        cancel(self._idle_timer)
        self._idle_timer = None

    def _too_slow(self) -> None:
        if self.transport is None:
            return
        report(self.events, ErrorKind.HEAD_TIMEOUT)
        self.public_log.info(
            "slow-head",
            "dropping {peer}: no complete request head within {t} s",
            peer=self.transport.getPeer(),
            t=self.head_timeout,
        )
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        # twisted.web's, minus its one log line per idle connection
        self.public_log.info(
            "idle-timeout", "closing idle connection from {peer}", peer=self.transport.getPeer()
        )
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self.public_log.info(
            "idle-timeout",
            "aborting idle connection from {peer}: it did not close",
            peer=self.transport.getPeer(),
        )
        self._abortingCall = None
        self.transport.abortConnection()


class TunnelChannel(StreamingChannel, HeadDeadlineChannel):
    """TunnelSite's channel: head deadline, request bodies that stream, and a
    minimum rate for those bodies."""


class TunnelSite(Site):
    """The Site to serve a TunnelResource (or a tree containing one) with.

    :param head_timeout: seconds a client has to send each request head.
    :param idle_timeout: seconds an idle connection is kept.
    :param access_log: None for no access log, ``"-"`` for the twistd log,
        or a file path.
    :param max_body: the largest request body in bytes (None: no limit, which
        is safe because bodies stream to the origin and are never stored).
    :param body_timeout: seconds of grace, from the end of a request head,
        before its body's average rate is checked (0 or None: no check).
    :param body_min_rate: the least average rate of a request body in bytes a
        second (0 or None: no check); a slower body is answered ``408`` (the
        connection aborted if the response began) and its stream reset.  Time
        during which we did not read (backpressure) is not counted.
    :param events: told of each request answered in full and of what the
        channels refuse (None: nobody is, and nothing is timed).

    Its requests stream their bodies (``bodies.StreamingRequest`` is mixed into
    ``requestFactory``): ``render()`` runs once the head is in, and the
    forwarder sends the body on as it arrives.
    """

    def __init__(
        self,
        resource,
        *,
        head_timeout: float | None = 30.0,
        idle_timeout: float = 60.0,
        access_log: str | None = None,
        max_body: int | None = None,
        body_timeout: float | None = 20.0,
        body_min_rate: float | None = 500,
        events: ServerEvents | None = None,
        **kwargs,
    ) -> None:
        if access_log not in (None, "-"):
            kwargs["logPath"] = access_log
        super().__init__(resource, timeout=idle_timeout, **kwargs)
        self.requestFactory = streaming_request(self.requestFactory)
        self.head_timeout = head_timeout
        self.access_log = access_log
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        #: the observer of requests and refusals (read as each connection starts)
        self.events = events
        #: what peers cause, rate-limited per kind (shared by this site's channels)
        self.public_log = RateLimitedLog(Logger(namespace=__name__), clock=self.reactor)

    def protocol(self) -> HeadDeadlineChannel:
        channel = TunnelChannel()
        channel.head_timeout = self.head_timeout
        channel.public_log = self.public_log
        channel.body_timeout = self.body_timeout
        channel.body_min_rate = self.body_min_rate
        channel.body_clock = self.reactor
        if self.events is not None:
            channel.events = self.events
            channel.head_clock = self.reactor
        return channel

    def log(self, request) -> None:
        """twisted.web calls this once per request answered in full (not for
        one whose client left first, nor for a connection taken over)."""
        if self.access_log is not None:
            super().log(request)
        channel = request.channel
        events = channel.events  # the site's when the connection began
        if events is not None:
            events.request_done(request, self.reactor.seconds() - channel.head_done_at)
