"""Replay the Go recordings at the tunnel level, byte for byte, on a Clock.

A. The Go *client's* bytes (``client_to_server.bin``: the CONNECT head, then
   yamux frames) are fed to our ``TunnelServer`` behind a twisted.web Site on
   StringTransports, in recorded order; the public request of the recording is
   made through the same Site.  What our server writes must be what the Go
   server wrote (frame for frame on the control stream, the same shape on
   every tunnel stream), the HTTP request in each tunnel stream must be a clean
   HTTP/1.1 request, and the public client must get the origin's answer.
B. The Go *server's* bytes (``server_to_client.bin``) are fed to our
   ``TunnelClientProtocol``, split at arbitrary points.
C. Bad input at this level: broken control messages, garbage after CONNECT,
   handshakes that are short, wrong or never sent.

After every test every transport was closed and no DelayedCall is left on
the Clock.
"""

from __future__ import annotations

import collections
import contextlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from tunnel.client import HandshakeTimeout, TunnelClientProtocol, TunnelServerError
from tunnel.koding.identifiers import redact
from tunnel.koding.states import ClientState
from tunnel.koding.wire import ControlMessage
from tunnel.server import TunnelResource, TunnelServer
from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    Header,
    encode,
)

from .helpers import VECTORS, data_frame, frame, split_frames
from .test_vectors import Recording

CONNECTED = b"HTTP/1.1 200 Connected to Tunnel\n\n"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
#: the peer address StringTransport reports for the public client
PUBLIC_IP = "192.168.1.1"

WIRE = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- plumbing ----------------------------------------------------------------------


def raw(h: Header, body: bytes = b"") -> bytes:
    return encode(h.type, h.flags, h.stream_id, h.length) + body


def vector(name: str, file: str) -> bytes:
    return (VECTORS / name / file).read_bytes()


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """(HTTP head including its blank line, the bytes after it)."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    assert ends, f"no complete head in {data[:80]!r}"
    end = min(ends)
    return data[:end], data[end:]


@contextlib.contextmanager
def logged_failures():
    """Collect the failures logged (``log.failure``) while the block runs."""
    caught: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None:
            caught.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield caught
    finally:
        globalLogPublisher.removeObserver(observer)


def failure_texts(caught: list[dict]) -> list[str]:
    return [f"{e.get('log_format')}: {e['log_failure'].getTraceback()}" for e in caught]


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Consumes and records everything a stream delivers."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


# -- a minimal strict HTTP/1.1 parser (for both directions) ----------------------

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Message:
    def __init__(self, start: bytes, headers: list[tuple[str, str]], body: bytes) -> None:
        self.start = start
        self.headers = headers
        self.body = body

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: str) -> str | None:
        values = self.get(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    @property
    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


def _parse_head(data: bytes, pos: int) -> tuple[bytes, list[tuple[str, str]], int]:
    end = data.index(b"\r\n\r\n", pos)
    lines = data[pos:end].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and _TOKEN.match(name), f"malformed header line {line!r}"
        assert b"\n" not in value and b"\r" not in value
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return lines[0], headers, end + 4


def _parse_body(data: bytes, pos: int, msg_headers, *, until_close: bool) -> tuple[bytes, int]:
    te = [v.lower() for n, v in msg_headers if n.lower() == "transfer-encoding"]
    cl = [v for n, v in msg_headers if n.lower() == "content-length"]
    if te:
        assert te == ["chunked"], te
        assert not cl, "both Transfer-Encoding and Content-Length"
        body = bytearray()
        while True:
            eol = data.index(b"\r\n", pos)
            size = int(data[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                # no trailers expected
                assert data[pos : pos + 2] == b"\r\n", data[pos : pos + 20]
                return bytes(body), pos + 2
            body += data[pos : pos + size]
            assert len(data) >= pos + size + 2, "truncated chunk"
            assert data[pos + size : pos + size + 2] == b"\r\n"
            pos += size + 2
    if cl:
        assert len(set(cl)) == 1 and cl[0].isdigit(), cl
        n = int(cl[0])
        assert len(data) >= pos + n, f"body truncated: {len(data) - pos} of {n}"
        return data[pos : pos + n], pos + n
    if until_close:
        return data[pos:], len(data)
    return b"", pos


def parse_requests(data: bytes) -> list[Message]:
    """Every request in ``data``, which must hold whole requests and nothing else."""
    out = []
    pos = 0
    while pos < len(data):
        start, headers, pos = _parse_head(data, pos)
        assert re.match(rb"^[A-Z]+ \S+ HTTP/1\.1$", start), f"bad request line {start!r}"
        body, pos = _parse_body(data, pos, headers, until_close=False)
        out.append(Message(start, headers, body))
    return out


def parse_responses(data: bytes) -> list[Message]:
    """Every response in ``data`` (the last may be delimited by the close)."""
    out = []
    pos = 0
    while pos < len(data):
        start, headers, pos = _parse_head(data, pos)
        assert re.match(rb"^HTTP/1\.1 \d{3} ", start), f"bad status line {start!r}"
        code = int(start.split(b" ")[1])
        if code < 200 or code in (204, 304):
            body = b""
        else:
            body, pos = _parse_body(data, pos, headers, until_close=True)
        out.append(Message(start, headers, body))
    return out


def status_of(msg: Message) -> int:
    return int(msg.start.split(b" ")[1])


# -- the server side: our TunnelServer behind a Site, on StringTransports ----------


class Conn:
    """One connection to our Site."""

    def __init__(self, site: Site) -> None:
        self.protocol = site.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.lost = False

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone("test over")))


class ServerHarness:
    """Our server behind a Site on StringTransports, on one Clock.

    The recordings were made with the Go server, which opens a stream for
    every request and closes it after the response, so the server keeps no
    stream between requests here (``max_idle_streams=0``) unless a test asks;
    keep-alive over the tunnel is tested in test_pool.py.  The Go sessions had
    hashicorp's windows: so do ours here (a tunnel session's ``LARGE_WINDOWS``
    differ on the wire only in larger WindowUpdate credit as a window grows,
    and Data frames of up to 256 KiB; test_interop_go.py runs them against
    the Go programs).
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("max_idle_streams", 0)
        kwargs.setdefault("yamux_config", YamuxConfig())
        self.clock = Clock()
        self.server = TunnelServer(clock=self.clock, **kwargs)
        self.server.add_host("app.test", "app")
        self.site = Site(TunnelResource(self.server), reactor=self.clock)
        self.conns: list[Conn] = []

    def connect(self) -> Conn:
        conn = Conn(self.site)
        self.conns.append(conn)
        return conn

    def request(self, data: bytes) -> list[Message]:
        """A public connection sends ``data``; returns the parsed responses."""
        conn = self.connect()
        conn.feed(data)
        return parse_responses(conn.take())

    def finish(self) -> None:
        """Deliver connectionLost everywhere, then demand a clean Clock."""
        for conn in self.conns:
            conn.lose()
        assert self.clock.getDelayedCalls() == []


