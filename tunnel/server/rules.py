"""Per-host access rules, in the three forms the server uses (data only, no Twisted).

An operator sets a host's rules through the admin API (``from_api``); the
registry keeps them JSON-ready with the password only as a salted scrypt
hash (``stored`` / ``from_stored``, an exact round trip); listings show them
without any hash (``public``).  ``tunnel.server.access`` enforces them.

The API form (every key optional; ``{}`` or ``null`` means no rule)::

    {"basic_auth": {"user": "u", "password": "p"},
     "allow": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"],
     "rate": {"per_second": 5, "burst": 10},
     "pool": true}

``pool`` is not an access rule: it lets several clients share the host's
tunnel (``registry.TunnelServer``); ``bool(rules)`` counts the access rules
only, so a host whose one rule is ``pool`` still skips the access gate.

Parsing is strict: an unknown key, a wrong type, a value out of bounds is a
``RulesError`` whose message says what is wrong without repeating a password.
Decisions made here:

* a network with host bits set (``10.0.0.1/8``) is refused, with the network
  it probably means in the message: silently widening or narrowing an
  allow-list is worse than a 400; a bare address means that address alone;
* an IPv4 network must be written as IPv4: client addresses that arrive as
  IPv4-mapped IPv6 (``::ffff:10.0.0.1``) are compared as IPv4, so an
  ``::ffff:0:0/96`` network would never match and is refused;
* an empty ``allow`` list is refused (it would lock everyone out; leave
  ``allow`` out to allow every address);
* user name and password are normalised to Unicode NFC (RFC 7617 section
  2.1, ``charset="UTF-8"``) and compared as UTF-8; neither may contain a
  control character, and the user name may not contain ``:``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

#: bounds of what an operator may set (UTF-8 bytes, after NFC)
MAX_USER_BYTES = 128
MAX_PASSWORD_BYTES = 256
#: networks in one allow-list, and characters in one network's text
MAX_NETWORKS = 256
MAX_NETWORK_CHARS = 64
#: requests per second: from one per 1000 s up to a million
MIN_PER_SECOND = 0.001
MAX_PER_SECOND = 1_000_000
MAX_BURST = 1_000_000

_MAPPED = IPv6Network("::ffff:0:0/96")


class RulesError(ValueError):
    """Rules that cannot be accepted; the message is safe to send in a 400."""


# -- the password hash ---------------------------------------------------------


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost parameters (RFC 7914): memory is ``128 * r * n`` bytes.

    The default, n=2**14, r=8, p=1, is the "interactive login" setting of
    scrypt's paper and of RFC 7914's examples: 16 MiB and some 50-100 ms of
    one core per verification.  OWASP's 2**17 would cost 128 MiB and half a
    second per check on a small server, and a public request waits for it;
    the access gate caches verified credentials, bounds how many checks run
    at once and runs them off the reactor thread, so the cheaper setting
    keeps a server responsive while still costing a guesser dearly.  The
    parameters are stored with each hash: raising them later changes new
    hashes only, and old ones keep verifying.
    """

    n: int = 2**14
    r: int = 8
    p: int = 1

    #: bounds for parameters read back from storage (a damaged or edited
    #: database must not make one check allocate gigabytes)
    MIN_N = 2**10
    MAX_N = 2**20
    MAX_R = 32
    MAX_P = 16
    MAX_MEMORY = 256 * 2**20

    def __post_init__(self) -> None:
        for name in ("n", "r", "p"):
            if type(getattr(self, name)) is not int:
                raise RulesError(f"scrypt parameter {name} must be an integer")
        if not (self.MIN_N <= self.n <= self.MAX_N) or self.n & (self.n - 1):
            raise RulesError(f"scrypt n must be a power of two from {self.MIN_N} to {self.MAX_N}")
        if not 1 <= self.r <= self.MAX_R:
            raise RulesError(f"scrypt r must be from 1 to {self.MAX_R}")
        if not 1 <= self.p <= self.MAX_P:
            raise RulesError(f"scrypt p must be from 1 to {self.MAX_P}")
        if 128 * self.r * self.n > self.MAX_MEMORY:
            raise RulesError("scrypt parameters need too much memory")

    @property
    def memory(self) -> int:
        """Bytes one derivation needs (what ``hashlib.scrypt``'s maxmem must allow)."""
        return 128 * self.r * (self.n + self.p + 2)


#: the parameters new hashes get
SCRYPT = ScryptParams()
SALT_BYTES = 16
DIGEST_BYTES = 32


