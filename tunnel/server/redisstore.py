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
- ``PREFIX epoch``: a random id of this incarnation of the data, set (if it is
  missing) by every script: a Redis restarted empty, a FLUSHALL or a key
  deleted by hand gives a new one, and a counter that starts again
- channel ``PREFIX changes``: one notice per change, ``VERSION EPOCH JSON``
  where JSON is ``{"host": H, "key": HEX, "rules": {...}}`` (put),
  ``{"host": H}`` (delete), ``{"port": N, "key": HEX}`` or ``{"port": N}``.

HEX is the tunnel's key (``TunnelKey``: the SHA-256 of its identifier) in
hex, never the identifier; rules are in their stored form (passwords
hashed).  Each change is one Lua script, so one round trip and atomic:
HSET or HDEL, then, if something changed, INCR of the version and PUBLISH
of the notice carrying the new version and the epoch, all in one step: no
node can see the change stored without its notice having been sent, and
notices arrive in version order.  HSET's and HDEL's answers say whether
the host was new or was there.  A delete of nothing changes nothing: no
version, no notice.

The feed and its catch-up: ``watch`` subscribes on a second connection.
Each time that subscription is (re)established the feed reads the whole
registry (with its version and epoch, in one script) and tells the
watchers ``store.Resynced``: everything the store holds, which each makes
what it serves equal to (its own changes, and what it could not apply
before, included).  Notices that arrive meanwhile wait (up to
``MAX_WAITING``; past that they are dropped and a new snapshot is read),
and those the snapshot already holds are skipped.  Live, a notice of the
next version in the same epoch is told; a gap, another epoch, a version
that went back or an unreadable notice starts the same catch-up, with a
warning (rate-limited); a notice that still does not follow the snapshot
cannot be genuine (INCR comes before PUBLISH) and is dropped, and
catch-ups that follow one another are spaced by the backoff.  A value
that cannot be read (not UTF-8, not JSON, not a key) is skipped with a
warning naming its host or port.

When Redis cannot be reached, operations fail at once (or within
``timeout`` seconds) with ``StoreError``; a change that got no answer in
time fails with ``StoreOutcomeUnknown`` (Redis may have run it: the feed
will tell); the node serves on from memory; the connections come back with
backoff (``redislink.RedisLink``), and the feed catches up when they do.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from ..logs import RateLimitedLog
from .redislink import DEFAULT_BACKOFF, Backoff, LinkState, Protocol, RedisLink
from .store import (
    Change,
    HostChanged,
    HostEntry,
    PortChanged,
    PortEntry,
    Resynced,
    Snapshot,
    StoreClosed,
    StoreError,
    StoreOutcomeUnknown,
)

DEFAULT_PREFIX = "tunnel:"

#: KEYS: hash, version, epoch; ARGV: field, value, channel, notice, a new epoch
PUT = """
redis.call('SET', KEYS[3], ARGV[5], 'NX')
local epoch = redis.call('GET', KEYS[3])
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], tostring(version) .. ' ' .. epoch .. ' ' .. ARGV[4])
return {created, version}
"""

#: KEYS: hash, version, epoch; ARGV: field, channel, notice, a new epoch
DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
    return {0, 0}
end
redis.call('SET', KEYS[3], ARGV[4], 'NX')
local epoch = redis.call('GET', KEYS[3])
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], tostring(version) .. ' ' .. epoch .. ' ' .. ARGV[3])
return {1, version}
"""

#: KEYS: version, hosts, ports, epoch; ARGV: a new epoch: everything, as of
#: one version; each hash as one JSON array [field, value, ...] (a few
#: replies however large the registry: txredisapi's parser takes a reactor
#: turn per reply)
SNAPSHOT = """
redis.call('SET', KEYS[4], ARGV[1], 'NX')
return {redis.call('GET', KEYS[1]) or '0',
        redis.call('GET', KEYS[4]),
        cjson.encode(redis.call('HGETALL', KEYS[2])),
        cjson.encode(redis.call('HGETALL', KEYS[3]))}
