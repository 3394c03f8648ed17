"""The registry in Redis: its data model, its change feed, two nodes sharing
it through ``Routes``, and what happens when Redis goes away.

``RedisLink`` (the kept-up connection) is tested first on a ``Clock`` and a
fake endpoint, so backoff and logging are exact.  The rest runs on a real
redis-server (``tests/redis_server.py``; skipped without one): a module
server for most tests, each under a key prefix of its own, and servers of
their own for the tests that kill or stop theirs.  Waits on the reactor are
bounded (``live.until``), never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from tunnel.koding.identifiers import TunnelKey
from tunnel.server import Routes, TunnelServer
from tunnel.server.redislink import Backoff, LinkState, RedisLink
from tunnel.server.redisstore import FeedState, RedisStore, parse_notice
from tunnel.server.routes import TCPPorts
from tunnel.server.store import (
    HostChanged,
    HostEntry,
    PortChanged,
    PortEntry,
    Resynced,
    SharedRegistryStore,
    Snapshot,
    StoreClosed,
    StoreError,
    StoreOutcomeUnknown,
)

from . import redis_server
from .admin_env import AdminEnv
from .live import http_client, until
from .processes import Twistd, free_port, reap_all, spawn_client, spawn_twistd, stop, until_children

IDENTIFIER = "redis-test-identifier-never-stored"
KEY = TunnelKey.of(IDENTIFIER)
OTHER = TunnelKey.of("another-redis-identifier")
RULES = {"rate": {"per_second": 2.5, "burst": 10}, "allow": ["10.0.0.0/8"]}
#: quick reconnections for the tests (the defaults: 0.5 s, up to 10 s)
FAST = Backoff(initial=0.05, maximum=0.2, jitter=0.0)


@pytest.fixture(scope="module")
def redis():
    with redis_server.running() as server:
        yield server


@pytest.fixture
def own_redis():
    """A server of the test's own, that it may kill; it keeps what it was
    told across a SIGKILL (AOF)."""
    with redis_server.running(persistent=True) as server:
        yield server


def new_store(server, prefix: str | None = None, **options) -> RedisStore:
    options.setdefault("backoff", FAST)
    options.setdefault("timeout", 2.0)
    return RedisStore.from_string(
        server.endpoint, prefix=prefix or f"t-{uuid.uuid4().hex[:12]}:", **options
    )


def fired(d):
    """What a Deferred that has fired holds: its result, or its failure's exception."""
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    return box[0].value if isinstance(box[0], Failure) else box[0]


def warnings(events) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]


def lines(events, text: str) -> list[str]:
    return [line for line in map(formatEvent, events) if text in line]


# -- RedisLink on a Clock ---------------------------------------------------------------


