"""One connection to Redis, kept up: connect, AUTH, reconnect with backoff.

``RedisLink`` is how ``redisstore.RedisStore`` reaches Redis (it has two:
one for commands, one subscribed to the change feed).  txredisapi speaks
the protocol (its ``RedisProtocol`` and ``SubscriberProtocol``); the link,
rather than txredisapi's reconnecting factory, decides when to connect,
because the registry needs three things that factory does not give:

- **fail fast**: while Redis is known to be down, a command fails at once
  with ``StoreError`` (txredisapi's handler would queue it until a
  reconnection, however long that takes); a command asked for then also
  makes the next attempt start now, so the first admin change after Redis
  is back works without waiting out the backoff.  Every attempt (connect,
  AUTH, the caller's ``prepare``) and every command is bounded by
  ``timeout`` seconds; a command that times out fails with
  ``StoreOutcomeUnknown`` (Redis may have run it) and drops the
  connection, since a server that does not answer one will not answer the
  next.
- **one log line per outage**: the first failure is logged (a warning
  naming the reason), the retries are not, and the reconnection is logged
  once with the outage's length; Twisted's ``ClientService`` would log
  every retry.
- **a hook when a connection becomes usable** (``on_ready``) and when it is
  lost (``on_lost``), which the change feed uses to catch up.

The link is an explicit state machine (``LinkState``).  A connection that
is up is checked with a PING every ``keepalive`` seconds, so a half-open
one (a peer gone without a FIN) is noticed within ``keepalive + timeout``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import txredisapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .store import StoreClosed, StoreError, StoreOutcomeUnknown

T = TypeVar("T")

#: what the link's connections speak: txredisapi's protocol (or a subclass)
Protocol = txredisapi.BaseRedisProtocol


class LinkState(enum.Enum):
    IDLE = "idle"  # never started
    CONNECTING = "connecting"  # an attempt (connect, AUTH, prepare) is under way
    READY = "ready"  # connected and prepared: commands go through
    WAITING = "waiting"  # unavailable: the next attempt is scheduled
    CLOSED = "closed"


@dataclass(frozen=True)
class Backoff:
    """Seconds between attempts: ``initial`` after the first failure, times
    ``factor`` after each further one, at most ``maximum``, each varied by
    up to ``jitter`` (a fraction) so that nodes do not retry in step."""

    initial: float = 0.5
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.1

    def delay(self, failures: int, uniform: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(failures - 1, 64))
        return max(0.0, base * (1 + self.jitter * (2 * uniform() - 1)))


#: how links space their attempts unless told otherwise
DEFAULT_BACKOFF = Backoff()


def _reason(failure: Failure) -> str:
    """One line for the log and the error: what went wrong, not a traceback."""
    if failure.check(TimeoutError, ConnectTimeoutError, CancelledError):
        return "no answer in time"
    text = failure.getErrorMessage() or failure.type.__name__
    return " ".join(text.split())[:200]


class _Factory(Factory):
    """Builds the link's protocols: text answers (UTF-8), numbers left as text."""

    #: no "Starting factory" line per attempt: an outage must not fill the log
    noisy = False

    def __init__(self, make: Callable[[], Protocol]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.make()
        protocol.factory = self
        return protocol


def command_protocol() -> Protocol:
    """A connection that sends commands (what a link makes by default)."""
    return txredisapi.RedisProtocol(charset="utf-8", convertNumbers=False)


class RedisLink:
    """One connection to Redis at ``endpoint``, kept up until ``close()``.

    :param name: how logs and errors name this connection (the endpoint
        string and its use; never a password).
    :param make_protocol: builds each connection's protocol (default
        ``command_protocol``; the change feed gives a ``SubscriberProtocol``).
    :param password: sent with AUTH on each new connection.
    :param timeout: seconds an attempt, or a command, may take.
    :param keepalive: seconds between the PINGs that check an idle connection.
    :param prepare: run on each new connection before it is ready (e.g.
        SUBSCRIBE); its failure fails the attempt.
    :param on_ready: told each time a connection is ready.
    :param on_lost: told each time the ready connection is lost.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        *,
        name: str,
        make_protocol: Callable[[], Protocol] = command_protocol,
        password: str | None = None,
        timeout: float = 3.0,
        keepalive: float = 5.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: IReactorTime | None = None,
        prepare: Callable[[Protocol], Deferred[Any]] | None = None,
        on_ready: Callable[[Protocol], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.keepalive = keepalive
        self.backoff = backoff
        self.clock = clock
        self._factory = _Factory(make_protocol)
        self._password = password
        self._prepare = prepare
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._uniform = uniform
        self.state = LinkState.IDLE
        #: the connection while READY (or while an attempt prepares it)
        self._protocol: Protocol | None = None
        self._attempt: Deferred[Protocol] | None = None
        self._retry: IDelayedCall | None = None
        self._ping: IDelayedCall | None = None
        #: callers of connection() waiting for the attempt under way
        self._waiters: list[Deferred[Protocol]] = []
        #: commands sent and not answered yet (close waits for them)
        self._inflight: set[Deferred[Any]] = set()
        #: every connection of this link that is open (the ready one, or
        #: one an attempt is preparing)
        self._connections: set[Protocol] = set()
        #: close() callers, told once every connection is closed
        self._closing: list[Deferred[None]] = []
        #: failed attempts in a row
        self.failures = 0
        #: when the current outage began (None: none), and why
        self._down_since: float | None = None
        self._last_reason = "not connected yet"
        self._ever_ready = False

    def __repr__(self) -> str:
        return f"<RedisLink {self.name} {self.state.value}>"

    # -- what the store uses -----------------------------------------------------

    def start(self) -> None:
        """Begin connecting (idempotent; ``connection()`` starts it as well)."""
        if self.state is LinkState.IDLE:
            self._begin_attempt()

    def connection(self, what: str = "Redis") -> Deferred[Protocol]:
        """The ready connection: at once while READY; after the attempt under
        way (or one started now, if the link was waiting to retry); failing
        with ``StoreError`` if that attempt fails, ``StoreClosed`` once closed."""
        if self.state is LinkState.READY:
            assert self._protocol is not None
            return succeed(self._protocol)
        if self.state is LinkState.CLOSED:
            return fail(StoreClosed(f"{what}: the connection to Redis {self.name} is closed"))
        waiter: Deferred[Protocol] = Deferred()
        self._waiters.append(waiter)
        if self.state in (LinkState.IDLE, LinkState.WAITING):
            self._begin_attempt()  # may fail the waiter at once
        return waiter

    def run(self, what: str, call: Callable[[Protocol], Deferred[T]]) -> Deferred[T]:
        """``call(connection)`` on the ready connection, bounded by ``timeout``;
        every failure is a ``StoreError`` saying ``what`` failed and why."""
        return Deferred.fromCoroutine(self._run(what, call))

    async def _run(self, what: str, call: Callable[[Protocol], Deferred[T]]) -> T:
        protocol = await self.connection(what)
        tracker: Deferred[None] = Deferred()
        self._inflight.add(tracker)
        try:
            return await maybeDeferred(call, protocol).addTimeout(self.timeout, self.clock)
        except (StoreError, CancelledError):  # CancelledError: the caller's cancel
            raise
        except Exception:
            failure = Failure()
            if failure.check(TimeoutError):
                # a server that does not answer one command will not answer
                # the next: drop the connection (and reconnect)
                self._drop(protocol)
                raise StoreOutcomeUnknown(
                    f"{what}: Redis {self.name} did not answer in {self.timeout:g} s"
                ) from None
            raise StoreError(f"{what} failed on Redis {self.name}: {_reason(failure)}") from None
        finally:
            self._inflight.discard(tracker)
            tracker.callback(None)

    def close(self) -> Deferred[None]:
        """Stop (re)connecting; wait for the commands in flight (each bounded
        by ``timeout``), then close the connection; fires once it is closed."""
        done: Deferred[None] = Deferred()
        if self.state is LinkState.CLOSED:
            if not self._closing:
                return succeed(None)
            self._closing.append(done)
            return done
        self.state = LinkState.CLOSED
        self._closing.append(done)
        self._cancel_timers()
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
        self._fail_waiters(StoreClosed(f"the connection to Redis {self.name} is closed"))
        inflight = list(self._inflight)
        gatherResults(inflight, consumeErrors=True).addBoth(lambda _: self._disconnect())
        return done

    # -- attempts ----------------------------------------------------------------

    def _begin_attempt(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.state = LinkState.CONNECTING
        attempt = Deferred.fromCoroutine(self._connect())
        self._attempt = attempt
        attempt.addTimeout(self.timeout, self.clock)
        attempt.addCallbacks(self._attempt_succeeded, self._attempt_failed)

    async def _connect(self) -> Protocol:
        protocol = await self.endpoint.connect(self._factory)
        self._protocol = protocol
        self._connections.add(protocol)
        protocol.whenDisconnected().addCallback(self._disconnected)
        if not protocol.connected:  # lost before this code saw it
            self._connections.discard(protocol)
        try:
            if self._password is not None:
                await protocol.auth(self._password)
            if self._prepare is not None:
                await self._prepare(protocol)
        except BaseException:
            self._drop(protocol)
            raise
        if not protocol.connected:
            raise StoreError("the connection was closed while it was being prepared")
        return protocol

    def _attempt_succeeded(self, protocol: Protocol) -> None:
        self._attempt = None
        if self.state is not LinkState.CONNECTING:  # closed meanwhile
            self._drop(protocol)
            return
        self.state = LinkState.READY
        self.failures = 0
        if self._down_since is not None:
            self.log.info(
                "Redis {name} is back after {seconds:.1f} s",
                name=self.name,
                seconds=self.clock.seconds() - self._down_since,
            )
            self._down_since = None
        elif not self._ever_ready:
            self.log.info("connected to Redis {name}", name=self.name)
        self._ever_ready = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)
        self._schedule_ping()
        if self._on_ready is not None and self.state is LinkState.READY:
            self._on_ready(protocol)

    def _attempt_failed(self, failure: Failure) -> None:
        self._attempt = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._drop(protocol)
        if self.state is LinkState.CLOSED:
            return
        reason = _reason(failure)
        self._last_reason = reason
        self.failures += 1
        self._outage(reason)
        self._fail_waiters(StoreError(f"Redis {self.name} is unavailable: {reason}"))
        self._wait_to_retry()

    def _outage(self, reason: str) -> None:
        """The one line of an outage: at its start, never for a retry."""
        if self._down_since is not None:
            return
        self._down_since = self.clock.seconds()
        self.log.warn(
            "Redis {name} is unavailable: {reason}; retrying with backoff (up to {most:g} s"
            " apart); meanwhile the registry cannot change and the server goes on"
            " serving what it holds",
            name=self.name,
            reason=reason,
            most=self.backoff.maximum,
        )

    def _wait_to_retry(self) -> None:
        self.state = LinkState.WAITING
        delay = self.backoff.delay(max(1, self.failures), self._uniform)
        self._retry = self.clock.callLater(delay, self._begin_attempt)

    def _fail_waiters(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(Failure(error))

    # -- the ready connection ------------------------------------------------------

    def _disconnected(self, protocol: Protocol) -> None:
        """txredisapi's whenDisconnected: a connection was lost."""
        self._connections.discard(protocol)
        if self.state is LinkState.CLOSED:
            if not self._connections and not self._inflight:
                self._finish_close()
            return
        if protocol is not self._protocol or self.state is not LinkState.READY:
            return  # an attempt's connection (its commands fail, and so does it), or dropped
        self._lose_ready("the connection was lost")

    def _lose_ready(self, reason: str) -> None:
        """The ready connection is lost, or dropped: wait, then reconnect."""
        self._protocol = None
        self._cancel_timers()
        self._last_reason = reason
        self._outage(reason)
        self.failures = 1  # the loss counts as the first failure
        self._wait_to_retry()
        if self._on_lost is not None:
            self._on_lost()

    def _schedule_ping(self) -> None:
        if self.keepalive > 0:
            self._ping = self.clock.callLater(self.keepalive, self._send_ping)

    def _send_ping(self) -> None:
        self._ping = None
        protocol = self._protocol
        if self.state is not LinkState.READY or protocol is None:
            return
        d = maybeDeferred(protocol.ping).addTimeout(self.timeout, self.clock)
        d.addCallbacks(lambda _: self._schedule_ping(), lambda _: self._drop(protocol))

    def _drop(self, protocol: Protocol, reason: str = "it did not answer in time") -> None:
        """Abort ``protocol``'s connection; if it was the ready one, the link
        stops using it now (its loss is reported later by the transport)."""
        transport = protocol.transport
        if transport is not None and protocol.connected:
            transport.abortConnection()
        if protocol is self._protocol and self.state is LinkState.READY:
            self._lose_ready(f"the connection was dropped: {reason}")

    def _cancel_timers(self) -> None:
        for call in (self._retry, self._ping):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._ping = None

    def _disconnect(self) -> None:
        """Closing, the commands in flight answered: close the connections."""
        self._protocol = None
        if not self._connections:
            self._finish_close()
            return
        for protocol in list(self._connections):
            protocol.transport.loseConnection()  # _disconnected finishes

    def _finish_close(self) -> None:
        closing, self._closing = self._closing, []
        for done in closing:
            done.callback(None)
