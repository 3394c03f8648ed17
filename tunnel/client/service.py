"""The tunnel client as a twisted.application Service.

``TunnelClientService`` keeps one tunnel to a server up.  Twisted's
``ClientService`` runs the reconnect loop: it dials, treats the connection
as made only once the CONNECT and control handshake are done (its
``prepareConnection`` hook), redials with the retry policy's delays and
hands out ``when_ready()`` waiters.  A thin layer here keeps what it cannot
express (spec.md 2.12): failing over between several servers (the endpoint
it dials picks one per attempt from a ``ServerRotation``), a graceful drain
on stop, stopping an attempt in its handshake, a policy that gives up,
a bound on each dial, counting a link that dies young as a failure (a
server that accepts and drops at once is backed off from), koding's
ClientState values and ``last_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import (
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..koding.identifiers import redact
from ..koding.states import ClientState, StateChange
from ..observe import Observers, OneShot
from ..timers import cancel
from ..yamux import YamuxConfig
from .backoff import RetryPolicy, Server, ServerRotation, Shuffle, exponential_backoff
from .protocol import Forwarder, TunnelClientProtocol

#: the delay handed to ClientService when the policy gives up; never waited
#: for, the give-up stops ClientService first (see ``_retry_delay``)
_NEVER_WAITED_FOR = 1.0


class _Phase(Enum):
    """Where the service is in its own life (ClientState is the koding view)."""

    STOPPED = "stopped"  # not started, or stopped
    RUNNING = "running"  # ClientService keeps the tunnel up
    GAVE_UP = "gave up"  # the retry policy said None; ClientService is stopped
    STOPPING = "stopping"  # stopService: draining or closing


class _Link(Enum):
    HANDSHAKE = "handshake"  # connected, CONNECT or control handshake under way
    READY = "ready"  # ClientService took it (prepareConnection succeeded)
    GONE = "gone"


@implementer(IProtocol, ILoggingContext)
class _Attempt:
    """One connection to the server, between its transport and ClientService.

    Everything goes to ClientService's protocol proxy, except the loss of a
    connection that never became ready: ClientService already counted that
    attempt as failed (prepareConnection failed, or was cancelled by a stop)
    and has no transition for its loss (its state machine raises
    NoTransition), so that loss goes to our protocol alone.
    """

    def __init__(self, proxy: IProtocol, protocol: TunnelClientProtocol) -> None:
        self.proxy = proxy
        self.protocol = protocol
        self.link = _Link.HANDSHAKE

    def makeConnection(self, transport) -> None:
        self.proxy.makeConnection(transport)

    def connectionMade(self) -> None:
        """Nothing: makeConnection() above already told the protocol."""

    def dataReceived(self, data: bytes) -> None:
        # the proxy only forwards this (by __getattr__): straight to the protocol
        self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        told = self.proxy if self.link is _Link.READY else self.protocol
        self.link = _Link.GONE
        told.connectionLost(reason)

    def logPrefix(self) -> str:
        return self.protocol.logPrefix()


class _AttemptFactory(Factory):
    noisy = False

    def __init__(
        self, wrapped: IProtocolFactory, connected: Callable[[IProtocol], _Attempt]
    ) -> None:
        self.wrapped = wrapped
        self.connected = connected

    def buildProtocol(self, addr) -> _Attempt | None:
        proxy = self.wrapped.buildProtocol(addr)
        return None if proxy is None else self.connected(proxy)


@implementer(IStreamClientEndpoint)
class _AttemptEndpoint:
    """The endpoint ClientService dials: each connect() is one attempt, to
    the next server of the rotation.

    A dial that has not connected after ``timeout`` seconds is cancelled
    and fails with a TimeoutError: a vanished machine answers nothing, and
    the endpoint's own timeout (TCP's is 30 s) would hold the failover that
    long.  From the connection on, the protocol's handshake timer bounds it.

    :param starts: called with the server as each dial starts.
    :param connected: turns ClientService's protocol proxy into the attempt.
    :param failed: called with the failure of a dial (and passes it on).
    """

    def __init__(
        self,
        rotation: ServerRotation,
        *,
        clock,
        timeout: float,
        starts: Callable[[Server], None],
        connected: Callable[[IProtocol], _Attempt],
        failed: Callable[[Failure], Failure],
    ) -> None:
        self.rotation = rotation
        self.clock = clock
        self.timeout = timeout
        self.starts = starts
        self.connected = connected
        self.failed = failed

    def __repr__(self) -> str:
        # ClientService's "Scheduling retry N to connect {endpoint}"; a log event
        # may be formatted later, so this does not change (nor name the next server)
        servers = self.rotation.servers
        if len(servers) == 1:
            return str(servers[0])
        return "the next of " + ", ".join(str(s) for s in servers)

    def connect(self, factory: IProtocolFactory) -> Deferred:
        server = self.rotation.next()
        self.starts(server)
        d = server.endpoint.connect(_AttemptFactory(factory, self.connected))
        if not d.called:
            timer = self.clock.callLater(self.timeout, d.cancel)
            d.addBoth(self._dialled, timer)
        return d.addCallbacks(lambda attempt: attempt.proxy, self.failed)

    def _dialled(self, result: object, timer: Any) -> object:
        """The dial is over: stop its timer, or, if the timer ended it, say so
        (a cancel by ClientService's stop is passed on as it is)."""
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure):
            return Failure(TimeoutError(None, f"no connection after {self.timeout:g} seconds"))
        return result


