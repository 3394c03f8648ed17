"""The registry in Redis (``--redis ENDPOINT``), shared live by several server nodes.

``RedisStore`` is a ``store.SharedRegistryStore`` on txredisapi: every node
of a cluster points at one Redis, writes its admin changes there, and hears
the others' changes through a Pub/Sub channel (``watch``).

Data model (every name starts with the store's prefix, ``tunnel:`` unless
told otherwise, so one Redis can hold several clusters; a prefix with a
hash tag, such as ``{tunnel}:``, keeps them in one slot of a Redis Cluster):

- ``PREFIX hosts``: a hash, host -> JSON ``{"key": HEX, "rules": {...}}``
- ``PREFIX ports``: a hash, TCP port (decimal) -> ``HEX``
- ``PREFIX version``: the store's change counter (a string holding an integer)
- channel ``PREFIX changes``: one notice per change, ``VERSION JSON`` where
  JSON is ``{"host": H, "key": HEX, "rules": {...}}`` (put), ``{"host": H}``
  (delete), ``{"port": N, "key": HEX}`` or ``{"port": N}``.

HEX is the tunnel's key (``TunnelKey``: the SHA-256 of its identifier) in
hex, never the identifier; rules are in their stored form (passwords
hashed).  Each change is one Lua script, so one round trip and atomic:
HSET or HDEL, then, if something changed, INCR of the version and PUBLISH
of the notice carrying the new version, all in one step: no node can see
the change stored without its notice having been sent, and notices arrive
in version order.  HSET's and HDEL's answers say whether the host was new
or was there.  A delete of nothing changes nothing: no version, no notice.

The feed and its catch-up: ``watch`` subscribes on a second connection.
Each time that subscription is (re)established the feed compares the
stored version with what each watcher has; if they differ (changes made
while the node was cut off, whose notices it never got) it reads the whole
registry (with its version, in one script) and tells the watcher the
differences.  Notices that arrive meanwhile wait, and those the snapshot
already holds are skipped; a notice that skips a version, or cannot be
read, starts the same catch-up.

When Redis cannot be reached, operations fail at once (or within
``timeout`` seconds) with ``StoreError``; the node serves on from memory;
the connections come back with backoff (``redislink.RedisLink``), and the
feed catches up when they do.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from ..koding.identifiers import TunnelKey
from .redislink import DEFAULT_BACKOFF, Backoff, LinkState, Protocol, RedisLink
from .store import (
    Change,
    HostChanged,
    HostEntry,
    PortChanged,
    PortEntry,
    Snapshot,
    StoreClosed,
    StoreError,
)

DEFAULT_PREFIX = "tunnel:"

#: KEYS: hash, version; ARGV: field, value, channel, notice
PUT = """
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], tostring(version) .. ' ' .. ARGV[4])
return {created, version}
"""

#: KEYS: hash, version; ARGV: field, channel, notice
DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
    return {0, 0}
end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], tostring(version) .. ' ' .. ARGV[3])
return {1, version}
"""

#: KEYS: version, hosts, ports: everything, as of one version; each hash as
#: one JSON array [field, value, ...] (three replies however large the
#: registry: txredisapi's parser takes a reactor turn per reply)
SNAPSHOT = """
return {redis.call('GET', KEYS[1]) or '0',
        cjson.encode(redis.call('HGETALL', KEYS[2])),
        cjson.encode(redis.call('HGETALL', KEYS[3]))}
"""


def _json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False
    )


def _tunnel_key(text: object) -> TunnelKey:
    if not isinstance(text, str) or len(text) != 64:
        raise ValueError("its key is not a 64-digit hex digest")
    try:
        return TunnelKey(bytes.fromhex(text))
    except ValueError:
        raise ValueError("its key is not a 64-digit hex digest") from None


def _host_entry(host: object, fields: object) -> HostEntry:
    """A host's entry from the object stored (or sent) for it."""
    if not isinstance(host, str):
        raise ValueError("its name is not text")
    if not isinstance(fields, dict):
        raise ValueError("its value is not a JSON object")
    rules = fields.get("rules", {})
    if not isinstance(rules, dict):
        raise ValueError("its rules are not a JSON object")
    return HostEntry(host, _tunnel_key(fields.get("key")), rules)