"""

#: notices held while the feed is not live, past which they are dropped
#: (and the feed catches up from a fresh snapshot)
MAX_WAITING = 1000


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
    _text(host)
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


def _text(value: object) -> str:
    """``value`` if it is text that was valid UTF-8 (ValueError if not)."""
    if not isinstance(value, str):
        raise ValueError("not UTF-8 text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not UTF-8 text") from None
    return value


def _loads(text: object) -> Any:
    text = _text(text)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON ({e})") from None


def _flat(text: object) -> list:
    """A hash from the snapshot script: [field, value, ...] (an empty one is
    encoded by Lua as ``{}``).  Bytes that are not UTF-8 are kept as lone
    surrogates, so that only the fields holding them are refused
    (``_text``), not the whole registry."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    try:
        fields = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        fields = None
    if fields == {}:
        return []
    if not isinstance(fields, list) or len(fields) % 2:
        raise StoreError("the registry in Redis answered a snapshot that is not one")
    return fields


def _shown(value: object, limit: int) -> str:
    return repr(str(value)[:limit])


def _epoch(text: object) -> str:
    if not (isinstance(text, str) and 0 < len(text) <= 64 and text.isascii() and text.isalnum()):
        raise ValueError("a notice without an epoch")
    return text


def parse_notice(message: object) -> tuple[int, str, Change]:
    """A notice from the channel: its version, its epoch and the change
    (ValueError if it is not one)."""
    if not isinstance(message, str):
        raise ValueError("a notice that is not UTF-8 text")
    version_text, _, rest = message.partition(" ")
    if not (version_text.isascii() and version_text.isdigit() and len(version_text) < 20):
        raise ValueError("a notice without a version")
    epoch_text, _, body = rest.partition(" ")
    epoch = _epoch(epoch_text)
    fields = _loads(body)
    if not isinstance(fields, dict):
        raise ValueError("a notice that is not a JSON object")
    version = int(version_text)
    if "host" in fields:
        host = fields["host"]
        if not isinstance(host, str):
            raise ValueError("a notice whose host is not text")
        _text(host)
        entry = _host_entry(host, fields) if "key" in fields else None
        return version, epoch, HostChanged(host, entry)
    if "port" in fields:
        port = _port_number(fields["port"])
        return (
            version,
            epoch,
            PortChanged(
                port, PortEntry(port, _tunnel_key(fields["key"])) if "key" in fields else None
            ),
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
        self.epoch_key = f"{prefix}epoch"
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
        self._rated = RateLimitedLog(self.log, clock=clock)
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
        keys = [self.version_key, self.hosts_key, self.ports_key, self.epoch_key]
        d = self._eval("load", SNAPSHOT, keys, [secrets.token_hex(16)])
        return d.addCallback(self._snapshot)

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
        keys = [hash_key, self.version_key, self.epoch_key]
        d = self._eval(what, script, keys, [*args, secrets.token_hex(16)])

        def unknown(failure: Failure) -> Failure:
            # the script may have run: only the feed can tell
            failure.trap(StoreOutcomeUnknown)
            raise StoreOutcomeUnknown(
                f"{failure.getErrorMessage()}: the change may have been applied"
                " (the change feed will tell)"
            )

        return d.addCallbacks(lambda reply: bool(reply[0]), unknown)

    def _snapshot(self, reply: object) -> Snapshot:
        if not isinstance(reply, list) or len(reply) != 4:
            raise StoreError(f"the registry in Redis {self.name} answered no snapshot")
        version_text, epoch, host_json, port_json = reply
        if not (
            isinstance(version_text, str) and version_text.isascii() and version_text.isdigit()
        ):
            raise StoreError(
                f"the registry in Redis {self.name}: its version {self.version_key!r}"
                f" is not a number: {str(version_text)[:40]!r}"
            )
        try:
            epoch = _epoch(epoch)
        except ValueError:
            raise StoreError(
                f"the registry in Redis {self.name}: its epoch {self.epoch_key!r} is not one"
            ) from None
        host_fields, port_fields = _flat(host_json), _flat(port_json)
        hosts = []
        for host, text in zip(host_fields[::2], host_fields[1::2], strict=True):
            try:
                hosts.append(_host_entry(host, _loads(text)))
            except ValueError as e:
                self._skipped(f"host {_shown(host, 80)}", e)
        ports = []
        for port, text in zip(port_fields[::2], port_fields[1::2], strict=True):
            try:
                ports.append(PortEntry(_port_number(port), _tunnel_key(_text(text))))
            except ValueError as e:
                self._skipped(f"TCP port {_shown(port, 8)}", e)
        hosts.sort(key=lambda e: e.host)
        ports.sort(key=lambda e: e.port)
        return Snapshot(tuple(hosts), tuple(ports), int(version_text), epoch)

    def _skipped(self, what: str, why: ValueError) -> None:
        # one bad value leaves its host unserved, never the server unable to start
        self._rated.warn(
            "skipped value",
            "registry in Redis {name}: skipping {what}: {why}",
            name=self.name,
            what=what,
            why=str(why)[:200],
        )


class _Watcher:
    """One ``watch``: whom to tell."""

    log = Logger()

    def __init__(self, since: Snapshot, on_change: Callable[[Change], None]) -> None:
        self.since = since
        self.on_change = on_change
        self.active = True

    def tell(self, change: Change) -> None:
        if not self.active:
            return
        try:
            self.on_change(change)
        except Exception as e:
            self.log.error("a registry change could not be applied: {why}", why=str(e)[:200])


class FeedState(enum.Enum):
    OFF = "off"  # not subscribed (not yet, or the connection is lost)
    SYNCING = "syncing"  # subscribed; reading a snapshot (or waiting to), notices wait
    LIVE = "live"  # notices are told as they come


class _Feed:
    """The store's change feed: one subscription shared by its watchers.

    Its position is the ``(epoch, version)`` of the last change told.  A
    notice of the next version in the same epoch is told; anything else
    (a gap, a different epoch, a version at or below the position while
    live, an unreadable notice) starts a catch-up: read a snapshot and tell
    every watcher ``Resynced``.  A catch-up also follows every
    (re)subscription.  Catch-ups that follow one another without a notice
    told in between are spaced by the store's backoff, so a notice that
    cannot be placed (one published by hand) costs one snapshot, not a loop.
    """

    log = Logger()

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.state = FeedState.OFF
        self.watchers: list[_Watcher] = []
        self.version: int | None = None
        self.epoch: str | None = None
        #: the epoch before the last change of epoch: its late notices are old
        self._old_epoch: str | None = None
        #: notices received while not LIVE: (version, epoch, change)
        self._waiting: list[tuple[int, str, Change]] = []
        #: bumped whenever the subscription is lost or a catch-up begins: a
        #: catch-up that is no longer the latest drops its result
        self._generation = 0
        self._sync_failures = 0
        #: catch-ups started by the notices since one was last told in sequence
        self._gap_syncs = 0
        self._retry: IDelayedCall | None = None
        self._link: RedisLink | None = None
        self._closing: list[Deferred[None]] = []
        self._rated = RateLimitedLog(self.log, clock=store.clock)

    def add(self, watcher: _Watcher) -> Callable[[], None]:
        if not self.watchers and self.version is None:
            self.version, self.epoch = watcher.since.version, watcher.since.epoch
        self.watchers.append(watcher)
        if self._link is None:
            self._link = self.store.subscriber(
                self._message, on_ready=self._subscribed, on_lost=self._lost
            )
            self._link.start()
        elif self.state is FeedState.LIVE:
            # the feed may be past the watcher's snapshot: catch up
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
        if channel != self.store.channel or self.state is FeedState.OFF:
            return
        try:
            version, epoch, change = parse_notice(message)
        except ValueError as e:
            self._rated.warn(
                "unreadable notice",
                "change feed of Redis {name}: an unreadable notice ({why}); catching up",
                name=self.store.name,
                why=str(e)[:200],
            )
            self._gap_sync()
            return
        if self.state is not FeedState.LIVE:
            if len(self._waiting) >= MAX_WAITING:
                self._rated.warn(
                    "overflow",
                    "change feed of Redis {name}: more than {n} notices while catching up;"
                    " dropping them and catching up again",
                    name=self.store.name,
                    n=MAX_WAITING,
                )
                self._waiting.clear()
                self._begin_sync()
            self._waiting.append((version, epoch, change))
            return
        self._place(version, epoch, change)

    def _place(self, version: int, epoch: str, change: Change) -> None:
        """A notice while LIVE: tell it, drop it, or catch up."""
        if epoch != self.epoch:
            if epoch == self._old_epoch:
                return  # a late notice of the data the feed left
            self._rated.warn(
                "epoch",
                "change feed of Redis {name}: a notice of other data (was the registry"
                " emptied or replaced?); catching up",
                name=self.store.name,
            )
            self._gap_sync()
            return
        assert self.version is not None  # set by every catch-up
        if version <= self.version:
            self._rated.warn(
                "went back",
                "change feed of Redis {name}: notice {version} after {known}: the change"
                " counter went back; catching up",
                name=self.store.name,
                version=version,
                known=self.version,
            )
            self._gap_sync()
            return
        if version > self.version + 1:  # notices missed: catch up (the snapshot holds it)
            self._gap_sync()
            return
        self.version = version
        self._gap_syncs = 0
        for watcher in list(self.watchers):
            watcher.tell(change)

    # -- catching up ------------------------------------------------------------------

    def _gap_sync(self) -> None:
        """Catch up because of a notice; right away the first time, then
        spaced by the backoff until a notice is told in sequence again."""
        if self.state is not FeedState.LIVE:
            return  # a catch-up is under way or due
        self._gap_syncs += 1
        if self._gap_syncs == 1:
            self._begin_sync()
            return
        self.state = FeedState.SYNCING
        delay = self.store.backoff.delay(self._gap_syncs - 1)
        self._retry = self.store.clock.callLater(delay, self._begin_sync)

    def _begin_sync(self) -> None:
        self.state = FeedState.SYNCING
        self._cancel_retry()
        self._generation += 1
        # every notice received so far was published before the snapshot is read
        self._waiting.clear()
        Deferred.fromCoroutine(self._sync(self._generation))

    async def _sync(self, generation: int) -> None:
        try:
            snapshot = await self.store.load()
        except Exception as e:
            if generation == self._generation and self.state is FeedState.SYNCING:
                self._sync_failed(e)
            return
        if generation != self._generation:
            return
        self._moved_to(snapshot)
        if self._sync_failures:
            self.log.info("change feed of Redis {name}: caught up", name=self.store.name)
        self._sync_failures = 0
        self.state = FeedState.LIVE
        for watcher in list(self.watchers):
            watcher.tell(Resynced(snapshot))
        waiting, self._waiting = self._waiting, []
        for version, epoch, change in waiting:
            if self.state is not FeedState.LIVE:
                break  # catching up again: the next snapshot holds the rest
            if epoch == self.epoch and self.version is not None and version > self.version + 1:
                # INCR comes before PUBLISH in one script, and every notice
                # after the snapshot arrives in order: this one is not genuine
                self._rated.warn(
                    "out of sequence",
                    "change feed of Redis {name}: dropping notice {version}, out of"
                    " sequence after version {known}",
                    name=self.store.name,
                    version=version,
                    known=self.version,
                )
            elif epoch != self.epoch or version > self.version:  # type: ignore[operator]
                self._place(version, epoch, change)

    def _moved_to(self, snapshot: Snapshot) -> None:
        """Take ``snapshot``'s position, warning if the data changed under the feed."""
        if self.epoch is not None and snapshot.epoch != self.epoch:
            self.log.warn(
                "registry in Redis {name}: its data was emptied or replaced (a new epoch);"
                " following it ({hosts} hosts, {ports} TCP ports)",
                name=self.store.name,
                hosts=len(snapshot.hosts),
                ports=len(snapshot.ports),
            )
            self._old_epoch = self.epoch
        elif self.version is not None and snapshot.version is not None:
            if snapshot.version < self.version:
                self.log.warn(
                    "registry in Redis {name}: its change counter went back from {known}"
                    " to {version}; following it",
                    name=self.store.name,
                    known=self.version,
                    version=snapshot.version,
                )
        self.version, self.epoch = snapshot.version, snapshot.epoch

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
