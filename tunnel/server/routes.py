"""The registry facade: hosts and TCP ports an operator configures, kept by a store.

``Routes`` is what the admin API, the command line (``--vhost``, ``--tcp``,
``--vhost-file``) and embedding code change the server's routes through.
It writes each change to a ``RegistryStore`` first and changes the server's
in-memory tables (``TunnelServer.vhosts`` and ``addrs``) only once the store
confirms it, so a failed write changes nothing and what is served is what
a restart will load.  Requests are never delayed by the store: they are
routed from memory.  Changes are made one at a time, in the order asked.

A TCP port is also a listener: ``put_port`` opens it (through
``listen_tcp``, e.g. ``TCPPorts``) when the port is new and ``delete_port``
closes it.  Changes take effect for new requests and connections; open ones
are unaffected.

A store that several nodes share (``store.SharedRegistryStore``, e.g. Redis)
also tells each node the changes made through the others: once loaded,
``Routes`` watches it and applies each change to its tables and listeners
(every node listens on every TCP port), one at a time with its own changes,
idempotently (its own changes come back too, and change nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.logger import Logger

from ..koding.identifiers import TunnelKey
from .registry import TunnelServer
from .rules import HostRules
from .store import (
    Change,
    HostChanged,
    HostEntry,
    PortChanged,
    PortEntry,
    RegistryStore,
    Resynced,
    SharedRegistryStore,
    Snapshot,
)
from .vhosts import host_key

#: no rule (what ``put_host`` stores when given none)
NO_RULES: Mapping[str, Any] = MappingProxyType({})


def default_rules(stored: Mapping[str, Any]) -> HostRules | None:
    """What a ``Route`` carries for stored rules: the ``HostRules`` the web
    layer enforces and the registry reads ``pool`` from, None when there are
    none (RulesError, a ValueError, if they are not valid)."""
    rules = HostRules.from_stored(stored)
    return None if rules.empty else rules


class RoutesStopped(Exception):
    """A change was asked of routes that are stopped (or stopping)."""


def check_port(port: int) -> int:
    """``port`` if it is a TCP port number (1..65535); ValueError otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"{port!r:.20} is not a TCP port number (1..65535)")
    return port


