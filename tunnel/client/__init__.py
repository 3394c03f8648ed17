"""The tunnel client.

``protocol`` is one connection to the server (CONNECT, yamux, the control
stream); ``service`` keeps it up with backoff, failing over between servers;
``local`` connects each tunnel stream to a local server; ``backoff`` holds
the retry policy and the order in which servers are tried.
"""

from .backoff import RetryPolicy, Server, ServerRotation, exponential_backoff
from .local import LocalForwarder, LocalTargets
from .protocol import HandshakeTimeout, TunnelClientProtocol, TunnelServerError
from .service import TunnelClientService

__all__ = [
    "HandshakeTimeout",
    "LocalForwarder",
    "LocalTargets",
    "RetryPolicy",
    "Server",
    "ServerRotation",
    "TunnelClientProtocol",
    "TunnelClientService",
    "TunnelServerError",
    "exponential_backoff",
]
