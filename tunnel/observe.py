"""Waiting for events: one-shot results and repeating observers.

Every ``when_*()`` method of the project hands each caller a Deferred of its
own, built by ``OneShot``: a caller that chains callbacks onto its Deferred
(or cancels it) changes nothing for the others, and a caller that comes
after the event gets the same result at once.  ``Observers`` is the
repeating kind (state changes), where one failing callback must not stop
the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure


class OneShot:
    """An event that happens at most once, with a result or a failure."""

    __slots__ = ("_waiters", "_result", "_failure")

    def __init__(self) -> None:
        self._waiters: list[Deferred] = []
        self._result: Any = None
        self._failure: Failure | None = None

    @property
    def fired(self) -> bool:
        return self._waiters is None

    @property
    def result(self) -> Any:
        """The value it fired with (None before, or after a failure)."""
        return self._result

    def when(self) -> Deferred:
        """A new Deferred that fires with the event's result (at once if it happened)."""
        if self._waiters is None:
            if self._failure is not None:
                return fail(self._failure)
            return succeed(self._result)
        d: Deferred = Deferred(self._withdraw)
        self._waiters.append(d)
        return d

    def fire(self, result: Any = None) -> None:
        """The event happened with ``result``; later calls do nothing."""
        if self._waiters is None:
            return
        waiters, self._waiters, self._result = self._waiters, None, result
        for d in waiters:
            d.callback(result)

    def fail(self, failure: Failure | BaseException) -> None:
        """The event will never happen, because of ``failure``; later calls do nothing."""
        if self._waiters is None:
            return
        if not isinstance(failure, Failure):
            failure = Failure(failure)
        waiters, self._waiters, self._failure = self._waiters, None, failure
        for d in waiters:
            d.errback(failure)

    def _withdraw(self, d: Deferred) -> None:
        if self._waiters is not None and d in self._waiters:
            self._waiters.remove(d)


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
                self.log.failure("observer {cb!r} failed", cb=callback)
