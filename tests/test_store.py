"""The registry's stores: one contract for every backend, then SQLite's file.

The contract tests run over each backend of ``BACKENDS``, the Redis store's
on a redis-server of this module (each test under a key prefix of its own;
skipped where redis-server is not installed).  The SQLite tests read the database with the stdlib
``sqlite3`` to check what the file holds, and make files the store must
refuse.  adbapi answers from a worker thread through the real reactor, so
the tests wait on it (pytest-twisted), and each checks that no thread
outlives it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
import threading
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, capturedLogs, formatEvent

from tunnel.koding.identifiers import TunnelKey
from tunnel.server import sqlite as sqlite_module
from tunnel.server.redisstore import RedisStore
from tunnel.server.sqlite import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    SQLiteStore,
    StoreClosed,
    StoreError,
)
from tunnel.server.store import HostEntry, MemoryStore, PortEntry, Snapshot

from . import redis_server

IDENTIFIER = "id-7f3c0a-do-not-store-me"
KEY = TunnelKey.of(IDENTIFIER)
OTHER = TunnelKey.of("another-identifier")

#: a stored form of rules as rules.HostRules.stored() writes them: JSON-ready
RULES = {
    "basic_auth": {"user": "ops", "hash": "scrypt$16384$8$1$c2FsdA==$aGFzaA=="},
    "allow": ["10.0.0.0/8", "2001:db8::/32"],
    "rate": {"per_second": 2.5, "burst": 10},
    "note": "naïve — ünïcode ✓",
    "nothing": None,
    "on": True,
}


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every test closes its stores: their worker threads are gone after it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(scope="module")
def redis():
    """One redis-server for the module's Redis tests (skips without one)."""
    with redis_server.running() as server:
        yield server


async def open_memory(request, path: Path) -> MemoryStore:
    return MemoryStore()


async def open_sqlite(request, path: Path) -> SQLiteStore:
    return await SQLiteStore.open(path / "registry.db")


async def open_sqlite_now(request, path: Path) -> SQLiteStore:
    return SQLiteStore.open_now(path / "registry.db")


async def open_redis(request, path: Path) -> RedisStore:
    server = request.getfixturevalue("redis")
    return RedisStore.from_string(server.endpoint, prefix=f"test-{uuid.uuid4().hex}:")


#: every RegistryStore backend, and how a test gets an empty one
BACKENDS = {
    "memory": open_memory,
    "sqlite": open_sqlite,
    "sqlite-now": open_sqlite_now,
    "redis": open_redis,
}


async def _open_later(path: Path) -> SQLiteStore:
    return await SQLiteStore.open(path)


async def _open_at_start(path: Path) -> SQLiteStore:
    return SQLiteStore.open_now(path)


#: the two ways to open a file: they refuse the same files with the same errors
OPENERS = pytest.mark.parametrize("opener", [_open_later, _open_at_start], ids=["open", "open_now"])


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    opener = BACKENDS[request.param]
    opened = pytest_twisted.blockon(Deferred.fromCoroutine(opener(request, tmp_path)))
    yield opened
    pytest_twisted.blockon(opened.close())


def by_key(snapshot: Snapshot) -> tuple[dict[str, HostEntry], dict[int, PortEntry]]:
    """The snapshot as dicts (stores do not promise an order), checking that
    no host or port is listed twice."""
    hosts = {e.host: e for e in snapshot.hosts}
    ports = {e.port: e for e in snapshot.ports}
    assert len(hosts) == len(snapshot.hosts) and len(ports) == len(snapshot.ports)
    return hosts, ports


# The contract: every backend.


@pytest_twisted.ensureDeferred
async def test_a_new_store_is_empty(store):
    assert by_key(await store.load()) == ({}, {})


@pytest_twisted.ensureDeferred
async def test_put_host_creates_then_replaces(store):
    assert await store.put_host(HostEntry("app.example.com", KEY, RULES)) is True
    hosts, _ = by_key(await store.load())
    assert hosts == {"app.example.com": HostEntry("app.example.com", KEY, RULES)}

    assert await store.put_host(HostEntry("app.example.com", OTHER)) is False
    hosts, ports = by_key(await store.load())
    assert hosts == {"app.example.com": HostEntry("app.example.com", OTHER, {})}
    assert ports == {}


@pytest_twisted.ensureDeferred
async def test_delete_host_says_whether_it_was_stored(store):
    await store.put_host(HostEntry("a.example", KEY))
    await store.put_host(HostEntry("b.example", KEY))
    assert await store.delete_host("a.example") is True
    assert await store.delete_host("a.example") is False
    assert await store.delete_host("never.example") is False
    hosts, _ = by_key(await store.load())
    assert list(hosts) == ["b.example"]


