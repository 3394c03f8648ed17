"""Generated public request heads (issue 8): whatever the head, the public
client gets complete responses it can parse, never silence; a head whose
framing two parsers could read differently reaches no origin; and what
does reach the origin is origin-form with one Host."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .memory import MemoryTunnel

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BODY = b"5\r\nhello\r\n0\r\n\r\n"  # 15 bytes: a chunked body, or 15 bytes of content

REQUEST_LINES = [
    b"GET /echo?echo=x HTTP/1.1",
    b"POST /upload HTTP/1.1",
    b"POST /upload HTTP/1.0",
    b"GET http://app.localhost/echo?echo=y HTTP/1.1",
    b"GET http://other.test/echo HTTP/1.1",
    b"CONNECT app.localhost:443 HTTP/1.1",
    b"GET echo HTTP/1.1",
    b"GET / HTTP/1.1 extra",
]

HEADERS = [
    b"Host: app.localhost",
    b"Host: app.localhost",
    b"Host: other.test",
    b"Host: app.localhost:99999",
    b"Content-Length: 15",
    b"Content-Length: 15",
    b"Content-Length: 15, 15",
    b"Content-Length: +15",
    b"Content-Length: 0",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding : chunked",
    b" chunked",
    b"\tx",
    b"X-Forwarded-Host: evil.example",
    b"Connection: keep-alive,close",
    b"X-A: a\x00b",
    b"X-Long: " + b"a" * (16384 - 8),
    b"X-Long: " + b"a" * (16384 - 7),
]


def framing(headers: list[bytes], version: bytes) -> str:
    """What the head's framing is: "ok", or why two parsers could differ."""
    if any(h[:1] in (b" ", b"\t") for h in headers):
        return "fold"
    lengths = [h for h in headers if h.lower().startswith(b"content-length")]
    codings = [h for h in headers if h.lower().startswith(b"transfer-encoding")]
    if len(lengths) + len(codings) > 1:
        return "several"
    if codings and (codings[0] != b"Transfer-Encoding: chunked" or version != b"HTTP/1.1"):
        return "coding"
    if lengths and lengths[0] != b"Content-Length: 15" and lengths[0] != b"Content-Length: 0":
        return "length"
    return "ok"


def responses(raw: bytes) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """Strictly split ``raw`` into complete responses (fails on anything else)."""
    out = []
    while raw:
        end = raw.index(b"\r\n\r\n")
        lines = raw[:end].split(b"\r\n")
        version, code, _ = lines[0].split(b" ", 2)
        assert version in (b"HTTP/1.1", b"HTTP/1.0"), lines[0]
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b": ")
            assert colon and name and b" " not in name, line
            headers.setdefault(name.lower(), []).append(value)
        rest = raw[end + 4 :]
        if b"transfer-encoding" in headers:
            assert headers[b"transfer-encoding"] == [b"chunked"]
            body = b""
            while True:
                size_end = rest.index(b"\r\n")
                size = int(rest[:size_end], 16)
                body += rest[size_end + 2 : size_end + 2 + size]
                assert rest[size_end + 2 + size : size_end + 4 + size] == b"\r\n"
                rest = rest[size_end + 4 + size :]
                if size == 0:
                    break
        else:
            (length,) = headers[b"content-length"]
            body, rest = rest[: int(length)], rest[int(length) :]
            assert len(body) == int(length)
        out.append((int(code), headers, body))
        raw = rest
    return out


@PROPERTY
@given(
    line=st.sampled_from(REQUEST_LINES),
    headers=st.lists(st.sampled_from(HEADERS), max_size=6),
    pipelined=st.booleans(),
)
def test_any_head_gets_complete_answers_and_ambiguous_framing_reaches_no_origin(
    line, headers, pipelined
):
    head = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    follow = b"GET /echo?echo=next HTTP/1.1\r\nHost: app.localhost\r\n\r\n" if pipelined else b""
    with MemoryTunnel() as env:
        client = env.connect()
        client.send(head + BODY + follow)
        env.flush()
        got = responses(client.received)
        assert got, "no answer at all"
        refusals = [
            r for r in got if r[1].get(b"connection") == [b"close"] and b"server" not in r[1]
        ]
        assert refusals[:1] == got[-1:] or not refusals  # a refusal is the last answer
        if framing(headers, line[-8:]) != "ok":
            assert env.origin.seen == []
            assert got[0][0] == 400 or got[0][0] == 431  # refused, head and all
        for request in env.origin.seen:
            assert request.uri.startswith(b"/")
            assert len(request.requestHeaders.getRawHeaders(b"host")) == 1
            assert request.requestHeaders.getRawHeaders(b"x-forwarded-host") == [b"app.localhost"]
        if client.open:
            client.close()
        env.flush()
