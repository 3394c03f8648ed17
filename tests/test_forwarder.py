"""The forwarder as an attacker sees it: exact bytes in, exact bytes out.

Every test runs the whole tunnel in memory (tests/memory.py) with a raw
origin that records, connection by connection, exactly the bytes it
received and answers with bytes the test chose.  The first group is issue
8's findings, each failing before the one forwarder (forward.py); then the
request writer's rules, streaming bodies and their limit, and hypothesis
properties over generated requests and responses.
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol

from tunnel.server.site import HeadDeadlineChannel

from .memory import MemoryTunnel

RAW_PORT = 9000
HOST = b"app.localhost"
GET = b"GET %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Parsed:
    """httptools' view of the requests on one origin connection."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.parser = httptools.HttpRequestParser(self)
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        if self.error is None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass
            except httptools.HttpParserError as e:
                self.error = e

    def on_message_begin(self) -> None:
        # bodies of many MiB grow in place (bytes would be copied whole per piece)
        self.messages.append({"url": b"", "headers": [], "body": bytearray(), "complete": False})

    def on_url(self, url: bytes) -> None:
        self.messages[-1]["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1]["headers"].append((name, value))

    def on_headers_complete(self) -> None:
        self.messages[-1]["method"] = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.messages[-1]["body"] += body

    def on_message_complete(self) -> None:
        self.messages[-1]["complete"] = True


class RawOrigin(Protocol):
    """Records every byte; writes ``answer`` once the first request head (or,
    with ``after_body``, the whole request) is in; closes after it if ``close``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received = bytearray()  # grows in place: uploads of many MiB
        self.parsed = Parsed()
        self.answered = False
        self.reason = None

    def connectionMade(self) -> None:
        self.script.connections.append(self)
        if self.script.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.parsed.feed(data)
        if self.answered or not self.parsed.messages:
            return
        first = self.parsed.messages[0]
        if self.script.continue_ and "method" in first and not first.get("continued"):
            first["continued"] = True
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        ready = first["complete"] if self.script.after_body else "method" in first
        if ready:
            self.answered = True
            self.transport.write(self.script.answer)
            if self.script.close:
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason


class Script:
    def __init__(
        self, answer: bytes = OK, *, after_body=True, close=True, paused=False, continue_=False
    ) -> None:
        self.answer = answer
        self.continue_ = continue_
        self.after_body = after_body
        self.close = close
        self.paused = paused
        self.connections: list[RawOrigin] = []

    @property
    def origin(self) -> RawOrigin:
        (origin,) = self.connections
        return origin


def raw_env(script: Script, **site_kwargs) -> MemoryTunnel:
    origin = Factory.forProtocol(lambda: RawOrigin(script))
    return MemoryTunnel(site_kwargs=site_kwargs).start_with_local(origin, RAW_PORT)


def exchange(env: MemoryTunnel, data: bytes):
    """Sends ``data`` on a new public connection; the peer, once the network settled."""
    peer = env.connect()
    peer.send(data)
    env.flush()
    return peer


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


# -- issue 8, finding 2 and 3: mis-framed responses never reach the public client --------------

BROKEN_HEADS = {
    "cr-in-reason": b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok",
    "bare-lf": b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\nContent-Length: 2\n\nok",
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\nok",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nSet-Cookie: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "space-in-name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
    "cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("request_bytes", [GET % b"/x", UPGRADE], ids=["http", "websocket"])
@pytest.mark.parametrize("answer", BROKEN_HEADS.values(), ids=BROKEN_HEADS)
def test_a_mis_framed_response_head_is_a_502_and_nothing_of_it_is_relayed(answer, request_bytes):
    """Before: CR in the reason phrase, two Content-Lengths and a NUL were relayed
    (HTTP path); a bare LF was relayed and 'Bad Name' hung (WebSocket path)."""
    script = Script(answer, close=False)
    with raw_env(script) as env:
        peer = exchange(env, request_bytes)
        raw = peer.received
        assert status_of(raw) == 502, raw
        assert body_of(raw).startswith(b"tunnel error: malformed response head"), raw
        assert b"injected" not in raw and b"ok" not in body_of(raw).split(b":")[0]
        assert peer.open  # a clean 502: the public connection stays usable
        assert script.origin.reason is not None  # the stream was reset
        peer.send(GET % b"/x")  # and carries the next request
        env.flush()
        assert peer.received.count(b"HTTP/1.1 502") == 2
        peer.close()


def test_a_broken_chunked_body_closes_the_public_connection_after_what_was_good():
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nbad\r\n"
    script = Script(answer, close=False)
    with raw_env(script) as env:
        peer = exchange(env, GET % b"/x")
        assert peer.received == (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        )  # no last chunk: the client cannot take it for complete
        assert peer.closed
        assert script.origin.reason is not None


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nshort\r\n",
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_cut_short_by_the_origin_closes_the_public_connection(answer):
    with raw_env(Script(answer)) as env:
        peer = exchange(env, GET % b"/x")
        assert b"short" in peer.received and peer.closed
        assert not peer.received.endswith(b"0\r\n\r\n")


def test_bytes_after_a_complete_response_are_not_relayed():
    answer = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    with raw_env(Script(answer, close=False)) as env:
        peer = exchange(env, GET % b"/x")
        assert peer.received == OK and peer.open
        peer.close()


# -- interim responses -----------------------------------------------------------------------


def test_a_101_to_a_plain_request_is_a_502():
    with raw_env(Script(SWITCHING + b"not http", close=False)) as env:
        peer = exchange(env, GET % b"/x")
        assert status_of(peer.received) == 502
        assert b"switched protocols" in peer.received and b"not http" not in peer.received
        peer.close()


@pytest.mark.parametrize("request_bytes", [GET % b"/x", UPGRADE], ids=["http", "websocket"])
def test_103_and_100_are_never_the_final_answer(request_bytes):
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    with raw_env(Script(interim + OK)) as env:
        peer = exchange(env, request_bytes)
        assert peer.received == OK
        peer.close()


def test_a_101_without_an_upgrade_field_is_a_502_that_says_so():
    """RFC 9110 15.2.2: a 101 names the protocol it switches to; llhttp only
    says it paused, so the 502's text is ours."""
    answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\nnot ws"
    with raw_env(Script(answer, close=False)) as env:
        peer = exchange(env, UPGRADE)
        assert status_of(peer.received) == 502
        assert b"a 101 without an Upgrade header field" in peer.received
        assert b"not ws" not in peer.received
        peer.close()


def test_a_101_to_an_upgrade_splices():
    script = Script(SWITCHING + b"hello from ws", close=False)
    with raw_env(script) as env:
        peer = exchange(env, UPGRADE)
        assert peer.received == SWITCHING + b"hello from ws"
        peer.send(b"\x81\x00frames")
        env.flush()
        assert script.origin.received.endswith(b"\r\n\r\n\x81\x00frames")
        peer.close()
        env.flush()
        assert script.origin.reason is not None


def test_head_response_with_a_content_length_is_complete_without_a_body():
    """llhttp cannot be told of HEAD: it would wait for 5 body bytes (design.md 7)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    with raw_env(Script(answer, close=False)) as env:
        peer = exchange(env, b"HEAD /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        assert peer.received == answer and peer.open
        peer.close()


# -- finding 1: request smuggling through an upgrade with a chunked body ------------------------

SMUGGLED = (
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.localhost\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
)


def test_a_chunked_upgrade_request_reaches_the_origin_as_one_request():
    """Before: forwarded with Transfer-Encoding: chunked but the de-chunked body,
    so the origin ran GET /smuggled with a forged X-Forwarded-For."""
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    public = UPGRADE[:-2] + b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    script = Script(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with raw_env(script) as env:
        peer = exchange(env, public)
        origin = script.origin
        head, body = origin.received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"GET /ws HTTP/1.1\r\n")
        assert head.endswith(b"\r\nTransfer-Encoding: chunked")
        assert head.count(b"Transfer-Encoding") == 1
        assert body == chunked  # the smuggled bytes stay inside the one chunk
        assert status_of(peer.received) == 400
        peer.close()


# -- what the public connection is given ------------------------------------------------------


class CountedWrites:
    """Counts the calls that hand bytes to a transport (each one is a send, or
    more, on a real socket that writes through)."""

    def __init__(self, transport) -> None:
        self.calls: list[bytes] = []
        write, write_sequence = transport.write, transport.writeSequence

        def counted_write(data: bytes) -> None:
            self.calls.append(data)
            write(data)

        def counted_sequence(iovec) -> None:
            iovec = list(iovec)
            self.calls.append(b"".join(iovec))
            write_sequence(iovec)

        transport.write, transport.writeSequence = counted_write, counted_sequence


def counted_public(env: MemoryTunnel):
    """A public connection whose server end counts its writes."""
    peer = env.connect()
    env.flush()
    return peer, CountedWrites(peer.transport.other)


CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize("answer", [OK, CHUNKED_OK], ids=["length", "chunked"])
def test_a_response_read_in_one_piece_leaves_in_one_write(answer):
    """Head, body and the end of a chunked body go out together: one send
    rather than three on a real socket."""
    with raw_env(Script(answer, close=False)) as env:
        peer, counted = counted_public(env)
        peer.send(GET % b"/x")
        env.flush()
        assert status_of(peer.received) == 200 and peer.received.endswith(
            b"ok" if answer is OK else b"0\r\n\r\n"
        )
        assert counted.calls == [peer.received]
        peer.close()


def test_a_response_in_pieces_leaves_as_each_piece_is_read():
    """Holding lasts one piece of the stream: a head is not kept back until
    its body comes (a server-sent event stream must see its head at once)."""
    script = Script(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", close=False)
    with raw_env(script) as env:
        peer, counted = counted_public(env)
        peer.send(GET % b"/events")
        env.flush()
        assert status_of(peer.received) == 200 and peer.received.endswith(b"\r\n\r\n")
        assert len(counted.calls) == 1
        script.origin.transport.write(b"5\r\nhello\r\n")
        env.flush()
        assert peer.received.endswith(b"5\r\nhello\r\n") and len(counted.calls) == 2
        peer.close()


def test_a_refusal_of_a_pipelined_request_follows_the_held_response():
    """The next request, pipelined, is parsed (and refused) while the first
    one's response is held: the refusal must still come second."""
    bad = b"GET /y HTTP/1.1\r\nHost: app.localhost\r\nX-Bad: a\x01b\r\n\r\n"
    with raw_env(Script(OK, close=False)) as env:
        peer, counted = counted_public(env)
        peer.send(GET % b"/x" + bad)
        env.flush()
        first, second = peer.received.split(b"HTTP/1.1 ", 2)[1:]
        assert first.startswith(b"200 ") and first.endswith(b"\r\n\r\nok")
        assert second.startswith(b"400 ") and b"Connection: close" in second
        assert counted.calls[0].endswith(b"\r\n\r\nok")  # the response, whole, then the refusal
        peer.close()


# -- the request we write -------------------------------------------------------------------------


def forwarded_lines_removed(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(x for x in lines if not x.lower().startswith(b"x-forwarded-"))


def test_the_request_is_written_in_origin_form_without_hop_by_hop_headers():
    public = (
        b"POST http://app.localhost/path?q=1 HTTP/1.1\r\nHost: app.localhost\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic x\r\nUpgrade: h2c\r\n"
        b"X-End: to-end\r\nContent-Length: 4\r\n\r\nbody"
    )
    script = Script()
    with raw_env(script) as env:
        peer = exchange(env, public)
        assert peer.received == OK
        assert forwarded_lines_removed(script.origin.received) == (
            b"POST /path?q=1 HTTP/1.1\r\nHost: app.localhost\r\nX-End: to-end\r\n"
            b"Content-Length: 4\r\n\r\nbody"
        )
        assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in script.origin.received
        peer.close()


def test_a_chunked_public_body_is_chunked_again_by_us():
    public = (
        b"PUT /up HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    script = Script()
    with raw_env(script) as env:
        peer = exchange(env, public)
        assert peer.received == OK
        received = forwarded_lines_removed(script.origin.received)
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.endswith(b"\r\nTransfer-Encoding: chunked")
        assert b"\r\nconnection:" not in head.lower()  # keep-alive: the stream may be kept
        assert script.origin.parsed.messages[0]["body"] == b"abcde"
        assert body.endswith(b"0\r\n\r\n") and b"X-Trailer" not in body
        peer.close()


# -- finding 5: bodies stream, with backpressure and a limit ------------------------------------

MiB = 1024 * 1024


def test_an_upload_reaches_the_origin_as_it_arrives_and_is_never_spooled():
    """Before: a 200 MiB upload was spooled to disk and the origin's first byte
    came after its end."""
    script = Script(close=False)
    with raw_env(script) as env:
        peer = env.connect()
        peer.send(
            b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n" % (200 * MiB)
        )
        peer.send(b"x" * 1000)
        env.flush()
        origin = script.origin
        assert origin.received.endswith(b"\r\n\r\n" + b"x" * 1000)
        request = env.public_requests[-1]
        assert request.content.tell() == 0  # nothing kept on the server
        assert request.tunnel_body.received == 1000
        peer.abort()
        env.flush()
        assert origin.reason is not None  # the stream was reset


def test_an_upload_is_paced_by_the_origin():
    """The origin does not read: the server stops reading the public connection
    after the tunnel's window and the socket buffers are full."""
    script = Script(close=False, paused=True)
    with raw_env(script) as env:
        peer = env.connect()
        size = 16 * MiB
        peer.send(b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n" % size)
        peer.send(b"y" * size)
        env.flush()
        assert peer.transport.buffered > size - 2 * MiB  # still with the public client
        script.origin.transport.resumeProducing()
        env.flush()
        assert script.origin.parsed.messages[0]["complete"]
        assert len(script.origin.parsed.messages[0]["body"]) == size
        assert peer.received == OK
        peer.close()


def test_a_known_body_over_the_limit_is_a_413_before_anything_is_forwarded():
    """Before: Content-Length: 1 TiB was accepted (and spooled)."""
    script = Script()
    with raw_env(script, max_body=1000) as env:
        peer = exchange(
            env,
            b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 1099511627776\r\n\r\nab",
        )
        assert status_of(peer.received) == 413
        assert body_of(peer.received) == b"http: request body too large\n"
        env.advance(1)  # the rest of the body is discarded a while, then the connection closes
        assert peer.closed and peer.clean and script.connections == []


def test_a_chunked_body_over_the_limit_resets_the_stream_and_closes():
    script = Script(after_body=False, close=False)
    with raw_env(script, max_body=10) as env:
        peer = env.connect()
        peer.send(b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        peer.send(b"8\r\n12345678\r\n")
        env.flush()
        assert script.origin.received.endswith(b"8\r\n12345678\r\n")
        peer.send(b"8\r\n12345678\r\n")
        env.flush()
        assert script.origin.reason is not None
        env.advance(1)
        assert peer.closed
        assert not script.origin.received.endswith(b"0\r\n\r\n")


def test_a_chunked_body_over_the_limit_before_the_stream_opened_is_a_413():
    script = Script(after_body=False, close=False)
    with raw_env(script, max_body=10) as env:
        env.tunnel_connection().freeze()  # the client's stream cannot arrive yet
        peer = exchange(
            env,
            b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n0123456789abcdef\r\n",
        )
        assert status_of(peer.received) == 413
        env.advance(1)
        assert peer.closed
        env.tunnel_connection().thaw()
        env.flush()
        assert script.connections == [] or script.origin.reason is not None


def test_expect_100_continue_is_the_origins_decision():
    public = (
        b"PUT /up HTTP/1.1\r\nHost: app.localhost\r\nExpect: 100-continue\r\n"
        b"Content-Length: 4\r\n\r\n"
    )
    script = Script(continue_=True)
    with raw_env(script) as env:
        peer = exchange(env, public)
        assert peer.received == b"HTTP/1.1 100 Continue\r\n\r\n"  # the origin's, relayed
        assert b"\r\nExpect: 100-continue\r\n" in script.origin.received
        assert script.origin.received.endswith(b"\r\n\r\n")  # head only
        peer.send(b"body")
        env.flush()
        assert peer.received == b"HTTP/1.1 100 Continue\r\n\r\n" + OK
        assert script.origin.parsed.messages[0]["body"] == b"body"
        peer.close()


def test_an_early_final_answer_ends_the_request_without_the_body():
    """Before: the upload was read whole (and a 413 from the origin left
    'read of closed file' tracebacks)."""
    refused = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!"
    script = Script(refused, after_body=False, close=False)
    with raw_env(script) as env:
        peer = exchange(
            env,
            b"PUT /up HTTP/1.1\r\nHost: app.localhost\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000000\r\n\r\n",
        )
        assert peer.received == (
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
        )
        assert script.origin.reason is not None
        assert peer.open  # what the client still sends is read and dropped a while,
        env.advance(1)  # so that closing does not reset the answer away
        assert peer.closed and peer.clean  # the rest of the body cannot be skipped safely


def test_a_public_client_that_leaves_resets_the_stream():
    script = Script(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", close=False)
    with raw_env(script) as env:
        peer = exchange(env, GET % b"/x")
        assert peer.received.endswith(b"part")
        peer.abort()
        env.flush()
        assert script.origin.reason is not None


# -- properties ---------------------------------------------------------------------------------

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
value = st.binary(min_size=0, max_size=30).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E or c == 0x20).strip()
)
end_to_end = st.lists(st.tuples(token.map(lambda t: b"x-" + t.encode()), value), max_size=6)
paths = st.text("abcdefghijklmnopqrstuvwxyz0123456789/._~-%=&?", max_size=30).map(
    lambda p: b"/" + p.encode()
)


def by_name(fields) -> dict[bytes, list[bytes]]:
    """Field values by name, in order: the order of different names carries no meaning."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        out.setdefault(name.lower(), []).append(value)
    return out


@PROPERTY
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    path=paths,
    headers=end_to_end,
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "none"]),
    pieces=st.lists(st.integers(1, 500), max_size=5),
)
def test_the_origin_sees_exactly_the_request_the_public_client_sent(
    method, path, headers, body, framing, pieces
):
    if framing == "none":
        body = b""
    head = b"%s %s HTTP/1.1\r\nHost: app.localhost\r\n" % (method, path)
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    if framing == "length":
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        chunks, rest = [], body
        for n in pieces:
            if rest:
                chunks.append(b"%x\r\n%s\r\n" % (len(rest[:n]), rest[:n]))
                rest = rest[n:]
        if rest:
            chunks.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\n\r\n"
    else:
        wire = head + b"\r\n"
    script = Script()
    with raw_env(script) as env:
        peer = exchange(env, wire)
        assert peer.received == OK
        origin = script.origin
        assert origin.parsed.error is None
        (message,) = origin.parsed.messages
        assert message["complete"]
        assert (message["method"], message["url"], message["body"]) == (method, path, body)
        seen = [
            (n.lower(), v)
            for n, v in message["headers"]
            if n.lower().startswith(b"x-") and not n.lower().startswith(b"x-forwarded-")
        ]
        assert by_name(seen) == by_name(headers)
        peer.close()


def frame_response(status, headers, body, framing, pieces) -> bytes:
    head = b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers
    )
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    if framing == "chunked":
        out, rest = [], body
        for n in [*pieces, len(body)]:
            if rest:
                out.append(b"%x\r\n%s\r\n" % (len(rest[:n]), rest[:n]))
                rest = rest[n:]
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(out) + b"0\r\n\r\n"
    return head + b"\r\n" + body  # to the end of the stream


MUTATIONS = {
    "cr": lambda head: head.replace(b"Whatever\r\n", b"Whatever\rX-Injected: 1\r\n", 1),
    "lf": lambda head: head.replace(b"\r\n", b"\n", 1),
    "nul": lambda head: head.replace(b"Whatever", b"What\x00ever", 1),
    "space": lambda head: head.replace(b"\r\n", b"\r\nBad Name: 1\r\n", 1),
    "two-lengths": lambda head: head.replace(
        b"\r\n", b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n", 1
    ),
}


class PublicResponse:
    def __init__(self) -> None:
        self.status = None
        self.headers: list = []
        self.body = b""
        self.complete = 0

    def on_header(self, name, value):
        self.headers.append((name.lower(), value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete += 1


@PROPERTY
@given(
    status=st.sampled_from([200, 201, 204, 304, 404, 500]),
    headers=end_to_end,
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "eof"]),
    pieces=st.lists(st.integers(1, 500), max_size=5),
    interim=st.sampled_from([b"", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"]),
    mutation=st.sampled_from([None, *MUTATIONS]),
)
def test_the_public_client_parses_exactly_what_the_origin_sent_or_gets_a_502(
    status, headers, body, framing, pieces, interim, mutation
):
    if status in (204, 304):
        body, framing = b"", "length" if framing == "eof" else framing
    answer = frame_response(status, headers, body, framing, pieces)
    if mutation is not None:
        answer = MUTATIONS[mutation](answer)
    with raw_env(Script(interim + answer)) as env:
        peer = exchange(env, GET % b"/x")
        raw = peer.received
        if mutation is not None:
            assert status_of(raw) == 502 and b"X-Injected" not in raw
            peer.close()
            return
        public = PublicResponse()
        parser = httptools.HttpResponseParser(public)
        parser.feed_data(raw)
        assert public.complete == 1
        assert parser.get_status_code() == status
        assert public.body == body
        got = [(n, v) for n, v in public.headers if n.startswith(b"x-")]
        assert by_name(got) == by_name(headers)
        peer.close()


def test_a_malformed_chunked_public_body_resets_the_stream():
    script = Script(close=False)
    with raw_env(script) as env:
        peer = exchange(
            env,
            b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n",
        )
        peer.send(b"zz\r\n")
        env.flush()
        assert status_of(peer.received) == 400
        env.advance(HeadDeadlineChannel.linger)  # the refusal's lingering close
        assert peer.closed
        origin = script.origin
        assert origin.received.endswith(b"\r\n\r\n3\r\nabc\r\n")  # never a last chunk
        assert origin.reason is not None and not origin.parsed.messages[0]["complete"]


def test_a_streamed_upload_then_a_pipelined_request_on_one_connection():
    script = Script()
    with raw_env(script) as env:
        post = b"POST /up HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 5\r\n\r\nhello"
        peer = exchange(env, post + GET % b"/next")
        assert peer.received == OK + OK and peer.open
        first, second = script.connections
        assert first.parsed.messages[0]["body"] == b"hello"
        assert second.parsed.messages[0]["url"] == b"/next"
        peer.close()