def tokens(frames) -> dict[int, list]:
    """Per stream: the frames that matter, with consecutive Data merged.

    Window credit (a WindowUpdate without flags) depends on when the
    application reads, so it is left out.  Control-stream Data keeps its
    body; tunnel-stream Data is one ``"D"`` per run.
    """
    out: dict[int, list] = collections.defaultdict(list)
    for h, body in frames:
        if h.type == TYPE_WINDOW_UPDATE and h.flags == 0:
            continue
        seq = out[h.stream_id]
        if h.type == TYPE_DATA:
            if h.flags:
                seq.append(("Data", h.flags))
            if not h.length:
                continue
            if h.stream_id == 1:
                seq.append(("D", bytes(body)))
            elif not seq or seq[-1] != "D":
                seq.append("D")
        elif h.type == TYPE_WINDOW_UPDATE:
            seq.append(("WU", h.flags))
        elif h.type == TYPE_PING:
            seq.append(("Ping", h.flags, h.length))
        else:
            seq.append(("GoAway", h.length))
    return dict(out)


def is_control_message(h: Header, body: bytes) -> bool:
    return h.type == TYPE_DATA and h.stream_id == 1 and body.startswith(b"{")


class GoClientReplay:
    """Feeds one recording's Go-client bytes to our server, in recorded order."""

    def __init__(self, name: str, harness: ServerHarness) -> None:
        self.name = name
        self.rec = Recording(name)
        self.harness = harness
        self.clock = harness.clock
        c2s = vector(name, "client_to_server.bin")
        self.head, _ = split_head(c2s)
        self.ctl = harness.connect()
        self.public: Conn | None = None
        self.ours: list[tuple[Header, bytes]] = []

    def connect(self) -> None:
        self.ctl.feed(self.head)
        assert self.ctl.take() == CONNECTED
        # quiet until the client speaks: nothing (no keepalive) may follow
        self.clock.advance(self.harness.server.control_timeout - 1)
        assert self.ctl.take() == b""

    def collect(self) -> None:
        self.ours += split_frames(self.ctl.take())

    def run(self) -> None:
        """Replay every event; check the shape of what we sent at each step.

        Client frames recorded at the same instant (one TCP segment) are fed
        as one chunk.
        """
        self.connect()
        base = self.clock.seconds()
        go_sent: list[tuple[Header, bytes]] = []
        group: list[tuple[Header, bytes]] = []
        group_time = None

        def flush() -> None:
            if group:
                self.collect()
                self.check_step(go_sent, group[0][0])
                self.ctl.feed(b"".join(raw(h, body) for h, body in group))
                self.collect()
                group.clear()

        for t, direction, h, body in self.rec.events:
            if direction == "c2s" and t == group_time:
                group.append((h, body))
                continue
            flush()
            self.clock.advance(max(0.0, base + t - self.clock.seconds()))
            if direction == "s2c":
                go_sent.append((h, body))
                if is_control_message(h, body) and self.public is None:
                    # the Go server sent its first control message: the public
                    # request of the recording had arrived
                    self.public = self.harness.connect()
                    self.public.feed(vector(self.name, "public/client_to_server.bin"))
                    self.collect()
                continue
            if h.type == TYPE_GO_AWAY:  # fed by the caller when it is done
                break
            group.append((h, body))
            group_time = t
        flush()
        assert not self.ctl.closing, "our server closed the tunnel during a valid exchange"

    def check_step(self, go_sent, next_frame: Header) -> None:
        """Before the client's next frame, we have sent what the Go server had.

        On the control stream we may be ahead (a pipelined request can be
        announced earlier); on a tunnel stream we must match exactly, so a FIN
        is neither late (the Go client would wait for it) nor early.
        """
        want, got = tokens(go_sent), tokens(self.ours)
        for sid in set(want) | set(got):
            w, g = want.get(sid, []), got.get(sid, [])
            where = f"{self.name}: before client frame {next_frame}, stream {sid}"
            if sid == 1:
                assert g[: len(w)] == w, where
            else:
                assert g == w, where


# -- A. the Go client's bytes -> our server ---------------------------------------------

HTTP_SCENARIOS = ["b_get_echo", "b2_two_requests", "c_post_100k", "l_chunked", "m_no_local_server"]


