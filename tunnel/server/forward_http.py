"""Plain HTTP requests through a tunnel stream, with twisted.web's client.

twisted.web's HTTP/1.1 client writes the request into the request's own
tunnel stream (an Agent whose one endpoint is that stream) and parses the
origin's response; ``_HeadGuard`` bounds the response head first, since the
client would buffer any number of header lines.  The body is copied to the
public request with backpressure.  The registry's errors become Go's texts
(``tunnel.server.pages``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.task import Cooperator

    from .registry import TunnelServer

from ..heads import HeadScanner, HeadTooLarge
from ..koding.identifiers import redact
from ..koding.wire import TransportProtocol
from .errors import TunnelError
from .headers import forwardable, forwarded_headers
from .pages import error_page, public_text

_NOT_FORWARDED = frozenset({b"expect", b"content-length"})

#: bounds on the origin's response head (twisted.web's own client allows
#: 16 KiB per line but any number of lines)
MAX_RESPONSE_HEAD = 64 * 1024
MAX_HEADER_LINE = 16 * 1024

#: request bodies up to this size are written in one go; larger ones stream
_SMALL_BODY = 64 * 1024


@implementer(IBodyProducer)
class _BytesProducer:
    """A small request body, written at once (no cooperator round-trips)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IAgentEndpointFactory, IStreamClientEndpoint)
class _ForwardEndpoint:
    """Opens the request's tunnel stream for the HTTP client, behind a _HeadGuard.

    It is also the Agent's endpoint factory: every URI maps to this one stream.
    """

    def __init__(self, forward: HTTPForward) -> None:
        self._forward = forward

    def endpointForURI(self, uri):
        return self

    def connect(self, factory):
        forward = self._forward

        def opened(stream):
            protocol = factory.buildProtocol(stream.getPeer())
            if protocol is None:
                stream.abortConnection()
                raise TunnelError("the HTTP client refused the tunnel")
            forward.stream = stream
            stream.attach(_HeadGuard(protocol, forward))
            return protocol

        d = forward.server.open_tunnel(forward.identifier, TransportProtocol.HTTP, forward.port)
        return d.addCallback(opened)


class _HeadGuard(Protocol):
    """Bounds the origin's response head before twisted.web's client parses it.

    The HTTP client would buffer any number of header lines; a head larger
    than MAX_RESPONSE_HEAD (or a line longer than MAX_HEADER_LINE) resets
    the stream, and the public client gets a 502 that says so.  Interim 1xx
    heads count towards the same bound.  A HeadScanner does the reading, so
    the work is linear in the head however the origin splits it.
    """

    def __init__(self, inner, forward: HTTPForward) -> None:
        self.inner = inner
        self.forward = forward
        self.heads = HeadScanner(MAX_RESPONSE_HEAD, max_line=MAX_HEADER_LINE)
        self._done = False

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._done and not self._check(data):
            return
        self.inner.dataReceived(data)

    def _check(self, data: bytes) -> bool:
        end = 0
        try:
            while (found := self.heads.feed(data, end)) is not None:
                head, end = found
                if head[9:10] != b"1" or head[9:12] == b"101":
                    self._done = True  # the final head: the rest is body
                    return True
                # an interim 1xx head: the client skips it; the bound covers them all
        except HeadTooLarge:
            self.forward.head_too_big = True
            self.transport.abortConnection()
            return False
        return True

    def connectionLost(self, reason) -> None:
        self.inner.connectionLost(reason)


class _BodyCopier(Protocol):
    """Copies the origin's response body to the public request, with backpressure."""

    def __init__(self, forward: HTTPForward) -> None:
        self.forward = forward

    def connectionMade(self) -> None:
        self.forward.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.forward.gone:
            self.forward.request.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.forward.body_done(reason)


class HTTPForward:
    """One public request forwarded through one tunnel stream."""

    log = Logger()

    def __init__(
        self, server: TunnelServer, request, identifier: str, port: int, cooperator: Cooperator
    ) -> None:
        self.server = server
        self.cooperator = cooperator
        self.request = request
        self.identifier = identifier
        self.port = port
        self.stream = None
        self.gone = False
        self.pending = None
        self.head_too_big = False

    def start(self) -> None:
        request = self.request
        host = request.getHeader(b"host")
        headers = Headers()
        # the body is complete already (twisted.web read it): no Expect; the
        # HTTP client frames it again, so no Content-Length of our own either
        for name, values in forwardable(request.requestHeaders, _NOT_FORWARDED):
            headers.setRawHeaders(name, values)
        for name, value in forwarded_headers(request):
            headers.setRawHeaders(name, [value])
        body = self._body_producer()
        agent = Agent.usingEndpointFactory(self.server.clock, _ForwardEndpoint(self))
        self.pending = agent.request(request.method, b"http://" + host + request.uri, headers, body)
        self.pending.addCallbacks(self._response, self._failed)
        request.notifyFinish().addErrback(self._public_gone)

    def _body_producer(self):
        request = self.request
        content = request.content
        if content is None:
            return None
        content.seek(0, 2)
        length = content.tell()
        content.seek(0)
        has_body = request.requestHeaders.hasHeader(
            b"content-length"
        ) or request.requestHeaders.hasHeader(b"transfer-encoding")
        if not length and not has_body:
            return None
        if length <= _SMALL_BODY:
            return _BytesProducer(content.read())
        return FileBodyProducer(content, cooperator=self.cooperator)

    def _response(self, response) -> None:
        self.pending = None
        request = self.request
        if self.gone:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders = Headers()
        request.defaultContentType = None  # never invent a Content-Type
        for name, values in forwardable(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        # the HTTP client keeps Content-Length apart; pass it on so the body
        # is not re-chunked (HEAD keeps the origin's header, 204/304 have none)
        if response.length is not UNKNOWN_LENGTH and response.code not in NO_BODY_CODES:
            if request.method != b"HEAD":
                request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        response.deliverBody(_BodyCopier(self))

    def body_done(self, reason: Failure) -> None:
        request = self.request
        if self.gone:
            return
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        # the origin's response was cut short: do not let it look complete
        self.log.info(
            "response from {ident} truncated: {why}",
            ident=redact(self.identifier),
            why=reason.getErrorMessage(),
        )
        request.loseConnection()

    def _failed(self, failure: Failure) -> None:
        self.pending = None
        if self.gone or failure.check(CancelledError):
            return
        if failure.check(TunnelError):
            message = public_text(failure)
        elif self.head_too_big:
            message = (
                f"tunnel error: the origin's response headers are too large (over"
                f" {MAX_RESPONSE_HEAD // 1024} KiB, or a line over {MAX_HEADER_LINE // 1024} KiB)"
            )
            self.log.info("{ident}: {why}", ident=redact(self.identifier), why=message)
        else:
            message = public_text(failure)
            self.log.info(
                "forwarding to {ident} failed: {why}", ident=redact(self.identifier), why=message
            )
        request = self.request
        request.write(error_page(request, 502, message))
        request.finish()

    def _public_gone(self, failure: Failure) -> None:
        self.gone = True
        if self.pending is not None:
            self.pending.cancel()
        if self.stream is not None:
            self.stream.abortConnection()
