"""Log lines an outsider can cause, with a bound on how many get written.

A peer that misbehaves on purpose (a thousand slow heads, a flood of
malformed requests, an origin sending 10,000 interim responses) must not be
able to fill the log.  ``RateLimitedLog`` writes the first ``burst`` events
of each *kind* per ``interval`` seconds; the next one of that kind in the
same interval writes a single line saying that further ones are being
counted, and the first one after the interval writes how many were left out
before it is itself logged.  Nothing is scheduled (no timer is left on a
reactor): the count is reported by the next event of the kind, or by
``flush()``.

Events are never given a traceback: a peer's misbehaviour is described in
one line, with what the peer sent shortened by ``excerpt()``.

Used by the public side (``tunnel.server.site``, ``tunnel.server.web``); it
imports nothing from either side so both may share it::

    limited = RateLimitedLog(Logger(), clock=reactor)
    limited.info("slow-head", "dropping {peer}: no request head in time", peer=peer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

#: events of one kind written per interval before the rest are only counted
BURST = 10
#: seconds
INTERVAL = 60.0


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RateLimitedLog:
    """A Logger front that writes at most ``burst`` events of a kind per interval.

    :param logger: where the lines go.
    :param clock: the time source (a reactor or a ``Clock``); the global
        reactor if None.
    :param burst: events of one kind written per interval.
    :param interval: length of an interval in seconds, counted from the
        first event of the kind after the previous interval ended.
    """

    def __init__(
        self,
        logger: Logger | None = None,
        *,
        clock: IReactorTime | None = None,
        burst: int = BURST,
        interval: float = INTERVAL,
    ) -> None:
        self.logger = logger if logger is not None else Logger()
        self._clock = clock
        self.burst = burst
        self.interval = interval
        self._windows: dict[str, _Window] = {}

    def _now(self) -> float:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock.seconds()

    def info(self, kind: str, format: str, **kwargs: Any) -> bool:
        """Log at info level unless ``kind`` is over its budget; True if written."""
        return self.emit(LogLevel.info, kind, format, **kwargs)

    def warn(self, kind: str, format: str, **kwargs: Any) -> bool:
        """Log at warn level unless ``kind`` is over its budget; True if written."""
        return self.emit(LogLevel.warn, kind, format, **kwargs)

    def emit(self, level: LogLevel, kind: str, format: str, **kwargs: Any) -> bool:
        now = self._now()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            if window is not None:
                self._report(level, kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.emit(level, format, rate_kind=kind, **kwargs)
            return True
        window.suppressed += 1
        if window.suppressed == 1:
            self.logger.emit(
                level,
                "more {rate_kind} events: counting instead of logging them for up to {s} s",
                rate_kind=kind,
                s=self.interval,
            )
        return False

    def _report(self, level: LogLevel, kind: str, window: _Window) -> None:
        if window.suppressed:
            self.logger.emit(
                level,
                "{n} more {rate_kind} events were not logged",
                n=window.suppressed,
                rate_kind=kind,
            )

    def flush(self) -> None:
        """Report every count still pending and start afresh (e.g. at shutdown)."""
        windows, self._windows = self._windows, {}
        for kind, window in windows.items():
            self._report(LogLevel.info, kind, window)

    def suppressed(self, kind: str) -> int:
        """Events of ``kind`` counted but not logged in the current interval."""
        window = self._windows.get(kind)
        return window.suppressed if window is not None else 0


def excerpt(data: bytes | str, limit: int = 80) -> str:
    """What a peer sent, safe for one log line: escaped, and cut at ``limit``."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    shown = ascii(text[:limit])
    return shown + ("..." if len(text) > limit else "")
