"""The server's routing tables: which tunnel serves a public Host or TCP port.

Hosts are normalised (lower case, no trailing dot) and looked up as
``host:port`` first, then as bare ``host``, like koding's server.  The tables
hold ``TunnelKey``s, never identifiers: an identifier a client offers is
found through a digest index and confirmed with a constant-time comparison
(``canonical``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..koding.identifiers import TunnelKey, digest

#: the longest host name a table keeps (DNS names are at most 253 characters)
MAX_HOST_NAME = 255

# RFC 3986 3.2.2: a reg-name (unreserved, pct-encoded, sub-delims) or an IP literal
_REG_NAME = re.compile(r"(?:[a-z0-9\-._~!$&'()*+,;=]|%[0-9a-f]{2})+")
_IP_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")


def split_host(host: str) -> tuple[str, int]:
    """Split a Host header value into (name, port); port is 0 when absent.

    Raises ValueError for a malformed port or bracketed address.
    """
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"malformed host {host!r:.80}")
        name, rest = host[: end + 1], host[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"malformed host {host!r:.80}")
        port_text = rest[1:]
    else:
        name, _, port_text = host.rpartition(":") if ":" in host else (host, "", "")
    if port_text == "":
        port = 0
    elif port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise ValueError(f"malformed port in host {host!r:.80}")
    return name.lower().rstrip("."), port


def normalize_host(host: str) -> str:
    """``Example.COM.:8080`` -> ``example.com:8080``; ``app.test`` -> ``app.test``."""
    name, port = split_host(host)
    return f"{name}:{port}" if port else name


def host_key(host: str) -> str:
    """The normalised form of a host a table may keep; ValueError if it is none.

    What any Host header may name is routed (``lookup``), but what is stored
    is checked: a name (RFC 3986's reg-name, ASCII, at most 255 characters)
    or a bracketed IP literal, and an optional port.  The error never repeats
    more than 80 characters of ``host``.
    """
    name, port = split_host(host)
    if not name:
        raise ValueError(f"no host name in {host!r:.80}")
    if (
        len(name) > MAX_HOST_NAME
        or not name.isascii()
        or not (_REG_NAME.fullmatch(name) or _IP_LITERAL.fullmatch(name))
    ):
        raise ValueError(f"malformed host name {host!r:.80}")
    return f"{name}:{port}" if port else name


@dataclass(frozen=True)
class Route:
    """Where a public host goes: its tunnel, and the rules its requests pass.

    ``rules`` is opaque here: the web layer checks it (None: no rule); only
    its ``pool`` attribute, if it has one, is read here (``pooled``).
    """

    host: str
    key: TunnelKey
    rules: Any = None

    @property
    def pooled(self) -> bool:
        """Whether several clients may hold this host's tunnel (its rules' ``pool``)."""
        return getattr(self.rules, "pool", False) is True


_Ref = TypeVar("_Ref")


class _KeyIndex(Generic[_Ref]):
    """The keys a table uses, by digest, with what refers to each."""

    def __init__(self) -> None:
        self._keys: dict[bytes, tuple[TunnelKey, set[_Ref]]] = {}

    def add(self, key: TunnelKey, ref: _Ref) -> None:
        self._keys.setdefault(key.digest, (key, set()))[1].add(ref)

    def discard(self, key: TunnelKey, ref: _Ref) -> None:
        entry = self._keys.get(key.digest)
        if entry is not None:
            entry[1].discard(ref)
            if not entry[1]:
                del self._keys[key.digest]

    def refs(self, key: TunnelKey) -> set[_Ref]:
        entry = self._keys.get(key.digest)
        return set(entry[1]) if entry is not None else set()

    def canonical(self, offered: str) -> TunnelKey | None:
        entry = self._keys.get(digest(offered))
        if entry is not None and entry[0].matches(offered):
            return entry[0]
        return None


class VirtualHosts:
    """The host -> ``Route`` table of a server."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._index: _KeyIndex[str] = _KeyIndex()
        #: the pooled hosts (``Route.pooled``) of each key that has any
        self._pooled: dict[TunnelKey, set[str]] = {}

    def add(self, host: str, tunnel: str | TunnelKey, rules: Any = None) -> Route:
        """Route ``host`` (checked and normalised by ``host_key``) to ``tunnel``,
        replacing its route if it had one."""
        route = Route(host_key(host), TunnelKey.coerce(tunnel), rules)
        self.delete(route.host)
        self._routes[route.host] = route
        self._index.add(route.key, route.host)
        if route.pooled:
            self._pooled.setdefault(route.key, set()).add(route.host)
        return route

    def delete(self, host: str) -> bool:
        """Forget ``host``; False if it had no route (or does not parse)."""
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        route = self._routes.pop(name, None)
        if route is None:
            return False
        self._index.discard(route.key, name)
        pooled = self._pooled.get(route.key)
        if pooled is not None:
            pooled.discard(name)
            if not pooled:
                del self._pooled[route.key]
        return True

    def get(self, host: str) -> Route | None:
        """The route of exactly ``host`` (normalised), or None."""
        try:
            return self._routes.get(normalize_host(host))
        except ValueError:
            return None

    def lookup(self, host: str) -> tuple[Route | None, int]:
        """Return (route or None, port) for a Host header value (ValueError if
        it does not parse)."""
        name, port = split_host(host)
        route = None
        if port:
            route = self._routes.get(f"{name}:{port}")
        if route is None:
            route = self._routes.get(name)
        return route, port

    def canonical(self, offered: str) -> TunnelKey | None:
        """The key of a route that ``offered`` (an identifier) hashes to, or None."""
        return self._index.canonical(offered)

    def pooled(self, tunnel: str | TunnelKey) -> bool:
        """Whether a host routed to ``tunnel`` lets several clients hold it
        (a lookup in an index kept by ``add`` and ``delete``)."""
        return TunnelKey.coerce(tunnel) in self._pooled

    def hosts_of(self, tunnel: str | TunnelKey) -> list[str]:
        return sorted(self._index.refs(TunnelKey.coerce(tunnel)))

    def routes(self) -> list[Route]:
        """Every route, by host."""
        return [self._routes[host] for host in sorted(self._routes)]

    def __len__(self) -> int:
        return len(self._routes)


