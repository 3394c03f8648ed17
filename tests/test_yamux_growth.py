"""Receive windows that grow on streams that carry bulk data (``max_grown_window``).

Each test drives a YamuxSession over a StringTransport and a Clock
(``helpers.Wire``), feeds it the peer's Data frames and checks the exact
WindowUpdate credit that goes back: the growth travels as extra credit in an
ordinary WindowUpdate (flags 0), which Go's sender adds to its window like
any other (spec.md 1.4), so a grown window is wire-compatible.
"""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Protocol

from tunnel.yamux import LARGE_WINDOWS, YamuxConfig
from tunnel.yamux.errors import WindowExceeded
from tunnel.yamux.frame import FLAG_ACK, FLAG_RST, FLAG_SYN, INITIAL_WINDOW, TYPE_GO_AWAY
from tunnel.yamux.frame import TYPE_WINDOW_UPDATE as WU

from .helpers import Wire, data_frame, frame

KIB = 1024
MIB = 1024 * KIB
HALF = INITIAL_WINDOW // 2


def make(**config) -> Wire:
    config.setdefault("enable_keepalive", False)
    return Wire(False, config=YamuxConfig(**config))


def heads(frames) -> list[tuple[int, int, int, int]]:
    return [(h.type, h.flags, h.stream_id, h.length) for h, _ in frames]


class Sink(Protocol):
    def __init__(self) -> None:
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


def remote_open(w: Wire, sid: int):
    """The peer opens ``sid``; returns (stream, its protocol), the ACK consumed."""
    sink = Sink()
    w.session.set_stream_handler(lambda s: s.attach(sink))
    w.feed(frame(WU, FLAG_SYN, sid, 0))
    assert heads(w.sent()) == [(WU, FLAG_ACK, sid, 0)]
    w.session.set_stream_handler(None)
    return w.session.streams[sid], sink


def send(w: Wire, sid: int, size: int) -> list[tuple[int, int, int, int]]:
    """The peer sends ``size`` bytes on ``sid``; returns what we sent back."""
    w.feed(data_frame(sid, b"x" * size))
    return heads(w.sent())


def test_a_stream_that_received_a_whole_window_doubles_it_with_the_next_credit():
    w = make(max_grown_window=MIB)
    stream, sink = remote_open(w, 1)
    assert send(w, 1, HALF) == [(WU, 0, 1, HALF)]  # half a window: credit, no growth
    assert stream.window_size == INITIAL_WINDOW
    # a whole window since it opened: the credit carries 256 KiB more
    assert send(w, 1, HALF) == [(WU, 0, 1, HALF + INITIAL_WINDOW)]
    assert stream.window_size == stream.receive_window == 2 * INITIAL_WINDOW
    # 512 KiB now: credit every 256 KiB, and the next doubling after 512 KiB
    assert send(w, 1, 2 * HALF) == [(WU, 0, 1, 2 * HALF)]
    assert send(w, 1, 2 * HALF) == [(WU, 0, 1, 2 * HALF + 2 * INITIAL_WINDOW)]
    assert stream.window_size == MIB
    # max_grown_window reached: plain credit from here on
    for _ in range(4):
        assert send(w, 1, MIB // 2) == [(WU, 0, 1, MIB // 2)]
    assert stream.window_size == stream.receive_window == MIB
    assert sink.received == 3 * INITIAL_WINDOW + 2 * MIB
    w.lose()


def test_the_peer_is_held_to_the_grown_window_exactly():
    w = make(max_grown_window=MIB)
    stream, _ = remote_open(w, 1)
    send(w, 1, HALF)
    send(w, 1, HALF)
    assert stream.receive_window == 2 * INITIAL_WINDOW
    w.session.streams[1].pauseProducing()  # nothing more is credited
    w.feed(data_frame(1, b"y" * (2 * INITIAL_WINDOW)))  # the whole grown window: fine
    assert w.sent() == [] and not w.transport.disconnecting
    closed = []
    w.session.when_closed().addCallback(closed.append)
    w.feed(data_frame(1, b"z"))  # one byte over it
    assert heads(w.sent()) == [(TYPE_GO_AWAY, 0, 0, 1)]
    w.lose()
    assert len(closed) == 1 and isinstance(closed[0], WindowExceeded)


def test_a_consumer_that_does_not_read_stops_the_growth():
    """Credit (and so growth) follows what the protocol consumed: a stalled
    consumer holds the peer to the window it has, however much is pending."""
    w = make(max_grown_window=4 * MIB)
    stream, sink = remote_open(w, 1)
    stream.pauseProducing()
    assert send(w, 1, INITIAL_WINDOW) == []
    assert stream.window_size == INITIAL_WINDOW
    assert stream.buffered == (0, INITIAL_WINDOW)
    assert sink.received == 0
    w.lose()


def test_without_max_grown_window_a_window_never_grows():
    w = make()
    stream, _ = remote_open(w, 1)
    for _ in range(8):
        assert send(w, 1, HALF) == [(WU, 0, 1, HALF)]
    assert stream.window_size == INITIAL_WINDOW
    w.lose()


def test_growth_is_taken_from_the_receive_budget_and_given_back_at_the_end():
    w = make(max_grown_window=MIB, receive_budget=INITIAL_WINDOW)
    a, _ = remote_open(w, 1)
    b, _ = remote_open(w, 3)
    send(w, 1, HALF)
    assert send(w, 1, HALF) == [(WU, 0, 1, HALF + INITIAL_WINDOW)]  # a takes the budget
    send(w, 3, HALF)
    assert send(w, 3, HALF) == [(WU, 0, 3, HALF)]  # b cannot grow: plain credit
    assert b.window_size == INITIAL_WINDOW
    w.feed(frame(WU, FLAG_RST, 1, 0))  # a ends: its 256 KiB go back to the budget
    send(w, 3, HALF)
    assert send(w, 3, HALF) == [(WU, 0, 3, HALF + INITIAL_WINDOW)]
    assert b.window_size == 2 * INITIAL_WINDOW
    w.lose()


def test_growth_stops_when_the_session_is_closed():
    w = make(max_grown_window=MIB)
    stream, _ = remote_open(w, 1)
    send(w, 1, HALF)
    w.session.close()
    w.sent()
    w.lose()
    assert w.session.grow_window(stream, INITIAL_WINDOW) is False


def test_tunnel_sessions_start_at_yamux_windows_and_grow_to_4_mib():
    assert LARGE_WINDOWS.max_stream_window == INITIAL_WINDOW
    assert LARGE_WINDOWS.max_grown_window == 4 * MIB
    w = Wire(False, config=LARGE_WINDOWS)
    stream, _ = remote_open(w, 1)
    for _ in range(12):  # 256 KiB -> 4 MiB: four doublings, two credits each
        send(w, 1, stream.window_size // 2)
    assert stream.window_size == stream.receive_window == 4 * MIB
    w.lose()


@pytest.mark.parametrize("grown", [INITIAL_WINDOW - 1, 2**31])
def test_max_grown_window_is_checked(grown):
    with pytest.raises(ValueError, match="max_grown_window"):
        YamuxConfig(max_grown_window=grown)
