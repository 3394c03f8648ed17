"""Connection states shared with koding/tunnel, and a small observer list."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger


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


class Observers:
    """Callbacks run in registration order; one failing does not stop the rest."""

    log = Logger()

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., Any]] = []

    def add(self, callback: Callable[..., Any]) -> Callable[[], None]:
        """Register ``callback``; return a function that removes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def notify(self, *args: Any) -> None:
        for callback in list(self._callbacks):
            try:
                callback(*args)
            except Exception:
                self.log.failure("state observer {cb!r} failed", cb=callback)
