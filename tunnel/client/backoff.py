"""Reconnect delays: exponential with jitter, like cenkalti/backoff in koding."""

from __future__ import annotations

import random
from collections.abc import Callable

#: attempt number (1 for the first retry) -> seconds to wait, or None to give up
RetryPolicy = Callable[[int], "float | None"]


def exponential_backoff(
    initial: float = 0.5,
    factor: float = 1.5,
    maximum: float = 60.0,
    jitter: float = 0.5,
    max_attempts: int | None = None,
    rng: Callable[[], float] = random.random,
) -> RetryPolicy:
    """Delays of ``initial * factor**(n-1)``, capped at ``maximum``, each
    spread by +/- ``jitter`` (a fraction); None after ``max_attempts``."""
    if initial <= 0 or factor < 1 or maximum < initial or not 0 <= jitter < 1:
        raise ValueError("invalid backoff parameters")

    def policy(attempt: int) -> float | None:
        if max_attempts is not None and attempt > max_attempts:
            return None
        base = min(maximum, initial * factor ** max(0, attempt - 1))
        return base * (1 - jitter + 2 * jitter * rng())

    return policy
