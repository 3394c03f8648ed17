"""The cluster glue (``tunnel.server.cluster``): how one node's registry uses
presence and the links, with both replaced by scripted fakes so every
decision is exact.  The real parts have their own tests
(``test_presence``, ``test_cluster_link``) and meet in ``test_cluster_nodes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tunnel.koding.identifiers import TunnelKey
from tunnel.server import TunnelServer
from tunnel.server.cluster import (
    MAX_TRIES,
    PROBE_ALLOWANCE,
    Cluster,
    ClusterStats,
    RemoteTunnel,
)
from tunnel.server.clusterstreams import NodeUnreachable
from tunnel.server.errors import NoClientSession, TunnelTimeout
from tunnel.server.pool import OriginLeg
from tunnel.server.rules import HostRules
from tunnel.server.store import StoreError
from tunnel.yamux import YamuxSession

from .memory import MemoryTunnel

KEY = TunnelKey.of("cluster-unit-identifier")


@dataclass(frozen=True)
class Member:
    node: str
    address: str


B = Member("b", "127.0.0.2:7000")
C = Member("c", "127.0.0.3:7000")


class FakePresence:
    refresh = 1.0
    cache = 1.0
    node = "here"

    def held(self) -> int:
        return 7

    def __init__(self) -> None:
        self.claims: list = []  # answers of claim(), in order
        self.located: object = []  # answer of locate(): a list, or an exception
        self.took_over = False
        self.calls: list[tuple] = []
        self.pooled: list[bool] = []  # claim()'s pooled argument, in order

    def start(self) -> None:
        self.calls.append(("start",))

    def stop(self) -> Deferred:
        self.calls.append(("stop",))
        return succeed(None)

    def claim(self, key, pooled=False) -> Deferred:
        self.calls.append(("claim", key))
        self.pooled.append(pooled)
        answer = self.claims.pop(0)
        if isinstance(answer, Deferred):
            return answer  # Redis has not answered yet
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)

    def take_over(self, key, holder) -> Deferred:
        self.calls.append(("take_over", key, holder))
        return succeed(self.took_over)

    def release(self, key) -> Deferred:
        self.calls.append(("release", key))
        return succeed(None)

    def locate(self, key) -> Deferred:
        self.calls.append(("locate", key))
        if isinstance(self.located, Exception):
            return fail(self.located)
        return succeed(list(self.located))

    def forget(self, key) -> None:
        self.calls.append(("forget", key))


class FakeLinks:
    def __init__(self) -> None:
        self.alive: object = True  # probe's answer, or an exception
        self.opened: list[tuple] = []
        self.answer: object = "stream"  # open_tunnel's answer, or an exception
        self.closed = False
        self.clock = None
        self.takes = 0.0

    def probe(self, node, address, key, timeout) -> Deferred:
        if isinstance(self.alive, Exception):
            return fail(self.alive)
        return succeed(self.alive)

    def open_tunnel(self, node, address, key, protocol, port, timeout) -> Deferred:
        self.opened.append((node, address, key, protocol, port, timeout))
        if self.clock is not None:
            self.clock.advance(self.takes)  # each try takes this long to fail or succeed
        answer = self.answer.get(node) if isinstance(self.answer, dict) else self.answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def close(self) -> Deferred:
        self.closed = True
        return succeed(None)

    def links(self) -> list:
        return ["a link"]


def node() -> tuple[TunnelServer, Cluster, FakePresence, FakeLinks]:
    server = TunnelServer(clock=Clock())  # the cluster runs on the server's clock
    presence, links = FakePresence(), FakeLinks()
    return server, Cluster(server, presence, links), presence, links


class LinkStream(StringTransport):
    """A stream on a cluster link that is not draining (all ``keep`` asks of it)."""

    def __init__(self, draining: bool = False) -> None:
        super().__init__()
        self.session = type("Link", (), {"remote_go_away": 0 if draining else None})()


def link_leg(draining: bool = False) -> OriginLeg:
    """An OriginLeg on a stream to another node, as a forwarder leaves it."""
    leg = OriginLeg()
    leg.transport = LinkStream(draining)
    return leg


def result(d: Deferred):
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


# -- admission: the koding duplicate rule, cluster-wide ------------------------------------


def test_a_tunnel_no_node_holds_is_admitted_and_claimed():
    server, cluster, presence, links = node()
    presence.claims = [None]
    assert result(server.check_duplicate(KEY)) is False
    assert ("claim", KEY) in presence.calls


def test_a_live_client_on_another_node_wins():
    server, cluster, presence, links = node()
    presence.claims = [B]
    links.alive = True
    assert result(server.check_duplicate(KEY)) is True
    assert not any(call[0] == "take_over" for call in presence.calls)


def test_a_dead_client_on_another_node_is_replaced():
    server, cluster, presence, links = node()
    presence.claims = [B]
    links.alive = False
    presence.took_over = True
    assert result(server.check_duplicate(KEY)) is False
    assert ("take_over", KEY, "b") in presence.calls


def test_a_holder_that_let_go_meanwhile_is_claimed_again():
    server, cluster, presence, links = node()
    presence.claims = [B, None]
    links.alive = False
    presence.took_over = False  # b removed its record when its client's session ended
    assert result(server.check_duplicate(KEY)) is False
    presence.claims = [B, C]
    assert result(server.check_duplicate(KEY)) is True  # c got it first


def test_a_holder_that_cannot_be_asked_keeps_the_tunnel_until_its_record_expires():
    server, cluster, presence, links = node()
    presence.claims = [B]
    links.alive = NoClientSession()
    assert result(server.check_duplicate(KEY)) is True


def test_redis_down_admits_on_this_nodes_word_and_records_it_once_redis_is_back():
    server, cluster, presence, links = node()
    presence.claims = [StoreError("redis is down"), StoreError("still down"), None]
    assert result(server.check_duplicate(KEY)) is False
    server.clock.advance(presence.refresh)  # tried again: still down
    server.clock.advance(presence.refresh)  # recorded
    assert [c for c in presence.calls if c[0] == "claim"] == [("claim", KEY)] * 3
    server.clock.advance(presence.refresh * 10)
    assert len([c for c in presence.calls if c[0] == "claim"]) == 3
    assert not server.clock.getDelayedCalls()


def test_a_tunnel_let_in_unrecorded_and_gone_meanwhile_is_not_recorded():
    server, cluster, presence, links = node()
    presence.claims = [StoreError("redis is down")]
    assert result(server.check_duplicate(KEY)) is False
    server.control_abandoned(KEY)  # its connection went before attaching
    assert not server.clock.getDelayedCalls()


def test_a_record_another_node_took_closes_the_client_here():
    server, cluster, presence, links = node()
    presence.claims = [StoreError("redis is down"), B]
    result(server.check_duplicate(KEY))
    closed = []
    server.disconnect = lambda key: closed.append(key) or True
    server.clock.advance(presence.refresh)  # b recorded it first: the newest claimant wins
    assert closed == [KEY]


def test_an_unexpected_failure_admits_and_is_logged():
    server, cluster, presence, links = node()
    presence.claims = [RuntimeError("bug")]
    errors = []
    globalLogPublisher.addObserver(errors.append)
    try:
        assert result(server.check_duplicate(KEY)) is False
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert [e for e in errors if e.get("log_failure") is not None]


def test_a_control_request_gone_before_its_session_attached_is_released():
    server, cluster, presence, links = node()
    server.control_abandoned(KEY)
    assert ("release", KEY) in presence.calls


# -- routing: a tunnel not held here is reached through its holder -------------------------


def open_remote(cluster: Cluster, key: TunnelKey) -> Deferred:
    """What a request does: a RemoteTunnel's open (the holders taken in turn)."""
    return cluster.tunnel(key).open_tunnel(1, 80, 1.0)


