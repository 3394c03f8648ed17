"""End to end through the in-memory tunnel (tests/memory.py): what real
sockets cannot show deterministically.  Exact bytes on the public side,
timeouts to the instant, a link that dies without a word, and how much a
slow reader makes the server hold."""

from __future__ import annotations

import hashlib

from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from zope.interface import implementer

from tunnel.koding.states import ClientState

from .memory import SERVER, MemoryTunnel, Peer, parse_response
from .tunnel_env import pattern_digest

DATE = b"Thu, 01 Jan 1970 00:00:00 GMT"  # the Clock starts at 0
GET = b"GET %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n"


def echo_response(text: bytes, date: bytes = DATE) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: " + SERVER + b"\r\nDate: " + date + b"\r\n"
        b"Content-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
    )


def test_exact_bytes_with_keep_alive_and_pipelining():
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(GET % b"/echo?echo=one")
        env.flush()
        assert client.take() == echo_response(b"one")
        env.advance(1)
        # two requests in one write: answered in order on the same connection
        client.send(GET % b"/echo?echo=two" + GET % b"/chunked")
        env.flush()
        assert client.take() == echo_response(b"two", b"Thu, 01 Jan 1970 00:00:01 GMT") + (
            b"HTTP/1.1 200 OK\r\nServer: " + SERVER + b"\r\n"
            b"Date: Thu, 01 Jan 1970 00:00:01 GMT\r\nContent-Type: text/html\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"6\r\nfirst,\r\n7\r\nsecond,\r\n5\r\nthird\r\n0\r\n\r\n"
        )
        assert client.open and len(env.origin.seen) == 3
        client.close()


def test_the_tunnel_timeout_falls_exactly_on_time_and_the_late_stream_is_reset():
    with MemoryTunnel() as env:
        tunnel = env.tunnel_connection()
        tunnel.freeze()  # the client hears nothing from now on
        client = env.connect()
        client.send(GET % b"/echo?echo=lost")
        env.advance_to(9.999)
        assert client.received == b""
        env.advance_to(10)
        response = parse_response(client.take())
        assert (response.code, response.body) == (502, b"timeout getting session\n")
        assert env.server.connection(env.IDENT).pending == 1  # the waiter stays queued
        tunnel.thaw()  # the control message arrives late; the client opens a stream ...
        env.flush()
        connection = env.server.connection(env.IDENT)
        assert connection.pending == 0  # ... which was reset, and the queue is empty
        assert list(connection.session.streams) == [1]
        assert env.origin.seen == []  # the origin never saw the request
        assert client.open  # the public connection is kept alive
        client.send(GET % b"/echo?echo=again")
        env.flush()
        assert parse_response(client.take()).body == b"again"
        client.close()


def test_a_dead_link_is_found_by_keepalive_at_40_s_and_the_client_is_back_at_once():
    with MemoryTunnel() as env:
        server_states, client_states = [], []
        env.server.observe_states(lambda c: server_states.append((env.now, c.current)))
        env.client.observe_states(lambda c: client_states.append((env.now, c.current)))
        dead = env.tunnel_connection()
        dead.freeze()  # no FIN, no reset: only keepalive can tell
        env.advance_to(39.999)
        assert server_states == client_states == []
        # pings at 30 s (keepalive_interval), unanswered for 10 s: both sides drop it
        env.run_until(lambda: len(server_states) == 2)
        assert server_states == [(40.0, ClientState.CLOSED), (40.05, ClientState.CONNECTED)]
        assert client_states == [
            (40.0, ClientState.DISCONNECTED),
            (40.05, ClientState.CONNECTING),  # after the first backoff delay
            (40.05, ClientState.CONNECTED),
        ]
        dead.thaw()
        env.flush()
        assert dead.closed and env.tunnel_connection() is not dead
        assert env.get(b"/echo?echo=back").body == b"back"


