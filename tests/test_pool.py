"""Keep-alive over the tunnel: streams kept between HTTP requests (server/pool.py).

The whole tunnel runs in memory on one Clock (tests/memory.py).  The origin
here is raw: it records each connection and each request head on it, and
answers each request with the bytes the test chose, so a test can tell
exactly which requests shared a stream (one stream is one connection to the
origin: the client splices them byte for byte).  ``GoLikeLocal`` stands in
for the Go client's side of a stream where that matters: when its local
server has closed, the Go client sends no FIN, and the stream fails only
under the next request written into it (design.md section 9).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from tunnel.client import TunnelClientService
from tunnel.server.pool import OriginLeg, StreamPool

from .memory import MemoryTunnel, parse_response

RAW_PORT = 9000
GET = b"GET %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n"


def ok(body: bytes, *extra: bytes) -> bytes:
    fields = b"".join(field + b"\r\n" for field in extra)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (fields, len(body), body)


class KeepAliveOrigin(Protocol):
    """One origin connection: answers every request head, in order, with
    ``script(path)`` (bytes), unless the origin holds its answers."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buf = b""
        self.paths: list[bytes] = []
        self.held: list[bytes] = []
        self.reason = None

    def connectionMade(self) -> None:
        self.origin.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1]
            self.paths.append(path)
            if self.origin.hold:
                self.held.append(path)
            else:
                self.answer(path)

    def answer(self, path: bytes) -> None:
        self.transport.write(self.origin.script(path))
        if path.startswith(b"/close"):
            self.transport.loseConnection()

    def release(self) -> None:
        held, self.held = self.held, []
        for path in held:
            self.answer(path)

    def connectionLost(self, reason) -> None:
        self.reason = reason


class Origin:
    def __init__(self, script=None, *, hold: bool = False) -> None:
        self.script = script or (lambda path: ok(path))
        self.hold = hold
        self.connections: list[KeepAliveOrigin] = []

    @property
    def open(self) -> list[KeepAliveOrigin]:
        return [c for c in self.connections if c.reason is None]


def tunnel(origin: Origin, **server_kwargs) -> MemoryTunnel:
    local = Factory.forProtocol(lambda: KeepAliveOrigin(origin))
    return MemoryTunnel(server_kwargs=server_kwargs).start_with_local(local, RAW_PORT)


def get(env: MemoryTunnel, path: bytes, head_request: bool = False):
    method = b"HEAD" if head_request else b"GET"
    raw = env.request(b"%s %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n" % (method, path))
    return parse_response(raw, head_request=head_request)


def streams(env: MemoryTunnel) -> int:
    """Tunnel streams open on the server's session (the control stream not counted)."""
    return len(env.server.connection(env.IDENT).session.streams) - 1


# -- keeping ----------------------------------------------------------------------------


def test_requests_in_a_row_share_one_stream_and_one_local_connection():
    origin = Origin()
    with tunnel(origin) as env:
        peer = env.connect()
        peer.send(GET % b"/one" + GET % b"/two")  # one public connection, pipelined
        env.flush()
        first = parse_response(peer.take())
        assert (first.code, first.body, parse_response(first.rest).body) == (200, b"/one", b"/two")
        for path in (b"/three", b"/four"):  # and new public connections
            assert get(env, path).body == path
        (connection,) = origin.connections
        assert connection.paths == [b"/one", b"/two", b"/three", b"/four"]
        assert streams(env) == 1
        # the requests we wrote leave the connection open: no Connection field
        peer.close()


def test_without_keeping_each_request_says_close_and_gets_its_own_stream():
    origin = Origin()
    with tunnel(origin, max_idle_streams=0) as env:
        for path in (b"/one", b"/two"):
            assert get(env, path).body == path
        assert [c.paths for c in origin.connections] == [[b"/one"], [b"/two"]]
        assert streams(env) == 0


def test_a_stream_is_kept_only_when_the_response_lets_it_outlive_it():
    answers = {
        b"/close-field": ok(b"a", b"Connection: close"),
        b"/http10": b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
        b"/to-eof": b"HTTP/1.1 200 OK\r\n\r\nc",
        b"/close-after": ok(b"d"),  # the origin closes right after its answer
    }
    for path, answer in answers.items():
        origin = Origin(lambda _, answer=answer: answer)
        with tunnel(origin) as env:
            # the origin closes after its answer on a path that starts with /close
            response = get(env, b"/close" if path in (b"/to-eof", b"/close-after") else path)
            assert response.code == 200, path
            env.flush()
            assert streams(env) == 0, path
            assert origin.open == [], path
            assert get(env, b"/close-next").code == 200
            assert len(origin.connections) == 2, path


