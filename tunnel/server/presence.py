"""Which node holds which tunnel, kept in Redis so that every node can tell.

Several server nodes share one Redis.  Each node records the tunnels whose
client it holds (``claim``), refreshes those records while it holds them,
and removes them when the client leaves (``release``); a node that gets a
public request for a tunnel it does not hold asks where it is
(``locate``) and forwards the request there.  The same records make one
identifier held by one node cluster-wide: a claim fails, naming the
holder, while another node's live record holds it (unless the host is
pooled, where any number of nodes hold it at once).

Data model (every name starts with the registry's prefix; HEX is the
tunnel's ``TunnelKey`` in hex, never the identifier):

- ``PREFIX presence:HEX``: the name of the node holding the tunnel, with a
  TTL (``ttl`` seconds, PX) that its holder refreshes;
- ``PREFIX pool:HEX``: a pooled tunnel's holders, a sorted set whose
  members are node names and whose scores are expiry times in ms by
  Redis's own clock (``TIME``; never a node's clock).  A member is live
  while its score is ahead of Redis's time; the scripts prune the others,
  and the set itself expires with its last member;
- ``PREFIX node:NAME``: the node's ``HOST:PORT`` for node-to-node traffic,
  with the same TTL, refreshed with the rest.  A holder whose node record
  has expired is not live (its node is gone).

Every change is one Lua script, so atomic and one round trip: claim ("if
absent or ours, set it to ours, else name the holder"), take_over
(compare-and-set), release (compare-and-delete), and the refresh: ONE
script per tick for everything this node holds, whatever their number,
which also re-establishes records that Redis lost (a restart) and reports
those another node took meanwhile (``on_lost``).

The scripts read node records under a name they build
(``PREFIX node:NAME``) rather than one declared in KEYS: in a Redis
Cluster, a prefix with a hash tag (``{tunnel}:``) keeps every key in one
slot, as the registry's own keys are.

While Redis cannot be reached, claims and lookups fail at once (or within
the link's timeout) with ``StoreError``, so a control request is decided
at once rather than held (``cluster`` then takes it on the node's word);
the refresh skips its ticks quietly (the ``RedisLink`` logs one line per
outage) and puts everything back on the first tick after Redis returns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from ..logs import RateLimitedLog
from .redislink import LinkState, RedisLink
from .store import StoreClosed, StoreError

#: the longest node name or address accepted, here and in what Redis answers
MAX_NAME = 255
#: the most holders one ``locate`` returns (a pool larger than this is cut)
MAX_MEMBERS = 256
#: the most lookups kept in the cache (expired ones go first, then the oldest)
MAX_CACHED = 10_000

#: shared by every script: Redis's own time in ms, and a pool whose expiry
#: follows its last member's
_LUA_COMMON = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function touch_pool(key)
    local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""

#: KEYS: presence, pool, our node record; ARGV: node, address, ttl ms,
#: node-record prefix, '1' if pooled.  {} if ours now, else {holder, address}
CLAIM = (
    _LUA_COMMON
    + """
local now = now_ms()
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if ARGV[5] == '1' then
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
    touch_pool(KEYS[2])
else
    local holder = redis.call('GET', KEYS[1])
    if holder and holder ~= ARGV[1] then
        local where = redis.call('GET', ARGV[4] .. holder)
        if where then return {holder, where} end
    end
    for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
        if member ~= ARGV[1] then
            local where = redis.call('GET', ARGV[4] .. member)
            if where then return {member, where} end
        end
    end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ttl)
return {}
"""
)

#: KEYS: presence, our node record; ARGV: node, holder, address, ttl ms.
#: 1 if ours now (it was the holder's, ours, or nobody's), 0 if a third node's
TAKE_OVER = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[2] and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
"""

#: KEYS: our node record, then pairs (presence, pool); ARGV: node, address,
#: '1' to remove our node record too.  How many records were removed.
RELEASE = """
local removed = 0
for i = 2, #KEYS, 2 do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        redis.call('DEL', KEYS[i])
        removed = removed + 1
    end
    removed = removed + redis.call('ZREM', KEYS[i + 1], ARGV[1])
end
if ARGV[3] == '1' and redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
end
return removed
"""

