"""Closing corner cases of a stream, driven frame by frame."""

from __future__ import annotations

from tunnel.yamux.frame import FLAG_FIN, FLAG_SYN, TYPE_DATA, TYPE_WINDOW_UPDATE

from .helpers import Wire, frame


def test_unattached_stream_closed_by_us_ends_on_the_peer_fin():
    """A stream closed before any protocol was attached (the client's 503 path)."""
    w = Wire(False)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    stream = w.session.streams[1]
    stream.write(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    stream.loseConnection()
    sent = w.sent()
    assert [(h.type, h.flags) for h, _ in sent][-2:] == [
        (TYPE_DATA, 0),
        (TYPE_WINDOW_UPDATE, FLAG_FIN),
    ]
    assert 1 in w.session.streams  # waiting for the peer's FIN
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0))
    assert w.session.streams == {}
    assert [c for c in w.clock.getDelayedCalls() if "_keepalive" not in repr(c)] == []
    w.lose()
    assert w.clock.getDelayedCalls() == []


def test_full_close_discards_and_credits_late_data_until_fin():
    w = Wire(False)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    stream = w.session.streams[1]
    stream.loseConnection()
    w.sent()
    w.feed(frame(TYPE_DATA, 0, 1, 200_000, b"x" * 200_000))
    credits = [h.length for h, _ in w.sent() if h.type == TYPE_WINDOW_UPDATE and h.flags == 0]
    assert credits and sum(credits) >= 131072
    assert stream.buffered == (0, 0)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0))
    assert w.session.streams == {}
    w.lose()


def test_a_failing_stream_handler_costs_only_that_stream():
    from twisted.logger import capturedLogs

    w = Wire(False)

    def broken(stream):
        raise RuntimeError("application bug")

    w.session.set_stream_handler(broken)
    with capturedLogs() as events:
        w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    assert any(e.get("log_failure") is not None for e in events)
    flags = [h.flags for h, _ in w.sent()]
    assert flags[-1] & 0x8  # RST for that stream
    assert not w.transport.disconnecting  # the session goes on
    w.session.set_stream_handler(lambda s: None)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    assert 3 in w.session.streams
    w.lose()
