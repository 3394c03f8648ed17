"""One server node of a cluster: tunnels held by other nodes, and who holds what.

A ``Cluster`` is the registry's ``OtherNodes`` (``registry.TunnelServer.
join_cluster``).  It joins two parts:

* ``presence.Presence``: which node holds which tunnel, as records in Redis
  that the holder refreshes (a node that dies stops refreshing them, so
  they expire);
* ``clusterlink.ClusterLinks``: one authenticated yamux connection per pair
  of nodes, on which a node asks another for a stream to a client it holds.

A public request (HTTP, WebSocket or TCP) for a tunnel whose client is not
connected here goes to a ``RemoteTunnel``: it looks the holder up (cached
briefly by ``Presence``), opens a stream to it over the link, and hands that
stream to the front end as if it were a stream to the client; the holder
splices it to one.  Streams that carried an HTTP request are kept between
requests here as they are for local clients (``pool.StreamPool``), which
on the holder's side is one stream of its client kept open.

Duplicates cluster-wide (``admit``): a control request is let in only if no
node holds the tunnel, or the node that holds it says (``probe``) its client
no longer answers; a live incumbent wins, as koding's rule says for one
server.  A pooled tunnel (the host rule ``pool``) is held by every node
with a client of it: a node serves its requests with its own clients when
it has a ready one (no hop; a load balancer in front spreads the requests
over the nodes, hence over their clients), else takes the other holders in
turn; a holder that lost its client passes the request on to the next.
A holder that cannot be reached keeps its record until the record expires:
two nodes never both serve one tunnel that is not pooled.

While Redis cannot be asked, requests go to the holder last looked up
(the link tells if it no longer holds the tunnel), and a control request is
let in on this node's word alone (logged): nodes go on serving the clients
they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from ..logs import RateLimitedLog
from ..timers import cancel
from .clusterstreams import NodeUnreachable
from .errors import NoClientSession, TunnelTimeout
from .pool import OriginLeg, StreamPool
from .registry import TunnelServer
from .store import StoreError

#: holders of a pooled tunnel one request is offered to, at most
MAX_TRIES = 3
#: seconds a PROBE gets beyond the holder's own ping: the dial, the handshake
#: and the round trips
PROBE_ALLOWANCE = 5.0


@dataclass(frozen=True)
class ClusterStats:
    """What an operator sees of this node's place in the cluster."""

    #: this node's name (``--node-name``)
    node: str
    #: tunnels this node holds records of (its clients, a pool's counted once)
    tunnels_held: int
    #: public requests and TCP connections sent to other nodes since start
    forwarded: int
    #: its links to other nodes (``clusterlink.LinkInfo``)
    links: tuple[Any, ...]


class RemoteTunnel:
    """One request's way to a tunnel whose client another node holds (a
    ``registry.Tunnel``).  It takes the tunnel's holders in turn: the
    holder is chosen first, then a stream kept to that holder is reused, so
    the requests of a pooled tunnel alternate even over kept streams."""

    __slots__ = ("cluster", "key", "member")

    def __init__(self, cluster: Cluster, key: TunnelKey) -> None:
        self.cluster = cluster
        self.key = key
        #: the holder that serves (or is to serve) the request; None: not chosen yet
        self.member: Any = None

    def __repr__(self) -> str:
        return f"<RemoteTunnel {self.key} via {getattr(self.member, 'node', None)}>"

    def dispatched(self) -> None:
        """Counted once a holder takes it (a stream opened or reused): the
        client's own count is kept by the node that holds it."""

    def open_tunnel(self, protocol: int, port: int, timeout: float) -> Deferred:
        d = self.cluster.open_remote(self.key, protocol, port, timeout, prefer=self.member)

        def opened(result: tuple[Any, Any]) -> Any:
            self.member, stream = result
            self.cluster.count_forwarded()
            return stream

        return d.addCallback(opened)

    def reuse(self, port: int) -> OriginLeg | None:
        self.member = self.cluster.next_holder(self.key)
        if self.member is None:
            return None
        leg = self.cluster.reuse(self.key, port, self.member.node)
        if leg is not None:
            self.cluster.count_forwarded()
        return leg

    def keep(self, port: int, leg: OriginLeg) -> bool:
        if self.member is None:
            return False
        return self.cluster.keep(self.key, port, self.member.node, leg)