#: KEYS: our node record, then one record per held tunnel (presence, or pool
#: if pooled); ARGV: node, address, ttl ms, node-record prefix, then one kind
#: per record ('s' single, 'p' pooled).  The positions (1-based, among the
#: records) of those another live node holds now, and 0 if our node record
#: had another address (another node of our name).
REFRESH = (
    _LUA_COMMON
    + """
local now = now_ms()
local ttl = tonumber(ARGV[3])
local lost = {}
for i = 2, #KEYS do
    local key = KEYS[i]
    if ARGV[i + 3] == 'p' then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        redis.call('ZADD', key, now + ttl, ARGV[1])
        touch_pool(key)
    else
        local holder = redis.call('GET', key)
        if holder == false or holder == ARGV[1]
                or redis.call('EXISTS', ARGV[4] .. holder) == 0 then
            redis.call('SET', key, ARGV[1], 'PX', ttl)
        else
            lost[#lost + 1] = i - 1
        end
    end
end
local recorded = redis.call('GET', KEYS[1])
if recorded and recorded ~= ARGV[2] then
    lost[#lost + 1] = 0  -- another node of the same name, elsewhere
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
return lost
"""
)

#: KEYS: presence, pool; ARGV: node, node-record prefix, most members.
#: {holder, address, ...}: the live holders on other nodes (reads only)
LOCATE = (
    _LUA_COMMON
    + """
local now = now_ms()
local found, seen = {}, {}
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
    local where = redis.call('GET', ARGV[2] .. holder)
    if where then
        found[#found + 1] = holder
        found[#found + 1] = where
        seen[holder] = true
    end
end
local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf',
                           'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(members) do
    if member ~= ARGV[1] and not seen[member] then
        local where = redis.call('GET', ARGV[2] .. member)
        if where then
            found[#found + 1] = member
            found[#found + 1] = where
        end
    end
end
return found
"""
)


@dataclass(frozen=True)
class Member:
    """One node holding a tunnel."""

    #: its ``--node-name``
    node: str
    #: its ``--cluster-advertise``, ``HOST:PORT``
    address: str


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ValueError(f"{what} must be 1 to {MAX_NAME} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be printable, without spaces")
    return value


