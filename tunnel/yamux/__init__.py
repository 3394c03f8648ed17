"""hashicorp/yamux stream multiplexing for Twisted, byte-compatible with Go."""

from .config import LARGE_WINDOWS, YamuxConfig
from .endpoints import StreamClientEndpoint, StreamServerEndpoint
from .errors import (
    KeepAliveTimeout,
    PingTimeout,
    ProtocolError,
    RemoteGoAway,
    SessionClosed,
    SessionLost,
    StreamOpenTimeout,
    StreamReset,
    TooManyStreams,
    YamuxError,
)
from .session import YamuxSession
from .stream import Phase, StreamAddress, StreamState, YamuxStream

__all__ = [
    "KeepAliveTimeout",
    "LARGE_WINDOWS",
    "Phase",
    "PingTimeout",
    "ProtocolError",
    "RemoteGoAway",
    "SessionClosed",
    "SessionLost",
    "StreamAddress",
    "StreamClientEndpoint",
    "StreamOpenTimeout",
    "StreamReset",
    "StreamServerEndpoint",
    "StreamState",
    "TooManyStreams",
    "YamuxConfig",
    "YamuxError",
    "YamuxSession",
    "YamuxStream",
]
