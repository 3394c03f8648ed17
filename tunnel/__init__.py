"""tunnel: a reverse tunnel for Twisted, wire-compatible with koding/tunnel.

The package is split by side: ``tunnel.yamux`` (the multiplexer, no tunnel
knowledge), ``tunnel.koding`` (the control protocol both sides speak),
``tunnel.server`` and ``tunnel.client``.  The names below are imported on
first use (PEP 562), so ``import tunnel.yamux`` loads neither side.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "ClientState": "tunnel.koding.states",
    "StateChange": "tunnel.koding.states",
    "TunnelServer": "tunnel.server.registry",
    "TunnelResource": "tunnel.server.web",
    "TunnelSite": "tunnel.server.site",
    "TunnelServerService": "tunnel.server.service",
    "TunnelClientService": "tunnel.client.service",
    "LocalForwarder": "tunnel.client.local",
    "LocalTargets": "tunnel.client.local",
}

__all__ = [
    "ClientState",
    "LocalForwarder",
    "LocalTargets",
    "StateChange",
    "TunnelClientService",
    "TunnelResource",
    "TunnelServer",
    "TunnelServerService",
    "TunnelSite",
    "__version__",
]

if TYPE_CHECKING:
    from .client.local import LocalForwarder, LocalTargets
    from .client.service import TunnelClientService
    from .koding.states import ClientState, StateChange
    from .server.registry import TunnelServer
    from .server.service import TunnelServerService
    from .server.site import TunnelSite
    from .server.web import TunnelResource


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tunnel' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
