"""Enforcing a host's access rules (``rules.HostRules``) on a public request.

``AccessGate.check`` decides one request: a ``Verdict`` at once when it can,
a Deferred of one only while a password not seen before is being checked.
The web layer answers a denial with the verdict's status, text and headers,
and, when the request passed basic auth, drops its Authorization header
before forwarding it.

Which client a request comes from (``client_address``): the TCP peer,
unless the peer is a trusted proxy (``--trusted-proxy CIDR``); then
X-Forwarded-For is walked from the right, past trusted proxies, to the
first address a trusted proxy vouched for (the scheme of RFC 7239 section
7.4).  An untrusted peer's X-Forwarded-For is ignored: anyone can write one.

Everything an outsider sends is bounded: X-Forwarded-For entries read,
the Authorization header's length, the rate buckets kept (a bounded LRU),
the password checks cached, running and queued at once, and each client's
share of them (``PasswordChecker``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import math
import os
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..logs import RateLimitedLog
from .rules import (
    MAX_PASSWORD_BYTES,
    MAX_USER_BYTES,
    Address,
    BasicAuth,
    HostRules,
    Network,
    PasswordHash,
    Rate,
)

#: X-Forwarded-For entries read from the right, and the bytes of one entry
MAX_FORWARDED_ENTRIES = 32
MAX_FORWARDED_ENTRY = 64
#: bytes of an Authorization header worth decoding: the longest credentials
#: an operator can set, in base64, with room to spare
MAX_AUTHORIZATION = 1024
#: a fixed realm for hosts whose name is not plainly safe in a quoted-string
DEFAULT_REALM = "tunnel"


class Decision(enum.Enum):
    """What the gate decided; the value names it in logs and metrics."""

    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"  # 403: the client's address is not allowed
    RATE_LIMITED = "rate_limited"  # 429: the client's bucket is empty
    UNAUTHORIZED = "unauthorized"  # 401: no credentials, or wrong ones
    UNAVAILABLE = "unavailable"  # 503: passwords cannot be checked now


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one request.

    :ivar status: the HTTP status of a denial (200 when allowed).
    :ivar message: the text body of a denial (the web layer adds a newline).
    :ivar headers: headers to add to the denial's response.
    :ivar authenticated: the request passed basic auth: its Authorization
        header holds this host's password and must not be forwarded.
    """

    decision: Decision
    status: int = 200
    message: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    authenticated: bool = False

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOWED


ALLOWED = Verdict(Decision.ALLOWED)
AUTHENTICATED = Verdict(Decision.ALLOWED, authenticated=True)
FORBIDDEN = Verdict(Decision.FORBIDDEN, 403, "forbidden")
BUSY = Verdict(
    Decision.UNAVAILABLE, 503, "too many password checks, retry later", ((b"Retry-After", b"1"),)
)
#: one client's share of the password checks is taken (by its other requests)
CLIENT_BUSY = Verdict(
    Decision.RATE_LIMITED,
    429,
    "too many password checks from your address at once, retry later",
    ((b"Retry-After", b"1"),),
)
CHECK_FAILED = Verdict(
    Decision.UNAVAILABLE, 503, "cannot check the password now", ((b"Retry-After", b"1"),)
)


def rate_limited(wait: float, message: str = "too many requests") -> Verdict:
    """429 with Retry-After: the whole seconds until the client's next token."""
    seconds = max(1, math.ceil(wait))
    return Verdict(
        Decision.RATE_LIMITED,
        429,
        message,
        ((b"Retry-After", str(seconds).encode("ascii")),),
    )


def too_many_failures(wait: float) -> Verdict:
    """429 for a client that tried too many wrong passwords on a host lately."""
    return rate_limited(wait, "too many wrong passwords, retry later")


#: host names that are safe inside a quoted-string as they are
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,255}\Z")


def unauthorized(host: str) -> Verdict:
    """401 with a Basic challenge whose realm is the host's name.

    The name comes from the request's Host header: it is used only when it
    is plainly a host name (no quote, backslash, space or control byte can
    get into the header), and replaced by a fixed realm otherwise.
    """
    realm = host if _PLAIN_HOST.match(host) else DEFAULT_REALM
    challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode("ascii")
    return Verdict(Decision.UNAUTHORIZED, 401, "unauthorized", ((b"WWW-Authenticate", challenge),))


