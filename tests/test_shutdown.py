"""Graceful shutdown: in-flight requests finish, new work is refused."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from tunnel.client import TunnelClientService
from tunnel.koding.states import ClientState

from .live import http_client
from .tunnel_env import TunnelEnv, until


async def fetch(http, env, path):
    response = await http.get(env.url + path, headers={"Host": env.HOST})
    return response.code, await response.content()


async def start_in_flight(http, env, path):
    """Start a slow request; return it once its tunnel stream is open."""
    in_flight = defer.ensureDeferred(fetch(http, env, path))
    connection = env.server.connection(env.IDENT)
    await until(lambda: len(connection.session.streams) == 2)  # control + this one
    return in_flight, connection


@pytest_twisted.ensureDeferred
async def test_server_stop_lets_in_flight_requests_finish():
    env = await TunnelEnv().start()
    http = http_client()
    try:
        in_flight, connection = await start_in_flight(http, env, "/delay?n=0.4")
        started = reactor.seconds()
        stopped = env.server.stop(grace=5.0)
        assert connection.session.local_go_away
        assert await in_flight == (200, b"late")
        await stopped
        assert reactor.seconds() - started >= 0.3  # it waited for the request
        assert env.server.connection(env.IDENT) is None
        # the client is refused while the server is stopping (503), and retries
        await until(lambda: "503" in str(env.client.last_error))
        assert env.client.state in (ClientState.CONNECTING, ClientState.DISCONNECTED)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_server_stop_gives_up_waiting_after_the_grace_period():
    env = await TunnelEnv().start()
    http = http_client()
    try:
        in_flight, connection = await start_in_flight(http, env, "/delay?n=30")
        started = reactor.seconds()
        await env.server.stop(grace=0.3)
        assert 0.25 <= reactor.seconds() - started < 5
        code, _ = await in_flight
        assert code == 502  # cut off: a clear error, not a hang
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_client_stop_finishes_in_flight_and_refuses_new_tunnels():
    env = await TunnelEnv().start()
    http = http_client()
    try:
        in_flight, connection = await start_in_flight(http, env, "/delay?n=0.4")
        stopping = env.client.stopService()
        await until(lambda: connection.session.remote_go_away == 0)
        # a new request while the client drains is refused at once
        code, body = await fetch(http, env, "/echo?echo=new")
        assert code == 502
        assert await in_flight == (200, b"late")
        await stopping
        assert env.client.state == ClientState.CLOSED
        await until(lambda: env.server.connection(env.IDENT) is None)
    finally:
        await env.stop()


class Silent(Protocol):
    """A "server" that accepts the connection and never answers the CONNECT."""

    def connectionMade(self):
        self.factory.live.append(self)

    def connectionLost(self, reason):
        self.factory.live.remove(self)


@pytest_twisted.ensureDeferred
async def test_client_stop_during_the_handshake_closes_the_connection():
    """The attempt is in its handshake (ClientService's prepareConnection):
    stopping aborts the connection, waits until it is gone and does not retry."""
    env = await TunnelEnv().start(connect=False)
    factory = Factory.forProtocol(Silent)
    factory.live = []
    port = (await env.listen(factory)).getHost().port
    client = TunnelClientService(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        env.IDENT,
        lambda stream, message: stream.abortConnection(),
        host=f"127.0.0.1:{port}",
    )
    states = []
    client.observe_states(lambda change: states.append(change.current))
    ready = client.when_ready()
    try:
        client.startService()
        await until(lambda: len(factory.live) == 1 and client.protocol is not None)
        assert client.protocol.transport is not None
        await client.stopService()
        assert client.protocol.transport.disconnected
        assert states == [ClientState.STARTED, ClientState.CONNECTING, ClientState.CLOSED]
        with pytest.raises(defer.CancelledError):
            await ready
        await until(lambda: not factory.live)  # the server saw it go
    finally:
        await env.stop()
