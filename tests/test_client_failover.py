"""The tunnel client fails over between several servers (spec.md 2.12, issue 11).

Three levels: ``ServerRotation`` alone (the order of the servers, with a
scripted or hypothesis-drawn shuffle); ``TunnelClientService`` on a Clock with
dials the test answers by hand (which server each attempt goes to, after
which delay, with which Host header, and what the logs say); and whole
tunnels in memory (``tests.memory``): three ``TunnelSite`` nodes on one
``MemoryNetwork`` and one client, whose node dies, goes silent, stops or
refuses it.  Last, real processes: two ``twistd tunnel-server`` and one
``twistd tunnel-client`` with both, the one it uses killed with SIGKILL.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from tunnel.client import (
    Server,
    ServerRotation,
    TunnelClientService,
    TunnelServerError,
    exponential_backoff,
)
from tunnel.client.local import LocalForwarder, LocalTargets
from tunnel.koding.states import ClientState
from tunnel.server import TunnelResource, TunnelServer
from tunnel.server.site import TunnelSite
from tunnel.yamux import YamuxConfig

from .memory import ClockRequest, MemoryNetwork, parse_response
from .processes import Twistd, reap_all, spawn_client, until_children
from .test_client_lifecycle import QUIET, REFUSED_CONNECT, Dialler, Recording, results
from .test_client_waiters import SERVER_ACCEPTS
from .test_plugins import IDENTIFIER, Origin, public_get, start_server
from .tunnel_env import Origin as MemoryOrigin

S = ClientState


class Scripted:
    """A shuffle that puts each list in the next given order of names."""

    def __init__(self, *orders: str) -> None:
        self.orders = list(orders)
        self.calls: list[str] = []

    def __call__(self, servers: list) -> None:
        order = self.orders.pop(0)
        by_name = {str(s): s for s in servers}
        assert sorted(by_name) == sorted(order), (order, list(by_name))
        servers[:] = [by_name[name] for name in order]
        self.calls.append(order)


def never(servers: list) -> None:
    raise AssertionError(f"shuffled {servers!r}")


def names(*picks: Server) -> str:
    return "".join(str(s) for s in picks)


def servers(text: str = "abc") -> list[Server]:
    return [Server(object(), host=f"{n}.example:80", name=n) for n in text]


# -- 1. ServerRotation: the order ------------------------------------------------------------


def test_rounds_follow_the_shuffle_and_never_begin_with_the_server_tried_last():
    shuffle = Scripted("bca", "acb", "abc")
    rotation = ServerRotation(servers(), shuffle)
    picks = []
    for _ in range(9):
        assert rotation.peek() is rotation.peek()
        expected = rotation.peek()
        picks.append(rotation.next())
        assert picks[-1] is expected
    # round 2 was shuffled "acb" and began with a, just tried: a goes last
    assert names(*picks) == "bca" + "cba" + "bca"
    assert shuffle.calls == ["bca", "acb", "abc"]


def test_a_lost_server_is_tried_after_every_other():
    shuffle = Scripted("bac", "ca", "bc")
    rotation = ServerRotation(servers(), shuffle)
    b = rotation.next()
    rotation.lost(b)  # b's link died: a new round, the others first
    assert names(rotation.next(), rotation.next(), rotation.next()) == "cab"
    rotation.lost(rotation.servers[0])  # not the one just tried: still last
    assert names(rotation.next(), rotation.next(), rotation.next()) == "bca"


def test_one_server_is_never_shuffled():
    [only] = servers("a")
    rotation = ServerRotation([only], never)
    for _ in range(3):
        assert rotation.next() is only
        rotation.lost(only)
    assert rotation.peek() is only


def test_no_server_is_an_error():
    with pytest.raises(ValueError, match="no tunnel server"):
        ServerRotation([])


@given(
    count=st.integers(1, 5),
    rng=st.randoms(use_true_random=False),
    losses=st.lists(st.booleans(), max_size=40),
)
def test_no_server_is_tried_twice_while_another_waits_its_turn(count, rng, losses):
    """Whatever the shuffle: never the same server twice in a row (when there
    are others); after a lost link, every other server before that one; with
    no loss, each run of ``count`` picks from a round's start is every server."""
    rotation = ServerRotation(servers("abcde"[:count]), rng.shuffle)
    history: list[Server] = []
    since_round = 0  # picks since a round began (a loss begins one)
    for lost in losses:
        server = rotation.next()
        if history and count > 1:
            assert server is not history[-1]
        history.append(server)
        since_round += 1
        if since_round == count:
            assert set(history[-count:]) == set(rotation.servers)
            since_round = 0
        if lost:
            rotation.lost(server)
            others = [rotation.next() for _ in range(count - 1)]
            assert set(others) == set(rotation.servers) - {server}
            assert rotation.peek() is server
            history += others
            since_round = count - 1