@pytest.mark.parametrize("name", HTTP_SCENARIOS)
def test_go_client_replayed_against_our_server(name) -> None:
    harness = ServerHarness()
    replay = GoClientReplay(name, harness)
    with logged_failures() as failures:
        replay.run()
    assert failures == [], failure_texts(failures)

    # frame for frame on the control stream, same shape on every tunnel stream
    go_s2c = [(h, b) for _, d, h, b in replay.rec.events if d == "s2c"]
    assert tokens(replay.ours) == tokens(go_s2c)
    # the first two frames are golden: ACK(1) with delta 0, then controlOk
    assert [(h.type, h.flags, h.stream_id, h.length, b) for h, b in replay.ours[:2]] == [
        (TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0, b""),
        (TYPE_DATA, 0, 1, 9, b"controlOk"),
    ]
    # the control messages are Go's bytes exactly (localPort from the public Host)
    ours_payload = collections.defaultdict(bytearray)
    for h, body in replay.ours:
        if h.type == TYPE_DATA:
            ours_payload[h.stream_id] += body
    go_payload = replay.rec.payloads("s2c")
    go_c2s = replay.rec.payloads("c2s")
    assert bytes(ours_payload[1]) == go_payload[1]

    # each tunnel stream carries one clean HTTP/1.1 request for the public one
    public_requests = parse_requests(vector(name, "public/client_to_server.bin"))
    tunnel_ids = sorted(sid for sid in go_payload if sid != 1)
    assert len(tunnel_ids) == len(public_requests)
    for sid, public in zip(tunnel_ids, public_requests, strict=True):
        (ours,) = parse_requests(bytes(ours_payload[sid]))
        (go,) = parse_requests(go_payload[sid])
        assert ours.start == go.start == public.start
        assert ours.get("host") == go.get("host") == public.get("host")
        assert ours.body == go.body == public.body
        if public.body:
            assert ours.one("content-length") == str(len(public.body))
        for header in ("user-agent", "accept", "content-type"):
            assert ours.get(header) == public.get(header), header
        prior = public.get("x-forwarded-for")
        assert ours.get("x-forwarded-for") == [", ".join([*prior, PUBLIC_IP])]
        assert ours.get("x-forwarded-proto") == ["http"]
        assert ours.get("x-forwarded-host") == public.get("host")
        # hop-by-hop headers of the public request are not passed on; the
        # only one allowed is our own Connection: close (one request a stream)
        assert ours.get("connection") in ([], ["close"])
        assert not (ours.names & (HOP_BY_HOP - {"connection"})), ours.headers
        assert "expect" not in ours.names

    # the public client gets the origin's answer
    got = parse_responses(replay.public.take())
    want = parse_responses(vector(name, "public/server_to_client.bin"))
    assert [m.start for m in got] == [m.start for m in want]
    assert [m.body for m in got] == [m.body for m in want]
    origin = [parse_responses(go_c2s[sid])[0] for sid in tunnel_ids]
    for ours_response, origin_response in zip(got, origin, strict=True):
        if origin_response.get("content-type"):  # (else: see test_no_content_type_invented)
            assert ours_response.get("content-type") == origin_response.get("content-type")
        # the origin's framing is kept when it gave a length
        assert ours_response.get("content-length") == origin_response.get("content-length")
    for m in got:
        assert not (m.names & (HOP_BY_HOP - {"transfer-encoding", "connection"})), m.headers

    # the Go client's final GoAway(0) only stops new streams
    session = harness.server.connection("app").session
    assert session.streams.keys() == {1}
    replay.ctl.feed(frame(TYPE_GO_AWAY, 0, 0, 0))
    assert session.remote_go_away == 0
    assert not replay.ctl.closing
    harness.finish()
    assert harness.server.connection("app") is None
    assert harness.server.state("app") == ClientState.CLOSED


def test_pipelined_public_requests_keep_their_order() -> None:
    """b2: the second (pipelined) request waits for the first, then uses stream 5."""
    harness = ServerHarness()
    replay = GoClientReplay("b2_two_requests", harness)
    replay.run()
    got = parse_responses(replay.public.take())
    assert [m.body for m in got] == [b"one", b"two"]
    # the second public request said Connection: close
    assert replay.public.closing
    harness.finish()


def test_chunked_origin_response_is_decoded_and_reframed() -> None:
    """l: the origin's chunked body reaches the public client intact, framed once."""
    harness = ServerHarness()
    replay = GoClientReplay("l_chunked", harness)
    replay.run()
    data = replay.public.take()
    (response,) = parse_responses(data)
    assert status_of(response) == 200
    assert response.body == b"part1 part2 part3"
    assert len(response.get("transfer-encoding")) + len(response.get("content-length")) == 1
    harness.finish()


def test_no_local_server_503_passes_through() -> None:
    """m: the Go client's 503 "no local server" reaches the public client as is."""
    harness = ServerHarness()
    replay = GoClientReplay("m_no_local_server", harness)
    replay.run()
    (response,) = parse_responses(replay.public.take())
    assert response.start == b"HTTP/1.1 503 Service Unavailable"
    assert response.body == b"no local server"
    harness.finish()


def test_large_post_body_reaches_the_stream_intact() -> None:
    """c: a 100 KiB public body arrives in stream 3 byte for byte, within the window."""
    harness = ServerHarness()
    replay = GoClientReplay("c_post_100k", harness)
    replay.run()
    body = bytearray()
    for h, chunk in replay.ours:
        if h.type == TYPE_DATA and h.stream_id == 3:
            assert h.length <= harness.server.yamux_config.max_frame_size
            body += chunk
    (request,) = parse_requests(bytes(body))
    public = parse_requests(vector("c_post_100k", "public/client_to_server.bin"))[0]
    assert len(request.body) == 102400
    assert request.body == public.body
    (response,) = parse_responses(replay.public.take())
    assert status_of(response) == 200 and response.body == public.body
    harness.finish()


def test_request_content_length_is_not_duplicated() -> None:
    """Regression: the public Content-Length was copied and the HTTP client added its own."""
    harness = ServerHarness()
    replay = GoClientReplay("c_post_100k", harness)
    replay.run()
    body = b"".join(b for h, b in replay.ours if h.type == TYPE_DATA and h.stream_id == 3)
    (request,) = parse_requests(body)
    try:
        assert request.get("content-length") == ["102400"]
    finally:
        harness.finish()


def test_no_content_type_invented() -> None:
    harness = ServerHarness()
    replay = GoClientReplay("m_no_local_server", harness)
    replay.run()
    (response,) = parse_responses(replay.public.take())
    want = recorded_response("m_no_local_server")
    try:
        assert response.get("content-type") in ([], want.get("content-type"))
    finally:
        harness.finish()


@pytest.mark.parametrize("name", ["b_get_echo", "m_no_local_server"])
def test_origin_content_length_is_kept(name) -> None:
    """Regression: the origin's Content-Length was dropped and the body re-chunked."""
    harness = ServerHarness()
    replay = GoClientReplay(name, harness)
    replay.run()
    (response,) = parse_responses(replay.public.take())
    (go,) = parse_responses(vector(name, "public/server_to_client.bin"))
    try:
        assert response.get("content-length") == go.get("content-length")
        assert response.get("transfer-encoding") == []
    finally:
        harness.finish()


def establish(harness: ServerHarness, name: str = "b_get_echo", file: str = "") -> Conn:
    """Connect a Go client from a recording and run its control handshake."""
    c2s = vector(name, f"client_to_server{file}.bin")
    head, rest = split_head(c2s)
    conn = harness.connect()
    conn.feed(head)
    assert conn.take() == CONNECTED
    frames = split_frames(rest)
    for h, body in frames[:2]:  # SYN(1), Data(1, "controlHandshake")
        conn.feed(raw(h, body))
    assert split_frames(conn.take()) == [
        (Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0), b""),
        (Header(0, TYPE_DATA, 0, 1, 9), b"controlOk"),
    ]
    return conn


