"""Tunnel presence in Redis: which node holds which tunnel, cluster-wide.

Runs on a real redis-server (``tests/redis_server.py``; skipped without
one): a module server for most tests, each under a key prefix of its own,
and a server of its own for the test that kills it.  Timing that is only
Presence's own (ticks, the lookup cache) runs on a ``Clock``; expiry runs
on Redis's real clock with TTLs of a fraction of a second, waited for with
a bounded poll through the reactor (``live.until``), never a sleep.

``python -m tests.test_presence`` measures the Redis commands per claim,
per refresh tick and per lookup, and the time of a refresh tick for 10,000
held tunnels.
"""

from __future__ import annotations

import time
import uuid

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, globalLogPublisher
from twisted.python.failure import Failure

from tunnel.koding.identifiers import TunnelKey
from tunnel.server.presence import Member, Presence, parse_members
from tunnel.server.redislink import Backoff, LinkState, RedisLink
from tunnel.server.store import StoreClosed, StoreError

from . import redis_server
from .helpers import Collect
from .live import until

K = TunnelKey.of("presence-test-identifier-never-stored")
K2 = TunnelKey.of("another-presence-identifier")
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)


@pytest.fixture(scope="module")
def redis():
    with redis_server.running() as server:
        yield server


class Cluster:
    """Nodes sharing one Redis under one prefix; ``close()`` ends them all."""

    def __init__(self, server) -> None:
        self.server = server
        self.prefix = f"p-{uuid.uuid4().hex[:12]}:"
        self.links: list[RedisLink] = []
        self.nodes: list[Presence] = []

    def link(self) -> RedisLink:
        link = RedisLink(
            clientFromString(reactor, self.server.endpoint),
            name=self.server.endpoint,
            timeout=2.0,
            backoff=FAST,
            clock=reactor,
        )
        self.links.append(link)
        return link

    def node(self, name: str, *, clock=reactor, link=None, **options) -> Presence:
        presence = Presence(
            link or self.link(),
            node=name,
            address=f"127.0.0.1:{7000 + len(self.nodes)}",
            prefix=self.prefix,
            clock=clock,
            **options,
        )
        self.nodes.append(presence)
        return presence

    def key(self, kind: str, key: TunnelKey) -> str:
        return f"{self.prefix}{kind}:{key.hex()}"

    def get(self, kind: str, key: TunnelKey):
        return self.server.command("GET", self.key(kind, key))

    def scripts(self) -> int:
        stats = self.server.commandstats()
        return stats.get("eval", 0) + stats.get("evalsha", 0)

    async def close(self) -> None:
        for presence in self.nodes:
            try:
                await presence.stop()
            except StoreError:
                pass
        await gatherResults([link.close() for link in self.links])


@pytest.fixture
def cluster(redis):
    return Cluster(redis)


def member(presence: Presence) -> Member:
    return Member(presence.node, presence.address)


async def wait(seconds: float) -> None:
    """Let the reactor run for ``seconds`` (Redis's TTLs run on real time)."""
    await deferLater(reactor, seconds, lambda: None)


# -- the logic alone, on a Clock and a link the test answers ---------------------------------


class Sent:
    def __init__(self, what: str, keys: list[str], args: list[str]) -> None:
        self.what, self.keys, self.args = what, keys, args
        self.answer: Deferred = Deferred()


class FakeLink:
    """Stands in for ``RedisLink``: each script waits for the test's answer."""

    def __init__(self) -> None:
        self.state = LinkState.READY
        self.sent: list[Sent] = []
        self._what = ""

    def run(self, what, call):
        self._what = what
        return call(self)

    def eval(self, script, keys, args):
        self.sent.append(Sent(self._what, keys, args))
        return self.sent[-1].answer


def fake_node(**options):
    clock, link = Clock(), FakeLink()
    presence = Presence(
        link, node="a", address="127.0.0.1:1", prefix="p:", clock=clock, refresh=1.0, **options
    )
    return presence, link, clock


def outcome(d):
    box: list = []
    d.addBoth(box.append)
    assert box, "not answered"
    return box[0].value if isinstance(box[0], Failure) else box[0]


