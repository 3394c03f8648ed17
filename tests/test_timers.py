"""tunnel.timers.Deadlines: many equal timeouts on one DelayedCall."""

from __future__ import annotations

from twisted.internet.task import Clock

from tunnel.timers import Deadlines
from tunnel.yamux import YamuxConfig

from .helpers import Wire


def make(delay=10.0):
    clock = Clock()
    expired: list = []
    return clock, expired, Deadlines(clock, delay, expired.append)


def test_each_key_expires_at_its_own_deadline_on_one_call():
    clock, expired, d = make()
    d.add("a")
    clock.advance(3)
    d.add("b")
    clock.advance(0.5)
    d.add("c")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6.5 - 1e-9)
    assert expired == []
    clock.advance(1e-9)  # t = 10
    assert expired == ["a"]
    clock.advance(3 - 1e-9)
    assert expired == ["a"]
    clock.advance(1e-9)  # t = 13
    assert expired == ["a", "b"]
    clock.advance(0.5)
    assert expired == ["a", "b", "c"]
    assert clock.getDelayedCalls() == [] and len(d) == 0


def test_discarding_the_last_key_cancels_the_call():
    clock, expired, d = make()
    d.add("a")
    d.add("b")
    d.discard("a")
    assert len(clock.getDelayedCalls()) == 1
    d.discard("b")
    d.discard("never added")
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert expired == []


def test_a_discarded_head_leaves_the_next_key_on_time():
    clock, expired, d = make()
    d.add("a")
    clock.advance(4)
    d.add("b")
    d.discard("a")
    clock.advance(6)  # a's deadline: nothing due, the call waits for b
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(4)
    assert expired == ["b"]


def test_a_key_still_counts_while_it_expires_and_may_add_others():
    clock = Clock()
    seen = []

    def expire(key):
        seen.append((key, key in d, len(d)))
        if key == "a":
            d.add("late")  # added while firing: waits its full delay

    d = Deadlines(clock, 5.0, expire)
    d.add("a")
    clock.advance(5)
    assert seen == [("a", True, 1)]
    assert "a" not in d and "late" in d
    clock.advance(5)
    assert seen[-1] == ("late", True, 1)
    assert clock.getDelayedCalls() == []


def test_no_delay_means_never():
    clock, expired, d = make(None)
    d.add("a")
    assert "a" in d and clock.getDelayedCalls() == []
    clock.advance(10**6)
    assert expired == []
    d.discard("a")
    assert len(d) == 0


def test_many_streams_awaiting_their_ack_share_one_timer():
    w = Wire(True, config=YamuxConfig(enable_keepalive=False, stream_open_timeout=75))
    streams = [w.session.open_stream() for _ in range(20)]
    assert len(w.clock.getDelayedCalls()) == 1
    w.clock.advance(75)
    assert all(s.state.value == "Reset" for s in streams)
    assert w.clock.getDelayedCalls() == []
    w.lose()


def test_pop_newest_takes_the_last_added_and_a_lazy_queue_keeps_its_call():
    for lazy in (False, True):
        clock, expired = Clock(), []
        d = Deadlines(clock, 10.0, expired.append, lazy=lazy)
        d.add("a")
        clock.advance(1)
        d.add("b")
        assert list(d) == ["a", "b"]
        assert d.pop_newest() == "b"
        assert d.pop_newest() == "a"
        # emptied: cancelled at once, or (lazy) left to fire once for nothing
        assert len(clock.getDelayedCalls()) == (1 if lazy else 0)
        d.add("c")  # at t = 1: due at 11, whatever call is armed
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(9)  # t = 10: a lazy call fires, finds "c" not due, waits on
        assert expired == []
        clock.advance(1)  # t = 11
        assert expired == ["c"] and clock.getDelayedCalls() == []