def parse_members(reply: object) -> list[Member]:
    """Members from a script's flat {node, address, ...} reply; ValueError if
    it is not one (Redis's answers are checked like any peer's)."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise ValueError("not a list of holders")
    return [
        Member(_check_name("a node name", node), _check_name("an address", address))
        for node, address in zip(reply[::2], reply[1::2], strict=True)
    ]


class PresenceState(enum.Enum):
    IDLE = "idle"  # made, not started: claims work, nothing is refreshed yet
    RUNNING = "running"  # refreshing every ``refresh`` seconds
    STOPPED = "stopped"  # released everything; nothing more is done


class _Record:
    """One tunnel this node holds.  A new one is made per claim, so an
    answer about an older claim (released and claimed again meanwhile) is
    recognised as such."""

    __slots__ = ("pooled",)

    def __init__(self, pooled: bool) -> None:
        self.pooled = pooled


class _Lookup:
    """A ``locate`` under way: the callers that share its round trip."""

    __slots__ = ("waiters", "cacheable")

    def __init__(self) -> None:
        self.waiters: list[Deferred[list[Member]]] = []
        #: False once ``forget`` was called for the key: its answer may be stale
        self.cacheable = True


class Presence:
    """This node's records of the tunnels it holds, in Redis through ``link``.

    :param link: the connection to Redis (not closed by ``stop``: its owner
        closes it).
    :param node: this node's name (``--node-name``).
    :param address: how the other nodes reach it (``--cluster-advertise``).
    :param prefix: the registry's key prefix.
    :param ttl: seconds a record lives unless refreshed.
    :param refresh: seconds between refreshes (default ``ttl / 3``).
    :param cache: seconds a ``locate`` answer is kept.
    :param on_lost: told the key of a record another node took meanwhile
        (that client should be closed); it must not raise.
    """

    log = Logger()

    def __init__(
        self,
        link: RedisLink,
        *,
        node: str,
        address: str,
        prefix: str,
        ttl: float = 5.0,
        refresh: float | None = None,
        cache: float = 1.0,
        clock: IReactorTime,
        on_lost: Callable[[TunnelKey], None] | None = None,
    ) -> None:
        self.node = _check_name("the node name", node)
        self.address = _check_name("the cluster address", address)
        if ttl <= 0:
            raise ValueError("the TTL must be positive")
        self.refresh = ttl / 3 if refresh is None else refresh
        if not 0 < self.refresh < ttl:
            raise ValueError("the refresh interval must be positive and shorter than the TTL")
        self.ttl_ms = max(1, round(ttl * 1000))
        self.cache = cache
        self.prefix = prefix
        self.clock = clock
        self._link = link
        self._on_lost = on_lost
        self._node_key = f"{prefix}node:{node}"
        self._node_prefix = f"{prefix}node:"
        self._rated = RateLimitedLog(self.log, clock=clock)
        self.state = PresenceState.IDLE
        self._held: dict[TunnelKey, _Record] = {}
        #: claims sent and not answered yet, by key (the latest one counts)
        self._claiming: dict[TunnelKey, _Record] = {}
        self._cached: dict[TunnelKey, tuple[float, list[Member]]] = {}
        self._lookups: dict[TunnelKey, _Lookup] = {}
        self._tick: IDelayedCall | None = None
        self._ticking = False
        #: refresh ticks that reached Redis (for the tests and the metrics)
        self.ticks = 0

    def __repr__(self) -> str:
        return f"<Presence {self.node} {self.state.value} holding {len(self._held)}>"

    def _presence_key(self, key: TunnelKey) -> str:
        return f"{self.prefix}presence:{key.hex()}"

    def _pool_key(self, key: TunnelKey) -> str:
        return f"{self.prefix}pool:{key.hex()}"

    def _eval(self, what: str, script: str, keys: list[str], args: list[str]) -> Deferred[Any]:
        return self._link.run(what, lambda p: p.eval(script, keys=keys, args=args))

    def _closed(self, what: str) -> Deferred[Any]:
        return fail(StoreClosed(f"{what}: the presence of node {self.node} is stopped"))

    def _refused(self, what: str) -> Deferred[Any] | None:
        """A failure to answer at once instead of asking Redis: stopped, or
        Redis known to be down (the link waits out its backoff: asking now
        would start an attempt per request); None: ask."""
        if self.state is PresenceState.STOPPED:
            return self._closed(what)
        if self._link.state is LinkState.WAITING:
            return fail(StoreError(f"{what}: Redis is unavailable (the link waits to retry)"))
        return None

    # -- the refresh loop ------------------------------------------------------------

    def start(self) -> None:
        """Begin refreshing (a first tick now, then every ``refresh`` seconds)."""
        if self.state is not PresenceState.IDLE:
            return
        self.state = PresenceState.RUNNING
        self._run_tick()

    def held(self) -> int:
        """How many records this node refreshes."""
        return len(self._held)

    def _schedule(self, delay: float) -> None:
        # a link its owner closed will not come back: nothing more to refresh
        if self.state is PresenceState.RUNNING and self._link.state is not LinkState.CLOSED:
            self._tick = self.clock.callLater(max(0.0, delay), self._run_tick)

    def _run_tick(self) -> None:
        self._tick = None
        if self.state is not PresenceState.RUNNING or self._ticking:
            return
        if self._link.state is LinkState.CLOSED:
            return  # its owner closed it: it will not come back
        if self._link.state is LinkState.WAITING:
            # the link retries on its own backoff; the first tick after it is
            # back puts every record back
            self._schedule(self.refresh)
            return
        started = self.clock.seconds()
        self._ticking = True
        held = list(self._held.items())
        keys = [self._node_key]
        kinds = []
        for key, record in held:
            keys.append(self._pool_key(key) if record.pooled else self._presence_key(key))
            kinds.append("p" if record.pooled else "s")
        args = [self.node, self.address, str(self.ttl_ms), self._node_prefix, *kinds]
        d = self._eval("presence refresh", REFRESH, keys, args)
        d.addCallback(lambda reply: self._refreshed(held, reply))
        d.addErrback(self._refresh_failed)
        d.addBoth(lambda _: self._tick_done(started))

    def _refreshed(self, held: Sequence[tuple[TunnelKey, _Record]], reply: object) -> None:
        if not isinstance(reply, list) or not all(
            type(position) is int and 0 <= position <= len(held) for position in reply
        ):
            raise StoreError("the refresh script answered no list of positions")
        self.ticks += 1
        for position in reply:
            if position == 0:
                self._rated.emit(
                    LogLevel.error,
                    "name-clash",
                    "another node named {node} uses this Redis (its record had another"
                    " address than {address}): give each node its own --node-name",
                    node=self.node,
                    address=self.address,
                )
                continue
            key, record = held[position - 1]
            if self._held.get(key) is record:  # not released (or claimed again) since
                del self._held[key]
                self._rated.info(
                    "lost",
                    "tunnel {key}: another node holds it now; closing its client here",
                    key=key,
                )
                self._tell_lost(key)

    def _tell_lost(self, key: TunnelKey) -> None:
        if self._on_lost is None:
            return
        try:
            self._on_lost(key)
        except Exception:
            self.log.failure("on_lost failed for tunnel {key}", key=key)

    def _refresh_failed(self, failure: Failure) -> None:
        if self._link.state is LinkState.READY or not failure.check(StoreError):
            # not an outage (the link logs those): a script or data error
            self._rated.warn(
                "refresh",
                "presence of node {node}: a refresh failed: {why}",
                node=self.node,
                why=failure.getErrorMessage()[:200],
            )

    def _tick_done(self, started: float) -> None:
        self._ticking = False
        self._schedule(started + self.refresh - self.clock.seconds())

    # -- claims ----------------------------------------------------------------------

    def claim(self, key: TunnelKey, *, pooled: bool = False) -> Deferred[Member | None]:
        """Hold ``key`` on this node.  None: held now (recorded, and refreshed
        from now on); a ``Member``: another node's live record holds it (it
        is not pooled), and nothing changed.  ``StoreError`` if Redis
        cannot say (a ``StoreOutcomeUnknown`` record, if made, expires)."""
        refused = self._refused("claim")
        if refused is not None:
            return refused
        record = _Record(pooled)
        self._claiming[key] = record
        keys = [self._presence_key(key), self._pool_key(key), self._node_key]
        args = [
            self.node,
            self.address,
            str(self.ttl_ms),
            self._node_prefix,
            "1" if pooled else "0",
        ]
        d = self._eval("presence claim", CLAIM, keys, args)

        def answered(reply: object) -> Member | None:
            latest = self._claiming.get(key) is record
            if latest:
                del self._claiming[key]
            try:
                holders = parse_members(reply)
            except ValueError as e:
                raise StoreError(f"presence claim: Redis answered no claim ({e})") from None
            if holders:
                return holders[0]
            # a release (or a later claim) asked for meanwhile decides instead
            if latest and self.state is not PresenceState.STOPPED:
                self._held[key] = record
                self._cached.pop(key, None)
            return None

        def failed(failure: Failure) -> Failure:
            if self._claiming.get(key) is record:
                del self._claiming[key]
            return failure

        return d.addCallbacks(answered, failed)

    def take_over(self, key: TunnelKey, holder: str) -> Deferred[bool]:
        """Make ``key``'s record ours if ``holder`` still holds it (or nobody
        does): True.  False if a third node took it meanwhile (claim again
        to learn which).  Used once the holder said its client is gone."""
        refused = self._refused("take_over")
        if refused is not None:
            return refused
        record = _Record(False)
        self._claiming[key] = record
        keys = [self._presence_key(key), self._node_key]
        args = [self.node, holder, self.address, str(self.ttl_ms)]
        d = self._eval("presence take-over", TAKE_OVER, keys, args)

        def answered(reply: object) -> bool:
            latest = self._claiming.get(key) is record
            if latest:
                del self._claiming[key]
            taken = reply == 1 or reply == "1"
            if taken and latest and self.state is not PresenceState.STOPPED:
                self._held[key] = record
                self._cached.pop(key, None)
            return taken

        def failed(failure: Failure) -> Failure:
            if self._claiming.get(key) is record:
                del self._claiming[key]
            return failure

        return d.addCallbacks(answered, failed)

    def release(self, key: TunnelKey) -> Deferred[None]:
        """Remove our record of ``key`` (only ours: another node's stays) and
        stop refreshing it."""
        self._held.pop(key, None)
        self._claiming.pop(key, None)
        self._cached.pop(key, None)
        if self.state is PresenceState.STOPPED:
            return succeed(None)
        if self._link.state is LinkState.WAITING:  # the record expires on its own
            return fail(StoreError("release: Redis is unavailable (the record expires)"))
        keys = [self._node_key, self._presence_key(key), self._pool_key(key)]
        d = self._eval("presence release", RELEASE, keys, [self.node, self.address, "0"])
        return d.addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Stop refreshing and release everything this node holds (one
        script), its node record included.  If Redis cannot be reached it
        fails with ``StoreError``: the records then expire within the TTL."""
        if self.state is PresenceState.STOPPED:
            return succeed(None)
        self.state = PresenceState.STOPPED
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        held = set(self._held) | set(self._claiming)
        self._held.clear()
        self._claiming.clear()
        self._cached.clear()
        keys = [self._node_key]
        for key in held:
            keys += [self._presence_key(key), self._pool_key(key)]
        d = self._eval("presence stop", RELEASE, keys, [self.node, self.address, "1"])
        return d.addCallback(lambda _: None)

    # -- lookups ---------------------------------------------------------------------

    def locate(self, key: TunnelKey) -> Deferred[list[Member]]:
        """The live holders of ``key`` on other nodes (pooled: all of them,
        up to ``MAX_MEMBERS``; else none or one).  Answers are cached for
        ``cache`` seconds; concurrent lookups of one key share one round
        trip; a failed lookup is not cached."""
        refused = self._refused("locate")
        if refused is not None:
            return refused
        cached = self._cached.get(key)
        if cached is not None:
            if cached[0] > self.clock.seconds():
                return succeed(list(cached[1]))
            del self._cached[key]
        waiter: Deferred[list[Member]] = Deferred()
        lookup = self._lookups.get(key)
        if lookup is not None:
            lookup.waiters.append(waiter)
            return waiter
        lookup = self._lookups[key] = _Lookup()
        lookup.waiters.append(waiter)
        keys = [self._presence_key(key), self._pool_key(key)]
        d = self._eval(
            "presence locate", LOCATE, keys, [self.node, self._node_prefix, str(MAX_MEMBERS)]
        )
        d.addCallbacks(
            lambda reply: self._located(key, lookup, reply),
            lambda f: self._lookup_failed(key, lookup, f),
        )
        return waiter

    def _located(self, key: TunnelKey, lookup: _Lookup, reply: object) -> None:
        try:
            members = parse_members(reply)
        except ValueError as e:
            self._lookup_failed(
                key,
                lookup,
                Failure(StoreError(f"presence locate: Redis answered no holders ({e})")),
            )
            return
        if self._lookups.get(key) is lookup:
            del self._lookups[key]
        if lookup.cacheable and self.cache > 0 and self.state is not PresenceState.STOPPED:
            self._remember(key, members)
        for waiter in lookup.waiters:
            waiter.callback(list(members))

    def _lookup_failed(self, key: TunnelKey, lookup: _Lookup, failure: Failure) -> None:
        if self._lookups.get(key) is lookup:
            del self._lookups[key]
        for waiter in lookup.waiters:
            waiter.errback(failure)

    def _remember(self, key: TunnelKey, members: list[Member]) -> None:
        now = self.clock.seconds()
        if len(self._cached) >= MAX_CACHED:
            for stale in [k for k, (until, _) in self._cached.items() if until <= now]:
                del self._cached[stale]
            while len(self._cached) >= MAX_CACHED:
                del self._cached[next(iter(self._cached))]
        self._cached[key] = (now + self.cache, members)

    def forget(self, key: TunnelKey) -> None:
        """Drop ``key``'s cached answer (a forward to it failed); a lookup
        under way is still answered but not cached."""
        self._cached.pop(key, None)
        lookup = self._lookups.get(key)
        if lookup is not None:
            lookup.cacheable = False
