"""The tunnel server as one twisted.application service, stopped gracefully.

``TunnelServerService`` owns the server's listeners (its children) and, when
stopped, first lets the clients' open tunnels finish (``TunnelServer.stop``:
GoAway, up to ``grace`` seconds) and only then stops listening.  It is what
``twistd tunnel-server`` runs, and what a program that embeds the server
adds to its own service tree.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint

from .registry import TunnelServer


class TunnelServerService(MultiService):
    """Listeners plus the server's graceful stop (GoAway, then a grace period).

    :param server: the registry whose clients are drained on stop.
    :param grace: seconds open tunnels may go on after stopService.
    """

    def __init__(self, server: TunnelServer, grace: float = 10.0) -> None:
        super().__init__()
        self.server = server
        self.grace = grace

    def listen(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> StreamServerEndpointService:
        """Serve ``factory`` (a TunnelSite, or ``server.tcp_factory()``) on ``endpoint``."""
        listener = StreamServerEndpointService(endpoint, factory)
        # as twisted.application.strports.service() does: a port that cannot be
        # bound fails the start (twistd exits with the error) rather than leaving
        # a server running that does not listen
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        return listener

    def stopService(self) -> Deferred:
        d = self.server.stop(self.grace)
        d.addCallback(lambda _: super(TunnelServerService, self).stopService())
        return d
