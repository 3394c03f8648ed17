"""Replay the Go recordings in tests/vectors against our yamux session.

For each recording and each role, our session stands in for one Go peer:
the other peer's frames are fed to it at their recorded times (on a Clock),
and the application actions the Go peer took (open a stream, write a body,
FIN, GoAway) are performed on our streams at the times its frames appear.
What our session then emits must match the Go peer's frames one for one:
type, flags, stream id and body; window-credit updates, which depend on when
the application reads, are checked against the yamux rules instead.
"""

from __future__ import annotations

import bisect
import collections

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER_SIZE,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    Header,
    decode,
)

from .helpers import VECTORS, Wire

CONNECTED = b"HTTP/1.1 200 Connected to Tunnel\n\n"
SCENARIOS = [
    "a_idle_close",
    "a2_keepalive",
    "b_get_echo",
    "b2_two_requests",
    "c_post_100k",
    "c2_post_100k_expect",
    "d_get_1mib",
    "e_websocket",
    "f_tcp_echo",
    "i_origin_short",
    "k_close_delimited",
    "l_chunked",
    "m_no_local_server",
]


class Recording:
    """The yamux frames of both directions of one recorded connection, timed."""

    def __init__(self, name: str) -> None:
        folder = VECTORS / name
        c2s = (folder / "client_to_server.bin").read_bytes()
        s2c = (folder / "server_to_client.bin").read_bytes()
        head_end = c2s.index(b"\r\n\r\n") + 4
        assert s2c.startswith(CONNECTED)
        chunks = collections.defaultdict(list)
        for line in (folder / "chunks.log").read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                chunks[parts[1]].append((int(parts[2]), float(parts[0]) / 1000.0))
        self.events = []  # (time, direction, header, body)
        for direction, data, skip in (("c2s", c2s, head_end), ("s2c", s2c, len(CONNECTED))):
            offsets = [o for o, _ in chunks[direction]]
            times = [t for _, t in chunks[direction]]
            pos = skip
            while pos + HEADER_SIZE <= len(data):
                h = decode(data[pos : pos + HEADER_SIZE])
                t = times[bisect.bisect_right(offsets, pos) - 1]
                start = pos + HEADER_SIZE
                body = data[start : start + h.length] if h.type == TYPE_DATA else b""
                self.events.append((t, direction, h, body))
                pos += HEADER_SIZE + len(body)
            assert pos == len(data), f"{name} {direction}: trailing bytes"
        self.events.sort(key=lambda e: e[0])

    def payloads(self, direction: str) -> dict[int, bytes]:
        out: dict[int, bytearray] = collections.defaultdict(bytearray)
        for _, d, h, body in self.events:
            if d == direction and h.type == TYPE_DATA:
                out[h.stream_id] += body
        return {sid: bytes(b) for sid, b in out.items()}


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Consumes everything at once and records it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.lost = reason


def is_credit(h: Header) -> bool:
    return h.type == TYPE_WINDOW_UPDATE and h.flags == 0


def replay(name: str, we_are_client: bool):
    rec = Recording(name)
    ours, theirs = ("c2s", "s2c") if we_are_client else ("s2c", "c2s")
    # a2's second ping round is delayed 20 s in the recording; allow it.
    config = YamuxConfig(max_frame_size=32768, keepalive_timeout=30.0)
    wire = Wire(we_are_client, config=config, quiet_until_peer_speaks=not we_are_client)
    session = wire.session
    streams = {}
    recorders = {}

    def accept(stream):
        recorders[stream.id] = Recorder()
        streams[stream.id] = stream
        stream.attach(recorders[stream.id])

    session.set_stream_handler(accept)
    expected = []
    for t, direction, h, body in rec.events:
        wire.clock.advance(max(0.0, t - wire.clock.seconds()))
        if direction == theirs:
            wire.feed(h_bytes(h) + body)
            continue
        expected.append((h, body))
        if h.type == TYPE_WINDOW_UPDATE and h.flags & FLAG_SYN:
            stream = session.open_stream()
            assert stream.id == h.stream_id
            streams[stream.id] = stream
            recorders[stream.id] = Recorder()
            stream.attach(recorders[stream.id])
        elif h.type == TYPE_DATA:
            streams[h.stream_id].write(body)
        if h.flags & FLAG_FIN:
            streams[h.stream_id].loseWriteConnection()
        if h.flags & FLAG_RST and h.type != TYPE_PING:
            streams[h.stream_id].abortConnection()
        if h.type == TYPE_GO_AWAY:
            session.go_away(h.length)
    return rec, wire, expected, recorders, ours, theirs


