"""The public tunnel server.

``registry`` keeps the hosts, TCP routes and connected clients (no HTTP);
``web`` is the twisted.web Resource that routes public requests and takes
over control connections; ``forward_http`` and ``forward_ws`` carry one
request each through a tunnel stream; ``tcp`` carries raw TCP connections;
``site`` is the hardened Site; ``service`` the graceful-stop service.
"""

from .errors import NoClientSession, TooManyPendingTunnels, TunnelError, TunnelTimeout
from .registry import ClientConnection, TunnelServer
from .service import TunnelServerService
from .site import TunnelSite
from .web import TunnelResource

__all__ = [
    "ClientConnection",
    "NoClientSession",
    "TooManyPendingTunnels",
    "TunnelError",
    "TunnelResource",
    "TunnelServer",
    "TunnelServerService",
    "TunnelSite",
    "TunnelTimeout",
]
