"""The tunnel client: dial the server, keep the tunnel up, serve its streams.

``TunnelClientService`` is a twisted.application Service.  Each connection
attempt runs ``TunnelClientProtocol``: it sends the koding CONNECT request,
reads the ``200 Connected to Tunnel`` reply (``\\n\\n`` or ``\\r\\n\\r\\n``), hands any
bytes after it to a yamux client session, opens the control stream and
does the handshake.  For every control message it opens a stream, in
message order, and gives it to the forwarder (``tunnel.local``).

Lost connections are retried forever with exponential backoff and jitter
(a policy may give up); the states are koding's ClientState values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__
from .backoff import RetryPolicy, exponential_backoff
from .control import ControlProtocol
from .observe import Observers
from .proto import CONNECTED_STATUS, CONTROL_PATH, IDENTIFIER_HEADER, ControlMessage
from .states import ClientState, StateChange
from .timers import cancel
from .vhost import redact
from .yamux import YamuxConfig, YamuxSession, YamuxStream

#: the longest reply head (or error body) we read from the server
MAX_REPLY = 16 * 1024

Forwarder = Callable[[YamuxStream, ControlMessage], None]


class TunnelServerError(Exception):
    """The server refused the tunnel (status line and body in the message)."""


class HandshakeTimeout(Exception):
    """The server did not complete the CONNECT or control handshake in time."""


def connect_request(host: str, identifier: str) -> bytes:
    """The CONNECT request head, laid out as Go's ``req.Write`` does."""
    return (
        f"CONNECT {CONTROL_PATH} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: tunnel/{__version__}\r\n"
        f"{IDENTIFIER_HEADER.decode()}: {identifier}\r\n\r\n"
    ).encode()


class TunnelClientProtocol(Protocol):
    """One connection to the server: CONNECT, then yamux and the control stream."""

    log = Logger()

    def __init__(
        self,
        identifier: str,
        host: str,
        forwarder: Forwarder,
        clock,
        yamux_config: YamuxConfig | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.identifier = identifier
        self.host = host
        self.forwarder = forwarder
        self.clock = clock
        self.yamux_config = yamux_config
        self.timeout = timeout
        self.session: YamuxSession | None = None
        self.control: ControlProtocol | None = None
        self._head = b""
        self._error: TunnelServerError | None = None
        self._timer: Any = None
        self._ready: Deferred = Deferred()
        self._lost: Deferred = Deferred()
        self.failure: BaseException | None = None
        #: set while the service stops: new tunnels are refused
        self.draining = False

    def when_ready(self) -> Deferred:
        """Fires when the control handshake is done; fails if this connection fails first."""
        return self._ready

    def when_lost(self) -> Deferred:
        """Fires with the reason (an exception) when the connection is gone."""
        return self._lost

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._timed_out)
        self.transport.write(connect_request(self.host, self.identifier))

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            self.session.dataReceived(data)
            return
        self._head += data
        if self._error is not None:
            self._error_body()
            return
        end = _head_end(self._head)
        if end is None:
            if len(self._head) > MAX_REPLY:
                self._fail(TunnelServerError("tunnel server reply head too long"))
            return
        head, rest = self._head[:end], self._head[end:]
        self._head = b""
        status_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        version, _, status = status_line.partition(b" ")
        if version.startswith(b"HTTP/1.") and status == CONNECTED_STATUS:
            self._start_session(rest)
            return
        self._error = TunnelServerError(status.decode("latin-1", "replace"))
        self._content_length = _content_length(head)
        self._head = rest
        self._error_body()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._cancel_timer()
        if self.session is not None:
            self.session.connectionLost(reason)
            reason = Failure(self.session.close_reason)  # e.g. KeepAliveTimeout
        error = self.failure or self._error or reason.value
        if self._error is not None and self.failure is None:
            error = self._error_with_body()
        if not self._ready.called:
            self._ready.errback(Failure(error))
        self._lost.callback(error)

    # -- internals -----------------------------------------------------------

    def _error_body(self) -> None:
        length = self._content_length
        if length is not None and len(self._head) >= min(length, MAX_REPLY):
            self.failure = self._error_with_body()
            self.transport.loseConnection()
        elif len(self._head) > MAX_REPLY:
            self.failure = self._error_with_body()
            self.transport.loseConnection()

    def _error_with_body(self) -> TunnelServerError:
        status = str(self._error)
        code = status.split(" ", 1)[0]
        body = self._head[:MAX_REPLY].decode("utf-8", "replace").strip()
        return TunnelServerError(f"tunnel server error: status={code}, body={body}")

    def _start_session(self, leftover: bytes) -> None:
        session = YamuxSession(True, clock=self.clock, config=self.yamux_config)
        self.session = session
        session.makeConnection(self.transport)
        stream = session.open_stream()
        self.control = ControlProtocol(True, self.clock, self._message, timeout=self.timeout)
        stream.attach(self.control)
        self.control.when_ready().addCallbacks(self._control_ready, self._control_failed)
        self.control.when_lost().addCallback(self._control_lost)
        if leftover:
            session.dataReceived(leftover)

    def _control_ready(self, control: ControlProtocol) -> None:
        self._cancel_timer()
        if not self._ready.called:
            self._ready.callback(self)

    def _control_failed(self, failure: Failure) -> None:
        self._fail(failure.value)

    def _control_lost(self, reason: BaseException) -> None:
        if self.session is not None and not self.session.closed:
            self.log.info("control stream lost: {why}", why=reason)
            self.session.close()

    def _message(self, message: ControlMessage) -> None:
        def opened(stream: YamuxStream) -> None:
            if self.draining:
                # shutting down: refuse at once (RST) rather than let it time out
                stream.abortConnection()
                return
            self.forwarder(stream, message)

        def refused(failure: Failure) -> None:
            self.log.info(
                "could not open a stream for {msg}: {why}",
                msg=message,
                why=failure.getErrorMessage(),
            )

        self.session.request_stream().addCallbacks(opened, refused)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(HandshakeTimeout("the tunnel server did not answer the handshake in time"))

    def _fail(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error
        self._cancel_timer()
        if self.session is not None:
            self.session.abort(error if isinstance(error, Exception) else None)
        elif self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        cancel(self._timer)
        self._timer = None


def _head_end(data: bytes) -> int | None:
    ends = [i + n for i, n in ((data.find(b"\r\n\r\n"), 4), (data.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else None


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


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
