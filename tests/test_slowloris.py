"""Slow clients on the public port and the control path are dropped; others
are unaffected."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tunnel.server import TunnelResource, TunnelServer
from tunnel.server.site import TunnelSite

from .tunnel_env import TunnelEnv


class Trickle(Protocol):
    def __init__(self):
        self.lost = defer.Deferred()
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


def channel_on(site, clock):
    channel = site.buildProtocol(None)
    channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_head_trickled_forever_is_dropped_at_the_deadline():
    clock = Clock()
    server = TunnelServer(clock=clock)
    site = TunnelSite(TunnelResource(server), head_timeout=5, idle_timeout=60, reactor=clock)
    channel, transport = channel_on(site, clock)
    # one byte a second: the idle timer is reset every time, the deadline is not
    for i, byte in enumerate(b"GET / HTTP/1.1\r\nHost: slow"):
        clock.advance(1 if i else 0)
        if transport.disconnecting or getattr(transport, "aborted", False):
            break
        channel.dataReceived(bytes([byte]))
    assert clock.seconds() <= 6
    assert getattr(transport, "disconnected", False) or transport.disconnecting
    channel.connectionLost(None)
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_a_complete_head_disarms_the_deadline_and_keep_alive_rearms_it():
    clock = Clock()
    server = TunnelServer(clock=clock)
    site = TunnelSite(TunnelResource(server), head_timeout=5, idle_timeout=60, reactor=clock)
    channel, transport = channel_on(site, clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: nosuch.test\r\n\r\n")
    assert b"502 Bad Gateway" in transport.value()  # answered (no such vhost)
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)  # the next head was due 5 s after the response
    assert getattr(transport, "disconnected", False) or transport.disconnecting
    channel.connectionLost(None)


@pytest_twisted.ensureDeferred
async def test_slowloris_on_real_sockets_leaves_other_clients_alone():
    env = TunnelEnv()
    await env.start()
    server = env.server
    slow_site = TunnelSite(TunnelResource(server), head_timeout=0.5, idle_timeout=30)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(slow_site)
    env.ports.append(port)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    try:
        slow = await connectProtocol(endpoint, Trickle())
        control = await connectProtocol(endpoint, Trickle())
        control.transport.write(b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: x\r\n")  # no end
        started = reactor.seconds()
        stop = False

        async def trickle():
            for byte in b"GET /echo?echo=x HTTP/1.1\r\nHost: app.localhost\r\nX-Pad: ":
                if stop:
                    return
                slow.transport.write(bytes([byte]))
                await task.deferLater(reactor, 0.05, lambda: None)

        trickling = defer.ensureDeferred(trickle())
        # a normal client is served meanwhile
        fast = await connectProtocol(endpoint, Trickle())
        fast.transport.write(
            b"GET /echo?echo=fast HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n"
        )
        await fast.lost
        assert fast.buf.startswith(b"HTTP/1.1 200 OK") and fast.buf.endswith(b"fast")
        await slow.lost
        await control.lost
        elapsed = reactor.seconds() - started
        stop = True
        await trickling
        assert 0.4 <= elapsed < 5
        assert slow.buf == b"" and control.buf == b""
    finally:
        await env.stop()