def test_ticks_never_overlap_and_wait_while_the_link_is_down():
    presence, link, clock = fake_node()
    presence.start()
    assert [s.what for s in link.sent] == ["presence refresh"]
    clock.advance(5)
    assert len(link.sent) == 1  # the first tick is still under way
    link.sent[0].answer.callback([])
    clock.advance(0)  # overdue: at once
    assert len(link.sent) == 2 and presence.ticks == 1
    link.sent[1].answer.callback([])
    link.state = LinkState.WAITING
    clock.advance(1)
    clock.advance(1)
    assert len(link.sent) == 2  # the link retries on its own backoff
    link.state = LinkState.READY
    clock.advance(1)
    assert len(link.sent) == 3
    link.sent[2].answer.errback(StoreError("Redis r is unavailable"))
    link.state = LinkState.CLOSED  # its owner closed it: the loop ends
    clock.advance(1)
    assert len(link.sent) == 3 and not clock.getDelayedCalls()


def test_while_the_link_waits_to_retry_nothing_asks_redis():
    presence, link, clock = fake_node()
    link.state = LinkState.WAITING  # Redis known down: the link waits out its backoff
    key = TunnelKey.of("waiting")
    for asked in (
        presence.claim(key),
        presence.claim(key, pooled=True),
        presence.take_over(key, "b"),
        presence.locate(key),
        presence.release(key),
    ):
        assert isinstance(outcome(asked), StoreError)
    assert link.sent == []  # no attempt started by a request
    link.state = LinkState.READY
    presence.locate(key)
    assert [s.what for s in link.sent] == ["presence locate"]


def test_answers_about_released_or_reclaimed_keys_change_nothing():
    lost: list = []
    presence, link, clock = fake_node(on_lost=lost.append)
    claim = presence.claim(K)
    presence.release(K)
    claim_sent, release_sent = link.sent
    assert release_sent.what == "presence release"
    claim_sent.answer.callback([])
    assert outcome(claim) is None and presence.held() == 0  # released meanwhile

    for key in (K, K2):
        d = presence.claim(key)
        link.sent[-1].answer.callback([])
        assert outcome(d) is None
    presence.start()
    tick = link.sent[-1]
    assert tick.keys == ["p:node:a", f"p:presence:{K.hex()}", f"p:presence:{K2.hex()}"]
    assert tick.args == ["a", "127.0.0.1:1", "5000", "p:node:", "s", "s"]
    presence.release(K)
    tick.answer.callback([1, 2])  # both taken; K was released meanwhile
    assert lost == [K2] and presence.held() == 0


def test_a_failing_on_lost_is_logged_and_the_loop_goes_on():
    def on_lost(key):
        raise RuntimeError("boom")

    presence, link, clock = fake_node(on_lost=on_lost)
    presence.claim(K)
    link.sent[-1].answer.callback([])
    presence.start()
    with capturedLogs() as events:
        link.sent[-1].answer.callback([1])
    assert [e for e in events if e.get("log_failure")]
    clock.advance(1)
    assert link.sent[-1].what == "presence refresh" and len(link.sent) == 3


@pytest.mark.parametrize(
    "garbage", [None, "x", [1, 2], ["a"], ["a b", "h:1"], [b"\xff", "h:1"], [["a"], "h"]]
)
def test_answers_that_are_not_holders_are_store_errors_and_not_cached(garbage):
    presence, link, clock = fake_node()
    claim = presence.claim(K)
    link.sent[-1].answer.callback(garbage)
    assert isinstance(outcome(claim), StoreError) and presence.held() == 0
    first, second = presence.locate(K), presence.locate(K)
    assert len(link.sent) == 2
    link.sent[-1].answer.callback(garbage)
    assert isinstance(outcome(first), StoreError) and isinstance(outcome(second), StoreError)
    presence.locate(K)
    assert len(link.sent) == 3  # not cached


def test_a_refresh_answer_that_is_not_positions_is_warned_about():
    presence, link, clock = fake_node()
    presence.start()
    with capturedLogs() as events:
        link.sent[-1].answer.callback(["x"])
    warned = [e for e in events if e["log_level"] >= LogLevel.warn]
    assert len(warned) == 1 and presence.ticks == 0
    clock.advance(1)
    assert len(link.sent) == 2  # the loop goes on


@given(st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=4), st.integers())))
def test_parse_members_takes_pairs_of_names_or_refuses(reply):
    try:
        members = parse_members(reply)
    except ValueError:
        return
    assert len(members) * 2 == len(reply)
    for m in members:
        assert 0 < len(m.node) <= 255 and m.node.isprintable()


