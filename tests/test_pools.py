"""Pooled hosts (the rule ``"pool": true``): several clients hold one tunnel.

In memory (tests/memory.py: real sessions, the Clock), two clients of one
identifier, each with its own origin, so that every response says which
client served it; and once through real ``twistd`` processes, one client
killed with SIGKILL.
"""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.web.resource import Resource
from twisted.web.server import Site

from tunnel.koding.identifiers import TunnelKey
from tunnel.koding.states import ClientState
from tunnel.server.metrics import Metrics
from tunnel.server.pages import NO_CLIENT_SESSION
from tunnel.server.registry import PooledTunnel, TunnelServer
from tunnel.server.rules import HostRules

from .live import http_client
from .memory import ClockRequest, MemoryTunnel, parse_response
from .processes import (
    Twistd,
    free_port,
    reap_all,
    spawn_client,
    spawn_twistd,
    stop,
    until_children,
)
from .tunnel_env import Origin

POOL = HostRules(pool=True)
KEY = TunnelKey.coerce(MemoryTunnel.IDENT)
GET = b"GET %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n"


class TwoClients:
    """A MemoryTunnel whose host is pooled, with clients ``a`` (origin on
    8000) and ``b`` (origin on 8001), both connected."""

    def __init__(self, *, pooled: bool = True) -> None:
        self.env = env = MemoryTunnel().start(connect=False)
        env.server.add_host(env.HOST, env.IDENT, POOL if pooled else None)
        self.origin_a = env.origin
        self.origin_b = Origin(clock=env.clock)
        env.listen(Site(self.origin_b, requestFactory=ClockRequest, reactor=env.clock), 8001)
        self.a = env.make_client()
        self.a.startService()
        env.flush()
        self.b = env.make_client(local="tcp:127.0.0.1:8001")
        self.b.startService()
        env.flush()

    def __enter__(self) -> TwoClients:
        return self

    def __exit__(self, *exc) -> None:
        self.env.__exit__(*exc)

    @property
    def members(self):
        return self.env.server.connections_of(KEY)

    def served_by(self, path: bytes = b"/echo?echo=x") -> str:
        """Which client's origin answered one GET (it must be a 200)."""
        seen = len(self.origin_a.seen), len(self.origin_b.seen)
        response = self.env.get(path)
        assert response.code == 200, response
        after = len(self.origin_a.seen), len(self.origin_b.seen)
        assert sum(after) - sum(seen) == 1
        return "a" if after[0] > seen[0] else "b"

    def kill(self, client) -> None:
        """``client`` dies at once (its connection reset) and stays away."""
        client.protocol.transport.abortConnection()
        client.stopService()
        self.env.flush()


def test_two_clients_of_a_pooled_host_are_both_admitted():
    with TwoClients() as pool:
        assert pool.a.state == pool.b.state == ClientState.CONNECTED
        first, second = pool.members
        assert first.ready and second.ready and first is not second
        assert pool.env.server.state(KEY) == ClientState.CONNECTED
        assert pool.env.server.connection(KEY) is second  # the newest ready one


def test_at_rest_requests_alternate_between_the_clients():
    with TwoClients() as pool:
        assert [pool.served_by() for _ in range(6)] == ["a", "b"] * 3
        assert [m.stats().requests for m in pool.members] == [3, 3]
        # each kept the stream of its first request for its next ones: one
        # stream (and the control stream) each, for six requests
        assert [len(m.session.streams) for m in pool.members] == [2, 2]
        assert [m.outstanding for m in pool.members] == [0, 0]


def test_the_client_with_fewest_outstanding_streams_wins():
    with TwoClients() as pool:
        env = pool.env
        slow = env.connect()
        slow.send(GET % b"/delay?n=5")  # a's origin answers in 5 s
        env.flush()
        assert len(pool.origin_a.seen) == 1
        a, b = pool.members
        assert (a.outstanding, b.outstanding) == (1, 0)
        # while a is busy, b takes every request, even those in turn for a
        assert [pool.served_by() for _ in range(3)] == ["b", "b", "b"]
        env.advance(5)
        assert parse_response(slow.take()).body == b"late"
        assert (a.outstanding, b.outstanding) == (0, 0)
        slow.close()


def test_a_client_that_leaves_loses_no_request():
    with TwoClients() as pool:
        assert [pool.served_by() for _ in range(2)] == ["a", "b"]
        pool.kill(pool.a)
        (left,) = pool.members
        assert left.session is not None and pool.env.server.state(KEY) == ClientState.CONNECTED
        assert [pool.served_by() for _ in range(4)] == ["b"] * 4