@pytest_twisted.ensureDeferred
async def test_put_and_delete_port(store):
    assert await store.put_port(PortEntry(1, KEY)) is True
    assert await store.put_port(PortEntry(65535, KEY)) is True
    assert await store.put_port(PortEntry(1, OTHER)) is False
    _, ports = by_key(await store.load())
    assert ports == {1: PortEntry(1, OTHER), 65535: PortEntry(65535, KEY)}

    assert await store.delete_port(1) is True
    assert await store.delete_port(1) is False
    assert await store.delete_port(8080) is False
    assert by_key(await store.load()) == ({}, {65535: PortEntry(65535, KEY)})


@pytest_twisted.ensureDeferred
async def test_rules_round_trip(store):
    nested = {"a": {"b": [1, 2.5, "x", None, False, {"c": []}]}, "": ""}
    await store.put_host(HostEntry("r.example", KEY, RULES))
    await store.put_host(HostEntry("n.example", KEY, nested))
    hosts, _ = by_key(await store.load())
    assert hosts["r.example"].rules == RULES
    assert hosts["n.example"].rules == nested


@pytest_twisted.ensureDeferred
async def test_hosts_are_kept_as_given(store):
    """Validating and normalising hosts is Routes' job: the store keeps any
    text, and two spellings are two hosts."""
    given_hosts = ["App.Example.com", "app.example.com", "bücher.example:8080", "[::1]:80", " "]
    for host in given_hosts:
        assert await store.put_host(HostEntry(host, KEY)) is True
    hosts, _ = by_key(await store.load())
    assert sorted(hosts) == sorted(given_hosts)
    assert all(e.key == KEY for e in hosts.values())


@pytest_twisted.ensureDeferred
async def test_hosts_and_ports_are_separate(store):
    await store.put_host(HostEntry("80", KEY))
    await store.put_port(PortEntry(80, OTHER))
    assert await store.delete_port(80) is True
    hosts, ports = by_key(await store.load())
    assert list(hosts) == ["80"] and ports == {}


@pytest_twisted.ensureDeferred
async def test_concurrent_puts_of_one_host_create_it_once(store):
    """Asked for together, the first put creates and the second replaces:
    never two 'created'; the last one asked for wins."""
    first = store.put_host(HostEntry("race.example", KEY))
    second = store.put_host(HostEntry("race.example", OTHER, {"x": 1}))
    ports = [store.put_port(PortEntry(9000, KEY)), store.put_port(PortEntry(9000, OTHER))]
    assert [await first, await second] == [True, False]
    assert [await d for d in ports] == [True, False]
    hosts, stored_ports = by_key(await store.load())
    assert hosts == {"race.example": HostEntry("race.example", OTHER, {"x": 1})}
    assert stored_ports == {9000: PortEntry(9000, OTHER)}


# SQLite: the file.


def read_db(path: Path, query: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def write_db(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def file_bytes(db: Path) -> bytes:
    """The database and its -wal and -shm files, as far as they exist."""
    return b"".join(
        p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()
    )


@pytest_twisted.ensureDeferred
async def test_survives_close_and_reopen(tmp_path):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("kept.example", KEY, RULES))
    await store.put_host(HostEntry("gone.example", KEY))
    await store.put_port(PortEntry(2222, OTHER))
    await store.put_port(PortEntry(3333, OTHER))
    await store.delete_host("gone.example")
    await store.delete_port(3333)
    await store.close()

    again = await SQLiteStore.open(db)
    try:
        assert await again.load() == Snapshot(
            (HostEntry("kept.example", KEY, RULES),), (PortEntry(2222, OTHER),)
        )
        assert await again.put_host(HostEntry("kept.example", OTHER)) is False
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_the_files_never_hold_the_identifier(tmp_path):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    try:
        await store.put_host(HostEntry("a.example", KEY, RULES))
        await store.put_host(HostEntry("b.example", KEY))
        await store.put_port(PortEntry(2222, KEY))
        await store.delete_host("b.example")
        written = file_bytes(db)
        assert Path(f"{db}-wal").exists()  # WAL: what was written is there
    finally:
        await store.close()
    closed = file_bytes(db)
    for data in (written, closed):
        assert KEY.digest in data  # the right files were read
        assert IDENTIFIER.encode() not in data
        assert IDENTIFIER.encode("utf-16-le") not in data


@pytest.mark.parametrize("change", ["delete", "replace"])
@pytest_twisted.ensureDeferred
async def test_a_removed_password_hash_leaves_no_trace_in_the_file(tmp_path, change):
    """secure_delete: a deleted or replaced host's password hash is
    overwritten, not left in a free part of a page."""
    db = tmp_path / "registry.db"
    marker = "scrypt$removed-password-hash-marker"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("kept.example", KEY))
    await store.put_host(HostEntry("old.example", OTHER, {"basic_auth": {"hash": marker}}))
    if change == "delete":
        await store.delete_host("old.example")
    else:
        await store.put_host(HostEntry("old.example", KEY))
    await store.close()
    data = file_bytes(db)
    assert b"kept.example" in data
    assert marker.encode() not in data and OTHER.digest not in data


