"""Every place that reads a head in pieces does work linear in its length.

Each test feeds a large head byte by byte to the real protocol object and
counts the bytes its HeadScanner examined (``examined``, kept by the scanner
itself); before the fix these places searched the whole buffer on every
piece, about n * n / 2 bytes for an n-byte head.  Each place also gets a
property: any split of the input ends the same way as one piece.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tunnel.client import protocol as client_protocol
from tunnel.client.protocol import MAX_REPLY, TunnelClientProtocol
from tunnel.koding.wire import MAX_MESSAGE_SIZE, MessageDecoder
from tunnel.server.http1 import MAX_RESPONSE_HEAD, OriginResponseError, ReadPhase, ResponseReader

SETTINGS = settings(max_examples=200, deadline=None)
KiB = 1024


def big_head(size: int, status: bytes = b"200 OK", last: bytes = b"") -> bytes:
    """A response head of exactly ``size`` bytes: 62-byte header lines, then ``last``."""
    start = b"HTTP/1.1 " + status + b"\r\n"
    line = b"X-Filler: " + b"f" * 50 + b"\r\n"
    count, pad = divmod(size - len(start) - len(last) - 2, len(line))
    head = start + line * (count - 1) + line[:-2] + b"f" * pad + b"\r\n" + last + b"\r\n"
    assert len(head) == size
    return head


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# -- server.http1.ResponseReader (the origin's response, on every forwarded request) -----------


class Events:
    """A ResponseSink that records what the reader reported (body pieces joined)."""

    def __init__(self) -> None:
        self.events: list = []

    def interim(self, head) -> None:
        self.events.append(("interim", head.code, head.raw))

    def final(self, head) -> None:
        self.events.append(("final", head.code, sorted(head.headers), head.framing))

    def upgraded(self, head, rest: bytes) -> None:
        self.events.append(("101", head.raw, rest))

    def body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def complete(self) -> None:
        self.events.append(("complete",))


def reader_run(pieces: list[bytes], **bounds) -> tuple[ResponseReader, list]:
    """Feeds the origin's answer, then its EOF; returns the reader and what it reported."""
    sink = Events()
    reader = ResponseReader(sink, **bounds)
    try:
        for piece in pieces:
            reader.feed(piece)
        if reader.phase is not ReadPhase.DONE:
            reader.eof()
    except OriginResponseError as e:
        sink.events.append(("error", "too large" in str(e)))
    return reader, sink.events


def test_reader_reads_a_64k_head_byte_by_byte_in_linear_work():
    answer = big_head(MAX_RESPONSE_HEAD + 1, b"404 Not Found", b"Content-Length: 2\r\n") + b"no"
    reader, events = reader_run(bytewise(answer))
    assert [e[0] for e in events] == ["final", "body", "complete"] and events[1][1] == b"no"
    assert reader._scanner.examined <= 8 * len(answer)


def test_reader_refuses_an_oversized_head_byte_by_byte_in_linear_work():
    answer = big_head(MAX_RESPONSE_HEAD + 2, b"101 Switching Protocols")
    reader, events = reader_run(bytewise(answer))
    assert events == [("error", True)]
    assert reader._scanner.examined <= 8 * len(answer)


interim = st.sampled_from(
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"]
)
header = st.sampled_from([b"A: b\r\n", b"X-Long: " + b"l" * 40 + b"\r\n", b"Content-Length: 2\r\n"])
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
statuses = st.sampled_from([b"101 Switching Protocols", b"200 OK", b"404 Not Found"])


@SETTINGS
@given(
    interims=st.lists(interim, max_size=3),
    status=statuses,
    headers=st.lists(header, max_size=6),
    body=st.binary(min_size=2, max_size=20),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    limit=st.integers(20, 300),
    line=st.integers(10, 60),
)
def test_reader_any_split_ends_as_one_piece(interims, status, headers, body, cuts, limit, line):
    final = b"HTTP/1.1 " + status + b"\r\n" + b"".join(headers) + b"\r\n"
    answer = b"".join(interims) + final + body
    # small bounds, so that some of these heads are too large
    _, whole = reader_run([answer], max_head=limit, max_line=line)
    _, pieces = reader_run(split(answer, cuts), max_head=limit, max_line=line)
    if whole[-1][0] == "101":
        # what follows a 101 is not HTTP: the splice takes it, however it was split
        assert whole[-1][1:] == (final, body)
        whole[-1] = pieces[-1] = pieces[-1][:2]
    assert pieces == whole