def test_bytes_after_a_complete_response_reset_the_stream():
    for head_request, answer in (
        (False, ok(b"x") + b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nsmuggled"),
        (True, ok(b"hello")),  # a HEAD answered with a body: 5 bytes too many
    ):
        origin = Origin(lambda _, answer=answer: answer)
        with tunnel(origin) as env:
            response = get(env, b"/a", head_request=head_request)
            assert response.code == 200
            assert response.body == (b"" if head_request else b"x")
            env.flush()
            assert streams(env) == 0
            assert origin.open == []  # the client reset its local connection
            origin.script = lambda path: ok(path)
            assert get(env, b"/b").body == b"/b"
            assert origin.connections[1].paths == [b"/b"]


def test_bytes_arriving_while_a_stream_waits_retire_it():
    origin = Origin()
    with tunnel(origin) as env:
        assert get(env, b"/a").code == 200
        assert streams(env) == 1
        origin.connections[0].transport.write(b"HTTP/1.1 200 OK\r\n\r\nunasked")
        env.flush()
        assert streams(env) == 0
        assert origin.open == []
        assert get(env, b"/b").body == b"/b"


def test_a_local_server_that_closes_an_idle_connection_retires_its_stream_at_once():
    origin = Origin()
    with tunnel(origin) as env:
        assert get(env, b"/a").code == 200
        origin.connections[0].transport.loseConnection()
        env.flush()  # our client turns the EOF into a FIN on the stream
        assert streams(env) == 0

        # the pool's timer fires once more, finds nothing waiting and stops
        def pool_timers():  # (the session's own Deadlines wait 75 s and more)
            return [
                c
                for c in env.clock.getDelayedCalls()
                if "Deadlines._fire" in repr(c) and c.getTime() <= env.now + 1.5
            ]

        (timer,) = pool_timers()
        env.advance_to(timer.getTime())
        assert pool_timers() == []
        assert get(env, b"/b").body == b"/b"
        assert [c.paths for c in origin.connections] == [[b"/a"], [b"/b"]]


def test_a_kept_stream_waits_at_most_the_idle_timeout():
    origin = Origin()
    with tunnel(origin, stream_idle_timeout=1.5) as env:
        assert get(env, b"/a").code == 200
        kept_at = env.now
        env.advance(1.0)
        assert get(env, b"/b").code == 200  # used again: its wait starts anew
        used_at = env.now
        assert len(origin.connections) == 1
        closed_at = env.run_until(lambda: streams(env) == 0)
        assert closed_at == used_at + 1.5 != kept_at + 1.5
        env.flush()
        assert origin.open == []
        assert origin.connections[0].reason.check(Exception) is not None


def test_a_busy_pool_arms_its_timer_once_not_once_a_request():
    origin = Origin()
    with tunnel(origin) as env:
        armed = []
        call_later = env.clock.callLater

        def spy(delay, f, *args, **kwargs):
            # the pool's wait (1.5 s), not the session's stream deadlines (75 s and more)
            if getattr(f, "__qualname__", "") == "Deadlines._fire" and delay == 1.5:
                armed.append(env.now + delay)
            return call_later(delay, f, *args, **kwargs)

        env.clock.callLater = spy
        for i in range(10):
            assert get(env, b"/%d" % i).code == 200
            env.advance(0.1)
        assert len(origin.connections) == 1
        assert len(armed) == 1  # not one a request
        # it fires while the stream is in use again and again, and re-arms
        # for the stream's own deadline: 1.5 s after its last use
        last_use = env.now - 0.1
        closed_at = env.run_until(lambda: streams(env) == 0)
        assert abs(closed_at - (last_use + 1.5)) < 1e-9


def test_at_most_max_idle_streams_wait_and_the_rest_close():
    origin = Origin(hold=True)
    with tunnel(origin, max_idle_streams=2) as env:
        peers = [env.connect() for _ in range(4)]
        for i, peer in enumerate(peers):
            peer.send(GET % b"/%d" % i)
        env.flush()
        assert len(origin.connections) == 4
        for connection in origin.connections:
            connection.release()
        env.flush()
        assert [parse_response(p.received).code for p in peers] == [200] * 4
        assert streams(env) == 2
        assert len(origin.open) == 2
        for peer in peers:
            peer.close()


def test_websocket_upgrades_never_take_a_kept_stream():
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    origin = Origin(lambda path: switching if path == b"/ws" else ok(path))
    with tunnel(origin) as env:
        assert get(env, b"/a").code == 200
        peer = env.connect()
        peer.send(upgrade)
        env.flush()
        assert peer.take().startswith(b"HTTP/1.1 101 ")
        assert [c.paths for c in origin.connections] == [[b"/a"], [b"/ws"]]
        assert streams(env) == 2  # the kept one and the spliced one
        peer.close()


def test_a_client_that_stops_is_not_held_up_by_the_streams_kept_for_it():
    origin = Origin()
    with tunnel(origin) as env:
        assert get(env, b"/a").code == 200
        assert streams(env) == 1
        stopping = env.client.stopService()  # GoAway, then it waits for its streams
        env.flush()
        assert env.result(stopping, limit=0.0) is None  # at once, no timer had to fire
        assert origin.open == []
        connection = env.server.connection(env.IDENT)
        assert connection is None or connection.reuse(RAW_PORT) is None


def test_a_graceful_stop_closes_kept_streams_without_waiting_for_the_grace():
    origin = Origin()
    env = tunnel(origin)
    assert get(env, b"/a").code == 200
    assert streams(env) == 1
    stopped = env.server.stop(grace=30.0)
    env.flush()
    assert env.result(stopped, limit=1.0) is None
    env.stop(grace=30.0)


# -- any mix of origin behaviours --------------------------------------------------------

#: how the origin answers one request: (answer, closes after it, stream may be kept)
KINDS = {
    "length": (lambda body: ok(body), False, True),
    "chunked": (
        lambda body: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        ),
        False,
        True,
    ),
    "close-field": (lambda body: ok(body, b"Connection: close"), True, False),
    "http10": (
        lambda body: b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        True,
        False,
    ),
    "to-eof": (lambda body: b"HTTP/1.1 200 OK\r\n\r\n" + body, True, False),
    "closes-after": (lambda body: ok(body), True, False),
    "overrun": (lambda body: ok(body) + b"HTTP/1.1 200 OK\r\n\r\nextra", False, False),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(sorted(KINDS)), st.sampled_from([0.0, 0.5, 2.0])),
        min_size=1,
        max_size=8,
    ),
    max_idle=st.sampled_from([0, 1, 64]),
)
def test_any_mix_of_origin_behaviours_gets_every_answer_and_leaks_no_stream(steps, max_idle):
    """Whatever the origin does after each response, each public request gets
    its own answer, a stream is kept only when the answer allowed it, and
    every stream the server holds is one the origin still holds (none leaks)."""
    origin = Origin()
    plan: dict[bytes, str] = {}

    def script(path: bytes) -> bytes:
        return KINDS[plan[path]][0](path)

    origin.script = script
    with tunnel(origin, max_idle_streams=max_idle, stream_idle_timeout=1.5) as env:
        for n, (kind, pause) in enumerate(steps):
            closes = KINDS[kind][1]
            path = b"/close-%d" % n if closes else b"/%d" % n
            plan[path] = kind
            response = get(env, path)
            assert (response.code, response.body) == (200, path), (kind, response)
            env.flush()
            kept = streams(env)
            assert kept == len(origin.open)
            # one request at a time: the stream that carried it is kept or nothing is
            assert kept == (1 if KINDS[kind][2] and max_idle > 0 else 0), kind
            env.advance(pause)
            assert streams(env) == len(origin.open)


