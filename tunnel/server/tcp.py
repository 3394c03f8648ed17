"""TCP tunnels: public TCP connections routed to clients by local port or IP.

Like Go's ``Server.AddAddr``: each connection accepted on a listening port
the server was given is looked up by the connection's local IP (if that IP
is mapped) or else by its local port, and spliced to a TCP stream of that
tunnel's client, which connects it to its ``--tcp-local`` endpoint.
Mappings can change at run time; connections already open are unaffected.
Each connection counts as one request of its client (``TunnelStats``).
A connection on an unmapped port or whose tunnel fails is reported to the
server's ``events``.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, fail
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.wire import TransportProtocol
from ..logs import RateLimitedLog
from ..splice import SpliceProtocol
from .errors import NoClientSession
from .events import ErrorKind, report


class PublicTCP(SpliceProtocol):
    """A public TCP connection, waiting for its tunnel stream, then spliced."""

    log = Logger()

    def __init__(self, server, public_log: RateLimitedLog | None = None) -> None:
        super().__init__()
        self.server = server
        #: one line per public connection would let whoever connects fill the log
        self.public_log = (
            public_log if public_log is not None else RateLimitedLog(self.log, clock=server.clock)
        )
        self._pending = None
        self.key = None

    def connectionMade(self) -> None:
        super().connectionMade()
        host = self.transport.getHost()
        key = self.server.addrs.lookup(host.host, host.port)
        if key is None:
            report(self.server.events, ErrorKind.TCP_UNMAPPED)
            self.public_log.info(
                "tcp-unmapped", "no TCP tunnel for {host}:{port}", host=host.host, port=host.port
            )
            self.transport.abortConnection()
            return
        self.key = key
        tunnel = self.server.route(key)
        if tunnel is None:
            self._pending = fail(NoClientSession())
        else:
            tunnel.dispatched()
            # hold the public side back until the stream exists
            self.transport.pauseProducing()
            self._pending = tunnel.open_tunnel(
                TransportProtocol.TCP, host.port, self.server.tunnel_timeout
            )
        self._pending.addCallbacks(self._opened, self._failed)

    def _opened(self, stream) -> None:
        self._pending = None
        if self.lost:
            stream.abortConnection()
            return
        origin = SpliceProtocol()
        stream.attach(origin)
        if not stream.connected:
            report(self.server.events, ErrorKind.TCP_FAILED)
            self.transport.abortConnection()
            return
        self.join(origin)
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if not failure.check(CancelledError):  # cancelled: the public side left first
            report(self.server.events, ErrorKind.TCP_FAILED)
        self.public_log.info(
            "tcp-failed",
            "TCP tunnel to {ident} failed: {why}",
            ident=self.key,
            why=failure.getErrorMessage(),
        )
        if not self.lost:
            self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if reason is None:
            super().connectionLost()
        else:
            super().connectionLost(reason)


class TCPTunnelFactory(Factory):
    """Listen with this on any endpoint to carry TCP tunnels for ``server``."""

    def __init__(self, server) -> None:
        self.server = server
        #: what public connections make us log, rate limited (shared by them)
        self.public_log = RateLimitedLog(PublicTCP.log, clock=server.clock)

    def buildProtocol(self, addr) -> PublicTCP:
        return PublicTCP(self.server, self.public_log)
