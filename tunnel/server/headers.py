"""HTTP header rules shared by the HTTP and WebSocket forwarders."""

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
    """X-Forwarded-For (appended to), -Proto and -Host for a public request.

    -Proto and -Host say what this server saw (its own transport, the Host
    the request was routed by) and replace whatever the public client sent:
    an outsider must not tell the origin which host or scheme it was
    reached by.  -For is appended to, since a proxy in front may have set it.
    """
    out = []
    client_ip = getattr(request.getClientAddress(), "host", None)
    if client_ip:
        value = client_ip.encode("ascii")
        prior = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if prior:
            value = b", ".join(prior) + b", " + value
        out.append((b"X-Forwarded-For", value))
    out.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
    host = request.getHeader(b"host")
    if host:
        out.append((b"X-Forwarded-Host", host))
    return out
