"""The tunnel server: connected clients, their control streams, and tunnels.

``TunnelServer`` keeps one ``ClientConnection`` per tunnel, or several when
the tunnel is pooled (a host naming its key has the ``pool`` rule): then
requests are spread over the ready ones (``PooledTunnel``).  A tunnel is
known by its ``TunnelKey`` (the identifier's SHA-256): the server keeps,
indexes and logs keys, never identifiers.  Every method that names a tunnel
takes ``str | TunnelKey``; a ``str`` is an identifier, hashed at once by
``TunnelKey.coerce`` (so code written for identifiers keeps working).
Each connection counts what it carries (``ClientConnection.stats``).

To reach a client's local server the server sends a control message and
waits for the stream the client opens in answer.  Clients open streams in message order, so each
connection keeps a FIFO of waiters: the n-th stream belongs to the n-th
message.  A waiter that timed out or was cancelled stays in the FIFO, and the
stream that arrives for it is reset; an unsolicited stream is reset too.

The server never opens streams (a Go client would never accept them).
Streams that carried an HTTP request may be kept for the next one to the
same local port (a ``Tunnel``'s ``reuse`` / ``keep``, see ``pool``); a
graceful stop closes them first.

The front ends reach a tunnel through ``TunnelServer.route``, a ``Tunnel``:
the ``ClientConnection`` of a client connected here, or, when the server is
one node of a cluster (``join_cluster``), the way to the node that holds
the client (``OtherNodes``, built by ``cluster``).  Such a node serves the
requests other nodes forward with ``serve_remote``, and answers their
duplicate checks with ``probe_local``.

Pools: while any host routed to a key has ``pool`` (``VirtualHosts.pooled``),
a control request for it is never a duplicate; each client is one more
member.  A request goes to the ready member with the fewest outstanding
streams, ties taken in turn (so at rest requests alternate), and keeps that
member for its kept streams; if the member's session ends before it gives
the request a stream, the request is tried once on another member.  The
tunnel is CLOSED, and released cluster-wide, when its last member leaves.
A key that stops being pooled keeps the members it has; new clients follow
the duplicate rule again (any live member makes the newcomer a duplicate).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.control import ControlProtocol
from ..koding.identifiers import TunnelKey
from ..koding.states import ClientState, StateChange
from ..koding.wire import ControlMessage, TransportProtocol
from ..observe import Observers, OneShot
from ..timers import cancel
from ..yamux import LARGE_WINDOWS, YamuxConfig, YamuxSession, YamuxStream
from ..yamux.errors import PingTimeout, SessionClosed, TooManyStreams
from .errors import NoClientSession, TooManyPendingTunnels, TunnelTimeout
from .events import ServerEvents
from .pool import OriginLeg, StreamPool
from .tcp import TCPTunnelFactory
from .vhosts import Route, VirtualAddrs, VirtualHosts


class _Waiter:
    __slots__ = ("deferred", "timer", "cancelled")

    def __init__(self) -> None:
        self.deferred: Deferred | None = None
        self.timer: Any = None
        self.cancelled = False


class Tunnel(Protocol):
    """What carries public requests and connections to one tunnel's client:
    a ``ClientConnection`` here, or the way to another node that holds it."""

    def dispatched(self) -> None:
        """A public HTTP request or TCP connection goes this tunnel's way."""

    def open_tunnel(self, protocol: int, port: int, timeout: float) -> Deferred:
        """A new stream to the client's local ``port`` (a ``YamuxStream`` to
        ``attach``); fails with the errors of ``errors``."""

    def reuse(self, port: int) -> OriginLeg | None:
        """A stream to ``port`` kept from an earlier HTTP request, or None."""

    def keep(self, port: int, leg: OriginLeg) -> bool:
        """Keep ``leg`` for the next request to ``port``; False: close it."""


