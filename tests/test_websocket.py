"""WebSocket through the tunnel, with Twisted's own WebSocket client and server."""

from __future__ import annotations

import hashlib
import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.websocket import WebSocketClientEndpoint, WebSocketResource
from zope.interface import implementer

from .tunnel_env import TunnelEnv, raw_exchange

MiB = 1024 * 1024


class EchoWS:
    """Server side: echoes every message."""

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def textMessageReceived(self, message):
        self.transport.sendTextMessage(message)

    def bytesMessageReceived(self, data):
        self.transport.sendBytesMessage(bytes(data))

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        pass


class Collector:
    """Client side: records what comes back."""

    def __init__(self):
        self.messages = []
        self.waiting: defer.Deferred | None = None
        self.expect = 0
        self.lost = defer.Deferred()

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def _got(self, message):
        self.messages.append(message)
        if self.waiting is not None and len(self.messages) >= self.expect:
            d, self.waiting = self.waiting, None
            d.callback(None)

    def textMessageReceived(self, message):
        self._got(message)

    def bytesMessageReceived(self, data):
        self._got(bytes(data))

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        self.lost.callback(reason.value)

    def wait_for(self, n):
        if len(self.messages) >= n:
            return defer.succeed(None)
        self.expect = n
        self.waiting = defer.Deferred()
        return self.waiting


class Factory:
    def __init__(self, make):
        self.make = make

    def buildProtocol(self, _):
        return self.make()


@implementer(IAgentEndpointFactory)
class ToPort:
    def __init__(self, port):
        self.port = port

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)


def with_ws(env: TunnelEnv) -> None:
    env.origin.isLeaf = False
    env.origin.putChild(b"ws", WebSocketResource(Factory(EchoWS)))


class Plain(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"plain page"


async def ws_connect(env, path="/ws", host=TunnelEnv.HOST):
    port = env.public_port.getHost().port
    endpoint = WebSocketClientEndpoint(ToPort(port), f"ws://{host}:{port}{path}")
    collector = Collector()
    await endpoint.connect(Factory(lambda: collector))
    return collector


@pytest.fixture
def origin_with_ws(monkeypatch):
    """TunnelEnv whose origin serves a WebSocket echo at /ws."""
    from . import tunnel_env

    class WSOrigin(tunnel_env.Origin):
        isLeaf = False

        def __init__(self):
            super().__init__()
            self.putChild(b"ws", WebSocketResource(Factory(EchoWS)))
            self.putChild(b"plain", Plain())

        def getChild(self, path, request):
            return self

    monkeypatch.setattr(tunnel_env, "Origin", WSOrigin)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thousand_messages_of_mixed_sizes_echo_then_close(origin_with_ws):
    env = await TunnelEnv().start()
    rng = random.Random(11)
    try:
        client = await ws_connect(env)
        sent = []
        for i in range(1000):
            # frame-length boundaries, and every 50th message up to 1 MiB
            # (wsproto masks in pure Python, so big ones are kept few)
            size = rng.choice([0, 1, 125, 126, 127, 4096, 65535, 65536])
            if i % 50 == 7:
                size = MiB if i == 7 else rng.randrange(MiB)
            if i % 3 == 0:
                message = f"t{i}-" + "x" * size
                client.transport.sendTextMessage(message)
            else:
                message = rng.randbytes(size)
                client.transport.sendBytesMessage(message)
            sent.append(message)
            if i % 50 == 49:
                await client.wait_for(i + 1)  # keep memory bounded
        await client.wait_for(1000)
        assert len(client.messages) == 1000
        for got, want in zip(client.messages, sent, strict=True):
            assert type(got) is type(want)
            assert hashlib.sha256(got if isinstance(got, bytes) else got.encode()).digest() == (
                hashlib.sha256(want if isinstance(want, bytes) else want.encode()).digest()
            )
        client.transport.loseConnection(1000)
        reason = await client.lost
        assert isinstance(reason, ConnectionDone)  # the close handshake completed
        connection = env.server.connection(env.IDENT)
        # the stream went away with the WebSocket: only the control stream is left
        await until_streams(connection, 1)
    finally:
        await env.stop()


async def until_streams(connection, n):
    from .tunnel_env import until

    await until(lambda: len(connection.session.streams) == n)


@pytest_twisted.ensureDeferred
async def test_refused_upgrade_is_an_ordinary_response(origin_with_ws):
    """No 101: the origin's answer comes back as HTTP; nothing is piped raw."""
    env = await TunnelEnv().start()
    try:
        proto, whole = await raw_exchange(
            env,
            b"GET /plain HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            # a second request: it must be parsed by the server, not piped raw
            b"GET /headers HTTP/1.1\r\nHost: app.localhost\r\n\r\n",
            until=lambda buf: buf.count(b"HTTP/1.1 200 OK") == 2 and buf.endswith(b"}"),
        )
        first, second = whole.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert first.endswith(b"\r\n\r\nplain page")
        assert b"upgrade" not in first.lower()
        # forwarded as its own request, through the proxy (headers added)
        assert b'"x-forwarded-for": "127.0.0.1"' in second
        proto.transport.loseConnection()
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upgrade_without_a_connected_client_gets_502(origin_with_ws):
    env = await TunnelEnv().start(connect=False)
    try:
        proto, whole = await raw_exchange(
            env,
            b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            until=lambda buf: buf.endswith(b"established\n"),
        )
        assert whole.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert whole.endswith(b"\r\n\r\nno client session established\n")
        proto.transport.loseConnection()
    finally:
        await env.stop()
