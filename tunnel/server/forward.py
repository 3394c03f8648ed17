"""One public request (plain HTTP or a WebSocket upgrade) through one tunnel stream.

``Forward`` writes the request into the stream itself (``http1.request_head``:
origin-form, our own framing, no hop-by-hop header, X-Forwarded-* from
``headers.forwarded_headers``), streams the request body as it arrives
(``bodies``), and reads the origin's answer with ``http1.ResponseReader``
(httptools), whichever the request:

* an interim ``100`` is relayed if the public client asked for it (``Expect:
  100-continue`` goes to the origin, which decides), any other ``1xx`` is
  dropped; the final response follows;
* ``101`` on a request that asked for an upgrade hands the public connection
  over (``takeover``) and splices it to the stream; on any other request it
  is a 502;
* any other final response is relayed through twisted.web with backpressure
  (the stream is the request's producer).  What one piece of the stream
  makes of it (head, body, the end of a chunked body) leaves in one send
  where the channel can hold writes (``TunnelSite``'s can); a head whose body
  has not begun leaves when its piece is read, not with the first body byte.

The stream comes from the client's pool of kept streams when one waits
(``pool``: keep-alive over the tunnel), else from a control message; after a
response whose end is exact and that lets the connection outlive it, it goes
back to the pool instead of being closed.  A kept stream that dies before
any byte of the answer (the local server closed it while it waited) is
replaced by a fresh one for an idempotent request without a body.

An origin that breaks HTTP framing gets the public client a 502 while nothing
was sent, a closed connection after; the stream is reset.  A public client
that leaves resets the stream.  The registry's errors are Go's texts
(``pages``).  Failures are reported to the server's ``events`` by kind.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from ..koding.identifiers import TunnelKey
from ..koding.wire import TransportProtocol
from ..logs import RateLimitedLog
from ..splice import SpliceProtocol
from .bodies import TOO_LARGE, body_of
from .events import ErrorKind, report, tunnel_error_kind
from .headers import connection_tokens, forwarded_headers
from .http1 import (
    LAST_CHUNK,
    Framing,
    OriginResponseError,
    ResponseHead,
    ResponseReader,
    chunk,
    request_head,
)
from .pages import error_page, public_text
from .pool import OriginLeg
from .takeover import CannotTakeOver, take_over

if TYPE_CHECKING:
    from .registry import Tunnel, TunnelServer

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def is_upgrade(request, hop: set[bytes]) -> bool:
    """A WebSocket upgrade: GET with ``Connection: upgrade`` and ``Upgrade: websocket``.

    :param hop: the request's Connection tokens (``connection_tokens``).
    """
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    upgrade = headers.getRawHeaders(b"upgrade")
    if not upgrade:
        return False
    return b"upgrade" in hop and b"websocket" in b",".join(upgrade).lower()


#: methods a request may be sent again for (RFC 9110 9.2.2), when it has no body
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


class Phase(enum.Enum):
    OPENING = "opening"  # waiting for the client's stream
    HEAD = "head"  # the request is on its way; the origin's heads are read
    BODY = "body"  # the final head went to twisted.web; the body is relayed
    SPLICED = "spliced"  # 101: the two connections are joined
    DONE = "done"  # finished, failed, or the public client left


class _PublicSide(SpliceProtocol):
    """The public connection's protocol after a 101."""