# -- the client's address ---------------------------------------------------------


def _unmapped(address: Address) -> Address:
    """IPv4-mapped IPv6 (a dual-stack listener's IPv4 peers) as the IPv4 address."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_address(text: str | None) -> Address | None:
    """A transport's peer address (an IPv6 zone is dropped); None if it is not one."""
    if not text or len(text) > MAX_FORWARDED_ENTRY or not text.isascii():
        return None
    if ":" in text:
        text = text.partition("%")[0]
    try:
        return _unmapped(ip_address(text))
    except ValueError:
        return None


_PORT = re.compile(r":[0-9]{1,5}\Z")


def _is_port(text: str) -> bool:
    """``:port`` with a port number (0-65535)."""
    return _PORT.match(text) is not None and int(text[1:]) <= 65535


def parse_forwarded(entry: bytes) -> Address | None:
    """One X-Forwarded-For entry: ``addr``, ``[v6]``, ``v4:port`` or ``[v6]:port``.

    None for anything else (``unknown``, an obfuscated RFC 7239 node, a
    zone, garbage): such an entry ends the walk.
    """
    if not entry or len(entry) > MAX_FORWARDED_ENTRY:
        return None
    try:
        text = entry.decode("ascii")
    except UnicodeDecodeError:
        return None
    version = 0
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
        version = 6
    elif text.count(":") == 1:
        host, rest = text.split(":")
        if not _is_port(":" + rest):
            return None
        version = 4
    else:
        host = text
    if "%" in host:
        return None
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if version and address.version != version:
        return None
    return _unmapped(address)


def _forwarded_entries(values: Sequence[bytes]) -> Iterator[bytes]:
    """X-Forwarded-For entries, right-most first, at most MAX_FORWARDED_ENTRIES.

    Every header line counts (a list header may be split over several);
    empty list elements are skipped (RFC 9110 5.6.1) but counted.
    """
    budget = MAX_FORWARDED_ENTRIES
    for value in reversed(values):
        pieces = value.rsplit(b",", budget)
        for piece in reversed(pieces):
            if budget == 0:
                return
            budget -= 1
            piece = piece.strip(b" \t")
            if piece:
                yield piece


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[bytes], trusted: Sequence[Network]
) -> Address | None:
    """The public client's address, or None when the peer has none (a UNIX socket).

    The peer, unless it is a trusted proxy.  Then X-Forwarded-For from the
    right: each entry is the address the hop after it saw; the first one
    that is not a trusted proxy is the client.  A malformed entry is not
    believed, and neither is anything to its left: the client is then the
    last address that was believed (a trusted proxy).  So is it when the
    list runs out, or after MAX_FORWARDED_ENTRIES entries.
    """
    current = parse_address(peer)
    if current is None or not _within(current, trusted):
        return current
    for entry in _forwarded_entries(forwarded_for):
        address = parse_forwarded(entry)
        if address is None:
            break
        current = address
        if not _within(current, trusted):
            break
    return current


# -- basic auth credentials ----------------------------------------------------------

_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}\Z")


