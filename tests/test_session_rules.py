"""The rules of spec.md section 1, checked frame by frame on one session.

Every test drives a YamuxSession over a StringTransport and a Clock (see
``helpers.Wire``), feeds it the peer's frames and asserts exactly what goes
back on the wire (type, flags, stream id, length) and what the stream
protocols are told.  ``finish`` ends each test with a TCP close and checks
that no DelayedCall is left on the Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.yamux import (
    KeepAliveTimeout,
    PingTimeout,
    RemoteGoAway,
    SessionClosed,
    SessionLost,
    StreamOpenTimeout,
    StreamReset,
    StreamState,
    TooManyStreams,
    YamuxConfig,
)
from tunnel.yamux.errors import (
    DuplicateStream,
    InvalidStreamId,
    InvalidType,
    InvalidVersion,
    UnexpectedFin,
    WindowExceeded,
)
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
)

from .helpers import Wire, data_frame, frame

WU, DATA, PING, GOAWAY = TYPE_WINDOW_UPDATE, TYPE_DATA, TYPE_PING, TYPE_GO_AWAY
KIB = 1024
MIB = 1024 * 1024

# -- helpers -------------------------------------------------------------------


def wu(flags: int, sid: int, delta: int = 0) -> bytes:
    return frame(WU, flags, sid, delta)


def ping(flags: int, value: int) -> bytes:
    return frame(PING, flags, 0, value)


def go_away(code: int) -> bytes:
    return frame(GOAWAY, 0, 0, code)


def heads(frames) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream id, length) of each frame."""
    return [(h.type, h.flags, h.stream_id, h.length) for h, _ in frames]


def data_bytes(frames, sid: int | None = None) -> bytes:
    return b"".join(
        body for h, body in frames if h.type == DATA and (sid is None or h.stream_id == sid)
    )


def make(is_client: bool = False, quiet: bool = False, **config) -> Wire:
    """A Wire; keepalive is off unless asked for, so pings do not interleave."""
    config.setdefault("enable_keepalive", False)
    return Wire(is_client, config=YamuxConfig(**config), quiet_until_peer_speaks=quiet)


def finish(w: Wire, reason: Failure | None = None) -> None:
    """The TCP connection closes; nothing may be left on the Clock."""
    w.lose(reason)
    assert w.session.closed
    assert w.session.streams == {}
    assert w.clock.getDelayedCalls() == []


class Recorder(Protocol):
    """Records what a stream tells its protocol."""

    def __init__(self) -> None:
        self.events: list = []
        self.data = bytearray()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.events and self.events[-1] == "data":
            return
        self.events.append("data")

    def connectionLost(self, reason: Failure) -> None:
        assert self.reason is None, "connectionLost called twice"
        self.reason = reason
        self.events.append("lost")


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("read_lost")

    def writeConnectionLost(self) -> None:
        self.events.append("write_lost")


def accept_with(w: Wire, cls=Recorder) -> dict[int, Recorder]:
    """Attach a new ``cls`` to every stream the peer opens; returns them by id."""
    protos: dict[int, Recorder] = {}

    def handler(stream):
        protos[stream.id] = cls()
        stream.attach(protos[stream.id])

    w.session.set_stream_handler(handler)
    return protos


def remote_open(w: Wire, sid: int, cls=Recorder):
    """The peer opens ``sid``; returns (stream, protocol) with the ACK consumed."""
    proto = cls()
    w.session.set_stream_handler(lambda s: s.attach(proto))
    w.feed(wu(FLAG_SYN, sid))
    assert heads(w.sent()) == [(WU, FLAG_ACK, sid, 0)]
    w.session.set_stream_handler(None)
    return w.session.streams[sid], proto


def local_open(w: Wire, cls=Recorder, ack: bool = True):
    """We open a stream (and the peer ACKs it); returns (stream, protocol)."""
    stream = w.session.open_stream()
    proto = cls()
    stream.attach(proto)
    assert heads(w.sent()) == [(WU, FLAG_SYN, stream.id, 0)]
    if ack:
        w.feed(wu(FLAG_ACK, stream.id))
        assert w.sent() == []
    return stream, proto


def closed_reason(w: Wire):
    results = []
    w.session.when_closed().addCallback(results.append)
    return results


def assert_protocol_error(w: Wire, error_type) -> None:
    """We answered a protocol violation with GoAway(1) and are losing the connection."""
    assert heads(w.sent()) == [(GOAWAY, 0, 0, 1)]
    assert w.transport.disconnecting
    results = closed_reason(w)
    # further input is ignored: a ping is not answered any more
    w.feed(ping(FLAG_SYN, 5))
    assert w.sent() == []
    finish(w)
    assert len(results) == 1 and isinstance(results[0], error_type)


# -- spec.md 1.9: what we do with bad input --------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 255])
@pytest.mark.parametrize("is_client", [False, True])
def test_bad_version_sends_goaway_1_and_closes(version, is_client):
    w = make(is_client)
    raw = HEADER.pack(version, WU, FLAG_SYN, 2 if is_client else 1, 0)
    w.feed(raw[:7])  # split headers are checked once whole
    assert w.sent() == [] and not w.transport.disconnecting
    w.feed(raw[7:])
    assert_protocol_error(w, InvalidVersion)


@pytest.mark.parametrize("ftype", [4, 5, 255])
def test_unknown_type_sends_goaway_1_and_closes(ftype):
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(frame(ftype, 0, 1, 0))
    assert_protocol_error(w, InvalidType)
    assert proto.reason.check(SessionLost)
    assert isinstance(proto.reason.value, ConnectionLost)


@pytest.mark.parametrize(
    "second_syn",
    [wu(FLAG_SYN, 1), data_frame(1, b"hi", FLAG_SYN), data_frame(1, b"", FLAG_SYN)],
    ids=["window-update", "data", "empty-data"],
)
def test_duplicate_syn_on_open_stream_is_a_protocol_error(second_syn):
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(second_syn)
    assert proto.data == b""
    assert_protocol_error(w, DuplicateStream)
    assert proto.reason.check(SessionLost)


def test_duplicate_syn_on_our_own_open_stream_is_a_protocol_error():
    w = make(is_client=True)
    local_open(w)
    w.feed(wu(FLAG_SYN, 1))
    assert_protocol_error(w, DuplicateStream)


def test_data_beyond_the_receive_window_is_a_protocol_error():
    w = make()
    stream, proto = remote_open(w, 1)
    # only the header: the length alone is enough to refuse it
    w.feed(frame(DATA, 0, 1, INITIAL_WINDOW + 1))
    assert proto.data == b""
    assert_protocol_error(w, WindowExceeded)