def test_a_request_whose_client_goes_before_giving_a_stream_is_tried_on_another():
    with TwoClients() as pool:
        env = pool.env
        a, b = pool.members
        # a hears nothing more: the request's control message waits in the link
        link = pool.a.protocol.transport.connection
        link.freeze()
        public = env.connect()
        public.send(GET % b"/echo?echo=moved")
        env.flush()
        assert (a.pending, b.pending) == (1, 0)
        # a's session ends (a reset the server sees) before a stream came
        a.session.transport.abortConnection()
        env.flush()
        response = parse_response(public.take())
        assert (response.code, response.body) == (200, b"moved")
        assert (len(pool.origin_a.seen), len(pool.origin_b.seen)) == (0, 1)
        assert pool.members == [b]
        pool.a.stopService()
        link.thaw()
        public.close()
        env.flush()


def test_a_pooled_tunnel_moves_a_request_once_only():
    """The retry is PooledTunnel's: one more member, never a loop."""
    with TwoClients() as pool:
        a, b = pool.members
        tunnel = pool.env.server.route(KEY)
        assert isinstance(tunnel, PooledTunnel) and tunnel.member is a
        a.close()
        b.close()
        pool.env.flush()
        assert pool.members == [] and pool.env.server.route(KEY) is None
        failures = []
        tunnel.open_tunnel(1, 0, 10).addErrback(failures.append)
        assert len(failures) == 1 and "no session" in failures[0].getErrorMessage()


def test_the_last_client_leaving_gives_the_usual_502():
    with TwoClients() as pool:
        env = pool.env
        states = []
        env.server.observe_states(lambda change: states.append(change.current))
        pool.kill(pool.a)
        assert states == []  # the tunnel is still served
        pool.kill(pool.b)
        assert states == [ClientState.CLOSED]
        response = env.get(b"/echo?echo=x")
        assert (response.code, response.body) == (502, NO_CLIENT_SESSION.encode() + b"\n")


def test_a_host_that_is_not_pooled_still_refuses_a_live_duplicate():
    with TwoClients(pooled=False) as pool:
        (only,) = pool.members
        assert pool.a.state == ClientState.CONNECTED
        assert pool.b.state != ClientState.CONNECTED
        assert "already exist" in str(pool.b.last_error)
        assert [pool.served_by() for _ in range(2)] == ["a", "a"]


def test_a_host_no_longer_pooled_keeps_its_clients_and_refuses_new_ones():
    with TwoClients() as pool:
        env = pool.env
        env.server.add_host(env.HOST, env.IDENT, None)  # the rule is removed
        assert not env.server.pooled(KEY)
        assert [pool.served_by() for _ in range(2)] == ["a", "b"]
        third = env.make_client()
        third.startService()
        env.advance(1)
        assert "already exist" in str(third.last_error) and len(pool.members) == 2
        third.stopService()
        env.flush()


def test_kicking_a_pooled_tunnel_closes_every_client():
    with TwoClients() as pool:
        env = pool.env
        first, second = pool.members
        assert env.server.disconnect(KEY)
        env.flush()
        assert first.closed and second.closed
        # both clients come back, as after any lost session
        env.run_until(lambda: len([m for m in pool.members if m.ready]) == 2, limit=5)
        assert not set(pool.members) & {first, second}


def test_operators_see_every_client_of_a_pool():
    with TwoClients() as pool:
        server = pool.env.server
        seen = []
        server.observe_members(seen.append)
        pool.served_by()
        pool.served_by()
        a, b = pool.members
        assert set(server.connections()) == {a, b}
        stats = [m.stats() for m in (a, b)]
        assert [s.fingerprint for s in stats] == [KEY.fingerprint] * 2
        assert [s.requests for s in stats] == [1, 1]
        assert stats[0].remote != stats[1].remote
        # a client that reconnects is announced as a member (states stay put)
        pool.b.protocol.transport.abortConnection()
        pool.env.run_until(lambda: len(seen) == 1, limit=5)
        assert seen[0].ready and seen[0] is not b and seen[0] in pool.members


def test_a_remote_nodes_request_is_spread_over_the_pool_too():
    with TwoClients() as pool:
        server = pool.env.server
        a, b = pool.members
        opened = []
        for _ in range(2):
            server.serve_remote(KEY, 1, 0).addCallback(opened.append)
            pool.env.flush()
        assert [s.session for s in opened] == [a.session, b.session]
        assert [m.stats().requests for m in (a, b)] == [1, 1]
        for stream in opened:
            stream.abortConnection()
        pool.env.flush()


# -- the registry's decisions, without sessions ------------------------------------------


class Nodes:
    """An ``OtherNodes`` that records what it is asked and admits everyone."""

    def __init__(self) -> None:
        self.admitted: list[tuple[TunnelKey, bool]] = []
        self.releases: list[TunnelKey] = []

    def tunnel(self, key):
        raise AssertionError("not asked in these tests")

    def admit(self, key, *, pooled):
        self.admitted.append((key, pooled))
        return succeed(False)

    def released(self, key):
        self.releases.append(key)