# -- 2. the service: which server, when, with which Host -------------------------------------


class NamedDialler(Dialler):
    """A Dialler that writes its name in a shared list at each dial."""

    def __init__(self, name: str, dialled: list[str]) -> None:
        super().__init__()
        self.name = name
        self.dialled = dialled

    def connect(self, factory):
        self.dialled.append(self.name)
        return super().connect(factory)


class Client:
    """A service over servers a, b, c, each dialled by its own Dialler."""

    def __init__(self, shuffle, retry=None, text: str = "abc", **kwargs) -> None:
        self.clock = Clock()
        #: which server each dial went to
        self.dialled: list[str] = []
        self.diallers = {n: NamedDialler(n, self.dialled) for n in text}
        self.retry = retry if retry is not None else Recording({1: 0.5, 2: 0.75, 3: 1.0})
        self.service = TunnelClientService(
            [Server(self.diallers[n], host=f"{n}.example:80", name=n) for n in text],
            "ident-secret-0123",
            lambda stream, message: None,
            clock=self.clock,
            retry=self.retry,
            shuffle=shuffle,
            yamux_config=QUIET,
            **kwargs,
        )
        self.changes = []
        self.service.observe_states(self.changes.append)

    def last(self):
        return self.diallers[self.dialled[-1]].last

    def states(self) -> list[ClientState]:
        return [c.current for c in self.changes]


def connect_host(dial) -> bytes:
    """The Host header of the CONNECT request the client sent on ``dial``."""
    head = dial.transport.value().split(b"\r\n\r\n", 1)[0]
    [host] = [line[6:] for line in head.split(b"\r\n") if line.startswith(b"Host: ")]
    return host


def test_attempts_go_round_the_servers_one_backoff_delay_apart():
    """A refused dial, a refused CONNECT and a handshake cut each fail their
    server for the round; the client goes on to the next one after the
    policy's delay for that attempt (counted across servers), and each
    CONNECT carries its own server's Host header."""
    client = Client(Scripted("cab", "cab"))
    service = client.service
    assert service.current_server is None and service.host == "a.example:80"
    service.startService()
    assert client.dialled == ["c"] and str(service.current_server) == "c"
    client.last().refuse()
    assert isinstance(service.last_error, ConnectionRefusedError)
    client.clock.advance(0.5)
    assert client.dialled == ["c", "a"] and service.host == "a.example:80"
    dial = client.last().connect()
    assert connect_host(dial) == b"a.example:80"
    dial.receive(REFUSED_CONNECT)  # say, an unknown identifier
    dial.lose()
    assert isinstance(service.last_error, TunnelServerError)
    client.clock.advance(0.74)
    assert client.dialled == ["c", "a"]
    client.clock.advance(0.01)
    dial = client.last().connect()
    assert client.dialled == ["c", "a", "b"] and connect_host(dial) == b"b.example:80"
    dial.lose(ConnectionLost("cut in the handshake"))
    assert client.retry.asked == [1, 2, 3]
    # round 2 was shuffled "cab" again, but c was not tried last: it begins it
    client.clock.advance(1.0)
    assert client.dialled == ["c", "a", "b", "c"]
    client.last().connect().receive(SERVER_ACCEPTS)
    assert service.state == S.CONNECTED and str(service.current_server) == "c"
    assert client.states() == [S.STARTED] + [S.CONNECTING] * 4 + [S.CONNECTED]
    service.stopService()
    client.last().lose()
    assert client.clock.getDelayedCalls() == []