def test_a_slow_public_reader_holds_at_most_one_window_in_the_server():
    n = 8 * 1024 * 1024
    with MemoryTunnel() as env:
        client = env.connect()
        client.transport.pauseProducing()  # a public client that does not read
        client.send(GET % b"/bytes?n=%d" % n)
        env.flush()
        connection = env.server.connection(env.IDENT)
        (stream,) = [s for s in connection.session.streams.values() if s.id != 1]
        public = env.public_requests[-1].channel.transport
        # the window may have grown while the public socket still took bytes
        window = stream.window_size
        config = env.server.yamux_config
        assert window <= (config.max_grown_window or config.max_stream_window)
        # the server holds the stream's unread bytes and the public socket's
        # buffer, one window and a little more, not the 8 MiB
        assert stream.buffered[1] <= window
        assert public.buffered <= 2 * 64 * 1024
        assert stream.buffered[1] + public.buffered <= window + 2 * 64 * 1024
        # and the origin was held back: at most 2 MiB of the 8 were produced
        origin_request = env.origin.seen[-1]
        produced = n - origin_request.producer.left
        assert produced <= 2 * 1024 * 1024 and origin_request.producer.paused
        env.advance(60)  # time changes nothing (keepalive still answers)
        assert n - origin_request.producer.left == produced
        client.transport.resumeProducing()
        env.flush()
        response = parse_response(client.take())
        assert response.code == 200 and len(response.body) == n
        assert hashlib.sha256(response.body).hexdigest() == pattern_digest(n)
        client.close()


UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@implementer(IHalfCloseableProtocol)
class UpgradeEcho(Peer):
    """A raw local server: 101, then echo.  ``quit`` makes it say ``bye`` and
    half-close; an EOF makes it say ``bye`` (unless it did) and close."""

    switched = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.switched:
            if self.received.endswith(b"\r\n\r\n"):
                self.switched = True
                self.transport.write(SWITCHED)
        elif data == b"quit":
            self.transport.write(b"bye")
            self.transport.loseWriteConnection()
        elif not self.transport.write_closed:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def websocket_env():
    env = MemoryTunnel()
    env.origins = []
    local = Factory.forProtocol(lambda: env.origins.append(UpgradeEcho()) or env.origins[-1])
    return env.start_with_local(local, 9000)


def test_websocket_after_101_carries_bytes_and_the_origin_s_half_close():
    with websocket_env() as env:
        client = env.connect(half_close=True)
        client.send(UPGRADE)
        env.flush()
        assert client.take() == SWITCHED  # the origin's 101, byte for byte
        (origin,) = env.origins
        assert origin.received.startswith(b"GET /chat HTTP/1.1\r\n")
        client.send(b"\x81\x05hello")
        env.flush()
        assert client.take() == b"\x81\x05hello"
        client.send(b"quit")
        env.flush()
        assert client.take() == b"bye" and client.eof and client.open  # half-closed
        client.send(b"last")  # the other direction still carries bytes
        env.flush()
        assert origin.received.endswith(b"quitlast") and origin.open
        client.close()
        env.flush()
        assert client.clean and origin.closed


def test_websocket_abort_on_the_public_side_resets_the_origin():
    with websocket_env() as env:
        client = env.connect()
        client.send(UPGRADE)
        env.flush()
        assert client.take() == SWITCHED
        client.abort()
        env.flush()
        assert env.origins[0].reason.check(ConnectionLost)
        assert list(env.server.connection(env.IDENT).session.streams) == [1]


def test_websocket_public_half_close_reaches_the_origin_which_may_still_answer():
    with websocket_env() as env:
        client = env.connect(half_close=True)
        client.send(UPGRADE)
        env.flush()
        assert client.take() == SWITCHED
        client.shutdown()
        env.flush()
        assert env.origins[0].eof
        assert client.take() == b"bye" and client.eof
        client.close()


def test_a_public_client_gone_mid_request_cancels_the_origin_s_work_at_once():
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(GET % b"/delay?n=5")
        env.advance_to(1)
        (origin_timer,) = [c for c in env.clock.getDelayedCalls() if c.getTime() == 5.0]
        gone = []
        env.origin.seen[-1].notifyFinish().addErrback(gone.append)
        client.abort()
        env.flush()
        # the origin learns at once (not at 5 s) and its timer is cancelled
        assert env.now == 1 and len(gone) == 1
        assert not origin_timer.active()
        assert client.reason.check(ConnectionAborted)