@pytest.mark.parametrize("umask", [0o000, 0o277])
@pytest_twisted.ensureDeferred
async def test_a_new_file_is_private_whatever_the_umask(tmp_path, umask):
    db = tmp_path / "registry.db"
    old = os.umask(umask)
    try:
        store = await SQLiteStore.open(db)
        await store.put_host(HostEntry("a.example", KEY))
    finally:
        os.umask(old)
    try:
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_an_existing_file_open_to_others_is_used_with_a_warning(tmp_path):
    db = tmp_path / "registry.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    with capturedLogs() as events:
        store = await SQLiteStore.open(db)
    await store.close()
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert str(db) in warnings[0] and "0644" in warnings[0]
    assert stat.S_IMODE(db.stat().st_mode) == 0o644  # the operator's choice


@pytest_twisted.ensureDeferred
async def test_an_empty_file_is_migrated_from_version_0(tmp_path):
    db = tmp_path / "registry.db"
    db.write_bytes(b"")  # what SQLite reads as a database of version 0
    store = await SQLiteStore.open(db)
    try:
        assert await store.load() == Snapshot()
        assert await store.put_host(HostEntry("a.example", KEY)) is True
    finally:
        await store.close()
    assert read_db(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert read_db(db, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert read_db(db, "PRAGMA journal_mode") == [("wal",)]
    tables = read_db(db, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    assert tables == [("hosts",), ("tcp_ports",)]


@pytest_twisted.ensureDeferred
async def test_a_next_migration_keeps_the_rows(tmp_path, monkeypatch):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("a.example", KEY, RULES))
    await store.close()

    step = ("CREATE TABLE extra (x INTEGER)", "INSERT INTO extra VALUES (7)")
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, step))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = await SQLiteStore.open(db)
    try:
        assert await store.load() == Snapshot((HostEntry("a.example", KEY, RULES),))
    finally:
        await store.close()
    assert read_db(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert read_db(db, "SELECT x FROM extra") == [(7,)]


@pytest_twisted.ensureDeferred
async def test_a_failing_migration_changes_nothing(tmp_path, monkeypatch):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("a.example", KEY))
    await store.close()

    step = ("CREATE TABLE extra (x INTEGER)", "INSERT INTO nowhere VALUES (1)")
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", (*sqlite_module.MIGRATIONS, step))
    monkeypatch.setattr(sqlite_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="nowhere") as raised:
        await SQLiteStore.open(db)
    assert str(db) in str(raised.value)
    assert read_db(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert read_db(db, "SELECT name FROM sqlite_master WHERE name = 'extra'") == []
    assert read_db(db, "SELECT host FROM hosts") == [("a.example",)]


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 1000, -1])
@OPENERS
@pytest_twisted.ensureDeferred
async def test_a_version_this_code_does_not_know_is_refused(tmp_path, version, opener):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("a.example", KEY))
    await store.close()
    write_db(db, f"PRAGMA user_version = {version}")
    before = db.read_bytes()

    with pytest.raises(StoreError) as raised:
        await opener(db)
    message = str(raised.value)
    assert str(db) in message
    assert f"version {version}" in message and f"up to {SCHEMA_VERSION}" in message
    assert db.read_bytes() == before  # never downgraded, nor touched
    assert read_db(db, "PRAGMA user_version") == [(version,)]