class TunnelClientService(Service):
    """Keeps one tunnel to a server up, reconnecting with backoff and failing
    over between servers.

    :param endpoint: how to reach the server (``clientFromString``), or
        several ``Server`` s to fail over between (see ``ServerRotation``:
        each attempt goes to the next of a shuffled round; after a live link
        is lost, to the others first).
    :param identifier: the secret that names this client to the server.
    :param forwarder: called with each tunnel stream and its control message.
    :param host: the Host header of the CONNECT request when ``endpoint`` is
        one endpoint (Go sends the dialled ``ip:port``); each ``Server``
        carries its own.
    :param retry: attempt number -> delay in seconds, or None to give up.
        One delay per attempt, whichever server it goes to.
    :param shuffle: orders each round of servers (``random.shuffle``).
    :param handshake_timeout: seconds a dial may take to connect, and then
        the CONNECT and control handshake to complete (each in turn).
    :param stop_timeout: seconds open tunnels may go on after stopService.
    :param min_uptime: a ready link lost sooner than this counts as a failed
        attempt when the retry policy is asked (so a server that accepts the
        tunnel and drops it at once is retried ever more slowly); a link that
        lived longer restarts the count.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint | Sequence[Server],
        identifier: str,
        forwarder: Forwarder,
        *,
        host: str = "tunnel",
        clock=None,
        retry: RetryPolicy | None = None,
        shuffle: Shuffle | None = None,
        yamux_config: YamuxConfig | None = None,
        handshake_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        min_uptime: float = 10.0,
    ) -> None:
        if not identifier or any(c in identifier for c in "\r\n\0"):
            raise ValueError("the identifier must be non-empty and free of CR, LF and NUL")
        if clock is None:
            from twisted.internet import reactor as clock
        if IStreamClientEndpoint.providedBy(endpoint):
            endpoint = [Server(endpoint, host)]
        rotation = ServerRotation(endpoint, shuffle)
        #: every server, in the order given
        self.servers: tuple[Server, ...] = rotation.servers
        #: the server of the current (or last) attempt; None before the first
        self.current_server: Server | None = None
        self.identifier = identifier
        self.forwarder = forwarder
        self.clock = clock
        self.retry = retry or exponential_backoff()
        self.yamux_config = yamux_config
        self.handshake_timeout = handshake_timeout
        self.stop_timeout = stop_timeout
        self.min_uptime = min_uptime
        self.state = ClientState.UNKNOWN
        #: the connection of the current (or last) attempt
        self.protocol: TunnelClientProtocol | None = None
        self.last_error: BaseException | None = None
        self._phase = _Phase.STOPPED
        self._attempt: _Attempt | None = None
        self._give_up_call: Any = None
        #: True while ClientService is inside a dial (see stopService)
        self._dialling = False
        self._stopped = OneShot()
        self._observers = Observers()
        self._rotation = rotation
        #: the n last given to the retry policy: failures in a row, short links included
        self._failures = 0
        #: failures in a row before ClientService's count last restarted
        self._carried = 0
        #: (when, failures before it) of the ready link the policy has not yet
        #: been asked about; its loss is the next thing ClientService asks about
        self._link_up: tuple[float, int] | None = None
        self._loop = ClientService(
            _AttemptEndpoint(
                rotation,
                clock=clock,
                timeout=handshake_timeout,
                starts=self._attempt_starts,
                connected=self._connected,
                failed=self._attempt_failed,
            ),
            Factory.forProtocol(self._new_protocol),
            retryPolicy=self._retry_delay,
            clock=clock,
            prepareConnection=self._prepare,
        )

    # -- public API ------------------------------------------------------------

    @property
    def host(self) -> str:
        """The Host header of the current server's CONNECT (the first server's
        before any attempt)."""
        return (self.current_server or self.servers[0]).host

    @property
    def endpoint(self) -> IStreamClientEndpoint:
        """The current server's endpoint (the first server's before any attempt)."""
        return (self.current_server or self.servers[0]).endpoint

    def observe_states(self, callback: Callable[[StateChange], Any]) -> Callable[[], None]:
        """Call ``callback(StateChange)`` on every change; returns a remover."""
        return self._observers.add(callback)

    def when_ready(self) -> Deferred:
        """Fires with the connected protocol, at once if connected now.

        Fails with the last error if the retry policy gives up, and with
        CancelledError if the service is stopped first.
        """
        return self._loop.whenConnected().addErrback(self._not_ready)

    # -- Service ---------------------------------------------------------------

    def startService(self) -> None:
        """Start connecting; during a stop, once the stop is done."""
        if self._phase is _Phase.RUNNING:
            return
        super().startService()
        if self._phase is _Phase.STOPPING:
            self._stopped.when().addCallback(self._start_after_stop)
        else:
            self._start()

    def stopService(self) -> Deferred:
        """GoAway, let open tunnels finish (up to ``stop_timeout``), then close.

        A draining client refuses new tunnels at once; an attempt still in
        its handshake is aborted; a wait to retry is cancelled.
        """
        super().stopService()
        if self._phase is _Phase.STOPPED:
            return succeed(None)
        if self._phase is _Phase.STOPPING:
            return self._stopped.when()
        self._phase = _Phase.STOPPING
        self._stopped = OneShot()
        cancel(self._give_up_call)
        self._give_up_call = None
        attempt = self._attempt
        if attempt is not None and attempt.link is _Link.READY:
            # ClientService would just drop the connection: drain it first, and
            # stop ClientService once it is gone (it then stops at once)
            done = self._drain(attempt.protocol).addCallback(lambda _: self._loop.stopService())
        else:
            # this cancels a dial or the wait to retry; asked from inside a dial
            # (a Connecting observer) ClientService can only take it on the next turn
            stop = self._loop.stopService
            waits = [deferLater(self.clock, 0, stop) if self._dialling else stop()]
            if attempt is not None and attempt.link is _Link.HANDSHAKE:
                # ClientService cancels the handshake but leaves the connection
                waits.append(attempt.protocol.when_lost())
                attempt.protocol.transport.abortConnection()
            done = gatherResults(waits)
        done.addCallback(self._stop_done)
        return self._stopped.when()

    # -- the thin layer over ClientService ----------------------------------------

    def _start_after_stop(self, _: object) -> None:
        if self.running and self._phase is _Phase.STOPPED:  # not stopped, or started, since
            self._start()

    def _start(self) -> None:
        self._phase = _Phase.RUNNING
        self._failures = self._carried = 0  # nothing carried over a stop
        self._link_up = None
        self._set_state(ClientState.STARTED)
        if self._phase is _Phase.RUNNING:  # an observer may have stopped it
            self._loop.startService()

    def _new_protocol(self) -> TunnelClientProtocol:
        self.protocol = TunnelClientProtocol(
            self.identifier,
            self.current_server.host,
            self.forwarder,
            self.clock,
            self.yamux_config,
            self.handshake_timeout,
        )
        return self.protocol

    def _attempt_starts(self, server: Server) -> None:
        """ClientService dials ``server`` (the first time, or after a delay)."""
        self.current_server = server
        self._attempt = None
        self.log.info("connecting to the tunnel server at {server}", server=str(server))
        self._dialling = True
        try:
            self._set_state(ClientState.CONNECTING, self.last_error)
        finally:
            self._dialling = False

    def _connected(self, proxy: IProtocol) -> _Attempt:
        """The dial succeeded: ``proxy`` is ClientService's, around ``self.protocol``."""
        self._attempt = _Attempt(proxy, self.protocol)
        return self._attempt

    def _prepare(self, proxy: IProtocol) -> Deferred:
        """ClientService's prepareConnection: ready once the handshakes are done."""
        attempt = self._attempt
        ready = attempt.protocol.when_ready()
        return ready.addCallbacks(self._ready, self._attempt_failed, callbackArgs=(attempt,))

    def _ready(self, protocol: TunnelClientProtocol, attempt: _Attempt) -> TunnelClientProtocol:
        attempt.link = _Link.READY
        self.last_error = None
        self._link_up = (self.clock.seconds(), self._failures)
        self.log.info(
            "tunnel to the server is up at {server} ({ident})",
            server=str(self.current_server),
            ident=redact(self.identifier),
        )
        self._set_state(ClientState.CONNECTED)
        protocol.when_lost().addCallback(self._lost, self.current_server)
        return protocol

    def _lost(self, reason: BaseException, server: Server) -> None:
        """A ready connection to ``server`` is gone; ClientService waits, then
        redials, the other servers first."""
        if self._phase is not _Phase.RUNNING:
            return  # stopService takes it from here
        self.last_error = reason
        self._rotation.lost(server)
        self.log.info(
            "tunnel to the server at {server} lost: {why}", server=str(server), why=reason
        )
        self._set_state(ClientState.DISCONNECTED, reason)

    def _attempt_failed(self, failure: Failure) -> Failure:
        """A dial or handshake failed (passed on: ClientService counts it)."""
        if self._phase is _Phase.RUNNING:  # not a stop cancelling it
            self.last_error = failure.value
            self.log.info(
                "connecting to the tunnel server at {server} failed: {why}",
                server=str(self.current_server),
                why=failure.getErrorMessage(),
            )
        return failure

    def _failures_in_a_row(self, failures: int) -> int:
        """ClientService's count of failed attempts (since the last ready link),
        plus those before that link if it lived less than ``min_uptime``: a
        link that dies young is one more failure, not a fresh start."""
        if self._link_up is not None:  # its loss is what ClientService asks about
            since, before = self._link_up
            self._link_up = None
            lived = self.clock.seconds() - since
            self._carried = before if lived < self.min_uptime else 0
        self._failures = self._carried + failures
        return self._failures

    def _retry_delay(self, failures: int) -> float:
        """ClientService's retryPolicy, from ours: ``failures`` counts the
        attempts failed in a row (1 for the first retry), see
        ``_failures_in_a_row``.

        ClientService always retries, and cannot be stopped from inside its
        policy (it is mid-transition); so when ours gives up, ClientService is
        stopped on the next turn, before the delay returned here runs out.
        """
        failures = self._failures_in_a_row(failures)
        delay = self.retry(failures)
        if delay is not None:
            return delay
        if self._phase is _Phase.RUNNING:
            self.log.warn("giving up reconnecting after {n} attempts", n=failures)
            self._give_up_call = self.clock.callLater(0, self._give_up)
        return _NEVER_WAITED_FOR

    def _give_up(self) -> None:
        self._give_up_call = None
        self._phase = _Phase.GAVE_UP
        self._set_state(ClientState.CLOSED, self.last_error)
        self._loop.stopService()  # fails the when_ready() waiters: see _not_ready

    def _not_ready(self, failure: Failure) -> Failure:
        if self._phase is _Phase.GAVE_UP and failure.check(CancelledError):
            return Failure(self.last_error or CancelledError("the retry policy gave up"))
        return failure

    def _drain(self, protocol: TunnelClientProtocol) -> Deferred:
        """GoAway, refuse new tunnels, close once idle or after stop_timeout;
        fires when the connection is gone."""
        protocol.draining = True
        session = protocol.session
        session.go_away()
        timer = self.clock.callLater(self.stop_timeout, session.close)
        session.when_idle(1).addCallback(lambda _: session.close())  # the control stream stays
        return protocol.when_lost().addCallback(lambda _: cancel(timer))

    def _stop_done(self, _: object) -> None:
        self._phase = _Phase.STOPPED
        if self.state != ClientState.CLOSED:
            self._set_state(ClientState.CLOSED)
        self._stopped.fire(None)

    def _set_state(self, state: ClientState, error: BaseException | None = None) -> None:
        previous, self.state = self.state, state
        self._observers.notify(StateChange(self.identifier, previous, state, error))
