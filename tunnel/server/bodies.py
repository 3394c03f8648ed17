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
        self._held = []
        self._consumer = None
        self.resumeProducing()

    # -- IPushProducer: the consumer's backpressure pauses the public connection ----

    def pauseProducing(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self.drop()

    # -- the channel's side ---------------------------------------------------------

    def data(self, data: bytes, limit: int | None) -> None:
        if self.phase is BodyPhase.DROPPED:
            return
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
        if self.phase is BodyPhase.FLOWING:
            self.phase = BodyPhase.COMPLETE
            self._consumer.body_end()

    @property
    def complete(self) -> bool:
        return self._complete


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
    """An HTTPChannel mixin for StreamingRequest (TunnelSite's channel)."""

    _tunnel_orphan_body = False

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