@dataclass(frozen=True)
class PasswordHash:
    """A salted scrypt hash of a password, with the parameters that made it."""

    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    params: ScryptParams = SCRYPT

    @classmethod
    def of(cls, password: bytes, params: ScryptParams = SCRYPT) -> PasswordHash:
        """Hash ``password`` (UTF-8 bytes, NFC) with a fresh random salt: slow."""
        salt = os.urandom(SALT_BYTES)
        return cls(salt, _scrypt(password, salt, params, DIGEST_BYTES), params)

    def matches(self, password: bytes) -> bool:
        """Whether ``password`` hashes to this digest (constant-time compare).

        Slow on purpose (tens of milliseconds of CPU): call it off the
        reactor thread.  ``hashlib.scrypt`` releases the GIL while it works.
        """
        candidate = _scrypt(password, self.salt, self.params, len(self.digest))
        return hmac.compare_digest(candidate, self.digest)

    def stored(self) -> dict[str, Any]:
        return {
            "n": self.params.n,
            "r": self.params.r,
            "p": self.params.p,
            "salt": base64.b64encode(self.salt).decode("ascii"),
            "hash": base64.b64encode(self.digest).decode("ascii"),
        }

    @classmethod
    def from_stored(cls, data: object) -> PasswordHash:
        fields = _fields(data, "basic_auth.scrypt", required={"n", "r", "p", "salt", "hash"})
        params = ScryptParams(fields["n"], fields["r"], fields["p"])
        salt = _b64(fields["salt"], "basic_auth.scrypt.salt", 8, 64)
        digest = _b64(fields["hash"], "basic_auth.scrypt.hash", 16, 64)
        return cls(salt, digest, params)


def _scrypt(password: bytes, salt: bytes, params: ScryptParams, length: int) -> bytes:
    return hashlib.scrypt(
        password,
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.memory + 2**20,
        dklen=length,
    )