def test_a_lost_link_goes_to_another_server_first_after_the_first_delay():
    """The attempt count restarts after a link that was up for ``min_uptime``,
    so the failover waits the policy's first delay, not the last one."""
    shuffle = Scripted("bac", "cb")
    client = Client(shuffle)
    service = client.service
    service.startService()
    client.last().refuse()  # b
    client.clock.advance(0.5)
    dial = client.last().connect()  # a
    dial.receive(SERVER_ACCEPTS)
    assert str(service.current_server) == "a"
    client.clock.advance(10.0)  # min_uptime: a link that served
    dial.lose(ConnectionLost("node a died"))
    assert service.state == S.DISCONNECTED
    assert client.retry.asked == [1, 1]
    assert shuffle.calls == ["bac", "cb"]  # a new round of the others, then a
    client.clock.advance(0.5)
    assert client.dialled == ["b", "a", "c"]
    client.last().refuse()
    client.clock.advance(0.75)
    assert client.dialled == ["b", "a", "c", "b"]  # and a only after b
    client.last().refuse()
    client.clock.advance(1.0)
    assert client.dialled == ["b", "a", "c", "b", "a"]
    service.stopService()
    assert client.clock.getDelayedCalls() == []


def test_one_server_is_redialled_as_before():
    """One server, given as an endpoint or as a one-item list: the same
    dials, delays and states as before failover existed, and no shuffle."""
    runs = []
    for as_list in (False, True):
        clock, dialler, retry = Clock(), Dialler(), Recording({1: 0.5, 2: 0.75})
        target = [Server(dialler, host="h:1")] if as_list else dialler
        service = TunnelClientService(
            target, "ident", lambda s, m: None, host="h:1", clock=clock, retry=retry,
            shuffle=never, yamux_config=QUIET,
        )  # fmt: skip
        changes = []
        service.observe_states(changes.append)
        service.startService()
        dialler.last.refuse()
        clock.advance(0.5)
        dial = dialler.last.connect()
        dial.receive(SERVER_ACCEPTS)
        assert connect_host(dial) == b"h:1" and service.host == "h:1"
        assert service.endpoint is dialler
        clock.advance(10.0)
        dial.lose(ConnectionLost("gone"))
        clock.advance(0.5)
        service.stopService()
        assert clock.getDelayedCalls() == []
        runs.append(([c.current for c in changes], retry.asked, len(dialler.dials)))
    assert runs[0] == runs[1]
    assert runs[0][1:] == ([1, 1], 3)


def test_logs_name_each_server_and_never_the_identifier():
    client = Client(Scripted("ba", "ab"), text="ab")
    with capturedLogs() as events:
        client.service.startService()
        client.last().refuse()
        client.clock.advance(0.5)
        dial = client.last().connect()
        dial.receive(SERVER_ACCEPTS)
        client.clock.advance(10.0)
        dial.lose(ConnectionLost("gone"))
        client.clock.advance(0.5)
        client.service.stopService()
    text = [formatEvent(e) for e in events]
    assert "connecting to the tunnel server at b" in text
    assert any(t.startswith("connecting to the tunnel server at b failed: ") for t in text)
    assert text.count("Scheduling retry 1 to connect the next of a, b in 0.5 seconds.") == 2
    assert "connecting to the tunnel server at a" in text
    assert any(t.startswith("tunnel to the server is up at a (") for t in text)
    assert any(t.startswith("tunnel to the server at a lost: ") for t in text)
    assert text[-1] == "connecting to the tunnel server at b"
    assert not any("ident-secret" in t for t in text), text


def test_a_flapping_server_is_backed_off_and_the_rotation_still_moves_on():
    """Both servers accept the tunnel and drop it at once: each drop is one
    more failure (the delays grow), and each lost link still sends the next
    attempt to the other server."""
    client = Client(random.Random(1).shuffle, text="ab")
    service = client.service
    service.startService()
    for delay in (0.5, 0.75, 1.0, 1.0):
        dial = client.last().connect()
        dial.receive(SERVER_ACCEPTS)
        assert service.state == S.CONNECTED
        dial.lose(ConnectionLost("the node drops it"))
        client.clock.advance(delay - 0.01)
        dials = len(client.dialled)
        client.clock.advance(0.01)
        assert len(client.dialled) == dials + 1
    assert client.retry.asked == [1, 2, 3, 4]
    assert client.dialled in (["a", "b"] * 2 + ["a"], ["b", "a"] * 2 + ["b"])
    service.stopService()
    assert client.clock.getDelayedCalls() == []