class OtherNodes(Protocol):
    """The rest of a cluster, as one node's registry uses it (``cluster.Cluster``)."""

    def tunnel(self, key: TunnelKey) -> Tunnel:
        """The way to ``key``'s client on whichever other node holds it
        (its ``open_tunnel`` fails with ``NoClientSession`` if none does)."""

    def admit(self, key: TunnelKey, *, pooled: bool) -> Deferred[bool]:
        """Decide a control request for ``key`` cluster-wide: True if a live
        client on another node holds it (a duplicate); False if this node
        now holds it (``released`` must follow when it no longer does).

        ``pooled``: the tunnel may be held by several clients, on any nodes
        (never a duplicate; this node joins its holders)."""

    def released(self, key: TunnelKey) -> None:
        """This node no longer holds ``key`` (its client left, or was never taken)."""

    def stats(self) -> Any:
        """What an operator sees of the cluster (``cluster.ClusterStats``)."""


@dataclass(frozen=True)
class TunnelStats:
    """What an operator sees of one connected client (``ClientConnection.stats``)."""

    #: the tunnel's public short name (``TunnelKey.fingerprint``)
    fingerprint: str
    #: "ip:port" ("[ip]:port" for IPv6) of the client's control connection
    remote: str
    #: when the control connection was taken over (seconds, the server's clock)
    connected_since: float
    #: streams open in its session, the control stream not counted
    streams_open: int
    #: public HTTP requests and TCP connections sent its way since it connected
    requests: int
    #: Data payload bytes from the client, and to it (yamux framing not counted)
    bytes_in: int
    bytes_out: int


