"""The frame codec: golden headers, incremental parsing, skipping, errors."""

from __future__ import annotations

import pytest

from tunnel.yamux.errors import InvalidType, InvalidVersion, WindowExceeded
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    FrameParser,
    Header,
    decode,
    encode,
)


class Receiver:
    def __init__(self, skip=(), limit=None):
        self.events = []
        self.skip = set(skip)
        self.limit = limit

    def dataHeaderReceived(self, h):
        if self.limit is not None and h.length > self.limit:
            raise WindowExceeded("too big")
        self.events.append(("head", h))
        if h.stream_id in self.skip:
            return None
        return lambda chunk: self.events.append(("body", h.stream_id, bytes(chunk)))

    def dataFrameEnded(self, h):
        self.events.append(("end", h))

    def controlFrameReceived(self, h):
        self.events.append(("ctl", h))

    def bodies(self):
        out = {}
        for e in self.events:
            if e[0] == "body":
                out[e[1]] = out.get(e[1], b"") + e[2]
        return out


def test_golden_headers():
    # spec.md 1.1, from a Go client session
    assert encode(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0).hex() == "000100010000000100000000"
    assert encode(TYPE_DATA, 0, 1, 16).hex() == "000000000000000100000010"
    assert encode(TYPE_PING, FLAG_SYN, 0, 0).hex() == "000200010000000000000000"
    assert encode(TYPE_GO_AWAY, 0, 0, 1).hex() == "000300000000000000000001"
    assert decode(bytes.fromhex("000100040000000300000000")) == Header(0, 1, FLAG_FIN, 3, 0)
    assert str(Header(0, 1, FLAG_SYN | FLAG_ACK, 5, 7)) == "WindowUpdate[SYN|ACK] sid=5 len=7"


def test_bodies_are_delivered_in_arrival_pieces_without_reassembly():
    r = Receiver()
    p = FrameParser(r)
    body = bytes(range(256)) * 100
    wire = encode(TYPE_DATA, 0, 3, len(body)) + body + encode(TYPE_PING, FLAG_ACK, 0, 9)
    for i in range(0, len(wire), 1000):
        p.feed(wire[i : i + 1000])
    pieces = [e for e in r.events if e[0] == "body"]
    assert len(pieces) > 10  # streamed, not buffered whole
    assert r.bodies() == {3: body}
    assert r.events[-1] == ("ctl", Header(0, TYPE_PING, FLAG_ACK, 0, 9))
    assert p.idle


def test_whole_chunk_is_passed_through_without_copy():
    seen = []

    class Keep(Receiver):
        def dataHeaderReceived(self, h):
            return seen.append

    p = FrameParser(Keep())
    p.feed(encode(TYPE_DATA, 0, 1, 5))
    chunk = b"hello"
    p.feed(chunk)
    assert seen == [chunk] and seen[0] is chunk


def test_unknown_stream_body_is_skipped_and_framing_stays_in_step():
    r = Receiver(skip={7})
    p = FrameParser(r)
    p.feed(encode(TYPE_DATA, 0, 7, 4) + b"junk" + encode(TYPE_DATA, FLAG_FIN, 9, 2) + b"ok")
    assert r.bodies() == {9: b"ok"}
    ends = [e[1].stream_id for e in r.events if e[0] == "end"]
    assert ends == [7, 9]


def test_window_is_checked_from_the_header_before_any_body():
    r = Receiver(limit=10)
    p = FrameParser(r)
    with pytest.raises(WindowExceeded):
        p.feed(encode(TYPE_DATA, 0, 1, 2**32 - 1))
    p.feed(b"x" * 100)  # ignored after the error
    assert r.events == []


def test_empty_data_frame_ends_at_once():
    r = Receiver()
    FrameParser(r).feed(encode(TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, 0))
    assert [e[0] for e in r.events] == ["head", "end"]


@pytest.mark.parametrize(
    "raw, error",
    [
        (bytes.fromhex("010000000000000100000000"), InvalidVersion),
        (bytes.fromhex("000400000000000100000000"), InvalidType),
        (bytes.fromhex("00ff00000000000100000000"), InvalidType),
    ],
)
def test_malformed_headers_raise_typed_errors(raw, error):
    p = FrameParser(Receiver())
    p.feed(raw[:5])
    with pytest.raises(error):
        p.feed(raw[5:])
    p.feed(raw)  # the parser stays stopped
