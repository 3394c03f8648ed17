"""One way to cancel a timer that may already have run or been cancelled."""

from __future__ import annotations

from typing import Any


def cancel(call: Any) -> None:
    """Cancel the DelayedCall ``call`` unless it is None, has run or was cancelled."""
    if call is not None and call.active():
        call.cancel()
