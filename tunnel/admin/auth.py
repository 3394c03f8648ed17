"""Who may use the admin endpoint: the holder of the operator's token.

The token is a shared secret read from a file (``read_token_file``), never
from argv.  A request proves it holds the token with ``Authorization:
Bearer TOKEN`` (scripts, ``tunnel-admin``) or HTTP Basic with any user name
and the token as the password (a browser opening the status page: it
prompts for it, then re-sends it to the same origin).  A token in a query
string is never looked at: URLs end up in logs, histories and Referer
headers.  The comparison is constant time on bytes.

``TokenGuard`` puts that check in front of a whole Resource tree, so no
route can be added without it; a refusal is a 401 offering Basic, and what
refused requests make us log is rate limited (anyone who can reach the port
can cause them).
"""

from __future__ import annotations

import binascii
import hmac
import os
import re
import stat
from base64 import b64decode
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from ..logs import RateLimitedLog

#: the realm a browser shows in its password prompt
REALM = "tunnel admin"
#: the challenges of a 401: Basic so that a browser prompts, Bearer for scripts
CHALLENGES = [
    b'Basic realm="%s", charset="UTF-8"' % REALM.encode("ascii"),
    b'Bearer realm="%s"' % REALM.encode("ascii"),
]
#: a token is printable ASCII without spaces: it fits in a Bearer header
#: (RFC 6750 b64token is narrower; we accept any visible character)
_TOKEN = re.compile(rb"[\x21-\x7e]+")


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why (and never shows the token)."""


def parse_token(data: bytes, where: str = "the token") -> bytes:
    """The token in ``data``: one line, its line ending not part of it.

    Raises TokenFileError if it is empty or holds anything but visible
    ASCII characters (a second line or a space is a mistake worth hearing
    about, not a part of the secret).
    """
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise TokenFileError(f"{where} is empty")
    if not _TOKEN.fullmatch(data):
        raise TokenFileError(
            f"{where} must be one line of visible ASCII characters"
            " (no spaces or control characters)"
        )
    return data


_log = Logger()


def _log_warning(text: str) -> None:
    _log.warn("{warning}", warning=text)


def read_token_file(path: str | os.PathLike, *, warn: Callable[[str], None] | None = None) -> bytes:
    """The token stored in the file at ``path`` (see ``parse_token``).

    Raises TokenFileError (a ValueError) for an unreadable, empty or
    malformed file, with a message fit for a command line error.  A
    regular file that other users may read or write works, but is worth
    one warning (naming the file and its mode, never the token): given to
    ``warn``, by default the log's.
    """
    shown = os.fspath(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # of the file read, not of a name
            data = f.read(4097)
    except OSError as e:
        raise TokenFileError(f"cannot read the token file {shown!r}: {e.strerror}")
    if len(data) > 4096:
        raise TokenFileError(f"the token file {shown!r} is too large for a token")
    token = parse_token(data, f"the token in {shown!r}")
    if stat.S_ISREG(mode) and mode & 0o077:
        (warn or _log_warning)(
            f"the token file {shown!r} is open to other users (mode {stat.S_IMODE(mode):04o});"
            " anyone who reads it controls the server: chmod 600 it"
        )
    return token


def offered_token(authorization: bytes) -> bytes | None:
    """The token an ``Authorization`` header value offers, or None.

    ``Bearer TOKEN`` offers TOKEN; ``Basic base64(user:password)`` offers
    the password, whatever the user name.  Scheme names are case-insensitive.
    """
    scheme, _, credentials = authorization.strip().partition(b" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    if scheme == b"bearer":
        return credentials or None
    if scheme == b"basic":
        try:
            decoded = b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, colon, password = decoded.partition(b":")
        return password if colon and password else None
    return None


class TokenCheck:
    """Whether a request carries the operator's token."""

    def __init__(self, token: bytes) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._token = token

    def refusal(self, request: IRequest) -> str | None:
        """None if ``request`` holds the token, else why not (safe to log:
        it never includes what was offered)."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if not values:
            return "no credentials"
        if len(values) > 1:
            return "more than one Authorization header"
        offered = offered_token(values[0])
        if offered is None:
            return "credentials neither Bearer nor Basic"
        if not hmac.compare_digest(offered, self._token):
            return "wrong token"
        return None


class TokenGuard(Resource):
    """A Resource tree that only the token's holder may reach.

    A leaf: it sees the whole path and hands the request, untouched, to
    ``inner.render`` (itself a leaf, such as a Klein resource), or refuses
    it with 401.  ``json_prefix``: paths under it get their refusal as JSON
    (``{"error": ...}``), others as text.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        inner: IResource,
        token: bytes,
        *,
        clock: IReactorTime | None = None,
        json_prefix: bytes = b"/api/",
    ) -> None:
        super().__init__()
        self.inner = inner
        self.check = TokenCheck(token)
        self.json_prefix = json_prefix
        #: refused requests are caused by whoever reaches the port
        self.refused_log = RateLimitedLog(self.log, clock=clock)

    def render(self, request):
        why = self.check.refusal(request)
        if why is None:
            return self.inner.render(request)
        self.refused_log.info(
            "admin-unauthorized",
            "refused an admin request from {peer}: {why}",
            peer=_peer(request),
            why=why,
        )
        return unauthorized(request, json=request.path.startswith(self.json_prefix))


def unauthorized(request: IRequest, *, json: bool) -> bytes:
    """Answer 401 with the challenges (a browser then asks for the password)."""
    request.setResponseCode(401)
    request.responseHeaders.setRawHeaders(b"www-authenticate", CHALLENGES)
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.responseHeaders.setRawHeaders(b"x-content-type-options", [b"nosniff"])
    message = "the admin token is required (Authorization: Bearer TOKEN, or Basic)"
    if json:
        body = b'{"error": "%s"}' % message.encode("ascii")
        content_type = b"application/json"
    else:
        body = message.encode("ascii") + b"\n"
        content_type = b"text/plain; charset=utf-8"
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host is not None else str(address)
