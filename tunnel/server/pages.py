"""What the public HTTP client reads when its request cannot be served.

Go's texts, in Go's ``http.Error`` shape (text/plain, the message and a
newline), so clients written against koding/tunnel see what they expect.
The registry's errors carry no public text of their own: ``public_text``
maps them here, in the web layer.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from .errors import NoClientSession, TooManyPendingTunnels, TunnelError, TunnelTimeout

NO_CLIENT_SESSION = "no client session established"

_TEXTS: dict[type[TunnelError], str] = {
    NoClientSession: NO_CLIENT_SESSION,
    TunnelTimeout: "timeout getting session",
    TooManyPendingTunnels: "too many requests waiting for the client",
}


def public_text(failure: Failure | BaseException) -> str:
    """The text a public client gets for a failed tunnel (Go's, where Go has one)."""
    error = failure.value if isinstance(failure, Failure) else failure
    for kind, text in _TEXTS.items():
        if isinstance(error, kind):
            return text
    return f"tunnel error: {error}"


def error_page(request, code: int, message: str) -> bytes:
    """Answer like Go's ``http.Error``: text/plain, the message and a newline."""
    body = (message + "\n").encode("utf-8", "replace")
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


#: RFC 9110's reason phrases where twisted.web has none or an older one
_PHRASES = {
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def refusal_bytes(code: int, message: str) -> bytes:
    """A whole response refusing a request the channel could not parse, ending
    the connection: Go's ``http.Error`` shape plus ``Connection: close``.

    Written by the channel itself (such a request never reaches a Resource),
    with a Content-Length so the client knows it is complete.
    """
    body = (message + "\n").encode("utf-8", "replace")
    phrase = _PHRASES.get(code) or RESPONSES.get(code, b"Error")
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n%s" % (code, phrase, len(body), body)
    )
