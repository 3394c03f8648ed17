"""What the public side tells an observer (metrics, say) as it serves.

``ServerEvents`` is the seam: the site calls ``request_done`` once per
finished request, and the site, the resource, the forwarder and the TCP
front end call ``error`` with one ``ErrorKind`` where a request or
connection fails (``report``).  Every method is a no-op here; an observer
(``tunnel.server.metrics.Metrics``) overrides them.  The observer is
``TunnelSite.events`` for the site and ``TunnelServer.events`` for the
others; where nobody listens they hold None and the call is skipped, so
serving without an observer costs nothing.

The kinds are a fixed enum, never text from a peer: an outsider cannot make
an observer create a new label value.
"""

from __future__ import annotations

import enum

from .errors import NoClientSession, TooManyPendingTunnels, TunnelTimeout


class ErrorKind(enum.StrEnum):
    """Why a public request or connection was not served (its label value)."""

    #: a request head not complete within the site's head_timeout
    HEAD_TIMEOUT = "head_timeout"
    #: a request refused for its framing, its size or its target (400, 414, 431)
    BAD_REQUEST = "bad_request"
    #: a request body arriving below the minimum rate (408)
    BODY_TIMEOUT = "body_timeout"
    #: a request body over the site's max_body (413)
    BODY_TOO_LARGE = "body_too_large"
    #: no virtual host for the request's Host
    NO_VHOST = "no_vhost"
    #: the host's client is not connected, or its session ended
    NO_CLIENT = "no_client"
    #: the client opened no stream in time
    TUNNEL_TIMEOUT = "tunnel_timeout"
    #: too many requests already waiting for the client's streams
    TOO_MANY_PENDING = "too_many_pending"
    #: the origin's answer broke HTTP framing, or its stream ended early
    ORIGIN_ERROR = "origin_error"
    #: the public client left before its answer was complete
    CLIENT_GONE = "client_gone"
    #: a control request refused (unknown identifier, or one already connected)
    CONTROL_REFUSED = "control_refused"
    #: the host's allow rule refused the client's address (403)
    FORBIDDEN = "forbidden"
    #: the host's basic_auth rule found no credentials, or wrong ones (401)
    UNAUTHORIZED = "unauthorized"
    #: the host's rate rule found the client's bucket empty (429)
    RATE_LIMITED = "rate_limited"
    #: the host's password could not be checked now (503)
    AUTH_UNAVAILABLE = "auth_unavailable"
    #: a public TCP connection on a port no tunnel is mapped to
    TCP_UNMAPPED = "tcp_unmapped"
    #: a TCP tunnel could not be opened
    TCP_FAILED = "tcp_failed"


class ServerEvents:
    """The observer interface; each method does nothing unless overridden.

    Both methods run on the reactor thread, on the request path: they must
    be cheap and must not raise.
    """

    def request_done(self, request, seconds: float) -> None:
        """``request`` (a twisted.web Request) was answered completely,
        ``seconds`` after its head was complete."""

    def error(self, kind: ErrorKind) -> None:
        """A request or connection failed for ``kind``."""


def report(events: ServerEvents | None, kind: ErrorKind) -> None:
    """Tell ``events`` (None: nobody) of an error of ``kind``."""
    if events is not None:
        events.error(kind)


#: why the registry could not give a request its stream, as a kind
_TUNNEL_ERRORS = {
    NoClientSession: ErrorKind.NO_CLIENT,
    TunnelTimeout: ErrorKind.TUNNEL_TIMEOUT,
    TooManyPendingTunnels: ErrorKind.TOO_MANY_PENDING,
}


def tunnel_error_kind(error: BaseException) -> ErrorKind:
    """The kind of a failure to open a tunnel (``registry.open_tunnel``); any
    other error means the client could not give a stream: ``no_client``."""
    return _TUNNEL_ERRORS.get(type(error), ErrorKind.NO_CLIENT)
