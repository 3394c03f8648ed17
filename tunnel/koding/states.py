"""Connection states shared with koding/tunnel."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .identifiers import TunnelKey


class ClientState(enum.IntEnum):
    """The states of koding's ClientState, with the same numbers."""

    UNKNOWN = 0
    STARTED = 1
    CONNECTING = 2
    CONNECTED = 3
    DISCONNECTED = 4
    CLOSED = 5


@dataclass(frozen=True, repr=False)
class StateChange:
    """A tunnel went from ``previous`` to ``current``.

    ``identifier`` says whose: a client's changes carry the identifier it
    connects with (its own secret), a server's carry the ``TunnelKey`` (a
    server keeps no identifier).  ``key`` is the key on both sides, and
    ``repr()`` shows only its fingerprint, so a change is safe to log.
    """

    identifier: str | TunnelKey
    previous: ClientState
    current: ClientState
    error: BaseException | None = None

    @property
    def key(self) -> TunnelKey:
        return TunnelKey.coerce(self.identifier)

    def __repr__(self) -> str:
        error = f", error={self.error!r}" if self.error is not None else ""
        return f"StateChange({self.key!r}, {self.previous.name} -> {self.current.name}{error})"
