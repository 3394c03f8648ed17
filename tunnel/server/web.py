"""The public side of the tunnel server, as a twisted.web Resource.

``TunnelResource`` is the whole public server and can be the root of a Site
or a child in an existing one.  It answers:

* the control path (``CONNECT /_controlPath/`` with ``X-Ktunnel-Identifier``),
  taking the connection over for a yamux session;
* every other request, by Host, through ``forward.Forward`` (plain HTTP and
  WebSocket upgrades alike).

Before any of that, the request's target and Host are checked
(``headers.public_target``): two Host headers, a malformed Host or target,
and CONNECT anywhere but the control path are refused, an absolute-form
target is routed by its authority and handed on in origin-form.  What a
peer can make it log is rate limited (``tunnel.logs``).

A routed host's access rules (``rules``: allowed networks, a rate, a
password) are enforced by ``access.AccessGate`` before the client is asked
for anything: a refusal is 403, 429 or 401 (503 while password checks are
saturated), and a request that passed basic auth goes on without its
Authorization header, which holds the host's password, not the origin's.

Errors use Go's texts (``http.Error`` style: text/plain, message + newline).
A ``director`` may rewrite each request before it is routed, as Go's
``Server.Director`` does.  What it refuses is reported to the server's
``events`` (``tunnel.server.events``) by kind.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..koding.identifiers import TunnelKey, redact
from ..koding.wire import CONNECTED_REPLY, CONTROL_PATH, IDENTIFIER_HEADER
from ..logs import RateLimitedLog, excerpt
from ..yamux import YamuxSession
from .access import AccessGate, Decision, Verdict
from .events import ErrorKind, report
from .forward import Forward
from .headers import PublicTarget, Refusal, public_target
from .pages import NO_CLIENT_SESSION, error_page
from .registry import TunnelServer
from .takeover import CannotTakeOver, take_over
from .vhosts import Route


def is_control_path(path: bytes) -> bool:
    """``path.Clean(p) + "/" == "/_controlPath/"``, as the Go server checks."""
    if b"_controlPath" not in path:  # no cleaning makes it up: the common case, cheaply
        return False
    text = "/" + path.decode("latin-1").lstrip("/")
    return posixpath.normpath(text).rstrip("/") + "/" == CONTROL_PATH


class TunnelResource(Resource):
    """The public tunnel server as a Resource (a leaf: it sees every path).

    :param server: the registry of hosts and connected clients.
    :param director: called with each request before it is routed (it may
        change the request's headers, e.g. its Host).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        server: TunnelServer,
        *,
        director: Callable[[Any], None] | None = None,
        gate: AccessGate | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.director = director
        #: enforces the hosts' access rules (one of our own if none is given:
        #: a host's rules are never skipped)
        self.gate = gate if gate is not None else AccessGate(server.clock)
        #: what peers cause, rate-limited per kind
        self.public_log = RateLimitedLog(self.log, clock=server.clock)

    def render(self, request):
        checked = public_target(request.method, request.uri, request.requestHeaders)
        if isinstance(checked, Refusal):
            return self._refuse(request, checked.code, checked.text)
        if (
            request.clientproto == b"HTTP/1.1"
            and not request.requestHeaders.hasHeader(b"host")
            and request.method != b"CONNECT"  # as Go's net/http: no Host needed
        ):
            return self._refuse(request, 400, "request host is empty")
        if checked.target != request.uri:
            _to_origin_form(request, checked)
        if self.director is not None:
            self.director(request)
        if is_control_path(request.path):
            return self._control(request)
        if request.method == b"CONNECT":
            # we are no proxy: a CONNECT must not reach an origin as "CONNECT /"
            return self._refuse(request, 501, "CONNECT is not supported")
        return self._forward(request)

    def _refuse(self, request, code: int, text: str) -> bytes:
        report(self.server.events, ErrorKind.BAD_REQUEST)
        self.public_log.info(
            "refused-request",
            "refused a request from {peer}: {code} {why}",
            peer=request.getClientAddress(),
            code=code,
            why=text,
        )
        return error_page(request, code, text)

    # -- control path --------------------------------------------------------

    def _control(self, request):
        if request.method != b"CONNECT":
            report(self.server.events, ErrorKind.BAD_REQUEST)
            return error_page(request, 405, "405 must CONNECT\n")
        raw = request.getHeader(IDENTIFIER_HEADER) or b""
        # what the peer sent goes back to that peer only (Go's texts); the log
        # and the server see its key
        offered = raw.decode("utf-8", "replace")
        key = self.server.canonical(offered) if offered else None
        if key is None:
            report(self.server.events, ErrorKind.CONTROL_REFUSED)
            self.public_log.info(
                "control-refused",
                "refused a control request from {peer}: unknown identifier {ident}",
                peer=request.getClientAddress(),
                ident=redact(offered) if offered else "(none)",
            )
            return error_page(
                request,
                502,
                f"no host associated for identifier {offered}. please use server.AddHost()",
            )
        if not self.server.accepting:
            report(self.server.events, ErrorKind.CONTROL_REFUSED)
            return error_page(request, 503, "the tunnel server is shutting down")
        if getattr(request.channel, "transport", None) is None:
            report(self.server.events, ErrorKind.CONTROL_REFUSED)
            return error_page(request, 502, "this connection cannot be taken over")

        def decided(duplicate: bool) -> None:
            if request.channel is None or getattr(request, "_disconnected", False):
                if not duplicate:
                    self.server.control_abandoned(key)
                return
            if not duplicate and not self.server.accepting:
                # the server began to stop while this was decided: the client
                # would not be drained with the others
                self.server.control_abandoned(key)
                report(self.server.events, ErrorKind.CONTROL_REFUSED)
                request.write(error_page(request, 503, "the tunnel server is shutting down"))
                request.finish()
                return
            if duplicate:
                report(self.server.events, ErrorKind.CONTROL_REFUSED)
                self.public_log.info(
                    "control-refused",
                    "refused a control request from {peer}: {ident} is connected already",
                    peer=request.getClientAddress(),
                    ident=key,
                )
                self.server.control_refused(key, "duplicate")
                request.write(
                    error_page(request, 502, f"control conn for {offered} already exist. \n")
                )
                request.finish()
                return
            self._take_over(request, key)

        self.server.check_duplicate(key).addCallback(decided)
        return NOT_DONE_YET

    def _take_over(self, request, key: TunnelKey) -> None:
        session = YamuxSession(
            False,
            clock=self.server.clock,
            config=self.server.yamux_config,
            quiet_until_peer_speaks=True,
        )
        self.server.attach_session(key, session)
        try:
            take_over(request, session, CONNECTED_REPLY)
        except CannotTakeOver as e:
            report(self.server.events, ErrorKind.CONTROL_REFUSED)
            session.connectionLost(Failure(ConnectionDone(str(e))))
            request.write(error_page(request, 502, str(e)))
            request.finish()

    # -- public requests -----------------------------------------------------

    def _forward(self, request):
        host = request.getHeader(b"host")
        if not host:  # Go's text; a 400 as Go's net/http gives (RFC 9112 3.2)
            report(self.server.events, ErrorKind.BAD_REQUEST)
            return error_page(request, 400, "request host is empty")
        try:
            route, port = self.server.vhosts.lookup(host.decode("latin-1"))
        except ValueError:
            report(self.server.events, ErrorKind.BAD_REQUEST)
            self.public_log.info(
                "bad-host",
                "refused a request from {peer}: malformed host {host}",
                peer=request.getClientAddress(),
                host=excerpt(host),
            )
            return error_page(request, 400, f"malformed host {host.decode('latin-1')!r}")
        if route is None:
            report(self.server.events, ErrorKind.NO_VHOST)
            return error_page(
                request, 502, f'no virtual host available for "{host.decode("latin-1").lower()}"'
            )
        if route.rules:
            verdict = self.gate.check(
                route.rules,
                peer=getattr(request.getClientAddress(), "host", None),
                forwarded_for=request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
                authorization=_authorization(request),
                host=route.host,
            )
            if isinstance(verdict, Deferred):
                # the body waits (held, unread) while a password is checked
                request.notifyFinish().addErrback(lambda _: verdict.cancel())
                verdict.addCallback(self._decided, request, route, port)
                verdict.addErrback(self._undecided, request)
                return NOT_DONE_YET
            if not verdict.allowed:
                return self._deny(request, verdict)
            if verdict.authenticated:
                request.requestHeaders.removeHeader(b"authorization")
        return self._dispatch(request, route, port)

    def _decided(self, verdict: Verdict, request, route: Route, port: int) -> None:
        """A verdict that had to wait for a password check."""
        if not verdict.allowed:
            request.write(self._deny(request, verdict))
            request.finish()
            return
        if verdict.authenticated:
            request.requestHeaders.removeHeader(b"authorization")
        body = self._dispatch(request, route, port)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _undecided(self, failure: Failure, request) -> None:
        """The wait for a verdict ended without one: the client left (the
        wait was cancelled), or something failed, which gets a 502 and one
        rate-limited line rather than a request left hanging."""
        if failure.check(CancelledError):
            return
        self.public_log.emit(
            LogLevel.error, "access-failed", "deciding a request failed", log_failure=failure
        )
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(error_page(request, 502, "tunnel error: cannot decide the request"))
            request.finish()

    def _deny(self, request, verdict: Verdict) -> bytes:
        """What a host's rules refuse (403, 429, 401, 503), with the verdict's headers."""
        report(self.server.events, _DENIALS[verdict.decision])
        self.public_log.info(
            "access-denied",
            "denied a request from {peer}: {code} {why}",
            peer=request.getClientAddress(),
            code=verdict.status,
            why=verdict.message,
        )
        body = error_page(request, verdict.status, verdict.message)
        for name, value in verdict.headers:
            request.responseHeaders.setRawHeaders(name, [value])
        return body

    def _dispatch(self, request, route: Route, port: int):
        tunnel = self.server.route(route.key)
        if tunnel is None:
            report(self.server.events, ErrorKind.NO_CLIENT)
            return error_page(request, 502, NO_CLIENT_SESSION)
        tunnel.dispatched()
        Forward(self.server, request, route.key, port, tunnel, public_log=self.public_log).start()
        return NOT_DONE_YET


#: what the gate refused, as an error kind
_DENIALS = {
    Decision.FORBIDDEN: ErrorKind.FORBIDDEN,
    Decision.RATE_LIMITED: ErrorKind.RATE_LIMITED,
    Decision.UNAUTHORIZED: ErrorKind.UNAUTHORIZED,
    Decision.UNAVAILABLE: ErrorKind.AUTH_UNAVAILABLE,
}


def _authorization(request) -> bytes | None:
    """The one Authorization header, None if absent; two or more are b"" (no
    credentials: a client cannot pick which one a host's password is checked on)."""
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values:
        return None
    return values[0] if len(values) == 1 else b""


def _to_origin_form(request, checked: PublicTarget) -> None:
    """Make an absolute-form request look as if it came in origin-form."""
    request.uri = checked.target
    request.path = checked.target.split(b"?", 1)[0]
    if not request.requestHeaders.hasHeader(b"host"):
        request.requestHeaders.setRawHeaders(b"host", [checked.host])
