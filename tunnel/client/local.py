"""The client's side of each tunnel: connect the stream to a local server.

The target comes from the client's configuration, never from the public
request alone: a control message carries the port of the public Host header,
and that port selects a configured endpoint (``--local-port PORT=ENDPOINT``)
or falls back to the default ``--local`` endpoint.  Dialling
``127.0.0.1:<port>`` for any port, as Go does, is an explicit opt-in
(``allow_any_port``), because whoever sends the public request chooses the
Host header.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.wire import NO_LOCAL_SERVER, ControlMessage, TransportProtocol
from ..logs import RateLimitedLog
from ..splice import SpliceProtocol
from ..yamux import YamuxStream
from ..yamux.sizing import size_transport

#: the local connection carries a response's bulk to the tunnel: it is read
#: in pieces as large as the tunnel's frames (``LARGE_WINDOWS``), and sends
#: (a request body) go out in pieces of up to twice that
LOCAL_READ_SIZE = 256 * 1024
LOCAL_SEND_SIZE = 512 * 1024


class LocalTargets:
    """Chooses the local endpoint for a control message."""

    def __init__(
        self,
        reactor,
        default: str | None = "tcp:127.0.0.1:80",
        ports: Mapping[int, str] | None = None,
        tcp_ports: Mapping[int, str] | None = None,
        allow_any_port: bool = False,
        connect_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.default = default
        self.ports = dict(ports or {})
        self.tcp_ports = dict(tcp_ports or {})
        self.allow_any_port = allow_any_port
        self.connect_timeout = connect_timeout
        self._endpoints: dict[str, IStreamClientEndpoint] = {}

    def description(self, message: ControlMessage) -> str | None:
        """The endpoint string for ``message``, or None if nothing is configured."""
        port = message.local_port
        if message.transport_protocol == TransportProtocol.TCP:
            if port in self.tcp_ports:
                return self.tcp_ports[port]
            if self.allow_any_port and port:
                return self._any(port)
            return None
        if port == 0:
            port = 80
        if port in self.ports:
            return self.ports[port]
        if self.allow_any_port:
            return self._any(port)
        return self.default

    def _any(self, port: int) -> str:
        return f"tcp:127.0.0.1:{port}:timeout={self.connect_timeout:g}"

    def endpoint_for(self, message: ControlMessage) -> IStreamClientEndpoint | None:
        description = self.description(message)
        if description is None:
            return None
        endpoint = self._endpoints.get(description)
        if endpoint is None:
            if len(self._endpoints) >= 1024:  # --allow-any-local-port: bounded cache
                self._endpoints.clear()
            endpoint = self._endpoints[description] = clientFromString(self.reactor, description)
        return endpoint


class _QuietFactory(Factory):
    """One protocol, and no "Starting factory" log lines for every tunnel."""

    noisy = False

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


class LocalForwarder:
    """Splices each tunnel stream to the local endpoint chosen for it.

    While the local connection is being made the stream has no protocol, so
    what the server sends waits in the stream (within its window).  If the
    local server cannot be reached an HTTP or WebSocket stream gets Go's
    exact ``503 no local server`` response; a TCP stream is just closed.
    """

    log = Logger()

    def __init__(
        self,
        endpoint_for: Callable[[ControlMessage], IStreamClientEndpoint | None],
        *,
        clock: IReactorTime | None = None,
        read_size: int | None = LOCAL_READ_SIZE,
        send_size: int | None = LOCAL_SEND_SIZE,
    ):
        """:param read_size: bytes read from a local TCP connection at once
        (None: Twisted's 64 KiB); ``send_size``: the most sent to it at once
        (None: Twisted's 128 KiB); see ``tunnel.yamux.sizing``."""
        self.endpoint_for = endpoint_for
        self.read_size = read_size
        self.send_size = send_size
        #: one line per public request while the local server is down would let
        #: whoever sends requests fill the client's log
        self.public_log = RateLimitedLog(self.log, clock=clock)

    def __call__(self, stream: YamuxStream, message: ControlMessage) -> None:
        try:
            endpoint = self.endpoint_for(message)
        except Exception:
            self.log.failure("no endpoint for {msg}", msg=message)
            endpoint = None
        if endpoint is None:
            self._unreachable(stream, message, None)
            return
        local = SpliceProtocol()
        d = endpoint.connect(_QuietFactory(local))

        def connected(_: object) -> None:
            size_transport(local.transport, self.read_size, self.send_size)
            remote = SpliceProtocol()
            stream.attach(remote)
            if stream.connected:
                remote.join(local)
            else:
                local.transport.abortConnection()

        def failed(failure: Failure) -> None:
            self._unreachable(stream, message, failure)

        d.addCallbacks(connected, failed)

    def _unreachable(self, stream: YamuxStream, message: ControlMessage, failure) -> None:
        self.public_log.info(
            "local-unreachable",
            "local server for port {port} unreachable: {why}",
            port=message.local_port,
            why=connect_error(failure) if failure is not None else "no endpoint configured",
        )
        if message.transport_protocol == TransportProtocol.TCP:
            stream.loseConnection()
            return
        stream.write(NO_LOCAL_SERVER)
        stream.loseConnection()


def connect_error(failure: Failure) -> str:
    """Why a connect failed, in one line: Twisted's ConnectError may carry a
    nested Failure, whose repr (with a "Traceback" in it) would reach the log."""
    error = failure.value
    nested = [a for a in (getattr(error, "osError", None), *error.args) if isinstance(a, Failure)]
    if nested:
        return f"{getattr(error, 'MESSAGE', type(error).__name__)}: {nested[0].getErrorMessage()}"
    return failure.getErrorMessage()