# -- a stream that died while it waited (the Go client sends no FIN) ----------------------


class GoLikeLocal:
    """The client's side of each stream, answering as a keep-alive local
    server would; after ``die(n, how)`` stream n fails under its next request
    ("fin": the Go client closes the stream once its write to the closed local
    connection fails; "rst": it is reset), without a byte of answer."""

    def __init__(self) -> None:
        self.streams: list[_GoLikeStream] = []
        #: how every new stream fails (None: it answers)
        self.new_streams_die: str | None = None

    def __call__(self, stream, message) -> None:
        leg = _GoLikeStream()
        leg.dead = self.new_streams_die
        self.streams.append(leg)
        stream.attach(leg)

    def die(self, n: int, how: str) -> None:
        self.streams[n].dead = how


class _GoLikeStream(Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.dead: str | None = None
        self.requests: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.requests.append(head.split(b"\r\n", 1)[0])
            if self.dead == "fin":
                self.transport.loseConnection()
                return
            if self.dead == "rst":
                self.transport.abortConnection()
                return
            method, path, _ = head.split(b" ", 2)
            answer = ok(path)
            self.transport.write(
                answer[: answer.index(b"\r\n\r\n") + 4] if method == b"HEAD" else answer
            )


def go_like_tunnel(local: GoLikeLocal) -> MemoryTunnel:
    env = MemoryTunnel().start(connect=False)
    reference = env.make_client()  # for its options; not started
    env.clients.remove(reference)
    env.client = TunnelClientService(
        reference.endpoint,
        env.IDENT,
        local,
        host=reference.host,
        clock=env.clock,
        retry=reference.retry,
    )
    env.clients.append(env.client)
    env.client.startService()
    env.flush()
    return env


def test_an_idempotent_request_on_a_dead_kept_stream_is_sent_again_on_a_fresh_one():
    for how in ("fin", "rst"):
        local = GoLikeLocal()
        with go_like_tunnel(local) as env:
            assert get(env, b"/a").body == b"/a"
            local.die(0, how)
            for method in (b"GET", b"HEAD", b"DELETE"):
                raw = env.request(b"%s /again HTTP/1.1\r\nHost: app.localhost\r\n\r\n" % method)
                response = parse_response(raw, head_request=method == b"HEAD")
                assert response.code == 200, (how, method, raw)
                if method == b"GET":
                    assert response.body == b"/again"
            # the dead stream saw one request and no more; each retry went elsewhere
            assert local.streams[0].requests == [b"GET /a HTTP/1.1", b"GET /again HTTP/1.1"]
            assert [s.requests for s in local.streams[1:]] == [
                [b"GET /again HTTP/1.1", b"HEAD /again HTTP/1.1", b"DELETE /again HTTP/1.1"]
            ]


def test_a_request_with_a_body_or_not_idempotent_is_not_sent_again():
    requests = (
        b"POST /p HTTP/1.1\r\nHost: app.localhost\r\n\r\n",
        b"PUT /p HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 2\r\n\r\nhi",
    )
    for request in requests:
        local = GoLikeLocal()
        with go_like_tunnel(local) as env:
            assert get(env, b"/a").code == 200
            local.die(0, "fin")
            response = parse_response(env.request(request))
            assert response.code == 502
            assert response.body.startswith(b"tunnel error: the origin closed the stream")
            assert len(local.streams) == 1  # no second stream was asked for
            assert get(env, b"/b").body == b"/b"  # a fresh stream for the next one


def test_a_fresh_stream_that_dies_is_a_502_and_not_sent_again():
    local = GoLikeLocal()
    with go_like_tunnel(local) as env:
        local.new_streams_die = "rst"
        response = get(env, b"/a")
        assert response.code == 502
        assert len(local.streams) == 1


# -- StreamPool on its own ----------------------------------------------------------------


class FakeStream:
    def __init__(self, session=None) -> None:
        self.session = session
        self.closed: str | None = None
        self.resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1

    def loseConnection(self) -> None:
        self.closed = "fin"

    def abortConnection(self) -> None:
        self.closed = "rst"


def leg() -> OriginLeg:
    result = OriginLeg()
    result.makeConnection(FakeStream())
    return result


def test_the_pool_gives_the_most_recently_kept_stream_first_and_ages_out_the_rest():
    clock = Clock()
    pool = StreamPool(clock, max_idle=3, idle_timeout=2.0)
    a, b, c, d = leg(), leg(), leg(), leg()
    assert pool.keep(a)
    clock.advance(1.0)
    assert pool.keep(b) and pool.keep(c)
    assert not pool.keep(d)  # full
    assert len(clock.getDelayedCalls()) == 1  # one timer for the pool
    assert pool.take() is c
    clock.advance(1.0)  # a waited 2 s
    assert (a.transport.closed, b.transport.closed) == ("fin", None)
    assert len(pool) == 1 and a.pool is None and b.pool is pool
    clock.advance(1.0)
    assert b.transport.closed == "fin" and len(pool) == 0
    assert clock.getDelayedCalls() == []
    assert pool.take() is None
    assert (c.carried, c.reused) == (1, True) and d.carried == 0


def test_a_waiting_leg_retires_on_data_or_eof_and_is_forgotten_when_lost():
    clock = Clock()
    pool = StreamPool(clock, max_idle=4, idle_timeout=2.0)
    a, b, c = leg(), leg(), leg()
    for x in (a, b, c):
        pool.keep(x)
    a.dataReceived(b"x")
    b.readConnectionLost()
    c.connectionLost()
    assert (a.transport.closed, b.transport.closed, c.transport.closed) == ("rst", "fin", None)
    assert len(pool) == 0 and len(clock.getDelayedCalls()) == 1
    clock.advance(2.0)  # the timer finds the pool empty and stops
    assert clock.getDelayedCalls() == []
    assert not pool.keep(c)  # lost: never kept


def test_a_closed_pool_retires_what_waits_and_keeps_nothing():
    clock = Clock()
    pool = StreamPool(clock, max_idle=4, idle_timeout=2.0)
    a = leg()
    pool.keep(a)
    pool.close()
    assert a.transport.closed == "fin" and clock.getDelayedCalls() == []
    assert not pool.keep(leg())