def test_data_beyond_the_window_on_a_syn_data_frame():
    w = make()
    w.feed(frame(DATA, FLAG_SYN, 1, INITIAL_WINDOW + 1))
    frames = heads(w.sent())
    assert frames == [(WU, FLAG_ACK, 1, 0), (GOAWAY, 0, 0, 1)]
    assert w.transport.disconnecting
    finish(w)


def test_a_full_window_in_one_frame_is_accepted():
    w = make()
    stream, proto = remote_open(w, 1)
    body = bytes(range(256)) * (INITIAL_WINDOW // 256)
    w.feed(data_frame(1, body))
    assert bytes(proto.data) == body
    # consumed at once: the whole window is granted back
    assert heads(w.sent()) == [(WU, 0, 1, INITIAL_WINDOW)]
    assert not w.transport.disconnecting
    finish(w)


def test_window_exceeded_after_partial_consumption():
    w = make()
    stream, proto = remote_open(w, 1)
    stream.pauseProducing()
    w.feed(data_frame(1, b"a" * 100_000))
    assert stream.receive_window == INITIAL_WINDOW - 100_000
    w.feed(frame(DATA, 0, 1, INITIAL_WINDOW - 100_000 + 1))
    assert_protocol_error(w, WindowExceeded)


@pytest.mark.parametrize(
    "second_fin",
    [wu(FLAG_FIN, 1), data_frame(1, b"", FLAG_FIN)],
    ids=["window-update", "data"],
)
def test_second_fin_is_a_protocol_error(second_fin):
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    w.feed(wu(FLAG_FIN, 1))
    assert proto.events == ["read_lost"]
    assert stream.state is StreamState.REMOTE_CLOSE
    assert w.sent() == []
    w.feed(second_fin)
    assert_protocol_error(w, UnexpectedFin)


def test_second_fin_on_a_backlogged_stream_is_a_protocol_error():
    w = make()
    w.feed(wu(FLAG_SYN, 1) + data_frame(1, b"x", FLAG_FIN))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    w.feed(wu(FLAG_FIN, 1))
    assert_protocol_error(w, UnexpectedFin)


def test_data_after_fin_is_dropped_and_the_session_carries_on():
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    w.feed(data_frame(1, b"before", FLAG_FIN) + data_frame(1, b"after") + ping(FLAG_SYN, 3))
    assert bytes(proto.data) == b"before"
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 3)]
    assert not w.transport.disconnecting
    finish(w)


def test_data_for_an_unknown_stream_is_skipped_and_framing_stays_in_step():
    w = make()
    stream, proto = remote_open(w, 1)
    junk = frame(PING, FLAG_SYN, 0, 99) * 10  # a body that looks like frames
    wire = data_frame(7, junk) + data_frame(1, b"hello") + ping(FLAG_SYN, 9)
    # in one piece and byte by byte
    w.feed(wire)
    for i in range(len(wire)):
        w.feed(wire[i : i + 1])
    assert bytes(proto.data) == b"hellohello"
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 9), (PING, FLAG_ACK, 0, 9)]
    assert not w.transport.disconnecting
    assert set(w.session.streams) == {1}
    finish(w)


def test_huge_data_for_an_unknown_stream_is_skipped_not_buffered():
    w = make()
    stream, proto = remote_open(w, 1)
    size = 16 * INITIAL_WINDOW + 3  # far beyond any window: no window check here
    w.feed(frame(DATA, 0, 9, size))
    chunk = b"\0" * (MIB - 1)  # in whatever pieces it arrives
    for _ in range(size // len(chunk)):
        w.feed(chunk)
    assert w.sent() == []
    w.feed(b"e" * (size % len(chunk)) + data_frame(1, b"ok"))
    assert bytes(proto.data) == b"ok"
    assert not w.transport.disconnecting
    finish(w)


@pytest.mark.parametrize(
    "frames",
    [
        wu(0, 9, 1000),
        wu(FLAG_FIN, 9),
        wu(FLAG_ACK, 9),
        wu(FLAG_ACK | FLAG_FIN, 9, 5),
        data_frame(9, b"", FLAG_FIN),
        data_frame(9, b"", FLAG_ACK),
        wu(FLAG_RST, 9),
    ],
    ids=["credit", "fin", "ack", "ack-fin", "data-fin", "data-ack", "rst"],
)
def test_control_flags_for_an_unknown_stream_are_ignored(frames):
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(frames)
    assert w.sent() == []
    assert not w.transport.disconnecting
    assert set(w.session.streams) == {1}
    assert stream.state is StreamState.ESTABLISHED
    w.feed(ping(FLAG_SYN, 1))
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 1)]
    finish(w)


def test_fin_for_a_fully_closed_stream_is_ignored():
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(wu(FLAG_FIN, 1))  # a plain protocol closes its side in turn
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert proto.reason.check(ConnectionDone)
    w.feed(wu(FLAG_FIN, 1) + data_frame(1, b"late"))
    assert w.sent() == []
    assert not w.transport.disconnecting
    finish(w)


@pytest.mark.parametrize("code", [1, 2, 7])
def test_goaway_with_an_error_code_closes_the_session(code):
    w = make(is_client=True)
    mine, mine_proto = local_open(w)
    theirs, theirs_proto = remote_open(w, 2)
    results = closed_reason(w)
    w.feed(go_away(code))
    # we may say GoAway(0) but never blame the peer for its own error
    assert heads(w.sent()) in ([], [(GOAWAY, 0, 0, 0)])
    assert w.transport.disconnecting
    assert w.session.remote_go_away == code
    with pytest.raises((SessionClosed, RemoteGoAway)):
        w.session.open_stream()
    finish(w)
    for proto in (mine_proto, theirs_proto):
        assert isinstance(proto.reason.value, ConnectionLost)
        assert proto.reason.check(SessionLost)
    assert len(results) == 1 and isinstance(results[0], RemoteGoAway)
    assert results[0].code == code


