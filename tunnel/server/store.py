"""Where a server's hosts and TCP ports are kept: the registry's storage seam.

A ``RegistryStore`` persists what an operator configured: which tunnel
(``TunnelKey``, never an identifier) serves each public host, with that
host's access rules, and which tunnel each public TCP port carries.  The
server never asks the store on a request: it serves from memory
(``vhosts``) and writes through the store when the configuration changes,
so a slow or absent store never delays a public request.

``MemoryStore`` keeps nothing past the process (what a server without
``--db`` uses); ``sqlite.SQLiteStore`` keeps it in a file.  A store holds no
SQL outside its own module and no knowledge of HTTP: rules are kept in
their stored form (``rules.HostRules.stored()``: JSON-ready, passwords
hashed), opaque to the store.

A store that several server nodes share (``redisstore.RedisStore``) is a
``SharedRegistryStore``: a ``RegistryStore`` that also tells each node the
changes the others make (``watch``), so that every node serves the same
hosts and listens on the same TCP ports.  A single-node store does not
have it: nobody but its one user changes it, so there is nothing to tell,
and ``Routes`` checks for the capability (``isinstance``) rather than
calling a method that could only ever do nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, succeed

from ..koding.identifiers import TunnelKey


class StoreError(Exception):
    """The store cannot be used, or a change to it failed (nothing changed)."""


class StoreClosed(StoreError):
    """The store was closed; nothing more can be read or changed."""


class StoreOutcomeUnknown(StoreError):
    """The store did not answer in time: the change may or may not have been
    made (a shared store's feed tells which)."""


@dataclass(frozen=True)
class HostEntry:
    """A public host (normalised: ``name`` or ``name:port``), its tunnel and rules."""

    host: str
    key: TunnelKey
    #: the rules' stored form (``HostRules.stored()``); empty: no rule (not in
    #: the repr: it holds a password's salt and hash)
    rules: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PortEntry:
    """A public TCP port and the tunnel that carries its connections."""

    port: int
    key: TunnelKey


@dataclass(frozen=True)
class Snapshot:
    """Everything a store holds, as loaded at start."""

    hosts: tuple[HostEntry, ...] = ()
    ports: tuple[PortEntry, ...] = ()
    #: where a shared store's change counter stood when this was read (what
    #: ``SharedRegistryStore.watch`` continues from); None: a single-node store
    version: int | None = None
    #: which incarnation of a shared store's data this is (a store emptied or
    #: replaced gets a new one, and its counter starts again); None: unknown
    epoch: str | None = None


@dataclass(frozen=True)
class HostChanged:
    """A host is now served by ``entry``'s tunnel and rules; None: it was deleted."""

    host: str
    entry: HostEntry | None


@dataclass(frozen=True)
class PortChanged:
    """A TCP port is now carried by ``entry``'s tunnel; None: it was deleted."""

    port: int
    entry: PortEntry | None


@dataclass(frozen=True)
class Resynced:
    """After a gap in the feed (an outage, a store emptied or replaced), the
    store holds exactly ``snapshot``: serve every entry in it and nothing
    else, whatever was told before (a watcher compares it with what it
    actually serves, and retries there what it could not apply before)."""

    snapshot: Snapshot


#: one change from a shared store's feed: what a host or a port is now, or
#: everything the store holds
Change = HostChanged | PortChanged | Resynced


class RegistryStore(Protocol):
    """Persistence of hosts and TCP ports; every change is durable when its
    Deferred fires, and fails the Deferred (changing nothing) when it cannot be."""

    def load(self) -> Deferred[Snapshot]:
        """Everything stored."""

    def put_host(self, entry: HostEntry) -> Deferred[bool]:
        """Store ``entry``, replacing the entry of the same host; True if it is new."""

    def delete_host(self, host: str) -> Deferred[bool]:
        """Forget ``host``; True if it was stored."""

    def put_port(self, entry: PortEntry) -> Deferred[bool]:
        """Store ``entry``, replacing the entry of the same port; True if it is new."""

    def delete_port(self, port: int) -> Deferred[bool]:
        """Forget ``port``; True if it was stored."""

    def close(self) -> Deferred[None]:
        """Release the store (pending changes first)."""


@runtime_checkable
class SharedRegistryStore(RegistryStore, Protocol):
    """A ``RegistryStore`` that several nodes change: it tells each the changes.

    Its ``load()`` gives a ``Snapshot`` with a ``version``, the position in
    the store's sequence of changes, from which ``watch`` continues.
    """

    def watch(self, since: Snapshot, on_change: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``on_change`` with every change made to the store after
        ``since`` was read, by any node (this one's own included: applying a
        change must be idempotent), in the order the store made them, until
        the returned function is called.

        Changes arrive while the store can reach its backend; after an outage
        (or a snapshot without a version, or a gap in the sequence), the
        store reads everything it holds and calls ``on_change`` with one
        ``Resynced``: the watcher makes what it serves equal to it, so it
        always ends up with what the store holds, whatever it changed itself
        meanwhile.
        ``on_change`` runs in the reactor's thread and must not raise.
        """


class MemoryStore:
    """A ``RegistryStore`` that lasts as long as the process."""

    def __init__(self) -> None:
        self._hosts: dict[str, HostEntry] = {}
        self._ports: dict[int, PortEntry] = {}

    def load(self) -> Deferred[Snapshot]:
        return succeed(Snapshot(tuple(self._hosts.values()), tuple(self._ports.values())))

    def put_host(self, entry: HostEntry) -> Deferred[bool]:
        created = entry.host not in self._hosts
        self._hosts[entry.host] = entry
        return succeed(created)

    def delete_host(self, host: str) -> Deferred[bool]:
        return succeed(self._hosts.pop(host, None) is not None)

    def put_port(self, entry: PortEntry) -> Deferred[bool]:
        created = entry.port not in self._ports
        self._ports[entry.port] = entry
        return succeed(created)

    def delete_port(self, port: int) -> Deferred[bool]:
        return succeed(self._ports.pop(port, None) is not None)

    def close(self) -> Deferred[None]:
        return succeed(None)