def test_a_tunnel_not_held_here_routes_to_the_cluster():
    server, cluster, presence, links = node()
    tunnel = server.route(KEY)
    assert isinstance(tunnel, RemoteTunnel) and tunnel.key == KEY


def test_without_a_cluster_a_tunnel_not_held_here_has_no_route():
    assert TunnelServer(clock=Clock()).route(KEY) is None


def test_a_remote_open_asks_the_holder_over_its_link():
    server, cluster, presence, links = node()
    presence.located = [B]
    stream = result(server.route(KEY).open_tunnel(1, 8080, 7.0))
    assert stream == "stream"
    assert links.opened == [("b", "127.0.0.2:7000", KEY, 1, 8080, 7.0)]


def test_several_holders_take_turns():
    server, cluster, presence, links = node()
    presence.located = [B, C]
    for _ in range(4):
        result(open_remote(cluster, KEY))
    assert [o[0] for o in links.opened] == ["b", "c", "b", "c"]


def test_holders_take_turns_over_kept_streams_too():
    server, cluster, presence, links = node()
    presence.located = [B, C]
    presence.cache = 1.0
    served = []
    for _ in range(6):
        tunnel = server.route(KEY)
        leg = tunnel.reuse(80)
        if leg is None:
            result(tunnel.open_tunnel(1, 80, 1.0))
            leg = link_leg()
        served.append(tunnel.member.node)
        assert tunnel.keep(80, leg)  # the response was complete: kept for its holder
    assert served == ["b", "c"] * 3
    assert [o[0] for o in links.opened] == ["b", "c"]  # then each holder's kept stream
    server.clock.advance(1.5)  # the lookup is older than the presence cache: look again
    tunnel = server.route(KEY)
    assert tunnel.reuse(80) is None
    result(tunnel.open_tunnel(1, 80, 1.0))
    assert len(links.opened) == 3


