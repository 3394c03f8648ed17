"""TunnelServerService: what an embedding program gets from tunnel.server."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol

from tunnel import TunnelResource, TunnelServerService, TunnelSite

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


@pytest_twisted.ensureDeferred
async def test_twistd_exits_when_its_port_is_taken():
    """A listener that cannot bind ends twistd with the error, not a deaf server."""
    taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    port = taken.getHost().port
    server = spawn_twistd(
        "tunnel-server",
        f"--listen=tcp:{port}:interface=127.0.0.1",
        "--vhost=app.localhost=some-identifier-1",
    )
    try:
        await server.ended()
        assert not server.running
        assert server.reason.exitCode != 0, server.log
        assert "Address already in use" in server.log
        assert "some-identifier-1" not in server.log
    finally:
        await reap_all([server])
        await taken.stopListening()
