"""HTTP/1.1 on a tunnel stream: the request we write and the response we read.

The request is written by our code from the parsed public request, so its
framing is ours alone: an origin-form target, no hop-by-hop header, our own
Content-Length or chunked coding (never a framing header we did not make).

The response is read by ``ResponseReader``: ``heads.HeadScanner`` bounds and
finds each head in linear time, and httptools (llhttp, strict by default)
checks it and frames the body.  llhttp cannot be told that a response answers
a HEAD request, so it is given only the head of such a response (design.md
section 7); every head gets a fresh parser, so an interim ``1xx`` never
leaves state behind.  Any framing error is an ``OriginResponseError``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Protocol

import httptools

from ..heads import HeadScanner, HeadTooLarge
from .headers import HOP_BY_HOP, connection_tokens

#: bounds on the origin's response heads (interim ones included)
MAX_RESPONSE_HEAD = 64 * 1024
MAX_HEADER_LINE = 16 * 1024

#: request headers we never copy: hop-by-hop, our framing, and Expect (ours to decide)
_NOT_COPIED = HOP_BY_HOP | {b"content-length", b"expect", b"host"}


#: what RFC 9112 4 leaves out of a reason phrase (llhttp lets these through)
_BAD_PHRASE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class OriginResponseError(Exception):
    """The origin's response breaks HTTP/1.1 framing (or our bounds)."""


# -- the request -------------------------------------------------------------------------


def origin_form(target: bytes) -> bytes:
    """The origin-form of a request-target (RFC 9112 3.2): absolute-form loses its authority."""
    if target[:1] == b"/" or target == b"*":
        return target
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        path = rest[cut:]
        return path if path[:1] == b"/" else b"/" + path
    return b"/" + target


def request_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: Iterable[tuple[bytes, list[bytes]]],
    extra: Iterable[tuple[bytes, bytes]],
    *,
    length: int | None,
    upgrade: bytes | None = None,
    expect_continue: bool = False,
    keep_alive: bool = False,
    hop: set[bytes],
) -> bytes:
    """An HTTP/1.1 request head with our framing.

    :param headers: the public request's (name, values), copied minus hop-by-hop
        ones, those its Connection names, framing and those ``extra`` replaces.
    :param extra: header fields we add (X-Forwarded-*); a public field of the
        same name, or the same name with underscores for dashes, is dropped.
    :param length: the body's length, None for chunked, -1 for no body at all.
    :param upgrade: the Upgrade value of an upgrade request (then ``Connection:
        Upgrade``).
    :param keep_alive: the stream may carry another request after this one
        (HTTP/1.1's default: no Connection field); else ``Connection: close``.
    :param hop: the public request's Connection tokens (``headers.connection_tokens``).
    """
    extra = list(extra)
    headers = list(headers)
    ours = {name.lower() for name, _ in extra}
    skip = _NOT_COPIED | ours | hop
    lines = [b"%s %s HTTP/1.1" % (method, origin_form(target)), b"Host: " + host]
    add = lines.append
    for name, values in headers:
        lower = name.lower()
        # CGI, WSGI, PHP and Rack read "X_Forwarded_Host" as "X-Forwarded-Host"
        if lower in skip or (b"_" in lower and lower.replace(b"_", b"-") in ours):
            continue
        for value in values:
            add(name + b": " + value)
    for name, value in extra:
        add(name + b": " + value)
    if upgrade is not None:
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + upgrade)
    elif not keep_alive:
        lines.append(b"Connection: close")
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    elif length >= 0:
        lines.append(b"Content-Length: %d" % length)
    if expect_continue:
        lines.append(b"Expect: 100-continue")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the last: that is ``LAST_CHUNK``)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# -- the response ------------------------------------------------------------------------


class Framing(enum.Enum):
    """How the body of a final response ends (RFC 9112 6.3)."""

    NONE = "none"  # HEAD, 204, 304: the head is the whole response
    LENGTH = "length"
    CHUNKED = "chunked"
    EOF = "eof"  # the end of the stream


#: the response fields the reader itself looks at, gathered as they are parsed
_NOTED = frozenset((b"connection", b"transfer-encoding", b"content-length"))


class ResponseHead:
    """A status line and header fields that llhttp accepted."""

    __slots__ = ("code", "phrase", "headers", "raw", "framing", "persistent", "_lower", "_noted")

    def __init__(
        self,
        code: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        raw: bytes,
        lower: list[bytes],
        noted: dict[bytes, list[bytes]],
    ):
        """:param lower: each field's name in lower case, in order.
        :param noted: the values of the ``_NOTED`` fields by lower-case name."""
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.raw = raw
        self.framing = Framing.EOF
        #: the connection may carry another request after this response
        #: (HTTP/1.1, no ``Connection: close``, a body that does not end with it)
        self.persistent = False
        self._lower = lower
        self._noted = noted

    def get(self, name: bytes) -> list[bytes]:
        """The values of field ``name`` (lower case), in order."""
        if name in _NOTED:
            return self._noted.get(name, [])
        return [v for (_, v), low in zip(self.headers, self._lower, strict=True) if low == name]

    def end_to_end(self) -> list[tuple[bytes, bytes]]:
        """The fields a proxy passes on: minus hop-by-hop and those Connection names."""
        connection = self._noted.get(b"connection")
        skip = HOP_BY_HOP | connection_tokens(connection) if connection else HOP_BY_HOP
        return [f for f, low in zip(self.headers, self._lower, strict=True) if low not in skip]