# -- one holder per tunnel -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_claim_is_seen_by_another_node_and_only_digests_are_written(cluster):
    a, b = cluster.node("a"), cluster.node("b")
    try:
        assert await a.claim(K) is None
        assert await a.claim(K) is None  # ours already: still ours
        assert await b.claim(K) == member(a)
        assert a.held() == 1 and b.held() == 0
        assert cluster.get("presence", K) == b"a"
        assert cluster.server.command("GET", f"{cluster.prefix}node:a") == a.address.encode()
        ttl = cluster.server.command("PTTL", cluster.key("presence", K))
        assert 0 < ttl <= 5000
        assert await b.locate(K) == [member(a)]
        assert await a.locate(K) == []  # never itself
        keys = sorted(cluster.server.command("KEYS", f"{cluster.prefix}*"))
        assert keys == sorted(
            [cluster.key("presence", K).encode(), f"{cluster.prefix}node:a".encode()]
        )
        dump = b"".join(cluster.server.command("DUMP", k) for k in keys)
        assert b"presence-test-identifier" not in dump
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_a_release_removes_only_our_own_record(cluster):
    a, b = cluster.node("a"), cluster.node("b")
    try:
        await a.claim(K)
        await b.release(K)
        assert cluster.get("presence", K) == b"a"
        assert await b.claim(K) == member(a)
        await a.release(K)
        assert a.held() == 0 and cluster.get("presence", K) is None
        assert await b.claim(K) is None and b.held() == 1
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_take_over_only_while_the_holder_is_unchanged(cluster):
    a, b, c = cluster.node("a"), cluster.node("b"), cluster.node("c")
    try:
        await a.claim(K)
        assert await c.take_over(K, "b") is False  # a holds it, not b
        assert cluster.get("presence", K) == b"a" and c.held() == 0
        assert await b.take_over(K, "a") is True
        assert cluster.get("presence", K) == b"b" and b.held() == 1
        assert await c.take_over(K, "a") is False  # a no longer holds it
        assert await c.claim(K) == member(b)
        # nobody holds it: taking it over is claiming it
        assert await c.take_over(K2, "a") is True and cluster.get("presence", K2) == b"c"
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_a_node_that_stops_refreshing_loses_its_records_after_the_ttl(cluster):
    a, b = cluster.node("a", ttl=0.5, refresh=0.1), cluster.node("b", ttl=0.5)
    a.start()
    try:
        await a.claim(K)
        await wait(1.2)  # over two TTLs: a's refresh keeps it
        assert await b.claim(K) == member(a)
        # a's node is killed: its connection goes, nothing refreshes
        await cluster.links[0].close()
        assert await until(
            lambda: b.claim(K).addCallback(lambda holder: holder is None),
            timeout=5,
            what="b claiming after a's TTL",
        )
        assert b.held() == 1 and await b.locate(K) == []
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_a_holder_whose_node_record_expired_is_not_live(cluster):
    a, b = cluster.node("a"), cluster.node("b")
    try:
        await a.claim(K)
        cluster.server.command("DEL", f"{cluster.prefix}node:a")
        assert await b.locate(K) == []
        assert await b.claim(K) is None
        assert cluster.get("presence", K) == b"b"
    finally:
        await cluster.close()


