"""The control stream: handshake, then JSON control messages.

The client opens the first stream and writes ``controlHandshake`` in one
write (one Data frame); the server answers ``controlOk``; from then on the
server sends control messages and the client decodes them.  Each side
collects exactly the bytes it expects (Go relies on a single Read) and gives
up after a timeout (Go has none).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..observe import OneShot
from ..timers import cancel
from .wire import (
    HANDSHAKE_REQUEST,
    HANDSHAKE_RESPONSE,
    ControlMessage,
    ControlMessageError,
    MessageDecoder,
)


class HandshakeError(Exception):
    """The control handshake failed (wrong bytes, timeout, or the stream ended)."""


class ControlProtocol(Protocol):
    """One end of the control stream.

    :param is_client: the client writes the handshake and receives messages;
        the server answers it and may send messages.
    :param on_message: called with each ControlMessage received.
    :param timeout: seconds allowed for the handshake.

    ``when_ready()`` fires once the handshake is done and fails if it is not;
    ``when_lost()`` fires with the reason when the stream ends.  Bad input
    (wrong handshake, undecodable message) aborts the stream.
    """

    log = Logger()

    # one per tunnel, most of them idle (``transport`` and ``connected`` are
    # BaseProtocol's)
    __slots__ = (
        "transport",
        "connected",
        "is_client",
        "clock",
        "on_message",
        "timeout",
        "ready",
        "_expect",
        "_buf",
        "_decoder",
        "_timer",
        "_ready",
        "_lost",
        "_lost_reason",
        "_error",
    )

    def __init__(
        self,
        is_client: bool,
        clock: IReactorTime,
        on_message: Callable[[ControlMessage], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.transport = None
        self.connected = 0
        self.is_client = is_client
        self.clock = clock
        self.on_message = on_message
        self.timeout = timeout
        self.ready = False
        self._expect = HANDSHAKE_RESPONSE if is_client else HANDSHAKE_REQUEST
        self._buf = b""
        #: made with the first message (the server side never receives any)
        self._decoder: MessageDecoder | None = None
        self._timer = None
        self._ready = OneShot()
        self._lost = OneShot()
        self._lost_reason: Failure | None = None
        self._error: Exception | None = None

    def when_ready(self) -> Deferred:
        """Fires with this protocol once the handshake is done; fails with
        HandshakeError if the stream ends first."""
        return self._ready.when()

    def when_lost(self) -> Deferred:
        """Fires with the exception that ended the stream; never errbacks."""
        return self._lost.when()

    def send(self, message: ControlMessage) -> None:
        if not self.ready or self.transport is None:
            raise HandshakeError("the control stream is not ready")
        self.transport.write(message.encode())

    # -- Protocol ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.timeout, self._timed_out)
        if self.is_client:
            self.transport.write(HANDSHAKE_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        if not self.ready:
            self._buf += data
            need = len(self._expect)
            if len(self._buf) < need:
                if not self._expect.startswith(self._buf):
                    self._fail(HandshakeError(f"bad control handshake {self._buf!r:.40}"))
                return
            got, data = self._buf[:need], self._buf[need:]
            self._buf = b""
            if got != self._expect:
                self._fail(HandshakeError(f"bad control handshake {got!r:.40}"))
                return
            self._cancel_timer()
            if not self.is_client:
                self.transport.write(HANDSHAKE_RESPONSE)
            self.ready = True
            self._ready.fire(self)
            if not data or self.transport is None:
                return
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = MessageDecoder()
        try:
            messages = decoder.feed(data)
        except ControlMessageError as e:
            self._fail(e)
            return
        for message in messages:
            if self.on_message is not None and self._error is None:
                self.on_message(message)
        if decoder.error is not None:
            self._fail(decoder.error)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_timer()
        self._lost_reason = reason
        if not self.ready:
            self._ready.fail(HandshakeError(self._describe_failure()))
        self._lost.fire(reason.value)

    # -- internals -----------------------------------------------------------

    def _describe_failure(self) -> str:
        if self._error is not None:
            return str(self._error)
        if self._lost_reason is not None:
            return f"control stream closed: {self._lost_reason.getErrorMessage()}"
        return "control handshake failed"

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(HandshakeError("timeout getting session"))

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
            self.log.warn("control stream failed: {error}", error=error)
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        cancel(self._timer)
        self._timer = None