class ResponseSink(Protocol):
    """What a ResponseReader tells of the response it reads."""

    def interim(self, head: ResponseHead) -> None: ...
    def final(self, head: ResponseHead) -> None: ...
    def upgraded(self, head: ResponseHead, rest: bytes) -> None: ...
    def body(self, data: bytes) -> None: ...
    def complete(self) -> None: ...


class ReadPhase(enum.Enum):
    HEAD = "head"  # reading heads; interim 1xx ones are passed on and skipped
    BODY = "body"  # the final head is out; llhttp frames the body
    DONE = "done"  # complete, upgraded or failed: no byte is read any more


class _HeadCallbacks:
    """httptools callbacks for one head (status and fields)."""

    def __init__(self) -> None:
        self.status = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.lower: list[bytes] = []
        self.noted: dict[bytes, list[bytes]] = {}
        self.headers_done = False
        self.message_done = False

    def on_status(self, status: bytes) -> None:
        self.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        low = name.lower()
        self.lower.append(low)
        if low in _NOTED:
            noted = self.noted.get(low)
            if noted is None:
                self.noted[low] = [value]
            else:
                noted.append(value)

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.message_done = True


class _BodyCallbacks(_HeadCallbacks):
    """Body callbacks of the final head's parser, passed to the reader."""

    def __init__(self, reader: ResponseReader) -> None:
        super().__init__()
        self.reader = reader

    def on_body(self, data: bytes) -> None:
        self.reader._on_body(data)

    def on_message_begin(self) -> None:
        if self.message_done:  # a byte after the complete response
            self.reader.overrun = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.headers_done:
            self.reader._on_complete()