def _port_number(text: object) -> int:
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 5:
        text = int(text)
    if isinstance(text, bool) or not isinstance(text, int) or not 1 <= text <= 65535:
        raise ValueError("it is not a port number")
    return text


def _loads(text: object) -> Any:
    if not isinstance(text, str):
        raise ValueError("not UTF-8 text")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON ({e})") from None


def _flat(text: object) -> list:
    """A hash from the snapshot script: [field, value, ...] (an empty one is
    encoded by Lua as ``{}``)."""
    fields = _loads(text)
    if fields == {}:
        return []
    if not isinstance(fields, list) or len(fields) % 2:
        raise StoreError("the registry in Redis answered a snapshot that is not one")
    return fields


def parse_notice(message: object) -> tuple[int, Change]:
    """A notice from the channel: its version and the change (ValueError if
    it is not one)."""
    if not isinstance(message, str):
        raise ValueError("a notice that is not UTF-8 text")
    version_text, _, body = message.partition(" ")
    if not (version_text.isascii() and version_text.isdigit() and len(version_text) < 20):
        raise ValueError("a notice without a version")
    fields = _loads(body)
    if not isinstance(fields, dict):
        raise ValueError("a notice that is not a JSON object")
    if "host" in fields:
        host = fields["host"]
        if not isinstance(host, str):
            raise ValueError("a notice whose host is not text")
        entry = _host_entry(host, fields) if "key" in fields else None
        return int(version_text), HostChanged(host, entry)
    if "port" in fields:
        port = _port_number(fields["port"])
        return int(version_text), PortChanged(
            port, PortEntry(port, _tunnel_key(fields["key"])) if "key" in fields else None
        )
    raise ValueError("a notice of neither a host nor a port")


class _Subscriber(txredisapi.SubscriberProtocol):
    """The feed's connection: hands each message to ``on_message``."""

    def __init__(self, on_message: Callable[[object, object], None]) -> None:
        super().__init__(charset="utf-8", convertNumbers=False)
        self._on_message = on_message

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        self._on_message(channel, message)