def _credential(raw: bytes, limit: int) -> str | None:
    try:
        text = unicodedata.normalize("NFC", raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    if not text or len(text.encode("utf-8")) > limit:
        return None
    if any(c < " " or c == "\x7f" for c in text):
        return None
    return text


def parse_basic(authorization: bytes | None) -> tuple[str, str] | None:
    """(user, password) of a ``Basic`` Authorization header, NFC-normalised.

    None for anything that cannot be credentials an operator could have
    set: another scheme, a header over MAX_AUTHORIZATION bytes, base64 that
    is invalid or not in its canonical form, no ``:``, text that is not
    UTF-8, an empty or over-long user or password, a control character.
    The scheme name is case-insensitive (RFC 9110 11.1).
    """
    if authorization is None or len(authorization) > MAX_AUTHORIZATION:
        return None
    scheme, space, token = authorization.strip(b" \t").partition(b" ")
    if not space or scheme.lower() != b"basic":
        return None
    token = token.lstrip(b" ")
    if not _BASE64.match(token):
        return None
    try:
        raw = binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return None
    if base64.b64encode(raw) != token:
        return None
    user, colon, password = raw.partition(b":")
    if not colon:
        return None
    user_text = _credential(user, MAX_USER_BYTES)
    password_text = _credential(password, MAX_PASSWORD_BYTES)
    if user_text is None or password_text is None:
        return None
    return user_text, password_text


# -- rate: token buckets ------------------------------------------------------------


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


def client_key(client: Address | None, shift: int = 64) -> tuple[int, int]:
    """Whom a limit counts: an IPv4 address, or an IPv6 address without its
    last ``shift`` bits (its /64 by default); (0, 0) for no address."""
    if client is None:
        return 0, 0
    if client.version == 6:
        return 6, int(client) >> shift
    return 4, int(client)


class RateLimiter:
    """Token buckets per (host, client), in an LRU of at most ``max_buckets``.

    When the LRU is full, a new client's bucket replaces the least recently
    used one.  An attacker with many addresses can therefore make the
    limiter forget other clients' buckets, and a forgotten client starts
    again from a full bucket: evictions only ever let requests through that
    a bucket would have held back, they never hold back a client that would
    otherwise have passed.  What the attacker gains is at most ``burst``
    requests per address it controls and per cycle through the LRU; memory
    stays bounded whatever the number of addresses.  IPv6 clients share one
    bucket per ``ipv6_prefix`` (a /64 is typically one subscriber, who can
    use any of its 2**64 addresses).
    """

    def __init__(self, clock: IReactorTime, *, max_buckets: int = 10_000, ipv6_prefix: int = 64):
        if max_buckets < 1 or not 0 <= ipv6_prefix <= 128:
            raise ValueError("max_buckets must be positive and ipv6_prefix within 0..128")
        self.clock = clock
        self.max_buckets = max_buckets
        self._shift = 128 - ipv6_prefix
        self._buckets: OrderedDict[tuple[str, int, int], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _key(self, host: str, client: Address | None) -> tuple[str, int, int]:
        return (host, *client_key(client, self._shift))

    def wait(self, host: str, client: Address | None, rate: Rate) -> float:
        """The seconds until the client's bucket holds a token (0.0: it does
        now), spending nothing; a client without a bucket has a full one."""
        bucket = self._buckets.get(self._key(host, client))
        if bucket is None:
            return 0.0
        elapsed = max(0.0, self.clock.seconds() - bucket.stamp)
        tokens = min(float(rate.burst), bucket.tokens + elapsed * rate.per_second)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate.per_second

    def take(self, host: str, client: Address | None, rate: Rate) -> float:
        """Spend a token of the client's bucket: 0.0 if there was one, or the
        seconds until there will be one (nothing is spent then)."""
        now = self.clock.seconds()
        key = self._key(host, client)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = _Bucket(float(rate.burst), now)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.stamp)  # a wall clock may step back
            bucket.tokens = min(float(rate.burst), bucket.tokens + elapsed * rate.per_second)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate.per_second


# -- basic auth: verifying passwords -------------------------------------------------

#: wrong passwords a client may try on a host: 10 at once, then one every 30 s
WRONG_PASSWORDS = Rate(per_second=1 / 30, burst=10)

#: ``verify(hash, password) -> bool or Deferred[bool]``: the slow check
Verify = Callable[[PasswordHash, bytes], "bool | Deferred[bool]"]


class ThreadPoolVerifier:
    """Runs ``PasswordHash.matches`` on a small pool of its own threads.

    scrypt is CPU work that releases the GIL, so a thread runs it beside
    the reactor without slowing it; the pool is separate from the reactor's
    (which DNS and adbapi use) so password checks cannot starve those.
    The pool starts with the first check and stops at reactor shutdown, or
    earlier by ``stop()``; after that, checks fail (the gate answers 503).
    """

    _NEW, _RUNNING, _STOPPED = "new", "running", "stopped"

    def __init__(self, reactor: IReactorFromThreads | None = None, *, threads: int = 2) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.threads = threads
        self._state = self._NEW
        self._pool: ThreadPool | None = None
        self._trigger = None

    def __call__(self, hashed: PasswordHash, password: bytes) -> Deferred[bool]:
        if self._state == self._STOPPED:
            return fail(RuntimeError("password checks have stopped"))
        if self._state == self._NEW:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="tunnel-scrypt")
            self._pool.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
            self._state = self._RUNNING
        return deferToThreadPool(self.reactor, self._pool, hashed.matches, password)

    def _shutdown(self) -> None:
        self._trigger = None
        self.stop()

    def stop(self) -> None:
        """Stop the threads (after the checks already queued) and refuse new checks."""
        state, self._state = self._state, self._STOPPED
        if state != self._RUNNING:
            return
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        self._pool.stop()


