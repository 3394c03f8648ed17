"""take_over() against the installed Twisted: the HTTPChannel internals it uses.

``tunnel/server/takeover.py`` takes a connection away from twisted.web's
HTTPChannel by touching its internals.  The first tests pin each internal its
docstring lists, the others the behaviour take-over promises, so that a
Twisted upgrade which changes them fails here rather than in production.

Every connection is a real ``Site`` (whose protocol wraps the HTTPChannel) or
``TunnelSite`` (whose protocol is a HTTPChannel subclass) on a
``StringTransport`` and a ``Clock``, fed one read at a time the way a reactor
calls ``transport.protocol.dataReceived``; one test runs over iosim.
"""

from __future__ import annotations

import contextlib

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.http import HTTPChannel, Request
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tunnel.server.site import TunnelSite
from tunnel.server.takeover import CannotTakeOver, take_over

HEAD = b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: tunnel.test\r\n\r\n"
GREETING = b"HTTP/1.1 200 Connected to Tunnel\n\n"
#: what the client sends after the head: it looks like HTTP on purpose, so a
#: parser that still saw it would answer or choke
PAYLOAD = [b"GET /not-http HTTP/1.1\r\n", b"Host: x\r\n\r\n", b"\x00\xffbinary\r\n", b"tail"]
SPOKE = b"<the new protocol speaks>"
#: more than HTTPChannel buffers before it pauses reading (16 KiB since Twisted 17.9)
A_LOT = 256 * 1024

SITES = {
    "Site": lambda resource, clock: Site(resource, reactor=clock),
    "TunnelSite": lambda resource, clock: TunnelSite(resource, reactor=clock),
}


class Recorder(Protocol):
    """The protocol taking over: records what reaches it, in order.

    Like YamuxSession it registers as the transport's producer and writes at
    once; both only work if HTTPChannel let go of the transport first.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def makeConnection(self, transport) -> None:
        self.events.append(("made", transport.value()))  # written before it
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.transport.write(SPOKE)

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: Failure) -> None:
        self.events.append(("lost", reason.type))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    @property
    def received(self) -> bytes:
        return b"".join(data for kind, data in self.events if kind == "data")


class Leaf(Resource):
    """Answers every request with NOT_DONE_YET after calling ``on_render``."""

    isLeaf = True

    def __init__(self, on_render) -> None:
        super().__init__()
        self.on_render = on_render
        self.requests: list[Request] = []

    def render(self, request):
        self.requests.append(request)
        self.on_render(request)
        return NOT_DONE_YET


class Connection:
    """One public connection to a real Site, on a StringTransport."""

    def __init__(self, site_kind: str, on_render=lambda request: None) -> None:
        self.clock = Clock()
        self.resource = Leaf(on_render)
        self.site = SITES[site_kind](self.resource, self.clock)
        # what the reactor calls: HTTPChannel itself or Site's wrapper around it
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def read(self, *chunks: bytes) -> None:
        """Each chunk is one read from the socket."""
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    @property
    def request(self) -> Request:
        (request,) = self.resource.requests
        return request


def take_over_in_render(recorder: Recorder, greeting: bytes = GREETING):
    return lambda request: take_over(request, recorder, greeting)


site_kinds = pytest.mark.parametrize("site_kind", SITES)
POST = b"POST /upgrade HTTP/1.1\r\nHost: tunnel.test\r\n"
with_a_body = pytest.mark.parametrize(
    "body",
    [
        b"Content-Length: 4\r\n\r\nbody",
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)


# -- the internals take_over() relies on ------------------------------------------


@site_kinds
def test_render_runs_inside_the_read_and_its_rest_goes_to_rawDataReceived(site_kind):
    """take_over() in render() redirects rawDataReceived: the rest of the read
    that carried the head arrives there, after render() returned."""
    seen = []

    def render(request):
        channel = request.channel
        assert isinstance(channel, HTTPChannel)
        seen.append("render")
        channel.rawDataReceived = lambda data: seen.append(data)  # what take_over does

    conn = Connection(site_kind, render)
    conn.read(HEAD + PAYLOAD[0] + PAYLOAD[1])  # one read: the head and more lines
    assert seen == ["render", PAYLOAD[0] + PAYLOAD[1]]


@site_kinds
def test_bytes_read_while_a_request_is_handled_wait_in_dataBuffer(site_kind):
    """take_over() hands ``_dataBuffer`` (a list of bytes) to the new protocol."""
    conn = Connection(site_kind)
    conn.read(HEAD + PAYLOAD[0], *PAYLOAD[1:])
    channel = conn.request.channel
    assert isinstance(channel._dataBuffer, list)
    assert b"".join(channel._dataBuffer) == b"".join(PAYLOAD)
    assert conn.transport.value() == b""  # nothing parsed, nothing answered


@site_kinds
@with_a_body
def test_after_a_request_body_the_rest_of_the_read_is_in_dataBuffer(site_kind, body):
    """Then render() runs from rawDataReceived, with those bytes already buffered.

    TunnelSite streams request bodies: its render() runs once the head is in,
    before the body, with nothing buffered."""
    buffered = []
    conn = Connection(site_kind, lambda r: buffered.append(b"".join(r.channel._dataBuffer)))
    conn.read(POST + body + PAYLOAD[0])
    assert buffered == ([b""] if site_kind == "TunnelSite" else [PAYLOAD[0]])
    conn.request.content.close()


@site_kinds
def test_the_channel_is_the_transports_producer_and_pauses_reading(site_kind):
    """take_over() unregisters HTTPChannel as producer and resumes reading."""
    conn = Connection(site_kind)
    conn.read(HEAD)
    assert conn.transport.producer is conn.request.channel
    assert conn.request.channel._networkProducer is conn.transport  # what it pauses
    assert conn.transport.streaming is True
    assert conn.transport.producerState == "producing"
    conn.read(*[b"x" * 4096] * (A_LOT // 4096))
    assert conn.transport.producerState == "paused"


# -- what take_over() does -------------------------------------------------------


@site_kinds
@pytest.mark.parametrize("head_reads", ["one read", "byte by byte"])
def test_bytes_after_the_head_reach_the_protocol_in_order(site_kind, head_reads):
    """Taken over in render(): the rest of the head's read, then every later read."""
    recorder = Recorder()
    conn = Connection(site_kind, take_over_in_render(recorder))
    if head_reads == "one read":
        conn.read(HEAD + PAYLOAD[0])
    else:
        conn.read(*(HEAD[i : i + 1] for i in range(len(HEAD))), PAYLOAD[0])
    conn.read(*PAYLOAD[1:])
    assert recorder.events == [("made", GREETING)] + [("data", p) for p in PAYLOAD]
    assert conn.transport.value() == GREETING + SPOKE


