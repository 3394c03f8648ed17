"""The admin endpoint as a twisted.application service.

``AdminService(endpoint, token, routes, server, metrics)`` listens on
``endpoint`` (``--admin``, e.g. ``tcp:9000:interface=127.0.0.1``) and
serves, from one ``AdminSite``:

* ``/metrics``: the Prometheus exposition, without the token (scrapers
  rarely hold secrets), which is why the endpoint belongs on a private
  interface;
* everything else, behind ``auth.TokenGuard``: the JSON API and the status
  page (``api.AdminAPI``).

``AdminSite`` bounds what a request may make the server hold (a body over
``MAX_BODY`` is read and dropped, then answered 413) and writes no access
log: anyone who reaches the port could fill it.  ``read_token_file`` is
the one way to read the token (``--admin-token-file``).
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ..observe import OneShot
from ..server.metrics import Metrics
from ..server.registry import TunnelServer
from ..server.routes import Routes
from .api import SECURITY_HEADERS, AdminAPI
from .auth import TokenGuard, read_token_file

__all__ = ["MAX_BODY", "AdminRoot", "AdminService", "AdminSite", "read_token_file"]

#: the largest request body the admin endpoint reads (a PUT is a few hundred bytes)
MAX_BODY = 64 * 1024
#: seconds an idle admin connection stays open
IDLE_TIMEOUT = 60


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
    """A Request whose body is kept only up to ``MAX_BODY`` bytes.

    Beyond that the body is read and dropped (the connection stays usable),
    and the request is answered 413 without reaching any Resource.
    """

    max_body = MAX_BODY
    _received = 0
    _too_large = False

    def gotLength(self, length: int | None) -> None:
        # in memory: it is small (twisted.web would use a temporary file
        # for a large declared length)
        self.content = io.BytesIO()
        if length is not None and length > self.max_body:
            self._too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def process(self) -> None:
        if not self._too_large:
            super().process()
            return
        self.site = self.channel.site
        body = _error(self, 413, f"the request body is larger than {self.max_body} bytes")
        self.write(body)
        self.finish()


class AdminChannel(HTTPChannel):
    """An HTTP/1.1 channel its site knows of, so that a stop can close it."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channel_opened(self)

    def connectionLost(self, reason) -> None:
        self.site.channel_closed(self)
        super().connectionLost(reason)


class AdminSite(Site):
    """The admin endpoint's Site: bounded bodies, no access log, idle timeout,
    and ``close_connections`` (a browser keeps its connection to the status
    page open: stopping the endpoint must end it too)."""

    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, *, reactor: Any = None) -> None:
        kwargs = {} if reactor is None else {"reactor": reactor}
        super().__init__(resource, timeout=IDLE_TIMEOUT, **kwargs)
        self._channels: set[AdminChannel] = set()
        self._all_closed: OneShot | None = None

    def protocol(self) -> AdminChannel:
        return AdminChannel()

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
