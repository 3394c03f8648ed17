"""Property tests: the codec round-trips, the parser ignores chunking, and no
input, however broken, makes a session raise or leave timers behind."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER,
    HEADER_SIZE,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameParser,
    Header,
    decode,
    encode,
)

from .helpers import VECTORS, Wire, data_frame, frame, split_frames

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)


# -- (a) the header codec -------------------------------------------------------


@FUZZ
@given(ftype=u8, flags=u16, sid=u32, length=u32)
def test_every_header_round_trips(ftype, flags, sid, length):
    raw = encode(ftype, flags, sid, length)
    assert len(raw) == HEADER_SIZE
    assert raw[0] == 0  # version
    h = decode(raw)
    assert h == Header(0, ftype, flags, sid, length)
    assert (h.type, h.flags, h.stream_id, h.length) == (ftype, flags, sid, length)
    assert encode(h.type, h.flags, h.stream_id, h.length) == raw
    assert str(h)  # printable for every value


@FUZZ
@given(version=u8, ftype=u8, flags=u16, sid=u32, length=u32)
def test_decode_reads_any_version_without_validating(version, ftype, flags, sid, length):
    raw = HEADER.pack(version, ftype, flags, sid, length)
    assert decode(raw) == Header(version, ftype, flags, sid, length)
    assert decode(raw + b"trailing") == decode(raw)


# -- (b) the parser does not care how the bytes are cut --------------------------

flag_bits = st.integers(0, 0xF) | u16
frames_st = st.lists(
    st.one_of(
        st.tuples(st.just(TYPE_DATA), flag_bits, u32, st.binary(max_size=300)),
        st.tuples(
            st.sampled_from([TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY]), flag_bits, u32, u32
        ),
    ),
    max_size=25,
)


class RecordingReceiver:
    """A FrameReceiver that records whole frames; skips bodies of ``skip`` ids."""

    def __init__(self, skip=frozenset()) -> None:
        self.frames: list[tuple[Header, bytes | None]] = []
        self.skip = skip
        self._current: Header | None = None
        self._body: list[bytes] = []

    def dataHeaderReceived(self, header):
        assert self._current is None, "a Data header inside another frame"
        self._current = header
        self._body = []
        if header.stream_id in self.skip:
            return None
        return self._body.append

    def dataFrameEnded(self, header):
        assert header == self._current
        body = None if header.stream_id in self.skip else b"".join(map(bytes, self._body))
        self.frames.append((header, body))
        self._current = None

    def controlFrameReceived(self, header):
        assert self._current is None, "a control header inside a Data frame"
        self.frames.append((header, b""))


def encode_frames(frames) -> tuple[bytes, list[tuple[Header, bytes]]]:
    wire = bytearray()
    expected = []
    for ftype, flags, sid, value in frames:
        if ftype == TYPE_DATA:
            wire += data_frame(sid, value, flags)
            expected.append((Header(0, ftype, flags, sid, len(value)), value))
        else:
            wire += frame(ftype, flags, sid, value)
            expected.append((Header(0, ftype, flags, sid, value), b""))
    return bytes(wire), expected


def cut(data: bytes, points) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


@FUZZ
@given(frames=frames_st, points=st.lists(st.integers(0, 2**16), max_size=40))
def test_parser_output_does_not_depend_on_chunking(frames, points):
    wire, expected = encode_frames(frames)
    whole = RecordingReceiver()
    parser = FrameParser(whole)
    parser.feed(wire)
    assert whole.frames == expected
    assert parser.idle

    pieces = RecordingReceiver()
    parser = FrameParser(pieces)
    for chunk in cut(wire, points):
        parser.feed(chunk)  # empty chunks included
    assert pieces.frames == expected
    assert parser.idle


@FUZZ
@given(frames=frames_st, points=st.lists(st.integers(0, 2**16), max_size=40), data=st.data())
def test_parser_skipped_bodies_keep_framing_in_step(frames, points, data):
    wire, expected = encode_frames(frames)
    sids = sorted({h.stream_id for h, _ in expected if h.type == TYPE_DATA})
    skip = frozenset(data.draw(st.sets(st.sampled_from(sids))) if sids else ())
    receiver = RecordingReceiver(skip)
    parser = FrameParser(receiver)
    for chunk in cut(wire, points):
        parser.feed(chunk)
    assert receiver.frames == [
        (h, None if h.type == TYPE_DATA and h.stream_id in skip else body) for h, body in expected
    ]


@FUZZ
@given(data=st.binary(max_size=64), byte_by_byte=st.booleans())
def test_parser_prefix_leaves_it_waiting_not_failing(data, byte_by_byte):
    """Any proper prefix of a valid frame sequence is consumed without events lost."""
    wire, expected = encode_frames([(TYPE_DATA, 0, 1, data), (TYPE_PING, FLAG_SYN, 0, 7)])
    receiver = RecordingReceiver()
    parser = FrameParser(receiver)
    prefix = wire[:-1]
    for chunk in [prefix[i : i + 1] for i in range(len(prefix))] if byte_by_byte else [prefix]:
        parser.feed(chunk)
    assert receiver.frames == expected[:1]
    assert not parser.idle
    parser.feed(wire[-1:])
    assert receiver.frames == expected
    assert parser.idle


# -- (c) a session fed garbage -----------------------------------------------------

CONNECTED = b"HTTP/1.1 200 Connected to Tunnel\n\n"
RECORDINGS = ["a2_keepalive", "b_get_echo", "b2_two_requests", "e_websocket", "f_tcp_echo"]


def _synthetic_from_client() -> bytes:
    """A valid exchange as a client peer sends it (odd ids) to our server."""
    return b"".join(
        [
            frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0),
            data_frame(1, b"controlHandshake"),
            frame(TYPE_PING, FLAG_SYN, 0, 0),
            data_frame(3, b"GET / HTTP/1.1\r\n\r\n", FLAG_SYN),
            frame(TYPE_WINDOW_UPDATE, 0, 3, 200_000),
            data_frame(3, b"more", FLAG_FIN),
            frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0),
            data_frame(5, b"x" * 1000, FLAG_SYN | FLAG_FIN),
            frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 7, 16),
            frame(TYPE_WINDOW_UPDATE, FLAG_RST, 7, 0),
            frame(TYPE_PING, FLAG_ACK, 0, 0),
            frame(TYPE_GO_AWAY, 0, 0, 0),
        ]
    )


def _synthetic_from_server() -> bytes:
    """A valid exchange as a server peer sends it to our client (which opened 1 and 3)."""
    return b"".join(
        [
            frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0),
            data_frame(1, b"controlOk"),
            data_frame(3, b"resp", FLAG_ACK),
            frame(TYPE_PING, FLAG_SYN, 0, 5),
            frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0),
            data_frame(2, b"pushed", FLAG_FIN),
            frame(TYPE_WINDOW_UPDATE, 0, 1, 131_072),
            frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 3, 0),
            frame(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0),
            frame(TYPE_PING, FLAG_ACK, 0, 0),
            frame(TYPE_GO_AWAY, 0, 0, 0),
        ]
    )


def _load_exchanges() -> dict[bool, list[bytes]]:
    """What the peer sends, keyed by our role (True: we are the client)."""
    out = {True: [_synthetic_from_server()], False: [_synthetic_from_client()]}
    for name in RECORDINGS:
        folder = VECTORS / name
        try:
            c2s = (folder / "client_to_server.bin").read_bytes()
            s2c = (folder / "server_to_client.bin").read_bytes()
        except OSError:
            continue
        out[False].append(c2s[c2s.index(b"\r\n\r\n") + 4 :])
        out[True].append(s2c[len(CONNECTED) :] if s2c.startswith(CONNECTED) else s2c)
    for role in out:
        for ex in out[role]:
            split_frames(ex)  # all whole and valid
    return out


EXCHANGES = _load_exchanges()


class Probe(Protocol):
    """A stream protocol; ``mode`` picks what it does with its input."""

    def __init__(self, mode: str, lost: list) -> None:
        self.mode = mode
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        if self.mode == "echo":
            self.transport.write(data)
        elif self.mode == "pause":
            self.transport.pauseProducing()
        elif self.mode == "abort":
            self.transport.abortConnection()
        elif self.mode == "close":
            self.transport.write(data * 3)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(self)


@implementer(IHalfCloseableProtocol)
class HalfProbe(Probe):
    def readConnectionLost(self) -> None:
        self.transport.write(b"bye")
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass


MODES = ["none", "echo", "pause", "abort", "close", "half"]


class Harness:
    """A session of either role with a chosen stream handler, on a Wire."""

    def __init__(self, is_client: bool, mode: str) -> None:
        config = YamuxConfig(
            keepalive_interval=5,
            keepalive_timeout=2,
            stream_open_timeout=7,
            stream_close_timeout=11,
            accept_backlog=4,
            max_streams=16,
            max_frame_size=1024,
        )
        self.wire = Wire(is_client, config=config)
        self.session = self.wire.session
        self.is_client = is_client
        self.protocols: list[Probe] = []
        self.lost: list[Probe] = []
        self.sent = bytearray()
        if mode != "none":
            cls = HalfProbe if mode == "half" else Probe
            proto_mode = "echo" if mode == "half" else mode

            def handler(stream):
                proto = cls(proto_mode, self.lost)
                self.protocols.append(proto)
                stream.attach(proto)

            self.session.set_stream_handler(handler)
        # our side opens two streams first, so the peer's ACKs have a target
        for _ in range(2):
            stream = self.session.open_stream()
            proto = Probe("echo", self.lost)
            self.protocols.append(proto)
            stream.attach(proto)
            stream.write(b"hello")
        self.queued = self.session.request_stream()
        self.queued.addErrback(lambda f: None)

    def feed(self, chunk: bytes, advance: float) -> None:
        self.session.dataReceived(chunk)
        self.sent += self.wire.transport.value()
        self.wire.transport.clear()
        if advance:
            self.wire.clock.advance(advance)

    def finish(self) -> None:
        self.session.connectionLost(Failure(ConnectionDone()))
        self.sent += self.wire.transport.value()
        assert self.session.closed
        assert self.session.streams == {}
        active = [c for c in self.wire.clock.getDelayedCalls() if c.active()]
        assert active == [], f"DelayedCalls left after connectionLost: {active}"
        # every stream protocol was told the end, exactly once
        assert sorted(map(id, self.lost)) == sorted(map(id, self.protocols))
        self.check_output()

    def check_output(self) -> None:
        """What we wrote is whole frames and keeps checklist 1.10 #5."""
        frames = split_frames(bytes(self.sent))
        ours = 1 if self.is_client else 0
        fins: set[int] = set()
        resets: set[int] = set()
        for h, _ in frames:
            assert h.version == 0 and h.type <= TYPE_GO_AWAY, h
            if h.type in (TYPE_DATA, TYPE_WINDOW_UPDATE):
                assert h.stream_id != 0, f"{h} on stream 0"
                if h.flags & FLAG_ACK:
                    assert h.stream_id & 1 != ours, f"ACK on our own stream: {h}"
                if h.stream_id in resets:
                    assert h.flags & FLAG_RST, f"{h} after RST"
                if h.flags & FLAG_FIN:
                    assert h.stream_id not in fins, f"second FIN: {h}"
                    fins.add(h.stream_id)
                if h.flags & FLAG_RST:
                    resets.add(h.stream_id)
            else:
                assert h.stream_id == 0, h