# -- pools --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_pooled_tunnel_is_held_by_several_nodes(cluster):
    a, b = cluster.node("a", ttl=0.3), cluster.node("b", ttl=0.3)
    c = cluster.node("c", cache=0)
    try:
        assert await a.claim(K, pooled=True) is None
        assert await b.claim(K, pooled=True) is None
        assert a.held() == b.held() == 1
        assert sorted(await c.locate(K), key=lambda m: m.node) == [member(a), member(b)]
        assert await a.locate(K) == [member(b)]
        # a single claim is refused while the pool has live members elsewhere
        assert await c.claim(K) in (member(a), member(b))
        await b.release(K)
        assert await c.locate(K) == [member(a)]
        # a is not refreshed (never started): its member expires
        assert await until(
            lambda: c.locate(K).addCallback(lambda found: found == []),
            timeout=5,
            what="a's member expiring",
        )
        assert await c.claim(K) is None
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_expired_pool_members_are_pruned_and_scores_are_redis_time(cluster):
    a, b = cluster.node("a", ttl=0.3), cluster.node("b")
    try:
        await a.claim(K, pooled=True)
        seconds, micros = cluster.server.command("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        score = float(cluster.server.command("ZSCORE", cluster.key("pool", K), "a"))
        assert now_ms < score <= now_ms + 300
        assert 0 < cluster.server.command("PTTL", cluster.key("pool", K)) <= 300
        assert await until(
            lambda: cluster.server.command("EXISTS", cluster.key("pool", K)) == 0,
            timeout=5,
            what="the pool expiring with its last member",
        )
        await b.claim(K, pooled=True)
        members = cluster.server.command("ZRANGE", cluster.key("pool", K), 0, -1)
        assert members == [b"b"]
    finally:
        await cluster.close()


# -- lookups --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookups_are_cached_shared_and_failures_are_not_cached(cluster):
    clock = Clock()
    a, c = cluster.node("a"), cluster.node("c", clock=clock, cache=1.0)
    try:
        await a.claim(K)
        before = cluster.scripts()
        first, second = c.locate(K), c.locate(K)
        assert await first == [member(a)] and await second == [member(a)]
        assert cluster.scripts() - before == 1  # one round trip for both
        assert await c.locate(K) == [member(a)]
        assert cluster.scripts() - before == 1  # from the cache
        clock.advance(1.0)
        assert await c.locate(K) == [member(a)]
        assert cluster.scripts() - before == 2  # expired: asked again
        c.forget(K)
        assert await c.locate(K) == [member(a)]
        assert cluster.scripts() - before == 3
        # forgotten while a lookup is under way: answered, not cached
        clock.advance(1.0)
        during = c.locate(K)
        c.forget(K)
        await during
        await c.locate(K)
        assert cluster.scripts() - before == 5

        # a lookup that fails (the record is not a string) is not cached
        cluster.server.command("DEL", cluster.key("presence", K2))
        cluster.server.command("HSET", cluster.key("presence", K2), "x", "y")
        with pytest.raises(StoreError, match="presence locate"):
            await c.locate(K2)
        cluster.server.command("DEL", cluster.key("presence", K2))
        assert await c.locate(K2) == []
    finally:
        await cluster.close()


# -- the refresh loop ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_refresh_tick_is_one_script_whatever_the_count(cluster):
    clock = Clock()
    a = cluster.node("a", clock=clock, ttl=5.0, refresh=1.0)
    try:
        a.start()
        await until(lambda: a.ticks == 1, timeout=5, what="the first tick")
        keys = [TunnelKey.of(f"tunnel-{i}") for i in range(500)]
        await gatherResults([a.claim(key, pooled=i % 2 == 0) for i, key in enumerate(keys)])
        assert a.held() == 500
        # shorten every record, so the tick's refresh shows
        for i, key in enumerate(keys[:10]):
            kind = "pool" if i % 2 == 0 else "presence"
            cluster.server.command("PEXPIRE", cluster.key(kind, key), 100)
        before = cluster.server.commandstats()
        clock.advance(0.999)
        assert a.ticks == 1  # not yet
        clock.advance(0.001)
        await until(lambda: a.ticks == 2, timeout=5, what="the second tick")
        after = cluster.server.commandstats()
        scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("eval", "evalsha"))
        assert scripts == 1
        assert after["zadd"] - before.get("zadd", 0) == 250  # inside the one script
        for i, key in enumerate(keys[:10]):
            kind = "pool" if i % 2 == 0 else "presence"
            assert cluster.server.command("PTTL", cluster.key(kind, key)) > 4000
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_on_lost_fires_when_another_node_took_a_record(cluster):
    lost: list[TunnelKey] = []
    clock = Clock()
    a = cluster.node("a", clock=clock, refresh=1.0, on_lost=lost.append)
    b = cluster.node("b")
    try:
        a.start()
        await a.claim(K)
        await a.claim(K2)
        assert await b.take_over(K, "a") is True
        clock.advance(1.0)
        await until(lambda: lost, timeout=5, what="on_lost")
        assert lost == [K] and a.held() == 1
        assert cluster.get("presence", K) == b"b"  # a's refresh did not take it back
        assert cluster.get("presence", K2) == b"a"
    finally:
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_two_nodes_of_one_name_are_told_loudly(cluster):
    collect = Collect()
    globalLogPublisher.addObserver(collect)
    clock_a, clock_b = Clock(), Clock()
    a = cluster.node("same", clock=clock_a, refresh=1.0)
    b = cluster.node("same", clock=clock_b, refresh=1.0)  # another address, the same name
    try:
        a.start()
        await until(lambda: a.ticks == 1, timeout=5, what="a's first tick")
        b.start()
        await until(lambda: b.ticks == 1, timeout=5, what="b's first tick")
        clashes = [line for line in collect.lines if "another node named same" in line]
        assert len(clashes) == 1 and "--node-name" in clashes[0]
    finally:
        globalLogPublisher.removeObserver(collect)
        await cluster.close()