def recorded_response(name: str, file: str = "") -> Message:
    (response,) = parse_responses(vector(name, f"public/server_to_client{file}.bin"))
    return response


def test_go_client_connect_head_golden_reply() -> None:
    """The reply to Go's CONNECT is exactly Go's: bare LF, no headers, then silence."""
    harness = ServerHarness()
    conn = harness.connect()
    head, _ = split_head(vector("b_get_echo", "client_to_server.bin"))
    for i in range(len(head) - 1):  # byte by byte: nothing until the head is whole
        conn.feed(head[i : i + 1])
        assert conn.take() == b""
    conn.feed(head[-1:])
    assert conn.take() == vector("b_get_echo", "server_to_client.bin")[: len(CONNECTED)]
    harness.clock.advance(9.9)
    assert conn.take() == b""
    assert harness.server.state("app") == ClientState.UNKNOWN
    harness.finish()


@pytest.mark.parametrize("split", ["same-chunk", "separate"])
def test_handshake_frames_in_the_connect_segment(split) -> None:
    """Yamux bytes that arrive with the CONNECT head are not lost by the takeover."""
    harness = ServerHarness()
    conn = harness.connect()
    c2s = vector("b_get_echo", "client_to_server.bin")
    head, rest = split_head(c2s)
    handshake = rest[: 12 + 12 + 16]
    if split == "same-chunk":
        conn.feed(head + handshake)
    else:
        conn.feed(head)
        conn.feed(handshake)
    out = conn.take()
    assert out.startswith(CONNECTED)
    assert out[len(CONNECTED) :] == vector("b_get_echo", "server_to_client.bin")[34 : 34 + 12 + 21]
    assert harness.server.state("app") == ClientState.CONNECTED
    harness.finish()


def test_public_request_without_client_and_unknown_host() -> None:
    """g: a vhost whose client is not connected, and a host nobody serves -> 502."""
    harness = ServerHarness()
    harness.server.add_host("ghost.test", "ghost")
    ctl = establish(harness, "g_no_client")
    for file in ("", ".1"):
        (got,) = harness.request(vector("g_no_client", f"public/client_to_server{file}.bin"))
        want = recorded_response("g_no_client", file)
        assert got.start == want.start
        assert got.body == want.body
        assert got.get("content-type") == want.get("content-type")
        assert got.get("content-length") == want.get("content-length")
    assert recorded_response("g_no_client", ".1").body == (
        b'no virtual host available for "nosuch.test"\n'
    )
    # no control message went to the connected client
    assert ctl.take() == b""
    harness.finish()


def test_websocket_upgrade_without_client_gets_an_answer() -> None:
    """g, connection 2: Go never answers (surprise 4); we answer 502 at once."""
    harness = ServerHarness()
    harness.server.add_host("ghost.test", "ghost")
    request = vector("g_no_client", "public/client_to_server.2.bin")
    assert vector("g_no_client", "public/server_to_client.2.bin") == b""  # Go: silence
    (got,) = harness.request(request)
    assert status_of(got) == 502
    assert got.body == b"no client session established\n"
    harness.finish()


def test_connect_with_unknown_identifier() -> None:
    """h: CONNECT for an identifier no vhost maps to -> Go's 502, no takeover."""
    harness = ServerHarness()
    conn = harness.connect()
    conn.feed(vector("h_unknown_ident", "client_to_server.bin"))
    (got,) = parse_responses(conn.take())
    (want,) = parse_responses(vector("h_unknown_ident", "server_to_client.bin"))
    assert got.start == want.start == b"HTTP/1.1 502 Bad Gateway"
    assert got.body == want.body
    assert got.body == b"no host associated for identifier nobody. please use server.AddHost()\n"
    assert got.get("content-length") == want.get("content-length")
    assert harness.server.connection("nobody") is None
    # still an HTTP connection: a second request is answered too
    conn.feed(b"GET /_controlPath/ HTTP/1.1\r\nHost: x\r\n\r\n")
    (again,) = parse_responses(conn.take())
    assert status_of(again) == 405
    harness.finish()


@pytest.mark.parametrize("file", ["", ".1"])
def test_control_path_misuse(file) -> None:
    """n: GET on the control path -> 405; CONNECT without identifier -> 502."""
    harness = ServerHarness()
    (got,) = harness.request(vector("n_control_path_misuse", f"public/client_to_server{file}.bin"))
    want = recorded_response("n_control_path_misuse", file)
    assert got.start == want.start
    assert got.body == want.body
    assert got.get("content-type") == want.get("content-type")
    expected = {
        "": b"405 must CONNECT\n\n",
        ".1": b"no host associated for identifier . please use server.AddHost()\n",
    }[file]
    assert got.body == expected
    harness.finish()


def _ping_sent(conn: Conn) -> int:
    (ping,) = split_frames(conn.take())
    h = ping[0]
    assert (h.type, h.flags, h.stream_id) == (TYPE_PING, FLAG_SYN, 0)
    return h.length


def test_duplicate_identifier_refused_while_first_answers_the_probe() -> None:
    """j: a second CONNECT for a live identifier gets Go's 502; the first stays."""
    harness = ServerHarness()
    first = establish(harness, "j_duplicate_ident")
    incumbent = harness.server.connection("app")
    second = harness.connect()
    second.feed(vector("j_duplicate_ident", "client_to_server.1.bin"))
    assert second.take() == b""  # waiting for the probe
    opaque = _ping_sent(first)
    harness.clock.advance(harness.server.probe_timeout / 2)
    first.feed(frame(TYPE_PING, FLAG_ACK, 0, opaque))
    (got,) = parse_responses(second.take())
    (want,) = parse_responses(vector("j_duplicate_ident", "server_to_client.1.bin"))
    assert got.start == want.start == b"HTTP/1.1 502 Bad Gateway"
    assert got.body == want.body == b"control conn for app already exist. \n\n"
    # the incumbent was not disturbed (Go kills it; we keep it)
    assert harness.server.connection("app") is incumbent
    assert first.take() == b"" and not first.closing
    assert harness.server.state("app") == ClientState.CONNECTED
    harness.finish()


