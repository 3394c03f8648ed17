"""Tunnel streams kept between HTTP requests: keep-alive over the tunnel.

A stream to a client's local server costs a control message, a SYN, an ACK,
two FINs and (on the client) a TCP connect and close to the local server.
After a response that HTTP/1.1 lets the connection outlive (exact framing, no
``Connection: close``, the request sent whole), the forwarder leaves the
stream here instead of closing it, and the next request for the same client
and local port takes it back.  The client splices a stream to one local
connection byte for byte, so a kept stream is a keep-alive connection to the
local server, with a Go client as with ours.

The pool rules (design.md section 9):

* a stream waits at most ``idle_timeout`` seconds, shorter than common
  origin keep-alive timeouts, and at most ``max_idle`` wait per pool; the
  most recently used is taken first, so the others age out;
* a stream on which anything arrives while it waits is retired: bytes mean
  it is out of step (RST), a FIN means the local server closed (our client
  sends one; a Go client does not, which is why the forwarder retries an
  idempotent request that fails on a kept stream before any response byte);
* the waits are ``timers.Deadlines`` (lazy): one timer per pool, never
  cancelled while the pool is in use (a busy pool would arm and cancel one
  per request); when it fires it retires what waited too long and re-arms
  only if something still waits.

``OriginLeg`` is the stream's one protocol for its whole life: it hands what
the stream says to its current ``LegUser`` (a forwarder), to its pool while
it waits, and after a ``101`` it is one side of a splice.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..splice import SpliceProtocol
from ..timers import Deadlines

_DONE = Failure(ConnectionDone())


class LegUser(Protocol):
    """What an ``OriginLeg`` tells the request it carries."""

    def origin_data(self, data: bytes) -> None: ...
    def origin_eof(self) -> None: ...
    def origin_lost(self, reason: Failure) -> None: ...


class OriginLeg(SpliceProtocol):
    """The protocol of one tunnel stream to a local server, for its whole life.

    It belongs to one of: its ``user`` (one request at a time), a
    ``StreamPool`` (between requests), a splice (after a ``101``), or nobody
    (closing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.user: LegUser | None = None
        self.pool: StreamPool | None = None
        self.spliced = False
        #: requests this stream finished before the one it carries now
        self.carried = 0

    @property
    def reused(self) -> bool:
        """It carried a request before: the local server may have closed it since."""
        return self.carried > 0

    def splice(self, public: SpliceProtocol) -> None:
        """Join this stream to the public connection, byte for byte, for good."""
        self.user = None
        self.spliced = True
        self.join(public)

    def dataReceived(self, data: bytes) -> None:
        if self.spliced:
            super().dataReceived(data)
        elif self.user is not None:
            self.user.origin_data(data)
        elif self.pool is not None:
            self.pool.retire(self, abort=True)  # nothing was asked: out of step

    def readConnectionLost(self) -> None:
        if self.spliced:
            super().readConnectionLost()
        elif self.user is not None:
            self.user.origin_eof()
        elif self.pool is not None:
            self.pool.retire(self, abort=False)  # the local server closed

    def writeConnectionLost(self) -> None:
        if self.spliced:
            super().writeConnectionLost()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.spliced:
            super().connectionLost(reason)
            return
        self.lost = True
        user, self.user = self.user, None
        if user is not None:
            user.origin_lost(reason)
        elif self.pool is not None:
            self.pool.discard(self)


class StreamPool:
    """Idle streams to one local port of one client, most recently used first."""

    def __init__(self, clock: IReactorTime, *, max_idle: int, idle_timeout: float) -> None:
        self.max_idle = max_idle
        self.closed = False
        #: the waiting legs, each retired ``idle_timeout`` after it began to wait
        self._idle = Deadlines(clock, idle_timeout, self._waited_too_long, lazy=True)

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> OriginLeg | None:
        """The most recently kept stream, or None; the caller becomes its user."""
        if not self._idle:
            return None
        leg = self._idle.pop_newest()
        leg.pool = None
        return leg

    def keep(self, leg: OriginLeg) -> bool:
        """Keep ``leg`` for a later request; False if the pool is full or closed."""
        if self.closed or len(self._idle) >= self.max_idle or leg.lost:
            return False
        leg.user = None
        leg.pool = self
        leg.carried += 1
        self._idle.add(leg)
        # the last request may have left it paused; a waiting stream must hear its FIN
        leg.transport.resumeProducing()
        return True

    def discard(self, leg: OriginLeg) -> None:
        """Forget ``leg`` (it is gone)."""
        if self._idle.discard(leg):
            leg.pool = None

    def retire(self, leg: OriginLeg, *, abort: bool) -> None:
        """Forget ``leg`` and close its stream (RST if ``abort``, else FIN)."""
        self.discard(leg)
        if abort:
            leg.transport.abortConnection()
        else:
            leg.transport.loseConnection()

    def close(self) -> None:
        """Retire every waiting stream and keep none from now on."""
        self.closed = True
        for leg in list(self._idle):
            self.retire(leg, abort=False)
        self._idle.clear()

    def _waited_too_long(self, leg: OriginLeg) -> None:
        self.retire(leg, abort=False)
