"""TunnelServerService: what an embedding program gets from tunnel.server."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from tunnel import TunnelResource, TunnelServer, TunnelServerService, TunnelSite
from tunnel.koding.identifiers import TunnelKey
from tunnel.server import Routes
from tunnel.server.store import MemoryStore

from .live import http_client
from .processes import reap_all, spawn_twistd
from .tunnel_env import TunnelEnv, until


class _RecordingEndpoint:
    """A server endpoint that remembers the port it listened on."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.port = None

    def listen(self, factory):
        def record(port):
            self.port = port
            return port

        return self.inner.listen(factory).addCallback(record)


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_drains_tunnels_then_stops_listening():
    env = await TunnelEnv().start()
    http = http_client()
    service = TunnelServerService(env.server, grace=5.0)
    endpoint = _RecordingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    service.listen(endpoint, TunnelSite(TunnelResource(env.server)))
    try:
        service.startService()
        await until(lambda: endpoint.port is not None)
        port = endpoint.port.getHost().port
        url = f"http://127.0.0.1:{port}/delay?n=0.3"
        in_flight = http.get(url, headers={"Host": env.HOST}).addCallback(
            lambda r: treq.content(r).addCallback(lambda body: (r.code, body))
        )
        connection = env.server.connection(env.IDENT)
        await until(lambda: len(connection.session.streams) == 2)  # control + this request
        stopped = service.stopService()
        assert not env.server.accepting
        assert endpoint.port.connected  # still listening while tunnels drain
        assert await in_flight == (200, b"late")
        await stopped
        assert not service.running
        assert env.server.connection(env.IDENT) is None
        try:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                Factory.forProtocol(Protocol)
            )
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("the listener is still open after stopService")
    finally:
        if service.running:
            await service.stopService()
        await env.stop()


@pytest.mark.parametrize("which", ["--listen", "--tcp"])
@pytest_twisted.ensureDeferred
async def test_twistd_exits_when_its_port_is_taken(which):
    """A listener that cannot bind (a --listen port, or a --tcp port the
    routes open at start) ends twistd with the error, not a deaf server."""
    taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    port = taken.getHost().port
    if which == "--listen":
        argv = [f"--listen=tcp:{port}:interface=127.0.0.1"]
    else:
        argv = ["--listen=tcp:0:interface=127.0.0.1", "--tcp-interface=127.0.0.1"]
        argv.append(f"--tcp={port}=some-identifier-2")
    server = spawn_twistd("tunnel-server", *argv, "--vhost=app.localhost=some-identifier-1")
    try:
        await server.ended()
        assert not server.running
        assert server.reason.exitCode != 0, server.log
        assert "Address already in use" in server.log
        assert "some-identifier-1" not in server.log
        assert "some-identifier-2" not in server.log
    finally:
        await reap_all([server])
        await taken.stopListening()


# -- routes before listeners -------------------------------------------------------------


class FakeEndpoint:
    """A server endpoint that records when it is asked to listen."""

    def __init__(self, log: list) -> None:
        self.log = log

    def listen(self, factory):
        self.log.append("listen")
        return succeed(FakePort(self.log))


class FakePort:
    def __init__(self, log: list) -> None:
        self.log = log

    def stopListening(self):
        self.log.append("stop listening")
        return succeed(None)


class LoggingStore(MemoryStore):
    """A MemoryStore whose load waits for ``loaded`` (if given), and that logs."""

    def __init__(self, log: list, loaded: Deferred | None = None) -> None:
        super().__init__()
        self.log = log
        self.loaded = loaded

    def load(self):
        self.log.append("load")
        if self.loaded is None:
            return super().load()
        return self.loaded.addCallback(lambda _: super(LoggingStore, self).load())

    def close(self):
        self.log.append("store closed")
        return succeed(None)