@OPENERS
@pytest_twisted.ensureDeferred
async def test_a_file_that_is_not_a_database_is_refused(tmp_path, opener):
    path = tmp_path / "notes.txt"
    content = b"this is not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(StoreError, match="is not a SQLite database") as raised:
        await opener(path)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    "statements, reason",
    [
        (["CREATE TABLE notes (text TEXT)"], "tables but no registry schema version"),
        (["PRAGMA application_id = 4660"], "another application's SQLite database"),
    ],
)
@OPENERS
@pytest_twisted.ensureDeferred
async def test_another_applications_database_is_refused(tmp_path, statements, reason, opener):
    db = tmp_path / "other.db"
    write_db(db, *statements)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=reason) as raised:
        await opener(db)
    assert str(db) in str(raised.value)
    assert db.read_bytes() == before


@OPENERS
@pytest_twisted.ensureDeferred
async def test_a_file_that_cannot_be_created_is_reported(tmp_path, opener):
    db = tmp_path / "missing" / "registry.db"
    with pytest.raises(StoreError, match="cannot create the registry") as raised:
        await opener(db)
    assert str(db) in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_corrupt_rows_are_skipped_with_a_warning(tmp_path):
    """A row edited by hand leaves its own host or port out (never served
    without its rules), with a line naming it; the others load."""
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.put_host(HostEntry("good.example", KEY, RULES))
    await store.put_port(PortEntry(2222, KEY))
    await store.close()
    good = KEY.digest.hex()
    write_db(
        db,
        "PRAGMA ignore_check_constraints = ON",
        "INSERT INTO hosts VALUES ('shortkey.example', x'0011', '{}')",
        f"INSERT INTO hosts VALUES ('badjson.example', x'{good}', '{{\"allow\": [')",
        f"INSERT INTO hosts VALUES ('list.example', x'{good}', '[1, 2]')",
        f"INSERT INTO hosts VALUES ('textkey.example', '{good}', '{{}}')",
        f"INSERT INTO tcp_ports VALUES (70000, x'{good}')",
        "INSERT INTO tcp_ports VALUES (3333, 'not a key')",
    )

    store = await SQLiteStore.open(db)
    try:
        with capturedLogs() as events:
            snapshot = await store.load()
        assert snapshot == Snapshot(
            (HostEntry("good.example", KEY, RULES),), (PortEntry(2222, KEY),)
        )
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        assert not [e for e in events if "log_failure" in e]  # no traceback
        for name in ("shortkey.example", "badjson.example", "list.example", "textkey.example"):
            assert sum(name in line and str(db) in line for line in lines) == 1, name
        for port in ("70000", "3333"):
            assert sum(f"TCP port {port}" in line for line in lines) == 1, port
        assert len(lines) == 6

        # the operator's fix: putting the host again replaces the bad row
        assert await store.put_host(HostEntry("list.example", OTHER)) is False
        assert await store.delete_port(70000) is True
        hosts, ports = by_key(await store.load())
        assert hosts["list.example"] == HostEntry("list.example", OTHER)
        assert list(ports) == [2222]
    finally:
        await store.close()


@pytest.mark.parametrize("port", [0, 65536, -1])
@pytest_twisted.ensureDeferred
async def test_a_port_out_of_range_fails_and_changes_nothing(tmp_path, port):
    store = await SQLiteStore.open(tmp_path / "registry.db")
    try:
        with pytest.raises(StoreError, match="put_port failed"):
            await store.put_port(PortEntry(port, KEY))
        assert await store.load() == Snapshot()
    finally:
        await store.close()


@pytest.mark.parametrize("rules", [{"x": {1, 2}}, {"x": float("nan")}, {"x": b"bytes"}, [1]])
@pytest_twisted.ensureDeferred
async def test_rules_that_are_not_json_fail_and_change_nothing(tmp_path, rules):
    store = await SQLiteStore.open(tmp_path / "registry.db")
    try:
        await store.put_host(HostEntry("a.example", KEY, {"kept": True}))
        with pytest.raises(StoreError, match="'a.example' are not JSON"):
            await store.put_host(HostEntry("a.example", OTHER, rules))
        assert await store.load() == Snapshot((HostEntry("a.example", KEY, {"kept": True}),))
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_pending_changes(tmp_path):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    puts = [store.put_host(HostEntry(f"h{i}.example", KEY)) for i in range(20)]
    puts.append(store.put_port(PortEntry(2222, KEY)))
    closed = store.close()
    # the answers come through this (the reactor's) thread: none yet
    assert not closed.called and not any(d.called for d in puts)
    with pytest.raises(StoreClosed, match="is closed"):
        await store.put_host(HostEntry("late.example", KEY))
    assert store.close() is not closed  # a second close waits as well

    await closed
    assert all(d.called for d in puts)
    assert [await d for d in puts] == [True] * 21
    assert not Path(f"{db}-wal").exists()  # the connection is closed

    again = await SQLiteStore.open(db)
    try:
        hosts, ports = by_key(await again.load())
        assert len(hosts) == 20 and list(ports) == [2222]
    finally:
        await again.close()