class RedisStore:
    """A ``SharedRegistryStore`` in Redis at ``endpoint`` (see the module docstring).

    :param name: how logs and errors name the server (the endpoint string).
    :param password: Redis's password (AUTH), never logged.
    :param prefix: the start of every key and of the channel.
    :param timeout: seconds a connection attempt or an operation may take.
    :param keepalive: seconds between the PINGs that check each connection.
    :param backoff: how reconnections are spaced.

    Nothing connects until the store is first used.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        *,
        name: str,
        password: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 3.0,
        keepalive: float = 5.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.name = name
        self.prefix = prefix
        self.hosts_key = f"{prefix}hosts"
        self.ports_key = f"{prefix}ports"
        self.version_key = f"{prefix}version"
        self.channel = f"{prefix}changes"
        self.clock = clock
        self.backoff = backoff
        self._link_options: dict[str, Any] = dict(
            password=password, timeout=timeout, keepalive=keepalive, backoff=backoff, clock=clock
        )
        self._endpoint = endpoint
        self._commands = RedisLink(endpoint, name=name, **self._link_options)
        self._feed: _Feed | None = None
        self._closed = False
        #: operations asked for and not answered yet (close waits for them)
        self._pending: set[Deferred[None]] = set()

    @classmethod
    def from_string(cls, description: str, *, reactor: Any = None, **options: Any) -> RedisStore:
        """A store on the Redis at the Twisted client endpoint string
        ``description`` (``tcp:HOST:PORT``, ``tls:HOST:PORT``, ``unix:PATH``);
        ValueError if it is not one."""
        if reactor is None:
            from twisted.internet import reactor
        try:
            endpoint = clientFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{description!r} is not a client endpoint: {e}") from None
        return cls(endpoint, name=description, clock=reactor, **options)

    def __repr__(self) -> str:
        return f"<RedisStore {self.name} {self.prefix!r}>"

    @property
    def link_state(self) -> LinkState:
        """The state of the connection that changes go through."""
        return self._commands.state

    @property
    def feed_state(self) -> FeedState:
        """The state of the change feed (OFF while nothing watches)."""
        return self._feed.state if self._feed is not None else FeedState.OFF

    # -- RegistryStore ---------------------------------------------------------------

    def load(self) -> Deferred[Snapshot]:
        keys = [self.version_key, self.hosts_key, self.ports_key]
        return self._eval("load", SNAPSHOT, keys, []).addCallback(self._snapshot)

    def put_host(self, entry: HostEntry) -> Deferred[bool]:
        try:
            if not isinstance(entry.rules, Mapping):
                raise TypeError(f"a mapping is needed, not {type(entry.rules).__name__}")
            fields = {"key": entry.key.digest.hex(), "rules": dict(entry.rules)}
            value, notice = _json(fields), _json({"host": entry.host, **fields})
        except (TypeError, ValueError) as e:
            return fail(StoreError(f"the rules of host {entry.host!r} are not JSON: {e}"))
        return self._change(
            "put_host", PUT, self.hosts_key, [entry.host, value, self.channel, notice]
        )

    def delete_host(self, host: str) -> Deferred[bool]:
        notice = _json({"host": host})
        return self._change("delete_host", DELETE, self.hosts_key, [host, self.channel, notice])

    def put_port(self, entry: PortEntry) -> Deferred[bool]:
        try:
            port = _port_number(entry.port)
        except ValueError as e:
            return fail(StoreError(f"put_port failed: {entry.port!r}: {e}"))
        key = entry.key.digest.hex()
        notice = _json({"port": port, "key": key})
        return self._change("put_port", PUT, self.ports_key, [str(port), key, self.channel, notice])

    def delete_port(self, port: int) -> Deferred[bool]:
        args = [str(port), self.channel, _json({"port": port})]
        return self._change("delete_port", DELETE, self.ports_key, args)

    def close(self) -> Deferred[None]:
        """Stop the feed, wait for the operations already asked for (each
        bounded by ``timeout``), then disconnect; later calls fail with
        ``StoreClosed``."""
        self._closed = True
        if self._feed is not None:
            self._feed.stop()
        pending = gatherResults(list(self._pending), consumeErrors=True)
        return pending.addBoth(lambda _: self._disconnect())

    def _disconnect(self) -> Deferred[None]:
        closing = [self._commands.close()]
        if self._feed is not None:
            closing.append(self._feed.close())
        return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    # -- SharedRegistryStore -----------------------------------------------------

    def watch(self, since: Snapshot, on_change: Callable[[Change], None]) -> Callable[[], None]:
        if self._closed:
            raise StoreClosed(f"watch: the registry in Redis {self.name} is closed")
        if self._feed is None:
            self._feed = _Feed(self)
        return self._feed.add(_Watcher(since, on_change))

    # -- what the feed asks -------------------------------------------------------

    def subscriber(self, on_message: Callable[[object, object], None], **hooks: Any) -> RedisLink:
        """A second link, subscribed to the channel, for the feed."""

        async def subscribe(protocol: Protocol) -> None:
            await protocol.subscribe(self.channel)

        return RedisLink(
            self._endpoint,
            name=f"{self.name} (change feed)",
            make_protocol=lambda: _Subscriber(on_message),
            prepare=lambda p: Deferred.fromCoroutine(subscribe(p)),
            **self._link_options,
            **hooks,
        )

    def version(self) -> Deferred[int]:
        """Where the store's change counter stands."""
        d = self._commands.run("version", lambda p: p.get(self.version_key))
        return d.addCallback(lambda text: int(text or 0))

    # -- underneath -------------------------------------------------------------------

    def _eval(self, what: str, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        if self._closed:
            return fail(StoreClosed(f"{what}: the registry in Redis {self.name} is closed"))
        d = self._commands.run(what, lambda p: p.eval(script, keys=keys, args=args))
        done: Deferred[None] = Deferred()
        self._pending.add(done)

        def answered(result: Any) -> Any:
            self._pending.discard(done)
            done.callback(None)
            return result

        return d.addBoth(answered)

    def _change(self, what: str, script: str, hash_key: str, args: list[str]) -> Deferred[bool]:
        d = self._eval(what, script, [hash_key, self.version_key], args)
        return d.addCallback(lambda reply: bool(reply[0]))

    def _snapshot(self, reply: list) -> Snapshot:
        version_text, host_json, port_json = reply
        host_fields, port_fields = _flat(host_json), _flat(port_json)
        hosts = []
        for host, text in zip(host_fields[::2], host_fields[1::2], strict=True):
            try:
                hosts.append(_host_entry(host, _loads(text)))
            except ValueError as e:
                self._skipped(f"host {str(host)[:80]!r}", e)
        ports = []
        for port, text in zip(port_fields[::2], port_fields[1::2], strict=True):
            try:
                ports.append(PortEntry(_port_number(port), _tunnel_key(text)))
            except ValueError as e:
                self._skipped(f"TCP port {str(port)[:8]!r}", e)
        hosts.sort(key=lambda e: e.host)
        ports.sort(key=lambda e: e.port)
        return Snapshot(tuple(hosts), tuple(ports), int(version_text))

    def _skipped(self, what: str, why: ValueError) -> None:
        # one bad value leaves its host unserved, never the server unable to start
        self.log.warn(
            "registry in Redis {name}: skipping {what}: {why}",
            name=self.name,
            what=what,
            why=str(why)[:200],
        )


class _Watcher:
    """One ``watch``: what its caller was last told, and where in the sequence."""

    log = Logger()

    def __init__(self, since: Snapshot, on_change: Callable[[Change], None]) -> None:
        self.hosts = {e.host: e for e in since.hosts}
        self.ports = {e.port: e for e in since.ports}
        #: the last version the caller has (None: unknown, a catch-up tells)
        self.version = since.version
        self.on_change = on_change
        self.active = True

    def wants(self, version: int) -> bool | None:
        """Whether a notice of ``version`` is the next one (True), already
        known (False), or one the caller cannot take before a catch-up (None)."""
        if self.version is None:
            return None
        if version <= self.version:
            return False
        return True if version == self.version + 1 else None

    def apply(self, version: int, change: Change) -> None:
        self.version = version
        self._tell(change)

    def catch_up(self, snapshot: Snapshot) -> int:
        """Tell the differences between what the caller has and ``snapshot``;
        how many there were."""
        hosts = {e.host: e for e in snapshot.hosts}
        ports = {e.port: e for e in snapshot.ports}
        changes: list[Change] = [HostChanged(h, None) for h in sorted(self.hosts) if h not in hosts]
        changes += [PortChanged(p, None) for p in sorted(self.ports) if p not in ports]
        changes += [HostChanged(h, e) for h, e in sorted(hosts.items()) if self.hosts.get(h) != e]
        changes += [PortChanged(p, e) for p, e in sorted(ports.items()) if self.ports.get(p) != e]
        self.version = snapshot.version
        for change in changes:
            self._tell(change)
        return len(changes)

    def _tell(self, change: Change) -> None:
        if isinstance(change, HostChanged):
            if self.hosts.get(change.host) == change.entry:
                return
            if change.entry is None:
                del self.hosts[change.host]
            else:
                self.hosts[change.host] = change.entry
        else:
            if self.ports.get(change.port) == change.entry:
                return
            if change.entry is None:
                del self.ports[change.port]
            else:
                self.ports[change.port] = change.entry
        if not self.active:
            return
        try:
            self.on_change(change)
        except Exception as e:
            self.log.error("a registry change could not be applied: {why}", why=str(e)[:200])


class FeedState(enum.Enum):
    OFF = "off"  # not subscribed (not yet, or the connection is lost)
    SYNCING = "syncing"  # subscribed; comparing with the store, notices wait
    LIVE = "live"  # notices are told as they come


class _Feed:
    """The store's change feed: one subscription shared by its watchers."""

    log = Logger()

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.state = FeedState.OFF
        self.watchers: list[_Watcher] = []
        #: notices received while not LIVE: (version, change or None if unreadable)
        self._waiting: list[tuple[int, Change]] = []
        #: bumped whenever the subscription is lost or a catch-up begins: a
        #: catch-up that is no longer the latest drops its result
        self._generation = 0
        self._sync_failures = 0
        self._retry: IDelayedCall | None = None
        self._link: RedisLink | None = None
        self._closing: list[Deferred[None]] = []

    def add(self, watcher: _Watcher) -> Callable[[], None]:
        self.watchers.append(watcher)
        if self._link is None:
            self._link = self.store.subscriber(
                self._message, on_ready=self._subscribed, on_lost=self._lost
            )
            self._link.start()
        elif self.state is not FeedState.OFF:
            # the feed may be past the watcher's snapshot: compare (a GET)
            self._begin_sync()

        def unwatch() -> None:
            if watcher.active:
                watcher.active = False
                self.watchers.remove(watcher)
                if not self.watchers:
                    self._stop_link()

        return unwatch

    def stop(self) -> None:
        """Tell nothing more to anyone, and unsubscribe."""
        for watcher in self.watchers:
            watcher.active = False
        self.watchers.clear()
        self._stop_link()

    def close(self) -> Deferred[None]:
        """``stop()``, and fire once the subscription's connection is closed."""
        self.stop()
        closing, self._closing = self._closing, []
        return gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def _stop_link(self) -> None:
        link, self._link = self._link, None
        self._cancel_retry()
        self._lost()
        if link is not None:
            self._closing.append(link.close())

    # -- the subscription -------------------------------------------------------------

    def _subscribed(self, protocol: Protocol) -> None:
        self._begin_sync()

    def _lost(self) -> None:
        self.state = FeedState.OFF
        self._generation += 1
        self._waiting.clear()
        self._cancel_retry()

    def _message(self, channel: object, message: object) -> None:
        if channel != self.store.channel:
            return
        try:
            version, change = parse_notice(message)
        except ValueError as e:
            self.log.warn(
                "change feed of Redis {name}: an unreadable notice ({why}); catching up",
                name=self.store.name,
                why=str(e)[:200],
            )
            if self.state is not FeedState.OFF:
                self._begin_sync()
            return
        if self.state is not FeedState.LIVE:
            self._waiting.append((version, change))
            return
        self._deliver(version, change)

    def _deliver(self, version: int, change: Change) -> None:
        for watcher in list(self.watchers):
            wanted = watcher.wants(version)
            if wanted is None:  # a notice is missing: catch up first
                self._begin_sync()
                self._waiting.append((version, change))
                return
            if wanted:
                watcher.apply(version, change)

    # -- catching up ------------------------------------------------------------------

    def _begin_sync(self) -> None:
        self.state = FeedState.SYNCING
        self._cancel_retry()
        self._generation += 1
        Deferred.fromCoroutine(self._sync(self._generation))

    async def _sync(self, generation: int) -> None:
        try:
            version = await self.store.version()
            if generation != self._generation:
                return
            missed = 0
            if any(w.version != version for w in self.watchers):
                snapshot = await self.store.load()
                if generation != self._generation:
                    return
                for watcher in list(self.watchers):
                    missed += watcher.catch_up(snapshot)
        except Exception as e:
            if generation == self._generation and self.state is FeedState.SYNCING:
                self._sync_failed(e)
            return
        if self._sync_failures or missed:
            self.log.info(
                "change feed of Redis {name}: caught up ({missed} changes told)",
                name=self.store.name,
                missed=missed,
            )
        self._sync_failures = 0
        self.state = FeedState.LIVE
        waiting, self._waiting = self._waiting, []
        for notice in waiting:
            if self.state is not FeedState.LIVE:  # another gap: wait again
                self._waiting.append(notice)
            else:
                self._deliver(*notice)

    def _sync_failed(self, error: Exception) -> None:
        self._sync_failures += 1
        if self._sync_failures == 1:
            self.log.warn(
                "change feed of Redis {name}: cannot catch up yet: {why}; retrying",
                name=self.store.name,
                why=str(error)[:200],
            )
        delay = self.store.backoff.delay(self._sync_failures)
        self._retry = self.store.clock.callLater(delay, self._begin_sync)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
