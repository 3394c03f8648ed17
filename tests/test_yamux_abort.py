"""An abort on one end of a spliced stream reaches the other end as an abort.

A truncated transfer must never look like a complete one: when one TCP end
of a splice is reset, the yamux stream is reset (RST, not FIN) and the far
TCP end is reset too.  Checked on two yamux sessions joined by SpliceProtocols
over loopback TCP, then through a real TCP tunnel (TunnelServer + client).
Every wait is on a Deferred; ``bounded`` only keeps a broken run from hanging.
"""

from __future__ import annotations

import socket
import struct

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol

from tunnel import (
    LocalForwarder,
    LocalTargets,
    TunnelClientService,
    TunnelResource,
    TunnelServer,
    TunnelSite,
)
from tunnel.splice import SpliceProtocol
from tunnel.yamux import YamuxConfig, YamuxSession
from tunnel.yamux.frame import FLAG_ACK, FLAG_RST, TYPE_WINDOW_UPDATE

from .helpers import Wire, frame
from .loopback import SessionPair

IDENT = "abort-test-identifier"


def bounded(d: defer.Deferred, seconds: float = 10.0) -> defer.Deferred:
    """A safety net against hangs, not a synchronisation."""
    return d.addTimeout(seconds, reactor)


def reset_now(transport) -> None:
    """Abort a TCP connection with an RST (SO_LINGER 0), as a crashing peer would."""
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


class End(Protocol):
    """A public client or an origin: records data and how the connection ended."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.data = b""
        self.got_data: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.got_data.called:
            self.got_data.callback(data)

    def connectionLost(self, reason) -> None:
        self.lost.callback(reason.value)


async def listen(factory, ports: list):
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    ports.append(port)
    return port.getHost().port


def connect(port: int, protocol: Protocol) -> defer.Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)


# -- two yamux sessions, a splice at each end ------------------------------------


class SplicedPair:
    """public TCP <-splice-> stream ~yamux over TCP~ stream <-splice-> origin TCP."""

    async def start(self) -> SplicedPair:
        self.ports: list = []
        self.origin = End(greeting=b"origin here")
        origin_port = await listen(Factory.forProtocol(lambda: self.origin), self.ports)
        self.pair = await SessionPair().start()
        self.pair.server.set_stream_handler(lambda stream: self._to_origin(stream, origin_port))
        client = self.pair.client
        self.public_port = await listen(Factory.forProtocol(lambda: _Public(client)), self.ports)
        return self

    def _to_origin(self, stream, origin_port: int) -> None:
        local = SpliceProtocol()

        def connected(_):
            remote = SpliceProtocol()
            stream.attach(remote)
            remote.join(local)

        connect(origin_port, local).addCallback(connected)

    async def stop(self) -> None:
        await self.pair.stop()
        for port in self.ports:
            await port.stopListening()


class _Public(SpliceProtocol):
    """Opens a stream for each public connection and splices the two."""

    def __init__(self, session: YamuxSession) -> None:
        super().__init__()
        self.session = session

    def connectionMade(self) -> None:
        super().connectionMade()
        stream = self.session.open_stream()
        remote = SpliceProtocol()
        stream.attach(remote)
        self.join(remote)


@pytest_twisted.ensureDeferred
async def test_splice_public_reset_reaches_the_origin_as_a_reset():
    spliced = await SplicedPair().start()
    try:
        public = await connect(spliced.public_port, End())
        public.transport.write(b"hello")
        await bounded(spliced.origin.got_data)
        reset_now(public.transport)
        reason = await bounded(spliced.origin.lost)
        assert not isinstance(reason, ConnectionDone), reason
        await bounded(public.lost)
    finally:
        await spliced.stop()


@pytest_twisted.ensureDeferred
async def test_splice_origin_reset_reaches_the_public_client_as_a_reset():
    spliced = await SplicedPair().start()
    try:
        public = await connect(spliced.public_port, End())
        assert await bounded(public.got_data) == b"origin here"
        reset_now(spliced.origin.transport)
        reason = await bounded(public.lost)
        assert not isinstance(reason, ConnectionDone), reason
        await bounded(spliced.origin.lost)
    finally:
        await spliced.stop()


# -- a real TCP tunnel -------------------------------------------------------------


class TCPTunnel:
    """Origin, TunnelServer (with a public TCP port) and TunnelClientService on 127.0.0.1."""

    async def start(self) -> TCPTunnel:
        self.ports: list = []
        self.origins: list[End] = []
        origin_port = await listen(
            Factory.forProtocol(lambda: self._origin(End(greeting=b"origin here"))), self.ports
        )
        self.server = TunnelServer()
        self.server.add_host("app.localhost", IDENT)
        control_port = await listen(TunnelSite(TunnelResource(self.server)), self.ports)
        self.public_port = await listen(self.server.tcp_factory(), self.ports)
        self.server.add_addr(IDENT, port=self.public_port)
        targets = LocalTargets(
            reactor, tcp_ports={self.public_port: f"tcp:127.0.0.1:{origin_port}"}
        )
        self.client = TunnelClientService(
            TCP4ClientEndpoint(reactor, "127.0.0.1", control_port),
            IDENT,
            LocalForwarder(targets.endpoint_for),
            host=f"127.0.0.1:{control_port}",
        )
        self.client.startService()
        await bounded(self.client.when_ready())
        return self

    def _origin(self, origin: End) -> End:
        self.origins.append(origin)
        return origin

    async def stop(self) -> None:
        await self.client.stopService()
        await self.server.stop(grace=1.0)
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tunnel_public_reset_reaches_the_origin_as_a_reset():
    tunnel = await TCPTunnel().start()
    try:
        public = await connect(tunnel.public_port, End())
        assert await bounded(public.got_data) == b"origin here"  # spliced end to end
        public.transport.write(b"hello")
        [origin] = tunnel.origins
        await bounded(origin.got_data)
        reset_now(public.transport)
        reason = await bounded(origin.lost)
        assert not isinstance(reason, ConnectionDone), reason
        await bounded(public.lost)
    finally:
        await tunnel.stop()


@pytest_twisted.ensureDeferred
async def test_tunnel_origin_reset_reaches_the_public_client_as_a_reset():
    tunnel = await TCPTunnel().start()
    try:
        public = await connect(tunnel.public_port, End())
        assert await bounded(public.got_data) == b"origin here"
        [origin] = tunnel.origins
        reset_now(origin.transport)
        reason = await bounded(public.lost)
        assert not isinstance(reason, ConnectionDone), reason
        await bounded(origin.lost)
    finally:
        await tunnel.stop()


# -- the stream alone --------------------------------------------------------------


def test_stop_producing_resets_the_stream():
    """The consumer a stream produces for is gone: RST, and the protocol sees an abort."""
    w = Wire(True, config=YamuxConfig(enable_keepalive=False))
    stream = w.session.open_stream()
    lost = []
    protocol = Protocol()
    protocol.connectionLost = lost.append
    stream.attach(protocol)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, stream.id, 0))
    w.sent()
    stream.stopProducing()
    assert [(h.type, h.flags, h.stream_id) for h, _ in w.sent()] == [
        (TYPE_WINDOW_UPDATE, FLAG_RST, stream.id)
    ]
    [reason] = lost
    assert reason.check(ConnectionAborted)
    assert w.session.streams == {}
    w.lose()