class Cluster:
    """This node's view of the others (see the module docstring).

    :param server: this node's registry; the cluster joins it at once.
    :param presence: this node's records of the tunnels it holds.
    :param links: its connections to the other nodes.
    :param probe_timeout: seconds another node gets to say whether its
        client of a tunnel is alive.
    """

    log = Logger()

    def __init__(
        self,
        server: TunnelServer,
        presence: Any,
        links: Any,
        *,
        probe_timeout: float | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.server = server
        self.presence = presence
        self.links = links
        self.clock = clock if clock is not None else server.clock
        if probe_timeout is None:
            # longer than the holder's own ping of its client, so that a client
            # that does not answer is reported GONE before the asker gives up
            probe_timeout = server.probe_timeout + PROBE_ALLOWANCE
        self.probe_timeout = probe_timeout
        self._rated = RateLimitedLog(self.log, clock=self.clock)
        #: (tunnel, local port, holder) -> streams kept between requests
        self._pools: dict[tuple[TunnelKey, int, str], StreamPool] = {}
        #: tunnel -> the next member to try, for tunnels several nodes hold
        self._turns: dict[TunnelKey, int] = {}
        #: tunnel -> (its holders when last looked up, when): the turn of the
        #: next request, and who serves while Redis cannot be asked (bounded
        #: by the registered tunnels: a request reaches here only for a host
        #: or port that names one)
        self._known: dict[TunnelKey, tuple[list[Any], float]] = {}
        #: tunnels let in while Redis could not be asked -> the next try at
        #: recording them (so the other nodes find them once Redis is back)
        self._unclaimed: dict[TunnelKey, Any] = {}
        self._stopping = False
        self._forwarded = 0
        server.join_cluster(self)

    # -- registry.OtherNodes -------------------------------------------------------

    def tunnel(self, key: TunnelKey) -> RemoteTunnel:
        return RemoteTunnel(self, key)

    def admit(self, key: TunnelKey, *, pooled: bool = False) -> Deferred[bool]:
        d = Deferred.fromCoroutine(self._admit(key, pooled))
        return d.addErrback(self._admit_failed, key, pooled)

    def released(self, key: TunnelKey) -> None:
        cancel(self._unclaimed.pop(key, None))
        self.presence.release(key).addErrback(
            lambda f: self._rated.info(
                "presence-release",
                "could not remove the record of {ident} from Redis: {why} (it expires on its own)",
                ident=key,
                why=f.getErrorMessage(),
            )
        )

    def lost(self, key: TunnelKey) -> None:
        """Another node recorded ``key`` as its own while this node held it
        (Redis lost the records and that node's client came first): the
        client here is closed, so one node serves the tunnel (it reconnects
        and is decided again)."""
        if self.server.disconnect(key):
            self.log.info("{ident} is held by another node: its client here is closed", ident=key)

    def count_forwarded(self) -> None:
        """A public request or TCP connection went to another node (a stream
        to its holder was opened or reused for it)."""
        self._forwarded += 1

    def stats(self) -> ClusterStats:
        return ClusterStats(
            node=self.presence.node,
            tunnels_held=self.presence.held(),
            forwarded=self._forwarded,
            links=tuple(self.links.links()),
        )

    # -- the tunnels of other nodes -----------------------------------------------

    def open_remote(
        self, key: TunnelKey, protocol: int, port: int, timeout: float, *, prefer: Any = None
    ) -> Deferred:
        """(the holder, a stream through it to its client's local ``port``):
        the ``prefer``red holder first if it still is one, else the holders
        in turn; fails with ``NoClientSession`` if no node holds ``key``."""
        return Deferred.fromCoroutine(self._open_remote(key, protocol, port, timeout, prefer))

    def next_holder(self, key: TunnelKey) -> Any:
        """The holder whose turn it is, from a lookup younger than the
        presence cache; None if there is none (then ``open_remote`` looks)."""
        known = self._known.get(key)
        if known is None or self.clock.seconds() - known[1] > self.presence.cache:
            return None
        members = known[0]
        turn = self._turns.get(key, 0)
        if len(members) > 1:
            self._turns[key] = turn + 1
        return members[turn % len(members)]

    def reuse(self, key: TunnelKey, port: int, node: str) -> OriginLeg | None:
        pool = self._pools.get((key, port, node))
        return pool.take() if pool is not None else None

    def keep(self, key: TunnelKey, port: int, node: str, leg: OriginLeg) -> bool:
        if (
            self._stopping
            or not self.server.keeping_streams()
            or leg.transport.session.remote_go_away is not None  # the link drains
        ):
            return False
        pool = self._pools.get((key, port, node))
        if pool is None:
            # pools left empty (their streams used, expired or lost) go now:
            # the map holds no more than the pools that keep streams
            for empty in [where for where, p in self._pools.items() if not len(p)]:
                del self._pools[empty]
            pool = self._pools[key, port, node] = self.server.stream_pool()
        return pool.keep(leg)

    # -- life ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self.presence.start()

    def stop(self) -> Deferred[None]:
        """Keep no stream, remove this node's records, close the links."""
        self._stopping = True
        for timer in self._unclaimed.values():
            cancel(timer)
        self._unclaimed.clear()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

        def links(_: object) -> Deferred:
            return self.links.close()

        d = self.presence.stop().addErrback(lambda f: None).addCallback(links)
        return d.addCallback(lambda _: None)

    # -- underneath -------------------------------------------------------------------

    async def _admit(self, key: TunnelKey, pooled: bool) -> bool:
        presence = self.presence
        holder = await presence.claim(key, pooled=pooled)
        if holder is None:
            return False
        try:
            alive = await self.links.probe(holder.node, holder.address, key, self.probe_timeout)
        except Exception as e:
            # unreachable: its record expires unless its node is alive to refresh it
            self._rated.info(
                "cluster-probe",
                "node {node} holds {ident} and could not be asked about it: {why}",
                node=holder.node,
                ident=key,
                why=str(e) or type(e).__name__,
            )
            return True
        if alive:
            return True
        if await presence.take_over(key, holder.node):
            return False
        # its node let go of it meanwhile (the dead client's session ended there)
        return await presence.claim(key) is not None

    def _admit_failed(self, failure: Failure, key: TunnelKey, pooled: bool) -> bool:
        """Redis cannot be asked: the client is taken here, as one server
        would, and is not known to the other nodes until it reconnects."""
        if not failure.check(StoreError):
            self.log.failure("deciding the control request of {ident} failed", failure, ident=key)
            self._claim_later(key, pooled)
            return False
        self._rated.warn(
            "presence-claim",
            "{ident} is taken here without a cluster-wide check: {why}",
            ident=key,
            why=failure.getErrorMessage(),
        )
        self._claim_later(key, pooled)
        return False

    def _claim_later(self, key: TunnelKey, pooled: bool) -> None:
        if key not in self._unclaimed and not self._stopping:
            self._unclaimed[key] = self.clock.callLater(
                self.presence.refresh, self._claim_again, key, pooled
            )

    def _claim_again(self, key: TunnelKey, pooled: bool) -> None:
        del self._unclaimed[key]

        def answered(holder: Any) -> None:
            if holder is not None:
                self.lost(key)

        def failed(failure: Failure) -> None:
            if failure.check(StoreError):
                self._claim_later(key, pooled)
            else:
                self.log.failure("recording {ident} failed", failure, ident=key)

        self.presence.claim(key, pooled=pooled).addCallbacks(answered, failed)

    async def _open_remote(
        self, key: TunnelKey, protocol: int, port: int, timeout: float, prefer: Any
    ) -> tuple[Any, Any]:
        try:
            members = await self.presence.locate(key)
        except StoreError as e:
            known = self._known.get(key)
            members = known[0] if known is not None else []
            self._rated.info(
                "presence-locate",
                "cannot look {ident} up in Redis ({why}); {n} holder(s) known from before",
                ident=key,
                why=str(e),
                n=len(members),
            )
        else:
            if members:
                self._known[key] = (list(members), self.clock.seconds())
            else:
                self._known.pop(key, None)
        if not members:
            raise NoClientSession()
        if prefer in members:
            turn = members.index(prefer)
        else:
            turn = self._turns.get(key, 0)
            if len(members) > 1:
                self._turns[key] = turn + 1
        if len(members) == 1:
            self._turns.pop(key, None)
        # a holder that no longer has the client (it left since the lookup,
        # or its node died) passes the request to the next, a few at most,
        # all within the one request's ``timeout``
        deadline = self.clock.seconds() + timeout
        tries = min(len(members), MAX_TRIES)
        for attempt in range(tries):
            member = members[(turn + attempt) % len(members)]
            left = deadline - self.clock.seconds()
            if left <= 0:
                raise TunnelTimeout()
            try:
                stream = await self.links.open_tunnel(
                    member.node, member.address, key, protocol, port, left
                )
            except NodeUnreachable:
                # its node may still hold the client (while Redis cannot say,
                # it stays the one known): ask Redis again next time
                self.presence.forget(key)
                if attempt == tries - 1:
                    raise
            except NoClientSession:
                self.presence.forget(key)
                self._known.pop(key, None)
                if attempt == tries - 1:
                    raise
            else:
                return member, stream
        raise AssertionError("unreachable")


class ClusterService(Service):
    """Starts the cluster's presence with the server, and at its stop
    removes this node's records and closes its links."""

    def __init__(self, cluster: Cluster, *, on_stop: Callable[[], Any] | None = None) -> None:
        self.cluster = cluster
        self._on_stop = on_stop

    def startService(self) -> None:
        super().startService()
        self.cluster.start()

    def stopService(self) -> Deferred:
        super().stopService()
        steps = [self.cluster.stop()]
        if self._on_stop is not None:
            steps.append(self._on_stop())
        return gatherResults(steps).addCallback(lambda _: None)