@pytest_twisted.ensureDeferred
async def test_every_call_after_close_fails_clearly(tmp_path):
    db = tmp_path / "registry.db"
    store = await SQLiteStore.open(db)
    await store.close()
    calls = [
        store.load,
        lambda: store.put_host(HostEntry("a.example", KEY)),
        lambda: store.delete_host("a.example"),
        lambda: store.put_port(PortEntry(2222, KEY)),
        lambda: store.delete_port(2222),
    ]
    for call in calls:
        with pytest.raises(StoreClosed, match=f"{db} is closed"):
            await call()
    await store.close()  # closing again is harmless


# A property: any sequence of changes, SQLite after a reopen == memory.

hosts_st = st.sampled_from(["a.example", "A.example", "b.example:8080", "ü.example"])
keys_st = st.sampled_from([KEY, OTHER, TunnelKey.of("third")])
rules_st = st.dictionaries(
    st.sampled_from(["allow", "rate", "basic_auth", "ü"]),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    ),
    max_size=3,
)
ports_st = st.sampled_from([1, 80, 8080, 65535])
changes_st = st.lists(
    st.one_of(
        st.tuples(st.just("put_host"), st.builds(HostEntry, hosts_st, keys_st, rules_st)),
        st.tuples(st.just("delete_host"), hosts_st),
        st.tuples(st.just("put_port"), st.builds(PortEntry, ports_st, keys_st)),
        st.tuples(st.just("delete_port"), ports_st),
    ),
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=changes_st)
@pytest_twisted.ensureDeferred
async def test_sqlite_after_a_reopen_holds_what_memory_holds(changes):
    memory = MemoryStore()
    with tempfile.TemporaryDirectory() as directory:
        db = Path(directory) / "registry.db"
        store = await SQLiteStore.open(db)
        try:
            for method, argument in changes:
                expected = await getattr(memory, method)(argument)
                assert await getattr(store, method)(argument) == expected, (method, argument)
        finally:
            await store.close()
        again = await SQLiteStore.open(db)
        try:
            assert by_key(await again.load()) == by_key(await memory.load())
        finally:
            await again.close()


@pytest_twisted.ensureDeferred
async def test_open_now_works_inline_until_the_reactor_runs(tmp_path):
    """At a program's start (twistd's privilegedStartService, before the
    reactor runs) every operation is done at once on open_now's connection,
    so a server loads and seeds before it binds its ports and sheds its
    privileges; once the reactor runs, the worker thread takes over."""
    starting = MemoryReactor()
    store = SQLiteStore.open_now(tmp_path / "registry.db", reactor=starting)
    put = store.put_host(HostEntry("a.example", KEY, RULES))
    assert put.called and put.result is True  # no thread involved: done already
    snapshot = store.load()
    assert snapshot.called and snapshot.result.hosts == (HostEntry("a.example", KEY, RULES),)
    bad = store.put_port(PortEntry(70000, KEY))
    assert bad.called and isinstance(bad.result.value, StoreError)
    bad.addErrback(lambda _: None)
    starting.run()  # the reactor runs: the inline connection is closed
    assert await store.put_port(PortEntry(2222, KEY)) is True  # through the worker thread
    assert (await store.load()).ports == (PortEntry(2222, KEY),)
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_relative_path_stays_the_same_file_after_a_change_of_directory(
    tmp_path, monkeypatch
):
    """twistd --rundir changes directory after the options are read: the store
    keeps the file it opened, not a new one of the same name elsewhere."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore.open_now("registry.db")
    monkeypatch.chdir(tmp_path / "elsewhere")
    await store.put_host(HostEntry("a.example", KEY))
    await store.close()
    assert not (tmp_path / "elsewhere" / "registry.db").exists()
    assert read_db(tmp_path / "registry.db", "SELECT host FROM hosts") == [("a.example",)]


def test_a_host_entry_shows_no_rules_in_its_repr():
    """The stored rules hold a password's salt and hash: a log line or an
    exception message that shows an entry must not carry them."""
    entry = HostEntry("a.example", KEY, RULES)
    assert "scrypt" not in repr(entry) and "hash" not in repr(entry)
    assert KEY.fingerprint in repr(entry) and KEY.hex() not in repr(entry)
