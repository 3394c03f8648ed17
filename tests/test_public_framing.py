"""What the public side's HTTP channel refuses, and how (issue 8, items 7 and
8, and request smuggling), as raw bytes in memory (tests/memory.py).

Every refusal is a whole response with ``Connection: close``; the channel
then discards what the client still sends for ``linger`` seconds (1 s) and
closes, so the answer is not lost to a reset.  Nothing reaches the origin.
"""

from __future__ import annotations

import pytest

from .memory import MemoryNetwork, MemoryTunnel, parse_response

HOST = b"Host: app.localhost\r\n"


def refusal(code: bytes, text: bytes) -> bytes:
    body = text + b"\n"
    return (
        b"HTTP/1.1 " + code + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )


def origin_connections(env: MemoryTunnel) -> int:
    return sum(1 for c in env.net.connections if c.server.getHost().port == env.ORIGIN_PORT)


def refused(env: MemoryTunnel, data: bytes, code: bytes, text: bytes, *, more: bytes = b"") -> None:
    """``data`` (then ``more``) gets exactly the refusal, and the connection
    closes cleanly one second later; no tunnel work was done."""
    client = env.connect()
    start = env.now
    client.send(data)
    env.flush()
    assert client.received == refusal(code, text)
    if more:
        client.send(more)  # read and dropped
        env.flush()
        assert client.received == refusal(code, text)
    assert client.open
    env.advance(1)
    assert client.closed_at == start + 1 and client.clean
    assert env.origin.seen == [] and origin_connections(env) == 0


# -- request smuggling -------------------------------------------------------------------


SMUGGLING = {
    "cl-then-te": (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"malformed request",
    ),
    "te-then-cl": (
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"malformed request",
    ),
    "two-content-lengths": (b"Content-Length: 5\r\nContent-Length: 6\r\n", b"malformed request"),
    "same-content-length-twice": (
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"malformed request",
    ),
    "content-length-list": (b"Content-Length: 5, 5\r\n", b"malformed request"),
    "content-length-sign": (b"Content-Length: +5\r\n", b"malformed request"),
    "te-chunked-identity": (
        b"Transfer-Encoding: chunked, identity\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "te-identity-with-cl": (
        b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "te-identity-then-chunked": (
        b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        b"unsupported Transfer-Encoding",
    ),
    "te-chunked-twice": (
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"malformed request",
    ),
    "te-gzip-chunked": (b"Transfer-Encoding: gzip, chunked\r\n", b"unsupported Transfer-Encoding"),
    "te-space-before-colon": (
        b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n",
        b"malformed request",
    ),
    "te-obs-fold": (
        b"Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n",
        b"obsolete line folding in the request headers",
    ),
    "obs-fold": (b"X-A: a\r\n b\r\n", b"obsolete line folding in the request headers"),
    "obs-fold-tab": (b"X-A: a\r\n\tb\r\n", b"obsolete line folding in the request headers"),
    "fold-first-line": (b" X-A: a\r\n", b"obsolete line folding in the request headers"),
    "nul-in-value": (b"X-A: a\x00b\r\n", b"malformed request"),
    "bare-cr-in-value": (b"X-A: a\rX-B: b\r\n", b"malformed request"),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_framing_is_refused_with_400_before_any_tunnel_work(name):
    headers, text = SMUGGLING[name]
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
    with MemoryTunnel() as env:
        refused(
            env,
            b"POST /upload HTTP/1.1\r\n" + HOST + headers + b"\r\n",
            b"400 Bad Request",
            text,
            more=body,
        )


def test_transfer_encoding_on_http_1_0_is_refused():
    with MemoryTunnel() as env:
        refused(
            env,
            b"POST /upload HTTP/1.0\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"400 Bad Request",
            b"Transfer-Encoding in an HTTP/1.0 request",
        )


def test_one_chunked_in_any_case_still_frames_a_request():
    with MemoryTunnel() as env:
        raw = env.request(
            b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: Chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert parse_response(raw).body.startswith(b"5 2cf24dba")


def test_a_bad_request_line_gets_a_complete_400():
    with MemoryTunnel() as env:
        for line in (
            b"GET /\r\n",
            b"GET / HTTP/1.1 x\r\n",
            b"GET / HTTP/2.0\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\n",
        ):
            refused(env, line + HOST + b"\r\n", b"400 Bad Request", b"malformed request")


def test_a_malformed_chunk_after_the_head_gets_a_complete_400():
    """Bodies stream, so the request was on its way when the bad chunk came:
    the public client still gets a complete 400, and the origin never a
    complete request (tests/test_forwarder.py checks the stream's reset)."""
    with MemoryTunnel() as env:
        client = env.connect()
        start = env.now
        client.send(b"POST /upload HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
        env.flush()
        client.send(b"zz\r\n")
        env.flush()
        assert client.received == refusal(b"400 Bad Request", b"malformed request")
        env.advance(1)
        assert client.closed_at == start + 1 and client.clean
        assert env.origin.seen == []  # the origin rendered nothing


# -- limits ---------------------------------------------------------------------------------


def test_a_header_line_over_the_limit_is_a_431():
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + b"X-A: " + b"a" * 20 * 1024 + b"\r\n\r\n",
            b"431 Request Header Fields Too Large",
            b"request header line too long",
        )


def test_a_one_mib_header_line_is_a_431_and_the_rest_is_discarded():
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + b"X-A: " + b"a" * 1024 * 1024,
            b"431 Request Header Fields Too Large",
            b"request header line too long",
            more=b"a" * 1024 * 1024 + b"\r\n\r\n",
        )


def test_too_many_header_bytes_is_a_431():
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20))
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + lines + b"\r\n",
            b"431 Request Header Fields Too Large",
            b"request headers too large",
        )


