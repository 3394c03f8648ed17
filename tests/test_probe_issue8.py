"""Issue 8 tried again against the landed fixes: the variants that still got through.

Each test failed before the commit that carries it; the attack that found it
(raw sockets against the twistd pair) is named in the docstring.
"""

from __future__ import annotations

import pytest

from .memory import MemoryTunnel
from .test_forwarder import Script, exchange, raw_env
from .test_public_framing import origin_connections, refused
from .test_public_logs import global_log

HOST = b"Host: app.localhost\r\n"


# -- request framing: a length no origin can hold -----------------------------------------


@pytest.mark.parametrize(
    "length", [b"9223372036854775808", b"18446744073709551619", b"99999999999999999999999999999"]
)
def test_a_content_length_over_63_bits_is_refused(length):
    """``Content-Length: 18446744073709551619`` (2**64 + 3) reached the origin
    as it was: an origin whose parser wraps at 64 bits reads a 3-byte body and
    takes the rest of the stream for a request the server never saw.  Go's
    net/http parses the length into 63 bits and refuses anything larger."""
    with MemoryTunnel() as env:
        refused(
            env,
            b"POST /upload HTTP/1.1\r\n" + HOST + b"Content-Length: " + length + b"\r\n\r\n",
            b"400 Bad Request",
            b"malformed request",
            more=b"abcGET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n",
        )
        assert origin_connections(env) == 0


def test_the_largest_63_bit_content_length_is_forwarded():
    script = Script(after_body=False)
    with raw_env(script) as env:
        peer = exchange(
            env, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 9223372036854775807\r\n\r\nab"
        )
        assert b"Content-Length: 9223372036854775807\r\n\r\nab" in script.origin.received
        peer.close()
        env.flush()


# -- X-Forwarded-*: the underscore spelling ------------------------------------------------


def test_underscore_spellings_of_the_forwarded_headers_do_not_reach_the_origin():
    """CGI, WSGI, PHP and Rack map ``X_Forwarded_Host`` and ``X-Forwarded-Host``
    to the same HTTP_X_FORWARDED_HOST; the public ``X_Forwarded_Host:
    evil.example`` reached the origin next to ours (wsgiref joins them,
    "evil.example,app.localhost")."""
    script = Script()
    with raw_env(script) as env:
        peer = exchange(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + b"X_Forwarded_Host: evil.example\r\n"
            b"x_forwarded_proto: https\r\nX_Forwarded-For: 10.9.9.9\r\nX_Other: kept\r\n\r\n",
        )
        received = script.origin.received
        assert b"evil.example" not in received
        assert b"https" not in received
        assert b"10.9.9.9" not in received
        assert b"X_other: kept\r\n" in received  # other underscore names are theirs
        assert b"X-Forwarded-Host: app.localhost\r\n" in received
        peer.close()


# -- a 204 says nothing of a body ----------------------------------------------------------


