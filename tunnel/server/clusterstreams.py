"""One request of the cluster link, on one yamux stream: both of its ends.

``Answer`` is the answering node's protocol for a stream a peer opened: it
reads the 36-byte REQUEST (within ``request_timeout``), asks its
``LocalTunnels``, replies with one status byte and, for an OPEN that
succeeded, splices the stream to the client's tunnel stream
(``tunnel.splice``).  ``Exchange`` is the opening node's protocol: it sends
the REQUEST, reads the status byte and, on OK, lets go of the stream
(``YamuxStream.detach``) with whatever followed that byte, for the forwarder
to ``attach`` its own protocol.  The byte formats are in ``clusterwire``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from ..logs import RateLimitedLog
from ..splice import SpliceProtocol
from ..timers import cancel
from ..yamux import YamuxStream
from .clusterwire import REQUEST_SIZE, BadRequest, Op, Request, Status, parse_request, parse_status
from .errors import NoClientSession, TooManyPendingTunnels, TunnelTimeout


class NodeUnreachable(NoClientSession):
    """The node holding the client cannot be reached (dial failed, handshake
    refused, link lost, node shutting down): to the public, no client session."""

    def __init__(self, why: str = "the node is unreachable") -> None:
        Exception.__init__(self, why)


class LocalTunnels(TypingProtocol):
    """What a node offers its peers (``TunnelServer`` implements it)."""

    def serve_remote(self, key: TunnelKey, protocol: int, port: int) -> Deferred:
        """A Deferred firing with a fresh, unattached tunnel ``YamuxStream`` to
        the client of ``key``, or failing with NoClientSession, TunnelTimeout
        or TooManyPendingTunnels.  Cancelling it withdraws the request."""
        ...

    def probe_local(self, key: TunnelKey) -> Deferred:
        """A Deferred[bool]: True if this node's client for ``key`` is alive."""
        ...


class AnswerContext(TypingProtocol):
    """What an ``Answer`` needs of its node (``ClusterLinks`` provides it)."""

    local: LocalTunnels
    clock: Any
    request_timeout: float
    limited_log: RateLimitedLog

    @property
    def accepting(self) -> bool:
        """False once the node is shutting down (requests get SHUTTING_DOWN)."""
        ...


STATUS_ERRORS: dict[Status, Callable[[], Exception]] = {
    Status.NO_CLIENT: NoClientSession,
    Status.TIMEOUT: TunnelTimeout,
    Status.TOO_MANY_PENDING: TooManyPendingTunnels,
    Status.SHUTTING_DOWN: lambda: NodeUnreachable("the node is shutting down"),
    Status.BAD_REQUEST: lambda: NodeUnreachable("the node refused the request as malformed"),
}


class Answer(Protocol):
    """The answering side of one stream: read the REQUEST, serve it, reply."""

    def __init__(self, links: AnswerContext) -> None:
        self.links = links
        self._buf = b""
        self._timer: Any = None
        self._pending: Deferred | None = None
        self._replied = False
        self.lost = False

    def connectionMade(self) -> None:
        self._timer = self.links.clock.callLater(
            self.links.request_timeout, self._bad, "no request in time"
        )

    def dataReceived(self, data: bytes) -> None:
        if self._timer is None:  # the request is in: nothing may follow before the reply
            self._bad("data before the reply")
            return
        self._buf += data
        if len(self._buf) < REQUEST_SIZE:
            return
        cancel(self._timer)
        self._timer = None
        try:
            if len(self._buf) > REQUEST_SIZE:
                raise BadRequest("data before the reply")
            request = parse_request(self._buf)
        except BadRequest as e:
            self._bad(str(e))
            return
        if not self.links.accepting:
            self._reply(Status.SHUTTING_DOWN)
            return
        local = self.links.local
        if request.op is Op.OPEN:
            d = maybeDeferred(local.serve_remote, request.key, request.protocol, request.port)
            self._pending = d.addCallbacks(self._served, self._not_served)
        else:
            d = maybeDeferred(local.probe_local, request.key)
            self._pending = d.addCallbacks(
                lambda alive: self._reply(Status.ALIVE if alive else Status.GONE),
                lambda f: self._reply(Status.GONE),
            )

    def _served(self, tunnel: YamuxStream) -> None:
        self._pending = None
        if self.lost:
            tunnel.abortConnection()
            return
        cluster = self.transport
        cluster.write(bytes((Status.OK,)))
        self._replied = True
        cluster.detach()
        near, far = SpliceProtocol(), SpliceProtocol()
        cluster.attach(near)
        tunnel.attach(far)
        if not (cluster.connected and tunnel.connected):
            cluster.abortConnection()
            tunnel.abortConnection()
            return
        near.join(far)

    def _not_served(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) or self.lost:
            return
        if failure.check(TunnelTimeout):
            status = Status.TIMEOUT
        elif failure.check(TooManyPendingTunnels):
            status = Status.TOO_MANY_PENDING
        else:
            if not failure.check(NoClientSession):
                self.links.limited_log.warn(
                    "cluster-serve", "serving a peer's request failed: {why}", why=failure.value
                )
            status = Status.NO_CLIENT
        self._reply(status)

    def _reply(self, status: Status) -> None:
        self._pending = None
        if self.lost or self._replied:
            return
        self._replied = True
        self.transport.write(bytes((status,)))
        self.transport.loseConnection()

    def _bad(self, why: str) -> None:
        cancel(self._timer)
        self._timer = None
        if self._pending is not None:
            self._pending.cancel()
        if self.lost:
            return
        self.links.limited_log.info("cluster-request", "bad cluster request: {why}", why=why)
        if not self._replied:
            self._replied = True
            self.transport.write(bytes((Status.BAD_REQUEST,)))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        cancel(self._timer)
        self._timer = None
        if self._pending is not None:
            self._pending.cancel()


class Exchange(Protocol):
    """The opening side of one stream: send the REQUEST, read the status byte,
    then (OK) let go of the stream for whoever uses it next."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.reply: Deferred = Deferred(self._cancel)
        self._done = False

    def connectionMade(self) -> None:
        self.transport.write(self.request.encode())

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._done = True
        stream = self.transport
        try:
            status = parse_status(data[0], self.request.op)
        except BadRequest as e:
            stream.abortConnection()
            self.reply.errback(NodeUnreachable(f"bad reply from the node: {e}"))
            return
        if status is Status.OK:
            stream.detach(data[1:])
            self.reply.callback((status, stream))
            return
        stream.loseConnection()
        self.reply.callback((status, None))

    def _cancel(self, d: Deferred) -> None:
        self._done = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._done:
            self._done = True
            self.reply.errback(NoReply())


class NoReply(Exception):
    """The stream ended before the status byte."""