class LogErrors:
    """Collects logged failures (an exception caught inside the session)."""

    def __init__(self) -> None:
        self.failures: list = []

    def __call__(self, event) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)


chunks_st = st.lists(
    st.tuples(st.integers(1, 64), st.sampled_from([0, 0, 0, 0.5, 3, 6])), min_size=1, max_size=30
)


def run(is_client: bool, mode: str, data: bytes, chunking) -> None:
    with LogErrors() as errors:
        h = Harness(is_client, mode)
        pos = 0
        i = 0
        while pos < len(data):
            size, advance = chunking[i % len(chunking)]
            i += 1
            h.feed(data[pos : pos + size], advance)
            pos += size
        h.wire.clock.advance(1)
        h.finish()
    assert errors.failures == [], [f.getTraceback() for f in errors.failures]


@FUZZ
@given(
    is_client=st.booleans(),
    mode=st.sampled_from(MODES),
    data=st.binary(max_size=600),
    chunking=chunks_st,
)
def test_random_bytes_never_escape_data_received(is_client, mode, data, chunking):
    run(is_client, mode, data, chunking)


# ids and values near the ones a session actually uses, so frames hit live
# streams, outstanding pings and the window edge, not just unknown ids
near_sid = st.integers(0, 9) | u32
near_value = st.integers(0, 4) | st.integers(262_140, 262_150) | u32
session_frames_st = st.lists(
    st.one_of(
        st.tuples(st.just("data"), flag_bits, near_sid, st.binary(max_size=300)),
        st.tuples(st.just("ctl"), st.integers(1, 3), flag_bits, near_sid, near_value),
        # a bare header (any type, any length): what follows is read as its body
        st.tuples(st.just("raw"), st.integers(0, 5), flag_bits, near_sid, near_value),
    ),
    max_size=25,
)