@pytest.mark.parametrize(
    "length", [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"], ids=["cl", "te"]
)
def test_a_204_is_relayed_without_framing_headers(length):
    """RFC 9110 8.6 / 6.4.1: a 204 has no body, and a server must not send
    Content-Length in one; ``204 + Content-Length: 5`` was relayed, and a lenient
    public client then eats five bytes of the next response."""
    script = Script(b"HTTP/1.1 204 No Content\r\n" + length + b"\r\nEVIL!", close=False)
    with raw_env(script) as env:
        peer = exchange(env, b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
        assert peer.received == b"HTTP/1.1 204 No Content\r\n\r\n"
        peer.close()


# -- logs an outsider controls -------------------------------------------------------------


def test_bad_responses_are_logged_at_a_bounded_rate():
    """One public request, one 'bad response' line: 300 requests to a path the
    origin answers with garbage wrote 300 lines."""
    script = Script(b"hello there, not http", close=True)
    with raw_env(script) as env, global_log() as log:
        for _ in range(50):
            peer = exchange(env, b"GET / HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
            assert peer.received.startswith(b"HTTP/1.1 502 ")
        lines = log.of("tunnel.server")
        assert len(lines) <= 11, lines
        assert not [e for e in log.events if e.get("log_failure") is not None]


def test_bodies_over_the_limit_are_logged_at_a_bounded_rate():
    with raw_env(Script(after_body=False, close=False), max_body=10) as env, global_log() as log:
        for _ in range(50):
            peer = exchange(
                env,
                b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                b"20\r\n" + b"x" * 32 + b"\r\n",
            )
            env.advance(1)
            assert peer.closed
        lines = log.of("tunnel.server")
        assert len(lines) <= 11, lines


def test_an_early_answer_to_an_upload_reaches_a_client_still_sending():
    """An origin answers 413 at once to a 2 MB upload; the server closed the
    public connection with the upload's rest unread, which is a TCP reset, and
    the reset destroyed the 413 before the client read it (the client got no
    byte).  The connection now lingers, discarding, and closes cleanly."""
    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig"
    with raw_env(Script(answer, after_body=False, close=False)) as env:
        peer = env.connect()
        peer.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 2000000\r\n\r\n")
        for _ in range(8):
            peer.send(b"x" * 262144)
        env.flush()
        assert peer.received == (
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
        )
        assert peer.open
        peer.send(b"y" * 100000)  # read and dropped
        env.flush()
        env.advance(1)
        assert peer.closed and peer.clean


def test_a_413_for_a_content_length_over_the_limit_reaches_a_client_still_sending():
    with raw_env(Script(), max_body=1000) as env:
        peer = env.connect()
        peer.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 2000000\r\n\r\n")
        for _ in range(8):
            peer.send(b"x" * 262144)
        env.flush()
        assert peer.received.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
        assert peer.received.endswith(b"http: request body too large\n")
        env.advance(1)
        assert peer.closed and peer.clean


def test_frames_for_reset_streams_leave_no_line_per_request():
    """An origin that answers 413 at once to an upload ends the request; the
    stream is reset, and the client's WindowUpdates still in flight for it
    wrote one debug line each in twistd's log: 200 uploads, 377 lines."""
    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig"
    with raw_env(Script(answer, after_body=False, close=False)) as env, global_log() as log:
        for _ in range(50):
            peer = env.connect()
            peer.send(b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 2000000\r\n\r\n")
            for _ in range(8):
                peer.send(b"x" * 262144)
            env.flush()
            assert peer.received.startswith(b"HTTP/1.1 413 ")
            env.advance(1)
        lines = [line for line in log.lines if "unknown stream" in line]
        assert len(lines) <= 11, len(lines)


def test_an_unreachable_local_server_is_logged_by_the_client_at_a_bounded_rate():
    """With the local server down, each public request wrote one line in the
    client's log: 300 requests, 300 lines."""
    with MemoryTunnel().start(connect=False) as env, global_log() as log:
        env.client = env.make_client(local="tcp:127.0.0.1:9")  # nothing listens there
        env.client.startService()
        env.flush()
        for _ in range(50):
            raw = env.request(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
            assert raw.endswith(b"no local server")
        lines = log.of("tunnel.client")
        assert len([line for line in lines if "unreachable" in line]) <= 11, lines


def test_websocket_upgrades_are_logged_at_a_bounded_rate():
    """Each upgrade wrote a debug line ('websocket for id:... switched'), which
    twistd's log keeps: whoever opens WebSockets chose how many."""
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    upgrade = b"GET /ws HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    with raw_env(Script(switching, after_body=False, close=False)) as env, global_log() as log:
        for _ in range(50):
            peer = exchange(env, upgrade)
            assert peer.received == switching
            peer.close()
            env.flush()
        lines = [line for line in log.of("tunnel.server") if "switched" in line]
        assert len(lines) <= 11, len(lines)


def test_tcp_tunnel_failures_are_logged_at_a_bounded_rate():
    """A --tcp port whose client is not connected: each public connection
    wrote 'TCP tunnel to id:... failed', so whoever connects fills the log."""
    with MemoryTunnel().start(connect=False) as env, global_log() as log:
        env.server.add_addr(env.IDENT, port=7000)
        env.listen(env.server.tcp_factory(), 7000)
        for _ in range(50):
            peer = env.connect(port=7000)
            env.flush()
            assert peer.closed
        lines = [line for line in log.of("tunnel.server.tcp") if "TCP tunnel" in line]
        assert len(lines) <= 11, lines


@pytest.mark.parametrize(
    "codings",
    [b"gzip, chunked", b"chunked, gzip", b"identity", b"gzip\r\nTransfer-Encoding: chunked"],
    ids=["gzip-chunked", "chunked-gzip", "identity", "two-fields"],
)
def test_a_response_transfer_coding_other_than_chunked_is_a_502(codings):
    """``Transfer-Encoding: gzip, chunked`` was de-chunked and relayed as
    ``chunked`` alone: the public client took gzip bytes for the body (Go's
    client refuses any coding but chunked: "unsupported transfer encoding")."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    with raw_env(Script(answer, close=True)) as env:
        peer = exchange(env, b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
        assert peer.received.startswith(b"HTTP/1.1 502 "), peer.received
        assert b"transfer coding" in peer.received
        peer.close()


def test_an_x_forwarded_for_named_in_connection_is_not_passed_on():
    """``Connection: X-Forwarded-For`` makes the public value hop-by-hop (RFC
    9110 7.6.1), yet it was still appended to: the origin got ``10.0.0.1,
    127.0.0.1``."""
    script = Script()
    with raw_env(script) as env:
        peer = exchange(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + b"Connection: X-Forwarded-For\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\n\r\n",
        )
        assert b"10.0.0.1" not in script.origin.received
        assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in script.origin.received
        peer.close()


@pytest.mark.parametrize("ctl", [b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"])
def test_a_control_character_in_a_request_field_value_is_refused(ctl):
    """twisted.web refuses NUL, CR and LF in a value but let VT, FF, ESC, DEL
    and the other controls through to the origin; RFC 9110 5.5 says reject
    or replace them before forwarding, and Go's server refuses them (400)."""
    with MemoryTunnel() as env:
        refused(
            env,
            b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a" + ctl + b"b\r\n\r\n",
            b"400 Bad Request",
            b"malformed request",
        )
        assert origin_connections(env) == 0


def test_a_tab_and_obs_text_in_a_field_value_are_forwarded():
    script = Script()
    with raw_env(script) as env:
        peer = exchange(env, b"GET / HTTP/1.1\r\n" + HOST + b"X-A: a\tb\xe9c\r\n\r\n")
        assert b"\r\nX-A: a\tb\xe9c\r\n" in script.origin.received
        peer.close()