class _CheckState(enum.Enum):
    QUEUED = "queued"  # waiting in the FIFO for a free place among the running
    RUNNING = "running"  # handed to ``verify``
    SETTLED = "settled"  # decided: ``verdict`` holds the answer


class _Check:
    """One password check: who asked first, and everyone waiting for it."""

    __slots__ = ("auth", "client", "host", "password", "state", "user_ok", "verdict", "waiters")

    def __init__(
        self, auth: BasicAuth, password: bytes, user_ok: bool, host: str, client: Address | None
    ) -> None:
        self.auth = auth
        self.password = password
        self.user_ok = user_ok
        self.host = host
        self.client = client
        self.state = _CheckState.QUEUED
        self.verdict: Verdict | None = None
        self.waiters: list[Deferred[Verdict]] = []


class PasswordChecker:
    """Decides basic auth for requests: at once for credentials seen before.

    A check's result is cached under an HMAC (with a random per-process
    key) of the host, the stored hash and the presented credentials, so
    the cache never holds a password and a password change makes the old
    entries unreachable.  Good and bad results go to separate LRUs, so a
    flood of wrong passwords cannot evict the credentials of the people who
    logged in.  Requests that present the same new credentials while they
    are being checked wait for that one check.

    The scrypt work is shared fairly between clients (an IPv4 address, or
    an IPv6 ``ipv6_prefix`` network, as the rate buckets count them):

    * one client has at most ``per_client`` different credentials pending
      (running or queued); beyond that it gets 429 with Retry-After, so one
      client cannot take the places of everyone else however many
      connections it opens;
    * at most ``max_running`` checks run at once, the next ``max_queued``
      wait in a FIFO (a first login waits its turn rather than fail); only
      beyond that, when many clients check at once, a request gets 503 with
      Retry-After: the server is busy, which is not the requester's fault;
    * ``failures`` (a ``Rate``, None for no limit) bounds the wrong
      passwords a client may try for one host: each wrong password that
      had to be checked spends a token of the client's bucket for that
      host, and while the bucket is empty every request of the client to
      the host gets 429, even with the right password (otherwise the cache
      of good credentials would answer guesses for free).  The buckets are
      a bounded LRU (``RateLimiter``).  This holds whether or not the host
      has a ``rate`` rule.

    Both per-client rules need to tell clients apart: behind a reverse
    proxy give ``--trusted-proxy``, or every client is the proxy.  A
    request without any address (a UNIX socket peer) is not held to them,
    since all such requests would share one share and one bucket, and one
    guesser would lock everyone out; the global bounds still hold.

    The user name is compared in constant time, and the password is
    checked even when the user name is wrong, so response times do not
    tell whether a user name exists.
    """

    log = Logger()

    def __init__(
        self,
        verify: Verify,
        *,
        clock: IReactorTime,
        cache_size: int = 1024,
        max_running: int = 4,
        max_queued: int = 64,
        per_client: int = 2,
        failures: Rate | None = WRONG_PASSWORDS,
        max_buckets: int = 10_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if max_running < 1 or max_queued < 0 or per_client < 1:
            raise ValueError("max_running and per_client must be positive, max_queued not negative")
        self._verify = verify
        self.cache_size = cache_size
        self.max_running = max_running
        self.max_queued = max_queued
        self.per_client = per_client
        self.failure_rate = failures
        #: wrong passwords per (host, client): a bounded LRU of token buckets
        self.failures = RateLimiter(clock, max_buckets=max_buckets, ipv6_prefix=ipv6_prefix)
        self._shift = 128 - ipv6_prefix
        self._secret = os.urandom(32)
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        #: checks not yet decided, by key (at most max_running + max_queued)
        self._checks: dict[bytes, _Check] = {}
        #: the keys of the queued checks, oldest first
        self._queue: OrderedDict[bytes, None] = OrderedDict()
        self._running = 0
        #: pending checks per client (only clients that have one)
        self._per_client: dict[tuple[int, int], int] = {}
        self._draining = False
        self._log = RateLimitedLog(self.log, clock=clock)

    @property
    def pending(self) -> int:
        """How many different credentials are being checked or wait to be."""
        return len(self._checks)

    @property
    def running(self) -> int:
        """How many checks are with ``verify`` now."""
        return self._running

    @property
    def queued(self) -> int:
        """How many checks wait for a place among the running ones."""
        return len(self._queue)

    def _key(self, host: str, auth: BasicAuth, user: str, password: str) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for part in (
            host.encode("utf-8", "surrogatepass"),
            auth.password.salt,
            auth.password.digest,
            user.encode("utf-8"),
            password.encode("utf-8"),
        ):
            mac.update(len(part).to_bytes(4, "big"))
            mac.update(part)
        return mac.digest()

    def check(
        self,
        auth: BasicAuth,
        authorization: bytes | None,
        host: str,
        client: Address | None = None,
    ) -> Verdict | Deferred[Verdict]:
        """Decide ``authorization`` for ``host`` under ``auth``, for ``client``
        (None: a client without an address, held to the global bounds only)."""
        credentials = parse_basic(authorization)
        if credentials is None:
            return unauthorized(host)
        if self.failure_rate is not None and client is not None:
            wait = self.failures.wait(host, client, self.failure_rate)
            if wait:
                return too_many_failures(wait)
        user, password = credentials
        key = self._key(host, auth, user, password)
        for cache, verdict in ((self._good, AUTHENTICATED), (self._bad, None)):
            if key in cache:
                cache.move_to_end(key)
                return verdict if verdict is not None else unauthorized(host)
        check = self._checks.get(key)
        if check is None:
            who = client_key(client, self._shift)
            if client is not None and self._per_client.get(who, 0) >= self.per_client:
                return CLIENT_BUSY
            if self._running >= self.max_running and len(self._queue) >= self.max_queued:
                return BUSY
            user_ok = hmac.compare_digest(user.encode("utf-8"), auth.user_bytes)
            check = _Check(auth, password.encode("utf-8"), user_ok, host, client)
            self._checks[key] = check
            self._per_client[who] = self._per_client.get(who, 0) + 1
            self._queue[key] = None
            self._drain()
            if check.verdict is not None:  # a synchronous verify decided already
                return check.verdict
        waiter: Deferred[Verdict] = Deferred(lambda d: self._abandon(key, d))
        check.waiters.append(waiter)
        return waiter

    def _drain(self) -> None:
        """Start queued checks, oldest first, while fewer than max_running run.

        Not re-entered: a verify that decides at once settles within the
        loop, which then starts the next one."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and self._running < self.max_running:
                key, _ = self._queue.popitem(last=False)
                check = self._checks[key]
                check.state = _CheckState.RUNNING
                self._running += 1
                checking = maybeDeferred(self._verify, check.auth.password, check.password)
                checking.addBoth(self._settle, key, check)
        finally:
            self._draining = False

    def _abandon(self, key: bytes, waiter: Deferred[Verdict]) -> None:
        """A waiter was cancelled (its client left).  A running check goes on
        (its result is cached); a queued one nobody waits for any more is
        dropped, giving its client's share back."""
        check = self._checks.get(key)
        if check is None or waiter not in check.waiters:
            return
        check.waiters.remove(waiter)
        if check.state is _CheckState.QUEUED and not check.waiters:
            del self._queue[key]
            self._forget(key, check)

    def _forget(self, key: bytes, check: _Check) -> None:
        del self._checks[key]
        who = client_key(check.client, self._shift)
        left = self._per_client[who] - 1
        if left:
            self._per_client[who] = left
        else:
            del self._per_client[who]

    def _settle(self, result: bool | Failure, key: bytes, check: _Check) -> None:
        self._running -= 1
        self._forget(key, check)
        host = check.host
        if isinstance(result, Failure):
            self._log.warn(
                "password-check",
                "could not check a password for {host}: {why}",
                host=host,
                why=result.getErrorMessage(),
            )
            verdict = CHECK_FAILED
        else:
            good = bool(result) and check.user_ok
            cache = self._good if good else self._bad
            cache[key] = None
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
            verdict = AUTHENTICATED if good else unauthorized(host)
            if not good and self.failure_rate is not None and check.client is not None:
                self.failures.take(host, check.client, self.failure_rate)
        check.state = _CheckState.SETTLED
        check.verdict = verdict
        check.password = b""
        waiters, check.waiters = check.waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(verdict)
        self._drain()


# -- the gate ----------------------------------------------------------------------


class AccessGate(Service):
    """Enforces hosts' access rules on public requests.

    :param clock: time for the rate buckets (the reactor, or a ``Clock``).
    :param trusted_proxies: networks whose X-Forwarded-For is believed.
    :param max_buckets: rate buckets kept at most (an LRU).
    :param verify: the slow password check, ``(hash, password) -> bool or
        Deferred[bool]``; by default ``PasswordHash.matches`` on a pool of
        ``threads`` threads of the gate's own, stopped with this service.
    :param max_running: password checks given to ``verify`` at once at most.
    :param max_queued: password checks waiting their turn at most (beyond:
        503).
    :param per_client: password checks one client may have running or
        waiting at most (beyond: 429).
    :param failures: wrong passwords one client may try on a host (a
        ``Rate``; None: no limit).  See ``PasswordChecker``.
    :param cache_size: results kept per kind (good, bad).
    :param ipv6_prefix: IPv6 clients in one such network are one client
        (for the rate buckets and the password limits).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        trusted_proxies: Sequence[Network] = (),
        max_buckets: int = 10_000,
        verify: Verify | None = None,
        max_running: int = 4,
        max_queued: int = 64,
        per_client: int = 2,
        failures: Rate | None = WRONG_PASSWORDS,
        cache_size: int = 1024,
        ipv6_prefix: int = 64,
        threads: int = 2,
    ) -> None:
        self.trusted_proxies = tuple(trusted_proxies)
        self.limiter = RateLimiter(clock, max_buckets=max_buckets, ipv6_prefix=ipv6_prefix)
        self._own_verifier: ThreadPoolVerifier | None = None
        if verify is None:
            threads_reactor = clock if IReactorFromThreads.providedBy(clock) else None
            verify = self._own_verifier = ThreadPoolVerifier(threads_reactor, threads=threads)
        self.passwords = PasswordChecker(
            verify,
            clock=clock,
            cache_size=cache_size,
            max_running=max_running,
            max_queued=max_queued,
            per_client=per_client,
            failures=failures,
            max_buckets=max_buckets,
            ipv6_prefix=ipv6_prefix,
        )

    def stopService(self) -> None:
        super().stopService()
        if self._own_verifier is not None:
            self._own_verifier.stop()

    def client(self, peer: str | None, forwarded_for: Sequence[bytes]) -> Address | None:
        """The public client's address (see ``client_address``)."""
        return client_address(peer, forwarded_for, self.trusted_proxies)

    def check(
        self,
        rules: HostRules,
        *,
        peer: str | None,
        forwarded_for: Sequence[bytes],
        authorization: bytes | None,
        host: str,
    ) -> Verdict | Deferred[Verdict]:
        """Decide a request to ``host`` (as routed) under ``rules``.

        The order is allow (403), rate (429), basic auth (401):

        * the allow-list first, because it is the cheapest check and a
          refused address should learn nothing more about the host (not
          even that it asks for a password), nor take a rate bucket that
          could push out an allowed client's;
        * the rate next, so that every request, including each password
          guess, spends a token before any scrypt work is done for it;
        * the password last: the only check that may have to wait (each
          client gets its share of the checks, and a client's wrong
          passwords are limited even without a rate rule:
          ``PasswordChecker``).

        :param peer: the TCP peer's IP address (``getClientAddress().host``).
        :param forwarded_for: the raw X-Forwarded-For header values.
        :param authorization: the Authorization header, None when absent.
        """
        if not rules:
            return ALLOWED
        client = self.client(peer, forwarded_for)
        if not rules.allows(client):
            return FORBIDDEN
        if rules.rate is not None:
            wait = self.limiter.take(host, client, rules.rate)
            if wait:
                return rate_limited(wait)
        if rules.basic_auth is not None:
            return self.passwords.check(rules.basic_auth, authorization, host, client)
        return ALLOWED
