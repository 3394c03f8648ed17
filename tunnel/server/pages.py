"""What the public HTTP client reads when its request cannot be served.

Go's texts, in Go's ``http.Error`` shape (text/plain, the message and a
newline), so clients written against koding/tunnel see what they expect.
The registry's errors carry no public text of their own: ``public_text``
maps them here, in the web layer.
"""

from __future__ import annotations

from twisted.python.failure import Failure

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
    if isinstance(error, TunnelError):
        return f"tunnel error: {error}"
    reasons = getattr(error, "reasons", None)  # twisted.web's client wraps its errors
    if reasons:
        return "tunnel error: " + "; ".join(r.getErrorMessage() for r in reasons)
    return f"tunnel error: {error}"


def error_page(request, code: int, message: str) -> bytes:
    """Answer like Go's ``http.Error``: text/plain, the message and a newline."""
    body = (message + "\n").encode("utf-8", "replace")
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body
