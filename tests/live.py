"""Helpers for the tests that run on the real reactor and real sockets.

There is one of each here, for every test module to share:

* ``until(predicate)`` waits for a condition the reactor will make true;
* ``http_client()`` is a treq client that keeps no connection open.

Tests that only need bytes and time should not need either: they run on the
in-memory network of ``tests/memory.py``, where nothing is waited for.
"""

from __future__ import annotations

import inspect
import math

import treq
from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, HTTPConnectionPool


async def until(
    predicate,
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    tries: int | None = None,
    what: str = "the condition",
    retry_on: tuple[type[BaseException], ...] = (),
    guard=None,
):
    """Wait until ``predicate()`` is true and return its value.

    ``predicate`` is checked at once, then once every ``interval`` seconds;
    between checks the reactor runs (``deferLater``, never ``time.sleep``),
    so the sockets and timers that will make it true keep moving.  The wait
    is bounded twice: by ``timeout`` seconds of the reactor's clock and by
    ``tries`` checks (by default as many as the timeout allows, plus a few),
    so a reactor that stops turning cannot hang a test either.  On expiry it
    raises ``AssertionError`` naming ``what``.

    ``predicate`` may return a Deferred or a coroutine (it is awaited).  An
    exception it raises fails the wait at once, unless it is one of
    ``retry_on`` (e.g. ``ConnectionRefusedError`` while a server starts):
    then it counts as "not yet" and the last one is reported on expiry.
    ``guard()``, if given, runs before every check and what it raises fails
    the wait at once, whatever ``retry_on`` says (e.g. a child process died).
    """
    if tries is None:
        tries = math.ceil(timeout / interval) + 10
    deadline = reactor.seconds() + timeout
    last: BaseException | None = None
    for attempt in range(tries):
        if guard is not None:
            guard()
        try:
            value = predicate()
            if isinstance(value, defer.Deferred) or inspect.isawaitable(value):
                value = await value
        except retry_on as e:
            value, last = None, e
        if value:
            return value
        if reactor.seconds() >= deadline or attempt == tries - 1:
            break
        await task.deferLater(reactor, interval, lambda: None)
    detail = f" (last error: {last!r})" if last is not None else ""
    raise AssertionError(f"timed out waiting for {what}: {timeout} s / {tries} checks{detail}")


def http_client(context_factory=None, connect_timeout: float = 5) -> treq.client.HTTPClient:
    """treq on the real reactor without a persistent pool, so no connection
    outlives its request (the root conftest fails a test that leaves one).

    ``context_factory`` is the Agent's TLS policy (e.g.
    ``BrowserLikePolicyForHTTPS``) for https URLs.
    """
    kwargs = {} if context_factory is None else {"contextFactory": context_factory}
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(
        Agent(reactor, pool=pool, connectTimeout=connect_timeout, **kwargs)
    )
