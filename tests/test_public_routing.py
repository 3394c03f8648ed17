"""Where a public request goes and what the origin is told about it (issue 8,
items 4, 6 and 7's Host rules), as raw bytes in memory (tests/memory.py).

A request the public side refuses must be refused before any tunnel work:
the origin gets no connection at all.  The origin here is raw: it records
exactly the bytes it received, connection by connection.
"""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory

from .memory import SERVER, MemoryTunnel, Peer, parse_response

DATE = b"Thu, 01 Jan 1970 00:00:00 GMT"
ORIGIN_PORT = 9000
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class RawOrigin(Peer):
    """Records what it receives; answers ``ANSWER`` and closes after a head."""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.transport.disconnecting:
            self.transport.write(ANSWER)
            self.transport.loseConnection()


def raw_env() -> MemoryTunnel:
    env = MemoryTunnel().start(connect=False)
    env.origins = []
    env.listen(
        Factory.forProtocol(lambda: env.origins.append(RawOrigin()) or env.origins[-1]),
        ORIGIN_PORT,
    )
    env.client = env.make_client(local=f"tcp:127.0.0.1:{ORIGIN_PORT}")
    env.client.startService()
    env.flush()
    return env


def head_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def header(raw: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in head_lines(raw)[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


def error_page(code: bytes, text: bytes) -> bytes:
    """What TunnelResource answers (Go's http.Error shape), at time 0."""
    body = text + b"\n"
    return (
        b"HTTP/1.1 " + code + b"\r\nServer: " + SERVER + b"\r\nDate: " + DATE + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


# -- X-Forwarded-* (item 4) ------------------------------------------------------------


def test_x_forwarded_host_and_proto_are_what_the_server_saw_and_for_is_appended():
    with raw_env() as env:
        raw = env.request(
            b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n"
            b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
        )
        assert parse_response(raw).body == b"ok"
        (origin,) = env.origins
        assert header(origin.received, b"x-forwarded-host") == [b"app.localhost"]
        assert header(origin.received, b"x-forwarded-proto") == [b"http"]
        assert header(origin.received, b"x-forwarded-for") == [b"10.0.0.1, 127.0.0.1"]


def test_x_forwarded_host_is_replaced_on_the_upgrade_path_too():
    with raw_env() as env:
        raw = env.request(
            b"GET /chat HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nx-forwarded-host: evil.example\r\n"
            b"X-FORWARDED-PROTO: https\r\n\r\n"
        )
        assert parse_response(raw).body == b"ok"  # a 200, relayed as it is
        (origin,) = env.origins
        assert header(origin.received, b"x-forwarded-host") == [b"app.localhost"]
        assert header(origin.received, b"x-forwarded-proto") == [b"http"]


# -- absolute-form and CONNECT (item 6) ----------------------------------------------------


def test_absolute_form_is_routed_by_its_authority_and_sent_in_origin_form():
    with raw_env() as env:
        raw = env.request(
            b"GET http://App.Localhost/path?q=1 HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        )
        assert parse_response(raw).body == b"ok"
        (origin,) = env.origins
        assert head_lines(origin.received)[0] == b"GET /path?q=1 HTTP/1.1"
        assert header(origin.received, b"host") == [b"app.localhost"]


def test_absolute_form_on_http_1_0_needs_no_host_header_and_empty_path_is_slash():
    with raw_env() as env:
        raw = env.request(b"GET http://app.localhost HTTP/1.0\r\n\r\n")
        assert parse_response(raw).body == b"ok"
        (origin,) = env.origins
        assert head_lines(origin.received)[0] == b"GET / HTTP/1.1"
        assert header(origin.received, b"host") == [b"app.localhost"]
        assert header(origin.received, b"x-forwarded-host") == [b"app.localhost"]


def test_absolute_form_upgrade_reaches_the_origin_in_origin_form():
    with raw_env() as env:
        env.request(
            b"GET http://app.localhost/chat HTTP/1.1\r\nHost: app.localhost\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        (origin,) = env.origins
        assert head_lines(origin.received)[0] == b"GET /chat HTTP/1.1"


def test_absolute_form_control_path_is_the_control_path():
    with raw_env() as env:
        raw = env.request(b"GET http://x/_controlPath/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw == error_page(b"405 Method Not Allowed", b"405 must CONNECT\n")
        assert env.origins == []


@pytest.mark.parametrize(
    ("target", "host", "text"),
    [
        (
            b"http://other.test/",
            b"app.localhost",
            b"the Host header does not match the request-target",
        ),
        (
            b"http://app.localhost:8080/",
            b"app.localhost",
            b"the Host header does not match the request-target",
        ),
        (b"http://user@app.localhost/", b"app.localhost", b"userinfo in the request-target"),
        (b"ftp://app.localhost/", b"app.localhost", b"unsupported scheme in the request-target"),
        (b"http:///x", b"app.localhost", b"malformed request-target"),
        (b"http://app.localhost:port/", b"app.localhost", b"malformed request-target"),
        (b"x", b"app.localhost", b"malformed request-target"),
        (b"app.localhost:80", b"app.localhost", b"malformed request-target"),
        (b"/a\x7fb", b"app.localhost", b"malformed request-target"),
        (b"/\x80", b"app.localhost", b"malformed request-target"),
        (b"/\xb0", b"app.localhost", b"malformed request-target"),
    ],
)
def test_a_bad_or_disagreeing_absolute_target_is_refused_before_any_tunnel_work(target, host, text):
    with raw_env() as env:
        raw = env.request(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host))
        assert raw == error_page(b"400 Bad Request", text)
        assert env.origins == []


def test_a_default_port_in_the_authority_matches_a_host_without_one():
    with raw_env() as env:
        raw = env.request(b"GET http://app.localhost:80/ HTTP/1.1\r\nHost: APP.localhost.\r\n\r\n")
        assert parse_response(raw).body == b"ok"
        (origin,) = env.origins
        assert head_lines(origin.received)[0] == b"GET / HTTP/1.1"
        assert header(origin.received, b"host") == [b"APP.localhost."]  # as sent


def test_connect_outside_the_control_path_is_refused_before_any_tunnel_work():
    with raw_env() as env:
        for target in (b"app.localhost:443", b"/", b"http://app.localhost/"):
            raw = env.request(b"CONNECT %s HTTP/1.1\r\nHost: app.localhost\r\n\r\n" % target)
            assert raw == error_page(b"501 Not Implemented", b"CONNECT is not supported")
        assert env.origins == []


def test_other_methods_stay_forwarded():
    with raw_env() as env:
        for method in (b"PATCH", b"PROPFIND", b"OPTIONS", b"TRACE", b"BREW"):
            raw = env.request(b"%s /x HTTP/1.1\r\nHost: app.localhost\r\n\r\n" % method)
            assert parse_response(raw).body == b"ok"
        assert [head_lines(o.received)[0] for o in env.origins] == [
            b"PATCH /x HTTP/1.1",
            b"PROPFIND /x HTTP/1.1",
            b"OPTIONS /x HTTP/1.1",
            b"TRACE /x HTTP/1.1",
            b"BREW /x HTTP/1.1",
        ]


def test_options_asterisk_is_answered_by_twisted_web_itself():
    """Pinned: twisted.web answers ``OPTIONS *`` (and 405s other methods on
    ``*``) before any Resource; nothing reaches the origin."""
    with raw_env() as env:
        raw = env.request(b"OPTIONS * HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        assert parse_response(raw).code == 200
        raw = env.request(b"GET * HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        assert parse_response(raw).code == 405
        assert env.origins == []


# -- Host (item 7) ---------------------------------------------------------------------


def test_missing_host_on_http_1_1_is_a_400_with_go_s_text():
    with raw_env() as env:
        raw = env.request(b"GET / HTTP/1.1\r\n\r\n")
        assert raw == error_page(b"400 Bad Request", b"request host is empty")
        raw = env.request(b"GET / HTTP/1.1\r\nHost: \r\n\r\n")
        assert raw == error_page(b"400 Bad Request", b"request host is empty")
        raw = env.request(b"GET / HTTP/1.0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        assert raw.endswith(b"\r\n\r\nrequest host is empty\n")
        assert env.origins == []


@pytest.mark.parametrize("upgrade", [False, True])
def test_two_host_headers_are_refused_before_any_tunnel_work(upgrade):
    extra = b"Connection: Upgrade\r\nUpgrade: websocket\r\n" if upgrade else b""
    with raw_env() as env:
        for hosts in (
            b"Host: app.localhost\r\nHost: other.test\r\n",
            b"Host: app.localhost\r\nHost: app.localhost\r\n",
            b"host: other.test\r\nHOST: app.localhost\r\n",
        ):
            raw = env.request(b"GET /chat HTTP/1.1\r\n" + hosts + extra + b"\r\n")
            assert raw == error_page(b"400 Bad Request", b"too many Host headers")
        assert env.origins == []


@pytest.mark.parametrize(
    "host", [b"app.localhost/x", b"app.localhost\tx", b'app"localhost', b"app.localhost@x"]
)
def test_a_host_with_bytes_go_refuses_is_a_400(host):
    with raw_env() as env:
        raw = env.request(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert raw == error_page(b"400 Bad Request", b"malformed Host header")
        assert env.origins == []


def test_control_requests_still_need_no_host_and_keep_go_s_answers():
    with raw_env() as env:
        raw = env.request(b"CONNECT /_controlPath/ HTTP/1.1\r\n\r\n")
        assert raw == error_page(
            b"502 Bad Gateway", b"no host associated for identifier . please use server.AddHost()"
        )
        assert env.origins == []