def test_in_a_cluster_a_pooled_control_request_is_admitted_by_the_cluster_as_pooled():
    server = TunnelServer()
    nodes = Nodes()
    server.join_cluster(nodes)
    server.add_host("pool.localhost", "ident", POOL)
    server.add_host("solo.localhost", "other", None)
    results = []
    server.check_duplicate("ident").addCallback(results.append)
    server.check_duplicate("other").addCallback(results.append)
    assert results == [False, False]
    assert nodes.admitted == [
        (TunnelKey.coerce("ident"), True),
        (TunnelKey.coerce("other"), False),
    ]


def test_a_tunnel_is_pooled_while_any_host_naming_it_has_the_rule():
    server = TunnelServer()
    assert not server.pooled("ident")
    server.add_host("a.localhost", "ident", POOL)
    server.add_host("b.localhost", "ident", HostRules())
    assert server.pooled("ident")
    server.add_host("a.localhost", "elsewhere", POOL)  # a.localhost moves to another tunnel
    assert not server.pooled("ident") and server.pooled("elsewhere")
    server.add_host("b.localhost", "ident", POOL)
    server.delete_host("b.localhost")
    assert not server.pooled("ident")


@pytest_twisted.ensureDeferred
async def test_a_stored_pool_rule_reaches_the_server_through_routes(tmp_path):
    """Routes give the web layer None for rules that are empty, and the
    registry must still see a host whose one rule is ``pool``; SQLite keeps
    it, and rules stored before it existed load unpooled."""
    from tunnel.server.routes import Routes
    from tunnel.server.sqlite import SQLiteStore

    async def served() -> tuple[TunnelServer, Routes]:
        server = TunnelServer()
        routes = Routes(server, await SQLiteStore.open(tmp_path / "registry.db"))
        await routes.start()
        return server, routes

    server, routes = await served()
    await routes.put_host("pool.localhost", "ident", {"pool": True})
    await routes.put_host("old.localhost", "other", {"rate": {"per_second": 1, "burst": 1}})
    assert server.pooled("ident") and not server.pooled("other")
    route, _ = server.vhosts.lookup("pool.localhost")
    assert route.rules.pool and not route.rules  # no access rule: no gate
    await routes.stop()
    server, routes = await served()
    assert server.pooled("ident") and not server.pooled("other")
    await routes.put_host("pool.localhost", "ident", {})  # the rule removed
    assert not server.pooled("ident")
    await routes.stop()


# -- through real processes -------------------------------------------------------------


class Named(Resource):
    """An origin that says which client's it is."""

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request):
        return self.name


async def pooled_get(port: int) -> tuple[int, bytes]:
    response = await http_client().get(
        f"http://127.0.0.1:{port}/", headers={"Host": "app.localhost"}, timeout=5
    )
    return response.code, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_twistd_pooled_host_survives_the_sigkill_of_one_client(tmp_path):
    identifier = "pooled-identifier-0123"
    ident_file = tmp_path / "identifier"
    ident_file.write_text(identifier + "\n")
    origins = [
        reactor.listenTCP(0, Site(Named(name)), interface="127.0.0.1") for name in (b"a", b"b")
    ]
    processes: list[Twistd] = []
    try:
        port = free_port()
        server = spawn_twistd(
            "tunnel-server",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--pool", "app.localhost",
            "--vhost", f"app.localhost={identifier}",
        )  # fmt: skip
        processes.append(server)
        clients = [spawn_client([port], ident_file, o.getHost().port) for o in origins]
        processes.extend(clients)
        seen: set[bytes] = set()

        async def both_serve():
            code, body = await pooled_get(port)
            if code == 200:
                seen.add(body)
            return True if seen == {b"a", b"b"} else None

        await until_children("both clients to serve", both_serve, server, *clients)
        clients[0].signal("KILL")
        await clients[0].ended()
        answers = [await pooled_get(port) for _ in range(20)]
        assert answers == [(200, b"b")] * 20, server.log
        assert "already exist" not in server.log
        await stop(clients[1])
        await stop(server)
        assert identifier not in server.log
    finally:
        await reap_all(processes)
        for origin in origins:
            await origin.stopListening()


def test_metrics_count_each_client_of_a_pool():
    with TwoClients() as pool:
        env = pool.env
        metrics = Metrics(env.server)

        def figures():
            found = {}
            for family in metrics.collect():
                for sample in family.samples:
                    found[sample.name] = sample.value
            return [
                found[name]
                for name in (
                    "tunnel_clients_connected",
                    "tunnel_client_connects_total",
                    "tunnel_client_disconnects_total",
                )
            ]

        assert figures() == [2, 0, 0]  # connected before the metrics were made
        pool.served_by()
        pool.served_by()
        assert env.server.disconnect(KEY)  # both go, both come back
        env.flush()
        env.run_until(lambda: len([m for m in pool.members if m.ready]) == 2, limit=5)
        assert figures() == [2, 2, 2]
        metrics.close()
