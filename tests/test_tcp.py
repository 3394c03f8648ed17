"""TCP tunnels end to end on 127.0.0.1: routing by local port, half-close,
concurrency and a big transfer."""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol

from .loopback import BoundedEcho, Sender
from .tunnel_env import TunnelEnv, until

MiB = 1024 * 1024
BLOCK = random.Random(9).randbytes(4 * MiB)


async def tcp_env():
    env = TunnelEnv()
    await env.start(connect=False)
    echo = await env.listen(Factory.forProtocol(BoundedEcho))
    public = await env.listen(env.server.tcp_factory())
    env.server.add_addr(env.IDENT, port=public.getHost().port)
    env.client = env.make_client(
        tcp={public.getHost().port: f"tcp:127.0.0.1:{echo.getHost().port}"}
    )
    env.client.startService()
    await env.client.when_ready()
    env.tcp_port = public.getHost().port
    return env


async def send_through(env, size: int, offset: int = 0):
    sender = Sender(BLOCK, offset, size)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", env.tcp_port)
    await connectProtocol(endpoint, sender)
    received, digest, reason = await sender.finished
    return received, digest, sender.sent.result, reason


@pytest_twisted.ensureDeferred
async def test_hundred_concurrent_echo_connections_with_half_close():
    env = await tcp_env()
    rng = random.Random(3)
    try:
        sizes = [rng.randrange(0, 300_000) for _ in range(100)]
        results = await defer.gatherResults(
            [defer.ensureDeferred(send_through(env, n, i * 7919)) for i, n in enumerate(sizes)]
        )
        for size, (received, digest, sent, reason) in zip(sizes, results, strict=True):
            assert received == size and digest == sent
            assert reason.check(ConnectionDone)  # EOF came back: half-close passed through
        connection = env.server.connection(env.IDENT)
        await until(lambda: len(connection.session.streams) == 1)
    finally:
        await env.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_64_mib_transfer_sha256():
    env = await tcp_env()
    try:
        received, digest, sent, reason = await send_through(env, 64 * MiB)
        assert received == 64 * MiB and digest == sent
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_mapping_changes_at_run_time_leave_open_connections_alone():
    env = await tcp_env()
    lost = defer.Deferred()

    class Chat(Protocol):
        def __init__(self):
            self.buf = b""
            self.got = None

        def dataReceived(self, data):
            self.buf += data
            if self.got is not None and len(self.buf) >= self.want:
                d, self.got = self.got, None
                d.callback(self.buf)

        def say(self, data):
            self.buf = b""
            self.want = len(data)
            self.got = defer.Deferred()
            self.transport.write(data)
            return self.got

        def connectionLost(self, reason):
            if not lost.called:
                lost.callback(reason.value)

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", env.tcp_port)
    try:
        open_one = await connectProtocol(endpoint, Chat())
        assert await open_one.say(b"before") == b"before"
        env.server.delete_addr(port=env.tcp_port)
        refused = Chat()
        refused_lost = defer.Deferred()
        refused.connectionLost = lambda reason: refused_lost.callback(reason.value)
        await connectProtocol(endpoint, refused)
        reason = await refused_lost
        assert not isinstance(reason, ConnectionDone)  # aborted: no tunnel for this port
        assert await open_one.say(b"still works") == b"still works"
        env.server.add_addr(env.IDENT, port=env.tcp_port)
        again = await connectProtocol(endpoint, Chat())
        assert await again.say(b"back") == b"back"
        again.transport.loseConnection()
        open_one.transport.loseConnection()
        await lost
    finally:
        await env.stop()