def encode_session_frames(frames) -> bytes:
    out = bytearray()
    for f in frames:
        if f[0] == "data":
            _, flags, sid, body = f
            out += data_frame(sid, body, flags)
        else:
            _, ftype, flags, sid, value = f
            out += frame(ftype, flags, sid, value)
    return bytes(out)


@FUZZ
@given(
    is_client=st.booleans(),
    mode=st.sampled_from(MODES),
    frames=session_frames_st,
    chunking=chunks_st,
)
def test_well_formed_but_arbitrary_frames_never_escape(is_client, mode, frames, chunking):
    # well-framed headers with random type/flags/ids/values reach deeper than noise
    run(is_client, mode, encode_session_frames(frames), chunking)


mutation_st = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for op, where, value, blob in mutations:
        pos = where % (len(buf) + 1)
        if op == "flip" and buf:
            buf[pos % len(buf)] ^= 1 << (value % 8)
        elif op == "set" and buf:
            buf[pos % len(buf)] = value
        elif op == "insert":
            buf[pos:pos] = blob
        elif op == "delete":
            del buf[pos : pos + 1 + value % 16]
    return bytes(buf)


@FUZZ
@given(
    is_client=st.booleans(),
    mode=st.sampled_from(MODES),
    which=st.integers(0, 100),
    mutations=mutation_st,
    chunking=chunks_st,
)
def test_mutated_valid_exchanges_never_escape(is_client, mode, which, mutations, chunking):
    pool = EXCHANGES[is_client]
    run(is_client, mode, mutate(pool[which % len(pool)], mutations), chunking)


@settings(max_examples=50, deadline=None)
@given(is_client=st.booleans(), mode=st.sampled_from(MODES), chunking=chunks_st)
def test_unmutated_exchanges_keep_the_session_open(is_client, mode, chunking):
    """The seeds themselves are valid: no protocol error, however they are cut."""
    for exchange in EXCHANGES[is_client]:
        h = Harness(is_client, mode)
        pos, i = 0, 0
        while pos < len(exchange):
            size, _ = chunking[i % len(chunking)]
            i += 1
            h.feed(exchange[pos : pos + size], 0)
            pos += size
        sent = split_frames(bytes(h.sent))
        assert not any(hd.type == TYPE_GO_AWAY and hd.length for hd, _ in sent)
        assert not h.wire.transport.disconnecting
        h.finish()
