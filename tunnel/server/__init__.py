"""The public tunnel server.

``registry`` keeps the connected clients and their traffic figures, by
``TunnelKey`` (a server keeps no identifier), and the routing tables of
``vhosts`` (host -> ``Route``, TCP port -> key; no HTTP); ``routes`` is the
facade through which hosts and TCP ports are configured, written to a
``store`` (``store.RegistryStore``) before they are served; ``web`` is the
twisted.web Resource that routes public requests and takes over control
connections; ``forward`` carries one request (HTTP or a WebSocket upgrade)
through a tunnel stream, writing it and reading the answer with ``http1``,
its body streaming through ``bodies``; ``tcp`` carries raw TCP connections;
``site`` is the hardened Site; ``service`` the service that loads the routes
before listening and stops gracefully.

The operator's side: ``store`` is the storage seam (``MemoryStore``),
``sqlite`` the registry file (``--db``) and ``redisstore`` the registry
several nodes share in Redis (``--redis``), over ``redislink``'s connections
that come back by themselves; ``rules`` holds a host's access
rules as data and ``access`` enforces them (``AccessGate``); ``events`` is
the seam through which the public side reports finished requests and
errors, and ``metrics`` the Prometheus view of them and of the live state.
"""

from .errors import NoClientSession, TooManyPendingTunnels, TunnelError, TunnelTimeout
from .registry import ClientConnection, TunnelServer, TunnelStats
from .routes import Routes
from .service import TunnelServerService
from .site import TunnelSite
from .web import TunnelResource

__all__ = [
    "ClientConnection",
    "NoClientSession",
    "Routes",
    "TooManyPendingTunnels",
    "TunnelError",
    "TunnelResource",
    "TunnelServer",
    "TunnelServerService",
    "TunnelSite",
    "TunnelStats",
    "TunnelTimeout",
]