def test_goaway_0_refuses_new_opens_but_existing_streams_continue():
    w = make(is_client=True)
    stream, proto = local_open(w)
    w.feed(go_away(0))
    assert w.sent() == []
    assert not w.transport.disconnecting
    assert w.session.remote_go_away == 0
    with pytest.raises(RemoteGoAway) as info:
        w.session.open_stream()
    assert info.value.code == 0
    failures = []
    w.session.request_stream().addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(RemoteGoAway)
    assert w.sent() == []
    # the existing stream still works both ways
    stream.write(b"request")
    w.feed(data_frame(1, b"response"))
    assert [(h.type, h.stream_id, body) for h, body in w.sent()] == [(DATA, 1, b"request")]
    assert bytes(proto.data) == b"response"
    stream.loseConnection()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    w.feed(wu(FLAG_FIN, 1))
    assert proto.reason.check(ConnectionDone)
    # the peer itself may still open streams (Go does not refuse them either)
    w.feed(wu(FLAG_SYN, 2))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 2, 0)]
    finish(w)


def test_ping_ack_with_an_unknown_value_is_ignored():
    w = make()
    results = []
    d = w.session.ping(timeout=5)
    d.addBoth(results.append)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    w.feed(ping(FLAG_ACK, 12345) + ping(FLAG_ACK, 1))
    assert results == [] and w.sent() == []
    assert not w.transport.disconnecting
    w.feed(ping(FLAG_ACK, 0))
    assert results == [0]
    finish(w)


def test_unanswered_keepalive_aborts_the_session_without_goaway():
    w = make(is_client=True, enable_keepalive=True)
    stream, proto = local_open(w)
    inbound, inbound_proto = remote_open(w, 2)
    results = closed_reason(w)
    w.clock.advance(30)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    w.clock.advance(9.9)
    assert not w.transport.disconnecting
    w.clock.advance(0.1)
    assert w.sent() == []  # no GoAway
    assert w.transport.disconnecting
    assert w.transport.disconnected  # StringTransport: abortConnection, not loseConnection
    # the late reply does not revive anything
    w.feed(ping(FLAG_ACK, 0))
    assert w.sent() == []
    finish(w, Failure(ConnectionLost("aborted")))
    for p in (proto, inbound_proto):
        assert p.reason.check(SessionLost)
    assert len(results) == 1 and isinstance(results[0], KeepAliveTimeout)


def test_data_frame_on_stream_0_is_a_protocol_error():
    w = make()
    w.feed(data_frame(0, b"abc"))
    assert_protocol_error(w, InvalidStreamId)


def test_syn_on_stream_0_closes_and_never_puts_a_window_update_on_stream_0():
    # spec.md 1.9: no Data/WindowUpdate on stream 0, so no RST there either
    w = make()
    w.feed(wu(FLAG_SYN, 0))
    assert_protocol_error(w, InvalidStreamId)


# -- spec.md 1.2 / 1.3: opening and accepting -------------------------------------------


@pytest.mark.parametrize("is_client, ids", [(True, [1, 3, 5]), (False, [2, 4, 6])])
def test_stream_ids_and_syn_frames(is_client, ids):
    w = make(is_client)
    streams = [w.session.open_stream() for _ in ids]
    assert [s.id for s in streams] == ids
    assert heads(w.sent()) == [(WU, FLAG_SYN, sid, 0) for sid in ids]
    assert all(s.state is StreamState.SYN_SENT for s in streams)
    finish(w)


def test_syn_and_ack_carry_the_extra_window_as_delta():
    w = make(is_client=True, max_stream_window=MIB)
    delta = MIB - INITIAL_WINDOW
    stream = w.session.open_stream()
    assert heads(w.sent()) == [(WU, FLAG_SYN, 1, delta)]
    assert stream.receive_window == MIB
    w.feed(wu(FLAG_SYN, 2))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 2, delta)]
    assert w.session.streams[2].receive_window == MIB
    # and we hold up our end: a full MiB in one frame is accepted
    w.feed(frame(DATA, 0, 2, MIB) + b"m" * MIB)
    assert not w.transport.disconnecting
    w.feed(frame(DATA, 0, 1, MIB + 1))
    assert_protocol_error(w, WindowExceeded)


def test_incoming_syn_is_acked_at_once_even_without_a_handler():
    w = make()
    w.feed(wu(FLAG_SYN, 1))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    stream = w.session.streams[1]
    assert stream.state is StreamState.ESTABLISHED
    assert not stream.outbound
    # data waits in the backlog within the window, and reaches the protocol later
    w.feed(data_frame(1, b"early"))
    assert w.sent() == []
    assert stream.buffered == (0, 5)
    protos = accept_with(w)
    assert bytes(protos[1].data) == b"early"
    finish(w)


def test_rst_when_the_accept_backlog_is_full():
    w = make(accept_backlog=2)
    w.feed(wu(FLAG_SYN, 1) + wu(FLAG_SYN, 3) + wu(FLAG_SYN, 5) + data_frame(7, b"abc", FLAG_SYN))
    assert heads(w.sent()) == [
        (WU, FLAG_ACK, 1, 0),
        (WU, FLAG_ACK, 3, 0),
        (WU, FLAG_RST, 5, 0),
        (WU, FLAG_RST, 7, 0),
    ]
    assert set(w.session.streams) == {1, 3}
    protos = accept_with(w)
    assert set(protos) == {1, 3}
    # with a handler the backlog no longer limits
    w.feed(wu(FLAG_SYN, 9) + wu(FLAG_SYN, 11) + wu(FLAG_SYN, 13))
    assert heads(w.sent()) == [(WU, FLAG_ACK, sid, 0) for sid in (9, 11, 13)]
    finish(w)


def test_rst_after_our_goaway_while_existing_streams_continue():
    w = make()
    stream, proto = remote_open(w, 1)
    w.session.go_away()
    assert heads(w.sent()) == [(GOAWAY, 0, 0, 0)]
    w.session.go_away()  # only once
    assert w.sent() == []
    w.feed(wu(FLAG_SYN, 3) + data_frame(5, b"body", FLAG_SYN) + data_frame(1, b"still"))
    assert heads(w.sent()) == [(WU, FLAG_RST, 3, 0), (WU, FLAG_RST, 5, 0)]
    assert bytes(proto.data) == b"still"
    assert set(w.session.streams) == {1}
    stream.write(b"reply")
    assert data_bytes(w.sent(), 1) == b"reply"
    assert not w.transport.disconnecting
    finish(w)


def test_protocol_error_after_our_goaway_still_sends_goaway_1():
    w = make()
    w.session.go_away()
    assert heads(w.sent()) == [(GOAWAY, 0, 0, 0)]
    w.feed(frame(7, 0, 0, 0))
    assert_protocol_error(w, InvalidType)