def h_bytes(h: Header) -> bytes:
    from tunnel.yamux.frame import encode

    return encode(h.type, h.flags, h.stream_id, h.length)


def _present(name: str) -> bool:
    return (VECTORS / name / "client_to_server.bin").exists()


@pytest.mark.parametrize("we_are_client", [False, True], ids=["as-server", "as-client"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_replay_matches_go(name: str, we_are_client: bool) -> None:
    assert _present(name), f"missing recording {VECTORS / name}"
    rec, wire, expected, recorders, ours, theirs = replay(name, we_are_client)
    emitted = wire.sent()
    assert not wire.transport.disconnecting, "the session closed during a valid exchange"

    def comparable(frames):
        out = []
        for h, body in frames:
            if is_credit(h):
                continue
            out.append((h.type, h.flags, h.stream_id, h.length, bytes(body)))
        return out

    want, got = comparable(expected), comparable(emitted)
    if name == "a2_keepalive":
        # ping rounds interleave by timer; the frames themselves must agree
        assert collections.Counter(got) == collections.Counter(want)
    else:
        assert got == want

    # every byte the peer sent reached our stream's protocol, in order
    for sid, payload in rec.payloads(theirs).items():
        assert bytes(recorders[sid].data) == payload, f"stream {sid} payload differs"

    # credit: each update at least half a window, and the peer never needed more
    for h, _ in emitted:
        if is_credit(h):
            assert h.length >= INITIAL_WINDOW // 2

    wire.lose()
    assert wire.clock.getDelayedCalls() == []


def test_first_frames_are_golden() -> None:
    """spec.md 1.3 and 1.6: a client's first stream and keepalive, byte for byte."""
    wire = Wire(True)
    stream = wire.session.open_stream()
    stream.write(b"controlHandshake")
    assert (
        wire.transport.value()
        == bytes.fromhex("000100010000000100000000000000000000000100000010") + b"controlHandshake"
    )
    wire.transport.clear()
    wire.clock.advance(30)
    assert wire.transport.value() == bytes.fromhex("000200010000000000000000")
    wire.lose()


def test_server_acks_and_answers_handshake_byte_exact() -> None:
    """a_idle_close, server role: our reply is exactly the Go server's bytes."""
    rec_dir = VECTORS / "a_idle_close"
    c2s = (rec_dir / "client_to_server.bin").read_bytes()
    s2c = (rec_dir / "server_to_client.bin").read_bytes()
    frames = c2s[c2s.index(b"\r\n\r\n") + 4 :]
    wire = Wire(False, quiet_until_peer_speaks=True)

    class Handshake(Protocol):
        buf = b""

        def dataReceived(self, data):
            self.buf += data
            if self.buf == b"controlHandshake":
                self.transport.write(b"controlOk")

    wire.session.set_stream_handler(lambda s: s.attach(Handshake()))
    assert wire.transport.value() == b""
    wire.feed(frames[:-HEADER_SIZE])  # everything but the final GoAway
    assert wire.transport.value() == s2c[len(CONNECTED) :]
    wire.feed(frames[-HEADER_SIZE:])
    assert wire.session.remote_go_away == 0
    assert not wire.transport.disconnecting
    wire.lose()


def test_ack_delta_accepted() -> None:
    """Surprise 8: an ACK carrying a delta grows the send window."""
    wire = Wire(True)
    stream = wire.session.open_stream()
    wire.feed(h_bytes(Header(0, TYPE_WINDOW_UPDATE, FLAG_ACK, stream.id, 16)))
    assert stream.send_window == INITIAL_WINDOW + 16
    wire.lose()