def test_a_vanished_server_is_left_after_the_handshake_timeout():
    """A dial that never completes (the machine is gone, no RST) is cancelled
    after ``handshake_timeout``, and the next server is tried after the delay."""
    client = Client(Scripted("ab"), text="ab", handshake_timeout=4.0)
    with capturedLogs() as events:
        client.service.startService()
        client.clock.advance(3.9)
        assert client.dialled == ["a"] and not client.last().cancelled
        client.clock.advance(0.1)
        assert client.last().cancelled
        client.clock.advance(0.5)
        assert client.dialled == ["a", "b"]
        client.last().connect().receive(SERVER_ACCEPTS)
        assert client.service.state == S.CONNECTED
    text = [formatEvent(e) for e in events]
    failed = "connecting to the tunnel server at a failed: "
    assert any(t.startswith(failed) and "no connection after 4 seconds" in t for t in text)
    client.service.stopService()
    client.last().lose()
    assert client.clock.getDelayedCalls() == []


# -- 3. whole tunnels in memory: nodes that die, go silent, stop or refuse -------------------

HOST = "app.localhost"
IDENT = "failover-identifier-0123"
ORIGIN_PORT = 8000
#: short keepalives, so that a silent node is found in seconds of Clock time
KEEPALIVE = YamuxConfig(keepalive_interval=2.0, keepalive_timeout=1.0)


class Node:
    """One tunnel server node: TunnelServer, TunnelResource and TunnelSite on a port."""

    def __init__(self, cluster: Cluster, name: str, port: int, knows_client: bool) -> None:
        self.cluster = cluster
        self.name = name
        self.port = port
        self.server = TunnelServer(clock=cluster.clock)
        if knows_client:
            self.server.add_host(HOST, IDENT)
        site = TunnelSite(
            TunnelResource(self.server), reactor=cluster.clock, requestFactory=ClockRequest
        )
        self.listener = cluster.net.listenTCP(port, site, interface="127.0.0.1")
        self.alive = True

    @property
    def holds_client(self) -> bool:
        return self.server.state(IDENT) == S.CONNECTED

    def get(self, path: bytes) -> tuple[int, bytes]:
        """A public GET through this node."""
        net = self.cluster.net
        peer = net.connect(self.port)
        assert peer.failed is None, peer.failed
        peer.send(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, HOST.encode()))
        net.flush()
        if not peer.closed:
            peer.close()
            net.flush()
        response = parse_response(peer.received)
        return response.code, response.body

    def connections(self):
        return [
            c for c in self.cluster.net.open_connections() if c.server.getHost().port == self.port
        ]

    def kill(self) -> None:
        """As SIGKILL: the port closes and the kernel resets every connection."""
        self.alive = False
        self.listener.stopListening()
        for connection in self.connections():
            connection.server.abortConnection()
        self.cluster.net.flush()

    def silence(self) -> None:
        """As a node cut off the network: its links go quiet, its port hangs."""
        self.alive = False
        for connection in self.connections():
            connection.freeze()
        self.cluster.net.blackhole("127.0.0.1", self.port)