def format_address(address: Any) -> str:
    """``ip:port`` for an IPv4 address, ``[ip]:port`` for IPv6, else its str()."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return str(address) if address is not None else ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClientConnection:
    """One connected tunnel client: its yamux session and control stream.

    It knows its tunnel by ``key`` only (it never holds the identifier).
    """

    log = Logger()

    def __init__(self, server: TunnelServer, key: TunnelKey, session: YamuxSession) -> None:
        self.server = server
        self.key = key
        self.session = session
        #: when it was taken over, on the server's clock
        self.since = server.clock.seconds()
        self._requests = 0
        self._control_id: int | None = None
        self.control: ControlProtocol | None = None
        self.ready = False
        self.closed = False
        self._waiters: deque[_Waiter] = deque()
        self._timer: Any = None
        self._ready = OneShot()
        #: local port -> streams kept between requests (made on first use)
        self._pools: dict[int, StreamPool] = {}

    def __repr__(self) -> str:
        return f"<ClientConnection {self.key} ready={self.ready}>"

    @property
    def outstanding(self) -> int:
        """Streams at work for public requests: asked for and not arrived yet,
        or open and not kept idle (what a pool balances on)."""
        streams = self.session.streams
        open_ = len(streams) - (1 if self._control_id in streams else 0)
        idle = sum(len(pool) for pool in self._pools.values())
        return len(self._waiters) + open_ - idle

    def start(self) -> Deferred:
        """Wait for the control stream and its handshake; fires with self."""
        clock = self.server.clock
        self._timer = clock.callLater(self.server.control_timeout, self._no_control_stream)
        self.session.set_stream_handler(self._stream_opened)
        self.session.when_closed().addCallback(self._session_closed)
        return self.when_ready()

    def when_ready(self) -> Deferred:
        """Fires with this connection once its control handshake is done;
        fails with NoClientSession if the session ends first."""
        return self._ready.when()

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def dispatched(self) -> None:
        """A public HTTP request or TCP connection was sent this client's way
        (counted once, however many streams it takes)."""
        self._requests += 1

    def stats(self) -> TunnelStats:
        """Its traffic and streams now, for an operator."""
        session = self.session
        return TunnelStats(
            fingerprint=self.key.fingerprint,
            remote=format_address(session.peer_address),
            connected_since=self.since,
            streams_open=sum(1 for sid in session.streams if sid != self._control_id),
            requests=self._requests,
            bytes_in=session.bytes_received,
            bytes_out=session.bytes_sent,
        )

    @property
    def usable(self) -> bool:
        """Ready, and not draining: a session told GoAway opens no new stream."""
        return self.ready and not self.closed and not self.session.local_go_away

    def open_tunnel(self, protocol: int, port: int, timeout: float) -> Deferred:
        if not self.usable:
            return fail(NoClientSession())
        if len(self._waiters) >= self.server.max_pending_tunnels:
            return fail(TooManyPendingTunnels())
        waiter = _Waiter()

        def withdraw(d: Deferred) -> None:
            waiter.cancelled = True
            cancel(waiter.timer)

        waiter.deferred = Deferred(withdraw)
        waiter.timer = self.server.clock.callLater(timeout, self._waiter_timed_out, waiter)
        self._waiters.append(waiter)
        try:
            self.control.send(ControlMessage(1, int(protocol), port))
        except Exception:
            self.log.failure("sending a control message to {ident} failed", ident=self.key)
            self.close()
        return waiter.deferred

    def reuse(self, port: int) -> OriginLeg | None:
        """A stream to local ``port`` kept from an earlier request, or None."""
        pool = self._pools.get(port)
        return pool.take() if pool is not None else None

    def keep(self, port: int, leg: OriginLeg) -> bool:
        """Keep ``leg`` for the next request to ``port``; False if it may not be kept
        (the server or the client is stopping, or keeping is off)."""
        if (
            self.closed
            or leg.transport.session is not self.session
            or not self.server.keeping_streams()
            or self.session.remote_go_away is not None
        ):
            return False
        pool = self._pools.get(port)
        if pool is None:
            if not self._pools:
                # a client that says GoAway is draining: what waits must not hold it up
                self.session.when_go_away().addCallback(self._peer_going_away)
            pool = self._pools[port] = self.server.stream_pool()
        return pool.keep(leg)

    def retire_idle(self) -> None:
        """Close every kept stream and keep none from now on."""
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def _peer_going_away(self, code: int | None) -> None:
        if code is not None:
            self.retire_idle()

    def close(self) -> None:
        """Say GoAway and close the session."""
        self.session.close()

    # -- internals -----------------------------------------------------------

    def _stream_opened(self, stream: YamuxStream) -> None:
        if self.control is None:
            self._cancel_timer()
            self._control_id = stream.id
            self.control = ControlProtocol(
                False, self.server.clock, timeout=self.server.control_timeout
            )
            self.control.when_ready().addCallbacks(self._control_ready, self._control_failed)
            self.control.when_lost().addCallback(self._control_lost)
            stream.attach(self.control)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.cancelled:
                stream.abortConnection()
                return
            cancel(waiter.timer)
            d, waiter.deferred = waiter.deferred, None
            d.callback(stream)
            return
        self.log.info(
            "unsolicited stream {sid} from {ident}, resetting",
            sid=stream.id,
            ident=self.key,
        )
        stream.abortConnection()

    def _waiter_timed_out(self, waiter: _Waiter) -> None:
        waiter.timer = None
        waiter.cancelled = True
        d, waiter.deferred = waiter.deferred, None
        if d is not None:
            d.errback(TunnelTimeout())

    def _control_ready(self, control: ControlProtocol) -> None:
        if self.closed:
            return
        self.ready = True
        self._ready.fire(self)

    def _control_failed(self, failure: Failure) -> None:
        self.log.info(
            "control handshake with {ident} failed: {why}",
            ident=self.key,
            why=failure.getErrorMessage(),
        )
        self.close()

    def _control_lost(self, reason: BaseException) -> None:
        if not self.closed:
            self.close()

    def _no_control_stream(self) -> None:
        self._timer = None
        self.log.info("{ident} opened no control stream in time", ident=self.key)
        self.close()

    def _cancel_timer(self) -> None:
        cancel(self._timer)
        self._timer = None

    def _session_closed(self, reason: BaseException) -> None:
        self.closed = True
        self.ready = False
        self._cancel_timer()
        self.retire_idle()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            cancel(waiter.timer)
            d, waiter.deferred = waiter.deferred, None
            if d is not None and not waiter.cancelled:
                d.errback(NoClientSession())
        self._ready.fail(NoClientSession())  # nothing if it was ready
        self.server.connection_ended(self)


class PooledTunnel:
    """One request's way into a pooled tunnel on this node (a ``Tunnel``).

    It starts with the member ``TunnelServer`` picked, and its streams, kept
    or new, are that member's.  If the member's session ends before it gives
    the request a stream (``NoClientSession``), the request is tried once
    more: on another ready member here, else (in a cluster) on the pool's
    members on other nodes, which serve it from then on.  A client that
    leaves costs its pool no request that it had not begun to answer.
    """

    __slots__ = ("server", "key", "member", "forward", "_moved")

    def __init__(
        self, server: TunnelServer, key: TunnelKey, member: Tunnel, *, forward: bool = True
    ) -> None:
        self.server = server
        self.key = key
        #: what serves this request: a client here, or (moved) the other nodes
        self.member: Tunnel = member
        #: whether it may move to the other nodes (not for a request one of
        #: them forwarded: a node serves what it holds)
        self.forward = forward
        self._moved = False

    def __repr__(self) -> str:
        return f"<PooledTunnel {self.key} member={self.member!r}>"

    def dispatched(self) -> None:
        self.member.dispatched()

    def open_tunnel(self, protocol: int, port: int, timeout: float) -> Deferred:
        member = self.member
        d = member.open_tunnel(protocol, port, timeout)
        if self._moved:
            return d

        def gone(failure: Failure) -> Any:
            failure.trap(NoClientSession)
            if self._moved:
                return failure
            other: Tunnel | None = self.server.pick_member(self.key, exclude=member)
            if other is None and self.forward and self.server.cluster is not None:
                other = self.server.cluster.tunnel(self.key)
            if other is None:
                return failure
            self._moved = True
            self.member = other
            other.dispatched()
            return other.open_tunnel(protocol, port, timeout)

        return d.addErrback(gone)

    def reuse(self, port: int) -> OriginLeg | None:
        return self.member.reuse(port)

    def keep(self, port: int, leg: OriginLeg) -> bool:
        return self.member.keep(port, leg)


class TunnelServer:
    """The registry of virtual hosts and connected tunnel clients.

    It knows no HTTP: the web layer routes public requests to it and turns
    its errors into responses.  Tunnels are ``TunnelKey``s; a method given a
    ``str`` takes it for an identifier and hashes it (``TunnelKey.coerce``).
    Its ``StateChange``s carry the key.

    Duplicate tunnels: while a client of a tunnel is connected, a second one
    is refused (``check_duplicate`` says so) if the first still answers a
    ping within ``probe_timeout``; if it does not, the first session is
    closed and the newcomer takes its place.  A live session is never torn
    down by a newcomer, so two clients sharing an identifier cannot evict
    each other in a loop, and clean-up of an old session never touches a
    newer one (entries are removed by identity).  A pooled tunnel takes
    every newcomer (see the module docstring).

    ``events`` (a ``ServerEvents``, e.g. ``metrics.Metrics``; None: nobody)
    hears of the public requests and connections its front ends (``web``,
    ``forward``, ``tcp``) could not serve; it may be set after construction.
    """

    log = Logger()

    def __init__(
        self,
        *,
        clock: IReactorTime | None = None,
        yamux_config: YamuxConfig | None = None,
        control_timeout: float = 10.0,
        tunnel_timeout: float = 10.0,
        probe_timeout: float = 5.0,
        max_pending_tunnels: int = 1024,
        max_idle_streams: int = 64,
        stream_idle_timeout: float = 1.5,
        events: ServerEvents | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.yamux_config = yamux_config or LARGE_WINDOWS
        self.control_timeout = control_timeout
        self.tunnel_timeout = tunnel_timeout
        self.probe_timeout = probe_timeout
        self.max_pending_tunnels = max_pending_tunnels
        #: streams kept between HTTP requests, per client and local port (0: none)
        self.max_idle_streams = max_idle_streams
        self.stream_idle_timeout = stream_idle_timeout
        #: told of what the front ends could not serve (None: nobody is)
        self.events = events
        self.vhosts = VirtualHosts()
        self.addrs = VirtualAddrs()
        #: each tunnel's clients here, in the order they came (one unless pooled)
        self._clients: dict[TunnelKey, list[ClientConnection]] = {}
        #: pooled tunnel -> where its next tie is broken (``pick_member``)
        self._turns: dict[TunnelKey, int] = {}
        self._members = Observers()
        self._states: dict[TunnelKey, ClientState] = {}
        self._observers = Observers()
        self._on_connect: dict[TunnelKey, list[Callable[[], Any]]] = {}
        self._on_disconnect: dict[TunnelKey, list[Callable[[], Any]]] = {}
        self._connected: dict[TunnelKey, OneShot] = {}
        self._accepting = True
        #: the other nodes of the cluster this server is a node of (None: alone)
        self.cluster: OtherNodes | None = None
        #: tunnel -> control requests let in by ``check_duplicate`` in a
        #: cluster and not attached or given up yet
        self._admitting: dict[TunnelKey, int] = {}

    # -- configuration ---------------------------------------------------------

    def add_host(self, host: str, tunnel: str | TunnelKey, rules: Any = None) -> Route:
        """Serve public requests for ``host`` (``name`` or ``name:port``) by
        ``tunnel``, checked by the web layer against ``rules`` (None: none).

        ValueError if ``host`` is malformed (``vhosts.host_key``)."""
        return self.vhosts.add(host, tunnel, rules)

    def delete_host(self, host: str) -> bool:
        """Stop serving ``host``; False if it was not served."""
        return self.vhosts.delete(host)

    def add_addr(
        self, tunnel: str | TunnelKey, port: int | None = None, ip: str | None = None
    ) -> None:
        """Route TCP connections accepted on local ``port`` (or local ``ip``) to
        ``tunnel`` (listen with ``tcp_factory()`` to accept them)."""
        self.addrs.add(tunnel, port=port, ip=ip)

    def delete_addr(self, port: int | None = None, ip: str | None = None) -> bool:
        return self.addrs.delete(port=port, ip=ip)

    def canonical(self, offered: str) -> TunnelKey | None:
        """The key of a configured tunnel (host or TCP route) that the
        identifier ``offered`` by a client hashes to, or None."""
        key = self.vhosts.canonical(offered)
        return key if key is not None else self.addrs.canonical(offered)

    def join_cluster(self, cluster: OtherNodes) -> None:
        """Be one node of ``cluster``: tunnels held by other nodes are reached
        through it, and duplicates are decided cluster-wide."""
        self.cluster = cluster

    def tcp_factory(self) -> TCPTunnelFactory:
        """A protocol factory that carries accepted connections through TCP tunnels."""
        return TCPTunnelFactory(self)

    # -- states and callbacks --------------------------------------------------

    def state(self, tunnel: str | TunnelKey) -> ClientState:
        return self._states.get(TunnelKey.coerce(tunnel), ClientState.UNKNOWN)

    def observe_states(self, callback: Callable[[StateChange], Any]) -> Callable[[], None]:
        """Call ``callback(StateChange)`` on every change (its ``identifier``
        is the tunnel's key); returns a remover."""
        return self._observers.add(callback)

    def observe_members(self, callback: Callable[[ClientConnection], Any]) -> Callable[[], None]:
        """Call ``callback(connection)`` as each client's handshake is done:
        every member of a pool, where states change once per tunnel (its
        first member); returns a remover."""
        return self._members.add(callback)

    def on_connect(self, tunnel: str | TunnelKey, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` once, the next time ``tunnel`` connects."""
        self._on_connect.setdefault(TunnelKey.coerce(tunnel), []).append(callback)

    def on_disconnect(self, tunnel: str | TunnelKey, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` once, the next time ``tunnel`` disconnects."""
        self._on_disconnect.setdefault(TunnelKey.coerce(tunnel), []).append(callback)

    def when_connected(self, tunnel: str | TunnelKey) -> Deferred:
        """Fires with None when ``tunnel`` is connected, at once if it
        already is, else at its next connect.  Cancelling it withdraws it."""
        key = TunnelKey.coerce(tunnel)
        if self.state(key) == ClientState.CONNECTED:
            return succeed(None)
        return self._connected.setdefault(key, OneShot()).when()

    def _set_state(self, key: TunnelKey, state: ClientState, error=None) -> None:
        previous = self.state(key)
        self._states[key] = state
        self._observers.notify(StateChange(key, previous, state, error))
        hooks = {ClientState.CONNECTED: self._on_connect, ClientState.CLOSED: self._on_disconnect}
        table = hooks.get(state)
        if table is not None:
            for callback in table.pop(key, []):
                try:
                    callback()
                except Exception:
                    self.log.failure("state callback for {ident} failed", ident=key)
        if state == ClientState.CONNECTED:
            waiting = self._connected.pop(key, None)
            if waiting is not None:
                waiting.fire(None)

    # -- connections -------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._accepting

    def keeping_streams(self) -> bool:
        """Whether a stream may be kept for the next request now (serving,
        and keeping is on: ``max_idle_streams``)."""
        return self._accepting and self.max_idle_streams > 0

    def stream_pool(self) -> StreamPool:
        """A new pool of kept streams with this server's bounds."""
        return StreamPool(
            self.clock, max_idle=self.max_idle_streams, idle_timeout=self.stream_idle_timeout
        )

    def pooled(self, tunnel: str | TunnelKey) -> bool:
        """Whether several clients may hold ``tunnel`` (a host naming it has
        the ``pool`` rule; TCP routes follow their key's hosts)."""
        return self.vhosts.pooled(TunnelKey.coerce(tunnel))

    def connection(self, tunnel: str | TunnelKey) -> ClientConnection | None:
        """``tunnel``'s client here: its newest ready one when it has several
        (a pool), else its newest; None if it has none."""
        members = self._clients.get(TunnelKey.coerce(tunnel))
        if not members:
            return None
        ready = [c for c in members if c.ready]
        return (ready or members)[-1]

    def connections_of(self, tunnel: str | TunnelKey) -> list[ClientConnection]:
        """Every client of ``tunnel`` here (taking over or ready), oldest first."""
        return list(self._clients.get(TunnelKey.coerce(tunnel), ()))

    def connections(self) -> list[ClientConnection]:
        """The clients connected now (or taking over), in no set order; a
        pooled tunnel's members each appear."""
        return [c for members in self._clients.values() for c in members]

    def disconnect(self, tunnel: str | TunnelKey) -> bool:
        """Close the session of every client of ``tunnel`` (GoAway, then
        close); False if none is connected.

        Its open requests fail.  The client will reconnect, as after any
        lost session, and is taken back if its tunnel is still configured (a
        host or a TCP route uses its key); remove those first to keep it out.
        """
        key = TunnelKey.coerce(tunnel)
        members = [c for c in self._clients.get(key, ()) if not c.closed]
        if not members:
            return False
        if len(members) == 1:
            self.log.info("disconnecting client {ident}", ident=key)
        else:
            self.log.info("disconnecting the {n} clients of {ident}", n=len(members), ident=key)
        for connection in members:
            connection.close()
        return True

    def check_duplicate(self, tunnel: str | TunnelKey) -> Deferred:
        """Fires True if a live client already holds ``tunnel``, here or (in
        a cluster) on another node; never for a pooled tunnel, which takes
        every client (no ping is sent).

        An incumbent here that does not answer a ping in time is closed
        (then False).  In a cluster, False means this node now holds the
        tunnel cluster-wide: attach the newcomer's session, or call
        ``control_abandoned`` if it is gone meanwhile.
        """
        key = TunnelKey.coerce(tunnel)
        pooled = self.pooled(key)
        d = succeed(False) if pooled else self.probe_local(key)
        cluster = self.cluster
        if cluster is None:
            return d

        def here_or_cluster(here: bool) -> Any:
            if here:
                return True
            # from now until it attaches (or is given up) the newcomer counts:
            # a second one waits behind it (probe_local), and the tunnel is
            # not released when an old session ends meanwhile
            self._admitting[key] = self._admitting.get(key, 0) + 1
            return cluster.admit(key, pooled=pooled).addCallback(decided)

        def decided(duplicate: bool) -> bool:
            if duplicate:
                self._admitted(key, attached=False)
            return duplicate

        return d.addCallback(here_or_cluster)

    def _admitted(self, key: TunnelKey, *, attached: bool) -> None:
        """An admission ``check_duplicate`` began is over: attached, refused or
        given up; the tunnel is released if nothing else holds it here."""
        left = self._admitting.get(key, 0) - 1
        if left > 0:
            self._admitting[key] = left
        else:
            self._admitting.pop(key, None)
        if not attached and left <= 0 and key not in self._clients and self.cluster is not None:
            self.cluster.released(key)

    def probe_local(self, tunnel: str | TunnelKey) -> Deferred[bool]:
        """Fires True if a live client holds ``tunnel`` on this node; one that
        does not answer a ping within ``probe_timeout`` is closed (False).
        With several clients (a pool), True if any of them is live."""
        key = TunnelKey.coerce(tunnel)
        if self._admitting.get(key) and not self.pooled(key):
            return succeed(True)  # a newcomer is being admitted here: it comes first
        members = [c for c in self._clients.get(key, ()) if not c.closed]
        if not members:
            return succeed(False)
        if not all(c.ready for c in members):
            return succeed(True)
        if len(members) == 1:
            return self._ping(members[0])
        pings = DeferredList([self._ping(c) for c in members])
        return pings.addCallback(lambda results: any(alive for _, alive in results))

    def _ping(self, existing: ClientConnection) -> Deferred[bool]:
        """True if ``existing`` answers a ping; one that does not in time is
        closed (False).  A ping withdrawn (the one who asked is gone) fails
        with CancelledError and closes nothing; one that could not be sent
        because many are outstanding counts as alive."""

        def answered_not(failure: Failure) -> bool:
            if failure.check(TooManyStreams):
                return True
            failure.trap(PingTimeout, SessionClosed)
            self.log.info("replacing unresponsive session of {ident}", ident=existing.key)
            existing.session.abort()
            return False

        return existing.session.ping(self.probe_timeout).addCallbacks(lambda _: True, answered_not)

    def control_abandoned(self, tunnel: str | TunnelKey) -> None:
        """A control request that ``check_duplicate`` let in did not attach
        its session (its connection went first): hold the tunnel no longer
        (unless other clients of it are here, in a pool)."""
        key = TunnelKey.coerce(tunnel)
        if self.cluster is not None:
            self._admitted(key, attached=False)

    def attach_session(self, tunnel: str | TunnelKey, session: YamuxSession) -> ClientConnection:
        """Register a freshly taken-over control connection for ``tunnel``:
        one more member of a pooled tunnel, else its only client."""
        key = TunnelKey.coerce(tunnel)
        members = self._clients.setdefault(key, [])
        if members and not self.pooled(key):
            # dead sessions not cleaned up yet: they end here, visibly
            old, members[:] = list(members), []
            for connection in old:
                if not connection.closed:
                    connection.session.abort()
            self._set_state(key, ClientState.CLOSED)
        connection = ClientConnection(self, key, session)
        members.append(connection)
        if self.cluster is not None:
            self._admitted(key, attached=True)
        connection.start().addCallbacks(self._member_ready, lambda f: None)
        return connection

    def _member_ready(self, connection: ClientConnection) -> None:
        key = connection.key
        members = self._clients.get(key, [])
        if not any(c is connection for c in members):
            return  # replaced meanwhile
        if self.state(key) != ClientState.CONNECTED:
            self.log.info("client {ident} connected", ident=key)
            self._set_state(key, ClientState.CONNECTED)
        else:
            self.log.info(
                "another client of {ident} connected ({n} in all)", ident=key, n=len(members)
            )
        self._members.notify(connection)

    def connection_ended(self, connection: ClientConnection) -> None:
        """``connection``'s session is over (called by the connection itself)."""
        key = connection.key
        members = self._clients.get(key)
        if members is None or not any(c is connection for c in members):
            return
        members[:] = [c for c in members if c is not connection]
        if members:
            self.log.info("a client of {ident} disconnected ({n} left)", ident=key, n=len(members))
            if self.state(key) == ClientState.CONNECTED and not any(c.ready for c in members):
                self._set_state(key, ClientState.CLOSED)
            return
        del self._clients[key]
        self._turns.pop(key, None)
        self.log.info("client {ident} disconnected", ident=key)
        self._set_state(key, ClientState.CLOSED)
        if self.cluster is not None and not self._admitting.get(key):
            self.cluster.released(key)  # unless a newcomer's claim is under way

    def control_refused(self, tunnel: str | TunnelKey, error: str) -> None:
        """A control request for ``tunnel`` was refused (Go reports Closed)."""
        key = TunnelKey.coerce(tunnel)
        if key not in self._clients:
            self._set_state(key, ClientState.CLOSED, error)

    def pick_member(
        self, tunnel: str | TunnelKey, *, exclude: ClientConnection | None = None
    ) -> ClientConnection | None:
        """The ready client of ``tunnel`` here (other than ``exclude``) with
        the fewest outstanding streams, ties taken in turn; None if none is
        ready."""
        key = TunnelKey.coerce(tunnel)
        members = [c for c in self._clients.get(key, ()) if c.usable and c is not exclude]
        if len(members) <= 1:
            return members[0] if members else None
        turn = self._turns.get(key, 0) % len(members)
        order = members[turn:] + members[:turn]
        best = min(order, key=lambda c: c.outstanding)  # the first of the least
        self._turns[key] = members.index(best) + 1
        return best

    def _local(self, key: TunnelKey, *, forward: bool = True) -> Tunnel | None:
        """The way to ``key``'s client here: a ``PooledTunnel`` if it is pooled
        or has several clients, else its ready connection; None if none is ready."""
        members = self._clients.get(key)
        if not members:
            return None
        if len(members) == 1 and not self.pooled(key):
            return members[0] if members[0].ready else None
        member = self.pick_member(key)
        return PooledTunnel(self, key, member, forward=forward) if member is not None else None

    def route(self, tunnel: str | TunnelKey) -> Tunnel | None:
        """How to reach ``tunnel``'s client: a ready client here (one picked
        among a pool's), else (in a cluster) the way to the node that holds
        it, else None.  A pooled tunnel with no ready client here is looked
        for on the other nodes; another with a client here taking over is not."""
        key = TunnelKey.coerce(tunnel)
        local = self._local(key)
        if local is not None:
            return local
        if self.cluster is not None and (key not in self._clients or self.pooled(key)):
            return self.cluster.tunnel(key)
        return None

    def serve_remote(self, key: TunnelKey, protocol: int, port: int) -> Deferred:
        """A stream to ``key``'s client on this node, for a request another
        node forwards (never forwarded on: a node serves what it holds); a
        pool's member is picked as for a request of this node's own."""
        local = self._local(key, forward=False)
        if local is None:
            return fail(NoClientSession())
        local.dispatched()
        return local.open_tunnel(protocol, port, self.tunnel_timeout)

    def open_tunnel(
        self,
        tunnel: str | TunnelKey,
        protocol: int = TransportProtocol.HTTP,
        port: int = 0,
        timeout: float | None = None,
    ) -> Deferred:
        """Ask ``tunnel``'s client (one of a pool's) for a stream to its local side."""
        key = TunnelKey.coerce(tunnel)
        members = self._clients.get(key)
        if not members:
            return fail(NoClientSession())
        local = self._local(key) or members[-1]
        return local.open_tunnel(
            protocol, port, self.tunnel_timeout if timeout is None else timeout
        )

    # -- shutdown ----------------------------------------------------------------

    def stop(self, grace: float = 10.0) -> Deferred:
        """Graceful shutdown: refuse new clients, send GoAway to every session,
        let open tunnels finish for up to ``grace`` seconds, then close.

        Fires once every session has ended.
        """
        self._accepting = False
        connections = self.connections()
        closed = [c.session.when_closed() for c in connections]
        timer = self.clock.callLater(grace, lambda: [c.close() for c in connections])
        for c in connections:
            c.retire_idle()
            c.session.go_away()
            # the control stream stays open until the session closes
            c.session.when_idle(1 if c.control is not None else 0).addCallback(
                lambda _, c=c: c.close()
            )

        def finished(_: object) -> None:
            cancel(timer)

        return gatherResults(closed).addCallback(finished)
