"""The node-to-node cluster link: public requests carried to the node that
holds the tunnel's client.

Each pair of nodes shares one connection: a mutual HMAC handshake, then a
yamux session on the same transport (the byte formats are in
``tunnel.server.clusterwire``).  Either node opens a stream per request: an
OPEN is answered by ``LocalTunnels.serve_remote`` on the node that holds the
client and then spliced to that client's stream byte for byte; a PROBE asks
whether that node's client is alive.

``ClusterLinks`` (one per node) keeps one link per peer node: a live one is
reused, callers share a dial in progress, a link accepted from a node serves
requests to it too, and of two links crossed between the same nodes the one
dialed by the node with the smaller name is kept (both nodes decide the
same; the other is drained: GoAway, closed once idle).  A peer that cannot
be dialed fails requests fast (``NodeUnreachable``) for ``retry_after``
seconds rather than being dialed in a loop.  Failures are the errors of
``tunnel.server.errors`` so the web layer answers with Go's texts.
"""

from __future__ import annotations

import enum
import hmac
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from ..logs import RateLimitedLog
from ..observe import OneShot
from ..timers import cancel
from ..yamux import LARGE_WINDOWS, YamuxConfig, YamuxError, YamuxSession, YamuxStream
from .clusterstreams import (
    STATUS_ERRORS,
    Answer,
    Exchange,
    LocalTunnels,
    NodeUnreachable,
    NoReply,
)
from .clusterwire import (
    MAX_HANDSHAKE,
    NONCE_SIZE,
    PROOF_SIZE,
    HandshakeError,
    Op,
    Request,
    Role,
    Status,
    check_name,
    encode_hello,
    open_request,
    parse_hello,
    probe_request,
    proof,
)
from .errors import TunnelTimeout

#: cluster links carry bulk data: large windows, and a dead peer noticed in 15 s
#: connections accepted and not through their handshake yet, at most: an
#: outsider who can reach --cluster-listen holds no more than this many
MAX_HANDSHAKES = 64
#: ... and from one address (a node dials each peer once; crossed dials and a
#: redial make a few): one outsider cannot take every place
MAX_HANDSHAKES_PER_ADDRESS = 4

CLUSTER_YAMUX = replace(LARGE_WINDOWS, keepalive_interval=10.0, keepalive_timeout=5.0)


class LinkState(enum.Enum):
    OPEN = "open"  # carries new requests
    DRAINING = "draining"  # GoAway sent or received: finishing what it carries
    CLOSED = "closed"


@dataclass(frozen=True)
class LinkInfo:
    """One link, for status pages and metrics."""

    peer: str
    state: LinkState
    streams: int
    dialed_by: str
    address: str | None


