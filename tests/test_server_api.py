"""TunnelServer's API: director, one-shot callbacks, run-time hosts, the FIFO
of waiting tunnels (bounds, timeouts, cancellation), tunnels known by their
keys, per-tunnel figures and disconnect.

End to end on the in-memory network (tests/memory.py), or with frames written
by hand to a session on a StringTransport."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from tunnel.koding.identifiers import TunnelKey
from tunnel.koding.states import ClientState
from tunnel.server import (
    NoClientSession,
    TooManyPendingTunnels,
    TunnelServer,
    TunnelStats,
    TunnelTimeout,
)
from tunnel.yamux import YamuxSession
from tunnel.yamux.frame import FLAG_RST, FLAG_SYN, TYPE_DATA, TYPE_WINDOW_UPDATE

from .helpers import data_frame, frame, split_frames
from .memory import SERVER, MemoryTunnel


def get(env, host: str, path: bytes = b"/echo?echo=hi"):
    response = env.get(path, host=host.encode())
    return response.code, response.body


def test_director_can_rewrite_the_request_before_routing():
    def director(request):
        if request.getHeader(b"host") == b"alias.test":
            request.requestHeaders.setRawHeaders(b"host", [MemoryTunnel.HOST.encode()])

    with MemoryTunnel(resource_kwargs={"director": director}) as env:
        assert get(env, "alias.test") == (200, b"hi")
        assert env.origin.seen[-1].getHeader(b"host") == env.HOST.encode()
        assert env.public_requests[-1].getHeader(b"host") == env.HOST.encode()


def test_hosts_change_at_run_time():
    with MemoryTunnel() as env:
        env.server.add_host("Second.Test.", env.IDENT)
        assert get(env, "second.test") == (200, b"hi")
        env.server.delete_host("second.test")
        raw = env.request(b"GET /echo?echo=hi HTTP/1.1\r\nHost: second.test\r\n\r\n")
        body = b'no virtual host available for "second.test"\n'
        assert raw == (
            b"HTTP/1.1 502 Bad Gateway\r\n"
            b"Server: " + SERVER + b"\r\n"
            b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        assert get(env, env.HOST) == (200, b"hi")
        assert len(env.origin.seen) == 2  # the refused request never left the server


def test_connect_and_disconnect_callbacks_run_once():
    env = MemoryTunnel().start(connect=False)
    calls = []
    env.server.on_connect(env.IDENT, lambda: calls.append("connect"))
    env.server.on_disconnect(env.IDENT, lambda: calls.append("disconnect"))
    changes = []
    env.server.observe_states(lambda change: changes.append((env.now, change.current)))
    with env:
        env.client = env.make_client()
        env.client.startService()
        env.flush()
        first = env.server.connection(env.IDENT)
        first.session.transport.abortConnection()
        env.flush()
        assert env.client.state == ClientState.DISCONNECTED
        assert isinstance(env.client.last_error, ConnectionLost)  # reset by the server
        # reconnected after exactly the first backoff delay (no jitter here)
        assert env.run_until(lambda: env.client.state == ClientState.CONNECTED) == 0.05
        assert calls == ["connect", "disconnect"]  # one-shot: not again
        assert changes == [
            (0.0, ClientState.CONNECTED),
            (0.0, ClientState.CLOSED),
            (0.05, ClientState.CONNECTED),
        ]
        assert env.server.state(env.IDENT) == ClientState.CONNECTED
        assert env.server.connection(env.IDENT) is not first


def connected_server(**kwargs):
    """A TunnelServer with one client whose frames the test writes by hand."""
    clock = Clock()
    server = TunnelServer(clock=clock, **kwargs)
    server.add_host("app.test", "ident")
    transport = StringTransport()
    session = YamuxSession(False, clock=clock, quiet_until_peer_speaks=True)
    connection = server.attach_session("ident", session)
    session.makeConnection(transport)
    session.dataReceived(
        frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + data_frame(1, b"controlHandshake")
    )
    assert connection.ready
    transport.clear()
    return server, clock, session, transport


def test_pending_tunnels_are_bounded_time_out_and_late_streams_are_reset():
    server, clock, session, transport = connected_server(max_pending_tunnels=2)
    first = server.open_tunnel("ident", 1, 80)
    second = server.open_tunnel("ident", 1, 80)
    third = server.open_tunnel("ident", 1, 80)
    assert isinstance(third.result.value, TooManyPendingTunnels)
    third.addErrback(lambda f: None)
    messages = [body for h, body in split_frames(transport.value()) if h.type == TYPE_DATA]
    assert messages == [b'{"action":1,"transportProtocol":1,"localPort":80}\n'] * 2
    clock.advance(10)
    for d in (first, second):
        assert isinstance(d.result.value, TunnelTimeout)
        d.addErrback(lambda f: None)
    transport.clear()
    # the client's streams arrive late: each belongs to a timed-out waiter
    session.dataReceived(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0))
    session.dataReceived(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 5, 0))
    resets = [h.stream_id for h, _ in split_frames(transport.value()) if h.flags & FLAG_RST]
    assert resets == [3, 5]
    assert server.connection("ident").pending == 0
    session.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_streams_match_waiters_in_order_and_a_cancelled_one_is_skipped():
    server, clock, session, transport = connected_server()
    a = server.open_tunnel("ident", 1, 80)
    b = server.open_tunnel("ident", 1, 80)
    c = server.open_tunnel("ident", 3, 81)
    b.cancel()  # the public client of b went away
    b.addErrback(lambda f: f.trap(CancelledError))
    for sid in (3, 5, 7):
        session.dataReceived(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0))
    assert a.result.id == 3
    assert c.result.id == 7
    resets = [h.stream_id for h, _ in split_frames(transport.value()) if h.flags & FLAG_RST]
    assert resets == [5]
    unsolicited = frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 9, 0)
    transport.clear()
    session.dataReceived(unsolicited)
    assert [h.stream_id for h, _ in split_frames(transport.value()) if h.flags & FLAG_RST] == [9]
    session.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_waiters_fail_when_the_session_ends():
    server, clock, session, transport = connected_server()
    d = server.open_tunnel("ident", 1, 80)
    session.connectionLost(None)
    assert isinstance(d.result.value, NoClientSession)
    d.addErrback(lambda f: None)
    assert server.connection("ident") is None
    assert server.state("ident") == ClientState.CLOSED
    assert clock.getDelayedCalls() == []


# -- the server keeps keys, not identifiers ------------------------------------------

KEY = TunnelKey.of(MemoryTunnel.IDENT)


def test_the_server_keeps_keys_and_logs_fingerprints_only():
    with capturedLogs() as events:
        with MemoryTunnel() as env:
            connection = env.server.connection(env.IDENT)
            assert env.server.connection(KEY) is connection  # an identifier is hashed
            assert connection.key == KEY and not hasattr(connection, "identifier")
            route, port = env.server.vhosts.lookup(env.HOST)
            assert (route.host, route.key, route.rules, port) == (env.HOST, KEY, None, 0)
            assert env.server.state(KEY) == env.server.state(env.IDENT) == ClientState.CONNECTED
            assert get(env, env.HOST) == (200, b"hi")
            assert env.server.disconnect(KEY)
            env.run_until(lambda: env.server.state(KEY) == ClientState.CONNECTED)
    text = "\n".join(formatEvent(e) for e in events)
    assert f"client {KEY!r} connected" in text and f"client {KEY!r} disconnected" in text
    assert f"disconnecting client {KEY!r}" in text
    assert MemoryTunnel.IDENT not in text
    # and no event carries it as a field either
    assert all(MemoryTunnel.IDENT not in repr(value) for e in events for value in e.values())


def test_server_state_changes_carry_the_key():
    env = MemoryTunnel().start(connect=False)
    server_changes, client_changes = [], []
    env.server.observe_states(server_changes.append)
    with env:
        env.client = env.make_client()
        env.client.observe_states(client_changes.append)
        env.client.startService()
        env.flush()
    assert [(c.identifier, c.current) for c in server_changes[:1]] == [(KEY, ClientState.CONNECTED)]
    assert all(c.identifier == KEY for c in server_changes)
    # the client names itself by its identifier; both sides agree on the key
    assert {c.identifier for c in client_changes} == {env.IDENT}
    assert {c.key for c in client_changes + server_changes} == {KEY}


def test_a_client_whose_identifier_has_only_a_tcp_port_is_taken():
    env = MemoryTunnel().start(connect=False)
    with env:
        assert env.server.delete_host(env.HOST) and not env.server.delete_host(env.HOST)
        assert env.server.canonical(env.IDENT) is None
        env.server.add_addr(KEY, port=2222)
        assert env.server.canonical(env.IDENT) == KEY
        assert env.server.canonical(env.IDENT + "x") is None
        env.client = env.make_client()
        env.client.startService()
        env.flush()
        assert env.server.state(KEY) == ClientState.CONNECTED


# -- per-tunnel figures and disconnect ------------------------------------------------


def test_stats_count_requests_open_streams_and_bytes_since_connect():
    env = MemoryTunnel(server_kwargs={"max_idle_streams": 0}).start(connect=False)
    with env:
        env.advance(100)
        env.client = env.make_client()
        env.client.startService()
        env.flush()
        connection = env.server.connection(KEY)
        local = env.client.protocol.transport.getHost()
        session = connection.session
        stats = connection.stats()
        assert stats == TunnelStats(
            fingerprint=KEY.fingerprint,
            remote=f"{local.host}:{local.port}",
            connected_since=100.0,
            streams_open=0,  # the control stream is not counted
            requests=0,
            bytes_in=session.bytes_received,
            bytes_out=session.bytes_sent,
        )
        assert stats.bytes_in > 0 and stats.bytes_out > 0  # the control handshake
        for i in range(3):
            assert get(env, env.HOST, b"/echo?echo=%d" % (10**i)) == (200, b"%d" % (10**i))
        after = connection.stats()
        assert after.requests == 3 and after.streams_open == 0
        assert after.bytes_in >= stats.bytes_in + 3 * len(b"HTTP/1.1 200 OK\r\n")
        assert after.bytes_out >= stats.bytes_out + 3 * len(b"GET /echo?echo=1 HTTP/1.1\r\n")
        assert (after.bytes_in, after.bytes_out) == (session.bytes_received, session.bytes_sent)

        waiting = env.connect()
        waiting.send(b"GET /delay?n=5 HTTP/1.1\r\nHost: %s\r\n\r\n" % env.HOST.encode())
        env.flush()
        assert connection.stats().streams_open == 1 and connection.stats().requests == 4
        env.advance(5)
        assert b"late" in waiting.received
        assert connection.stats().streams_open == 0
        waiting.close()

        # what no tunnel serves is not counted
        assert get(env, "other.test")[0] == 502
        assert connection.stats().requests == 4
        assert env.server.connections() == [connection]


def test_disconnect_closes_the_session_and_the_client_comes_back():
    with MemoryTunnel() as env:
        first = env.server.connection(KEY)
        assert get(env, env.HOST) == (200, b"hi")
        assert env.server.disconnect(env.IDENT) is True
        env.run_until(
            lambda: (c := env.server.connection(KEY)) is not None and c is not first and c.ready
        )
        assert first.closed
        assert env.server.connection(KEY).stats().requests == 0  # figures since connect
        assert env.server.disconnect("nobody") is False
        assert get(env, env.HOST) == (200, b"hi")


def test_a_disconnected_client_whose_hosts_were_removed_stays_out():
    with MemoryTunnel() as env:
        env.server.delete_host(env.HOST)
        assert env.server.connection(KEY).ready  # open connections are left alone
        assert env.server.disconnect(KEY)
        env.advance(5)  # several attempts to reconnect
        assert env.server.connection(KEY) is None
        assert env.client.state != ClientState.CONNECTED
        assert "no host associated" in str(env.client.last_error)