def test_duplicate_identifier_accepted_when_first_is_unresponsive() -> None:
    """j: the incumbent misses the probe -> it is dropped, the newcomer is served."""
    harness = ServerHarness()
    first = establish(harness, "j_duplicate_ident")
    states = []
    harness.server.observe_states(lambda change: states.append(change.current))
    second = harness.connect()
    head, rest = split_head(vector("j_duplicate_ident", "client_to_server.2.bin"))
    second.feed(head)
    _ping_sent(first)
    harness.clock.advance(harness.server.probe_timeout - 0.01)
    assert second.take() == b"" and not first.closing
    harness.clock.advance(0.01)
    assert first.transport.disconnected  # aborted, no GoAway
    assert first.take() == b""
    assert second.take() == CONNECTED
    for h, body in split_frames(rest)[:2]:
        second.feed(raw(h, body))
    assert split_frames(second.take())[1] == (Header(0, TYPE_DATA, 0, 1, 9), b"controlOk")
    newcomer = harness.server.connection("app")
    assert newcomer.ready and newcomer.session.transport is second.transport
    # the old connection's end does not remove the new one
    first.lose()
    assert harness.server.connection("app") is newcomer
    assert harness.server.state("app") == ClientState.CONNECTED
    assert states[-1] == ClientState.CONNECTED
    harness.finish()


def test_reconnect_after_the_first_connection_is_gone() -> None:
    """j, connection 2: once the first session ended, the same identifier connects."""
    harness = ServerHarness()
    first = establish(harness, "j_duplicate_ident")
    first.lose()
    assert harness.server.state("app") == ClientState.CLOSED
    establish(harness, "j_duplicate_ident", ".2")
    assert harness.server.state("app") == ClientState.CONNECTED
    harness.finish()


def public_get(harness: ServerHarness) -> Conn:
    public = harness.connect()
    public.feed(vector("b_get_echo", "public/client_to_server.bin"))
    return public


def origin_hello() -> bytes:
    """The origin's recorded answer to GET /hello (read when a test needs it)."""
    return Recording("b_get_echo").payloads("c2s")[3]


MESSAGE_PORT_0 = b'{"action":1,"transportProtocol":1,"localPort":0}\n'


def test_tunnel_timeout_then_late_stream_is_reset() -> None:
    """No stream in time -> 502 "timeout getting session"; the late one is RST
    and does not steal the next request's turn."""
    harness = ServerHarness()
    ctl = establish(harness)
    public = public_get(harness)
    assert split_frames(ctl.take()) == [(Header(0, TYPE_DATA, 0, 1, 49), MESSAGE_PORT_0)]
    harness.clock.advance(harness.server.tunnel_timeout - 0.01)
    assert public.take() == b""
    harness.clock.advance(0.01)
    (response,) = parse_responses(public.take())
    assert status_of(response) == 502
    assert response.body == b"timeout getting session\n"
    ctl.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    assert split_frames(ctl.take()) == [
        (Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 3, 0), b""),
        (Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 3, 0), b""),
    ]
    assert not ctl.closing
    second = public_get(harness)
    assert split_frames(ctl.take()) == [(Header(0, TYPE_DATA, 0, 1, 49), MESSAGE_PORT_0)]
    ctl.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, 0))
    frames = split_frames(ctl.take())
    assert frames[0] == (Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 5, 0), b"")
    assert frames[1][1].startswith(b"GET /echo?echo=hello HTTP/1.1\r\n")
    ctl.feed(data_frame(5, origin_hello()))
    (response,) = parse_responses(second.take())
    assert status_of(response) == 200 and response.body == b"hello"
    harness.finish()


@pytest.mark.parametrize("when", ["before-stream", "before-response"])
def test_public_client_gone_resets_the_stream(when) -> None:
    harness = ServerHarness()
    ctl = establish(harness)
    session = harness.server.connection("app").session
    public = public_get(harness)
    ctl.take()
    if when == "before-response":
        ctl.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
        ctl.take()
    public.lose()
    if when == "before-stream":
        assert ctl.take() == b""
        ctl.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
        assert split_frames(ctl.take()) == [
            (Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 3, 0), b""),
            (Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 3, 0), b""),
        ]
    else:
        assert split_frames(ctl.take()) == [(Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 3, 0), b"")]
    assert session.streams.keys() == {1}
    # the origin's answer arriving late is dropped; the session lives on
    ctl.feed(data_frame(3, origin_hello()) + frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 3, 0))
    assert ctl.take() == b"" and not ctl.closing
    harness.finish()


def test_expect_continue_body_is_not_lost() -> None:
    """c2 (surprise 1): Go loses the body; we answer 100 ourselves and forward it."""
    harness = ServerHarness()
    ctl = establish(harness, "c2_post_100k_expect")
    public = harness.connect()
    raw_request = vector("c2_post_100k_expect", "public/client_to_server.bin")
    (sent,) = parse_requests(raw_request)
    assert sent.get("expect") == ["100-continue"]
    public.feed(raw_request)
    assert split_frames(ctl.take()) == [(Header(0, TYPE_DATA, 0, 1, 49), MESSAGE_PORT_0)]
    ctl.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    harness.clock.advance(0)
    harness.clock.advance(0)
    frames = split_frames(ctl.take())
    (request,) = parse_requests(b"".join(b for h, b in frames if h.type == TYPE_DATA))
    assert "expect" not in request.names
    assert request.body == sent.body and len(request.body) == 102400
    ctl.feed(data_frame(3, Recording("c_post_100k").payloads("c2s")[3]))
    responses = parse_responses(public.take())
    assert [status_of(r) for r in responses] == [100, 200]
    assert responses[1].body == sent.body
    harness.finish()


# -- B. the Go server's bytes -> our client ------------------------------------------------


