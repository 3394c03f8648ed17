"""Why the registry could not give a request its tunnel.

The registry raises these; each front end decides what its public client is
told (the HTTP side answers with Go's texts, see ``tunnel.server.pages``;
a TCP connection is just closed).
"""

from __future__ import annotations


class TunnelError(Exception):
    """A tunnel to a client could not be opened."""


class NoClientSession(TunnelError):
    """The client is not connected, or its session ended."""

    def __init__(self) -> None:
        super().__init__("the client has no session")


class TunnelTimeout(TunnelError):
    """The client did not open the stream in time."""

    def __init__(self) -> None:
        super().__init__("the client opened no stream in time")


class TooManyPendingTunnels(TunnelError):
    """Too many requests already wait for this client's streams."""

    def __init__(self) -> None:
        super().__init__("too many requests wait for the client")