class TCPPorts:
    """``listen_tcp`` for ``Routes``: IPv4 TCP listeners on one interface that
    carry ``server``'s TCP tunnels (one ``tcp_factory()`` shared by all)."""

    def __init__(
        self,
        server: TunnelServer,
        *,
        interface: str = "",
        backlog: int = 50,
        reactor: IReactorTCP | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.interface = interface
        self.backlog = backlog
        self.factory = server.tcp_factory()

    def __call__(self, port: int) -> Deferred[IListeningPort]:
        endpoint = TCP4ServerEndpoint(
            self.reactor, port, backlog=self.backlog, interface=self.interface
        )
        return endpoint.listen(self.factory)


class Routes:
    """The server's hosts and TCP ports, persisted by ``store``.

    :param server: whose tables are served from.
    :param store: where every change is written first.
    :param listen_tcp: opens the public listener of a TCP port (fails its
        Deferred if the port cannot be bound); None: this object opens no
        listener, the embedding program listens with ``server.tcp_factory()``.
    :param rules_of: turns a host's stored rules into the object its
        ``Route`` carries for the web layer (ValueError if they are not
        valid); default ``default_rules``.

    Hosts are checked and normalised by ``vhosts.host_key``; a malformed one
    fails the call with ValueError before anything is stored.  A tunnel is a
    ``TunnelKey`` or an identifier (hashed at once by ``TunnelKey.coerce``).
    """

    log = Logger()

    def __init__(
        self,
        server: TunnelServer,
        store: RegistryStore,
        *,
        listen_tcp: Callable[[int], Deferred[IListeningPort]] | None = None,
        rules_of: Callable[[Mapping], object] | None = None,
    ) -> None:
        self.server = server
        self.store = store
        self.listen_tcp = listen_tcp
        self._rules_of = rules_of if rules_of is not None else default_rules
        self._hosts: dict[str, HostEntry] = {}
        self._ports: dict[int, PortEntry] = {}
        #: the listeners this object opened, by port
        self._listeners: dict[int, IListeningPort] = {}
        #: one change at a time: the tables follow the store's order
        self._lock = DeferredLock()
        #: stop() was called: what is asked from then on is refused
        self._stopping = False
        #: ends the watch of a shared store (None: not watching)
        self._unwatch: Callable[[], None] | None = None

    # -- start and stop ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load the store into the server's tables and open the stored ports'
        listeners.  Fails (closing what it opened) if a port cannot be bound."""
        if self._stopping:
            return fail(RoutesStopped("the routes are stopped"))
        return self._lock.run(lambda: Deferred.fromCoroutine(self._load()))

    def stop(self) -> Deferred[None]:
        """Close the listeners opened here, then the store.  Changes asked
        before finish first; changes asked after fail with ``RoutesStopped``."""
        self._stopping = True
        return self._lock.run(lambda: Deferred.fromCoroutine(self._close()))

    def _check_running(self) -> None:
        if self._stopping:
            raise RoutesStopped("the routes are stopped")

    async def _load(self) -> None:
        snapshot = await self.store.load()
        for entry in snapshot.hosts:
            try:
                rules = self._rules_of(entry.rules)
                self.server.add_host(entry.host, entry.key, rules)
            except Exception as e:
                # one bad row must not stop the server; the host is not served
                self.log.error(
                    "stored host {host} left out: {why}", host=entry.host[:80], why=str(e)[:200]
                )
                continue
            self._hosts[entry.host] = entry
        for entry in snapshot.ports:
            try:
                await self._open(entry.port)
            except Exception as e:
                # a port taken since it was added must not keep the server down
                # (nor its admin API, through which it can be removed); the
                # command line's --tcp ports still fail the start (``seed``)
                self.log.error(
                    "stored TCP port {port} left out: {why}", port=entry.port, why=str(e)[:200]
                )
                continue
            self.server.add_addr(entry.key, port=entry.port)
            self._ports[entry.port] = entry
        self.log.info(
            "routes loaded: {hosts} hosts, {ports} TCP ports",
            hosts=len(snapshot.hosts),
            ports=len(snapshot.ports),
        )
        if isinstance(self.store, SharedRegistryStore):
            self._unwatch = self.store.watch(snapshot, self._changed)

    async def _close(self) -> None:
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        await self._close_listeners(list(self._listeners))
        await self.store.close()

    # -- changes from a shared store --------------------------------------------

    def _changed(self, change: Change) -> None:
        """The shared store's feed: a change made through any node."""
        if self._stopping:
            return
        d = self._lock.run(lambda: Deferred.fromCoroutine(self._apply(change)))
        d.addErrback(
            lambda f: self.log.error(
                "a change from the shared registry was not applied: {why}",
                why=f.getErrorMessage()[:200],
            )
        )

    async def _apply(self, change: Change) -> None:
        if self._stopping:
            return
        if isinstance(change, HostChanged):
            self._apply_host(change)
        elif isinstance(change, PortChanged):
            await self._apply_port(change)
        elif isinstance(change, Resynced):
            await self._resync(change.snapshot)

    async def _resync(self, snapshot: Snapshot) -> None:
        """Serve exactly ``snapshot``: compared with what is served here (not
        with what the feed told), so this node's own changes made while the
        feed was cut off, and entries it could not apply before (a port it
        could not bind, rules it could not read), converge too."""
        if not snapshot.hosts and not snapshot.ports and (self._hosts or self._ports):
            self.log.warn(
                "the shared registry is empty: removing the {hosts} hosts and {ports} TCP"
                " ports served here (was its store emptied, or restarted without its data?)",
                hosts=len(self._hosts),
                ports=len(self._ports),
            )
        hosts = set()
        for entry in snapshot.hosts:
            try:
                hosts.add(host_key(entry.host))
            except ValueError:
                pass  # left out below, with its reason
        ports = {e.port for e in snapshot.ports}
        for name in sorted(set(self._hosts) - hosts):
            self._apply_host(HostChanged(name, None))
        for port in sorted((set(self._ports) | set(self._listeners)) - ports):
            await self._apply_port(PortChanged(port, None))
        for entry in snapshot.hosts:
            self._apply_host(HostChanged(entry.host, entry))
        for entry in snapshot.ports:
            await self._apply_port(PortChanged(entry.port, entry))

    def _apply_host(self, change: HostChanged) -> None:
        try:
            name = host_key(change.host)
        except ValueError as e:
            self.log.error(
                "shared registry: host {host!r} left out: {why}", host=change.host[:80], why=str(e)
            )
            return
        entry = change.entry
        if entry is None:
            if self._hosts.pop(name, None) is not None:
                self.server.delete_host(name)
                self.log.info("host {host} removed (shared registry)", host=name)
            return
        entry = HostEntry(name, entry.key, entry.rules)
        if self._hosts.get(name) == entry:
            return  # this node's own change, or one it has already
        try:
            rules = self._rules_of(entry.rules)
        except Exception as e:
            # never served without its rules: no longer served here
            if self._hosts.pop(name, None) is not None:
                self.server.delete_host(name)
            self.log.error(
                "shared registry: host {host} left out: {why}", host=name, why=str(e)[:200]
            )
            return
        self.server.add_host(name, entry.key, rules)
        self._hosts[name] = entry
        self.log.info("host {host} served by {ident} (shared registry)", host=name, ident=entry.key)

    async def _apply_port(self, change: PortChanged) -> None:
        port, entry = change.port, change.entry
        if entry is None:
            if self._ports.pop(port, None) is not None:
                self.server.delete_addr(port=port)
                self.log.info("TCP port {port} removed (shared registry)", port=port)
            await self._close_listeners([port])
            return
        if self._ports.get(port) == entry:
            return
        try:
            await self._open(port)
        except Exception as e:
            self.log.error(
                "shared registry: TCP port {port} cannot be opened on this node: {why}",
                port=port,
                why=str(e)[:200],
            )
            return
        self.server.add_addr(entry.key, port=port)
        self._ports[port] = entry
        self.log.info(
            "TCP port {port} carried by {ident} (shared registry)", port=port, ident=entry.key
        )

    # -- hosts --------------------------------------------------------------------

    def put_host(
        self, host: str, tunnel: str | TunnelKey, rules: Mapping[str, Any] = NO_RULES
    ) -> Deferred[bool]:
        """Serve ``host`` by ``tunnel`` with ``rules`` (their stored form,
        passwords already hashed); True if the host is new, False if its
        entry was replaced."""
        try:
            self._check_running()
            entry = HostEntry(host_key(host), TunnelKey.coerce(tunnel), dict(rules))
            route_rules = self._rules_of(entry.rules)
        except Exception:
            return fail()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._put_host(entry, route_rules)))

    async def _put_host(self, entry: HostEntry, route_rules: object) -> bool:
        created = await self.store.put_host(entry)
        self.server.add_host(entry.host, entry.key, route_rules)
        self._hosts[entry.host] = entry
        self.log.info("host {host} served by {ident}", host=entry.host, ident=entry.key)
        return created

    def delete_host(self, host: str) -> Deferred[bool]:
        """Stop serving ``host`` (its requests get a 502); False if it was unknown."""
        try:
            self._check_running()
            name = host_key(host)
        except Exception:
            return fail()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._delete_host(name)))

    async def _delete_host(self, name: str) -> bool:
        found = await self.store.delete_host(name)
        self.server.delete_host(name)
        if self._hosts.pop(name, None) is not None:
            self.log.info("host {host} removed", host=name)
        return found

    def host(self, host: str) -> HostEntry | None:
        """The entry of ``host`` (normalised), or None; ValueError if it is malformed."""
        return self._hosts.get(host_key(host))

    def hosts(self) -> list[HostEntry]:
        """Every host's entry, by host."""
        return [self._hosts[name] for name in sorted(self._hosts)]

    # -- TCP ports ----------------------------------------------------------------

    def put_port(self, port: int, tunnel: str | TunnelKey) -> Deferred[bool]:
        """Carry TCP connections to ``port`` through ``tunnel``, listening on it
        if it is new; True if it is new, False if its tunnel was replaced
        (its listener stays).  A port that cannot be bound fails the call and
        stores nothing."""
        try:
            self._check_running()
            entry = PortEntry(check_port(port), TunnelKey.coerce(tunnel))
        except Exception:
            return fail()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._put_port(entry)))

    async def _put_port(self, entry: PortEntry) -> bool:
        opened = await self._open(entry.port)
        try:
            created = await self.store.put_port(entry)
        except BaseException:
            if opened:
                await self._close_listeners([entry.port])
            raise
        self.server.add_addr(entry.key, port=entry.port)
        self._ports[entry.port] = entry
        self.log.info("TCP port {port} carried by {ident}", port=entry.port, ident=entry.key)
        return created

    def delete_port(self, port: int) -> Deferred[bool]:
        """Stop carrying ``port`` and close its listener; False if it was unknown."""
        try:
            self._check_running()
            check_port(port)
        except Exception:
            return fail()
        return self._lock.run(lambda: Deferred.fromCoroutine(self._delete_port(port)))

    async def _delete_port(self, port: int) -> bool:
        found = await self.store.delete_port(port)
        self.server.delete_addr(port=port)
        if self._ports.pop(port, None) is not None:
            self.log.info("TCP port {port} removed", port=port)
        await self._close_listeners([port])
        return found

    def ports(self) -> list[PortEntry]:
        """Every TCP port's entry, by port."""
        return [self._ports[port] for port in sorted(self._ports)]

    # -- what the command line gives --------------------------------------------

    def seed(
        self,
        hosts: Mapping[str, str | TunnelKey],
        ports: Mapping[int, str | TunnelKey],
        rules: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Deferred[None]:
        """Make sure each of ``hosts`` and ``ports`` is served by its tunnel
        (``--vhost``, ``--vhost-file``, ``--tcp``): what already is stays
        untouched, a host whose tunnel changes keeps its stored rules.

        :param rules: stored rules for some of ``hosts`` (the rule flags):
            they replace what is stored for those hosts.
        """
        return Deferred.fromCoroutine(self._seed(hosts, ports, rules or {}))

    async def _seed(
        self,
        hosts: Mapping[str, str | TunnelKey],
        ports: Mapping[int, str | TunnelKey],
        rules: Mapping[str, Mapping[str, Any]],
    ) -> None:
        self._check_running()
        given = {host_key(host): stored for host, stored in rules.items()}
        for host, tunnel in hosts.items():
            name, key = host_key(host), TunnelKey.coerce(tunnel)
            existing = self._hosts.get(name)
            kept = existing.rules if existing else NO_RULES
            wanted = given.pop(name, kept)
            if existing is None or existing.key != key or wanted != kept:
                await self.put_host(name, key, wanted)
        if given:
            raise ValueError(f"rules for hosts that are not seeded: {', '.join(sorted(given))}")
        for port, tunnel in ports.items():
            key = TunnelKey.coerce(tunnel)
            existing_port = self._ports.get(check_port(port))
            if existing_port is None or existing_port.key != key:
                await self.put_port(port, key)

    # -- listeners ----------------------------------------------------------------

    async def _open(self, port: int) -> bool:
        """Listen on ``port`` unless it is open already; True if it was opened now."""
        if self.listen_tcp is None or port in self._listeners:
            return False
        self._listeners[port] = await self.listen_tcp(port)
        return True

    async def _close_listeners(self, ports: list[int]) -> None:
        closing = [
            (port, maybeDeferred(self._listeners.pop(port).stopListening))
            for port in ports
            if port in self._listeners
        ]
        for port, done in closing:
            try:
                await done
            except Exception as e:
                self.log.error("closing TCP port {port} failed: {why}", port=port, why=str(e))
