"""One connection of the tunnel client to the server.

``TunnelClientProtocol`` sends the koding CONNECT request,
reads the ``200 Connected to Tunnel`` reply (``\\n\\n`` or ``\\r\\n\\r\\n``), hands any
bytes after it to a yamux client session, opens the control stream and
does the handshake.  For every control message it opens a stream, in
message order, and gives it to the forwarder (``tunnel.local``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._version import __version__
from ..heads import HeadScanner, HeadTooLarge
from ..koding.control import ControlProtocol
from ..koding.identifiers import redact
from ..koding.wire import CONNECTED_STATUS, CONTROL_PATH, IDENTIFIER_HEADER, ControlMessage
from ..observe import OneShot
from ..timers import cancel
from ..yamux import LARGE_WINDOWS, YamuxConfig, YamuxSession, YamuxStream

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

    #: reads the reply head (``\n\n`` or ``\r\n\r\n``) in linear time; made on first use
    _reply: HeadScanner | None = None

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
        self._ready = OneShot()
        self._lost = OneShot()
        self.failure: BaseException | None = None
        #: set while the service stops: new tunnels are refused
        self.draining = False

    def when_ready(self) -> Deferred:
        """Fires with this protocol when the control handshake is done; fails if
        this connection fails first.  Each call gets a Deferred of its own."""
        return self._ready.when()

    def when_lost(self) -> Deferred:
        """Fires with the reason (an exception) when the connection is gone;
        never errbacks.  Each call gets a Deferred of its own."""
        return self._lost.when()

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._timed_out)
        self.transport.write(connect_request(self.host, self.identifier))

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            self.session.dataReceived(data)
            return
        if self._error is not None:
            self._error_body(data)
            return
        if self._reply is None:
            self._reply = HeadScanner(MAX_REPLY, bare_lf=True)
        try:
            found = self._reply.feed(data)
        except HeadTooLarge:
            self._fail(TunnelServerError("tunnel server reply head too long"))
            return
        if found is None:
            return
        head, end = found
        rest = data[end:]
        status_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        version, _, status = status_line.partition(b" ")
        if version.startswith(b"HTTP/1.") and status == CONNECTED_STATUS:
            self._start_session(rest)
            return
        self._error = TunnelServerError(status.decode("latin-1", "replace"))
        self._content_length = _content_length(head)
        self._head = bytearray()
        self._error_body(rest)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._cancel_timer()
        if self.session is not None:
            self.session.connectionLost(reason)
            reason = Failure(self.session.close_reason)  # e.g. KeepAliveTimeout
        error = self.failure or self._error or reason.value
        if self._error is not None and self.failure is None:
            error = self._error_with_body()
        self._ready.fail(error)  # nothing if the handshake was done
        self._lost.fire(error)

    # -- internals -----------------------------------------------------------

    def _error_body(self, data: bytes) -> None:
        """Collects a refusal's body: up to its Content-Length, and at most MAX_REPLY.

        Bytes past the Content-Length are not part of it, however they arrive.
        """
        length = self._content_length
        keep = MAX_REPLY + 1 if length is None else min(length, MAX_REPLY + 1)
        self._head += data[: max(0, keep - len(self._head))]
        if length is not None and len(self._head) >= min(length, MAX_REPLY):
            self.failure = self._error_with_body()
            self.transport.loseConnection()
        elif len(self._head) > MAX_REPLY:
            self.failure = self._error_with_body()
            self.transport.loseConnection()

    def _error_with_body(self) -> TunnelServerError:
        """The refusal as an error that may be logged: the server's text (Go's
        names the identifier) shows our identifier as its fingerprint only."""
        status = str(self._error)
        code = status.split(" ", 1)[0]
        body = self._head[:MAX_REPLY].decode("utf-8", "replace").strip()
        body = body.replace(self.identifier, redact(self.identifier))
        return TunnelServerError(f"tunnel server error: status={code}, body={body}")

    def _start_session(self, leftover: bytes) -> None:
        session = YamuxSession(True, clock=self.clock, config=self.yamux_config or LARGE_WINDOWS)
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
        self._ready.fire(self)

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


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None
