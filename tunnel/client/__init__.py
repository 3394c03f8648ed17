"""The tunnel client.

``protocol`` is one connection to the server (CONNECT, yamux, the control
stream); ``service`` keeps it up with backoff; ``local`` connects each tunnel
stream to a local server; ``backoff`` holds the retry policy.
"""

from .backoff import RetryPolicy, exponential_backoff
from .local import LocalForwarder, LocalTargets
from .protocol import HandshakeTimeout, TunnelClientProtocol, TunnelServerError
from .service import TunnelClientService

__all__ = [
    "HandshakeTimeout",
    "LocalForwarder",
    "LocalTargets",
    "RetryPolicy",
    "TunnelClientProtocol",
    "TunnelClientService",
    "TunnelServerError",
    "exponential_backoff",
]