class ClientHarness:
    def __init__(self, identifier: str = "app", host: str = "127.0.0.1:18081") -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.forwarded: list[tuple[int, ControlMessage]] = []
        self.recorders: dict[int, Recorder] = {}
        self.streams = {}
        # hashicorp's windows, as the recorded Go client had (see ServerHarness)
        self.protocol = TunnelClientProtocol(
            identifier, host, self.forward, self.clock, yamux_config=YamuxConfig()
        )
        self.protocol.makeConnection(self.transport)
        self.connect_request = self.transport.value()
        self.transport.clear()
        self.lost = False
        # consumed here once, so a failure is never left unhandled
        self._ready: list = []
        self._lost: list = []
        self.protocol.when_ready().addBoth(self._ready.append)
        self.protocol.when_lost().addBoth(self._lost.append)

    def forward(self, stream, message: ControlMessage) -> None:
        self.forwarded.append((stream.id, message))
        self.streams[stream.id] = stream
        self.recorders[stream.id] = Recorder()
        stream.attach(self.recorders[stream.id])

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected

    def ready_result(self):
        return self._ready[0] if self._ready else None

    def lost_result(self):
        return self._lost[0] if self._lost else None

    def finish(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone("test over")))
        assert self.clock.getDelayedCalls() == []


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def test_connect_request_matches_go() -> None:
    """Request line, Host and identifier header as Go's req.Write lays them out."""
    client = ClientHarness("app", "127.0.0.1:18081")
    ours = client.connect_request
    go, _ = split_head(vector("b_get_echo", "client_to_server.bin"))
    assert ours.startswith(b"CONNECT /_controlPath/ HTTP/1.1\r\n")
    assert ours.endswith(b"\r\n\r\n") and ours.count(b"\r\n\r\n") == 1
    start, headers, end = _parse_head(ours, 0)
    assert end == len(ours)
    msg = Message(start, headers, b"")
    go_start, go_headers, _ = _parse_head(go, 0)
    go_msg = Message(go_start, go_headers, b"")
    assert start == go_start
    assert msg.names == go_msg.names == {"host", "user-agent", "x-ktunnel-identifier"}
    assert msg.get("host") == go_msg.get("host") == ["127.0.0.1:18081"]
    assert msg.get("X-KTUNNEL-IDENTIFIER") == go_msg.get("x-ktunnel-identifier") == ["app"]
    assert client.take() == b""
    client.finish()


def expected_client_frames(rec: Recording) -> list:
    """What our client itself sends before any tunnel traffic: Go's SYNs and handshake."""
    out = []
    for _, d, h, body in rec.events:
        if d != "c2s":
            continue
        if h.stream_id == 1 or (h.type == TYPE_WINDOW_UPDATE and h.flags & FLAG_SYN):
            out.append((h, body))
    return out


def replay_into_client(name: str, cuts: list[int]) -> None:
    rec = Recording(name)
    s2c = vector(name, "server_to_client.bin")
    client = ClientHarness()
    reply_end = len(CONNECTED)
    with logged_failures() as failures:
        fed = 0
        for piece in chunks_of(s2c, cuts):
            client.feed(piece)
            fed += len(piece)
            if fed < reply_end:
                # not a single yamux byte before the whole reply was read
                assert client.transport.value() == b""
            # ready exactly once controlOk (the end of the 2nd frame) is in
            assert (client.ready_result() is not None) == (fed >= reply_end + 12 + 12 + 9)
    assert failures == [], failure_texts(failures)
    assert client.ready_result() is client.protocol
    ours = split_frames(client.take())
    # stream 1: WindowUpdate(SYN), then one Data frame "controlHandshake"
    assert ours[:2] == [
        (Header(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0), b""),
        (Header(0, TYPE_DATA, 0, 1, 16), b"controlHandshake"),
    ]
    assert [(h, b) for h, b in ours if h.flags or h.type != TYPE_WINDOW_UPDATE] == (
        expected_client_frames(rec)
    )
    # one stream per control message, in message order, forwarder told which
    ports = re.findall(rb'"localPort":(\d+)', rec.payloads("s2c")[1])
    messages = [ControlMessage(1, 1, int(port)) for port in ports]
    assert client.forwarded == list(zip(range(3, 3 + 2 * len(messages), 2), messages, strict=True))
    # every byte the Go server sent into a tunnel stream reached the forwarder's
    # protocol, and the server's FIN arrived as a half-close
    for sid, payload in rec.payloads("s2c").items():
        if sid != 1:
            assert bytes(client.recorders[sid].data) == payload
            assert client.recorders[sid].eof
    # the origin's answer goes back frame-shaped like Go's: Data..., FIN
    for sid, payload in rec.payloads("c2s").items():
        if sid != 1:
            client.streams[sid].write(payload)
            client.streams[sid].loseConnection()
    go_c2s = [(h, b) for _, d, h, b in rec.events if d == "c2s" and h.type != TYPE_GO_AWAY]
    assert tokens(ours + split_frames(client.take())) == tokens(go_c2s)
    assert not client.closing
    client.finish()


def _client_replay(name: str):
    @WIRE
    @given(cuts=st.lists(st.integers(0, 2**20), max_size=12))
    def test(cuts) -> None:
        replay_into_client(name, cuts)

    test.__doc__ = f"{name}: the Go server's bytes, cut anywhere, drive our client."
    return test


test_go_server_into_client_b_get_echo = _client_replay("b_get_echo")
test_go_server_into_client_b2_two_requests = _client_replay("b2_two_requests")
test_go_server_into_client_c_post_100k = _client_replay("c_post_100k")
test_go_server_into_client_l_chunked = _client_replay("l_chunked")
test_go_server_into_client_m_no_local_server = _client_replay("m_no_local_server")


@pytest.mark.parametrize(
    "reply",
    [
        CONNECTED,
        b"HTTP/1.1 200 Connected to Tunnel\r\n\r\n",
        b"HTTP/1.1 200 Connected to Tunnel\r\nX-Extra: 1\r\n\r\n",
    ],
    ids=["lf", "crlf", "crlf-with-header"],
)
@pytest.mark.parametrize("together", [True, False], ids=["same-chunk", "own-chunk"])
def test_reply_variants_then_frames(reply, together) -> None:
    """The frames after the reply, in its chunk or not, reach the session whole."""
    s2c = vector("b_get_echo", "server_to_client.bin")
    frames = s2c[len(CONNECTED) :]
    client = ClientHarness()
    if together:
        client.feed(reply + frames)
    else:
        for i in range(len(reply)):
            client.feed(reply[i : i + 1])
            if i < len(reply) - 1:
                assert client.take() == b""
        client.feed(frames)
    assert client.ready_result() is client.protocol
    assert client.forwarded == [(3, ControlMessage(1, 1, 0))]
    assert client.recorders[3].data == Recording("b_get_echo").payloads("s2c")[3]
    client.finish()