@pytest.mark.parametrize("is_client, last", [(True, 2**32 - 3), (False, 2**32 - 4)])
def test_stream_ids_run_out_below_2_pow_32_minus_2(is_client, last):
    w = make(is_client)
    w.session._next_id = last  # white-box: skip four billion opens
    stream = w.session.open_stream()
    assert stream.id == last
    assert heads(w.sent()) == [(WU, FLAG_SYN, last, 0)]
    with pytest.raises(TooManyStreams):
        w.session.open_stream()
    assert w.sent() == []
    finish(w)


@pytest.mark.parametrize("is_client, sid", [(False, 2), (False, 4), (True, 1), (True, 3)])
def test_wrong_parity_syn_gets_rst(is_client, sid):
    w = make(is_client)
    protos = accept_with(w)
    w.feed(wu(FLAG_SYN, sid) + data_frame(sid, b"x"))
    assert heads(w.sent()) == [(WU, FLAG_RST, sid, 0)]
    assert protos == {} and w.session.streams == {}
    assert not w.transport.disconnecting
    finish(w)


def test_syn_reusing_an_old_id_gets_rst():
    w = make()
    protos = accept_with(w)
    w.feed(wu(FLAG_SYN, 5))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 5, 0)]
    # stream 5 closes fully (the plain protocol answers the FIN)
    w.feed(wu(FLAG_FIN, 5))
    assert heads(w.sent()) == [(WU, FLAG_FIN, 5, 0)]
    assert w.session.streams == {}
    # a closed id and a lower unused id are both refused
    w.feed(wu(FLAG_SYN, 5) + wu(FLAG_SYN, 3) + wu(FLAG_SYN, 7))
    assert heads(w.sent()) == [(WU, FLAG_RST, 5, 0), (WU, FLAG_RST, 3, 0), (WU, FLAG_ACK, 7, 0)]
    assert set(protos) == {5, 7} and set(w.session.streams) == {7}
    finish(w)


def test_syn_on_a_data_frame_with_body_and_fin():
    w = make()
    protos = accept_with(w, HalfRecorder)
    w.feed(data_frame(1, b"hello", FLAG_SYN | FLAG_FIN))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    proto = protos[1]
    assert bytes(proto.data) == b"hello"
    assert proto.events == ["data", "read_lost"]
    stream = w.session.streams[1]
    assert stream.state is StreamState.REMOTE_CLOSE
    stream.write(b"answer")
    stream.loseConnection()
    frames = w.sent()
    assert heads(frames) == [(DATA, 0, 1, 6), (WU, FLAG_FIN, 1, 0)]
    assert proto.reason.check(ConnectionDone)
    finish(w)


def test_syn_on_a_data_frame_with_body_and_fin_plain_protocol():
    w = make()
    protos = accept_with(w)
    w.feed(data_frame(1, b"hello", FLAG_SYN | FLAG_FIN))
    # ACK, then our FIN since a plain protocol closes when its input ends
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0), (WU, FLAG_FIN, 1, 0)]
    assert bytes(protos[1].data) == b"hello"
    assert protos[1].reason.check(ConnectionDone)
    assert w.session.streams == {}
    finish(w)


def test_syn_on_an_empty_data_frame():
    w = make()
    protos = accept_with(w)
    w.feed(data_frame(1, b"", FLAG_SYN) + data_frame(1, b"next"))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    assert bytes(protos[1].data) == b"next"
    finish(w)


def test_data_may_follow_our_syn_before_the_ack():
    w = make(is_client=True)
    stream = w.session.open_stream()
    stream.write(b"x" * 300_000)
    frames = w.sent()
    assert heads(frames)[0] == (WU, FLAG_SYN, 1, 0)
    assert len(data_bytes(frames, 1)) == INITIAL_WINDOW
    assert all(h.flags == 0 for h, _ in frames[1:])  # no ACK/SYN on later frames
    w.feed(wu(FLAG_ACK, 1, 37856))
    assert len(data_bytes(w.sent(), 1)) == 37856
    assert stream.state is StreamState.ESTABLISHED
    finish(w)


def test_we_never_ack_a_stream_we_opened():
    w = make(is_client=True)
    stream, proto = local_open(w)
    w.feed(wu(FLAG_ACK, 1) + data_frame(1, b"x", FLAG_ACK))  # duplicate ACKs
    assert w.sent() == []
    stream.write(b"y")
    stream.loseConnection()
    assert heads(w.sent()) == [(DATA, 0, 1, 1), (WU, FLAG_FIN, 1, 0)]
    finish(w)


# -- spec.md 1.4: windows -----------------------------------------------------------------


def test_never_send_beyond_the_send_window():
    w = make(is_client=True)
    stream, proto = local_open(w)
    payload = bytes(range(256)) * (4 * KIB)  # 1 MiB
    stream.write(payload)
    frames = w.sent()
    assert all(h.type == DATA and h.stream_id == 1 and h.flags == 0 for h, _ in frames)
    assert [h.length for h, _ in frames] == [64 * KIB] * 4
    assert data_bytes(frames) == payload[:INITIAL_WINDOW]
    assert stream.send_window == 0
    assert stream.buffered[0] == MIB - INITIAL_WINDOW
    # nothing more goes out without credit
    w.clock.advance(100)
    assert w.sent() == []
    w.feed(wu(0, 1, 100_000))
    frames = w.sent()
    assert all(h.length <= 64 * KIB for h, _ in frames)
    assert data_bytes(frames) == payload[INITIAL_WINDOW : INITIAL_WINDOW + 100_000]
    assert stream.send_window == 0
    w.feed(wu(0, 1, MIB))
    rest = data_bytes(w.sent())
    assert rest == payload[INITIAL_WINDOW + 100_000 :]
    assert stream.send_window == MIB - len(rest)
    assert stream.buffered[0] == 0
    finish(w)


def test_frames_respect_a_small_max_frame_size():
    w = make(is_client=True, max_frame_size=1024)
    stream, proto = local_open(w)
    stream.write(b"q" * 5000)
    assert [h.length for h, _ in w.sent()] == [1024] * 4 + [904]
    finish(w)


def test_receive_credit_is_granted_only_as_the_protocol_consumes():
    w = make()
    stream, proto = remote_open(w, 1)
    stream.pauseProducing()
    w.feed(data_frame(1, b"a" * 100_000) + data_frame(1, b"b" * 100_000))
    assert w.sent() == []  # a paused stream grants nothing
    assert proto.data == b""
    assert stream.buffered == (0, 200_000)
    assert stream.receive_window == INITIAL_WINDOW - 200_000
    stream.resumeProducing()
    assert bytes(proto.data) == b"a" * 100_000 + b"b" * 100_000
    frames = heads(w.sent())
    assert len(frames) == 1
    (ftype, flags, sid, delta) = frames[0]
    assert (ftype, flags, sid) == (WU, 0, 1)
    assert delta >= INITIAL_WINDOW // 2
    assert delta == 200_000
    assert stream.receive_window == INITIAL_WINDOW
    assert stream.buffered == (0, 0)
    finish(w)


