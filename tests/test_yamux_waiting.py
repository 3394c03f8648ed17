"""when_closed(), when_idle() and when_go_away(): a Deferred of its own for each caller."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone

from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import FLAG_SYN, GOAWAY_NORMAL, TYPE_GO_AWAY, TYPE_WINDOW_UPDATE

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


def test_when_go_away_fires_with_the_peer_s_code_or_none_if_the_session_ends_first():
    w = wire()
    before = w.session.when_go_away()
    assert not before.called
    w.feed(frame(TYPE_GO_AWAY, 0, 0, GOAWAY_NORMAL))
    assert before.result == GOAWAY_NORMAL
    assert w.session.when_go_away().result == GOAWAY_NORMAL  # late callers at once
    w.lose()

    quiet = wire()
    waiting = quiet.session.when_go_away()
    quiet.lose()
    assert waiting.called and waiting.result is None
    assert quiet.session.when_go_away().result is None