def test_when_ready_waits_for_the_whole_control_ok() -> None:
    s2c = vector("b_get_echo", "server_to_client.bin")
    ok_end = len(CONNECTED) + 12 + 12 + 9
    client = ClientHarness()
    client.feed(s2c[: ok_end - 1])
    assert client.ready_result() is None
    client.clock.advance(9.9)
    assert client.ready_result() is None and not client.closing
    client.feed(s2c[ok_end - 1 : ok_end])
    assert client.ready_result() is client.protocol
    client.clock.advance(10)  # the handshake timer is gone: nothing happens
    assert not client.closing
    client.finish()


@pytest.mark.parametrize("cut", [0, 17, 159, 160, 200, 228, 229])
def test_refused_connect_fails_when_ready(cut) -> None:
    """h: a non-200 reply fails the attempt with the status and the body."""
    s2c = vector("h_unknown_ident", "server_to_client.bin")
    client = ClientHarness("nobody")
    with logged_failures() as failures:
        for piece in (s2c[:cut], s2c[cut:]):
            if piece:
                client.feed(piece)
    assert failures == []
    assert client.take() == b""  # no yamux frames, ever
    assert client.closing  # the whole body (Content-Length) was read
    client.finish()
    result = client.ready_result()
    assert isinstance(result, Failure)
    assert result.check(TunnelServerError)
    text = str(result.value)
    assert "status=502" in text
    # Go's text names the identifier; the error (which gets logged) shows its fingerprint
    assert f"no host associated for identifier {redact('nobody')}. please use" in text
    assert "nobody" not in text
    assert isinstance(client.lost_result(), TunnelServerError)


def test_refused_connect_closed_by_server_before_content_length() -> None:
    """A 502 whose body is cut by the close still reports what was read."""
    s2c = vector("j_duplicate_ident", "server_to_client.1.bin")
    client = ClientHarness()
    client.feed(s2c[:-5])
    assert not client.closing
    client.finish()
    result = client.ready_result()
    assert result.check(TunnelServerError)
    text = str(result.value)
    assert "status=502" in text and f"control conn for {redact(client.protocol.identifier)}" in text


# -- C. bad input ----------------------------------------------------------------------------


def ready_client() -> ClientHarness:
    """A client whose control handshake with the (recorded) Go server is done."""
    s2c = vector("b_get_echo", "server_to_client.bin")
    client = ClientHarness()
    client.feed(s2c[: len(CONNECTED) + 12 + 12 + 9])
    assert client.ready_result() is client.protocol
    client.take()
    return client


def control_frames(payload: bytes, sizes: list[int]) -> bytes:
    """``payload`` as Data frames on stream 1, cut after the given sizes."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(payload)]:
        piece = payload[pos : pos + max(1, size)]
        if piece:
            out += data_frame(1, piece)
        pos += len(piece)
        if pos >= len(payload):
            break
    if pos < len(payload):
        out += data_frame(1, payload[pos:])
    return bytes(out)


GOOD_MESSAGE = st.builds(
    lambda a, p, port: b'{"action":%d,"transportProtocol":%d,"localPort":%d}\n' % (a, p, port),
    st.just(1),
    st.sampled_from([1, 2, 3]),
    st.integers(0, 65535),
)
WRONG_VALUE = st.sampled_from([b'"80"', b"true", b"1.5", b"[1]", b'{"a":1}', b"1e3", b'""'])
BAD_MESSAGE = st.one_of(
    # a field of the wrong type or out of range: Go's decoder fails
    st.builds(
        lambda field, value: b'{"%s":%s}' % (field, value),
        st.sampled_from([b"action", b"transportProtocol", b"localPort"]),
        WRONG_VALUE,
    ),
    # not JSON at all, or not an object
    st.sampled_from(
        [
            b"}",
            b"nope\n",
            b'{"action":1,,}',
            b'{"action" 1}',
            b"{action:1}",
            b'{"action":1]',
            b"[1,2]\n",
            b'"text"\n',
            b"\xff\xfe\n",
            b"12 ",
        ]
    ),
    # a line that never ends, longer than the 64 KiB the decoder buffers
    st.builds(
        lambda n, kind: {
            "string": b'{"x":"' + b"a" * n,
            "array": b'{"x":[' + b"1," * (n // 2),
            "nested": b'{"action":1,"x":{"y":"' + b"z" * n,
        }[kind],
        st.integers(64 * 1024, 200 * 1024),
        st.sampled_from(["string", "array", "nested"]),
    ),
)


@WIRE
@given(
    good=st.lists(GOOD_MESSAGE, max_size=3),
    bad=BAD_MESSAGE,
    sizes=st.lists(st.integers(1, 40_000), max_size=6),
)
def test_bad_control_message_tears_the_client_session_down(good, bad, sizes) -> None:
    client = ready_client()
    # the good messages end with their frame (see test_messages_before_garbage_in_one_frame)
    frames = control_frames(b"".join(good), sizes) if good else b""
    with logged_failures() as failures:
        client.feed(frames + control_frames(bad, sizes))
    assert failures == [], failure_texts(failures)
    # the messages before the bad one were obeyed, in order
    assert [m for _, m in client.forwarded] == [
        ControlMessage(*map(int, re.findall(rb"\d+", m))) for m in good
    ]
    assert client.closing, f"session kept after {bad[:60]!r}"
    frames = split_frames(client.take())
    # the control stream was reset and the session said GoAway (or just dropped)
    assert (Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0), b"") in frames
    client.finish()
    assert client.lost_result() is not None


def test_messages_before_garbage_in_one_frame() -> None:
    client = ready_client()
    client.feed(data_frame(1, b'{"action":1,"transportProtocol":1,"localPort":80}\n}'))
    try:
        assert client.closing
        assert client.forwarded == [(3, ControlMessage(1, 1, 80))]
    finally:
        client.finish()


@pytest.mark.parametrize(
    "payload",
    [b"[" * 5000, b'{"localPort":' + b"9" * 5000 + b"}"],
    ids=["deep-nesting", "huge-integer"],
)
def test_pathological_json_is_a_clean_decode_error(payload) -> None:
    client = ready_client()
    with logged_failures() as failures:
        client.feed(data_frame(1, payload))
    try:
        assert client.closing
        assert failures == [], failure_texts(failures)
    finally:
        client.finish()


def test_whitespace_and_split_messages_are_fine() -> None:
    """What Go's json.Decoder accepts does not tear the session down."""
    client = ready_client()
    payload = (
        b'  \n{"action":1,"transportProtocol":1,"localPort":80}'
        b'{"action":1,"transportProtocol":3,"localPort":0,"extra":"x"}\n\t'
        b'{"localPort": 443, "action": 1, "transportProtocol": 2}\n' + b" " * 100_000
    )
    client.feed(control_frames(payload, [5, 37, 1, 60]))
    assert not client.closing
    assert client.forwarded == [
        (3, ControlMessage(1, 1, 80)),
        (5, ControlMessage(1, 3, 0)),
        (7, ControlMessage(1, 2, 443)),
    ]
    client.finish()


