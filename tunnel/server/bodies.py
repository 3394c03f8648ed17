"""Public request bodies that stream to the origin as they arrive.

twisted.web reads a whole request body (into a temporary file past 100 KB)
before it calls ``render()``.  ``StreamingRequest`` (TunnelSite's request
factory) starts the request as soon as its head is complete
(``gotLength``), and hands each de-chunked piece of the body
(``handleContentChunk``) to whoever attached to its ``body``: the forwarder,
which writes it into the tunnel stream and pauses the public connection while
the stream's window is full.  Nothing is spooled.  ``StreamingChannel`` (a
mixin for TunnelSite's channel) leaves ``Expect: 100-continue`` to the origin
and copes with a response that ends before the request body did (the
connection is then closed, since the rest of the body cannot be skipped
safely, but only after ``linger`` seconds of discarding it: a close with
unread input is a TCP reset, which can destroy the answer unread).

In a foreign Site the request arrives with its body complete in
``request.content``; ``body_of()`` gives the same interface over it.
"""

from __future__ import annotations

import enum
from io import BytesIO
from typing import Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.web.http import Request

from ..timers import cancel
from .headers import connection_tokens
from .pages import error_page

#: Go's text (http.MaxBytesReader) for a body over the limit
TOO_LARGE = "http: request body too large"


class BodyConsumer(Protocol):
    """Where a request body goes (the forwarder)."""

    def body_data(self, data: bytes) -> None: ...
    def body_end(self) -> None: ...
    def body_too_large(self) -> None: ...


class BodyPhase(enum.Enum):
    HELD = "held"  # arriving, nobody attached yet: pieces are held, reading paused
    FLOWING = "flowing"  # each piece goes to the consumer
    COMPLETE = "complete"  # all of it arrived
    DROPPED = "dropped"  # over the limit, or the response ended first: pieces are dropped


