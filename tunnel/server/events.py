"""What the public side tells an observer (metrics, say) as it serves.

``ServerEvents`` is the seam: the site calls ``request_done`` once per
finished request, and the site, the resource, the forwarder and the TCP
front end call ``error`` with one ``ErrorKind`` where a request or
connection fails.  Every method is a no-op here; an observer
(``tunnel.server.metrics.Metrics``) overrides them.  Where nobody listens
the owners hold None instead and skip the call, so serving without an
observer costs nothing.

The kinds are a fixed enum, never text from a peer: an outsider cannot make
an observer create a new label value.
"""

from __future__ import annotations

import enum


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
    #: an access rule refused the request (401, 403)
    ACCESS_DENIED = "access_denied"
    #: a rate rule refused the request (429)
    RATE_LIMITED = "rate_limited"
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