def _escaped(text: str) -> str:
    """``text`` as one argument of an endpoint string."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def default_dial(
    reactor: Any, connect_timeout: float, trust_roots: str | None = None
) -> Callable[[str], IStreamClientEndpoint]:
    """Map "HOST:PORT" (or "[IPv6]:PORT") to a client endpoint (an endpoint
    string, whose timeout is whole seconds): TCP, or with ``trust_roots`` (a
    directory of CA certificates in PEM) TLS whose certificate must be
    issued by one of them for HOST."""
    timeout = max(1, math.ceil(connect_timeout))

    def dial(address: str) -> IStreamClientEndpoint:
        host, sep, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a node address is HOST:PORT, not {address!r}")
        if trust_roots is None:
            spec = f"tcp:host={_escaped(host)}:port={int(port)}:timeout={timeout}"
        else:
            spec = (
                f"tls:{_escaped(host)}:{int(port)}:timeout={timeout}"
                f":trustRoots={_escaped(trust_roots)}"
            )
        return clientFromString(reactor, spec)

    return dial


class ClusterLink:
    """One authenticated connection to a peer node and its yamux session."""

    def __init__(
        self, peer: str, dialed_by: str, session: YamuxSession, address: str | None
    ) -> None:
        self.peer = peer
        self.dialed_by = dialed_by
        self.session = session
        self.address = address
        self._retired = False

    def __repr__(self) -> str:
        return f"<ClusterLink {self.peer} dialed by {self.dialed_by} {self.state.value}>"

    @property
    def state(self) -> LinkState:
        session = self.session
        if session.closed:
            return LinkState.CLOSED
        if self._retired or session.local_go_away or session.remote_go_away is not None:
            return LinkState.DRAINING
        return LinkState.OPEN

    @property
    def usable(self) -> bool:
        return self.state is LinkState.OPEN

    def open_stream(self) -> YamuxStream:
        return self.session.open_stream()

    def retire(self) -> None:
        """No new requests: GoAway, and close once the streams it carries end."""
        self._retired = True
        session = self.session
        session.go_away()
        session.when_idle(0).addCallback(lambda _: session.close())

    def info(self) -> LinkInfo:
        return LinkInfo(
            self.peer, self.state, len(self.session.streams), self.dialed_by, self.address
        )


class _Handshake(enum.Enum):
    HELLO = "hello"  # waiting for the peer's HELLO
    PROOF = "proof"  # ours is out, waiting for the peer's PROOF
    LINKED = "linked"  # yamux runs on the transport
    REFUSED = "refused"


class LinkProtocol(Protocol):
    """A cluster connection: the handshake, then a yamux session on the same
    transport (this protocol hands every later byte and the end to it)."""

    def __init__(
        self, links: ClusterLinks, role: Role, expected: str | None, address: str | None
    ) -> None:
        self.links = links
        self.role = role
        self.expected = expected
        self.address = address
        self.phase = _Handshake.HELLO
        #: the peer's IP address, for the listener's per-address bound
        self.peer_host: str | None = None
        self.session: YamuxSession | None = None
        self._nonce = os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self._peer: str | None = None
        self._buf = b""
        self._timer: Any = None
        self._result = OneShot()

    def when_linked(self) -> Deferred:
        """Fires with the ClusterLink, or fails with NodeUnreachable."""
        return self._result.when()

    def connectionMade(self) -> None:
        self._timer = self.links.clock.callLater(
            self.links.handshake_timeout, self._refuse, "no handshake in time"
        )
        self.transport.write(encode_hello(self._nonce, self.links.name))

    def dataReceived(self, data: bytes) -> None:
        if self.phase is _Handshake.LINKED:
            self.session.dataReceived(data)
            return
        if self.phase is _Handshake.REFUSED:
            return
        self._buf += data
        try:
            if self.phase is _Handshake.HELLO:
                self._read_hello()
            if self.phase is _Handshake.PROOF and len(self._buf) >= PROOF_SIZE:
                self._read_proof()
        except HandshakeError as e:
            self._refuse(str(e))

    def _read_hello(self) -> None:
        parsed = parse_hello(self._buf[:MAX_HANDSHAKE])
        if parsed is None:
            return
        hello, size = parsed
        self._buf = self._buf[size:]
        if hello.name == self.links.name:
            raise HandshakeError("the peer has our own name")
        if self.expected is not None and hello.name != self.expected:
            raise HandshakeError(f"expected node {self.expected}, the peer is {hello.name}")
        self._peer, self._peer_nonce = hello.name, hello.nonce
        self.phase = _Handshake.PROOF
        if self.role is Role.DIALER:
            # the dialer proves first; the listener answers only a valid
            # proof, so whoever connects learns no MAC to test guesses on
            self._send_proof()

    def _send_proof(self) -> None:
        mine = proof(
            self.links.secret, self.role, self._nonce, self._peer_nonce, self.links.name, self._peer
        )
        self.transport.write(mine)

    def _read_proof(self) -> None:
        offered, rest = self._buf[:PROOF_SIZE], self._buf[PROOF_SIZE:]
        self._buf = b""
        expected = proof(
            self.links.secret,
            self.role.other,
            self._peer_nonce,
            self._nonce,
            self._peer,
            self.links.name,
        )
        if not hmac.compare_digest(offered, expected):
            raise HandshakeError("wrong proof (a different cluster secret?)")
        if self.role is Role.LISTENER:
            self._send_proof()
        cancel(self._timer)
        self.phase = _Handshake.LINKED
        dialer = self.links.name if self.role is Role.DIALER else self._peer
        self.session = YamuxSession(
            self.role is Role.DIALER, clock=self.links.clock, config=self.links.config
        )
        link = ClusterLink(self._peer, dialer, self.session, self.address)
        self.session.makeConnection(self.transport)
        self.session.set_stream_handler(self.links.answer)
        self.links.linked(link)
        self._result.fire(link)
        if rest:
            self.session.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        if self.phase in (_Handshake.LINKED, _Handshake.REFUSED):
            return
        self.phase = _Handshake.REFUSED
        cancel(self._timer)
        peer = self.transport.getPeer()
        self.links.limited_log.info(
            "cluster-handshake",
            "cluster link with {peer} ({host}) refused: {why}",
            peer=self._peer or self.expected or "?",
            host=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            why=why,
        )
        self._result.fail(NodeUnreachable(f"cluster handshake failed: {why}"))
        self.transport.abortConnection()

    def abort_handshake(self) -> None:
        """Drop the connection if it is still in its handshake (shutdown)."""
        if self.phase in (_Handshake.HELLO, _Handshake.PROOF) and self.transport is not None:
            self.phase = _Handshake.REFUSED
            cancel(self._timer)
            self._result.fail(NodeUnreachable("this node is shutting down"))
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        cancel(self._timer)
        if self.phase is _Handshake.LINKED:
            self.session.connectionLost(reason)
            return
        self.phase = _Handshake.REFUSED
        if not self._result.fired:
            self._result.fail(NodeUnreachable("the connection closed during the handshake"))


class _Running(enum.Enum):
    RUNNING = "running"
    CLOSING = "closing"


class _ListeningFactory(Factory):
    def __init__(self, links: ClusterLinks) -> None:
        self.links = links

    def buildProtocol(self, addr: Any) -> LinkProtocol | None:
        links = self.links
        host = getattr(addr, "host", "?")
        from_there = sum(1 for p in links.greeting if p.peer_host == host)
        if (
            not links.accepting
            or len(links.greeting) >= MAX_HANDSHAKES
            or from_there >= MAX_HANDSHAKES_PER_ADDRESS
        ):
            links.limited_log.info(
                "cluster-busy",
                "cluster connection from {host} refused: {n} handshakes under way"
                " ({there} from there)",
                host=host,
                n=len(links.greeting),
                there=from_there,
            )
            return None  # Twisted closes the connection
        protocol = LinkProtocol(links, Role.LISTENER, None, None)
        protocol.peer_host = host
        links.greeting.add(protocol)
        protocol.when_linked().addBoth(lambda _: links.greeting.discard(protocol))
        return protocol


class _DialFactory(Factory):
    def __init__(self, links: ClusterLinks, node: str, address: str) -> None:
        self.links, self.node, self.address = links, node, address
        self.protocol_made: LinkProtocol | None = None

    def buildProtocol(self, addr: Any) -> LinkProtocol:
        self.protocol_made = LinkProtocol(self.links, Role.DIALER, self.node, self.address)
        return self.protocol_made


class ClusterLinks:
    """This node's links to its peers; see the module docstring.

    :param name: this node's name (1..64 of ``[A-Za-z0-9._-]``).
    :param secret: the cluster's shared secret (never sent, never logged).
    :param local: serves the requests of peers.
    :param reactor: IReactorTime, and IReactorTCP for the default ``dial``.
    :param dial: maps a node's advertised "HOST:PORT" to an endpoint.
    :param handshake_timeout: seconds for a whole handshake.
    :param request_timeout: seconds a peer has to send a stream's REQUEST.
    :param retry_after: seconds a failed dial makes requests to that node
        fail at once.
    """

    log = Logger()

    def __init__(
        self,
        *,
        name: str,
        secret: bytes,
        local: LocalTunnels,
        reactor: Any,
        dial: Callable[[str], IStreamClientEndpoint] | None = None,
        handshake_timeout: float = 5.0,
        request_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        retry_after: float = 1.0,
        config: YamuxConfig = CLUSTER_YAMUX,
    ) -> None:
        check_name(name)
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self.name = name
        self.secret = secret
        self.local = local
        self.clock = reactor
        self._dial = dial if dial is not None else default_dial(reactor, connect_timeout)
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.retry_after = retry_after
        self.config = config
        self.limited_log = RateLimitedLog(self.log, clock=reactor)
        self._state = _Running.RUNNING
        #: the link that carries new requests, per peer
        self._current: dict[str, ClusterLink] = {}
        #: every link not closed yet (current, draining)
        self._links: list[ClusterLink] = []
        #: dials in progress: their result, the connect and its factory (to stop them)
        self._dials: dict[str, tuple[OneShot, Deferred, _DialFactory]] = {}
        #: peer -> (until when it fails fast, why)
        self._failed: dict[str, tuple[float, str]] = {}
        #: accepted connections still in their handshake (at most MAX_HANDSHAKES)
        self.greeting: set[LinkProtocol] = set()

    def __repr__(self) -> str:
        return f"<ClusterLinks {self.name} links={len(self._links)}>"

    @property
    def accepting(self) -> bool:
        return self._state is _Running.RUNNING

    def listening_factory(self) -> Factory:
        """The factory to listen with for peers' links (``--cluster-listen``)."""
        return _ListeningFactory(self)

    def links(self) -> list[LinkInfo]:
        return [link.info() for link in self._links]

    # -- requests ------------------------------------------------------------------

    def open_tunnel(
        self, node: str, address: str, key: TunnelKey, protocol: int, port: int, timeout: float
    ) -> Deferred:
        """A stream to ``key``'s client held by ``node`` (at ``address``),
        ready to ``attach()``; its peer is the client's local server.

        Fails with NoClientSession (NodeUnreachable if the node cannot be
        reached), TunnelTimeout or TooManyPendingTunnels; everything within
        ``timeout``.  Cancelling it resets the stream."""
        try:
            request = open_request(key, protocol, port)
        except ValueError as e:
            return fail(e)
        return self._request(node, address, request, timeout)

    def probe(self, node: str, address: str, key: TunnelKey, timeout: float) -> Deferred:
        """Deferred[bool]: is ``node``'s client for ``key`` alive?  Fails with
        NodeUnreachable if the node cannot be asked within ``timeout``."""
        return self._request(node, address, probe_request(key), timeout).addCallback(
            lambda status: status is Status.ALIVE
        )

    def _request(self, node: str, address: str, request: Request, timeout: float) -> Deferred:
        stage = ["connecting"]

        async def run() -> Any:
            for attempt in (1, 2):
                stage[0] = "connecting"
                link = await self.link_to(node, address)
                stage[0] = "waiting"
                try:
                    stream = link.open_stream()
                except YamuxError as e:
                    if attempt == 1 and not link.usable:
                        continue  # it was being retired: take the one that replaces it
                    raise NodeUnreachable(f"cannot open a stream to {node}: {e}")
                exchange = Exchange(request)
                stream.attach(exchange)
                try:
                    status, opened = await exchange.reply
                except NoReply:
                    if attempt == 1 and not link.usable:
                        continue  # refused by a link going away (crossed dials)
                    raise NodeUnreachable(f"the link to {node} dropped the request")
                if request.op is Op.PROBE and status in (Status.ALIVE, Status.GONE):
                    return status
                if status is Status.OK:
                    return opened
                raise STATUS_ERRORS[status]()
            raise NodeUnreachable(f"the links to {node} kept going away")

        def timed_out(result: Any, seconds: float) -> Failure:
            if stage[0] == "waiting":
                return Failure(TunnelTimeout())
            return Failure(NodeUnreachable(f"no link to {node} within {seconds} s"))

        return Deferred.fromCoroutine(run()).addTimeout(
            timeout, self.clock, onTimeoutCancel=timed_out
        )

    # -- links -------------------------------------------------------------------

    def link_to(self, node: str, address: str) -> Deferred:
        """A Deferred ClusterLink to ``node``: the live one, or one dialed
        (shared with every caller while the dial is in progress)."""
        if not self.accepting:
            return fail(NodeUnreachable("this node is shutting down"))
        link = self._current.get(node)
        if link is not None and link.usable:
            return succeed(link)
        failed = self._failed.get(node)
        if failed is not None:
            if failed[0] > self.clock.seconds():
                return fail(NodeUnreachable(failed[1]))
            del self._failed[node]
        dial = self._dials.get(node)
        if dial is None:
            dial = self._start_dial(node, address)
        return dial[0].when()

    def _start_dial(self, node: str, address: str) -> tuple[OneShot, Deferred, _DialFactory]:
        event = OneShot()
        factory = _DialFactory(self, node, address)
        try:
            check_name(node)
            endpoint = self._dial(address)
        except ValueError as e:
            connecting: Deferred = fail(e)
        else:
            connecting = endpoint.connect(factory)
        dial = (event, connecting, factory)
        self._dials[node] = dial
        connecting.addCallback(lambda protocol: protocol.when_linked())
        connecting.addCallbacks(self._dialed, self._dial_failed, (node,), None, (node,), None)
        return dial

    def _dialed(self, link: ClusterLink, node: str) -> None:
        event = self._dials.pop(node)[0]
        current = self._current.get(node)
        if current is not None and current.usable:
            event.fire(current)
        else:
            event.fail(NodeUnreachable(f"the link to {node} closed at once"))

    def _dial_failed(self, failure: Failure, node: str) -> None:
        event = self._dials.pop(node)[0]
        why = failure.getErrorMessage()
        if not failure.check(NodeUnreachable):
            why = f"cannot connect to node {node}: {why}"
        if self.accepting:
            now = self.clock.seconds()
            # nodes that failed long ago go (names of nodes gone for good)
            for gone in [name for name, (until, _) in self._failed.items() if until <= now]:
                del self._failed[gone]
            self._failed[node] = (now + self.retry_after, why)
            self.limited_log.info("cluster-dial", "{why}", why=why)
        event.fail(NodeUnreachable(why))

    def linked(self, link: ClusterLink) -> None:
        """A handshake succeeded (called by LinkProtocol): keep the link, or
        drain it if a link to the same peer is preferred."""
        self._links.append(link)
        link.session.when_closed().addCallback(lambda _: self._unlinked(link))
        if not self.accepting:
            link.retire()
            return
        peer = link.peer
        self._failed.pop(peer, None)
        current = self._current.get(peer)
        if current is not None and current.usable and current.dialed_by != link.dialed_by:
            if link.dialed_by != min(self.name, peer):
                link.retire()  # crossed dials: the other one is kept on both nodes
                return
        self._current[peer] = link
        if current is not None and current.usable:
            current.retire()
        self.log.info("cluster link to {peer} up (dialed by {by})", peer=peer, by=link.dialed_by)

    def _unlinked(self, link: ClusterLink) -> None:
        self._links.remove(link)
        if self._current.get(link.peer) is link:
            del self._current[link.peer]
            self.log.info("cluster link to {peer} closed", peer=link.peer)

    def answer(self, stream: YamuxStream) -> None:
        """A peer opened ``stream`` (the sessions' stream handler)."""
        stream.attach(Answer(self))

    # -- shutdown ----------------------------------------------------------------

    def close(self, grace: float = 10.0) -> Deferred:
        """GoAway on every link, let open requests finish for up to ``grace``
        seconds, then close; fires once every link is closed."""
        self._state = _Running.CLOSING
        for _, connecting, factory in list(self._dials.values()):
            connecting.cancel()
            if factory.protocol_made is not None:
                factory.protocol_made.abort_handshake()
        for protocol in list(self.greeting):
            protocol.abort_handshake()
        links = list(self._links)
        closed = [link.session.when_closed() for link in links]
        for link in links:
            link.retire()
        timer = self.clock.callLater(grace, lambda: [link.session.close() for link in links])

        def finished(result: Any) -> None:
            cancel(timer)

        return gatherResults(closed).addCallback(finished)