@pytest_twisted.ensureDeferred
async def test_stop_releases_everything_and_refuses_more(cluster):
    a = cluster.node("a")
    b = cluster.node("b", ttl=0.3)
    try:
        a.start()
        await a.claim(K)
        await a.claim(K2, pooled=True)
        await b.claim(K2, pooled=True)
        await a.stop()
        assert a.held() == 0
        assert cluster.get("presence", K) is None
        assert cluster.server.command("ZRANGE", cluster.key("pool", K2), 0, -1) == [b"b"]
        assert cluster.server.command("EXISTS", f"{cluster.prefix}node:a") == 0
        with pytest.raises(StoreClosed):
            await a.claim(K)
        with pytest.raises(StoreClosed):
            await a.locate(K)
    finally:
        await cluster.close()


def test_names_are_checked():
    link = RedisLink(clientFromString(reactor, "tcp:127.0.0.1:1"), name="r")
    for bad in ["", "a b", "x" * 256, "tab\t"]:
        with pytest.raises(ValueError):
            Presence(link, node=bad, address="127.0.0.1:1", prefix="p:", clock=Clock())
    with pytest.raises(ValueError):
        Presence(link, node="a", address="127.0.0.1:1", prefix="p:", clock=Clock(), refresh=9)


@pytest_twisted.ensureDeferred
async def test_without_redis_claims_fail_fast_and_presence_comes_back():
    with redis_server.running() as server:
        cluster = Cluster(server)
        a = cluster.node("a", ttl=1.0, refresh=0.1)
        try:
            a.start()
            await a.claim(K)
            server.stop()
            await until(lambda: a.held() and cluster.links[0].state.value == "waiting", timeout=5)
            started = reactor.seconds()
            with pytest.raises(StoreError):
                await a.claim(K2)
            assert reactor.seconds() - started < 1.0
            assert a.held() == 1  # what it held is kept, to be put back
            server.start()  # empty: every record was lost
            assert await until(
                lambda: cluster.get("presence", K) == b"a",
                retry_on=(ConnectionError, OSError),
                timeout=5,
                what="the record put back",
            )
            assert await a.claim(K2) is None
        finally:
            await cluster.close()


# -- measurements (python -m tests.test_presence) -------------------------------------------


async def measure(count: int = 10_000) -> None:
    with redis_server.running() as server:
        cluster = Cluster(server)
        clock = Clock()
        a = cluster.node("a", clock=clock, refresh=1.0)
        b = cluster.node("b", clock=clock)
        try:

            def calls() -> dict[str, int]:
                return server.commandstats()

            def delta(before: dict[str, int]) -> str:
                after = calls()
                changed = {k: after[k] - before.get(k, 0) for k in after}
                changed.pop("info", None)
                return ", ".join(f"{k}={v}" for k, v in sorted(changed.items()) if v)

            await a.claim(TunnelKey.of("warm-up"))  # EVAL once, then EVALSHA
            await b.locate(TunnelKey.of("warm-up"))
            before = calls()
            await a.claim(K)
            print(f"claim (single): {delta(before)}")
            before = calls()
            await a.claim(K2, pooled=True)
            print(f"claim (pooled): {delta(before)}")
            before = calls()
            await b.locate(K)
            print(f"locate: {delta(before)}")
            keys = [TunnelKey.of(f"bench-{i}") for i in range(count)]
            for i in range(0, count, 500):
                await gatherResults([a.claim(key) for key in keys[i : i + 500]])
            a.start()
            await until(lambda: a.ticks == 1, timeout=30)

            def script_usec() -> int:
                text = server.command("INFO", "commandstats").decode()
                line = next(x for x in text.splitlines() if x.startswith("cmdstat_evalsha:"))
                return int(line.split("usec=")[1].split(",")[0])

            for tick in range(2, 7):
                before, usec = calls(), script_usec()
                started = time.perf_counter()
                clock.advance(1.0)
                await until(lambda: a.ticks == tick, timeout=30, interval=0.001)  # noqa: B023
                took = time.perf_counter() - started
                inside = (script_usec() - usec) / 1000
                print(
                    f"refresh tick, {a.held()} held: {took * 1000:.1f} ms in all,"
                    f" {inside:.1f} ms inside Redis; {delta(before)}"
                )
        finally:
            await cluster.close()


if __name__ == "__main__":
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    react(lambda _: ensureDeferred(measure()))