def test_credit_is_returned_in_steps_of_half_a_window():
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(data_frame(1, b"x" * 100_000))
    assert w.sent() == []  # consumed, but less than half a window
    w.feed(data_frame(1, b"x" * 31_071))
    assert w.sent() == []  # 131071: one byte short
    w.feed(data_frame(1, b"x"))
    assert heads(w.sent()) == [(WU, 0, 1, 131_072)]
    assert stream.receive_window == INITIAL_WINDOW
    finish(w)


def test_a_backlogged_stream_grants_no_credit_until_consumed():
    w = make()
    w.feed(wu(FLAG_SYN, 1) + data_frame(1, b"z" * 200_000))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    protos = accept_with(w)
    assert len(protos[1].data) == 200_000
    assert heads(w.sent()) == [(WU, 0, 1, 200_000)]
    finish(w)


def test_syn_and_ack_deltas_grow_the_send_window():
    w = make(is_client=True)
    stream, proto = local_open(w, ack=False)
    w.feed(wu(FLAG_ACK, 1, 1000))
    assert stream.send_window == INITIAL_WINDOW + 1000
    stream.write(b"o" * 300_000)
    assert len(data_bytes(w.sent())) == INITIAL_WINDOW + 1000
    # the peer's SYN delta counts too
    w.feed(wu(FLAG_SYN, 2, 5000))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 2, 0)]
    inbound = w.session.streams[2]
    assert inbound.send_window == INITIAL_WINDOW + 5000
    inbound.write(b"i" * 300_000)
    assert len(data_bytes(w.sent(), 2)) == INITIAL_WINDOW + 5000
    finish(w)


# -- spec.md 1.5: FIN and RST ---------------------------------------------------------------


@pytest.mark.parametrize(
    "calls",
    [
        ("loseConnection", "loseConnection"),
        ("loseWriteConnection", "loseConnection"),
        ("loseWriteConnection", "loseWriteConnection"),
        ("loseConnection", "loseWriteConnection"),
    ],
)
def test_fin_is_sent_exactly_once(calls):
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    for name in calls:
        getattr(stream, name)()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert stream.state is StreamState.LOCAL_CLOSE
    stream.write(b"after fin")  # dropped, never a Data frame after FIN
    w.clock.advance(1)
    assert w.sent() == []
    w.feed(wu(FLAG_FIN, 1))
    assert w.sent() == []
    assert stream.state is StreamState.CLOSED
    finish(w)


def test_fin_waits_until_buffered_data_is_sent():
    w = make(is_client=True)
    stream, proto = local_open(w)
    stream.write(b"d" * 300_000)
    assert len(data_bytes(w.sent())) == INITIAL_WINDOW
    stream.loseConnection()
    assert w.sent() == []  # FIN must not overtake the data
    assert stream.state is StreamState.ESTABLISHED
    w.feed(wu(0, 1, 20_000))
    frames = w.sent()
    assert len(data_bytes(frames)) == 20_000 and all(h.type == DATA for h, _ in frames)
    w.feed(wu(0, 1, 20_000))
    frames = heads(w.sent())
    assert frames == [(DATA, 0, 1, 300_000 - INITIAL_WINDOW - 20_000), (WU, FLAG_FIN, 1, 0)]
    assert stream.state is StreamState.LOCAL_CLOSE
    w.feed(wu(FLAG_FIN, 1))
    assert stream.state is StreamState.CLOSED
    assert proto.reason.check(ConnectionDone)
    finish(w)


def test_half_close_we_fin_first():
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    stream.loseWriteConnection()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert proto.events == ["write_lost"]
    assert stream.state is StreamState.LOCAL_CLOSE
    w.feed(data_frame(1, b"more"))  # we still read
    assert bytes(proto.data) == b"more"
    w.feed(wu(FLAG_FIN, 1))
    assert proto.events == ["write_lost", "data", "read_lost", "lost"]
    assert proto.reason.check(ConnectionDone)
    assert stream.state is StreamState.CLOSED
    assert w.session.streams == {}
    assert w.sent() == []
    finish(w)


def test_half_close_peer_fins_first_data_still_flows_back():
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    w.feed(data_frame(1, b"req", FLAG_FIN))
    assert proto.events == ["data", "read_lost"]
    assert stream.state is StreamState.REMOTE_CLOSE
    assert w.sent() == []  # a half-closeable protocol keeps its side open
    stream.write(b"resp")
    assert heads(w.sent()) == [(DATA, 0, 1, 4)]
    stream.loseWriteConnection()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert proto.events[-1] == "lost"
    assert proto.reason.check(ConnectionDone)
    assert stream.state is StreamState.CLOSED
    finish(w)


def test_half_close_peer_fins_first_protocol_sees_write_connection_lost():
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    w.feed(wu(FLAG_FIN, 1))
    stream.loseWriteConnection()
    assert proto.events == ["read_lost", "write_lost", "lost"]


def test_plain_protocol_closes_its_side_on_the_peers_fin():
    w = make()
    stream, proto = remote_open(w, 1)
    w.feed(data_frame(1, b"bye", FLAG_FIN))
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert proto.events == ["data", "lost"]
    assert proto.reason.check(ConnectionDone)
    assert stream.state is StreamState.CLOSED
    finish(w)


def test_plain_protocol_fin_on_peer_fin_waits_for_its_buffered_data():
    w = make(is_client=True)
    stream, proto = local_open(w)
    stream.write(b"w" * (INITIAL_WINDOW + 10))
    assert len(data_bytes(w.sent())) == INITIAL_WINDOW
    w.feed(wu(FLAG_FIN, 1))
    assert w.sent() == []  # our FIN waits behind the 10 bytes
    assert proto.reason is None
    w.feed(wu(0, 1, 10))
    assert heads(w.sent()) == [(DATA, 0, 1, 10), (WU, FLAG_FIN, 1, 0)]
    assert proto.reason.check(ConnectionDone)
    finish(w)


