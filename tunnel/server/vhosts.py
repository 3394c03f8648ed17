"""The server's routing tables: which client serves a public Host or TCP port.

Hosts are normalised (lower case, no trailing dot) and looked up as
``host:port`` first, then as bare ``host``, like koding's server.  Identifiers
are secrets: they are found through a digest index and confirmed with a
constant-time comparison.
"""

from __future__ import annotations

import hmac

from ..koding.identifiers import digest


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


class VirtualHosts:
    """The host -> identifier table of a server."""

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}
        self._idents: dict[bytes, tuple[str, set[str]]] = {}

    def add(self, host: str, identifier: str) -> None:
        if not identifier:
            raise ValueError("the identifier must not be empty")
        key = normalize_host(host)
        if not key:
            raise ValueError("the host must not be empty")
        self.delete(key)
        self._hosts[key] = identifier
        entry = self._idents.setdefault(digest(identifier), (identifier, set()))
        entry[1].add(key)

    def delete(self, host: str) -> None:
        key = normalize_host(host)
        identifier = self._hosts.pop(key, None)
        if identifier is None:
            return
        index = digest(identifier)
        entry = self._idents.get(index)
        if entry is not None:
            entry[1].discard(key)
            if not entry[1]:
                del self._idents[index]

    def lookup(self, host: str) -> tuple[str | None, int]:
        """Return (identifier or None, port) for a Host header value."""
        name, port = split_host(host)
        identifier = None
        if port:
            identifier = self._hosts.get(f"{name}:{port}")
        if identifier is None:
            identifier = self._hosts.get(name)
        return identifier, port

    def canonical(self, identifier: str) -> str | None:
        """The registered identifier equal to ``identifier`` (constant-time check)."""
        entry = self._idents.get(digest(identifier))
        if entry is None:
            return None
        stored = entry[0]
        if hmac.compare_digest(stored.encode("utf-8"), identifier.encode("utf-8")):
            return stored
        return None

    def hosts_of(self, identifier: str) -> list[str]:
        entry = self._idents.get(digest(identifier))
        return sorted(entry[1]) if entry else []

    def __len__(self) -> int:
        return len(self._hosts)


class VirtualAddrs:
    """(local IP or None, local port) -> identifier."""

    def __init__(self) -> None:
        self._by_port: dict[int, str] = {}
        self._by_ip: dict[str, str] = {}

    def add(self, identifier: str, port: int | None = None, ip: str | None = None) -> None:
        if (port is None) == (ip is None):
            raise ValueError("give exactly one of port or ip")
        if not identifier:
            raise ValueError("the identifier must not be empty")
        if ip is not None:
            self._by_ip[ip] = identifier
        else:
            self._by_port[int(port)] = identifier

    def delete(self, port: int | None = None, ip: str | None = None) -> None:
        if ip is not None:
            self._by_ip.pop(ip, None)
        if port is not None:
            self._by_port.pop(int(port), None)

    def lookup(self, ip: str, port: int) -> str | None:
        identifier = self._by_ip.get(ip)
        return identifier if identifier is not None else self._by_port.get(port)