class ResponseReader:
    """Reads one response (after any interim ones) from a stream's bytes.

    :param head_request: the request was HEAD: the final head is the whole response.
    """

    def __init__(
        self,
        sink: ResponseSink,
        *,
        head_request: bool = False,
        max_head: int = MAX_RESPONSE_HEAD,
        max_line: int = MAX_HEADER_LINE,
    ) -> None:
        self.sink = sink
        self.head_request = head_request
        self.phase = ReadPhase.HEAD
        self.max_head = max_head
        self.max_line = max_line
        #: made when a head does not come whole in one piece (see _heads)
        self._scanner: HeadScanner | None = None
        self._spent = 0  # bytes of the heads read without it
        self._parser = None
        self._callbacks: _BodyCallbacks | None = None
        self._framing = Framing.EOF
        #: body bytes still to come of a Content-Length body, which is counted
        #: here rather than fed through llhttp (no copy, no callback per piece);
        #: None for any other framing
        self._left: int | None = None
        #: bytes followed the complete response: the stream is out of step
        self.overrun = False

    def feed(self, data: bytes) -> None:
        """Reads ``data``; raises OriginResponseError on a framing error."""
        if self.phase is ReadPhase.HEAD:
            self._heads(data)
        elif self.phase is ReadPhase.BODY:
            self._body(data)

    def eof(self) -> None:
        """The stream ended: complete for a body that ends so, else an error."""
        phase, self.phase = self.phase, ReadPhase.DONE
        if phase is ReadPhase.HEAD:
            raise OriginResponseError("the origin closed the stream before its response head")
        if phase is ReadPhase.BODY:
            if self._framing is not Framing.EOF:
                raise OriginResponseError("the origin closed the stream in the middle of the body")
            self.sink.complete()

    def _heads(self, data: bytes) -> None:
        end = 0
        while self.phase is ReadPhase.HEAD:
            scanner = self._scanner
            if scanner is None:
                # the common case, without a scanner: a whole head, shorter than
                # any bound, ends with CRLFCRLF (and no bare LF line ends it first)
                quick = min(self.max_head - self._spent, self.max_line)
                cut = data.find(b"\r\n\r\n", end, end + quick)
                if cut >= 0 and data.find(b"\n\n", end, cut) < 0:
                    start, end = end, cut + 4
                    self._spent += end - start
                    self._head(data[start:end], data[end:])
                    continue
                scanner = self._scanner = HeadScanner(
                    self.max_head - self._spent, bare_lf=True, max_line=self.max_line
                )
            try:
                found = scanner.feed(data, end)
            except HeadTooLarge as e:
                self.phase = ReadPhase.DONE
                raise OriginResponseError(
                    f"the origin's response headers are too large ({e}; at most"
                    f" {MAX_RESPONSE_HEAD // 1024} KiB, {MAX_HEADER_LINE // 1024} KiB a line)"
                ) from None
            if found is None:
                return
            raw, end = found
            self._head(raw, data[end:])

    def _head(self, raw: bytes, rest: bytes) -> None:
        callbacks = _BodyCallbacks(self)
        parser = httptools.HttpResponseParser(callbacks)
        upgraded = False
        try:
            parser.feed_data(raw)
        except httptools.HttpParserUpgrade:
            upgraded = True
        except httptools.HttpParserError as e:
            self.phase = ReadPhase.DONE
            if parser.get_status_code() == 101 and callbacks.headers_done:
                # llhttp pauses on a 101 it cannot upgrade, and says only that
                raise OriginResponseError("a 101 without an Upgrade header field") from None
            raise OriginResponseError(f"malformed response head: {_why(e)}") from None
        if not callbacks.headers_done:
            self.phase = ReadPhase.DONE
            raise OriginResponseError("malformed response head")
        if _BAD_PHRASE.search(callbacks.status):
            self.phase = ReadPhase.DONE
            raise OriginResponseError("malformed response head: control character in the reason")
        code = parser.get_status_code()
        head = ResponseHead(
            code, callbacks.status, callbacks.headers, raw, callbacks.lower, callbacks.noted
        )
        if code == 101:
            self.phase = ReadPhase.DONE
            head.framing = Framing.NONE
            self.sink.upgraded(head, rest)
            return
        if upgraded:  # llhttp upgrades responses on 101 only; be sure
            self.phase = ReadPhase.DONE
            raise OriginResponseError("unexpected protocol upgrade")
        if code < 200:
            head.framing = Framing.NONE
            self.sink.interim(head)
            return  # the next head follows, in the same scanner (one bound for all)
        head.framing = self._framing = self._framing_of(head)
        connection = head.get(b"connection")
        head.persistent = (
            head.framing is not Framing.EOF
            and parser.get_http_version() == "1.1"
            and b"close" not in connection_tokens(connection)
        )
        self.phase = ReadPhase.BODY
        self.sink.final(head)
        if self.phase is not ReadPhase.BODY:
            return  # the sink stopped reading
        if head.framing is Framing.NONE or callbacks.message_done:
            if rest:
                self.overrun = True
            self._on_complete()
            return
        if head.framing is Framing.LENGTH:
            self._left = _length(head)
            if self._left is not None:
                if rest:
                    self._body(rest)
                return
        self._parser = parser
        self._callbacks = callbacks
        if rest:
            self._body(rest)

    def _framing_of(self, head: ResponseHead) -> Framing:
        if self.head_request or head.code in (204, 304):
            return Framing.NONE
        coding = head.get(b"transfer-encoding")
        if coding:
            codings = connection_tokens(coding)
            # llhttp refused Content-Length beside it.  We relay the body
            # de-chunked and re-chunked, so any other coding would reach the
            # public client unlabelled (Go's client refuses them too)
            if codings != {b"chunked"} or len(_tokens(coding)) != 1:
                self.phase = ReadPhase.DONE
                raise OriginResponseError("unsupported transfer coding in the response")
            return Framing.CHUNKED
        if head.get(b"content-length"):
            return Framing.LENGTH
        return Framing.EOF

    def _body(self, data: bytes) -> None:
        left = self._left
        if left is not None:
            size = len(data)
            if size < left:
                self._left = left - size
                self.sink.body(data)
                return
            self._left = 0
            if size > left:  # bytes after the complete response
                self.overrun = True
                data = data[:left]
            if data:
                self.sink.body(data)
            self._on_complete()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.phase is ReadPhase.BODY:
                self.phase = ReadPhase.DONE
                raise OriginResponseError(f"malformed response body: {_why(e)}") from None
            # bytes after the complete response: never read as another one
            self.overrun = True

    def _on_body(self, data: bytes) -> None:
        if self.phase is ReadPhase.BODY:
            self.sink.body(data)

    def _on_complete(self) -> None:
        if self.phase is ReadPhase.BODY:
            self.phase = ReadPhase.DONE
            self._parser = None
            self.sink.complete()

    def stop(self) -> None:
        """Read no more (the response is no longer wanted)."""
        self.phase = ReadPhase.DONE
        self._parser = None


def _length(head: ResponseHead) -> int | None:
    """The Content-Length llhttp accepted (one field, digits), or None to let
    llhttp count the body after all (a form this does not read)."""
    values = head.get(b"content-length")
    if len(values) != 1:
        return None
    value = values[0].strip(b" \t")
    return int(value) if value.isdigit() else None


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip(b" \t") for value in values for t in value.split(b",") if t.strip(b" \t")]


def _why(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text[:200]
