"""Routes (the registry facade) and the tables it fills (vhosts).

Routes over a MemoryStore and over store doubles (one that fails every
write, one whose writes the test completes by hand); TCP listeners through
a listen_tcp that records, and real sockets on 127.0.0.1; end to end on the
in-memory network (tests/memory.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from tunnel.koding.identifiers import TunnelKey
from tunnel.server import Routes, TunnelServer
from tunnel.server.routes import RoutesStopped, TCPPorts
from tunnel.server.rules import HostRules
from tunnel.server.store import (
    HostChanged,
    HostEntry,
    MemoryStore,
    PortChanged,
    PortEntry,
    Resynced,
    Snapshot,
)
from tunnel.server.vhosts import VirtualAddrs, VirtualHosts, host_key

from .memory import MemoryTunnel

#: stored rules, as HostRules.stored() writes them
RATE_1 = {"rate": {"per_second": 1, "burst": 1}}
RATE_3 = {"rate": {"per_second": 3, "burst": 3}}
ONE, TWO = TunnelKey.of("ident-one"), TunnelKey.of("ident-two")


def result(d: Deferred):
    """The result of a Deferred that has fired (raising its failure)."""
    box: list = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# -- host_key and the tables ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given_host", "key"),
    [
        ("App.Test", "app.test"),
        ("app.test.", "app.test"),
        (" App.Test.:8080 ", "app.test:8080"),
        ("[::1]:80", "[::1]:80"),
        ("127.0.0.1", "127.0.0.1"),
        ("under_score-dash.test", "under_score-dash.test"),
        ("x" * 255, "x" * 255),
    ],
)
def test_host_key_normalises(given_host, key):
    assert host_key(given_host) == key


@pytest.mark.parametrize(
    "bad",
    ["", ".", ":80", "a b.test", "ex/ample.test", "é.test", "x" * 256, "[::1", "[zz]",
     "app.test:99999", "app.test:http", "app.test\r\nx", "a\x00b", "app.test:80:80"],
)  # fmt: skip
def test_host_key_refuses_what_is_not_a_host(bad):
    with pytest.raises(ValueError) as info:
        host_key(bad)
    assert len(str(info.value)) < 120


@given(st.text(max_size=300))
def test_host_key_is_idempotent_and_what_it_keeps_is_routed(text):
    try:
        key = host_key(text)
    except ValueError:
        return
    assert host_key(key) == key
    hosts = VirtualHosts()
    hosts.add(text, ONE)
    route, _ = hosts.lookup(key)
    assert route is not None and route.host == key and route.key == ONE


def test_lookup_prefers_host_and_port_then_the_bare_host():
    hosts = VirtualHosts()
    hosts.add("app.test", ONE)
    hosts.add("app.test:8080", TWO, rules={"r": 1})
    assert hosts.lookup("APP.test:8080") == (hosts.get("app.test:8080"), 8080)
    assert hosts.lookup("app.test:8080")[0].rules == {"r": 1}
    route, port = hosts.lookup("app.test:9090")
    assert (route.key, port) == (ONE, 9090)
    assert hosts.lookup("other.test") == (None, 0)
    with pytest.raises(ValueError):
        hosts.lookup("app.test:http")


def test_canonical_finds_the_stored_key_while_a_host_uses_it():
    hosts = VirtualHosts()
    hosts.add("a.test", "ident-one")
    hosts.add("b.test", ONE)
    stored = hosts.get("a.test").key
    assert hosts.canonical("ident-one") is stored  # the one object: fast dict hits
    assert hosts.canonical("ident-two") is None and hosts.canonical("ident-one ") is None
    assert hosts.hosts_of("ident-one") == ["a.test", "b.test"]
    hosts.delete("a.test")
    assert hosts.canonical("ident-one") == ONE
    hosts.add("b.test", TWO)  # replaced: ONE is used by no host
    assert hosts.canonical("ident-one") is None and hosts.canonical("ident-two") == TWO
    assert hosts.hosts_of(ONE) == [] and len(hosts) == 1
    assert hosts.delete("b.test") and not hosts.delete("b.test") and not hosts.delete("[")


def test_virtual_addrs_map_ports_and_ips_to_keys():
    addrs = VirtualAddrs()
    addrs.add("ident-one", port=2222)
    addrs.add(TWO, ip="127.0.0.2")
    assert addrs.lookup("127.0.0.1", 2222) == ONE
    assert addrs.lookup("127.0.0.2", 2222) == TWO  # the IP first
    assert addrs.canonical("ident-one") == ONE and addrs.canonical("ident-two") == TWO
    addrs.add(TWO, port=2222)  # replaced: ONE is no longer used
    assert addrs.canonical("ident-one") is None
    assert addrs.delete(port=2222) and not addrs.delete(port=2222)
    assert addrs.canonical("ident-two") == TWO  # still the IP's
    assert addrs.delete(ip="127.0.0.2") and addrs.canonical("ident-two") is None
    with pytest.raises(ValueError):
        addrs.add(ONE)


# -- store doubles and a listen_tcp that records ------------------------------------


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple] = []
        self.closed = False

    def put_host(self, entry):
        self.writes.append(("put_host", entry.host))
        return super().put_host(entry)

    def delete_host(self, host):
        self.writes.append(("delete_host", host))
        return super().delete_host(host)

    def put_port(self, entry):
        self.writes.append(("put_port", entry.port))
        return super().put_port(entry)

    def delete_port(self, port):
        self.writes.append(("delete_port", port))
        return super().delete_port(port)

    def close(self):
        self.closed = True
        return succeed(None)


class FailingStore(MemoryStore):
    """Loads what it was given; every write fails (a full disk, say)."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        super().__init__()
        self.snapshot = snapshot if snapshot is not None else Snapshot()

    def load(self):
        return succeed(self.snapshot)

    def put_host(self, entry):
        return fail(OSError("disk full"))

    delete_host = put_port = delete_port = put_host