def test_no_holder_is_no_client_session():
    server, cluster, presence, links = node()
    presence.located = []
    failure = result(open_remote(cluster, KEY))
    assert failure.check(NoClientSession)
    assert links.opened == []


def test_a_holder_that_lost_the_client_is_forgotten():
    server, cluster, presence, links = node()
    presence.located = [B]
    links.answer = NoClientSession()
    assert result(open_remote(cluster, KEY)).check(NoClientSession)
    assert ("forget", KEY) in presence.calls
    # and Redis going down now does not bring the forgotten holder back
    presence.located = StoreError("down")
    assert result(open_remote(cluster, KEY)).check(NoClientSession)
    assert len(links.opened) == 1


def test_a_holder_that_lost_the_client_passes_the_request_to_the_next():
    server, cluster, presence, links = node()
    presence.located = [B, C]
    links.answer = {"b": NoClientSession(), "c": "stream from c"}
    assert result(open_remote(cluster, KEY)) == "stream from c"
    assert [o[0] for o in links.opened] == ["b", "c"]
    links.answer = {"b": NoClientSession(), "c": NoClientSession()}
    assert result(open_remote(cluster, KEY)).check(NoClientSession)


def test_a_request_is_offered_to_a_few_holders_at_most():
    server, cluster, presence, links = node()
    presence.located = [Member(f"n{i}", f"127.0.0.1:{7000 + i}") for i in range(10)]
    links.answer = NoClientSession()
    assert result(open_remote(cluster, KEY)).check(NoClientSession)
    assert len(links.opened) == MAX_TRIES


def test_a_pooled_tunnel_is_claimed_as_pooled():
    server, cluster, presence, links = node()
    server.add_host("pool.test", KEY, HostRules(pool=True))
    presence.claims = [None]
    assert result(server.check_duplicate(KEY)) is False
    assert presence.pooled == [True]


def test_other_failures_pass_through_with_their_own_meaning():
    server, cluster, presence, links = node()
    presence.located = [B]
    links.answer = TunnelTimeout()
    assert result(open_remote(cluster, KEY)).check(TunnelTimeout)
    assert ("forget", KEY) not in presence.calls


