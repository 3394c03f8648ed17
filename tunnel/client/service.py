"""The tunnel client as a twisted.application Service.

``TunnelClientService`` keeps one tunnel to the server up: each attempt runs
a ``TunnelClientProtocol``; lost connections are retried forever with
exponential backoff and jitter (a policy may give up); the states are
koding's ClientState values.  Stopping it drains: GoAway, open tunnels may
finish, then the connection closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import redact
from ..koding.states import ClientState, StateChange
from ..observe import Observers
from ..timers import cancel
from ..yamux import YamuxConfig
from .backoff import RetryPolicy, exponential_backoff
from .protocol import Forwarder, TunnelClientProtocol


class TunnelClientService(Service):
    """Keeps one tunnel to the server up, reconnecting with backoff.

    :param endpoint: how to reach the server (``clientFromString``).
    :param identifier: the secret that names this client to the server.
    :param forwarder: called with each tunnel stream and its control message.
    :param host: the Host header of the CONNECT request (Go sends the dialled
        ``ip:port``).
    :param retry: attempt number -> delay in seconds, or None to give up.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        identifier: str,
        forwarder: Forwarder,
        *,
        host: str = "tunnel",
        clock=None,
        retry: RetryPolicy | None = None,
        yamux_config: YamuxConfig | None = None,
        handshake_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if not identifier or any(c in identifier for c in "\r\n\0"):
            raise ValueError("the identifier must be non-empty and free of CR, LF and NUL")
        if clock is None:
            from twisted.internet import reactor as clock
        self.endpoint = endpoint
        self.identifier = identifier
        self.forwarder = forwarder
        self.host = host
        self.clock = clock
        self.retry = retry or exponential_backoff()
        self.yamux_config = yamux_config
        self.handshake_timeout = handshake_timeout
        self.stop_timeout = stop_timeout
        self.state = ClientState.UNKNOWN
        self.protocol: TunnelClientProtocol | None = None
        self.last_error: BaseException | None = None
        self._attempt = 0
        self._pending: Any = None
        self._retry_timer: Any = None
        self._observers = Observers()
        self._ready_waiters: list[Deferred] = []
        self._stopping = False

    # -- public API ------------------------------------------------------------

    def observe_states(self, callback: Callable[[StateChange], Any]) -> Callable[[], None]:
        return self._observers.add(callback)

    def when_ready(self) -> Deferred:
        """Fires with the connected protocol, at once if connected now."""
        if self.state == ClientState.CONNECTED and self.protocol is not None:
            return succeed(self.protocol)
        d: Deferred = Deferred()
        self._ready_waiters.append(d)
        return d

    # -- Service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._attempt = 0
        self._set_state(ClientState.STARTED)
        self._connect()

    def stopService(self) -> Deferred:
        """GoAway, let open tunnels finish (up to ``stop_timeout``), then close."""
        super().stopService()
        self._stopping = True
        cancel(self._retry_timer)
        self._retry_timer = None
        if self._pending is not None:
            self._pending.cancel()
        protocol = self.protocol
        done: Deferred
        if protocol is not None and protocol.session is not None and not protocol.session.closed:
            protocol.draining = True
            session = protocol.session
            session.go_away()
            closed = session.when_closed()
            timer = self.clock.callLater(self.stop_timeout, session.close)
            session.when_idle(1).addCallback(lambda _: session.close())
            closed.addCallback(lambda _: cancel(timer))
            done = closed
        elif (
            protocol is not None
            and protocol.transport is not None
            and not protocol.when_lost().called
        ):
            protocol.transport.abortConnection()  # an attempt still in its handshake
            done = protocol.when_lost()
        else:
            done = succeed(None)
        return done.addCallback(lambda _: self._set_state(ClientState.CLOSED))

    # -- internals -------------------------------------------------------------

    def _set_state(self, state: ClientState, error: BaseException | None = None) -> None:
        previous, self.state = self.state, state
        self._observers.notify(StateChange(self.identifier, previous, state, error))

    def _connect(self) -> None:
        self._retry_timer = None
        if self._stopping:
            return
        self._set_state(ClientState.CONNECTING, self.last_error)
        protocol = TunnelClientProtocol(
            self.identifier,
            self.host,
            self.forwarder,
            self.clock,
            self.yamux_config,
            self.handshake_timeout,
        )
        self.protocol = protocol
        self._pending = self.endpoint.connect(Factory.forProtocol(lambda: protocol))
        self._pending.addCallback(lambda _: protocol.when_ready())
        self._pending.addCallbacks(self._connected, self._attempt_failed)

    def _connected(self, protocol: TunnelClientProtocol) -> None:
        self._pending = None
        self._attempt = 0
        self.last_error = None
        self.log.info("tunnel to the server is up ({ident})", ident=redact(self.identifier))
        self._set_state(ClientState.CONNECTED)
        protocol.when_lost().addCallback(self._disconnected, protocol)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(protocol)

    def _disconnected(self, reason: BaseException, protocol: TunnelClientProtocol) -> None:
        if self._stopping or protocol is not self.protocol:
            return
        self.last_error = reason
        self.log.info("tunnel to the server lost: {why}", why=reason)
        self._set_state(ClientState.DISCONNECTED, reason)
        self._schedule_retry()

    def _attempt_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._stopping:
            return
        self.last_error = failure.value
        self.log.info(
            "connecting to the tunnel server failed: {why}", why=failure.getErrorMessage()
        )
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._attempt += 1
        delay = self.retry(self._attempt)
        if delay is None:
            self.log.warn("giving up reconnecting after {n} attempts", n=self._attempt)
            self._set_state(ClientState.CLOSED, self.last_error)
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.errback(Failure(self.last_error or ConnectionDone("gave up")))
            return
        self._retry_timer = self.clock.callLater(delay, self._connect)
