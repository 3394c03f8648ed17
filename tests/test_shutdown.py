"""Graceful shutdown: in-flight requests finish, new work is refused."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tunnel.koding.states import ClientState

from .tunnel_env import TunnelEnv, until


def client():
    return treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))


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
    http = client()
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
    http = client()
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
    http = client()
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