def test_while_redis_is_down_the_last_known_holder_serves():
    server, cluster, presence, links = node()
    presence.located = [B]
    result(open_remote(cluster, KEY))
    presence.located = StoreError("redis is down")
    assert result(open_remote(cluster, KEY)) == "stream"
    assert [o[0] for o in links.opened] == ["b", "b"]
    never_seen = TunnelKey.of("never-looked-up")
    assert result(open_remote(cluster, never_seen)).check(NoClientSession)


def test_stats_count_what_is_sent_to_other_nodes():
    server, cluster, presence, links = node()
    presence.located = []
    assert result(open_remote(cluster, KEY)).check(NoClientSession)  # no holder: not sent
    presence.located = [B]
    for _ in range(2):
        tunnel = server.route(KEY)
        assert tunnel.reuse(80) is None
        result(tunnel.open_tunnel(1, 80, 1.0))
    leg = link_leg()
    assert tunnel.keep(80, leg)
    tunnel = server.route(KEY)
    assert tunnel.reuse(80) is leg  # a kept stream: sent too
    assert cluster.stats() == ClusterStats("here", 7, 3, ("a link",))


# -- life ----------------------------------------------------------------------------------


def test_stop_removes_records_then_closes_links_and_keeps_no_stream():
    server, cluster, presence, links = node()
    cluster.start()
    assert result(cluster.stop()) is None
    assert [c[0] for c in presence.calls] == ["start", "stop"]
    assert links.closed


@pytest.mark.parametrize("stopping", [False, True])
def test_streams_are_kept_only_while_serving(stopping):
    server, cluster, presence, links = node()
    if stopping:
        result(server.stop())  # no client: done at once, and nothing is kept from now on
    leg = link_leg()
    assert cluster.keep(KEY, 80, "b", leg) is not stopping
    assert cluster.reuse(KEY, 80, "b") is (None if stopping else leg)
    assert cluster.reuse(KEY, 81, "b") is None


# -- what the review of the cluster found ------------------------------------------------


def session(clock: Clock) -> YamuxSession:
    """A client session on a StringTransport."""
    s = YamuxSession(False, clock=clock)
    s.makeConnection(StringTransport())
    return s


def attach_ready(server: TunnelServer, key=KEY):
    connection = server.attach_session(key, session(server.clock))
    connection.ready = True  # stands for a finished control handshake
    return connection


def test_a_session_ending_while_a_newcomers_claim_is_under_way_releases_nothing():
    server, cluster, presence, links = node()
    server.add_host("pool.test", KEY, HostRules(pool=True))
    answer: Deferred = Deferred()
    presence.claims = [None, answer]
    result(server.check_duplicate(KEY))
    first = attach_ready(server)
    pending = server.check_duplicate(KEY)
    first.session.connectionLost(Failure(ConnectionDone()))
    answer.callback(None)
    assert result(pending) is False
    second = attach_ready(server)  # the newcomer attaches: still held, not released
    assert ("release", KEY) not in presence.calls
    second.session.connectionLost(Failure(ConnectionDone()))
    assert presence.calls.count(("release", KEY)) == 1


def test_a_second_newcomer_waits_behind_the_first_on_one_node():
    server, cluster, presence, links = node()
    answer: Deferred = Deferred()
    presence.claims = [answer]
    first = server.check_duplicate(KEY)
    # a peer's PROBE meanwhile hears that the tunnel is held here
    assert result(server.probe_local(KEY)) is True
    second = server.check_duplicate(KEY)  # the same identifier a moment later
    assert result(second) is True  # a duplicate: the first is being admitted
    assert presence.calls.count(("claim", KEY)) == 1
    answer.callback(None)
    assert result(first) is False
    attach_ready(server)
    assert ("release", KEY) not in presence.calls


def test_a_refused_or_abandoned_newcomer_releases_what_it_claimed():
    server, cluster, presence, links = node()
    presence.claims = [None]
    assert result(server.check_duplicate(KEY)) is False
    server.control_abandoned(KEY)  # its connection went before attaching
    assert presence.calls.count(("release", KEY)) == 1
    presence.claims = [B]
    links.alive = True
    assert result(server.check_duplicate(KEY)) is True  # refused: b's client is alive
    assert presence.calls.count(("release", KEY)) == 2  # nothing held here: released