class RequestBody:
    """A request body as it arrives.

    :ivar length: its length if known up front, None if chunked.
    :ivar streaming: True if pieces still arrive after ``render()`` began.
    """

    def __init__(
        self, length: int | None, transport: IPushProducer | None = None, *, streaming: bool = True
    ) -> None:
        self.length = length
        self.streaming = streaming
        self.received = 0
        self.phase = BodyPhase.HELD
        self._transport = transport
        self._held: list[bytes] = []
        self._complete = False
        self._consumer: BodyConsumer | None = None
        self._paused = False
        self.too_large = False
        #: the minimum-rate rule over it (``BodyRateWatch``), if its channel keeps one
        self.watch: BodyRateWatch | None = None

    # -- the consumer's side -------------------------------------------------------

    def claim(self, consumer: BodyConsumer) -> None:
        """``consumer`` will take the body: it hears at once if it goes over the limit."""
        if self.phase is BodyPhase.HELD:
            self._consumer = consumer

    def attach(self, consumer: BodyConsumer) -> None:
        """Send the body to ``consumer``: what arrived so far at once, the rest as it comes."""
        if self.phase is BodyPhase.DROPPED:
            if self.too_large:
                consumer.body_too_large()  # it went over before anyone attached
            return
        self._consumer = consumer
        held, self._held = self._held, []
        self.phase = BodyPhase.FLOWING
        for data in held:
            consumer.body_data(data)
        if self._complete:
            self.phase = BodyPhase.COMPLETE
            consumer.body_end()
        else:
            self.resumeProducing()

    def drop(self) -> None:
        """Nobody wants the rest (the response is over): drop it as it arrives."""
        if self.phase is not BodyPhase.COMPLETE:
            self.phase = BodyPhase.DROPPED
        self._stop_watch()
        self._held = []
        self._consumer = None
        self.resumeProducing()

    # -- IPushProducer: the consumer's backpressure pauses the public connection ----

    def pauseProducing(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pauseProducing()
            if self.watch is not None:
                self.watch.pause()  # our backpressure: not the client's time

    def resumeProducing(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resumeProducing()
            if self.watch is not None:
                self.watch.resume()

    def stopProducing(self) -> None:
        self.drop()

    # -- the channel's side ---------------------------------------------------------

    def data(self, data: bytes, limit: int | None) -> None:
        if self.phase is BodyPhase.DROPPED:
            return
        if self.watch is not None:
            self.watch.begin()  # the client is not waiting for a 100 any more
        self.received += len(data)
        if limit is not None and self.received > limit:
            self.too_large = True
            consumer = self._consumer
            self.drop()
            if consumer is not None:
                consumer.body_too_large()
            return
        if self.phase is BodyPhase.FLOWING:
            self._consumer.body_data(data)
        else:
            self._held.append(data)
            self.pauseProducing()  # until the forwarder has a stream to write into

    def end(self) -> None:
        self._complete = True
        self._stop_watch()
        if self.phase is BodyPhase.FLOWING:
            self.phase = BodyPhase.COMPLETE
            self._consumer.body_end()

    def too_slow(self) -> None:
        """Too slow: its consumer resets the stream, and the rest is dropped."""
        consumer = self._consumer
        self.drop()
        if consumer is not None and hasattr(consumer, "body_too_slow"):
            consumer.body_too_slow()

    def _stop_watch(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.stop()

    @property
    def complete(self) -> bool:
        return self._complete


class BodyRateWatch:
    """Apache mod_reqtimeout's body rule (``body=20,MinRate=500``) for one body.

    The window starts at the end of the request head.  After a grace of
    ``grace`` seconds the body must have arrived with an average rate of at
    least ``min_rate`` bytes a second: the deadline is ``grace`` seconds, or
    ``received / min_rate`` seconds if later, after the start.  Time during
    which we stopped reading (our backpressure: the origin not reading, the
    stream window full, no stream yet) is not counted: the start moves on by
    each pause.  One timer at most, rescheduled only when it fires; when a
    deadline passes with no byte to extend it, ``too_slow()`` is called once.

    With ``waiting`` (the request said ``Expect: 100-continue``: its client
    may wait for the origin's ``100``) the window starts at the first byte of
    the body instead; until then the idle timeout bounds the connection.
    """

    def __init__(
        self,
        body: RequestBody,
        clock,
        grace: float,
        min_rate: float,
        too_slow,
        *,
        waiting: bool = False,
    ) -> None:
        self.body = body
        self.clock = clock
        self.grace = grace
        self.min_rate = min_rate
        self._too_slow = too_slow
        self._start = clock.seconds()
        self._paused_at: float | None = None
        self._timer = None
        self.stopped = False
        self._waiting = waiting
        if waiting:
            self._paused_at = self._start  # as if paused from the start
        else:
            self._schedule()

    def begin(self) -> None:
        """A byte of the body arrived: a window held for ``Expect: 100-continue`` starts."""
        if self._waiting:
            self._waiting = False
            self.resume()

    def deadline(self) -> float:
        """When the average falls below ``min_rate`` unless more of the body arrives."""
        return self._start + max(self.grace, self.body.received / self.min_rate)

    def _schedule(self) -> None:
        delay = max(0.0, self.deadline() - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.deadline() - self.clock.seconds() > 1e-9:
            self._schedule()  # bytes arrived since: the deadline moved
            return
        self.stopped = True
        self._too_slow()

    def pause(self) -> None:
        if self.stopped or self._paused_at is not None:
            return
        self._paused_at = self.clock.seconds()
        self._cancel()

    def resume(self) -> None:
        if self.stopped or self._paused_at is None:
            return
        self._start += self.clock.seconds() - self._paused_at
        self._paused_at = None
        self._schedule()

    def stop(self) -> None:
        self.stopped = True
        self._cancel()

    def _cancel(self) -> None:
        cancel(self._timer)
        self._timer = None


def body_of(request) -> RequestBody:
    """The body of ``request``: its streaming one, or one over a buffered ``content``."""
    body = getattr(request, "tunnel_body", None)
    if body is not None:
        return body
    headers = request.requestHeaders
    content = request.content
    data = b""
    if content is not None:
        content.seek(0)
        data = content.read()
    framed = headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")
    body = RequestBody(len(data) if (data or framed) else -1, streaming=False)
    if data:
        body.data(data, None)
    body.end()
    return body


class StreamingRequest(Request):
    """A Request whose body streams: ``render()`` runs once the head is in.

    Mixed before the Site's own request class (``streaming_request``).  A
    request with a body over ``channel.site.max_body`` (Content-Length known)
    is answered 413 at once; a chunked one over it is cut off by the forwarder.
    """

    tunnel_body: RequestBody | None = None

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)  # no body: twisted.web's own way
            return
        channel = self.channel
        self.content = BytesIO()  # stays empty: the body goes to the origin
        # what pauses reading the public connection, found as HTTPChannel finds it
        self.tunnel_body = RequestBody(length, IPushProducer(channel.transport, None))
        watch_body = getattr(channel, "watch_body", None)
        if watch_body is not None:
            watch_body(self)  # the minimum rate, from the end of the head
        # what the channel does once the body is in, now: render() starts
        super().requestReceived(channel._command, channel._path, channel._version)

    def _max_body(self) -> int | None:
        return getattr(getattr(getattr(self, "channel", None), "site", None), "max_body", None)

    def process(self) -> None:
        body = self.tunnel_body
        limit = self._max_body()
        if body is not None and None not in (limit, body.length) and body.length > limit:
            # known up front: refused before anything is forwarded
            body.drop()
            self.write(error_page(self, 413, TOO_LARGE))
            self.finish()
            return
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        body = self.tunnel_body
        if body is None:
            super().handleContentChunk(data)
        else:
            body.data(data, self._max_body())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.tunnel_body is None:
            super().requestReceived(command, path, version)
        else:
            self.tunnel_body.end()  # render() began at the head already

    def write(self, data: bytes) -> None:
        body = self.tunnel_body
        if not self.startedWriting and body is not None and not body.complete:
            # answered before the body ended: the connection closes after this
            # response (the rest of the body cannot be skipped safely); say so
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        body = self.tunnel_body
        if body is not None and not body.complete and self.channel is not None:
            self.channel.persistent = False
            self.channel._tunnel_orphan_body = True
            if not self.startedWriting:
                self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            body.drop()
        super().finish()


_classes: dict[type, type] = {}


def streaming_request(factory: type) -> type:
    """``factory`` (a Request class) with streaming bodies mixed in."""
    if issubclass(factory, StreamingRequest):
        return factory
    if factory not in _classes:
        _classes[factory] = type(f"Streaming{factory.__name__}", (StreamingRequest, factory), {})
    return _classes[factory]


class StreamingChannel:
    """An HTTPChannel mixin for StreamingRequest (TunnelSite's channel).

    It keeps the minimum-rate rule over each request body (``BodyRateWatch``,
    off if ``body_timeout`` or ``body_min_rate`` is 0 or None): a body too
    slow is refused with a ``408`` while no response byte was sent, the
    connection aborted after; either way the stream is reset.  It uses the
    head-deadline channel's ``_refuse`` and ``public_log``.
    """

    _tunnel_orphan_body = False
    #: seconds of grace before the body's average rate is checked
    body_timeout: float | None = 20.0
    #: the least average rate of a request body, bytes a second
    body_min_rate: float | None = 500
    #: what the rule's timer runs on (TunnelSite gives its reactor)
    body_clock = None
    _body_watch: BodyRateWatch | None = None

    def watch_body(self, request) -> None:
        """Start the minimum-rate rule over ``request``'s body (its head just ended)."""
        body = request.tunnel_body
        self._stop_body_watch()
        if not (self.body_timeout and self.body_min_rate) or body is None or body.complete:
            return
        clock = self.body_clock
        if clock is None:
            from twisted.internet import reactor as clock
        expect = request.requestHeaders.getRawHeaders(b"expect", [])
        body.watch = self._body_watch = BodyRateWatch(
            body,
            clock,
            self.body_timeout,
            self.body_min_rate,
            lambda: self._body_too_slow(request),
            # (the request's clientproto is only set once render() begins)
            waiting=self._version == b"HTTP/1.1" and b"100-continue" in connection_tokens(expect),
        )

    def _stop_body_watch(self) -> None:
        watch, self._body_watch = self._body_watch, None
        if watch is not None:
            watch.stop()

    def _body_too_slow(self, request) -> None:
        self._body_watch = None
        body = request.tunnel_body
        if self.transport is None or body is None:
            return
        self.public_log.info(
            "slow-body",
            "dropping {peer}: request body below {rate} bytes/s after {t} s",
            peer=self.transport.getPeer(),
            rate=self.body_min_rate,
            t=self.body_timeout,
        )
        body.too_slow()  # the forwarder resets its stream: the origin never gets all of it
        # a 408 while nothing of a response was sent, an abort after
        self._refuse(408, "request body too slow", log=False)

    def connectionLost(self, reason) -> None:
        self._stop_body_watch()
        super().connectionLost(reason)

    def _send100Continue(self) -> None:
        # the origin decides (its 100 is relayed); a request already answered needs none
        requests = self.requests
        if requests and getattr(requests[-1], "tunnel_body", None) is None:
            super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:
        requests = self.requests
        if requests and getattr(requests[-1], "startedWriting", False):
            # a malformed request body after our response began: a 400 now would
            # land inside that response; cut the connection instead
            self.transport.abortConnection()
            return
        super()._respondToBadRequestAndDisconnect()

    def loseConnection(self) -> None:
        if self._tunnel_orphan_body:
            # the answer went out before the request body ended: closing now,
            # with the body's rest unread, would reset the connection and can
            # destroy the answer before the client reads it
            self._tunnel_orphan_body = False
            self.linger_then_close()
            return
        super().loseConnection()

    def _finishRequestBody(self, data: bytes) -> None:
        if self._tunnel_orphan_body:
            # its request was answered and removed before its body ended: the
            # connection is closing; read nothing more
            self._tunnel_orphan_body = False
            self._handlingRequest = True
            self.setRawMode()
            self._dataBuffer = []
            return
        super()._finishRequestBody(data)
