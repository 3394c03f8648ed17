"""Connection states shared with koding/tunnel."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ClientState(enum.IntEnum):
    """The states of koding's ClientState, with the same numbers."""

    UNKNOWN = 0
    STARTED = 1
    CONNECTING = 2
    CONNECTED = 3
    DISCONNECTED = 4
    CLOSED = 5


@dataclass(frozen=True)
class StateChange:
    identifier: str
    previous: ClientState
    current: ClientState
    error: BaseException | None = None
