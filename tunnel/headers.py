"""HTTP header rules shared by the forwarders, and Go-style error pages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from twisted.web.http_headers import Headers

#: headers that describe one connection, never forwarded (RFC 9110 7.6.1)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def error_page(request, code: int, message: str) -> bytes:
    """Answer like Go's ``http.Error``: text/plain, the message and a newline."""
    body = (message + "\n").encode("utf-8", "replace")
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """The lower-cased tokens of Connection header values."""
    return {t.strip().lower() for value in values for t in value.split(b",") if t.strip()}


def forwardable(
    headers: Headers, drop: frozenset[bytes] = frozenset()
) -> Iterator[tuple[bytes, list[bytes]]]:
    """(name, values) of ``headers`` minus hop-by-hop ones and those named in Connection."""
    skip = HOP_BY_HOP | connection_tokens(headers.getRawHeaders(b"connection", [])) | drop
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            yield name, values


def forwarded_headers(request) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For (appended to), -Proto and -Host for a public request."""
    out = []
    client_ip = getattr(request.getClientAddress(), "host", None)
    if client_ip:
        value = client_ip.encode("ascii")
        prior = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if prior:
            value = b", ".join(prior) + b", " + value
        out.append((b"X-Forwarded-For", value))
    out.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
    if not request.requestHeaders.hasHeader(b"x-forwarded-host"):
        out.append((b"X-Forwarded-Host", request.getHeader(b"host")))
    return out