def connect_head(identifier: bytes = b"app") -> bytes:
    return (
        b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: 127.0.0.1:18081\r\n"
        b"User-Agent: Go-http-client/1.1\r\nX-Ktunnel-Identifier: " + identifier + b"\r\n\r\n"
    )


@WIRE
@given(
    version=st.integers(1, 255),
    tail=st.binary(min_size=11, max_size=200),  # at least one whole header
    same_chunk=st.booleans(),
)
def test_garbage_after_connect_drops_the_session(version, tail, same_chunk) -> None:
    """Bytes that are not yamux: the session closes, silently (the peer never spoke)."""
    harness = ServerHarness()
    conn = harness.connect()
    garbage = bytes([version]) + tail
    with logged_failures() as failures:
        if same_chunk:
            conn.feed(connect_head() + garbage)
        else:
            conn.feed(connect_head())
            conn.feed(garbage)
    assert failures == [], failure_texts(failures)
    out = conn.take()
    assert out.startswith(CONNECTED)
    assert out[len(CONNECTED) :] in (b"", frame(TYPE_GO_AWAY, 0, 0, 1))
    assert conn.closing
    harness.finish()
    assert harness.server.connection("app") is None
    assert harness.server.state("app") == ClientState.CLOSED


@WIRE
@given(
    ftype=st.integers(4, 255),
    rest=st.binary(min_size=10, max_size=10),
    tail=st.binary(max_size=100),
)
def test_garbage_after_a_valid_frame_says_go_away_1(ftype, rest, tail) -> None:
    """Once the client spoke yamux, a protocol error is answered with GoAway(1)."""
    harness = ServerHarness()
    conn = harness.connect()
    conn.feed(connect_head())
    conn.take()
    with logged_failures() as failures:
        conn.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + bytes([0, ftype]) + rest + tail)
    assert failures == [], failure_texts(failures)
    frames = split_frames(conn.take())
    assert frames[0] == (Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0), b"")
    assert frames[-1] == (Header(0, TYPE_GO_AWAY, 0, 0, 1), b"")
    assert conn.closing
    harness.finish()


def test_client_sending_garbage_on_the_control_stream_is_dropped() -> None:
    """Go's server closes on any decode error of the (unused) client->server JSON."""
    harness = ServerHarness()
    conn = establish(harness)
    assert harness.server.state("app") == ClientState.CONNECTED
    with logged_failures() as failures:
        conn.feed(data_frame(1, b"this is not json\n"))
    assert failures == []
    assert conn.closing
    frames = split_frames(conn.take())
    assert (Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0), b"") in frames
    harness.finish()
    assert harness.server.state("app") == ClientState.CLOSED


HANDSHAKES = {
    "never-opened": b"",
    "syn-only": frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0),
    "short": frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + data_frame(1, b"control"),
    "syn-on-empty-data": data_frame(1, b"", FLAG_SYN),
}


@pytest.mark.parametrize("sent", list(HANDSHAKES), ids=list(HANDSHAKES))
def test_server_handshake_timeout(sent) -> None:
    harness = ServerHarness()
    conn = harness.connect()
    conn.feed(connect_head() + HANDSHAKES[sent])
    conn.take()
    harness.clock.advance(harness.server.control_timeout - 0.001)
    assert not conn.closing
    harness.clock.advance(0.001)
    assert conn.closing
    assert b"controlOk" not in conn.take()
    assert harness.server.state("app") == ClientState.UNKNOWN  # never connected
    harness.finish()
    assert harness.server.connection("app") is None
    assert harness.server.state("app") == ClientState.CLOSED


@pytest.mark.parametrize("wrong", [b"controlHandshakX", b"CONTROLHANDSHAKE", b"x"])
def test_server_wrong_handshake_closes_at_once(wrong) -> None:
    harness = ServerHarness()
    conn = harness.connect()
    conn.feed(connect_head() + frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + data_frame(1, wrong))
    assert conn.closing
    frames = split_frames(conn.take()[len(CONNECTED) :])
    assert (Header(0, TYPE_DATA, 0, 1, 9), b"controlOk") not in frames
    assert (Header(0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0), b"") in frames
    harness.finish()


CLIENT_STALLS = {
    "no-reply": b"",
    "partial-reply": CONNECTED[:-1],
    "reply-only": CONNECTED,
    "ack-only": CONNECTED + frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0),
    "short-ok": CONNECTED + frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0) + data_frame(1, b"contr"),
}


@pytest.mark.parametrize("sent", list(CLIENT_STALLS), ids=list(CLIENT_STALLS))
def test_client_handshake_timeout(sent) -> None:
    client = ClientHarness()
    client.feed(CLIENT_STALLS[sent])
    client.clock.advance(9.999)
    assert not client.closing and client.ready_result() is None
    client.clock.advance(0.001)
    assert client.transport.disconnected  # aborted
    client.finish()
    result = client.ready_result()
    assert isinstance(result, Failure)
    if sent in ("no-reply", "partial-reply"):
        assert result.check(HandshakeTimeout)
    assert client.forwarded == []


@pytest.mark.parametrize("wrong", [b"controlNo", b"CONTROLOK", b"x"])
def test_client_wrong_control_ok_fails_at_once(wrong) -> None:
    client = ClientHarness()
    client.feed(CONNECTED + frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0) + data_frame(1, wrong))
    assert client.transport.disconnected
    client.finish()
    result = client.ready_result()
    assert isinstance(result, Failure)
    assert "handshake" in str(result.value)


def test_client_rejects_a_200_with_another_status_text() -> None:
    """Go demands Status == "200 Connected to Tunnel" exactly."""
    client = ClientHarness()
    client.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert client.take() == b""
    assert client.closing
    client.finish()
    result = client.ready_result()
    assert result.check(TunnelServerError)
    assert "status=200" in str(result.value) and "body=hi" in str(result.value)
