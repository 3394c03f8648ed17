"""Fair sending: streams share a blocked connection round-robin, frame by frame."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tunnel.yamux import YamuxConfig, YamuxSession
from tunnel.yamux.frame import TYPE_DATA

from .helpers import Wire, split_frames


class SmallBufferTransport(StringTransport):
    """Pauses its producer once more than ``limit`` bytes wait, like TCP."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.blocked = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.limit and self.producer and not self.blocked:
            self.blocked = True
            self.producer.pauseProducing()

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def flush(self) -> bytes:
        out = self.value()
        self.clear()
        if self.blocked:
            self.blocked = False
            self.producer.resumeProducing()
        return out


def data_sids(frames) -> list[int]:
    return [h.stream_id for h, _ in frames if h.type == TYPE_DATA]


def test_blocked_streams_drain_round_robin_one_frame_each():
    w = Wire(True, config=YamuxConfig(max_frame_size=16384))
    streams = [w.session.open_stream() for _ in range(3)]
    w.sent()
    w.session.pauseProducing()
    for s in streams:
        s.write(b"x" * 100_000)
    assert data_sids(w.sent()) == []
    w.session.resumeProducing()
    frames = w.sent()
    assert data_sids(frames)[:9] == [1, 3, 5] * 3
    assert all(len(body) <= 16384 for _, body in frames)
    assert sum(len(body) for _, body in frames) == 300_000
    w.lose()


def test_a_big_writer_does_not_starve_a_small_one():
    clock = Clock()
    transport = SmallBufferTransport(limit=64 * 1024)
    session = YamuxSession(True, clock=clock, config=YamuxConfig(max_frame_size=16384))
    session.makeConnection(transport)
    big, small = session.open_stream(), session.open_stream()
    transport.flush()
    big.write(b"B" * 1024 * 1024)
    assert transport.blocked
    first = data_sids(split_frames(transport.flush()))
    assert set(first) == {big.id}
    assert transport.blocked  # the unblock let more of the big stream out
    small.write(b"hello")  # queued behind the blocked socket
    transport.flush()
    after_unblock = data_sids(split_frames(transport.value()))
    # the small stream gets its frame in the first round after the unblock
    assert small.id in after_unblock[:2]
    assert after_unblock.count(big.id) > 1
    session.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_frames_never_exceed_max_frame_size_or_window():
    w = Wire(False, config=YamuxConfig(max_frame_size=4096))
    w.feed(bytes.fromhex("000100010000000100000000"))  # peer opens stream 1
    stream = w.session.streams[1]
    w.sent()
    stream.write(b"z" * 300_000)
    frames = w.sent()
    sizes = [len(body) for h, body in frames if h.type == TYPE_DATA]
    assert max(sizes) == 4096
    assert sum(sizes) == 256 * 1024  # the initial window, not a byte more
    assert stream.buffered[0] == 300_000 - 256 * 1024
    w.lose()
