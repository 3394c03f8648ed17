"""when_closed() and when_idle(): each caller gets a Deferred of its own (OneShot)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone

from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import FLAG_SYN, TYPE_WINDOW_UPDATE

from .helpers import Wire, frame


def wire() -> Wire:
    return Wire(False, config=YamuxConfig(enable_keepalive=False))


def test_when_closed_callers_are_independent_and_late_callers_get_the_result():
    w = wire()
    first, second = w.session.when_closed(), w.session.when_closed()
    first.addCallback(lambda _: "changed by the first caller")
    second.cancel()
    errors = []
    second.addErrback(lambda f: errors.append(f.check(CancelledError)))
    third = w.session.when_closed()
    w.lose()
    assert first.result == "changed by the first caller"
    assert errors == [CancelledError]
    assert isinstance(third.result, ConnectionDone)
    assert isinstance(w.session.when_closed().result, ConnectionDone)


def test_when_idle_fires_per_threshold_and_cancelled_waiters_are_withdrawn():
    w = wire()
    w.session.set_stream_handler(lambda s: None)
    for sid in (1, 3):
        w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0))
    one, none, cancelled = w.session.when_idle(1), w.session.when_idle(0), w.session.when_idle(0)
    cancelled.cancel()
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    assert w.session.when_idle(2).called
    w.session.streams[1].abortConnection()
    assert one.called and not none.called
    w.session.streams[3].abortConnection()
    assert none.called
    w.lose()