class VirtualAddrs:
    """(local IP or None, local port) -> ``TunnelKey``."""

    def __init__(self) -> None:
        self._by_port: dict[int, TunnelKey] = {}
        self._by_ip: dict[str, TunnelKey] = {}
        self._index: _KeyIndex[int | str] = _KeyIndex()

    def add(self, tunnel: str | TunnelKey, port: int | None = None, ip: str | None = None) -> None:
        if (port is None) == (ip is None):
            raise ValueError("give exactly one of port or ip")
        key = TunnelKey.coerce(tunnel)
        self.delete(port=port, ip=ip)
        if ip is not None:
            self._by_ip[ip] = key
            self._index.add(key, ip)
        else:
            self._by_port[int(port)] = key
            self._index.add(key, int(port))

    def delete(self, port: int | None = None, ip: str | None = None) -> bool:
        """Forget the mapping of ``port`` and/or ``ip``; False if there was none."""
        found = False
        if ip is not None:
            key = self._by_ip.pop(ip, None)
            if key is not None:
                self._index.discard(key, ip)
                found = True
        if port is not None:
            key = self._by_port.pop(int(port), None)
            if key is not None:
                self._index.discard(key, int(port))
                found = True
        return found

    def lookup(self, ip: str, port: int) -> TunnelKey | None:
        key = self._by_ip.get(ip)
        return key if key is not None else self._by_port.get(port)

    def canonical(self, offered: str) -> TunnelKey | None:
        """The key of a mapping that ``offered`` (an identifier) hashes to, or None."""
        return self._index.canonical(offered)
