"""WebSocket (HTTP Upgrade) requests through a tunnel stream.

The public request head is written into a WebSocket stream as it came
(plus ``X-Forwarded-*``), and the origin's answer is read from the stream:

* ``101 Switching Protocols``: only now is the public connection taken over
  from twisted.web; the 101 head and anything after it go to the public
  client and the two connections are spliced (half-close and abort pass
  through).
* an interim ``1xx`` (``100 Continue``, ``103 Early Hints``): dropped; the
  final response that follows is the answer.
* anything else: the response is returned as an ordinary HTTP response
  through twisted.web (body framed by Content-Length, chunked encoding or
  the end of the stream) and the public connection stays with twisted.web.
  No public byte ever reaches the origin outside a 101, so a premature or
  refused upgrade cannot smuggle a second request.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError
from twisted.web.http_headers import Headers

from ..heads import HeadScanner, HeadTooLarge
from ..koding.identifiers import redact
from ..koding.wire import TransportProtocol
from ..splice import SpliceProtocol
from .headers import HOP_BY_HOP, connection_tokens
from .pages import error_page, public_text
from .takeover import CannotTakeOver, take_over

#: the longest origin response head we accept
MAX_HEAD = 64 * 1024


def is_upgrade(request) -> bool:
    """A WebSocket upgrade: GET with ``Connection: upgrade`` and ``Upgrade: websocket``."""
    if request.method != b"GET":
        return False
    headers = request.requestHeaders
    connection = b",".join(headers.getRawHeaders(b"connection", [])).lower()
    upgrade = b",".join(headers.getRawHeaders(b"upgrade", [])).lower()
    tokens = {t.strip() for t in connection.split(b",")}
    return b"upgrade" in tokens and b"websocket" in upgrade


def request_head(request, extra: list[tuple[bytes, bytes]]) -> bytes:
    """The public request head as received (raw headers), plus ``extra``."""
    lines = [b"%s %s HTTP/1.1" % (request.method, request.uri)]
    skip = {name.lower() for name, _ in extra}
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() in skip:
            continue
        lines.extend(name + b": " + value for value in values)
    lines.extend(name + b": " + value for name, value in extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Head:
    def __init__(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, phrase = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise ValueError(f"malformed status line {lines[0][:80]!r}")
        self.code = int(code)
        self.phrase = phrase
        self.headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError(f"malformed header line {line[:80]!r}")
            self.headers.append((name, value.strip()))

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


class OriginSide(SpliceProtocol):
    """The stream's protocol: sends the request, reads the answer, then splices."""

    log = Logger()

    def __init__(self, forward: UpgradeForward) -> None:
        super().__init__()
        self.forward = forward
        self.heads = HeadScanner(MAX_HEAD)
        self._mode = "head"
        self._decoder = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.forward.head + self.forward.body)

    def dataReceived(self, data: bytes) -> None:
        if self._mode == "splice":
            super().dataReceived(data)
        elif self._mode == "head":
            self._read_head(data)
        elif self._mode == "body":
            self._body(data)

    def _read_head(self, data: bytes) -> None:
        """Reads the origin's answer: interim 1xx heads are skipped, the final one decides.

        An interim response (``100 Continue``, ``103 Early Hints``: RFC 9110
        15.2) is not the answer to the upgrade.  twisted.web cannot send one
        ahead of the final response, so it is dropped; MAX_HEAD bounds all
        the heads together.
        """
        end = 0
        while True:
            try:
                found = self.heads.feed(data, end)
            except HeadTooLarge:
                self._bad("response head too long")
                return
            if found is None:
                return
            raw, end = found
            try:
                head = _Head(raw[:-4])
            except ValueError as e:
                self._bad(str(e))
                return
            if not (100 <= head.code < 200 and head.code != 101):
                break
        rest = data[end:]
        if head.code == 101:
            self._mode = "splice"
            self.forward.switched(self, raw, rest)
        else:
            self._mode = "body"
            self._start_body(head, rest)

    def readConnectionLost(self) -> None:
        if self._mode == "splice":
            super().readConnectionLost()
        else:
            self._ended()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._mode == "splice":
            super().connectionLost(reason)
        else:
            self._ended(reason)

    # -- a non-101 answer, relayed as a normal response ---------------------

    def _start_body(self, head: _Head, rest: bytes) -> None:
        request = self.forward.request
        request.setResponseCode(head.code, head.phrase)
        # the origin's fields only: no Server or Date of twisted.web's beside its own
        request.responseHeaders = Headers()
        request.defaultContentType = None
        skip = HOP_BY_HOP | connection_tokens(head.get(b"connection"))
        for name, value in head.headers:
            if name.lower() not in skip:
                request.responseHeaders.addRawHeader(name, value)
        chunked = any(b"chunked" in v.lower() for v in head.get(b"transfer-encoding"))
        if chunked:
            request.responseHeaders.removeHeader(b"content-length")
            self._decoder = _ChunkedTransferDecoder(self._deliver, self._finished)
        else:
            lengths = head.get(b"content-length")
            self._left = int(lengths[0]) if lengths and lengths[0].isdigit() else None
            if head.code in (204, 304) or (head.code < 200):
                self._left = 0
        if rest:
            self._body(rest)
        elif not chunked and self._left == 0:
            self._finished(b"")

    def _body(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                self._decoder.dataReceived(data)
            except _MalformedChunkedDataError:
                self._bad("malformed chunked body")
            return
        if self._left is None:
            self._deliver(data)
            return
        data = data[: self._left]
        self._left -= len(data)
        self._deliver(data)
        if self._left == 0:
            self._finished(b"")

    def _deliver(self, data: bytes) -> None:
        if data and not self.forward.gone:
            self.forward.request.write(data)

    def _finished(self, rest: bytes) -> None:
        if self._mode != "body":
            return
        self._mode = "done"
        self.forward.finish()
        self.transport.loseConnection()

    def _ended(self, reason: Failure | None = None) -> None:
        mode, self._mode = self._mode, "done"
        if mode == "head":
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.forward.fail(f"tunnel error: no response from the origin ({why})")
        elif mode == "body":
            if self._decoder is None and self._left is None:
                self.forward.finish()  # close-delimited body: complete
            else:
                self.forward.truncated()

    def _bad(self, why: str) -> None:
        mode, self._mode = self._mode, "done"
        self.log.info("bad upgrade response from the origin: {why}", why=why)
        if mode == "head":
            self.forward.fail(f"tunnel error: bad response from the origin: {why}")
        else:
            self.forward.truncated()
        self.transport.abortConnection()


class PublicSide(SpliceProtocol):
    """The public connection's protocol after a 101."""


class UpgradeForward:
    """One public upgrade request forwarded through one WebSocket stream."""

    log = Logger()

    def __init__(self, server, request, identifier: str, port: int, forwarded) -> None:
        self.server = server
        self.request = request
        self.identifier = identifier
        self.port = port
        self.head = request_head(request, forwarded)
        content = request.content
        content.seek(0)
        self.body = content.read()
        self.gone = False
        self.stream = None
        self.done = False

    def start(self) -> None:
        d = self.server.open_tunnel(self.identifier, TransportProtocol.WS, self.port)
        d.addCallbacks(self._opened, self._open_failed)
        self.request.notifyFinish().addErrback(self._public_gone)
        self._pending = d

    def _opened(self, stream) -> None:
        self._pending = None
        if self.gone:
            stream.abortConnection()
            return
        self.stream = stream
        stream.attach(OriginSide(self))

    def _open_failed(self, failure: Failure) -> None:
        self._pending = None
        if not self.gone:
            self.fail(public_text(failure))

    def _public_gone(self, failure: Failure) -> None:
        self.gone = True
        if self._pending is not None:
            self._pending.cancel()
        if self.stream is not None and not self.done:
            self.stream.abortConnection()

    def switched(self, origin: OriginSide, head: bytes, rest: bytes) -> None:
        """The origin said 101: take the public connection over and splice."""
        if self.gone:
            origin.transport.abortConnection()
            return
        self.done = True
        public = PublicSide()
        try:
            take_over(self.request, public, head + rest)
        except CannotTakeOver as e:
            origin.transport.abortConnection()
            self.fail(str(e))
            return
        self.log.debug("websocket for {ident} switched", ident=redact(self.identifier))
        origin.join(public)

    def finish(self) -> None:
        self.done = True
        if not self.gone:
            self.request.finish()

    def truncated(self) -> None:
        self.done = True
        if not self.gone:
            self.request.loseConnection()

    def fail(self, message: str) -> None:
        self.done = True
        if self.gone:
            return
        self.request.write(error_page(self.request, 502, message))
        self.request.finish()