def test_abort_connection_sends_rst_and_nothing_after():
    w = make(is_client=True)
    stream, proto = local_open(w)
    stream.write(b"k" * (INITIAL_WINDOW + 100))
    w.sent()
    stream.abortConnection()
    assert heads(w.sent()) == [(WU, FLAG_RST, 1, 0)]
    assert proto.reason.check(ConnectionAborted)
    assert stream.buffered == (0, 0)
    stream.abortConnection()
    stream.loseConnection()
    stream.write(b"late")
    w.feed(wu(0, 1, MIB) + data_frame(1, b"ignored") + wu(FLAG_FIN, 1))
    assert w.sent() == []
    assert proto.data == b""
    assert w.session.streams == {}
    assert not w.transport.disconnecting
    finish(w)


def test_peer_rst_gives_stream_reset():
    w = make()
    stream, proto = remote_open(w, 1)
    stream.pauseProducing()
    w.feed(data_frame(1, b"unread"))
    w.feed(wu(FLAG_RST, 1))
    assert proto.reason.check(StreamReset)
    assert isinstance(proto.reason.value, ConnectionLost)
    assert proto.data == b""  # unread data is thrown away
    assert stream.state is StreamState.RESET
    stream.write(b"x")
    stream.loseConnection()
    assert w.sent() == []  # no frame after RST
    finish(w)


def test_peer_rst_on_a_data_frame_refuses_our_open():
    w = make(is_client=True)
    stream, proto = local_open(w, ack=False)
    w.feed(data_frame(1, b"", FLAG_RST))
    assert proto.reason.check(StreamReset)
    assert stream.state is StreamState.RESET
    assert w.sent() == []
    finish(w)


def test_stream_states_outbound():
    w = make(is_client=True)
    stream = w.session.open_stream()
    assert stream.state is StreamState.SYN_SENT
    stream.attach(HalfRecorder())
    assert stream.state is StreamState.SYN_SENT
    w.feed(wu(FLAG_ACK, 1))
    assert stream.state is StreamState.ESTABLISHED
    stream.loseWriteConnection()
    assert stream.state is StreamState.LOCAL_CLOSE
    w.feed(wu(FLAG_FIN, 1))
    assert stream.state is StreamState.CLOSED
    assert 1 not in w.session.streams
    finish(w)


def test_stream_without_protocol_is_forgotten_after_both_fins():
    w = make(is_client=True)
    stream = w.session.open_stream()
    w.feed(wu(FLAG_ACK, 1))
    stream.loseWriteConnection()
    w.feed(wu(FLAG_FIN, 1))
    assert stream.state is StreamState.CLOSED
    assert w.session.streams == {}


def test_stream_states_inbound():
    w = make()
    stream, proto = remote_open(w, 1, HalfRecorder)
    assert stream.state is StreamState.ESTABLISHED
    w.feed(wu(FLAG_FIN, 1))
    assert stream.state is StreamState.REMOTE_CLOSE
    w.feed(wu(FLAG_RST, 1))
    assert stream.state is StreamState.RESET
    assert proto.reason.check(StreamReset)
    finish(w)


def test_stream_state_after_local_abort_and_session_loss():
    w = make(is_client=True)
    a, _ = local_open(w)
    b, _ = local_open(w)
    a.abortConnection()
    assert a.state is StreamState.CLOSED
    finish(w)
    assert b.state is StreamState.CLOSED


# -- spec.md 1.6: ping and keepalive ------------------------------------------------------


def test_keepalive_pings_count_up_from_zero():
    w = make(enable_keepalive=True)
    w.clock.advance(29.9)
    assert w.sent() == []
    w.clock.advance(0.1)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    for n in range(1, 4):
        w.clock.advance(1)
        w.feed(ping(FLAG_ACK, n - 1))
        assert w.sent() == []
        w.clock.advance(29.9)  # the next one comes 30 s after the reply
        assert w.sent() == []
        w.clock.advance(0.1)
        assert heads(w.sent()) == [(PING, FLAG_SYN, 0, n)]
    assert not w.transport.disconnecting
    finish(w)


def test_keepalive_interval_is_configurable():
    w = make(enable_keepalive=True, keepalive_interval=5, keepalive_timeout=2)
    w.clock.advance(5)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    w.clock.advance(2)
    assert w.transport.disconnecting
    finish(w)


def test_no_keepalive_when_disabled():
    w = make(enable_keepalive=False)
    w.clock.advance(1000)
    assert w.sent() == []
    assert w.clock.getDelayedCalls() == []
    finish(w)


def test_ping_syn_is_answered_at_once_with_the_same_value():
    w = make()
    w.feed(ping(FLAG_SYN, 42))
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 42)]
    w.feed(ping(FLAG_SYN, 2**32 - 1) + frame(PING, FLAG_SYN, 77, 1))  # stream id not checked
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 2**32 - 1), (PING, FLAG_ACK, 0, 1)]
    finish(w)


def test_ping_is_answered_even_while_every_stream_is_stalled():
    w = make()
    stream, proto = remote_open(w, 1)
    stream.pauseProducing()
    w.feed(data_frame(1, b"s" * INITIAL_WINDOW) + ping(FLAG_SYN, 8))
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 8)]
    finish(w)


def test_quiet_session_sends_nothing_before_the_peer_speaks():
    w = make(quiet=True, enable_keepalive=True)
    w.clock.advance(100)
    assert w.transport.value() == b""
    w.feed(wu(FLAG_SYN, 1))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 1, 0)]
    w.clock.advance(30)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    finish(w)


def test_quiet_session_close_before_the_peer_spoke_sends_no_goaway():
    w = make(quiet=True, enable_keepalive=True)
    w.session.close()
    assert w.transport.value() == b""
    assert w.transport.disconnecting
    finish(w)


def test_close_sends_goaway_0_then_loses_the_connection():
    w = make()
    stream, proto = remote_open(w, 1)
    w.session.close()
    assert heads(w.sent()) == [(GOAWAY, 0, 0, 0)]
    assert w.transport.disconnecting and not w.transport.disconnected
    with pytest.raises(SessionClosed):
        w.session.open_stream()
    finish(w)
    assert proto.reason.check(SessionLost)


def test_close_aborts_if_the_socket_does_not_flush_in_time():
    w = make(close_timeout=10)
    w.session.close()
    w.clock.advance(9.9)
    assert not w.transport.disconnected
    w.clock.advance(0.1)
    assert w.transport.disconnected  # abortConnection
    finish(w)