@site_kinds
def test_bytes_read_before_a_later_take_over_arrive_first(site_kind):
    """Taken over after render() returned (as after the duplicate check): the
    bytes read meanwhile come right after makeConnection, then later reads."""
    conn = Connection(site_kind)
    conn.read(HEAD + PAYLOAD[0], PAYLOAD[1])
    recorder = Recorder()
    take_over(conn.request, recorder, GREETING)
    conn.read(*PAYLOAD[2:])
    assert recorder.events == [
        ("made", GREETING),
        ("data", PAYLOAD[0] + PAYLOAD[1]),
        ("data", PAYLOAD[2]),
        ("data", PAYLOAD[3]),
    ]
    assert conn.transport.value() == GREETING + SPOKE


@site_kinds
def test_reading_paused_by_the_channel_resumes_and_nothing_is_lost(site_kind):
    conn = Connection(site_kind)
    sent = bytes(range(256)) * (A_LOT // 256)
    conn.read(HEAD, *(sent[i : i + 4096] for i in range(0, len(sent), 4096)))
    assert conn.transport.producerState == "paused"
    recorder = Recorder()
    take_over(conn.request, recorder, GREETING)
    assert conn.transport.producerState == "producing"
    assert conn.transport.producer is recorder
    conn.read(b"after")
    assert recorder.received == sent + b"after"


@site_kinds
@with_a_body
def test_bytes_after_a_request_body_reach_the_protocol(site_kind, body):
    """In TunnelSite render() runs at the head (bodies stream), so a take-over
    there gets every byte after the head, the body's own bytes included."""
    recorder = Recorder()
    conn = Connection(site_kind, take_over_in_render(recorder))
    conn.read(POST + body + PAYLOAD[0])
    conn.read(*PAYLOAD[1:])
    content = conn.request.content  # a temporary file for a chunked body
    content.seek(0)
    if site_kind == "TunnelSite":
        assert content.read() == b""
        raw_body = body.split(b"\r\n\r\n", 1)[1]
        assert recorder.received == raw_body + b"".join(PAYLOAD)
    else:
        assert content.read() == b"body"
        assert recorder.received == b"".join(PAYLOAD)
    content.close()


@site_kinds
@pytest.mark.parametrize("greeting", [GREETING, b""])
def test_the_greeting_is_written_before_anything_else(site_kind, greeting):
    recorder = Recorder()
    conn = Connection(site_kind, take_over_in_render(recorder, greeting))
    conn.read(HEAD)
    assert recorder.events[0] == ("made", greeting)
    assert conn.transport.value() == greeting + SPOKE


@site_kinds
def test_twisted_web_can_no_longer_write_to_or_close_the_connection(site_kind):
    """Nor unregister the new protocol as producer: HTTPChannel.loseConnection()
    unregisters whatever producer the transport has."""
    recorder = Recorder()
    conn = Connection(site_kind, take_over_in_render(recorder))
    conn.read(HEAD)
    request = conn.request
    assert request.channel.transport is None
    for late in (lambda: request.write(b"late"), request.finish, request.loseConnection):
        with contextlib.suppress(AttributeError):  # the channel has no transport
            late()
    assert conn.transport.value() == GREETING + SPOKE
    assert not conn.transport.disconnecting
    assert conn.transport.producer is recorder


@site_kinds
def test_the_idle_timeout_no_longer_applies(site_kind):
    conn = Connection(site_kind)
    assert conn.clock.getDelayedCalls()  # the channel's timers, before the head
    conn.read(HEAD)
    recorder = Recorder()
    take_over(conn.request, recorder, GREETING)
    assert conn.clock.getDelayedCalls() == []
    conn.read(b"data does not re-arm it")
    assert conn.clock.getDelayedCalls() == []
    conn.clock.advance(7 * 24 * 3600)
    assert not conn.transport.disconnecting
    assert [kind for kind, _ in recorder.events] == ["made", "data"]


@site_kinds
def test_the_end_of_the_connection_reaches_the_protocol(site_kind):
    recorder = Recorder()
    conn = Connection(site_kind, take_over_in_render(recorder))
    conn.read(HEAD + b"last words")
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    assert recorder.events[1:] == [("data", b"last words"), ("lost", ConnectionDone)]


@site_kinds
def test_over_a_fake_network(site_kind):
    """The same through iosim: one client write carries the head and more."""

    class Echo(Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    class Client(Protocol):
        got = b""

        def connectionMade(self):
            self.transport.write(HEAD + b"ping ")

        def dataReceived(self, data):
            self.got += data

    clock = Clock()
    resource = Leaf(lambda request: take_over(request, Echo(), GREETING))
    server = SITES[site_kind](resource, clock).buildProtocol(None)
    client = Client()
    pump = iosim.connect(
        server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock
    )
    assert client.got == GREETING + b"ping "
    client.transport.write(b"pong")
    pump.flush()
    assert client.got == GREETING + b"ping pong"
    assert clock.getDelayedCalls() == []


# -- when it cannot ---------------------------------------------------------------


@site_kinds
def test_cannot_take_over_a_closed_connection(site_kind):
    conn = Connection(site_kind)
    conn.read(HEAD)
    conn.protocol.connectionLost(Failure(ConnectionDone()))
    recorder = Recorder()
    with pytest.raises(CannotTakeOver):
        take_over(conn.request, recorder, GREETING)
    assert recorder.events == []
    assert conn.transport.value() == b""


@site_kinds
def test_cannot_take_over_twice(site_kind):
    first = Recorder()
    conn = Connection(site_kind, take_over_in_render(first))
    conn.read(HEAD)
    second = Recorder()
    with pytest.raises(CannotTakeOver):
        take_over(conn.request, second, b"again")
    conn.read(b"still mine")
    assert first.received == b"still mine"
    assert second.events == []
    assert conn.transport.value() == GREETING + SPOKE


class H2StreamLike:
    """What twisted.web's HTTP/2 stream offers a Request: no transport."""

    transport = None

    def getPeer(self):
        return IPv4Address("TCP", "192.0.2.1", 40000)

    def getHost(self):
        return IPv4Address("TCP", "192.0.2.2", 443)


def test_cannot_take_over_an_http2_request():
    recorder = Recorder()
    with pytest.raises(CannotTakeOver):
        take_over(Request(H2StreamLike()), recorder, GREETING)
    assert recorder.events == []


def test_http2_streams_have_no_transport():
    """The stand-in above matches twisted.web (needs the h2 package)."""
    http2 = pytest.importorskip("twisted.web._http2")
    assert http2.H2Stream.transport is None
