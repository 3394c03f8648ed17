"""A public request body must keep a minimum average rate (mod_reqtimeout's
``body=20,MinRate=500``): trickled, it is answered 408 and its stream reset.

In memory on one Clock (tests/memory.py), so every deadline is checked to the
instant it falls on: the window starts at the end of the head, and after the
grace the bytes received so far must cover ``min_rate`` times the time we were
reading.  The raw origin of tests/test_forwarder.py records what it got.
"""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger, formatEvent
from twisted.python import usage

from tunnel.server.site import TunnelSite
from tunnel.tap import server as server_tap

from .test_forwarder import OK, Script, raw_env

POST = b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n"
TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Content-Length: 22\r\n"
    b"Connection: close\r\n"
    b"\r\nrequest body too slow\n"
)


def logged(env) -> list[str]:
    """The public log's lines from now on (the site's RateLimitedLog)."""
    events: list = []
    env.site.public_log.logger = Logger(observer=events.append)
    return events


def texts(events) -> list[str]:
    return [formatEvent(e) for e in events]


def test_a_trickled_body_is_a_408_the_moment_its_average_falls_below_the_rate():
    script = Script(close=False)
    with raw_env(script) as env:  # the defaults: 20 s of grace, then 500 bytes/s
        events = logged(env)
        peer = env.connect()
        peer.send(POST % 100_000 + b"a" * 6000)  # enough for 12 s
        env.advance_to(10)
        peer.send(b"b" * 1000)  # 14 s
        env.advance_to(19)
        peer.send(b"c" * 4000)  # 22 s: past the grace
        env.advance_to(21.5)
        peer.send(b"d")  # 22.002 s
        env.advance_to(22.001)
        assert peer.received == b"" and script.origin.reason is None
        env.advance_to(22.002)
        assert peer.received == TIMEOUT_408
        origin = script.origin
        assert origin.reason is not None  # the stream was reset
        (message,) = origin.parsed.messages
        assert len(message["body"]) == 11_001 and not message["complete"]
        (line,) = texts(events)
        assert "request body below 500 bytes/s after 20.0 s" in line
        before = origin.received
        peer.send(b"e" * 100)  # read and dropped while the refusal lingers
        env.advance_to(23.002)
        assert peer.closed_at == 23.002 and peer.clean
        assert origin.received == before  # nothing more reached it


def test_one_byte_every_five_seconds_is_cut_at_the_end_of_the_grace():
    script = Script(close=False)
    with raw_env(script) as env:
        peer = env.connect()
        peer.send(POST % 100)
        for t in (1, 5, 10, 15):
            env.advance_to(t)
            peer.send(b"x")  # each byte restarts twisted.web's idle timer
        env.advance_to(19.999)
        assert peer.open and peer.received == b""
        env.advance_to(20)
        assert peer.received == TIMEOUT_408
        assert script.origin.reason is not None
        assert script.origin.parsed.messages[0]["body"] == b"xxxx"
        env.advance(1)
        assert peer.closed_at == 21.0 and peer.clean


def test_a_body_above_the_rate_is_never_cut_until_it_stops():
    script = Script(close=False)
    with raw_env(script, idle_timeout=600) as env:
        peer = env.connect()
        peer.send(POST % 1_000_000)
        for second in range(1000):  # 600 bytes/s for 1000 s
            env.advance_to(second)
            peer.send(b"z" * 600)
        env.flush()
        assert peer.open and peer.received == b""
        assert len(script.origin.parsed.messages[0]["body"]) == 600_000
        # it stops: 600,000 bytes cover 1200 s at 500 bytes/s
        env.advance_to(1199.999)
        assert peer.open and peer.received == b""
        env.advance_to(1200)
        assert peer.received == TIMEOUT_408
        env.advance(1)
        assert peer.closed


def test_a_body_that_keeps_the_rate_to_its_end_is_answered_and_the_next_one_has_its_own_window():
    script = Script(close=False)
    with raw_env(script) as env:
        peer = env.connect()
        peer.send(POST % 60_000)
        for second in range(100):  # 100 s at 600 bytes/s, to its end
            env.advance_to(second)
            peer.send(b"z" * 600)
        env.flush()
        assert peer.received == OK
        assert script.connections[0].parsed.messages[0]["complete"]
        peer.take()
        # the next request on the connection (its head due 30 s after the answer)
        env.advance_to(120)
        peer.send(POST % 100_000 + b"w" * 1000)  # 2 s worth: cut after the grace
        env.advance_to(139.999)
        assert peer.received == b""
        env.advance_to(140)
        assert peer.received == TIMEOUT_408
        assert script.connections[1].reason is not None
        env.advance(1)
        assert peer.closed


