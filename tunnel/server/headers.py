"""HTTP header rules of the public side, shared by the resource and the forwarders.

What a public request must look like before any tunnel work is done for it
(``public_target``), which headers describe one connection only, and the
``X-Forwarded-*`` headers the origin gets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from twisted.web.http_headers import Headers

from .vhosts import split_host

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
    """The lower-cased tokens of Connection header values.

    A token list (RFC 9110 5.6.1, 7.6.1) is split on commas, each element
    trimmed of spaces and tabs: ``keep-alive,close`` holds ``close``.
    """
    return {t.strip(b" \t").lower() for value in values for t in value.split(b",") if t.strip()}


def forwarded_headers(request, hop: set[bytes]) -> list[tuple[bytes, bytes]]:
    """X-Forwarded-For (appended to), -Proto and -Host for a public request.

    -Proto and -Host say what this server saw (its own transport, the Host
    the request was routed by) and replace whatever the public client sent:
    an outsider must not tell the origin which host or scheme it was
    reached by.  -For is appended to, since a proxy in front may have set it.

    :param hop: the request's Connection tokens (``connection_tokens``).
    """
    out = []
    client_ip = getattr(request.getClientAddress(), "host", None)
    if client_ip:
        value = client_ip.encode("ascii")
        prior = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if prior and b"x-forwarded-for" not in hop:  # named in Connection: hop-by-hop
            value = b", ".join(prior) + b", " + value
        out.append((b"X-Forwarded-For", value))
    out.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
    host = request.getHeader(b"host")
    if host:
        out.append((b"X-Forwarded-Host", host))
    return out


# -- the request-target and Host of a public request ----------------------------

#: bytes Go's net/http accepts in a Host header (httpguts.ValidHostHeader)
_HOST = re.compile(rb"[0-9A-Za-z!$%&'()*+,\-.:;=\[\]_~]*\Z")
#: a request-target is visible ASCII (RFC 9112 3.2); twisted.web also lets
#: DEL and 0x80-0xB0 through, which its own HTTP client then refuses
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
#: scheme "://" at the start of an absolute-form request-target
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://")
_DEFAULT_PORTS = {b"http": 80, b"https": 443}


class Refusal(NamedTuple):
    """A public request refused before any tunnel work: status and Go-style text."""

    code: int
    text: str


class PublicTarget(NamedTuple):
    """Where a public request goes: origin-form target and the Host to route by."""

    target: bytes
    host: bytes | None


def public_target(method: bytes, target: bytes, headers: Headers) -> PublicTarget | Refusal:
    """Check a public request's target and Host; give the origin-form target.

    * more than one Host header is refused (RFC 9112 3.2), as is a Host
      with bytes Go's server refuses;
    * an absolute-form target (``GET http://host/path``) is routed by its
      authority and becomes origin-form (RFC 9112 3.2.2); a Host header that
      names another host is refused rather than ignored, so a proxy in front
      that routed by Host and this server cannot disagree about the target;
    * a target with a byte that is not visible ASCII is refused;
    * CONNECT keeps its target (the caller decides); ``*`` is twisted.web's
      own business (it answers ``OPTIONS *`` itself); any other target not
      starting with ``/`` is refused.

    The Host may still be empty or missing here: that is the caller's call.
    """
    if not _TARGET.match(target):
        return Refusal(400, "malformed request-target")
    hosts = headers.getRawHeaders(b"host") or []
    if len(hosts) > 1:
        return Refusal(400, "too many Host headers")
    host = hosts[0] if hosts else None
    if host is not None and not _HOST.match(host):
        return Refusal(400, "malformed Host header")
    if method == b"CONNECT" or target.startswith(b"/") or target == b"*":
        return PublicTarget(target, host)
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        return Refusal(400, "malformed request-target")
    scheme = absolute.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        return Refusal(400, "unsupported scheme in the request-target")
    rest = target[absolute.end() :]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        return Refusal(400, "userinfo in the request-target")
    if not authority or not _HOST.match(authority) or b"#" in path:
        return Refusal(400, "malformed request-target")
    try:
        wanted = _host_key(authority, scheme)
        if host is not None and _host_key(host, scheme) != wanted:
            return Refusal(400, "the Host header does not match the request-target")
    except ValueError:
        return Refusal(400, "malformed request-target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return PublicTarget(path, host if host is not None else authority)


def _host_key(host: bytes, scheme: bytes) -> tuple[str, int]:
    name, port = split_host(host.decode("ascii"))
    return name, port or _DEFAULT_PORTS[scheme]
