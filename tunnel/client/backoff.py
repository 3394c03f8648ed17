"""How the client retries: the delays between attempts (exponential with
jitter, like cenkalti/backoff in koding) and the order of its servers."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IStreamClientEndpoint

#: attempt number (1 for the first retry) -> seconds to wait, or None to give up
RetryPolicy = Callable[[int], "float | None"]

#: reorders a list in place (``random.shuffle``, or a seeded ``Random().shuffle``)
Shuffle = Callable[[list], None]


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


@dataclass(frozen=True, eq=False)
class Server:
    """One tunnel server the client may dial.

    :param endpoint: how to reach it.
    :param host: the Host header of its CONNECT request (Go sends the
        dialled ``ip:port``).
    :param name: how logs and ``repr`` name it (the endpoint string the user
        typed); ``host`` when empty.  Never holds the identifier.
    """

    endpoint: IStreamClientEndpoint
    host: str = "tunnel"
    name: str = ""

    def __str__(self) -> str:
        return self.name or self.host

    def __repr__(self) -> str:
        return f"<tunnel server {self}>"


class ServerRotation:
    """The order in which a client tries its servers.

    Attempts go round by round; a round is every server once, in a random
    order (``shuffle``), so that the clients of a cluster spread over its
    nodes.  A refusal or a failed dial just moves on: that server is not
    tried again in this round.  A new round never begins with the server
    tried last (when there are others), so a dead server is not tried twice
    in a row.  ``lost(server)`` (a live link to it ended) starts a round of
    the others first and that server last.  One server: always that one.

    Holds at most one round: nothing grows with the attempts.
    """

    def __init__(self, servers: Sequence[Server], shuffle: Shuffle | None = None) -> None:
        if not servers:
            raise ValueError("no tunnel server to try")
        self.servers = tuple(servers)
        self._shuffle = shuffle or random.shuffle
        self._round: list[Server] = []
        self._last: Server | None = None

    def peek(self) -> Server:
        """The server ``next()`` will return."""
        if not self._round:
            self._round = self._new_round()
        return self._round[0]

    def next(self) -> Server:
        """The server to try now."""
        server = self.peek()
        del self._round[0]
        self._last = server
        return server

    def lost(self, server: Server) -> None:
        """A live link to ``server`` ended: try every other server before it."""
        others = [s for s in self.servers if s is not server]
        self._mix(others)
        self._round = [*others, server]

    def _new_round(self) -> list[Server]:
        order = list(self.servers)
        self._mix(order)
        if len(order) > 1 and order[0] is self._last:
            order.append(order.pop(0))
        return order

    def _mix(self, servers: list[Server]) -> None:
        if len(servers) > 1:
            self._shuffle(servers)
