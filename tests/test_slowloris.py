"""Slow clients on the public port and the control path are dropped; others
are unaffected.  In memory on one Clock (tests/memory.py), so every deadline
is checked to the instant it falls on."""

from __future__ import annotations

from twisted.internet.error import ConnectionLost

from .memory import MemoryTunnel, parse_response

HEAD = b"GET /echo?echo=x HTTP/1.1\r\nHost: app.localhost\r\nX-Pad: "


def site(head_timeout: float, idle_timeout: float = 60) -> dict:
    return {"site_kwargs": {"head_timeout": head_timeout, "idle_timeout": idle_timeout}}


def test_head_trickled_forever_is_dropped_at_the_deadline():
    with MemoryTunnel(**site(head_timeout=5, idle_timeout=2)) as env:
        slow = env.connect()
        # one byte a second: the 2 s idle timer is reset every time, the deadline is not
        for second, byte in enumerate(HEAD[:5]):
            env.advance_to(second)
            slow.send(bytes([byte]))
        env.advance_to(4.999)
        assert slow.open
        env.advance_to(5)
        assert slow.closed_at == 5.0
        assert slow.reason.check(ConnectionLost)  # aborted: a reset, no answer
        assert slow.received == b""
        assert env.origin.seen == []


def test_a_complete_head_disarms_the_deadline_and_keep_alive_rearms_it():
    with MemoryTunnel(**site(head_timeout=5)) as env:
        client = env.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: nosuch.test\r\n\r\n")
        env.flush()
        assert parse_response(client.take()).code == 502  # answered (no such vhost)
        env.advance_to(4.999)
        assert client.open
        env.advance_to(5)  # the next head was due 5 s after the response
        assert client.closed_at == 5.0
        # a head that is complete is not cut off while its answer takes long
        client = env.connect()
        client.send(b"GET /delay?n=8 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.advance_to(12.999)
        assert client.open and client.received == b""
        env.advance_to(13)
        response = parse_response(client.take())
        assert (response.code, response.body) == (200, b"late")
        env.advance_to(17.999)  # rearmed at the end of the response
        assert client.open
        env.advance_to(18)
        assert client.closed_at == 18.0


def test_slowloris_leaves_other_clients_alone():
    with MemoryTunnel(**site(head_timeout=0.5, idle_timeout=30)) as env:
        slow = env.connect()
        control = env.connect()
        control.send(b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: x\r\n")  # no end
        fast = None
        for i, byte in enumerate(HEAD):  # a byte every 50 ms
            env.advance_to(i * 0.05)
            if slow.closed:
                break
            slow.send(bytes([byte]))
            if i == 2:  # a normal client is served meanwhile
                fast = env.connect()
                fast.send(
                    b"GET /echo?echo=fast HTTP/1.1\r\nHost: app.localhost\r\n"
                    b"Connection: close\r\n\r\n"
                )
                env.flush()
                assert fast.closed and fast.clean
                response = parse_response(fast.received)
                assert (response.code, response.body) == (200, b"fast")
        # both were dropped at the deadline, at once, and told nothing
        assert slow.closed_at == control.closed_at == 0.5
        assert slow.received == b"" and control.received == b""
        assert slow.reason.check(ConnectionLost) and control.reason.check(ConnectionLost)
        assert fast is not None and len(env.origin.seen) == 1
        assert env.client.state.name == "CONNECTED"  # the tunnel itself is untouched


def test_the_idle_timeout_counts_from_the_last_byte_and_not_during_a_response():
    """twisted.web's idle rule, kept by one timer per connection: it is off
    while a request is handled and starts again after the response."""
    with MemoryTunnel(**site(head_timeout=None, idle_timeout=10)) as env:
        client = env.connect()
        env.advance_to(3)
        client.send(b"GET /delay?n=12 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.advance_to(14.999)  # past 3 + 10: off while the answer is awaited
        assert client.open and client.received == b""
        env.advance_to(15)
        assert parse_response(client.take()).code == 200
        for second in (17, 19):  # a byte resets it
            env.advance_to(second)
            client.send(b"G")
        env.advance_to(28.999)
        assert client.open
        env.advance_to(29)
        assert client.closed_at == 29.0


def test_keep_alive_requests_move_one_idle_timer():
    with MemoryTunnel(**site(head_timeout=None, idle_timeout=10)) as env:
        client = env.connect()
        env.flush()

        def idle_timers():
            return [c for c in env.clock.getDelayedCalls() if "_idle_over" in repr(c)]

        (first,) = idle_timers()
        for _ in range(5):
            client.send(b"GET /echo?echo=x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
            env.flush()
            assert parse_response(client.take()).code == 200
        assert idle_timers() == [first] and first.active()
        client.close()