class Forward:
    """One public request forwarded through one tunnel stream."""

    log = Logger()

    def __init__(
        self,
        server: TunnelServer,
        request,
        key: TunnelKey,
        port: int,
        tunnel: Tunnel,
        *,
        public_log: RateLimitedLog | None = None,
    ) -> None:
        """:param key: the tunnel (``route.key``) that serves the request.
        :param tunnel: how to reach its client (``server.route(key)``).
        :param public_log: where what a peer causes is logged, rate limited
        (the resource's, shared by its requests); one of the forwarder's own if None."""
        self.server = server
        self.public_log = (
            public_log if public_log is not None else RateLimitedLog(self.log, clock=server.clock)
        )
        self.request = request
        self.key = key
        self.port = port
        self.tunnel = tunnel
        connection = request.requestHeaders.getRawHeaders(b"connection")
        #: the public request's Connection tokens: they name its hop-by-hop fields
        self.hop = connection_tokens(connection) if connection else set()
        self.upgrade = is_upgrade(request, self.hop)
        self.upload = body_of(request)
        self.reader = ResponseReader(self, head_request=request.method == b"HEAD")
        self.phase = Phase.OPENING
        self.leg: OriginLeg | None = None
        self.stream = None
        self._pending = None
        self._chunked = self.upload.length is None
        self._body_written = self.upload.length == -1  # our request's body is complete
        self._body_producing = False
        self._expect_continue = False
        self._answered = False  # a byte of the response arrived on this stream
        self._persistent = False  # the final response lets the stream outlive it
        self._relaying = False  # a body follows: the stream is to produce for the request
        self._keep = False  # complete, and the stream may carry the next request

    def start(self) -> None:
        self.request.notifyFinish().addErrback(self._public_gone)
        self.upload.claim(self)
        if not self.upgrade:
            leg = self.tunnel.reuse(self.port)
            if leg is not None:
                self._send(leg)
                return
        self._open()

    def _open(self) -> None:
        kind = TransportProtocol.WS if self.upgrade else TransportProtocol.HTTP
        d = self._pending = self.tunnel.open_tunnel(kind, self.port, self.server.tunnel_timeout)
        d.addCallbacks(self._opened, self._open_failed)

    # -- the request ----------------------------------------------------------------

    def _opened(self, stream) -> None:
        self._pending = None
        if self.phase is not Phase.OPENING:
            stream.abortConnection()
            return
        leg = OriginLeg()
        leg.user = self
        self.leg = leg
        self.phase = Phase.HEAD
        stream.attach(leg)
        if self.phase is not Phase.HEAD:
            return  # the stream ended at once
        self._send(leg)

    def _send(self, leg: OriginLeg) -> None:
        """Write the request into ``leg``'s stream (fresh or kept)."""
        leg.user = self
        self.leg = leg
        self.stream = stream = leg.transport
        self.phase = Phase.HEAD
        self._answered = False
        request = self.request
        headers = request.requestHeaders
        body = self.upload
        self._expect_continue = (
            body.streaming
            and not body.complete
            and request.clientproto == b"HTTP/1.1"
            and b"100-continue" in connection_tokens(headers.getRawHeaders(b"expect", []))
        )
        upgrade = b", ".join(headers.getRawHeaders(b"upgrade", [])) if self.upgrade else None
        stream.write(
            request_head(
                request.method,
                request.uri,
                request.getHeader(b"host") or b"",
                headers.getAllRawHeaders(),
                forwarded_headers(request, self.hop),
                length=body.length,
                upgrade=upgrade,
                expect_continue=self._expect_continue,
                keep_alive=self.server.max_idle_streams > 0,
                hop=self.hop,
            )
        )
        if not self._body_written:
            if not body.complete:
                self._body_producing = True
                stream.registerProducer(body, True)
            body.attach(self)

    # -- what the stream says (LegUser) ---------------------------------------------

    def origin_data(self, data: bytes) -> None:
        if self.phase not in (Phase.HEAD, Phase.BODY):
            return
        self._answered = True
        # what this piece makes of the response (head, body, end) leaves in one
        # send, where the channel can hold writes (TunnelSite's can)
        channel = self.request.channel
        hold = getattr(channel, "hold_writes", None)
        if hold is None:
            self._read(data)
            return
        hold()
        try:
            self._read(data)
        finally:
            channel.release_writes()

    def _read(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
        except OriginResponseError as e:
            self.origin_failed(str(e))
            return
        if self._keep:
            # only now: bytes after the response in this same piece must be seen
            # first; and before the public request finishes, so that a request
            # pipelined behind it finds the stream kept
            self._keep = False
            self._settle(keep=not self.reader.overrun)
            self.request.finish()
        elif self.phase is Phase.BODY:
            request = self.request
            if not request.startedWriting:
                # a head whose body has not begun: it leaves now, not with the
                # first body byte (an event stream's client waits for it)
                request.write(b"")
            if self._relaying:
                self._relaying = False
                request.registerProducer(self.stream, True)

    def origin_eof(self) -> None:
        if self.phase not in (Phase.HEAD, Phase.BODY):
            return
        if self._may_retry():
            self._retry("the kept stream was closed")
            return
        try:
            self.reader.eof()
        except OriginResponseError as e:
            self.origin_failed(str(e))

    def origin_lost(self, reason: Failure) -> None:
        if self.phase not in (Phase.HEAD, Phase.BODY):
            return
        if self._may_retry():
            self._retry("the kept stream was reset")
            return
        self.origin_failed(f"the stream was closed ({reason.getErrorMessage()})")

    def _may_retry(self) -> bool:
        """A kept stream died under a request before any answer: was it idle
        too long at the local server?  Send it again on a fresh stream if that
        is safe: idempotent, no body, and not sent again already."""
        return (
            self.leg is not None
            and self.leg.reused
            and not self._answered
            and self.phase is Phase.HEAD
            and self.upload.length == -1
            and self.request.method in IDEMPOTENT
        )

    def _retry(self, why: str) -> None:
        leg, self.leg = self.leg, None
        leg.user = None
        self.stream = None
        if not leg.lost:
            leg.transport.abortConnection()
        self.log.debug(
            "{why} before answering a request to {ident}; sending it on a fresh stream",
            why=why,
            ident=self.key,
        )
        self.reader = ResponseReader(self, head_request=self.request.method == b"HEAD")
        self.phase = Phase.OPENING
        self._open()

    def body_data(self, data: bytes) -> None:
        if self.phase in (Phase.HEAD, Phase.BODY) and data:
            self.stream.write(chunk(data) if self._chunked else data)

    def body_end(self) -> None:
        if self.phase not in (Phase.HEAD, Phase.BODY):
            return
        self._body_written = True
        self._stop_body_producer()
        if self._chunked:
            self.stream.write(LAST_CHUNK)

    def body_too_large(self) -> None:
        """A chunked body went over the limit: reset the stream, close the public connection."""
        phase, self.phase = self.phase, Phase.DONE
        if phase in (Phase.DONE, Phase.SPLICED):
            return
        report(self.server.events, ErrorKind.BODY_TOO_LARGE)
        self.public_log.info(
            "body-too-large",
            "request body to {ident} over the limit",
            ident=self.key,
        )
        if self._pending is not None:
            self._pending.cancel()  # no stream yet: withdraw the wait for it
        self._end_stream(abort=True)
        request = self.request
        if not request.startedWriting:
            request.write(error_page(request, 413, TOO_LARGE))
            request.finish()  # the body is not complete: the connection closes
        else:
            self._cut_public()

    def body_too_slow(self) -> None:
        """The public body arrived below the minimum rate: reset the stream.

        The channel answers the public client (``408``, or an abort if the
        response began) and logs it; nothing more goes to either side from here.
        """
        phase, self.phase = self.phase, Phase.DONE
        if phase in (Phase.DONE, Phase.SPLICED):
            return
        self.reader.stop()
        if self._pending is not None:
            self._pending.cancel()  # no stream yet: withdraw the wait for it
        if self.request.producer is not None:
            self.request.unregisterProducer()
        self._end_stream(abort=True)

    def _stop_body_producer(self) -> None:
        if self._body_producing:
            self._body_producing = False
            self.stream.unregisterProducer()

    # -- the response (ResponseSink) --------------------------------------------------

    def interim(self, head: ResponseHead) -> None:
        if head.code == 100 and self._expect_continue:
            self._expect_continue = False  # one 100 per request
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None and not self.request.startedWriting:
                transport.write(_CONTINUE)

    def upgraded(self, head: ResponseHead, rest: bytes) -> None:
        if not self.upgrade:
            raise OriginResponseError("the origin switched protocols on a request that did not ask")
        if not self._body_written:
            # the rest of the request body would reach it through the splice, unframed
            raise OriginResponseError("the origin switched protocols before the request body ended")
        request = self.request
        public = _PublicSide()
        try:
            take_over(request, public, head.raw + rest)
        except CannotTakeOver as e:
            raise OriginResponseError(str(e)) from None
        self.phase = Phase.SPLICED
        self._stop_body_producer()
        self.public_log.emit(
            LogLevel.debug,
            "websocket-switched",
            "websocket for {ident} switched",
            ident=self.key,
        )
        self.leg.splice(public)

    def final(self, head: ResponseHead) -> None:
        self.phase = Phase.BODY
        self._persistent = head.persistent
        request = self.request
        request.setResponseCode(head.code, head.phrase)
        # the origin's fields only: no Server or Date of twisted.web's beside its own
        request.responseHeaders = Headers()
        request.defaultContentType = None
        headers = request.responseHeaders
        length = None
        for name, value in head.end_to_end():
            if name.lower() == b"content-length":
                length = value  # llhttp let one through: kept, so the body is not re-chunked
            else:
                headers.addRawHeader(name, value)
        if length is not None and head.code != 204:  # a 204 must not have one (RFC 9110 8.6)
            headers.setRawHeaders(b"content-length", [length])  # last, as it always was
        # the stream becomes the public request's producer once this piece of
        # the stream is read, and only if the body goes on beyond it
        self._relaying = head.framing is not Framing.NONE

    def body(self, data: bytes) -> None:
        self.request.write(data)

    def complete(self) -> None:
        self.phase = Phase.DONE
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if self._persistent and self._body_written:
            self._keep = True  # origin_data settles it once the reader returns
            return
        request.finish()
        self._end_stream(abort=not self._body_written)

    def _settle(self, *, keep: bool) -> None:
        """The exchange is over: leave the stream for the next request, or close it."""
        leg = self.leg
        if keep and self.tunnel.keep(self.port, leg):
            self.upload.drop()
            self.leg = self.stream = None
            return
        self._end_stream(abort=not keep)  # out of step: RST; not kept: FIN

    # -- endings --------------------------------------------------------------------

    def origin_failed(self, why: str) -> None:
        """The origin broke HTTP framing, or its stream ended early."""
        phase, self.phase = self.phase, Phase.DONE
        if phase not in (Phase.HEAD, Phase.BODY):
            return
        report(self.server.events, ErrorKind.ORIGIN_ERROR)
        self.reader.stop()
        if self.request.producer is not None:
            self.request.unregisterProducer()
        self._end_stream(abort=True)
        self.public_log.info(
            "bad-response",
            "bad response from {ident}: {why}",
            ident=self.key,
            why=why[:200],
        )
        if self.request.startedWriting:
            self._cut_public()
        else:
            self._error(f"tunnel error: {why}")

    def _open_failed(self, failure: Failure) -> None:
        self._pending = None
        if self.phase is Phase.OPENING:
            self.phase = Phase.DONE
            report(self.server.events, tunnel_error_kind(failure.value))
            self.upload.drop()
            self._error(public_text(failure))

    def _error(self, message: str) -> None:
        request = self.request
        request.write(error_page(request, 502, message))
        request.finish()

    def _cut_public(self) -> None:
        """Close the public connection: a response cut short must not look complete."""
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        request.loseConnection()

    def _end_stream(self, *, abort: bool) -> None:
        stream = self.stream
        if stream is None:
            return
        self._stop_body_producer()
        self.upload.drop()
        if abort:
            stream.abortConnection()
        else:
            stream.loseConnection()

    def _public_gone(self, failure: Failure) -> None:
        phase, self.phase = self.phase, Phase.DONE
        if phase in (Phase.DONE, Phase.SPLICED):
            return
        report(self.server.events, ErrorKind.CLIENT_GONE)
        self.reader.stop()
        if self._pending is not None:
            self._pending.cancel()
        self._end_stream(abort=True)
