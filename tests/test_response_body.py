"""ResponseReader counts a Content-Length body itself (server/http1.py).

llhttp validates the head (one Content-Length, digits only); the body that
follows is then counted rather than fed through llhttp, so each piece the
stream delivers reaches the sink as it is (no copy, no callback per piece).
What llhttp would say about the same bytes must not change: the body, the
end of the response, and ``overrun`` (bytes after the complete response in
the piece that completes it), whatever the pieces.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.server.http1 import Framing, ResponseReader, _length

SETTINGS = settings(max_examples=300, deadline=None)


class Sink:
    def __init__(self) -> None:
        self.heads = []
        self.pieces: list[bytes] = []
        self.completed = 0

    def interim(self, head) -> None:
        self.heads.append(head)

    def final(self, head) -> None:
        self.heads.append(head)

    def upgraded(self, head, rest) -> None:
        raise AssertionError("no upgrade here")

    def body(self, data: bytes) -> None:
        assert self.completed == 0, "body after the end"
        self.pieces.append(data)

    def complete(self) -> None:
        self.completed += 1


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@SETTINGS
@given(
    body=st.binary(max_size=300),
    extra=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    interim=st.booleans(),
)
def test_a_content_length_body_is_the_same_however_it_is_cut(body, extra, cuts, interim):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: b\r\n\r\n" % len(body)
    if interim:
        head = b"HTTP/1.1 100 Continue\r\n\r\n" + head
    whole = head + body + extra
    sink = Sink()
    reader = ResponseReader(sink)
    end = len(head) + len(body)  # the response's last byte is whole[end - 1]
    overrun = False
    offset = 0
    for piece in cut(whole, cuts):
        reader.feed(piece)
        if offset < end <= offset + len(piece) and offset + len(piece) > end:
            overrun = True  # this piece completes the response and goes on
        offset += len(piece)
    assert b"".join(sink.pieces) == body
    assert all(sink.pieces)
    assert sink.completed == 1
    assert sink.heads[-1].framing is Framing.LENGTH
    assert reader.overrun is overrun


def test_body_pieces_reach_the_sink_as_they_are():
    sink = Sink()
    reader = ResponseReader(sink)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nabc")
    pieces = [b"defg", b"hijkl"]
    for piece in pieces:
        reader.feed(piece)
    assert sink.pieces[1:] == pieces
    assert all(a is b for a, b in zip(sink.pieces[1:], pieces, strict=True))
    assert sink.completed == 1 and not reader.overrun


def test_bytes_after_the_end_in_the_last_piece_are_an_overrun():
    sink = Sink()
    reader = ResponseReader(sink)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    reader.feed(b"loHTTP/1.1 200 OK\r\n")
    assert sink.pieces == [b"hel", b"lo"]
    assert sink.completed == 1 and reader.overrun
    reader.feed(b"more")  # complete: nothing is read any more
    assert sink.pieces == [b"hel", b"lo"]


def test_a_stopped_reader_passes_no_more_body():
    sink = Sink()
    reader = ResponseReader(sink)
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    reader.stop()
    reader.feed(b"67890")
    assert sink.pieces == [b"12345"] and sink.completed == 0


def test_eof_inside_a_content_length_body_is_an_error():
    from tunnel.server.http1 import OriginResponseError

    reader = ResponseReader(Sink())
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    with pytest.raises(OriginResponseError, match="middle of the body"):
        reader.eof()


@pytest.mark.parametrize(
    ("values", "length"),
    [
        ([b"0"], 0),
        ([b" 42\t"], 42),
        ([b"18446744073709551615"], 2**64 - 1),
        ([], None),
        ([b"1", b"1"], None),
        ([b"1,1"], None),
        ([b"-1"], None),
        ([b"0x10"], None),
        ([b"\xd9\xa3"], None),  # a non-ASCII digit
    ],
)
def test_only_one_plain_decimal_content_length_is_counted_here(values, length):
    """Anything else (llhttp refuses it before) would be left to llhttp."""

    class Head:
        def get(self, name):
            assert name == b"content-length"
            return values

    assert _length(Head()) == length