def test_a_withdrawn_probe_closes_no_live_client():
    server, cluster, presence, links = node()
    connection = attach_ready(server)
    d = server.probe_local(KEY)  # what a peer's PROBE does
    d.addErrback(lambda f: None)
    d.cancel()  # the peer's stream went away before the pong
    assert not connection.session.closed and not connection.session.transport.disconnecting
    server.clock.advance(server.probe_timeout)
    assert not connection.session.closed


def test_an_unanswered_probe_closes_the_client_that_does_not_answer():
    server, cluster, presence, links = node()
    connection = attach_ready(server)
    d = server.probe_local(KEY)
    server.clock.advance(server.probe_timeout)
    assert result(d) is False
    assert connection.session.transport.disconnecting  # aborted


def test_a_probe_outlasts_the_holders_own_ping():
    server, cluster, presence, links = node()
    assert cluster.probe_timeout == server.probe_timeout + PROBE_ALLOWANCE > server.probe_timeout


def test_a_draining_client_gets_no_new_request():
    server, cluster, presence, links = node()
    connection = attach_ready(server)
    connection.session.go_away()
    assert result(connection.open_tunnel(1, 80, 5.0)).check(NoClientSession)
    assert server.pick_member(KEY) is None


def test_the_tries_of_one_request_share_its_timeout():
    server, cluster, presence, links = node()
    presence.located = [B, C, Member("d", "127.0.0.4:7000")]
    links.clock, links.takes = server.clock, 2.0
    links.answer = NodeUnreachable("refused")
    assert result(cluster.open_remote(KEY, 1, 80, 5.0)).check(TunnelTimeout, NodeUnreachable)
    assert [o[5] for o in links.opened] == [5.0, 3.0, 1.0]


def test_an_unreachable_holder_stays_known_while_redis_cannot_be_asked():
    server, cluster, presence, links = node()
    presence.located = [B]
    result(open_remote(cluster, KEY))
    presence.located = StoreError("redis is down")
    links.answer = NodeUnreachable("b's link is being re-dialled")
    assert result(open_remote(cluster, KEY)).check(NoClientSession)
    links.answer = "stream"
    assert result(open_remote(cluster, KEY)) == "stream"  # b still served, from memory


def test_no_stream_is_kept_on_a_link_that_drains():
    server, cluster, presence, links = node()
    assert not cluster.keep(KEY, 80, "b", link_leg(draining=True))
    assert cluster.reuse(KEY, 80, "b") is None


def test_empty_kept_stream_pools_do_not_pile_up():
    server, cluster, presence, links = node()
    for n in range(50):
        leg = link_leg()
        assert cluster.keep(KEY, 80, f"node{n}", leg)
        assert cluster.reuse(KEY, 80, f"node{n}") is leg  # used: that pool is empty
    leg = link_leg()
    cluster.keep(KEY, 80, "last", leg)
    assert cluster.reuse(KEY, 80, "node0") is None
    assert len([n for n in range(50) if cluster.reuse(KEY, 80, f"node{n}")]) == 0
    assert cluster.stats().links == ("a link",)


def test_a_client_let_in_after_the_server_began_to_stop_is_turned_away():
    with MemoryTunnel().start(connect=False) as env:
        presence, links = FakePresence(), FakeLinks()
        Cluster(env.server, presence, links)
        answer: Deferred = Deferred()
        presence.claims = [answer]
        client = env.make_client()
        client.startService()
        env.flush()
        assert presence.calls == [("claim", TunnelKey.of(env.IDENT))]  # under way
        stopping = env.server.stop(grace=1.0)
        answer.callback(None)  # Redis: ours; but the server is stopping now
        env.flush()
        assert env.server.connections() == []
        assert ("release", TunnelKey.of(env.IDENT)) in presence.calls
        assert "shutting down" in str(client.last_error)
        assert result(stopping) is None
        client.stopService()
        env.flush()