def test_too_many_headers_is_a_431():
    lines = b"".join(b"X-%d: a\r\n" % i for i in range(600))
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + lines + b"\r\n",
            b"431 Request Header Fields Too Large",
            b"too many request headers",
        )


@pytest.mark.parametrize("size", [20 * 1024, 1024 * 1024])
def test_a_request_target_over_the_limit_is_a_414(size):
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET /" + b"a" * size + b" HTTP/1.1\r\n" + HOST + b"\r\n",
            b"414 URI Too Long",
            b"request-target too long",
        )


def test_the_limits_are_exact():
    """twisted.web's bounds, unchanged: 16 KiB per line and 16 KiB for the
    request line plus header lines (without their CRLFs)."""
    host = b"Host: nosuch.test"  # answered by the server itself: 502
    with MemoryTunnel() as env:
        for size, code in ((16384, 502), (16385, 431)):
            pad = b"X-A: " + b"a" * (size - 14 - len(host) - 5)
            head = b"GET / HTTP/1.1\r\n" + host + b"\r\n" + pad + b"\r\n\r\n"
            assert parse_response(env.request(head)).code == code
        line = b"GET /" + b"a" * (16384 - 14) + b" HTTP/1.1"
        assert len(line) == 16384  # the line fits, the head with a Host line does not
        assert parse_response(env.request(line + b"\r\n" + host + b"\r\n\r\n")).code == 431
        line = b"GET /" + b"a" * (16385 - 14) + b" HTTP/1.1"
        assert parse_response(env.request(line + b"\r\n" + host + b"\r\n\r\n")).code == 414


def test_a_refusal_after_a_pipelined_answer_follows_it():
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(
            b"GET /echo?echo=one HTTP/1.1\r\n"
            + HOST
            + b"\r\nGET / HTTP/1.1\r\n"
            + HOST
            + b"X-A: a\r\n b\r\n\r\n"
        )
        env.flush()
        first = parse_response(client.received)
        assert first.body == b"one"
        assert first.rest == refusal(
            b"400 Bad Request", b"obsolete line folding in the request headers"
        )
        env.advance(1)
        assert client.closed and client.clean


# -- Connection (item 8) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"keep-alive,close", b"close,keep-alive", b"Keep-Alive ,\tClose", b"upgrade, CLOSE"],
)
def test_close_anywhere_in_the_connection_token_list_closes(value):
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(b"GET /echo?echo=x HTTP/1.1\r\n" + HOST + b"Connection: " + value + b"\r\n\r\n")
        env.flush()
        response = parse_response(client.received)
        assert response.body == b"x"
        assert response.header(b"connection") == b"close"
        assert client.closed and client.clean


def test_close_in_a_second_connection_header_closes():
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(
            b"GET /nosuch HTTP/1.1\r\nHost: nosuch.test\r\nConnection: keep-alive\r\n"
            b"Connection: close\r\n\r\n"
        )
        env.flush()
        response = parse_response(client.received)
        assert response.code == 502 and response.header(b"connection") == b"close"
        assert client.closed and client.clean


def test_a_token_that_only_contains_close_keeps_the_connection():
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(
            b"GET /echo?echo=x HTTP/1.1\r\n" + HOST + b"Connection: closed, x-close\r\n\r\n"
        )
        env.flush()
        assert parse_response(client.take()).body == b"x"
        assert client.open
        client.close()


def test_a_refused_client_that_does_not_read_is_aborted_after_the_abort_timeout():
    net = MemoryNetwork(socket_buffer=64)  # so the refusal cannot leave the server
    with MemoryTunnel(network=net) as env:
        client = env.connect()
        client.transport.pauseProducing()  # reads nothing
        client.send(b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\r\n b\r\n\r\n")
        env.advance(1)  # the linger is over: a close is asked for, but cannot flush
        assert client.open
        env.advance(14.999)
        assert client.open
        env.advance(0.001)  # twisted.web's abortTimeout, 15 s
        assert client.closed and not client.clean
        assert env.origin.seen == []
