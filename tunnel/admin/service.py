"""The admin endpoint as a twisted.application service.

``AdminService(endpoint, token, routes, server, metrics)`` listens on
``endpoint`` (``--admin``, e.g. ``tcp:9000:interface=127.0.0.1``) and
serves, from one ``AdminSite``:

* ``/metrics``: the Prometheus exposition, without the token (scrapers
  rarely hold secrets), which is why the endpoint belongs on a private
  interface;
* everything else, behind ``auth.TokenGuard``: the JSON API and the status
  page (``api.AdminAPI``).

``AdminSite`` bounds what a client may make the server hold: connections
(``MAX_CONNECTIONS``), the time to send a request head and body, and the
body (over ``MAX_BODY``: 413 at once, and the connection closes); and it
writes no access log: anyone who reaches the port could fill it.
``read_token_file`` is the one way to read the token
(``--admin-token-file``).
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ..logs import RateLimitedLog
from ..observe import OneShot
from ..server.metrics import Metrics
from ..server.registry import TunnelServer
from ..server.routes import Routes
from ..server.site import HeadDeadlineChannel
from ..timers import cancel
from .api import SECURITY_HEADERS, AdminAPI
from .auth import TokenGuard, read_token_file

__all__ = ["MAX_BODY", "AdminRoot", "AdminService", "AdminSite", "read_token_file"]

#: the largest request body the admin endpoint reads (a PUT is a few hundred bytes)
MAX_BODY = 64 * 1024
#: seconds an idle admin connection stays open
IDLE_TIMEOUT = 60
#: seconds a client has for each request head (from the connection's start or
#: the end of the previous answer), and for a request body (from its head's end)
HEAD_TIMEOUT = 30
BODY_TIMEOUT = 30
#: admin connections open at once at most
MAX_CONNECTIONS = 64


def _error(request: IRequest, code: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    request.setResponseCode(code)
    for name, value in SECURITY_HEADERS.items():
        request.responseHeaders.setRawHeaders(name, [value])
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


class AdminRoot(Resource):
    """``/metrics`` in the open, everything else behind the token.

    A leaf, so the Resource behind each branch sees the whole path (a Klein
    app routes on it).  A path or Host that is not UTF-8 is refused here,
    before klein would log it as an error with a traceback.
    """

    isLeaf = True

    def __init__(self, guarded: IResource, metrics: IResource | None = None) -> None:
        super().__init__()
        self.guarded = guarded
        self.metrics = metrics

    def render(self, request):
        if request.postpath == [b"metrics"]:
            if self.metrics is None:
                return _error(request, 404, "metrics are not enabled on this server")
            return self.metrics.render(request)
        try:
            b"/".join(request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _error(request, 400, "the path and Host must be UTF-8")
        return self.guarded.render(request)


class BoundedRequest(Request):
    """A Request whose body is kept in memory, up to its site's ``max_body``.

    A body that turns out larger (chunked: its length is not known up
    front) is refused by its channel as soon as it passes the bound; a
    declared Content-Length over it never gets here (``AdminChannel``).
    """

    _received = 0

    def gotLength(self, length: int | None) -> None:
        # in memory: it is small (twisted.web would use a temporary file
        # for a large declared length)
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel is None:
            return
        self._received += len(data)
        limit = self.channel.site.max_body
        if self._received > limit:
            self.content = io.BytesIO()
            self.channel.refuse(413, too_large(limit))
            return
        self.content.write(data)


def too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class AdminChannel(HeadDeadlineChannel):
    """The admin endpoint's HTTP/1.1 channel: a deadline for each request head
    and body, bodies over the bound refused at once, and known to its site
    so that a stop can close it.

    The head deadline, the header bounds, the framing checks and the way a
    request is refused (a whole answer with ``Connection: close``, then
    ``linger`` seconds of reading and dropping, then the close) are the
    public side's (``tunnel.server.site.HeadDeadlineChannel``): twisted.web
    alone restarts its idle timer on every byte, so a client trickling a
    request would hold the connection forever.  Here the body has a
    deadline too (``body_timeout`` seconds from the end of its head), a
    declared Content-Length over the site's ``max_body`` is answered 413
    before a byte of the body is read (and before twisted.web would answer
    ``Expect: 100-continue`` by itself), and a chunked body is cut off as
    soon as it passes the bound.
    """

    head_timeout = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    _body_timer = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason) -> None:
        self._stop_body_timer()
        self.site.channel_closed(self)
        super().connectionLost(reason)

    def allHeadersReceived(self) -> None:
        length = self.length  # None: chunked
        limit = self.site.max_body
        if length is not None and length > limit:
            self.refuse(413, too_large(limit))
            return
        super().allHeadersReceived()
        if length != 0:
            self._body_timer = self.callLater(self.body_timeout, self._body_too_slow)

    def allContentReceived(self) -> None:
        self._stop_body_timer()
        super().allContentReceived()

    def refuse(self, code: int, message: str) -> None:
        """Answer the request being read with ``code`` (text ``message``), then
        drop what the client still sends and close.  Once only: a second
        refusal, or one after another of the channel's own, does nothing."""
        self._stop_body_timer()
        self._refuse(code, message)

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self.refuse(408, f"the request body did not arrive within {self.body_timeout:g} s")

    def _stop_body_timer(self) -> None:
        cancel(self._body_timer)
        self._body_timer = None