class Cluster:
    """An origin, tunnel server nodes a, b, c on ports 9001.., and one client
    that knows them all, on one MemoryNetwork and its Clock.

    Reconnect delays have no jitter: 0.05 s, growing by 1.5."""

    def __init__(self, shuffle, *, strangers: str = "", **client_kwargs) -> None:
        self.net = MemoryNetwork()
        self.clock = self.net.clock
        origin = Site(
            MemoryOrigin(clock=self.clock), requestFactory=ClockRequest, reactor=self.clock
        )
        self.origin_port = self.net.listenTCP(ORIGIN_PORT, origin, interface="127.0.0.1")
        self.nodes = {
            name: Node(self, name, 9001 + i, knows_client=name not in strangers)
            for i, name in enumerate("abc")
        }
        self.clients: list[TunnelClientService] = []
        self.client = self.make_client(shuffle, **client_kwargs)

    def make_client(self, shuffle, nodes: str = "abc", **kwargs) -> TunnelClientService:
        targets = LocalTargets(self.net, default=f"tcp:127.0.0.1:{ORIGIN_PORT}")
        options = {
            "clock": self.clock,
            "retry": exponential_backoff(initial=0.05, maximum=0.5, rng=lambda: 0.5),
            "shuffle": shuffle,
        }
        options.update(kwargs)
        client = TunnelClientService(
            [
                Server(
                    TCP4ClientEndpoint(self.net, "127.0.0.1", node.port),
                    host=f"127.0.0.1:{node.port}",
                    name=node.name,
                )
                for node in (self.nodes[n] for n in nodes)
            ],
            IDENT,
            LocalForwarder(targets.endpoint_for, clock=self.clock),
            **options,
        )
        self.clients.append(client)
        return client

    def holder(self) -> str | None:
        """The node that holds the client's tunnel (asked of the nodes)."""
        [*held] = [n.name for n in self.nodes.values() if n.alive and n.holds_client]
        assert len(held) <= 1, held
        return held[0] if held else None

    def until_moved(self, limit: float = 10.0) -> float:
        """Let time pass until the client is connected to a node other than
        the one it is on now; the Clock time then."""
        left = self.client.current_server
        return self.net.run_until(
            lambda: self.client.state == S.CONNECTED and self.client.current_server is not left,
            limit,
        )

    def start(self) -> float:
        """Start the client; the Clock time at which it is connected."""
        self.client.startService()
        return self.net.run_until(lambda: self.client.state == S.CONNECTED, limit=60)

    def stop(self) -> None:
        """Stop the client and the live nodes gracefully, and check that
        nothing is left: no connection, no connect, no timer, no error."""
        net = self.net
        for client in self.clients:
            if client.running:
                net.result(client.stopService(), limit=client.stop_timeout + 1)
        for node in self.nodes.values():
            if node.alive:
                net.result(node.server.stop(grace=1.0), limit=2)
            node.listener.stopListening()
            for connection in node.connections():  # a silenced node's frozen links
                connection.client.abortConnection()
                connection.server.abortConnection()
        net.blackholes.clear()
        self.origin_port.stopListening()
        net.flush()
        net.assert_clean()