def service_with(log: list, loaded: Deferred | None = None, taken=()):
    server = TunnelServer(clock=Clock())

    def listen_tcp(port: int):
        if port in taken:
            return fail(CannotListenError("127.0.0.1", port, OSError(98, "Address in use")))
        log.append(f"tcp {port}")
        return succeed(FakePort(log))

    routes = Routes(server, LoggingStore(log, loaded), listen_tcp=listen_tcp)
    service = TunnelServerService(
        server,
        grace=1.0,
        routes=routes,
        seed_hosts={"app.test": "ident"},
        seed_ports={2222: "ident"},
    )
    service.listen(FakeEndpoint(log), Factory.forProtocol(Protocol))
    return service, server


def test_twistd_order_routes_load_and_seed_before_the_listeners_start():
    log: list = []
    service, server = service_with(log)
    service.privilegedStartService()  # twistd's first call: ports bind here
    assert log == ["load", "tcp 2222", "listen"]
    assert server.vhosts.get("app.test").key == TunnelKey.of("ident")
    service.startService()
    assert service.running and log == ["load", "tcp 2222", "listen"]
    service.stopService()
    assert log[3:] == ["stop listening", "stop listening", "store closed"]
    assert not service.running


def test_an_embedding_program_may_call_start_service_alone():
    log: list = []
    service, server = service_with(log)
    service.startService()
    assert log == ["load", "tcp 2222", "listen"] and service.running
    service.stopService()
    assert log[-1] == "store closed"


def test_a_seeded_port_that_cannot_be_bound_raises_from_the_start():
    log: list = []
    service, server = service_with(log, taken={2222})
    with pytest.raises(CannotListenError):
        service.privilegedStartService()
    assert "listen" not in log  # no public listener was started
    assert log[-1] == "store closed"


def test_routes_that_load_late_start_the_listeners_when_loaded():
    log: list = []
    loaded: Deferred = Deferred()
    service, server = service_with(log, loaded)
    service.privilegedStartService()
    service.startService()
    assert log == ["load"]  # nothing listens while the routes load
    loaded.callback(None)
    assert log == ["load", "tcp 2222", "listen"]
    assert server.vhosts.get("app.test") is not None
    service.stopService()
    assert log[-1] == "store closed"


def test_routes_that_fail_late_stop_the_server_with_the_error():
    log: list = []
    loaded: Deferred = Deferred()
    service, server = service_with(log, loaded)
    fatal: list = []
    service.fatal = fatal.append
    service.privilegedStartService()
    service.startService()
    with capturedLogs() as events:
        loaded.errback(OSError("database is locked"))
    assert [f.value.args for f in fatal] == [("database is locked",)]
    assert "listen" not in log and log[-1] == "store closed"
    assert any(
        "cannot start: database is locked" in formatEvent(e) and e["log_level"] == LogLevel.critical
        for e in events
    )


def test_stopping_while_the_routes_load_starts_no_listener():
    log: list = []
    loaded: Deferred = Deferred()
    service, server = service_with(log, loaded)
    service.startService()
    stopped = service.stopService()
    loaded.callback(None)
    assert "listen" not in log and log[-1] == "store closed"
    assert stopped.called and not service.running


def test_a_listener_that_fails_late_stops_the_server_and_stop_closes_the_rest():
    log: list = []
    loaded: Deferred = Deferred()
    service, server = service_with(log, loaded)

    class Taken:
        def listen(self, factory):
            log.append("listen taken")
            return fail(CannotListenError("127.0.0.1", 80, OSError(98, "Address in use")))

    service.listen(Taken(), Factory.forProtocol(Protocol))  # after the one that binds
    fatal: list = []
    service.fatal = fatal.append
    service.startService()
    loaded.callback(None)
    assert [f.type for f in fatal] == [CannotListenError]
    assert log == ["load", "tcp 2222", "listen", "listen taken", "stop listening", "store closed"]
    stopped = service.stopService()
    assert stopped.called and not service.running
    # the listener that did start is closed; the routes are not closed twice
    assert log[6:] == ["stop listening"]
