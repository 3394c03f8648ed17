"""The public side of the tunnel server, as a twisted.web Resource.

``TunnelResource`` is the whole public server and can be the root of a Site
or a child in an existing one.  It answers:

* the control path (``CONNECT /_controlPath/`` with ``X-Ktunnel-Identifier``),
  taking the connection over for a yamux session;
* every other request, by Host, through ``forward.Forward`` (plain HTTP and
  WebSocket upgrades alike).

Errors use Go's texts (``http.Error`` style: text/plain, message + newline).
A ``director`` may rewrite each request before it is routed, as Go's
``Server.Director`` does.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..koding.wire import CONNECTED_REPLY, CONTROL_PATH, IDENTIFIER_HEADER
from ..yamux import YamuxSession
from .forward import Forward
from .pages import NO_CLIENT_SESSION, error_page
from .registry import TunnelServer
from .takeover import CannotTakeOver, take_over


def is_control_path(path: bytes) -> bool:
    """``path.Clean(p) + "/" == "/_controlPath/"``, as the Go server checks."""
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
        self, server: TunnelServer, *, director: Callable[[Any], None] | None = None
    ) -> None:
        super().__init__()
        self.server = server
        self.director = director

    def render(self, request):
        if self.director is not None:
            self.director(request)
        if is_control_path(request.path):
            return self._control(request)
        return self._forward(request)

    # -- control path --------------------------------------------------------

    def _control(self, request):
        if request.method != b"CONNECT":
            return error_page(request, 405, "405 must CONNECT\n")
        raw = request.getHeader(IDENTIFIER_HEADER) or b""
        offered = raw.decode("utf-8", "replace")
        identifier = self.server.vhosts.canonical(offered) if offered else None
        if identifier is None:
            return error_page(
                request,
                502,
                f"no host associated for identifier {offered}. please use server.AddHost()",
            )
        if not self.server.accepting:
            return error_page(request, 503, "the tunnel server is shutting down")
        if getattr(request.channel, "transport", None) is None:
            return error_page(request, 502, "this connection cannot be taken over")

        def decided(duplicate: bool) -> None:
            if request.channel is None or getattr(request, "_disconnected", False):
                return
            if duplicate:
                self.server.control_refused(identifier, "duplicate")
                request.write(
                    error_page(request, 502, f"control conn for {identifier} already exist. \n")
                )
                request.finish()
                return
            self._take_over(request, identifier)

        self.server.check_duplicate(identifier).addCallback(decided)
        return NOT_DONE_YET

    def _take_over(self, request, identifier: str) -> None:
        session = YamuxSession(
            False,
            clock=self.server.clock,
            config=self.server.yamux_config,
            quiet_until_peer_speaks=True,
        )
        self.server.attach_session(identifier, session)
        try:
            take_over(request, session, CONNECTED_REPLY)
        except CannotTakeOver as e:
            session.connectionLost(Failure(ConnectionDone(str(e))))
            request.write(error_page(request, 502, str(e)))
            request.finish()

    # -- public requests -----------------------------------------------------

    def _forward(self, request):
        host = request.getHeader(b"host")
        if not host:
            return error_page(request, 502, "request host is empty")
        try:
            identifier, port = self.server.vhosts.lookup(host.decode("latin-1"))
        except ValueError:
            return error_page(request, 400, f"malformed host {host.decode('latin-1')!r}")
        if identifier is None:
            return error_page(
                request, 502, f'no virtual host available for "{host.decode("latin-1").lower()}"'
            )
        connection = self.server.connection(identifier)
        if connection is None or not connection.ready:
            return error_page(request, 502, NO_CLIENT_SESSION)
        Forward(self.server, request, identifier, port).start()
        return NOT_DONE_YET