@pytest.fixture
def cluster_factory():
    made: list[Cluster] = []

    def make(*args, **kwargs) -> Cluster:
        made.append(Cluster(*args, **kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()


def test_a_dead_node_is_skipped_within_one_backoff_delay(cluster_factory):
    cluster = cluster_factory(Scripted("abc"))
    cluster.nodes["a"].kill()  # down before the client starts
    assert cluster.start() == 0.05  # a refused at once, b after the first delay
    assert cluster.holder() == "b" and str(cluster.client.current_server) == "b"
    assert cluster.nodes["b"].get(b"/echo?echo=via-b") == (200, b"via-b")


def test_the_client_moves_to_another_node_when_its_node_dies(cluster_factory):
    cluster = cluster_factory(Scripted("abc", "cb"))
    assert cluster.start() == 0.0 and cluster.holder() == "a"
    assert cluster.nodes["a"].get(b"/echo?echo=one") == (200, b"one")
    died = cluster.clock.seconds()
    cluster.nodes["a"].kill()
    assert cluster.client.state == S.DISCONNECTED
    back = cluster.until_moved()
    assert back - died == 0.05  # the first delay, on the first other node
    assert cluster.holder() == "c"
    assert cluster.nodes["c"].get(b"/echo?echo=two") == (200, b"two")
    code, body = cluster.nodes["b"].get(b"/echo?echo=three")
    assert code == 502  # b was not needed: it does not hold the client


def test_a_silent_node_is_left_once_the_keepalive_gives_up(cluster_factory):
    """No RST, no FIN: the client's keepalive finds the link dead; the silent
    node is tried last, so its hanging port costs nothing."""
    cluster = cluster_factory(Scripted("bca", "ac"), yamux_config=KEEPALIVE)
    cluster.start()
    assert cluster.holder() == "b"
    silent = cluster.clock.seconds()
    cluster.nodes["b"].silence()
    back = cluster.until_moved()
    # the next ping is due within 2 s, its answer within 1 s; then one delay
    assert back - silent <= 2.0 + 1.0 + 0.05
    assert cluster.holder() == "a"
    assert cluster.nodes["a"].get(b"/echo?echo=back") == (200, b"back")


def test_a_stopping_node_sends_its_client_to_another(cluster_factory):
    cluster = cluster_factory(Scripted("cab", "ba"))
    cluster.start()
    assert cluster.holder() == "c"
    node = cluster.nodes["c"]
    stopped = node.server.stop(grace=5.0)  # GoAway; closes the session once idle
    node.alive = False
    node.listener.stopListening()
    back = cluster.until_moved()
    assert back == 0.05 and results(stopped) == [None]
    assert cluster.holder() == "b"
    assert cluster.nodes["b"].get(b"/echo?echo=moved") == (200, b"moved")


def test_a_node_that_does_not_know_the_client_is_passed_over(cluster_factory):
    cluster = cluster_factory(Scripted("bac"), strangers="b")
    errors = []
    cluster.client.observe_states(lambda change: errors.append(change.error))
    assert cluster.start() == 0.05
    assert cluster.holder() == "a"
    [refusal] = [e for e in errors if e is not None]
    assert isinstance(refusal, TunnelServerError) and "status=502" in str(refusal)
    assert "no host associated" in str(refusal) and IDENT not in str(refusal)
    assert cluster.nodes["a"].get(b"/echo?echo=a") == (200, b"a")


def test_a_node_that_refuses_a_duplicate_is_passed_over(cluster_factory):
    """Another client holds the identifier on node b (say, the old node of a
    cluster has not let go yet): b refuses this one, which goes on to c."""
    cluster = cluster_factory(Scripted("bca"))
    incumbent = cluster.make_client(never, nodes="b")
    incumbent.startService()
    cluster.net.flush()
    assert cluster.holder() == "b"
    errors = []
    cluster.client.observe_states(lambda change: errors.append(change.error))
    assert cluster.start() == 0.05
    assert str(cluster.client.current_server) == "c"
    assert cluster.nodes["c"].holds_client and cluster.nodes["b"].holds_client
    refusal = [e for e in errors if isinstance(e, TunnelServerError)]
    assert len(refusal) == 1 and "already exist" in str(refusal[0])
    assert IDENT not in str(refusal[0])  # the server's text, the identifier redacted


# -- 4. real processes: two twistd servers, one client, SIGKILL ------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_client_fails_over_when_its_server_is_killed(tmp_path):
    origin_port = reactor.listenTCP(0, Site(Origin()), interface="127.0.0.1")
    ident_file = tmp_path / "identifier"
    ident_file.write_text(IDENTIFIER + "\n")
    processes: list[Twistd] = []
    try:
        # the two servers start side by side
        started = [Deferred.fromCoroutine(start_server(processes)) for _ in range(2)]
        (first, first_port), (second, second_port) = await gatherResults(started)
        servers = {first_port: first, second_port: second}
        client = spawn_client([first_port, second_port], ident_file, origin_port.getHost().port)
        processes.append(client)

        async def served_by_one():
            codes = {port: (await public_get(port, "/up"))[0] for port in servers}
            ready = [port for port, code in codes.items() if code == 200]
            return ready[0] if ready else None

        used = await until_children("the tunnel to come up", served_by_one, first, second, client)
        other = second_port if used == first_port else first_port
        servers[used].signal("KILL")
        await servers[used].ended()

        async def served_by_the_other():
            code, body = await public_get(other, "/after")
            return body if code == 200 else None

        body = await until_children(
            "the client to fail over", served_by_the_other, servers[other], client, timeout=10
        )
        assert body.startswith(b"origin says hi: /after host=app.localhost")
        log = client.log
        assert f"tunnel to the server is up at tcp:127.0.0.1:{used} (" in log, log
        assert f"tunnel to the server at tcp:127.0.0.1:{used} lost" in log, log
        assert f"tunnel to the server is up at tcp:127.0.0.1:{other} (" in log, log
        assert "Traceback" not in log
        for p in processes:
            assert IDENTIFIER not in p.log, p.log
    finally:
        await reap_all(processes)
        await origin_port.stopListening()
