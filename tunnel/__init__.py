"""tunnel: a reverse tunnel for Twisted, wire-compatible with koding/tunnel."""

__version__ = "0.1.0"

from .client import TunnelClientService  # noqa: E402
from .local import LocalForwarder, LocalTargets  # noqa: E402
from .resource import TunnelResource  # noqa: E402
from .server import TunnelServer  # noqa: E402
from .site import TunnelSite  # noqa: E402
from .states import ClientState, StateChange  # noqa: E402

__all__ = [
    "ClientState",
    "LocalForwarder",
    "LocalTargets",
    "StateChange",
    "TunnelClientService",
    "TunnelResource",
    "TunnelServer",
    "TunnelSite",
    "__version__",
]