def test_abort_after_close_leaves_no_delayed_call():
    # e.g. a protocol error closes the session, then the keepalive ping times
    # out before the transport has finished closing
    w = make(enable_keepalive=True, keepalive_interval=5, keepalive_timeout=2)
    w.clock.advance(5)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    w.feed(frame(9, 0, 0, 0))  # protocol error: GoAway(1), close timer armed
    assert heads(w.sent()) == [(GOAWAY, 0, 0, 1)]
    w.clock.advance(2)  # the ping times out: abort()
    assert w.transport.disconnected
    w.lose()
    assert w.clock.getDelayedCalls() == []


def test_session_ping_fires_with_the_round_trip_time():
    w = make()
    results = []
    w.session.ping().addCallback(results.append)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0)]
    w.clock.advance(2.5)
    w.feed(ping(FLAG_ACK, 0))
    assert results == [2.5]
    w.session.ping().addCallback(results.append)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 1)]
    w.feed(ping(FLAG_ACK, 1))
    assert results == [2.5, 0]
    w.feed(ping(FLAG_ACK, 1))  # a duplicate reply is ignored
    assert results == [2.5, 0]
    finish(w)


def test_session_ping_times_out_without_closing_the_session():
    w = make()
    failures = []
    w.session.ping(timeout=3).addErrback(failures.append)
    w.clock.advance(3)
    assert len(failures) == 1 and failures[0].check(PingTimeout)
    assert not w.transport.disconnecting
    finish(w)


# -- timeouts -------------------------------------------------------------------------


def test_open_timeout_resets_the_stream():
    w = make(is_client=True, stream_open_timeout=75)
    stream, proto = local_open(w, ack=False)
    w.clock.advance(74.9)
    assert w.sent() == [] and proto.reason is None
    w.clock.advance(0.1)
    assert heads(w.sent()) == [(WU, FLAG_RST, 1, 0)]
    assert proto.reason.check(StreamOpenTimeout)
    assert isinstance(proto.reason.value, ConnectionLost)
    assert stream.state is StreamState.RESET
    assert not w.transport.disconnecting
    w.feed(wu(FLAG_ACK, 1))  # a late ACK is for an unknown stream now
    assert w.sent() == []
    finish(w)


def test_ack_in_time_cancels_the_open_timeout():
    w = make(is_client=True, stream_open_timeout=75)
    stream, proto = local_open(w, ack=False)
    w.clock.advance(74)
    w.feed(wu(FLAG_ACK, 1))
    w.clock.advance(100)
    assert w.sent() == [] and proto.reason is None
    assert w.clock.getDelayedCalls() == []
    finish(w)


def test_close_timeout_resets_a_stream_whose_peer_never_fins():
    w = make(stream_close_timeout=300)
    stream, proto = remote_open(w, 1)
    stream.loseConnection()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    assert proto.reason.check(ConnectionDone)  # the protocol is done at once
    w.clock.advance(299.9)
    assert w.sent() == []
    w.clock.advance(0.1)
    assert heads(w.sent()) == [(WU, FLAG_RST, 1, 0)]
    assert stream.state is StreamState.RESET
    assert w.session.streams == {}
    finish(w)


def test_peer_fin_in_time_cancels_the_close_timeout():
    w = make(stream_close_timeout=300)
    stream, proto = remote_open(w, 1)
    stream.loseConnection()
    w.sent()
    w.clock.advance(200)
    w.feed(wu(FLAG_FIN, 1))
    assert stream.state is StreamState.CLOSED
    assert w.clock.getDelayedCalls() == []
    w.clock.advance(1000)
    assert w.sent() == []
    finish(w)


def test_close_timeout_of_an_unacked_stream_starts_at_the_ack():
    w = make(is_client=True, stream_open_timeout=None, stream_close_timeout=300)
    stream, proto = local_open(w, ack=False)
    stream.loseConnection()
    assert heads(w.sent()) == [(WU, FLAG_FIN, 1, 0)]
    w.clock.advance(1000)
    assert w.sent() == []
    w.feed(wu(FLAG_ACK, 1))
    w.clock.advance(300)
    assert heads(w.sent()) == [(WU, FLAG_RST, 1, 0)]
    finish(w)


# -- the end of the connection --------------------------------------------------------


@pytest.mark.parametrize(
    "reason, expected",
    [(None, ConnectionDone), (Failure(ConnectionLost("tcp reset")), ConnectionLost)],
    ids=["clean", "lost"],
)
def test_tcp_close_ends_every_stream_with_session_lost(reason, expected):
    w = make(
        is_client=True,
        enable_keepalive=True,
        stream_open_timeout=75,
        stream_close_timeout=300,
        max_pending_opens=1,
    )
    results = closed_reason(w)
    pending, pending_proto = local_open(w, ack=False)  # open timer running
    waiting = []
    w.session.request_stream().addBoth(waiting.append)  # queued behind max_pending_opens
    inbound, inbound_proto = remote_open(w, 2, HalfRecorder)
    w.feed(wu(FLAG_FIN, 2))  # RemoteClose
    closing, closing_proto = remote_open(w, 4)
    closing.loseConnection()  # LocalClose, close timer running
    assert closing_proto.reason.check(ConnectionDone)
    w.feed(wu(FLAG_SYN, 6))  # waits in the backlog
    backlogged = w.session.streams[6]
    pings = []
    w.session.ping().addBoth(pings.append)
    w.clock.advance(1)
    assert w.clock.getDelayedCalls() != []
    w.sent()
    finish(w, reason)
    for p in (pending_proto, inbound_proto):
        assert p.reason.check(SessionLost)
        assert isinstance(p.reason.value, ConnectionLost)
    assert closing.state is StreamState.CLOSED
    late = Recorder()
    backlogged.attach(late)
    assert late.reason.check(SessionLost)
    assert len(waiting) == 1 and waiting[0].check(SessionClosed)
    assert len(pings) == 1 and pings[0].check(SessionClosed)
    assert len(results) == 1 and isinstance(results[0], expected)
    after = []
    w.session.when_closed().addCallback(after.append)
    assert after == results
    with pytest.raises(SessionClosed):
        w.session.open_stream()
    w.feed(wu(FLAG_SYN, 8))
    assert w.transport.value() == b""


# -- bounds ---------------------------------------------------------------------------


def test_max_pending_opens():
    w = make(is_client=True, max_pending_opens=2)
    a = w.session.open_stream()
    w.session.open_stream()
    with pytest.raises(TooManyStreams):
        w.session.open_stream()
    queued = []
    w.session.request_stream().addCallback(queued.append)
    assert heads(w.sent()) == [(WU, FLAG_SYN, 1, 0), (WU, FLAG_SYN, 3, 0)]
    w.feed(wu(FLAG_ACK, a.id))
    assert [s.id for s in queued] == [5]
    assert heads(w.sent()) == [(WU, FLAG_SYN, 5, 0)]
    with pytest.raises(TooManyStreams):
        w.session.open_stream()
    w.feed(wu(FLAG_RST, 3))  # a refused open frees its slot too
    assert w.session.open_stream().id == 7
    finish(w)