def test_time_paused_by_our_backpressure_does_not_count_against_the_client():
    """The origin does not read for 60 s: the server stops reading the public
    connection, and those 60 s are not the client's."""
    rate = 100_000
    script = Script(close=False, paused=True)
    with raw_env(script, body_timeout=5, body_min_rate=rate, idle_timeout=600) as env:
        peer = env.connect()
        size = 4 * 1024 * 1024
        peer.send(POST % (size + 1000) + b"y" * size)
        env.flush()
        request = env.public_requests[-1]
        assert peer.transport.buffered > 0  # we stopped reading: the window is full
        assert request.tunnel_body.received < size
        env.advance_to(60)
        assert peer.open and peer.received == b""
        script.origin.transport.resumeProducing()  # it reads again: all of it flows
        env.flush()
        assert request.tunnel_body.received == size
        # 4 MiB cover 41.94304 s of reading time at 100,000 bytes/s, counted
        # from the end of the head (t=0) minus the 60 s we did not read
        deadline = 60 + size / rate
        env.advance_to(deadline - 0.001)
        assert peer.open and peer.received == b""
        env.advance_to(deadline)
        assert peer.received == TIMEOUT_408
        assert len(script.origin.parsed.messages[0]["body"]) == size
        assert not script.origin.parsed.messages[0]["complete"]
        env.advance(1)
        assert peer.closed


def test_a_response_already_started_is_cut_by_an_abort():
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"
    script = Script(answer, after_body=False, close=False)
    with raw_env(script) as env:
        events = logged(env)
        peer = env.connect()
        peer.send(POST % 100_000 + b"0123456789")
        env.flush()
        started = peer.received
        assert started.startswith(b"HTTP/1.1 200 OK\r\n") and started.endswith(b"part")
        env.advance_to(19.999)
        assert peer.open
        env.advance_to(20)
        assert peer.closed_at == 20.0
        assert peer.reason.check(ConnectionLost)  # a reset: the response cannot look complete
        assert peer.received == started
        assert script.origin.reason is not None
        assert len(texts(events)) == 1


def test_a_chunked_body_is_held_to_the_rate_too():
    script = Script(close=False)
    with raw_env(script) as env:
        peer = env.connect()
        peer.send(
            b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n"
        )
        env.advance_to(19.999)
        assert peer.received == b""
        env.advance_to(20)
        assert peer.received == TIMEOUT_408
        assert script.origin.reason is not None
        env.advance(1)
        assert peer.closed


def test_with_expect_100_continue_the_window_starts_at_the_first_byte_of_the_body():
    """The client may wait for the origin's 100 (this origin sends none): that
    wait is not the client's slowness."""
    script = Script(close=False)
    with raw_env(script) as env:
        peer = env.connect()
        peer.send(
            b"PUT /up HTTP/1.1\r\nHost: app.localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        env.advance_to(50)  # no 100 came: the client sends anyway (RFC 9110 10.1.1)
        assert peer.received == b""
        peer.send(b"v" * 1000)
        env.advance_to(69.999)
        assert peer.received == b""
        env.advance_to(70)  # 20 s of grace from the first byte
        assert peer.received == TIMEOUT_408
        assert script.origin.reason is not None
        env.advance(1)
        assert peer.closed


@pytest.mark.parametrize(
    "off",
    [{"body_timeout": 0}, {"body_timeout": None}, {"body_min_rate": 0}, {"body_min_rate": None}],
    ids=["timeout-0", "timeout-none", "rate-0", "rate-none"],
)
def test_the_rule_can_be_turned_off(off):
    script = Script(close=False)
    with raw_env(script, **off) as env:
        peer = env.connect()
        peer.send(POST % 11)
        for t in range(0, 220, 20):  # one byte every 20 s: 11 bytes in 200 s
            env.advance_to(t)
            assert peer.received == b""
            peer.send(b"x")
        env.flush()
        assert peer.received == OK
        assert script.origin.parsed.messages[0]["body"] == b"x" * 11
        peer.close()


def test_the_defaults_are_mod_reqtimeouts():
    site = TunnelSite(None)
    assert (site.body_timeout, site.body_min_rate) == (20.0, 500)
    channel = site.buildProtocol(None)
    assert (channel.body_timeout, channel.body_min_rate) == (20.0, 500)


def server_options(*argv: str) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(["--vhost", "app.test=id", *argv])
    return options


def public_site(service):
    """The factory of the service's one listener (its other children are not)."""
    (listener,) = [c for c in service if isinstance(c, StreamServerEndpointService)]
    return listener.factory


def test_twistd_options():
    defaults = server_options()
    assert (defaults["body-timeout"], defaults["body-min-rate"]) == (20.0, 500)
    options = server_options(
        "--listen", "tcp:0:interface=127.0.0.1", "--body-timeout", "5", "--body-min-rate", "1000"
    )
    site = public_site(server_tap.makeService(options))
    assert (site.body_timeout, site.body_min_rate) == (5.0, 1000)
    off = server_options("--listen", "tcp:0:interface=127.0.0.1", "--body-min-rate", "0")
    site = public_site(server_tap.makeService(off))
    assert site.body_min_rate == 0
    for bad in (["--body-min-rate", "fast"], ["--body-min-rate", "-1"], ["--body-timeout", "x"]):
        with pytest.raises(usage.UsageError):
            server_options(*bad)
