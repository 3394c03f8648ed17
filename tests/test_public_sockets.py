"""The public side's refusals over real TCP (issue 8, item 7): a client still
sending megabytes of head when it is refused gets the whole answer, not a
reset.  The in-memory tests (test_public_framing.py) cover the rest."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from tunnel.server import TunnelResource, TunnelServer
from tunnel.server.site import TunnelSite

from .live import until
from .tunnel_env import RawClient

REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
    b"Content-Length: 29\r\nConnection: close\r\n\r\nrequest header line too long\n"
)


@pytest_twisted.ensureDeferred
async def test_a_431_reaches_a_client_that_is_still_sending_its_head():
    server = TunnelServer()
    site = TunnelSite(TunnelResource(server))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    channels = []
    build = site.buildProtocol
    site.buildProtocol = lambda addr: channels.append(build(addr)) or channels[-1]
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, RawClient(until=lambda b: b == REFUSAL))
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (4 * 1024 * 1024))
        assert await client.done == REFUSAL
        client.transport.loseConnection()
        (channel,) = channels
        await until(lambda: channel.transport.disconnected, what="the server side to close")
    finally:
        await port.stopListening()
        await server.stop(grace=0)