class AdminSite(Site):
    """The admin endpoint's Site: bounded heads and bodies (``AdminChannel``),
    at most ``max_connections`` connections at once (one more is closed at
    once), no access log, an idle timeout, and ``close_connections`` (a
    browser keeps its connection to the status page open: stopping the
    endpoint must end it too)."""

    requestFactory = BoundedRequest
    displayTracebacks = False
    max_body = MAX_BODY

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: Any = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        kwargs = {} if reactor is None else {"reactor": reactor}
        super().__init__(resource, timeout=IDLE_TIMEOUT, **kwargs)
        self.max_connections = max_connections
        self._channels: set[AdminChannel] = set()
        self._all_closed: OneShot | None = None
        #: what connections cause us to log, rate limited (anyone who reaches the port)
        self.refused_log = RateLimitedLog(Logger(namespace=__name__), clock=self.reactor)

    def buildProtocol(self, addr) -> AdminChannel | None:
        if len(self._channels) >= self.max_connections:
            self.refused_log.info(
                "admin-connections",
                "refused an admin connection from {peer}: {n} are open already",
                peer=getattr(addr, "host", addr),
                n=len(self._channels),
            )
            return None  # the reactor closes it
        return super().buildProtocol(addr)

    def protocol(self) -> AdminChannel:
        channel = AdminChannel()
        channel.public_log = self.refused_log  # slow heads, refusals: rate limited
        return channel

    @property
    def open_connections(self) -> int:
        """How many connections are open now."""
        return len(self._channels)

    def channel_opened(self, channel: AdminChannel) -> None:
        self._channels.add(channel)

    def channel_closed(self, channel: AdminChannel) -> None:
        self._channels.discard(channel)
        if not self._channels and self._all_closed is not None:
            self._all_closed.fire(None)
            self._all_closed = None

    def close_connections(self) -> Deferred:
        """Close every open connection (what was written is still sent; a
        request still being answered gets no answer); fires once all are closed."""
        if not self._channels:
            return succeed(None)
        if self._all_closed is None:
            self._all_closed = OneShot()
        waiting = self._all_closed.when()
        for channel in list(self._channels):
            channel.loseConnection()
        return waiting

    def log(self, request: IRequest) -> None:
        """No access log: each line would be caused by whoever reaches the port."""


def admin_resource(
    token: bytes,
    routes: Routes,
    server: TunnelServer,
    metrics: Metrics | None = None,
    *,
    reactor: Any = None,
) -> AdminRoot:
    """The admin endpoint's root Resource (see the module's docstring).

    :param metrics: a ``tunnel.server.metrics.Metrics`` (its ``resource()``
        answers ``/metrics``), or None: then ``/metrics`` is a 404.
    :param reactor: for the time, the thread pool that hashes passwords and
        the log's rate limit (the global reactor by default).
    """
    api = AdminAPI(routes, server, reactor=reactor)
    guarded = TokenGuard(api.resource(), token, clock=reactor)
    return AdminRoot(guarded, metrics.resource() if metrics is not None else None)


class _NotingEndpoint:
    """An endpoint that tells a OneShot which port it listens on."""

    def __init__(self, endpoint: IStreamServerEndpoint, listening: OneShot) -> None:
        self._endpoint = endpoint
        self._listening = listening

    def listen(self, factory):
        d = self._endpoint.listen(factory)

        def listened(port):
            self._listening.fire(port)
            return port

        def failed(failure):
            self._listening.fail(failure)
            return failure

        return d.addCallbacks(listened, failed)


class AdminService(StreamServerEndpointService):
    """The admin endpoint, started and stopped with the server's services.

    :param endpoint: where to listen (``--admin``); a port that cannot be
        bound fails the start, as the server's own listeners do.
    :param token: the operator's token (``read_token_file``).
    :param routes: the server's ``Routes``.
    :param server: the ``TunnelServer``.
    :param metrics: the server's ``Metrics`` for ``/metrics``, or None.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        token: bytes,
        routes: Routes,
        server: TunnelServer,
        metrics: Metrics | None = None,
    ) -> None:
        self._listening = OneShot()
        site = AdminSite(admin_resource(token, routes, server, metrics))
        super().__init__(_NotingEndpoint(endpoint, self._listening), site)
        # as twisted.application.strports.service() does: twistd exits with
        # the error rather than run a server whose admin port is not there
        self._raiseSynchronously = True

    def stopService(self) -> Deferred:
        """Stop listening, then close the connections still open."""
        d = super().stopService()
        return d.addCallback(lambda _: self.factory.close_connections())

    def when_listening(self) -> Deferred:
        """Fires with the listening port (``getHost()`` tells its address)."""
        return self._listening.when()