class GatedStore(MemoryStore):
    """Each write waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[tuple[str, Deferred]] = []

    def _gated(self, what, d):
        gate = Deferred()
        self.gates.append((what, gate))
        return gate.addCallback(lambda _: d)

    def put_host(self, entry):
        return self._gated(f"{entry.host}={entry.key}", super().put_host(entry))


class FakePort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.listening = True

    def stopListening(self):
        self.listening = False
        return succeed(None)


class RecordingListen:
    """listen_tcp that opens nothing: it records, and refuses ``taken`` ports."""

    def __init__(self, taken=()) -> None:
        self.opened: list[FakePort] = []
        self.taken = set(taken)

    def __call__(self, port: int):
        if port in self.taken:
            return fail(CannotListenError("127.0.0.1", port, OSError(98, "Address in use")))
        listener = FakePort(port)
        self.opened.append(listener)
        return succeed(listener)

    def open_ports(self) -> list[int]:
        return sorted(p.port for p in self.opened if p.listening)


def make_routes(store=None, listen=None, **kwargs) -> tuple[Routes, TunnelServer]:
    server = TunnelServer(clock=Clock())
    routes = Routes(
        server, store if store is not None else MemoryStore(), listen_tcp=listen, **kwargs
    )
    result(routes.start())
    return routes, server


def served(server: TunnelServer) -> dict[str, tuple]:
    return {r.host: (r.key, r.rules) for r in server.vhosts.routes()}


# -- hosts ------------------------------------------------------------------------------


def test_put_host_stores_then_serves_and_replaces():
    store = CountingStore()
    routes, server = make_routes(store)
    assert result(routes.put_host("App.Test.", "ident-one")) is True
    assert served(server) == {"app.test": (ONE, None)}
    assert routes.host("APP.test") == HostEntry("app.test", ONE, {})
    assert result(store.load()).hosts == (HostEntry("app.test", ONE, {}),)
    rules = {"allow": ["127.0.0.0/8"]}
    assert result(routes.put_host("app.test", TWO, rules)) is False
    # default rules_of: the HostRules the web layer enforces
    assert served(server) == {"app.test": (TWO, HostRules.from_stored(rules))}
    assert routes.host("app.test").rules == rules
    assert result(routes.put_host("b.test", ONE)) is True
    assert [e.host for e in routes.hosts()] == ["app.test", "b.test"]
    assert server.canonical("ident-one") == ONE and server.canonical("ident-two") == TWO
    assert routes.host("nothing.test") is None


def test_rules_of_makes_what_the_route_carries():
    made = []

    def rules_of(stored):
        if stored.get("bad"):
            raise ValueError("bad rules")
        made.append(dict(stored))
        return ("checked", tuple(sorted(stored)))

    store = CountingStore()
    routes, server = make_routes(store, rules_of=rules_of)
    result(routes.put_host("app.test", ONE, {"rate": 5}))
    assert served(server) == {"app.test": (ONE, ("checked", ("rate",)))}
    with pytest.raises(ValueError, match="bad rules"):
        result(routes.put_host("app.test", TWO, {"bad": True}))
    assert served(server) == {"app.test": (ONE, ("checked", ("rate",)))}
    assert store.writes == [("put_host", "app.test")]  # the bad rules were never stored


@pytest.mark.parametrize("bad", ["", "a b", "app.test:http", "é.test"])
def test_a_malformed_host_is_refused_before_anything_is_stored(bad):
    store = CountingStore()
    routes, server = make_routes(store)
    for call in (
        lambda: routes.put_host(bad, ONE),
        lambda: routes.delete_host(bad),
    ):
        d = call()
        with pytest.raises(ValueError):
            result(d)
    with pytest.raises(ValueError):
        routes.host(bad)
    with pytest.raises(ValueError):
        result(routes.put_host("app.test", ""))  # an empty identifier
    assert store.writes == [] and len(server.vhosts) == 0


def test_delete_host():
    routes, server = make_routes()
    result(routes.put_host("app.test", ONE))
    assert result(routes.delete_host("App.Test")) is True
    assert result(routes.delete_host("app.test")) is False
    assert served(server) == {} and routes.hosts() == [] and routes.host("app.test") is None
    assert server.canonical("ident-one") is None  # its client would be refused now


def test_a_failed_write_changes_nothing():
    stored = Snapshot(hosts=(HostEntry("app.test", ONE, {}),), ports=(PortEntry(2222, ONE),))
    listen = RecordingListen()
    routes, server = make_routes(FailingStore(stored), listen)
    before = (served(server), routes.hosts(), routes.ports(), listen.open_ports())
    assert before[0] == {"app.test": (ONE, None)} and before[3] == [2222]
    for d in (
        routes.put_host("app.test", TWO),
        routes.put_host("new.test", TWO),
        routes.delete_host("app.test"),
        routes.put_port(2222, TWO),
        routes.put_port(3333, TWO),
        routes.delete_port(2222),
    ):
        with pytest.raises(OSError, match="disk full"):
            result(d)
    assert (served(server), routes.hosts(), routes.ports(), listen.open_ports()) == before
    assert server.addrs.lookup("127.0.0.1", 2222) == ONE
    assert server.addrs.lookup("127.0.0.1", 3333) is None
    # the listener opened for 3333 was closed when its write failed
    assert [p.port for p in listen.opened] == [2222, 3333]


def test_changes_are_made_in_order_one_at_a_time():
    store = GatedStore()
    routes, server = make_routes(store)
    first = routes.put_host("app.test", ONE)
    second = routes.put_host("app.test", TWO)
    assert [what for what, _ in store.gates] == [f"app.test={ONE}"]  # the second waits
    assert served(server) == {}  # nothing served before the store confirms
    store.gates[0][1].callback(None)
    assert result(first) is True and served(server) == {"app.test": (ONE, None)}
    assert [what for what, _ in store.gates] == [f"app.test={ONE}", f"app.test={TWO}"]
    store.gates[1][1].callback(None)
    assert result(second) is False and served(server) == {"app.test": (TWO, None)}


# -- ports -------------------------------------------------------------------------------


def test_put_port_opens_a_listener_once_and_delete_closes_it():
    listen = RecordingListen()
    store = CountingStore()
    routes, server = make_routes(store, listen)
    assert result(routes.put_port(2222, "ident-one")) is True
    assert listen.open_ports() == [2222]
    assert server.addrs.lookup("127.0.0.1", 2222) == ONE
    assert result(routes.put_port(2222, TWO)) is False  # replaced: same listener
    assert len(listen.opened) == 1 and server.addrs.lookup("127.0.0.1", 2222) == TWO
    assert routes.ports() == [PortEntry(2222, TWO)]
    assert result(routes.delete_port(2222)) is True
    assert listen.open_ports() == [] and server.addrs.lookup("127.0.0.1", 2222) is None
    assert result(routes.delete_port(2222)) is False
    assert routes.ports() == [] and result(store.load()).ports == ()


@pytest.mark.parametrize("bad", [0, -1, 65536, True, "2222", 22.0])
def test_a_port_must_be_a_port_number(bad):
    store = CountingStore()
    routes, _ = make_routes(store, RecordingListen())
    with pytest.raises(ValueError):
        result(routes.put_port(bad, ONE))
    with pytest.raises(ValueError):
        result(routes.delete_port(bad))
    assert store.writes == []


def test_a_port_that_cannot_be_bound_is_not_stored():
    store = CountingStore()
    routes, server = make_routes(store, RecordingListen(taken={2222}))
    with pytest.raises(CannotListenError):
        result(routes.put_port(2222, ONE))
    assert store.writes == [] and routes.ports() == []
    assert server.addrs.lookup("127.0.0.1", 2222) is None


def test_without_listen_tcp_ports_are_routed_only():
    routes, server = make_routes()
    assert result(routes.put_port(2222, ONE)) is True
    assert server.addrs.lookup("127.0.0.1", 2222) == ONE


# -- start, seed, stop ----------------------------------------------------------------


def test_start_loads_the_store_and_opens_its_ports_stop_closes_them():
    store = CountingStore()
    result(store.put_host(HostEntry("app.test", ONE, RATE_1)))
    result(store.put_port(PortEntry(2222, TWO)))
    store.writes.clear()
    listen = RecordingListen()
    routes, server = make_routes(store, listen)
    assert served(server) == {"app.test": (ONE, HostRules.from_stored(RATE_1))}
    assert server.addrs.lookup("127.0.0.1", 2222) == TWO and listen.open_ports() == [2222]
    assert routes.hosts() == [HostEntry("app.test", ONE, RATE_1)]
    assert store.writes == []  # loading writes nothing
    result(routes.stop())
    assert listen.open_ports() == [] and store.closed


def test_a_stored_host_whose_rules_do_not_load_is_left_out():
    store = MemoryStore()
    result(store.put_host(HostEntry("bad.test", ONE, {"bad": 1})))
    result(store.put_host(HostEntry("good.test", TWO, {})))

    def rules_of(stored):
        if "bad" in stored:
            raise ValueError("unknown rule")
        return None

    routes, server = make_routes(store, rules_of=rules_of)
    assert served(server) == {"good.test": (TWO, None)}
    assert [e.host for e in routes.hosts()] == ["good.test"]


def test_a_stored_port_taken_since_is_left_out_and_the_others_are_served():
    """A port added at run time and taken by another program since must not
    keep the server (and its admin API) down: it is logged and left out,
    stays stored, and a later put opens it again."""
    store = MemoryStore()
    for port in (2222, 3333, 4444):
        result(store.put_port(PortEntry(port, ONE)))
    listen = RecordingListen(taken={3333})
    routes = Routes(TunnelServer(clock=Clock()), store, listen_tcp=listen)
    events: list[dict] = []
    routes.log = Logger(observer=events.append)
    result(routes.start())
    lines = [formatEvent(e) for e in events]
    assert listen.open_ports() == [2222, 4444]
    assert [e.port for e in routes.ports()] == [2222, 4444]
    assert routes.server.addrs.lookup("127.0.0.1", 3333) is None
    assert [line for line in lines if "3333" in line] == [
        "stored TCP port 3333 left out: Couldn't listen on 127.0.0.1:3333: [Errno 98]"
        " Address in use."
    ]
    assert [e.port for e in result(store.load()).ports] == [2222, 3333, 4444]
    listen.taken.clear()
    assert result(routes.put_port(3333, ONE)) is False  # stored already: replaced
    assert listen.open_ports() == [2222, 3333, 4444]


def test_seed_is_idempotent_and_keeps_stored_rules():
    store = CountingStore()
    result(store.put_host(HostEntry("app.test", ONE, RATE_3)))
    store.writes.clear()
    listen = RecordingListen()
    routes, server = make_routes(store, listen)
    seed = ({"App.Test": "ident-one", "b.test": TWO}, {2222: "ident-one"})
    result(routes.seed(*seed))
    assert store.writes == [("put_host", "b.test"), ("put_port", 2222)]
    result(routes.seed(*seed))  # again: nothing to write
    assert len(store.writes) == 2 and len(listen.opened) == 1
    result(routes.seed({"app.test": TWO}, {2222: TWO}))  # another tunnel: replaced
    assert routes.host("app.test") == HostEntry("app.test", TWO, RATE_3)
    assert served(server)["app.test"] == (TWO, HostRules.from_stored(RATE_3))
    assert routes.ports() == [PortEntry(2222, TWO)] and len(listen.opened) == 1


def test_seeded_rules_replace_the_stored_ones_of_their_hosts_only():
    store = CountingStore()
    result(store.put_host(HostEntry("app.test", ONE, RATE_3)))
    result(store.put_host(HostEntry("b.test", ONE, RATE_3)))
    store.writes.clear()
    routes, server = make_routes(store)
    hosts = {"app.test": ONE, "b.test": ONE}
    result(routes.seed(hosts, {}, {"App.Test": RATE_1}))
    assert store.writes == [("put_host", "app.test")]
    assert served(server)["app.test"] == (ONE, HostRules.from_stored(RATE_1))
    assert served(server)["b.test"] == (ONE, HostRules.from_stored(RATE_3))
    result(routes.seed(hosts, {}, {"app.test": RATE_1}))  # the same again: nothing to write
    assert len(store.writes) == 1
    with pytest.raises(ValueError, match="not seeded: c.test"):
        result(routes.seed(hosts, {}, {"c.test": RATE_1}))


def test_stopped_routes_refuse_changes():
    store = CountingStore()
    listen = RecordingListen()
    routes, server = make_routes(store, listen)
    result(routes.put_host("app.test", ONE))
    pending = routes.stop()
    for d in (
        routes.put_host("b.test", ONE),
        routes.delete_host("app.test"),
        routes.put_port(2222, ONE),
        routes.delete_port(2222),
        routes.seed({"c.test": ONE}, {}),
        routes.start(),
    ):
        with pytest.raises(RoutesStopped):
            result(d)
    result(pending)
    assert store.writes == [("put_host", "app.test")] and listen.opened == []
    assert served(server) == {"app.test": (ONE, None)}  # what was served stays in memory


# -- real sockets ---------------------------------------------------------------------


async def _connects(port: int) -> bool:
    try:
        protocol = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
            Factory.forProtocol(Protocol)
        )
    except ConnectionRefusedError:
        return False
    protocol.transport.abortConnection()
    return True


@pytest_twisted.ensureDeferred
async def test_tcp_ports_listen_on_the_interface_and_a_taken_port_fails():
    server = TunnelServer()
    listen = TCPPorts(server, interface="127.0.0.1", backlog=7, reactor=reactor)
    listener = await listen(0)  # any free port: put_port takes 1..65535 only
    try:
        address = listener.getHost()
        assert address.host == "127.0.0.1" and address.port > 0
        assert listener.factory is listen.factory  # one TCPTunnelFactory for all ports
        with pytest.raises(CannotListenError):
            await listen(address.port)
    finally:
        await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_put_port_and_delete_port_open_and_close_a_real_listener():
    server = TunnelServer()
    listen = TCPPorts(server, interface="127.0.0.1", reactor=reactor)
    chosen: dict[int, int] = {}

    def listen_any(port: int):
        """The listener of ``port`` on a port the system chooses (no race for a free one)."""

        def opened(listener):
            chosen[port] = listener.getHost().port
            return listener

        return listen(0).addCallback(opened)

    routes = Routes(server, MemoryStore(), listen_tcp=listen_any)
    await routes.start()
    try:
        assert await routes.put_port(40000, ONE)
        real = chosen[40000]
        assert await _connects(real)
        assert await routes.delete_port(40000)
        assert not await _connects(real)
        assert await routes.put_port(40001, ONE)
        real = chosen[40001]
    finally:
        await routes.stop()
    assert not await _connects(real)


# -- end to end: what the public sees -------------------------------------------------


def test_changes_take_effect_for_new_requests_and_leave_open_ones_alone():
    with MemoryTunnel() as env:
        routes = Routes(env.server, MemoryStore())
        result(routes.start())
        result(routes.put_host("second.test", env.IDENT))
        response = env.get(b"/echo?echo=hi", host=b"second.test")
        assert (response.code, response.body) == (200, b"hi")
        waiting = env.connect()
        waiting.send(b"GET /delay?n=2 HTTP/1.1\r\nHost: second.test\r\n\r\n")
        env.flush()
        assert result(routes.delete_host("second.test")) is True
        response = env.get(b"/echo?echo=hi", host=b"second.test")
        assert response.code == 502
        assert response.body == b'no virtual host available for "second.test"\n'
        env.advance(2)
        assert waiting.received.startswith(b"HTTP/1.1 200 OK") and b"late" in waiting.received
        waiting.close()
        assert env.get(b"/echo?echo=hi").code == 200  # the other host is untouched
        result(routes.stop())


# -- a shared store's changes -------------------------------------------------------------


class SharedStore(MemoryStore):
    """A MemoryStore with a feed the test drives (what Redis gives Routes)."""

    def __init__(self) -> None:
        super().__init__()
        self.watching: list = []
        self.gate: Deferred | None = None

    def watch(self, since, on_change):
        entry = [since, on_change]
        self.watching.append(entry)
        return lambda: self.watching.remove(entry)

    def tell(self, change) -> None:
        for _, on_change in list(self.watching):
            on_change(change)

    def put_host(self, entry):
        d = super().put_host(entry)
        if self.gate is not None:
            gate, self.gate = self.gate, None
            return gate.addCallback(lambda _: d)
        return d


def test_routes_watch_a_shared_store_from_the_snapshot_they_loaded():
    store = SharedStore()
    result(store.put_host(HostEntry("app.test", ONE)))
    routes, _ = make_routes(store)
    ((since, _),) = store.watching
    assert since.hosts == (HostEntry("app.test", ONE),)
    result(routes.stop())
    assert store.watching == []  # unwatched when stopped


def test_changes_from_the_feed_are_applied_idempotently():
    store = SharedStore()
    listen = RecordingListen(taken={4444})
    routes, server = make_routes(store, listen)
    result(routes.put_host("app.test", ONE, RATE_1))
    route = server.vhosts.get("app.test")
    # its own change coming back changes nothing (the same route object)
    store.tell(HostChanged("app.test", HostEntry("app.test", ONE, RATE_1)))
    assert server.vhosts.get("app.test") is route
    # another node's changes
    store.tell(HostChanged("App.Test.", HostEntry("App.Test.", TWO, RATE_3)))
    assert served(server) == {"app.test": (TWO, HostRules.from_stored(RATE_3))}
    assert routes.host("app.test") == HostEntry("app.test", TWO, RATE_3)
    store.tell(HostChanged("b.test", HostEntry("b.test", ONE)))
    store.tell(HostChanged("app.test", None))
    store.tell(HostChanged("app.test", None))  # again: nothing
    assert served(server) == {"b.test": (ONE, None)}
    # rules this node cannot read: the host is not served without them
    store.tell(HostChanged("b.test", HostEntry("b.test", ONE, {"rate": "fast"})))
    assert served(server) == {} and routes.hosts() == []
    # ports: every node listens on every port
    store.tell(PortChanged(2222, PortEntry(2222, ONE)))
    store.tell(PortChanged(2222, PortEntry(2222, TWO)))
    assert listen.open_ports() == [2222] and server.addrs.lookup("127.0.0.1", 2222) == TWO
    store.tell(PortChanged(4444, PortEntry(4444, ONE)))  # taken here: logged, not routed
    assert server.addrs.lookup("127.0.0.1", 4444) is None and routes.ports() == [
        PortEntry(2222, TWO)
    ]
    store.tell(PortChanged(2222, None))
    assert listen.open_ports() == [] and server.addrs.lookup("127.0.0.1", 2222) is None
    result(routes.stop())
    store.tell(HostChanged("late.test", HostEntry("late.test", ONE)))
    assert served(server) == {}


def test_a_change_from_the_feed_waits_for_the_local_change_under_way():
    store = SharedStore()
    routes, server = make_routes(store)
    gate = store.gate = Deferred()
    local = routes.put_host("app.test", ONE)
    store.tell(HostChanged("app.test", HostEntry("app.test", TWO)))  # made after, elsewhere
    assert served(server) == {}  # both wait for the store
    gate.callback(None)
    assert result(local) is True
    assert served(server) == {"app.test": (TWO, None)}  # in the order they came


def test_a_resync_converges_to_the_snapshot_from_what_is_served_here():
    store = SharedStore()
    listen = RecordingListen(taken={4444})
    routes, server = make_routes(store, listen)
    # this node's own changes, which the feed never tells back while it is cut off
    result(routes.put_host("h.test", TWO))
    result(routes.put_host("mine.test", ONE))
    result(routes.put_port(2222, ONE))
    store.tell(PortChanged(4444, PortEntry(4444, ONE)))  # taken here: not carried
    assert routes.ports() == [PortEntry(2222, ONE)]
    # the store now holds h.test back on ONE, no mine.test, no 2222, and 4444
    listen.taken.clear()
    snapshot = Snapshot(
        (HostEntry("H.Test.", ONE), HostEntry("new.test", TWO, RATE_1)),
        (PortEntry(4444, ONE),),
        version=9,
    )
    store.tell(Resynced(snapshot))
    assert served(server) == {
        "h.test": (ONE, None),
        "new.test": (TWO, HostRules.from_stored(RATE_1)),
    }
    # the port it could not bind is retried, the one gone is closed
    assert listen.open_ports() == [4444] and routes.ports() == [PortEntry(4444, ONE)]
    assert server.addrs.lookup("127.0.0.1", 4444) == ONE
    assert server.addrs.lookup("127.0.0.1", 2222) is None
    # the same again changes nothing (the same route objects, a name stored
    # unnormalised included)
    routes_before = {h: server.vhosts.get(h) for h in ("h.test", "new.test")}
    store.tell(Resynced(snapshot))
    assert {h: server.vhosts.get(h) for h in ("h.test", "new.test")} == routes_before
    assert all(server.vhosts.get(h) is r for h, r in routes_before.items())
    assert listen.open_ports() == [4444]
    result(routes.stop())


def test_a_resync_retries_rules_this_node_could_not_read():
    store = SharedStore()
    failures = [ValueError("not yet")]

    def rules_of(stored):
        if failures:
            raise failures.pop()
        return HostRules.from_stored(stored) if stored else None

    routes, server = make_routes(store, rules_of=rules_of)
    store.tell(HostChanged("r.test", HostEntry("r.test", ONE, RATE_1)))
    assert served(server) == {}
    store.tell(Resynced(Snapshot((HostEntry("r.test", ONE, RATE_1),), version=3)))
    assert served(server) == {"r.test": (ONE, HostRules.from_stored(RATE_1))}
    result(routes.stop())


def test_a_resync_to_an_empty_registry_empties_this_node_loudly():
    store = SharedStore()
    listen = RecordingListen()
    routes, server = make_routes(store, listen)
    result(routes.put_host("a.test", ONE))
    result(routes.put_port(2222, ONE))
    with capturedLogs() as events:
        store.tell(Resynced(Snapshot(version=0)))
    assert served(server) == {} and listen.open_ports() == [] and routes.ports() == []
    warned = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
    assert len(warned) == 1 and "the shared registry is empty" in warned[0]
    assert "1 hosts and 1 TCP ports" in warned[0]
    with capturedLogs() as events:
        store.tell(Resynced(Snapshot(version=0)))  # nothing served: nothing to say
    assert not [e for e in events if e["log_level"] is LogLevel.warn]
    result(routes.stop())