def _b64(value: object, where: str, least: int, most: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * most:
        raise RulesError(f"{where} must be base64 text")
    try:
        raw = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise RulesError(f"{where} must be base64 text")
    if not least <= len(raw) <= most:
        raise RulesError(f"{where} must be {least} to {most} bytes")
    return raw


# -- the three rules -------------------------------------------------------------


@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic credentials a request must carry: a user name and a password hash."""

    user: str
    password: PasswordHash

    @classmethod
    def create(cls, user: str, password: str, params: ScryptParams = SCRYPT) -> BasicAuth:
        """Check and normalise ``user`` and ``password``, and hash the password (slow)."""
        user = _credential(user, "user", MAX_USER_BYTES)
        if not user:
            raise RulesError("basic_auth.user must not be empty")
        if ":" in user:
            raise RulesError("basic_auth.user must not contain ':'")
        secret = _credential(password, "password", MAX_PASSWORD_BYTES)
        if not secret:
            raise RulesError("basic_auth.password must not be empty")
        return cls(user, PasswordHash.of(secret.encode("utf-8"), params))

    @property
    def user_bytes(self) -> bytes:
        """The user name as a request carries it (UTF-8)."""
        return self.user.encode("utf-8")


def _credential(value: object, name: str, limit: int) -> str:
    """NFC text of a user name or password; the message never shows the value."""
    if not isinstance(value, str):
        raise RulesError(f"basic_auth.{name} must be a string")
    if len(value) > 4 * limit:  # NFC may shorten text, but not by 4 times
        raise RulesError(f"basic_auth.{name} must be at most {limit} bytes of UTF-8")
    try:
        text = unicodedata.normalize("NFC", value)
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise RulesError(f"basic_auth.{name} must be valid Unicode")
    if size > limit:
        raise RulesError(f"basic_auth.{name} must be at most {limit} bytes of UTF-8")
    if any(c < " " or c == "\x7f" for c in text):
        raise RulesError(f"basic_auth.{name} must not contain control characters")
    return text


@dataclass(frozen=True)
class Rate:
    """A token bucket per client address: ``burst`` requests at once, refilled
    at ``per_second`` requests a second."""

    per_second: float
    burst: int

    @classmethod
    def parse(cls, data: object) -> Rate:
        fields = _fields(data, "rate", required={"per_second"}, optional={"burst"})
        per_second = fields["per_second"]
        if type(per_second) not in (int, float) or not math.isfinite(per_second):
            raise RulesError("rate.per_second must be a number")
        if not MIN_PER_SECOND <= per_second <= MAX_PER_SECOND:
            raise RulesError(f"rate.per_second must be from {MIN_PER_SECOND} to {MAX_PER_SECOND}")
        burst = fields.get("burst", max(1, math.ceil(per_second)))
        if type(burst) is not int:
            raise RulesError("rate.burst must be an integer")
        if not 1 <= burst <= MAX_BURST:
            raise RulesError(f"rate.burst must be from 1 to {MAX_BURST}")
        return cls(per_second, burst)

    def stored(self) -> dict[str, Any]:
        return {"per_second": self.per_second, "burst": self.burst}


def parse_network(text: object) -> Network:
    """One allow-list entry: a CIDR (no host bits set) or a bare address."""
    if not isinstance(text, str):
        raise RulesError("allow entries must be strings")
    if len(text) > MAX_NETWORK_CHARS or not text.isascii() or "%" in text:
        raise RulesError(f"allow: {text[:MAX_NETWORK_CHARS]!r} is not a network")
    try:
        network = ip_network(text)
    except ValueError:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise RulesError(f"allow: {text!r} is not a network")
        raise RulesError(f"allow: {text!r} has host bits set (did you mean {loose}?)")
    if network.version == 6 and network.subnet_of(_MAPPED):
        raise RulesError(f"allow: write {text!r} as an IPv4 network")
    return network


def _allow(data: object) -> tuple[Network, ...]:
    if not isinstance(data, list):
        raise RulesError("allow must be a list of networks")
    if not data:
        raise RulesError("allow must not be empty (leave it out to allow every address)")
    if len(data) > MAX_NETWORKS:
        raise RulesError(f"allow must have at most {MAX_NETWORKS} networks")
    return tuple(dict.fromkeys(parse_network(item) for item in data))


def _fields(
    data: object, where: str, *, required: set[str], optional: set[str] = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise RulesError(f"{where} must be an object")
    unknown = [k for k in data if k not in required and k not in optional]
    if unknown:
        shown = ", ".join(repr(str(k)[:40]) for k in sorted(map(str, unknown))[:3])
        raise RulesError(f"{where}: unknown field {shown}")
    missing = sorted(required - set(data))
    if missing:
        raise RulesError(f"{where}: missing field {missing[0]!r}")
    return data


_RULE_KEYS = {"basic_auth", "allow", "rate", "pool"}


def _pool(value: object) -> bool:
    if type(value) is not bool:
        raise RulesError("pool must be true or false")
    return value


@dataclass(frozen=True)
class HostRules:
    """What a public request to one host must satisfy; every rule optional.

    ``bool(rules)`` is True when any access rule is set (a host with none
    skips the access gate entirely); ``pool`` is not one of them.
    """

    basic_auth: BasicAuth | None = None
    allow: tuple[Network, ...] | None = None
    rate: Rate | None = None
    #: several clients may hold the host's tunnel at once (requests spread over them)
    pool: bool = False

    def __bool__(self) -> bool:
        return self.basic_auth is not None or self.allow is not None or self.rate is not None

    @property
    def empty(self) -> bool:
        """No rule at all, access rule or ``pool``."""
        return not self and not self.pool

    def allows(self, address: Address | None) -> bool:
        """Whether the allow-list lets ``address`` in (an unknown address: only
        when there is no allow-list)."""
        if self.allow is None:
            return True
        return address is not None and any(address in network for network in self.allow)

    @classmethod
    def from_api(cls, data: object, *, params: ScryptParams = SCRYPT) -> HostRules:
        """The rules of an admin API request (see the module docstring).

        A rule given as ``null`` is not set.  Hashes the password (slow:
        tens of milliseconds), so the API should call it off the reactor
        thread or accept the pause for an operator's change.
        """
        if data is None:
            return NO_RULES
        fields = _fields(data, "rules", required=set(), optional=_RULE_KEYS)
        basic_auth = allow = rate = None
        if fields.get("rate") is not None:
            rate = Rate.parse(fields["rate"])
        if fields.get("allow") is not None:
            allow = _allow(fields["allow"])
        pool = _pool(fields["pool"]) if fields.get("pool") is not None else False
        if fields.get("basic_auth") is not None:  # last: the slow part, once the rest is good
            auth = _fields(fields["basic_auth"], "basic_auth", required={"user", "password"})
            basic_auth = BasicAuth.create(auth["user"], auth["password"], params)
        return cls(basic_auth, allow, rate, pool)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> HostRules:
        """The rules ``stored()`` wrote; RulesError if the data was damaged."""
        fields = _fields(data, "rules", required=set(), optional=_RULE_KEYS)
        basic_auth = allow = rate = None
        if "basic_auth" in fields:
            auth = _fields(fields["basic_auth"], "basic_auth", required={"user", "scrypt"})
            user = _credential(auth["user"], "user", MAX_USER_BYTES)
            if not user or ":" in user or user != auth["user"]:
                raise RulesError("basic_auth.user is not a stored user name")
            basic_auth = BasicAuth(user, PasswordHash.from_stored(auth["scrypt"]))
        if "allow" in fields:
            allow = _allow(fields["allow"])
        if "rate" in fields:
            rate = Rate.parse(fields["rate"])
        # rules stored before ``pool`` existed have no such field: not pooled
        pool = _pool(fields["pool"]) if "pool" in fields else False
        return cls(basic_auth, allow, rate, pool)

    def stored(self) -> dict[str, Any]:
        """JSON-ready, for the registry: the password only as its scrypt hash."""
        out = self.public()
        if self.basic_auth is not None:
            out["basic_auth"]["scrypt"] = self.basic_auth.password.stored()
        return out

    def public(self) -> dict[str, Any]:
        """JSON-ready, for listings: no hash, no salt."""
        out: dict[str, Any] = {}
        if self.basic_auth is not None:
            out["basic_auth"] = {"user": self.basic_auth.user}
        if self.allow is not None:
            out["allow"] = [str(network) for network in self.allow]
        if self.rate is not None:
            out["rate"] = self.rate.stored()
        if self.pool:
            out["pool"] = True
        return out


NO_RULES = HostRules()