class FakeEndpoint:
    """Refuses while ``up`` is False; else connects a StringTransport."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0
        self.protocols: list = []

    def connect(self, factory):
        self.attempts += 1
        if not self.up:
            return fail(ConnectionRefusedError("refused"))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


def lose(protocol) -> None:
    protocol.connectionLost(Failure(ConnectionRefusedError("gone")))


def test_a_link_logs_one_line_per_outage_and_backs_off():
    clock, endpoint = Clock(), FakeEndpoint()
    link = RedisLink(
        endpoint,
        name="tcp:redis.test:6379",
        clock=clock,
        backoff=Backoff(initial=1, maximum=8, jitter=0),
        keepalive=0,
    )
    with capturedLogs() as events:
        failed = link.connection("load")
        assert link.state is LinkState.WAITING and endpoint.attempts == 1
        with pytest.raises(StoreError, match="tcp:redis.test:6379 is unavailable: .*refused"):
            raise fired(failed)
        # retries after 1, 2, 4, 8, 8, 8 s: none of them logged
        for delay in (1, 2, 4, 8, 8, 8):
            clock.advance(delay - 0.001)
            before = endpoint.attempts
            clock.advance(0.001)
            assert endpoint.attempts == before + 1
        endpoint.up = True
        clock.advance(8)
        assert link.state is LinkState.READY
    assert len(warnings(events)) == 1
    assert "unavailable" in warnings(events)[0]
    assert lines(events, "is back after 39.0 s")  # 1+2+4+8+8+8+8

    # lost again: one more line, and the first retry after ``initial``
    with capturedLogs() as events:
        lose(endpoint.protocols[-1])
        assert link.state is LinkState.WAITING
        endpoint.up = False
        clock.advance(1)
        clock.advance(2)
        assert endpoint.attempts == 10  # after 1 s, then 2 s
    assert len(warnings(events)) == 1 and "connection was lost" in warnings(events)[0]
    d = link.close()
    assert d.called and link.state is LinkState.CLOSED and not clock.getDelayedCalls()


def test_while_waiting_an_operation_fails_fast_or_rides_an_attempt_it_starts():
    clock, endpoint = Clock(), FakeEndpoint()
    link = RedisLink(endpoint, name="r", clock=clock, backoff=Backoff(initial=5), keepalive=0)
    link.start()
    assert link.state is LinkState.WAITING
    # still down: the operation starts an attempt at once and fails with it
    failed = link.run("put_host", lambda p: p.ping())
    assert endpoint.attempts == 2 and isinstance(fired(failed), StoreError)
    # back: the operation's own attempt connects, no waiting for the backoff
    endpoint.up = True
    answered = link.run("put_host", lambda p: p.ping())
    assert endpoint.attempts == 3 and link.state is LinkState.READY
    endpoint.protocols[-1].dataReceived(b"+PONG\r\n")
    assert fired(answered) == "PONG"
    assert not [c for c in clock.getDelayedCalls() if c.active()]  # no retry left
    link.close()


def test_a_command_that_gets_no_answer_fails_in_time_and_drops_the_connection():
    clock, endpoint = Clock(), FakeEndpoint()
    endpoint.up = True
    link = RedisLink(endpoint, name="r", clock=clock, timeout=2, keepalive=0, backoff=FAST)
    d = link.run("put_host", lambda p: p.ping())
    clock.advance(2)
    with pytest.raises(StoreOutcomeUnknown, match="put_host: Redis r did not answer in 2 s"):
        raise fired(d)
    assert endpoint.protocols[0].transport.disconnecting  # aborted
    lose(endpoint.protocols[0])
    assert link.state is LinkState.WAITING
    link.close()


def test_keepalive_pings_and_drops_a_connection_that_does_not_answer():
    clock, endpoint = Clock(), FakeEndpoint()
    endpoint.up = True
    link = RedisLink(endpoint, name="r", clock=clock, timeout=1, keepalive=5)
    link.start()
    protocol = endpoint.protocols[0]
    clock.advance(5)
    assert protocol.transport.value().endswith(b"PING\r\n")
    protocol.dataReceived(b"+PONG\r\n")
    clock.advance(5)
    clock.advance(1)  # the second PING is not answered
    assert protocol.transport.disconnecting
    closed = link.close()
    lose(protocol)
    assert closed.called


# -- the data model -------------------------------------------------------------------------


def test_notices_parse_and_bad_ones_are_refused():
    hexkey = KEY.digest.hex()
    assert parse_notice(f'7 e1 {{"host":"a.test","key":"{hexkey}","rules":{{}}}}') == (
        7,
        "e1",
        HostChanged("a.test", HostEntry("a.test", KEY, {})),
    )
    assert parse_notice('8 e1 {"host":"a.test"}') == (8, "e1", HostChanged("a.test", None))
    assert parse_notice(f'9 e2 {{"port":22,"key":"{hexkey}"}}') == (
        9,
        "e2",
        PortChanged(22, PortEntry(22, KEY)),
    )
    for bad in [
        b"\xff",
        '{"host":"a"}',
        "x e {}",
        '1 {"host":"a"}',
        '1 e-1 {"host":"a"}',
        f'1 {"e" * 65} {{"host":"a"}}',
        "1 e [",
        "1 e []",
        "1 e {}",
        '1 e {"host":1}',
        '1 e {"port":0}',
        '1 e {"host":"a","key":"00"}',
        '1 e {"host":"\udcff"}',
        '1 e {"host":"\\udcff"}',
        f'1 e {{"host":"a","key":"{hexkey}","rules":[]}}',
    ]:
        with pytest.raises(ValueError):
            parse_notice(bad)


def test_a_redis_store_is_a_shared_store():
    store = RedisStore.from_string("tcp:127.0.0.1:1")
    assert isinstance(store, SharedRegistryStore)
    with pytest.raises(ValueError, match="not a client endpoint"):
        RedisStore.from_string("nonsense:1")


@pytest_twisted.ensureDeferred
async def test_what_redis_holds_and_one_script_per_change(redis):
    store = new_store(redis, prefix="model:")
    try:
        before = redis.commandstats()
        assert await store.put_host(HostEntry("a.test", KEY, RULES)) is True
        assert await store.put_port(PortEntry(2222, KEY)) is True
        assert await store.delete_host("nothing.test") is False
        assert await store.delete_port(2222) is True
        after = redis.commandstats()
        scripts = sum(after.get(c, 0) - before.get(c, 0) for c in ("eval", "evalsha"))
        assert scripts == 4  # one round trip per change
        assert after.get("hset", 0) - before.get("hset", 0) == 2  # inside the scripts

        assert redis.command("HGETALL", "model:hosts") == [
            b"a.test",
            json.dumps(
                {"key": KEY.digest.hex(), "rules": RULES}, sort_keys=True, separators=(",", ":")
            ).encode(),
        ]
        assert redis.command("HGETALL", "model:ports") == []
        assert redis.command("GET", "model:version") == b"3"  # the delete of nothing: none
        snapshot = await store.load()
        epoch = redis.command("GET", "model:epoch").decode()
        assert snapshot == Snapshot((HostEntry("a.test", KEY, RULES),), (), 3, epoch)
        assert len(epoch) == 32
        keys = sorted(redis.command("KEYS", "model:*"))
        assert keys == [b"model:epoch", b"model:hosts", b"model:version"]
        dump = b"".join(redis.command("DUMP", k) for k in keys)
        assert IDENTIFIER.encode() not in dump and KEY.digest.hex().encode() in dump
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_values_that_cannot_be_read_are_skipped_with_a_warning(redis):
    store = new_store(redis)
    prefix = store.prefix
    try:
        await store.put_host(HostEntry("good.test", KEY))
        good = KEY.digest.hex()
        redis.command("HSET", f"{prefix}hosts", "bad-json.test", "{", "list.test", "[1]")
        redis.command("HSET", f"{prefix}hosts", "short.test", '{"key":"00"}')
        redis.command("HSET", f"{prefix}hosts", "rules.test", f'{{"key":"{good}","rules":1}}')
        redis.command("HSET", f"{prefix}ports", "70000", good, "22", "zz", "x", good)
        # bytes that are not UTF-8, in a value and in a name: only those fields
        redis.command("HSET", f"{prefix}hosts", "bytes.test", b'{"key":"\xff"}')
        redis.command("HSET", f"{prefix}hosts", b"\xfe.test", f'{{"key":"{good}"}}')
        redis.command("HSET", f"{prefix}ports", "23", b"\xff" * 64)
        with capturedLogs() as events:
            snapshot = await store.load()
        assert snapshot.hosts == (HostEntry("good.test", KEY),) and snapshot.ports == ()
        found = warnings(events)
        assert len(found) == 10 and all(store.name in line for line in found)
        assert [line for line in found if "'bytes.test'" in line and "UTF-8" in line]
        assert [line for line in found if "'23'" in line]
        assert not [e for e in events if "log_failure" in e]
        # the version is not a number: a StoreError that says so, not a ValueError
        redis.command("SET", f"{prefix}version", b"\xff1")
        with pytest.raises(StoreError, match="version .* is not a number"):
            await store.load()
    finally:
        await store.close()


@pytest.mark.parametrize("rules", [{"x": {1, 2}}, {"x": float("nan")}, {"x": b"b"}, [1]])
@pytest_twisted.ensureDeferred
async def test_rules_that_are_not_json_and_bad_ports_fail_and_change_nothing(redis, rules):
    store = new_store(redis)
    try:
        with pytest.raises(StoreError, match="'a.test' are not JSON"):
            await store.put_host(HostEntry("a.test", KEY, rules))
        with pytest.raises(StoreError, match="put_port failed"):
            await store.put_port(PortEntry(0, KEY))
        snapshot = await store.load()
        assert (snapshot.hosts, snapshot.ports, snapshot.version) == ((), (), 0)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_prefixes_keep_clusters_apart(redis):
    one, two = new_store(redis), new_store(redis)
    try:
        await one.put_host(HostEntry("a.test", KEY))
        assert (await two.load()).hosts == ()
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_every_call_after_close_fails_clearly_and_close_waits_for_changes(redis):
    store = new_store(redis)
    puts = [store.put_host(HostEntry(f"h{i}.test", KEY)) for i in range(10)]
    closed = store.close()
    with pytest.raises(StoreClosed):
        await store.put_host(HostEntry("late.test", KEY))
    await closed
    assert [await d for d in puts] == [True] * 10
    for call in (store.load, lambda: store.delete_port(1)):
        with pytest.raises(StoreClosed):
            await call()
    with pytest.raises(StoreClosed):
        store.watch(Snapshot(), lambda change: None)
    await store.close()


# -- the feed ---------------------------------------------------------------------------------


class Recorder:
    """The changes told, one by one (``changes``), and the catch-ups (``resyncs``)."""

    def __init__(self) -> None:
        self.changes: list = []
        self.resyncs: list[Snapshot] = []

    def __call__(self, change) -> None:
        if isinstance(change, Resynced):
            self.resyncs.append(change.snapshot)
        else:
            self.changes.append(change)

    async def wait_for(self, count: int) -> list:
        await until(lambda: len(self.changes) >= count, timeout=5, what=f"{count} changes")
        return self.changes


@pytest_twisted.ensureDeferred
async def test_a_watcher_hears_every_change_in_order_its_own_included(redis):
    prefix = f"feed-{uuid.uuid4().hex[:8]}:"
    mine, theirs = new_store(redis, prefix), new_store(redis, prefix)
    heard = Recorder()
    try:
        unwatch = mine.watch(await mine.load(), heard)
        await until(lambda: mine.feed_state is FeedState.LIVE, timeout=5, what="the feed")
        await theirs.put_host(HostEntry("a.test", KEY, RULES))
        await mine.put_port(PortEntry(2222, KEY))
        await theirs.put_host(HostEntry("a.test", OTHER))
        await theirs.delete_port(2222)
        await theirs.delete_port(2222)  # nothing: no notice
        await mine.delete_host("a.test")
        assert await heard.wait_for(5) == [
            HostChanged("a.test", HostEntry("a.test", KEY, RULES)),
            PortChanged(2222, PortEntry(2222, KEY)),
            HostChanged("a.test", HostEntry("a.test", OTHER)),
            PortChanged(2222, None),
            HostChanged("a.test", None),
        ]
        assert len(heard.resyncs) == 1  # when the subscription began
        unwatch()
        await theirs.put_host(HostEntry("b.test", KEY))
        assert await mine.load() != Snapshot()  # a round trip: no notice came meanwhile
        assert len(heard.changes) == 5
    finally:
        await mine.close()
        await theirs.close()


@pytest_twisted.ensureDeferred
async def test_a_watcher_cut_off_catches_up_with_what_it_missed(redis):
    prefix = f"gap-{uuid.uuid4().hex[:8]}:"
    mine, theirs = new_store(redis, prefix), new_store(redis, prefix)
    await theirs.put_host(HostEntry("kept.test", KEY))
    await theirs.put_host(HostEntry("gone.test", KEY))
    heard = Recorder()
    try:
        mine.watch(await mine.load(), heard)
        await until(lambda: mine.feed_state is FeedState.LIVE, timeout=5, what="the feed")
        resyncs = len(heard.resyncs)
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")  # every subscriber
        # before the subscriber is back (50 ms): notices nobody gets
        await theirs.delete_host("gone.test")
        await theirs.put_host(HostEntry("kept.test", OTHER, RULES))
        await theirs.put_port(PortEntry(3333, KEY))
        await until(lambda: len(heard.resyncs) > resyncs, timeout=5, what="a catch-up")
        # everything the store holds, whatever was told before
        assert heard.resyncs[-1].hosts == (HostEntry("kept.test", OTHER, RULES),)
        assert heard.resyncs[-1].ports == (PortEntry(3333, KEY),)
        assert heard.changes == []
        # live again: the next change comes as a notice
        await until(lambda: mine.feed_state is FeedState.LIVE, timeout=5, what="the feed")
        await theirs.delete_port(3333)
        assert await heard.wait_for(1) == [PortChanged(3333, None)]
        # an unreadable notice: a catch-up, which finds nothing new
        with capturedLogs() as events:
            redis.command("PUBLISH", f"{prefix}changes", "garbage")
            await until(lambda: lines(events, "unreadable notice"), timeout=5, what="a warning")
            await theirs.put_host(HostEntry("new.test", KEY))
            new = HostChanged("new.test", HostEntry("new.test", KEY))
            await until(
                lambda: new in heard.changes or new.entry in heard.resyncs[-1].hosts,
                timeout=5,
                what="the new host",
            )
    finally:
        await mine.close()
        await theirs.close()


@pytest_twisted.ensureDeferred
async def test_a_watch_from_an_old_or_unversioned_snapshot_is_told_the_differences(redis):
    prefix = f"old-{uuid.uuid4().hex[:8]}:"
    store = new_store(redis, prefix)
    try:
        old = await store.load()
        await store.put_host(HostEntry("a.test", KEY))
        heard = Recorder()
        store.watch(old, heard)
        await until(lambda: heard.resyncs, timeout=5, what="a catch-up")
        assert heard.resyncs[0].hosts == (HostEntry("a.test", KEY),)
        # a snapshot of no version (another store's): everything is told
        other = Recorder()
        store.watch(Snapshot((HostEntry("a.test", KEY), HostEntry("x.test", OTHER))), other)
        await until(lambda: other.resyncs, timeout=5, what="a catch-up")
        assert other.resyncs[0].hosts == (HostEntry("a.test", KEY),)
    finally:
        await store.close()


# -- two nodes through Routes ---------------------------------------------------------------


class Node:
    """A TunnelServer and its Routes on the shared Redis, listening on real
    ephemeral ports for the logical TCP ports of the registry."""

    def __init__(self, server, prefix: str, **options) -> None:
        self.server = TunnelServer()
        self.listen = TCPPorts(self.server, interface="127.0.0.1", reactor=reactor)
        self.real: dict[int, object] = {}
        store = new_store(server, prefix, **options)
        self.routes = Routes(self.server, store, listen_tcp=self._listen)

    def _listen(self, port: int):
        def opened(listener):
            self.real[port] = listener
            return listener

        return self.listen(0).addCallback(opened)

    def serves(self, host: str):
        route, _ = self.server.vhosts.lookup(host)
        return route.key if route is not None else None

    def listening(self, port: int) -> bool:
        listener = self.real.get(port)
        return listener is not None and listener.connected


async def two_nodes(server, **options) -> tuple[Node, Node]:
    prefix = f"nodes-{uuid.uuid4().hex[:8]}:"
    a, b = Node(server, prefix, **options), Node(server, prefix, **options)
    await a.routes.start()
    await b.routes.start()
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_change_through_one_node_is_served_by_the_other(redis):
    a, b = await two_nodes(redis)
    try:
        assert await a.routes.put_host("App.Test", "ident-one") is True
        await until(lambda: b.serves("app.test") == TunnelKey.of("ident-one"), what="b serving")
        assert b.routes.host("app.test") == HostEntry("app.test", TunnelKey.of("ident-one"), {})
        await b.routes.put_host("app.test", "ident-two", {"allow": ["127.0.0.0/8"]})
        await until(lambda: a.serves("app.test") == TunnelKey.of("ident-two"), what="a replaced")
        assert a.server.vhosts.get("app.test").rules is not None  # with its rules

        assert await a.routes.put_port(40100, "ident-one") is True
        await until(lambda: b.listening(40100), what="b listening")
        assert b.server.addrs.lookup("127.0.0.1", 40100) == TunnelKey.of("ident-one")
        assert a.listening(40100)
        assert await b.routes.delete_port(40100) is True
        await until(lambda: not a.listening(40100), what="a closing the port")
        assert a.server.addrs.lookup("127.0.0.1", 40100) is None and not b.listening(40100)

        assert await b.routes.delete_host("app.test") is True
        await until(lambda: a.serves("app.test") is None, what="a forgetting the host")
        assert a.routes.hosts() == [] == b.routes.hosts()
    finally:
        await a.routes.stop()
        await b.routes.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_catches_up_after_its_feed_was_cut(redis):
    a, b = await two_nodes(redis)
    try:
        await until(
            lambda: all(n.routes.store.feed_state is FeedState.LIVE for n in (a, b)),
            what="both feeds live",
        )
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await a.routes.put_host("missed.test", "ident-one")
        await a.routes.put_port(40200, "ident-one")
        await until(lambda: b.serves("missed.test") is not None, what="b catching up")
        await until(lambda: b.listening(40200), what="b listening after catching up")
    finally:
        await a.routes.stop()
        await b.routes.stop()


#: reconnections slow enough that a test's changes are all made before the
#: feed is back (each only a round trip on loopback)
SLOW = Backoff(initial=0.5, maximum=0.5, jitter=0.0)


def feeds_live(*nodes: Node) -> bool:
    return all(n.routes.store.feed_state is FeedState.LIVE for n in nodes)


@pytest_twisted.ensureDeferred
async def test_a_node_whose_own_change_was_undone_while_cut_off_converges(redis):
    a, b = await two_nodes(redis, backoff=SLOW)
    try:
        await b.routes.put_host("h.test", "old-ident")
        await until(lambda: a.serves("h.test") == TunnelKey.of("old-ident"), what="a serving")
        await until(lambda: feeds_live(a, b), what="both feeds live")
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: a.routes.store.feed_state is FeedState.OFF, what="a cut off")
        # A changes h (its feed never tells A), B puts the old value back: the
        # store holds what the feed last told A, not what A serves
        await a.routes.put_host("h.test", "new-ident")
        await b.routes.put_host("h.test", "old-ident")
        await until(lambda: feeds_live(a, b), what="both feeds live again")
        await until(lambda: a.serves("h.test") == TunnelKey.of("old-ident"), what="a converged")
        assert b.serves("h.test") == TunnelKey.of("old-ident")
    finally:
        await a.routes.stop()
        await b.routes.stop()


@pytest_twisted.ensureDeferred
async def test_a_redis_restarted_empty_is_followed_loudly_even_at_the_same_version():
    with redis_server.running() as server:
        prefix = f"epoch-{uuid.uuid4().hex[:8]}:"
        a = Node(server, prefix, backoff=SLOW)
        await a.routes.start()
        try:
            await a.routes.put_host("p.test", "one")
            await a.routes.put_host("q.test", "one")
            await until(lambda: feeds_live(a), what="the feed")
            with capturedLogs() as events:
                server.stop()
                server.start()  # empty, its counter at 0
                await until(lambda: a.routes.store.feed_state is FeedState.OFF, what="cut off")
                other = new_store(server, prefix)
                await other.put_host(HostEntry("r.test", TunnelKey.of("two")))
                await other.put_host(HostEntry("s.test", TunnelKey.of("two")))
                await other.close()  # the counter is at 2 again, the data is not the same
                await until(lambda: a.serves("r.test") is not None, what="a following")
            assert a.serves("p.test") is None and a.serves("q.test") is None
            assert a.serves("s.test") == TunnelKey.of("two")
            assert lines(events, "its data was emptied or replaced (a new epoch)")
            # emptied again, and nothing else: every host goes, with a warning
            with capturedLogs() as events:
                server.stop()
                server.start()
                await until(lambda: a.serves("r.test") is None, what="a emptied")
            assert lines(events, "the shared registry is empty: removing the 2 hosts")
        finally:
            await a.routes.stop()


@pytest_twisted.ensureDeferred
async def test_a_flush_or_a_counter_reset_while_connected_is_caught_up(redis):
    prefix = f"flush-{uuid.uuid4().hex[:8]}:"
    a = Node(redis, prefix)
    await a.routes.start()
    other = new_store(redis, prefix)
    try:
        for host in ("a.test", "b.test", "c.test"):
            await a.routes.put_host(host, "one")
        await until(lambda: feeds_live(a), what="the feed")
        with capturedLogs() as events:
            redis.command("FLUSHALL")  # the connections stay
            await other.put_host(HostEntry("new.test", TunnelKey.of("two")))  # version 1
            await other.put_host(HostEntry("a.test", TunnelKey.of("two")))  # version 2
            await until(lambda: a.serves("new.test") is not None, what="a following")
            await until(lambda: a.serves("b.test") is None, what="b.test gone")
        assert a.serves("a.test") == TunnelKey.of("two") and a.serves("c.test") is None
        assert lines(events, "a new epoch")
        # the counter alone deleted: the next notice goes back, same epoch
        await until(lambda: feeds_live(a), what="the feed")
        with capturedLogs() as events:
            redis.command("DEL", f"{prefix}version")
            await other.put_host(HostEntry("x.test", TunnelKey.of("two")))  # version 1
            await until(lambda: a.serves("x.test") is not None, what="a following")
        assert lines(events, "the change counter went back")
    finally:
        await other.close()
        await a.routes.stop()


@pytest_twisted.ensureDeferred
async def test_notices_out_of_sequence_or_unreadable_cost_one_catch_up_each_burst(redis):
    store = new_store(redis)
    heard = Recorder()
    try:
        await store.put_host(HostEntry("a.test", KEY))
        store.watch(await store.load(), heard)
        await until(lambda: store.feed_state is FeedState.LIVE, what="the feed")
        epoch = redis.command("GET", f"{store.prefix}epoch").decode()
        channel = f"{store.prefix}changes"
        before = redis.commandstats()
        with capturedLogs() as events:
            # published by hand, above the stored counter: not genuine
            for n in range(30):
                redis.command("PUBLISH", channel, f'{999 + n} {epoch} {{"host":"x.test"}}')
            await until(lambda: lines(events, "out of sequence"), what="a warning")
            for _ in range(30):
                redis.command("PUBLISH", channel, "garbage")
            await until(lambda: lines(events, "unreadable notice"), what="a warning")
            await until(lambda: store.feed_state is FeedState.LIVE, what="live again")
            # live: a real change is told as it comes
            await store.put_host(HostEntry("real.test", KEY))
            await heard.wait_for(1)
        after = redis.commandstats()
        assert heard.changes == [HostChanged("real.test", HostEntry("real.test", KEY))]
        assert store.feed_state is FeedState.LIVE
        # a few snapshots (the bursts, spaced by the backoff), not a loop
        snapshots = sum(after.get(c, 0) - before.get(c, 0) for c in ("eval", "evalsha")) - 1
        assert 1 <= snapshots <= 8, snapshots
        # at most a burst of 10, and one line saying the rest are counted
        assert len(lines(events, "out of sequence")) <= 11
        assert len(lines(events, "unreadable notice")) <= 11
        assert not [e for e in events if "log_failure" in e]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_feed_that_cannot_catch_up_holds_a_bounded_queue_then_recovers(redis):
    store = new_store(redis)
    prefix, heard = store.prefix, Recorder()
    try:
        await store.put_host(HostEntry("good.test", KEY))
        redis.command("HSET", f"{prefix}hosts", "bad.test", b'{"key":"\xff"}')  # skipped
        with capturedLogs() as events:
            redis.command("SET", f"{prefix}version", "not a number")  # snapshots fail
            store.watch(Snapshot(version=0), heard)
            await until(lambda: lines(events, "cannot catch up yet"), what="failing")
            assert store.feed_state is FeedState.SYNCING
            # more notices than the feed holds while it cannot place them
            script = "for i = 1, 2500 do redis.call('PUBLISH', KEYS[1], i .. ARGV[1]) end"
            redis.command("EVAL", script, 1, f"{prefix}changes", ' e {"host":"z"}')
            await until(lambda: lines(events, "dropping them and catching up"), what="the cap")
            redis.command("SET", f"{prefix}version", "7")
            await until(lambda: store.feed_state is FeedState.LIVE, what="live")
            await until(lambda: heard.resyncs, what="a catch-up")
        assert heard.resyncs[-1].hosts == (HostEntry("good.test", KEY),)
        assert heard.changes == []
        assert len(lines(events, "dropping them and catching up")) <= 11
        assert lines(events, "skipping host 'bad.test': not UTF-8 text")
    finally:
        await store.close()


# -- Redis going away -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted(own_redis):
    # a timeout far above the bound below: failing within it proves nobody
    # waited for one
    a, b = await two_nodes(own_redis, timeout=30.0)
    try:
        await a.routes.put_host("kept.test", "ident-one")
        await until(lambda: b.serves("kept.test") is not None, what="b serving")
        with capturedLogs() as events:
            own_redis.stop()  # SIGKILL
            await until(
                lambda: a.routes.store.link_state is LinkState.WAITING,
                what="a noticing the outage",
            )
            started = time.monotonic()
            for call in (
                lambda: a.routes.put_host("new.test", "ident-one"),
                lambda: b.routes.delete_host("kept.test"),
                lambda: a.routes.put_port(40300, "ident-one"),
            ):
                with pytest.raises(StoreError, match="is unavailable"):
                    await call()
            assert time.monotonic() - started < 15  # fast: nobody waits on a dead Redis
            # serving goes on from the tables
            assert a.serves("kept.test") == b.serves("kept.test") == TunnelKey.of("ident-one")
            assert not a.listening(40300)

            own_redis.start()  # same port, same data
            # the first change after the restart works (it connects if need be)
            assert await a.routes.put_host("after.test", "ident-two") is True
            await until(lambda: b.serves("after.test") is not None, what="b hearing of it")
            assert b.serves("kept.test") is not None
        # one warning per connection per node, however many retries
        assert len(lines(events, "is unavailable: ")) <= 4
        assert len([w for w in warnings(events) if "unavailable" in w]) <= 4
    finally:
        await a.routes.stop()
        await b.routes.stop()


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_fails_changes_within_the_timeout(own_redis):
    store = new_store(own_redis, timeout=0.3)
    try:
        await store.put_host(HostEntry("a.test", KEY))
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            # the exact timing is on a Clock (above); here: it fails, and says
            # the change may have been made (Redis has the script, and runs it)
            with pytest.raises(StoreOutcomeUnknown, match="did not answer in 0.3 s") as raised:
                await store.put_host(HostEntry("b.test", KEY))
            assert "the change may have been applied" in str(raised.value)
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        await until(lambda: store.link_state is LinkState.READY, what="reconnected")
        assert await store.put_host(HostEntry("c.test", KEY)) is True
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_admin_api_answers_504_to_a_change_redis_did_not_answer(own_redis):
    env = await AdminEnv(new_store(own_redis, timeout=0.3)).start()
    try:
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            with capturedLogs() as events:
                code, body, _ = await env.call("PUT", "/api/hosts/b.localhost", {"identifier": "x"})
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        assert code == 504, body
        assert body["error"].startswith("the store did not answer in time: put_host")
        assert "the change may have been applied" in body["error"]
        assert lines(events, "admin: a change got no answer from the store")
        assert not [e for e in events if "log_failure" in e]
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_fails_clearly_and_is_never_shown(tmp_path):
    secret = "the-redis-password-3a9f"
    with redis_server.running(password=secret) as server:
        right = new_store(server, password=secret)
        wrong = new_store(server, password="not-" + secret)
        try:
            with capturedLogs() as events:
                assert await right.put_host(HostEntry("a.test", KEY)) is True
                with pytest.raises(StoreError, match="WRONGPASS") as raised:
                    await wrong.load()
            assert "not-" + secret not in str(raised.value)
            assert all(secret not in formatEvent(e) for e in events)
        finally:
            await right.close()
            await wrong.close()


# -- two twistd nodes on one Redis ----------------------------------------------------------

E2E_IDENTIFIER = "redis-e2e-identifier-5b2d71c0"
E2E_TOKEN = "redis-e2e-admin-token-0c4f"
E2E_PASSWORD = "redis-e2e-password-9e13"


class Origin(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"origin: " + request.getHeader(b"host")


async def admin_call(port: int, method: str, path: str, body=None):
    headers = {"Authorization": f"Bearer {E2E_TOKEN}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    response = await http_client().request(
        method,
        f"http://127.0.0.1:{port}{path}",
        headers=headers,
        data=json.dumps(body).encode() if body is not None else None,
        timeout=10,
    )
    return response.code, await treq.content(response)


async def public_get(port: int, host: str):
    response = await http_client().get(
        f"http://127.0.0.1:{port}/", headers={"Host": host}, timeout=5
    )
    return response.code, await treq.content(response)


def start_node(server, port: int, admin: int, secrets) -> Twistd:
    return spawn_twistd(
        "tunnel-server",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--redis", server.endpoint,
        "--redis-password-file", str(secrets / "redis.password"),
        "--redis-prefix", "e2e:",
        "--admin", f"tcp:{admin}:interface=127.0.0.1",
        "--admin-token-file", str(secrets / "admin.token"),
        "--shutdown-grace", "1",
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_two_twistd_nodes_share_the_registry_and_outlive_a_redis_outage(tmp_path):
    origin = reactor.listenTCP(0, Site(Origin()), interface="127.0.0.1")
    (tmp_path / "admin.token").write_text(E2E_TOKEN + "\n")
    (tmp_path / "redis.password").write_text(E2E_PASSWORD + "\n")
    (tmp_path / "identifier").write_text(E2E_IDENTIFIER + "\n")
    processes: list[Twistd] = []
    ports = {name: free_port() for name in ("a", "a-admin", "b", "b-admin")}
    with redis_server.running(persistent=True, password=E2E_PASSWORD) as server:
        try:
            a = start_node(server, ports["a"], ports["a-admin"], tmp_path)
            b = start_node(server, ports["b"], ports["b-admin"], tmp_path)
            processes += [a, b]
            client = spawn_client([ports["b"]], tmp_path / "identifier", origin.getHost().port)
            processes.append(client)

            async def admins_up():
                for name in ("a-admin", "b-admin"):
                    code, _ = await admin_call(ports[name], "GET", "/api/hosts")
                    if code != 200:
                        return None
                return True

            await until_children("the admin endpoints", admins_up, a, b)

            # added through node A, served by node B (which holds the client)
            code, _ = await admin_call(
                ports["a-admin"], "PUT", "/api/hosts/app.localhost",
                {"identifier": E2E_IDENTIFIER},
            )  # fmt: skip
            assert code == 201

            async def served(host):
                code, body = await public_get(ports["b"], host)
                return body if code == 200 else None

            body = await until_children("B serving", lambda: served("app.localhost"), a, b, client)
            assert body == b"origin: app.localhost"
            code, listed = await admin_call(ports["b-admin"], "GET", "/api/hosts")
            assert [h["host"] for h in json.loads(listed)["hosts"]] == ["app.localhost"]

            # Redis gone: B serves on, A refuses changes at once with a 503
            server.stop()
            started = time.monotonic()
            code, error = await admin_call(
                ports["a-admin"], "PUT", "/api/hosts/later.localhost",
                {"identifier": E2E_IDENTIFIER},
            )  # fmt: skip
            assert code == 503 and b"not stored" in error, error
            assert time.monotonic() - started < 15  # refused at once, not hung
            assert await public_get(ports["b"], "app.localhost") == (200, body)

            # back: the change goes through and B serves it
            server.start()
            code, _ = await admin_call(
                ports["a-admin"], "PUT", "/api/hosts/later.localhost",
                {"identifier": E2E_IDENTIFIER},
            )  # fmt: skip
            assert code == 201
            later = await until_children("B serving", lambda: served("later.localhost"), a, b)
            assert later == b"origin: later.localhost"

            for process in (client, a, b):
                await stop(process)
            for process in processes:
                log = process.log
                for secret in (E2E_IDENTIFIER, E2E_TOKEN, E2E_PASSWORD):
                    assert secret not in log, (process.name, log)
            for node in (a, b):
                # one line per connection and outage, none per retry
                assert node.log.count("RedisLink#warn") <= 2, node.log
                assert "Starting factory <tunnel.server.redislink" not in node.log
                assert "is back after" in node.log, node.log
        finally:
            await reap_all(processes)
            await origin.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_node_whose_redis_cannot_be_reached_does_not_start(tmp_path):
    redis_server.require()
    node = spawn_twistd(
        "tunnel-server",
        "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
        "--redis", f"tcp:127.0.0.1:{free_port()}",
    )  # fmt: skip
    try:
        await node.ended()
        assert "the tunnel server cannot start" in node.log, node.log
        assert "is unavailable" in node.log, node.log
    finally:
        await reap_all([node])
