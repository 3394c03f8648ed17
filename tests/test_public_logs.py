"""What an outsider can make the public side log (issue 8, item 9): a bounded
number of one-line events per kind and interval, never a traceback."""

from __future__ import annotations

import contextlib

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher

from tunnel.logs import RateLimitedLog, excerpt

from .helpers import Collect
from .memory import MemoryTunnel


@contextlib.contextmanager
def global_log():
    collect = Collect()
    globalLogPublisher.addObserver(collect)
    try:
        yield collect
    finally:
        globalLogPublisher.removeObserver(collect)


def limited(burst: int = 3, interval: float = 10.0):
    clock = Clock()
    collect = Collect()
    return (
        RateLimitedLog(Logger(observer=collect), clock=clock, burst=burst, interval=interval),
        clock,
        collect,
    )


# -- the helper ---------------------------------------------------------------------------


def test_the_first_burst_is_logged_then_one_line_says_the_rest_is_counted():
    log, clock, out = limited()
    written = [log.info("slow", "drop {n}", n=n) for n in range(100)]
    assert written == [True] * 3 + [False] * 97
    assert out.lines == [
        "drop 0",
        "drop 1",
        "drop 2",
        "more slow events: counting instead of logging them for up to 10.0 s",
    ]
    assert log.suppressed("slow") == 97


def test_the_count_is_reported_by_the_first_event_of_the_next_interval():
    log, clock, out = limited()
    for n in range(5):
        log.warn("slow", "drop {n}", n=n)
    clock.advance(9.999)
    log.warn("slow", "drop late")  # still the first interval: counted
    clock.advance(0.001)
    log.warn("slow", "drop again")
    assert out.lines[-2:] == ["3 more slow events were not logged", "drop again"]
    assert [e["log_level"] for e in out.events] == [LogLevel.warn] * 6
    assert log.suppressed("slow") == 0


def test_kinds_have_budgets_of_their_own_and_flush_reports_what_is_pending():
    log, clock, out = limited(burst=1)
    for _ in range(3):
        log.info("a", "a")
        log.info("b", "b")
    assert out.lines == [
        "a",
        "b",
        "more a events: counting instead of logging them for up to 10.0 s",
        "more b events: counting instead of logging them for up to 10.0 s",
    ]
    del out.events[:]
    log.flush()
    assert sorted(out.lines) == [
        "2 more a events were not logged",
        "2 more b events were not logged",
    ]
    log.info("a", "a")  # a fresh interval
    assert out.lines[-1] == "a"


def test_events_carry_no_failure_and_peer_text_is_excerpted():
    log, clock, out = limited()
    log.info("bad-host", "host {h}", h=excerpt(b"\x1b[31m" + b"x" * 200))
    (event,) = out.events
    assert "log_failure" not in event
    assert out.lines == ["host '\\x1b[31m" + "x" * 75 + "'..."]


# -- the public side ------------------------------------------------------------------------


def test_a_thousand_slow_heads_write_ten_lines_and_one_summary():
    with MemoryTunnel(site_kwargs={"head_timeout": 1}) as env, global_log() as log:
        peers = [env.connect() for _ in range(1000)]
        for peer in peers:
            peer.send(b"GET / HTTP/1.1\r\n")
        env.advance(1)
        assert all(p.closed for p in peers)
        lines = log.of("tunnel.server.site")
        assert len(lines) == 11
        assert lines[-1] == (
            "more slow-head events: counting instead of logging them for up to 60.0 s"
        )
        assert env.site.public_log.suppressed("slow-head") == 990
        assert not [e for e in log.events if e.get("log_failure") is not None]


def test_refused_requests_and_malformed_hosts_are_rate_limited():
    with MemoryTunnel() as env, global_log() as log:
        for _ in range(50):
            env.request(b"GET / HTTP/1.1\r\nHost: app.localhost\r\nX-A: a\r\n b\r\n\r\n")
            env.request(b"GET / HTTP/1.1\r\nHost: app.localhost:99999\r\n\r\n")
            env.request(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            env.request(b"CONNECT /_controlPath/ HTTP/1.1\r\nX-Ktunnel-Identifier: nope\r\n\r\n")
        site = log.of("tunnel.server.site")
        web = log.of("tunnel.server.web")
        assert len(site) == 11  # refused by the channel (obs-fold)
        assert sum("malformed host" in line for line in web) == 10
        assert sum("too many Host headers" in line for line in web) == 10
        assert sum("unknown identifier" in line for line in web) == 10
        assert "nope" not in "".join(web)  # an identifier is shown as its fingerprint
        assert not [e for e in log.events if e.get("log_failure") is not None]


def test_idle_timeouts_are_rate_limited_too():
    with (
        MemoryTunnel(site_kwargs={"head_timeout": None, "idle_timeout": 5}) as env,
        global_log() as log,
    ):
        peers = [env.connect() for _ in range(30)]
        env.advance(5)
        assert all(p.closed for p in peers)
        lines = log.of("tunnel.server.site")
        assert len(lines) == 11 and lines[0].startswith("closing idle connection from ")
        assert not [line for line in log.lines if line.startswith("Timing out client")]


def test_a_target_twisted_web_lets_through_but_cannot_forward_logs_no_traceback():
    """twisted.web accepts DEL and 0x80-0xB0 in a request-target; its HTTP
    client then raised, which logged a traceback and answered 500."""
    with MemoryTunnel() as env, global_log() as log:
        for target in (b"/a\x7fb", b"/\x80", b"/\xb0"):
            raw = env.request(b"GET " + target + b" HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert not [e for e in log.events if e.get("log_failure") is not None]
