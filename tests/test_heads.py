"""HeadScanner: heads in any number of pieces, bounded, in linear time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.heads import HeadScanner, HeadTooLarge

SETTINGS = settings(max_examples=200, deadline=None)


def scan(pieces: list[bytes], **kwargs) -> tuple[list[bytes], bool]:
    """(heads found, whether it failed), reading heads one after another."""
    scanner = HeadScanner(**kwargs)
    heads: list[bytes] = []
    for piece in pieces:
        end = 0
        try:
            while (found := scanner.feed(piece, end)) is not None:
                head, end = found
                heads.append(head)
        except HeadTooLarge:
            return heads, True
    return heads, False


def reference(data: bytes, limit: int, bare_lf: bool = False, max_line: int | None = None):
    """The same, the naive way: the whole input at once, searched from each head's start."""
    ends = (b"\r\n\r\n", b"\n\n") if bare_lf else (b"\r\n\r\n",)
    heads: list[bytes] = []
    pos = used = 0
    while pos < len(data):
        found = [i + len(e) for e in ends if (i := data.find(e, pos)) >= 0]
        end = min(found) if found else None
        upto = len(data) if end is None else end
        # more than `limit` bytes arrived while no head was complete
        if used + (upto - pos) - (end is not None) > limit:
            return heads, True
        if max_line is not None and max(map(len, data[pos:upto].split(b"\n"))) > max_line:
            return heads, True
        if end is None:
            return heads, False
        heads.append(data[pos:end])
        used += end - pos
        pos = end
    return heads, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# short inputs made mostly of the bytes that matter
heady = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"HTTP/1.1 103 x", b": ", b"\r\n\r\n"]),
    max_size=40,
).map(b"".join)


@SETTINGS
@given(
    data=heady,
    cuts=st.lists(st.integers(0, 400), max_size=12),
    limit=st.integers(0, 60),
    bare_lf=st.booleans(),
    max_line=st.none() | st.integers(0, 20),
)
def test_any_split_gives_the_result_of_one_piece(data, cuts, limit, bare_lf, max_line):
    kwargs = dict(limit=limit, bare_lf=bare_lf, max_line=max_line)
    whole = scan([data], **kwargs)
    assert scan(split(data, cuts), **kwargs) == whole
    assert scan([data[i : i + 1] for i in range(len(data))], **kwargs) == whole
    assert whole == reference(data, **kwargs)


@pytest.mark.parametrize(
    ("data", "bare_lf", "end"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\nbody", False, 19),
        (b"HTTP/1.1 200 OK\n\nbody", False, None),
        (b"HTTP/1.1 200 OK\n\nbody", True, 17),
        (b"HTTP/1.1 200 OK\r\n\nbody", True, 18),  # whichever blank line ends first
        (b"HTTP/1.1 200 OK\n\r\n\r\nbody", True, 20),
        (b"HTTP/1.1 200 OK\n\r\nbody", True, None),  # as before: neither form
    ],
)
def test_blank_lines(data, bare_lf, end):
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
        heads, failed = scan(pieces, limit=100, bare_lf=bare_lf)
        assert not failed
        assert heads == ([] if end is None else [data[:end]])


def test_the_bound_is_on_bytes_held_without_a_complete_head():
    """As the old byte-by-byte check: a head may end on the byte after the bound."""
    head = b"HTTP/1.1 200 OK\r\nX: " + b"x" * 30 + b"\r\n\r\n"
    for pieces in ([head], [head[i : i + 1] for i in range(len(head))]):
        assert scan(pieces, limit=len(head) - 1) == ([head], False)
        assert scan(pieces, limit=len(head) - 2) == ([], True)
    assert scan([head[:-1]], limit=len(head) - 1) == ([], False)  # still waiting
    assert scan([head[:-1] + b"x"], limit=len(head) - 2) == ([], True)


def test_interim_heads_share_the_bound():
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\n\r\n"
    data = interim * 3 + final
    assert scan([data], limit=len(data) - 1) == ([interim] * 3 + [final], False)
    assert scan([data], limit=len(data) - 2) == ([interim] * 3, True)


def test_line_bound_counts_the_bytes_before_newline():
    ok = b"HTTP/1.1 200\r\nX: " + b"x" * 10 + b"\r\n\r\n"  # the longest line: 14 bytes with \r
    assert scan([ok], limit=100, max_line=14) == ([ok], False)
    assert scan([ok], limit=100, max_line=13) == ([], True)
    # a line that is still unfinished fails as soon as it is too long
    assert scan([ok[:27]], limit=100, max_line=13) == ([], False)
    assert scan([ok[:28]], limit=100, max_line=13) == ([], True)


# -- linear work -------------------------------------------------------------------------------

KiB = 1024


def big_head(size: int, line: bytes = b"X-Filler: " + b"f" * 50 + b"\r\n") -> bytes:
    head = b"HTTP/1.1 200 OK\r\n" + line * (size // len(line) + 1)
    return head[: size - 4] + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("kwargs", "piece"),
    [
        (dict(limit=64 * KiB, max_line=16 * KiB), 1),
        (dict(limit=64 * KiB), 1),
        (dict(limit=64 * KiB, bare_lf=True), 1),
        (dict(limit=64 * KiB, max_line=16 * KiB, bare_lf=True), 7),
    ],
    ids=["lines-bounded", "crlf", "bare-lf", "all-7-byte-pieces"],
)
def test_work_is_linear_in_the_head(kwargs, piece):
    """Each piece is searched once (plus three bytes kept from before), never the whole head."""
    head = big_head(64 * KiB)
    scanner = HeadScanner(**kwargs)
    found = None
    for i in range(0, len(head), piece):
        assert found is None
        found = scanner.feed(head[i : i + piece])
    assert found == (head, len(head) - (len(head) - 1) // piece * piece)
    assert scanner.examined <= 8 * len(head)


def test_work_is_linear_for_many_interim_heads_in_one_piece():
    """No copy of the rest per head: thousands of 1xx heads in one piece cost one pass."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    data = interim * (60 * KiB // len(interim)) + b"HTTP/1.1 200 OK\r\n\r\n"
    heads, failed = scan([data], limit=64 * KiB, max_line=16 * KiB)
    assert not failed and len(heads) == len(data) // len(interim) + 1
    scanner = HeadScanner(64 * KiB, max_line=16 * KiB)
    end = 0
    while (found := scanner.feed(data, end)) is not None:
        end = found[1]
    assert end == len(data)
    assert scanner.examined <= 4 * len(data)


def test_a_huge_piece_is_looked_at_only_up_to_the_bound():
    scanner = HeadScanner(64 * KiB)
    with pytest.raises(HeadTooLarge):
        scanner.feed(b"x" * (16 * 1024 * KiB))
    assert scanner.examined <= 2 * 64 * KiB


def test_a_long_line_fed_byte_by_byte_is_linear():
    scanner = HeadScanner(64 * KiB, max_line=16 * KiB)
    line = b"HTTP/1.1 200 OK\r\nX-Long: " + b"l" * (16 * KiB)
    with pytest.raises(HeadTooLarge):
        for i in range(len(line)):
            scanner.feed(line[i : i + 1])
    assert i < 16 * KiB + 30
    assert scanner.examined <= 8 * len(line)
