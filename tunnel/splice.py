"""Join two connections byte for byte, with backpressure and half-close.

Like ``twisted.protocols.portforward`` each side is registered as the other
transport's producer, so a slow reader on one side pauses reading on the
other.  Unlike it, an EOF on one side becomes a half-close (FIN) on the
other, and the pair closes once both directions are finished; a connection
that fails aborts its partner (a yamux stream is then reset).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .writethrough import write_through


def _half_close(transport) -> None:
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is not None:
        lose_write()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class SpliceProtocol(Protocol):
    """One side of a splice; ``peer`` is the protocol on the other connection."""

    def __init__(self) -> None:
        self.peer: SpliceProtocol | None = None
        self.read_done = False
        self.write_done = False
        self.lost = False
        self._early: list[bytes] = []
        self._early_eof = False

    def connectionMade(self) -> None:
        # relayed bytes should leave at once, as the Go peer does (no Nagle)
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # and in the reactor turn that relayed them
        write_through(self.transport)

    def join(self, peer: SpliceProtocol) -> None:
        """Pair with ``peer`` once both are connected."""
        self.peer, peer.peer = peer, self
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        for side in (self, peer):
            side._flush_early()

    def _flush_early(self) -> None:
        early, self._early = self._early, []
        for data in early:
            self.peer.transport.write(data)
        if self._early_eof:
            self.readConnectionLost()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
        else:
            self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.peer is None:
            self._early_eof = True
            return
        self.read_done = True
        if not self.peer.lost:
            # we will produce nothing more for the peer; a TCP transport only
            # half-closes once no paused producer is registered with it
            self.peer.transport.unregisterProducer()
            _half_close(self.peer.transport)
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_done = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.read_done and self.write_done and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        peer = self.peer
        if peer is None or peer.lost:
            return
        if reason.check(ConnectionDone) and self.read_done:
            # our side ended cleanly after its EOF was passed on: the peer
            # finishes its own direction and closes by itself
            if self.write_done:
                return
            _half_close(peer.transport)
            return
        peer.transport.abortConnection()
