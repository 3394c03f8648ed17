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
the password checks cached and running at once.
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
CHECK_FAILED = Verdict(
    Decision.UNAVAILABLE, 503, "cannot check the password now", ((b"Retry-After", b"1"),)
)


def rate_limited(wait: float) -> Verdict:
    """429 with Retry-After: the whole seconds until the client's next token."""
    seconds = max(1, math.ceil(wait))
    return Verdict(
        Decision.RATE_LIMITED,
        429,
        "too many requests",
        ((b"Retry-After", str(seconds).encode("ascii")),),
    )


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
        if client is None:
            return host, 0, 0
        if client.version == 6:
            return host, 6, int(client) >> self._shift
        return host, 4, int(client)

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


class PasswordChecker:
    """Decides basic auth for requests: at once for credentials seen before.

    A check's result is cached under an HMAC (with a random per-process
    key) of the host, the stored hash and the presented credentials, so
    the cache never holds a password and a password change makes the old
    entries unreachable.  Good and bad results go to separate LRUs, so a
    flood of wrong passwords cannot evict the credentials of the people who
    logged in.  Requests that present the same new credentials while they
    are being checked wait for that one check.

    At most ``max_pending`` different credentials are checked at once;
    beyond that a request gets 503 with Retry-After: the server is busy
    (possibly because someone is guessing), which is not the requester's
    fault as 429 would say.  The per-address rate rule is what limits one
    guesser; this bound keeps the work queued behind the threads short.

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
        max_pending: int = 8,
    ) -> None:
        self._verify = verify
        self.cache_size = cache_size
        self.max_pending = max_pending
        self._secret = os.urandom(32)
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._bad: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[bytes, list[Deferred[Verdict]]] = {}
        self._log = RateLimitedLog(self.log, clock=clock)

    @property
    def pending(self) -> int:
        """How many different credentials are being checked now."""
        return len(self._pending)

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
        self, auth: BasicAuth, authorization: bytes | None, host: str
    ) -> Verdict | Deferred[Verdict]:
        credentials = parse_basic(authorization)
        if credentials is None:
            return unauthorized(host)
        user, password = credentials
        key = self._key(host, auth, user, password)
        for cache, verdict in ((self._good, AUTHENTICATED), (self._bad, None)):
            if key in cache:
                cache.move_to_end(key)
                return verdict if verdict is not None else unauthorized(host)
        waiters = self._pending.get(key)
        if waiters is None:
            if len(self._pending) >= self.max_pending:
                return BUSY
            waiters = self._pending[key] = []
            user_ok = hmac.compare_digest(user.encode("utf-8"), auth.user_bytes)
            decided: list[Verdict] = []
            checking = maybeDeferred(self._verify, auth.password, password.encode("utf-8"))
            checking.addBoth(self._settle, key, user_ok, host).addCallback(decided.append)
            if decided:  # a synchronous verify decided already
                return decided[0]
        waiter: Deferred[Verdict] = Deferred()  # cancelling it leaves the check running
        waiters.append(waiter)
        return waiter

    def _settle(self, result: bool | Failure, key: bytes, user_ok: bool, host: str) -> Verdict:
        waiters = self._pending.pop(key)
        if isinstance(result, Failure):
            self._log.warn(
                "password-check",
                "could not check a password for {host}: {why}",
                host=host,
                why=result.getErrorMessage(),
            )
            verdict = CHECK_FAILED
        else:
            good = bool(result) and user_ok
            cache = self._good if good else self._bad
            cache[key] = None
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
            verdict = AUTHENTICATED if good else unauthorized(host)
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(verdict)
        return verdict


# -- the gate ----------------------------------------------------------------------


class AccessGate(Service):
    """Enforces hosts' access rules on public requests.

    :param clock: time for the rate buckets (the reactor, or a ``Clock``).
    :param trusted_proxies: networks whose X-Forwarded-For is believed.
    :param max_buckets: rate buckets kept at most (an LRU).
    :param verify: the slow password check, ``(hash, password) -> bool or
        Deferred[bool]``; by default ``PasswordHash.matches`` on a pool of
        ``threads`` threads of the gate's own, stopped with this service.
    :param max_pending: different credentials checked at once at most.
    :param cache_size: results kept per kind (good, bad).
    :param ipv6_prefix: IPv6 clients in one such network share a bucket.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        trusted_proxies: Sequence[Network] = (),
        max_buckets: int = 10_000,
        verify: Verify | None = None,
        max_pending: int = 8,
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
            verify, clock=clock, cache_size=cache_size, max_pending=max_pending
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
        * the password last: the only check that may have to wait.

        :param peer: the TCP peer's IP address (``getClientAddress().host``).
        :param forwarded_for: the raw X-Forwarded-For header values.
        :param authorization: the Authorization header, None when absent.
        """
        if not rules:
            return ALLOWED
        client = None
        if rules.allow is not None or rules.rate is not None:
            client = self.client(peer, forwarded_for)
        if not rules.allows(client):
            return FORBIDDEN
        if rules.rate is not None:
            wait = self.limiter.take(host, client, rules.rate)
            if wait:
                return rate_limited(wait)
        if rules.basic_auth is not None:
            return self.passwords.check(rules.basic_auth, authorization, host)
        return ALLOWED