def test_reader_bounds_all_interim_heads_together():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    count = (MAX_RESPONSE_HEAD + 1 - len(SWITCHING)) // len(interim)
    fits = interim * count
    _, events = reader_run([fits + SWITCHING])
    assert events[-1][0] == "101" and len(events) == count + 1
    assert len(fits + SWITCHING) <= MAX_RESPONSE_HEAD + 1
    _, events = reader_run([interim * (count + 1) + SWITCHING])
    assert events[-1] == ("error", True)


# -- client.protocol.TunnelClientProtocol: the server's reply to CONNECT ------------------------


def client_run(pieces: list[bytes]) -> tuple[TunnelClientProtocol, tuple]:
    """Feeds the server's reply; returns the protocol and how the attempt stands."""
    protocol = TunnelClientProtocol("ident", "example.com:80", lambda *_: None, Clock())
    transport = StringTransport()
    protocol.makeConnection(transport)
    for piece in pieces:
        if transport.disconnected or transport.disconnecting:
            break
        protocol.dataReceived(piece)
    refused = protocol._error_with_body() if protocol._error is not None else None
    return protocol, (
        protocol.session is not None,
        str(refused),
        str(protocol.failure),
        transport.disconnected or transport.disconnecting,
    )


def test_client_reads_a_16k_reply_byte_by_byte_in_linear_work():
    reply = big_head(MAX_REPLY + 1, b"502 Bad Gateway", b"Content-Length: 2\r\n") + b"no"
    protocol, (_, refused, failure, closing) = client_run(bytewise(reply))
    assert refused == failure == "tunnel server error: status=502, body=no" and closing
    assert protocol._reply.examined <= 8 * len(reply)


def test_client_refuses_an_oversized_reply_byte_by_byte_in_linear_work():
    reply = big_head(MAX_REPLY + 2, b"200 Connected to Tunnel")
    protocol, (started, _, failure, closing) = client_run(bytewise(reply))
    assert not started and closing and failure == "tunnel server reply head too long"
    assert protocol._reply.examined <= 8 * len(reply)


reply_header = st.sampled_from([b"A: b", b"Content-Length: 5", b"X: " + b"x" * 30])


@SETTINGS
@given(
    status=st.sampled_from([b"200 Connected to Tunnel", b"502 Bad Gateway", b"200 OK"]),
    headers=st.lists(
        st.sampled_from([b"A: b", b"Content-Length: 5", b"X: " + b"x" * 30]), max_size=4
    ),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    body=st.sampled_from([b"", b"refused", b"no"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    limit=st.integers(20, 200),
)
def test_client_reply_any_split_ends_as_one_piece(status, headers, newline, body, cuts, limit):
    lines = [b"HTTP/1.1 " + status, *headers, b"", b""]
    reply = newline.join(lines) + (body if not status.endswith(b"Tunnel") else b"")
    with patch.object(client_protocol, "MAX_REPLY", limit):
        _, whole = client_run([reply])
        _, pieces = client_run(split(reply, cuts))
    assert pieces == whole


# -- koding.wire.MessageDecoder ------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b'{"action":1,"x":"' + b"a" * (MAX_MESSAGE_SIZE - 19) + b'"}',
        b'{"action":1,"x":[' + b"[1e5,-2.5,true,null]," * 3000 + b'{"k":"\\u00e9\\n"}]}',
        b'{"x":"' + "é".encode() * (MAX_MESSAGE_SIZE // 2 - 4) + b'"}',
    ],
    ids=["long-string", "many-values", "utf-8"],
)
def test_message_decoder_reads_a_64k_message_byte_by_byte_in_linear_work(message):
    """The old decoder ran json over the whole unfinished message on every piece."""
    assert len(message) <= MAX_MESSAGE_SIZE + 1
    decoder = MessageDecoder()
    out = []
    for piece in bytewise(message):
        out += decoder.feed(piece)
    assert decoder.error is None and len(out) == 1
    assert decoder.examined <= 4 * len(message)


def test_message_decoder_refuses_an_endless_message_in_linear_work():
    decoder = MessageDecoder()
    for piece in bytewise(b'{"x":"' + b"a" * MAX_MESSAGE_SIZE):
        if decoder.error is not None:
            break
        decoder.feed(piece)
    assert str(decoder.error) == f"control message longer than {MAX_MESSAGE_SIZE} bytes"
    assert decoder.examined <= 4 * MAX_MESSAGE_SIZE
