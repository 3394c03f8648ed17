"""Timers: cancelling one that may have run already, and many equal deadlines on one.

``Deadlines`` keeps keys that each expire the same ``delay`` after they were
added, on a single DelayedCall.  The yamux session uses it for stream-open
and stream-close deadlines: every stream a session opens must be ACKed
within ``stream_open_timeout``, and every stream closed by us must see the
peer's FIN within ``stream_close_timeout``; one DelayedCall per stream would
be armed and cancelled for almost every stream, for a deadline that almost
never fires.  The server's pool of kept streams (``server.pool``) uses it for
how long a stream may wait.

All entries wait the same ``delay``, so the order they were added in is the
order they fall due, and one DelayedCall waits for the earliest.  Removing an
entry costs a dict deletion; the DelayedCall is cancelled when the last entry
goes (so an idle session holds no timer), or, with ``lazy``, left to fire once
for nothing (for keys that come and go many times a second); when it fires
it expires what is due and waits for the next entry.  An entry expires at
exactly its own deadline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.interfaces import IReactorTime


def cancel(call: Any) -> None:
    """Cancel the DelayedCall ``call`` unless it is None, has run or was cancelled."""
    if call is not None and call.active():
        call.cancel()


_ABSENT = object()


class Deadlines:
    """Keys that each expire ``delay`` seconds after ``add``, unless discarded first.

    :param delay: seconds; None for keys that never expire (a plain set).
    :param expire: called with each key whose deadline passed; the key is
        removed once it returns (so during the call it still counts).
    :param lazy: when the last key goes, leave the DelayedCall to fire once
        for nothing rather than cancel it (and make a new one for the next key).
    """

    __slots__ = ("_clock", "_delay", "_expire", "_lazy", "_due", "_call", "_firing")

    def __init__(
        self,
        clock: IReactorTime,
        delay: float | None,
        expire: Callable[[Any], None],
        *,
        lazy: bool = False,
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._expire = expire
        self._lazy = lazy
        #: key -> deadline, in deadline order (insertion order, same delay)
        self._due: dict[Any, float] = {}
        self._call: Any = None
        self._firing = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: Any) -> bool:
        return key in self._due

    def __iter__(self) -> Iterator[Any]:
        """The waiting keys, the earliest first."""
        return iter(self._due)

    def add(self, key: Any) -> None:
        """``key`` expires ``delay`` seconds from now (it must not be waiting already)."""
        delay = self._delay
        if delay is None:
            self._due[key] = math.inf
            return
        self._due[key] = self._clock.seconds() + delay
        if self._call is None and not self._firing:
            self._call = self._clock.callLater(delay, self._fire)

    def discard(self, key: Any) -> bool:
        """``key`` no longer expires; False if it was not waiting."""
        if self._due.pop(key, _ABSENT) is _ABSENT:
            return False
        self._emptied()
        return True

    def pop_newest(self) -> Any:
        """Remove and return the key added last (KeyError if none waits)."""
        key, _ = self._due.popitem()
        self._emptied()
        return key

    def _emptied(self) -> None:
        if not self._due and self._call is not None and not self._lazy:
            cancel(self._call)
            self._call = None

    def clear(self) -> None:
        """Forget every key and the DelayedCall."""
        self._due.clear()
        cancel(self._call)
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self._firing = True
        due = self._due
        clock = self._clock
        try:
            while due:
                key = next(iter(due))
                if due[key] > clock.seconds():
                    break
                try:
                    self._expire(key)
                finally:
                    due.pop(key, None)
        finally:
            self._firing = False
            if due:  # wait for the next one (``add`` did not arm while we fired)
                wait = due[next(iter(due))] - clock.seconds()
                self._call = clock.callLater(max(wait, 0.0), self._fire)