def test_queued_opens_fail_on_goaway_and_are_released_by_a_refusal():
    w = make(is_client=True, max_pending_opens=1)
    w.session.open_stream()
    released = []
    w.session.request_stream().addBoth(released.append)
    w.feed(wu(FLAG_RST, 1))  # refused: the slot frees up on the next turn
    w.clock.advance(0)
    assert [s.id for s in released] == [3]
    failed = []
    w.session.request_stream().addBoth(failed.append)
    w.feed(go_away(0))
    assert len(failed) == 1 and failed[0].check(RemoteGoAway)
    assert heads(w.sent()) == [(WU, FLAG_SYN, 1, 0), (WU, FLAG_SYN, 3, 0)]
    finish(w)


def test_no_delayed_call_left_when_the_connection_drops_right_after_a_refusal():
    w = make(is_client=True, max_pending_opens=1)
    w.session.open_stream()
    failed = []
    w.session.request_stream().addBoth(failed.append)
    w.feed(wu(FLAG_RST, 1))  # schedules the release of the queued open
    w.lose()  # ... and the TCP connection drops in the same turn
    assert len(failed) == 1 and failed[0].check(SessionClosed)
    assert w.clock.getDelayedCalls() == []


def test_max_streams_limits_opens_and_incoming_syns():
    w = make(is_client=True, max_streams=2)
    local_open(w)
    remote_open(w, 2)
    with pytest.raises(TooManyStreams):
        w.session.open_stream()
    w.feed(wu(FLAG_SYN, 4))
    assert heads(w.sent()) == [(WU, FLAG_RST, 4, 0)]
    assert set(w.session.streams) == {1, 2}
    w.feed(wu(FLAG_RST, 2))
    w.feed(wu(FLAG_SYN, 6))
    assert heads(w.sent()) == [(WU, FLAG_ACK, 6, 0)]
    finish(w)


def test_max_pings():
    w = make(max_pings=2)
    results = []
    w.session.ping().addBoth(results.append)
    w.session.ping().addBoth(results.append)
    w.session.ping().addBoth(results.append)
    assert len(results) == 1 and results[0].check(TooManyStreams)
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 0), (PING, FLAG_SYN, 0, 1)]
    w.feed(ping(FLAG_ACK, 0))
    w.session.ping()
    assert heads(w.sent()) == [(PING, FLAG_SYN, 0, 2)]
    finish(w)


def test_keepalive_survives_a_full_ping_table():
    w = make(max_pings=1, enable_keepalive=True)
    w.clock.advance(29)
    w.session.ping(timeout=60)  # a slow user ping holds the only slot
    w.sent()
    w.clock.advance(1)  # the keepalive is due now
    w.feed(ping(FLAG_ACK, 0))  # the user ping is answered
    sent = []
    for _ in range(60):  # a keepalive ping must still go out within two intervals
        w.clock.advance(1)
        sent += heads(w.sent())
    assert any(t == PING and f == FLAG_SYN for t, f, _, _ in sent)


def test_control_backlog_while_paused_aborts_the_session():
    w = make(max_control_backlog=120)
    w.session.pauseProducing()
    w.feed(ping(FLAG_SYN, 1) * 10)  # 120 bytes of replies: at the limit
    assert len(w.sent()) == 10
    assert not w.transport.disconnecting
    w.feed(ping(FLAG_SYN, 1))
    assert w.transport.disconnecting and w.transport.disconnected
    results = closed_reason(w)
    finish(w, Failure(ConnectionLost()))
    assert len(results) == 1 and isinstance(results[0], SessionLost)


def test_control_backlog_is_forgotten_when_the_transport_resumes():
    w = make(max_control_backlog=120)
    for _ in range(5):
        w.session.pauseProducing()
        w.feed(ping(FLAG_SYN, 1) * 10)
        w.session.resumeProducing()
    assert len(w.sent()) == 50
    assert not w.transport.disconnecting
    finish(w)


def test_paused_transport_queues_data_but_not_control_frames():
    w = make(is_client=True)
    stream, proto = local_open(w)
    w.session.pauseProducing()
    stream.write(b"held")
    w.feed(ping(FLAG_SYN, 4))
    assert heads(w.sent()) == [(PING, FLAG_ACK, 0, 4)]
    w.session.resumeProducing()
    assert heads(w.sent()) == [(DATA, 0, 1, 4)]
    finish(w)


def test_receive_budget_bounds_the_extra_window_of_a_session():
    """Streams get max_stream_window while the budget lasts, then the initial
    window (delta 0); a stream that ends gives its extra back."""
    w = make(is_client=True, max_stream_window=MIB, receive_budget=2 * (MIB - INITIAL_WINDOW))
    delta = MIB - INITIAL_WINDOW
    a, b, c = (w.session.open_stream() for _ in range(3))
    w.feed(wu(FLAG_SYN, 2))
    assert heads(w.sent()) == [
        (WU, FLAG_SYN, 1, delta),
        (WU, FLAG_SYN, 3, delta),
        (WU, FLAG_SYN, 5, 0),
        (WU, FLAG_ACK, 2, 0),
    ]
    assert [s.receive_window for s in (a, b, c)] == [MIB, MIB, INITIAL_WINDOW]
    assert w.session.streams[2].receive_window == INITIAL_WINDOW
    # the small stream holds the peer to its window
    w.feed(frame(DATA, 0, 5, INITIAL_WINDOW + 1))
    assert_protocol_error(w, WindowExceeded)


def test_receive_budget_is_given_back_when_a_stream_ends():
    w = make(is_client=True, max_stream_window=MIB, receive_budget=MIB - INITIAL_WINDOW)
    delta = MIB - INITIAL_WINDOW
    a = w.session.open_stream()
    b = w.session.open_stream()
    assert [a.window_size, b.window_size] == [MIB, INITIAL_WINDOW]
    a.abortConnection()
    c = w.session.open_stream()
    assert c.window_size == MIB
    assert heads(w.sent()) == [
        (WU, FLAG_SYN, 1, delta),
        (WU, FLAG_SYN, 3, 0),
        (WU, FLAG_RST, 1, 0),
        (WU, FLAG_SYN, 5, delta),
    ]
    finish(w)
