"""The admin API on real sockets (tests/admin_env.py's AdminEnv: a TunnelServer
with Routes over a MemoryStore, its public site, the admin endpoint, real
tunnel clients and an origin, all on 127.0.0.1), driven with treq.

Also the parsers behind it (the token, the Authorization header, ports,
request bodies) as properties, and the status page's escaping."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import socket

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from tunnel.admin import status
from tunnel.admin.api import (
    MAX_IDENTIFIER,
    AdminAPI,
    ApiError,
    port_number,
    read_object,
    uncancellable,
)
from tunnel.admin.auth import TokenFileError, offered_token, parse_token, read_token_file
from tunnel.admin.service import BODY_TIMEOUT, HEAD_TIMEOUT, MAX_BODY, AdminService, AdminSite
from tunnel.koding.identifiers import TunnelKey
from tunnel.server.registry import TunnelServer
from tunnel.server.routes import Routes
from tunnel.server.rules import HostRules, ScryptParams
from tunnel.server.sqlite import SQLiteStore
from tunnel.server.store import HostEntry, MemoryStore, PortEntry, StoreError

from .admin_env import (
    HOST,
    IDENT,
    TOKEN,
    AdminEnv,
    auth,
    basic,
    global_log,
    raw_connection,
)
from .live import until


@pytest_twisted.async_yield_fixture
async def env():
    admin = await AdminEnv().start()
    try:
        yield admin
    finally:
        await admin.stop()


def fingerprint(identifier: str) -> str:
    return TunnelKey.of(identifier).fingerprint


# -- auth ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bearer_and_basic_with_any_user_are_accepted(env):
    assert (await env.call("GET", "/api/hosts"))[:2] == (200, {"hosts": []})
    headers = {b"authorization": [b"bearer " + TOKEN]}  # the scheme is case-insensitive
    assert (await env.call("GET", "/api/hosts", headers=headers))[0] == 200
    for user in (b"", b"admin", b"anyone at all"):
        code, _, _ = await env.call("GET", "/api/hosts", headers=basic(user, TOKEN))
        assert code == 200


@pytest_twisted.ensureDeferred
async def test_missing_or_wrong_credentials_get_401_offering_basic(env):
    cases = {
        "none": {},
        "wrong bearer": auth(b"s3cret-admin-tokeN"),
        "a prefix": auth(TOKEN[:-1]),
        "longer": auth(TOKEN + b"x"),
        "wrong basic": basic(b"admin", b"nope"),
        "token as basic user": basic(TOKEN, b""),
        "basic without colon": {b"authorization": [b"Basic " + base64.b64encode(TOKEN)]},
        "basic not base64": {b"authorization": [b"Basic !!!"]},
        "other scheme": {b"authorization": [b"Digest " + TOKEN]},
        "two headers": {b"authorization": [b"Bearer " + TOKEN, b"Bearer " + TOKEN]},
    }
    for what, headers in cases.items():
        code, body, response = await env.call("GET", "/api/hosts", headers=headers)
        assert code == 401, what
        assert body == {
            "error": "the admin token is required (Authorization: Bearer TOKEN, or Basic)"
        }
        challenges = response.headers.getRawHeaders(b"www-authenticate")
        assert any(c.startswith(b"Basic realm=") for c in challenges), what
    # the status page's refusal is text, for a person
    code, body, response = await env.call("GET", "/", headers={})
    assert code == 401 and body.startswith("the admin token is required")
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_a_token_in_the_query_string_is_ignored(env):
    token = TOKEN.decode()
    for query in (f"token={token}", f"access_token={token}", f"authorization=Bearer+{token}"):
        code, _, _ = await env.call("GET", f"/api/hosts?{query}", headers={})
        assert code == 401, query
        code, _, _ = await env.call("GET", f"/?{query}", headers={})
        assert code == 401, query


@pytest_twisted.ensureDeferred
async def test_metrics_need_no_token_and_are_the_servers(env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    await env.connect(IDENT)
    response = await env.http.get(env.url + "/metrics")
    text = (await response.content()).decode()
    assert response.code == 200
    assert "\ntunnel_clients_connected 1.0\n" in text
    assert IDENT not in text


@pytest_twisted.ensureDeferred
async def test_refused_requests_do_not_flood_the_log(env):
    with global_log() as log:
        for _ in range(40):
            assert (await env.call("GET", "/api/hosts", headers=auth(b"guess")))[0] == 401
    refused = [line for line in log.lines if "refused an admin request" in line]
    counting = [line for line in log.lines if "more admin-unauthorized events" in line]
    assert 1 <= len(refused) <= 10  # the burst of tunnel.logs.RateLimitedLog
    assert len(counting) == 1
    assert not any("guess" in line for line in log.lines)  # what was offered is not logged
    assert not any(e.get("log_failure") for e in log.events)  # no traceback


# -- hosts ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_host_put_through_the_api_is_served_then_deleted(env):
    with global_log() as log:
        code, entry, response = await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
        assert code == 201
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        expected = {"host": HOST, "tunnel": fingerprint(IDENT), "connected": False, "rules": {}}
        assert entry == expected
        # the same again replaces it: 200
        assert (await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT}))[:2] == (
            200,
            expected,
        )
        # names are normalised: any case, a trailing dot
        assert (await env.call("GET", "/api/hosts/APP.Localhost."))[:2] == (200, expected)
        assert (await env.call("GET", "/api/hosts"))[:2] == (200, {"hosts": [expected]})

        await env.connect(IDENT)
        code, entry, _ = await env.call("GET", f"/api/hosts/{HOST}")
        assert entry["connected"] is True
        assert await env.public("/echo?echo=hello") == (200, b"hello")

        assert (await env.call("DELETE", f"/api/hosts/{HOST}"))[:2] == (204, "")
        code, body = await env.public("/echo?echo=hello")
        assert code == 502
        assert body == b'no virtual host available for "app.localhost"\n'
        assert (await env.call("DELETE", f"/api/hosts/{HOST}"))[:2] == (
            404,
            {"error": f"no such host: {HOST}"},
        )
        assert (await env.call("GET", f"/api/hosts/{HOST}"))[0] == 404
    # an identifier never leaves the server, nor reaches its log
    assert not any(IDENT.encode() in body for body in env.bodies)
    assert not any(IDENT in line for line in log.lines)
    assert any(f"admin: host {HOST} added, served by tunnel" in line for line in log.lines)


@pytest_twisted.ensureDeferred
async def test_several_hosts_share_one_tunnel(env):
    for host in ("a.localhost", "b.localhost:8080"):
        assert (await env.call("PUT", f"/api/hosts/{host}", {"identifier": IDENT}))[0] == 201
    await env.connect(IDENT)
    assert await env.public("/echo?echo=a", host="a.localhost") == (200, b"a")
    assert await env.public("/echo?echo=b", host="b.localhost:8080") == (200, b"b")
    _, tunnels, _ = await env.call("GET", "/api/tunnels")
    (tunnel,) = tunnels["tunnels"]
    assert tunnel["hosts"] == ["a.localhost", "b.localhost:8080"]


@pytest_twisted.ensureDeferred
async def test_rules_are_shown_without_secrets(env):
    rules = {
        "basic_auth": {"user": "alice", "password": "correct horse"},
        "allow": ["10.0.0.0/8", "127.0.0.1"],
        "rate": {"per_second": 5, "burst": 10},
    }
    code, entry, _ = await env.call(
        "PUT", f"/api/hosts/{HOST}", {"identifier": IDENT, "rules": rules}
    )
    assert code == 201
    public = {
        "basic_auth": {"user": "alice"},
        "allow": ["10.0.0.0/8", "127.0.0.1/32"],
        "rate": {"per_second": 5, "burst": 10},
    }
    assert entry["rules"] == public
    assert (await env.call("GET", f"/api/hosts/{HOST}"))[1]["rules"] == public
    assert not any(b"correct horse" in body or b"scrypt" in body for body in env.bodies)
    # stored hashed, as given to Routes
    stored = env.routes.host(HOST).rules
    assert "password" not in stored["basic_auth"] and "scrypt" in stored["basic_auth"]
    # rules replaced by none
    code, entry, _ = await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    assert (code, entry["rules"]) == (200, {})


@pytest_twisted.ensureDeferred
async def test_bad_host_requests_are_400_with_a_message(env):
    path = f"/api/hosts/{HOST}"
    cases = [
        (b"{", "malformed JSON: Expecting property name enclosed in double quotes"),
        (b"", "malformed JSON: Expecting value (line 1, column 1)"),
        (b"\xff\xfe\x00", "malformed JSON"),
        (b"[1, 2]", "the body must be a JSON object"),
        (b'"identifier"', "the body must be a JSON object"),
        (b"{}", "the field 'identifier' is required"),
        (b'{"identifier": 42}', "'identifier' must be a string"),
        (b'{"identifier": ""}', "'identifier' must not be empty"),
        (b'{"identifier": "a\\nb"}', NO_SPACE),
        # a client could never claim these: stripped from its header or file
        (b'{"identifier": " abc"}', NO_SPACE),
        (b'{"identifier": "abc "}', NO_SPACE),
        (b'{"identifier": "a b"}', NO_SPACE),
        (b'{"identifier": "abc\\t"}', NO_SPACE),
        (b'{"identifier": "a\\u00a0b"}', NO_SPACE),
        (b'{"identifier": "a\\u2028b"}', NO_SPACE),
        (b'{"identifier": "a\\u0085b"}', NO_SPACE),
        (b'{"identifier": "a\\u007fb"}', NO_SPACE),
        (b'{"identifier": "a", "identifier": "b"}', "malformed JSON: the field 'identifier'"),
        (b'{"identifier": "a", "host": "x"}', "unknown field(s): 'host'"),
        (b'{"identifier": "a", "rules": {"rate": NaN}}', "malformed JSON: NaN is not JSON"),
        (b'{"identifier": "a", "rules": []}', "rules must be an object"),
        (
            b'{"identifier": "a", "rules": {"allow": ["10.0.0.1/8"]}}',
            "allow: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        ),
        (b'{"identifier": "a", "rules": {"colour": 1}}', "rules: unknown field 'colour'"),
        (b"[" * 100_00 + b"]" * 100_00, "malformed JSON: nested too deeply"),
    ]
    long = json.dumps({"identifier": "x" * (MAX_IDENTIFIER + 1)}).encode()
    cases.append((long, f"'identifier' is longer than {MAX_IDENTIFIER} characters"))
    for raw, message in cases:
        code, body, _ = await env.call("PUT", path, raw=raw)
        assert code == 400, raw[:40]
        assert body["error"].startswith(message), (raw[:40], body)
    # hosts that do not parse, in any method
    for host in ("a%20b", "%3Cscript%3E", "x:99999", "[::1", "%C3%A9t%C3%A9.example"):
        code, body, _ = await env.call("PUT", f"/api/hosts/{host}", {"identifier": IDENT})
        assert code == 400 and "host" in body["error"], (host, body)
        assert (await env.call("GET", f"/api/hosts/{host}"))[0] == 400, host
        assert (await env.call("DELETE", f"/api/hosts/{host}"))[0] == 400, host
    assert env.routes.hosts() == []


NO_SPACE = "'identifier' must not hold white space or control characters"


@pytest_twisted.ensureDeferred
async def test_what_the_store_holds_can_be_deleted_even_if_it_is_not_served():
    store = MemoryStore()
    # a row the server leaves out at start: its rules do not load
    await store.put_host(HostEntry("bad.localhost", TunnelKey.of(IDENT), {"colour": 1}))
    env = await AdminEnv(store).start()
    try:
        assert env.routes.hosts() == []
        assert (await env.call("DELETE", "/api/hosts/BAD.localhost"))[:2] == (204, "")
        assert (await store.load()).hosts == ()
        code, body, _ = await env.call("DELETE", "/api/hosts/bad.localhost")
        assert (code, body) == (404, {"error": "no such host: bad.localhost"})
        # a port stored by someone else meanwhile (another server on the same --db)
        await store.put_port(PortEntry(free_port(), TunnelKey.of(IDENT)))
        (port,) = (await store.load()).ports
        assert (await env.call("DELETE", f"/api/tcp/{port.port}"))[:2] == (204, "")
        assert (await store.load()).ports == ()
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_a_change_the_store_cannot_make_is_503_and_changes_nothing(tmp_path):
    env = await AdminEnv(await SQLiteStore.open(tmp_path / "registry.db")).start()
    try:
        assert (await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT}))[0] == 201
        await env.store.close()  # as if the disk went away
        with global_log() as log:
            code, body, _ = await env.call("PUT", "/api/hosts/b.localhost", {"identifier": IDENT})
            assert code == 503
            assert body["error"].startswith("the change was not stored: put_host: the registry")
            assert (await env.call("DELETE", f"/api/hosts/{HOST}"))[0] == 503
        assert [h.host for h in env.routes.hosts()] == [HOST]  # as it was
        assert not any(e.get("log_failure") for e in log.events)  # one line, no traceback
        assert sum("admin: a change was not stored" in line for line in log.lines) == 2
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_a_body_must_be_sent_as_json(env):
    headers = {**auth(), b"content-type": [b"application/x-www-form-urlencoded"]}
    code, body, _ = await env.call(
        "PUT", f"/api/hosts/{HOST}", raw=b'{"identifier": "x"}', headers=headers
    )
    assert (code, body) == (415, {"error": "send the body as application/json"})
    headers = {**auth(), b"content-type": [b"Application/JSON; charset=utf-8"]}
    code, _, _ = await env.call(
        "PUT", f"/api/hosts/{HOST}", raw=b'{"identifier": "x"}', headers=headers
    )
    assert code == 201


#: the whole answer to a body over MAX_BODY, to the byte
TOO_LARGE = (
    b"HTTP/1.1 413 Request Entity Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Content-Length: 44\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"the request body is larger than 65536 bytes\n"
)
PUT_CHUNKED = (
    b"PUT /api/hosts/x.localhost HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer "
    + TOKEN
    + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunks(size: int, piece: int = 8192) -> bytes:
    """``size`` bytes of body in chunks of ``piece`` bytes (no last chunk)."""
    out = []
    while size:
        n = min(piece, size)
        out.append(b"%x\r\n%s\r\n" % (n, b"a" * n))
        size -= n
    return b"".join(out)


@pytest_twisted.ensureDeferred
async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(env):
    # 2**63 - 1 bytes announced, and a wish to hear 100 Continue first: without
    # a token, the answer is 413 at once (twisted.web would say 100 and read on)
    proto = await raw_connection(env.url)
    proto.transport.write(
        b"PUT /api/hosts/x.localhost HTTP/1.1\r\nHost: admin\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: 9223372036854775807\r\n\r\n"
    )
    await until(lambda: proto.received == TOO_LARGE, timeout=5, what="the 413")
    proto.transport.write(b"x" * 1000)  # what it sends anyway is dropped
    await until(lambda: proto.closed.called, timeout=5, what="the close")
    assert proto.received == TOO_LARGE
    # one more byte than the limit, from a client that sends it along (treq)
    big = b'{"identifier": "' + b"x" * (MAX_BODY - 17) + b'"}'
    assert len(big) == MAX_BODY + 1
    code, body, _ = await env.call("PUT", f"/api/hosts/{HOST}", raw=big)
    assert (code, body) == (413, f"the request body is larger than {MAX_BODY} bytes\n")
    assert env.routes.hosts() == []


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit(env):
    proto = await raw_connection(env.url)
    # one byte over the limit, and never the last chunk: answered all the same
    proto.transport.write(PUT_CHUNKED + chunks(MAX_BODY + 1))
    await until(lambda: proto.received == TOO_LARGE, timeout=5, what="the 413")
    proto.transport.write(chunks(100_000))
    await until(lambda: proto.closed.called, timeout=5, what="the close")
    assert proto.received == TOO_LARGE
    # the limit itself is allowed: that body reaches the API (which finds no JSON)
    proto = await raw_connection(env.url)
    proto.transport.write(PUT_CHUNKED + chunks(MAX_BODY) + b"0\r\n\r\n")
    await until(lambda: proto.received.endswith(b"}"), timeout=5, what="the answer")
    proto.transport.loseConnection()
    assert proto.received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b'{"error":"malformed JSON: Expecting value' in proto.received
    assert env.routes.hosts() == []


@pytest_twisted.ensureDeferred
async def test_the_admin_site_takes_a_bounded_number_of_connections():
    site = AdminSite(Resource(), max_connections=2)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        first, second = await raw_connection(url), await raw_connection(url)
        await until(lambda: site.open_connections == 2, what="two connections")
        third = await raw_connection(url)
        await until(lambda: third.closed.called, timeout=5, what="the third one closed")
        assert third.received == b""
        first.transport.loseConnection()
        await until(lambda: site.open_connections == 1, what="the first one gone")
        fourth = await raw_connection(url)
        await until(lambda: site.open_connections == 2, what="room again")
        for proto in (second, fourth):
            proto.transport.loseConnection()
        await until(lambda: site.open_connections == 0, what="all gone")
    finally:
        await port.stopListening()


class Ok(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        return b"ok"


def admin_channel(clock: Clock) -> tuple[AdminSite, StringTransport]:
    site = AdminSite(Ok(), reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_request_head_has_a_deadline_however_it_trickles():
    clock = Clock()
    channel, transport = admin_channel(clock)
    head = b"GET /api/hosts HTTP/1.1\r\nHost: admin\r\n"
    for n, byte in enumerate(head[:29]):  # a byte a second: the 60 s idle timer never fires
        clock.advance(1 if n else 0)
        channel.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    clock.advance(HEAD_TIMEOUT - 28)
    assert transport.disconnected  # aborted at HEAD_TIMEOUT: nothing to answer
    assert transport.value() == b""


def test_a_request_body_has_a_deadline_however_it_trickles():
    clock = Clock()
    channel, transport = admin_channel(clock)
    channel.dataReceived(
        b"PUT /api/hosts/x.localhost HTTP/1.1\r\nHost: admin\r\nContent-Length: 100\r\n\r\n"
    )
    for _ in range(BODY_TIMEOUT - 1):
        clock.advance(1)
        channel.dataReceived(b"{")
    assert transport.value() == b""
    clock.advance(1)
    message = b"the request body did not arrive within 30 s\n"
    assert transport.value() == (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n%s" % (len(message), message)
    )
    channel.dataReceived(b"{" * 50)  # dropped
    assert not transport.disconnecting
    clock.advance(1)  # the linger: then the close
    assert transport.disconnecting
    # a body in time is read and answered as usual, and leaves no timer behind
    channel, transport = admin_channel(clock)
    channel.head_timeout = BODY_TIMEOUT * 2  # the next head, once these are answered
    channel.dataReceived(
        b"PUT /x HTTP/1.1\r\nHost: admin\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /x HTTP/1.1\r\nHost: admin\r\n\r\n"
    )
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == 2
    clock.advance(BODY_TIMEOUT + 1)
    assert b"408" not in transport.value() and not transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods(env):
    assert (await env.call("GET", "/api/nothing"))[:2] == (404, {"error": "no such route"})
    code, body, response = await env.call("POST", "/api/hosts/x.localhost", {"identifier": "x"})
    assert code == 405
    assert body["error"].startswith("POST is not allowed here")
    assert response.headers.getRawHeaders(b"allow") == [b"DELETE, GET, HEAD, PUT"]
    # a path that is not UTF-8 is refused before it is routed (klein would log it)
    with global_log() as log:
        assert (await env.call("GET", "/api/hosts/%FF"))[0] == 400
    assert not any(e.get("log_failure") for e in log.events)


# -- TCP ports -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def can_connect(port: int) -> bool:
    try:
        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
    except ConnectionRefusedError:
        return False
    proto.transport.abortConnection()
    return True


@pytest_twisted.ensureDeferred
async def test_tcp_ports_open_and_close_listeners(env):
    port = free_port()
    code, entry, _ = await env.call("PUT", f"/api/tcp/{port}", {"identifier": IDENT})
    assert (code, entry) == (
        201,
        {"port": port, "tunnel": fingerprint(IDENT), "connected": False},
    )
    assert await can_connect(port)
    code, entry, _ = await env.call("PUT", f"/api/tcp/{port}", {"identifier": "other-ident"})
    assert (code, entry["tunnel"]) == (200, fingerprint("other-ident"))
    assert (await env.call("GET", "/api/tcp"))[1] == {"ports": [entry]}

    assert (await env.call("DELETE", f"/api/tcp/{port}"))[:2] == (204, "")
    assert not await can_connect(port)
    assert (await env.call("DELETE", f"/api/tcp/{port}"))[:2] == (
        404,
        {"error": f"no such TCP port: {port}"},
    )
    assert (await env.call("GET", "/api/tcp"))[1] == {"ports": []}


@pytest_twisted.ensureDeferred
async def test_a_port_that_cannot_be_bound_is_409_with_the_reason(env):
    taken = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    try:
        port = taken.getHost().port
        code, body, _ = await env.call("PUT", f"/api/tcp/{port}", {"identifier": IDENT})
        assert code == 409
        assert body["error"] == f"cannot listen on TCP port {port}: Address already in use"
        assert (await env.call("GET", "/api/tcp"))[1] == {"ports": []}
    finally:
        await taken.stopListening()


@pytest_twisted.ensureDeferred
async def test_bad_ports_and_bodies_are_400(env):
    for port in ("0", "65536", "abc", "80a", "-1", "1e3", "123456", "08080%00"):
        code, body, _ = await env.call("PUT", f"/api/tcp/{port}", {"identifier": IDENT})
        assert code == 400 and "is not a TCP port" in body["error"], port
        assert (await env.call("DELETE", f"/api/tcp/{port}"))[0] == 400, port
    code, body, _ = await env.call("PUT", "/api/tcp/7000", {"identifier": IDENT, "rules": {}})
    assert (code, body) == (400, {"error": "unknown field(s): 'rules' (allowed: identifier)"})


# -- tunnels -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tunnels_list_their_counters_and_hosts(env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    assert (await env.call("GET", "/api/tunnels"))[1] == {"tunnels": []}
    await env.connect(IDENT)
    _, listing, _ = await env.call("GET", "/api/tunnels")
    (before,) = listing["tunnels"]
    assert before["fingerprint"] == fingerprint(IDENT)
    assert before["remote"].startswith("127.0.0.1:")
    assert before["connected_since"].endswith("Z") and before["ready"] is True
    assert abs(before["connected_since_epoch"] - reactor.seconds()) < 60
    assert before["hosts"] == [HOST] and before["ports"] == []

    for n in (1000, 2000, 3000):
        code, body = await env.public(f"/bytes?n={n}")
        assert code == 200 and len(body) == n
    _, listing, _ = await env.call("GET", "/api/tunnels")
    (after,) = listing["tunnels"]
    assert after["requests"] == before["requests"] + 3
    assert after["bytes_in"] >= before["bytes_in"] + 6000  # the answers, from the client
    assert after["bytes_out"] > before["bytes_out"]
    assert after["connected_since"] == before["connected_since"]


@pytest_twisted.ensureDeferred
async def test_kicking_a_tunnel_disconnects_it_and_it_reconnects(env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    await env.connect(IDENT)
    first = env.server.connection(TunnelKey.of(IDENT))
    code, kicked, _ = await env.call("DELETE", f"/api/tunnels/{fingerprint(IDENT)}")
    assert code == 200
    assert kicked["fingerprint"] == fingerprint(IDENT) and kicked["hosts"] == [HOST]
    await until(lambda: first.closed, what="the kicked session to close")
    # its host is still there: the client comes back (with a new session)
    await until(
        lambda: (
            (c := env.server.connection(TunnelKey.of(IDENT))) is not None
            and c is not first
            and c.ready
        ),
        what="the client to reconnect",
    )
    assert await env.public("/echo?echo=back") == (200, b"back")


def two_identifiers_sharing_a_prefix(digits: int = 4) -> tuple[str, str]:
    seen: dict[str, str] = {}
    for n in itertools.count():
        identifier = f"twin-{n}"
        prefix = hashlib.sha256(identifier.encode()).hexdigest()[:digits]
        if prefix in seen:
            return seen[prefix], identifier
        seen[prefix] = identifier
    raise AssertionError("unreachable")


@pytest_twisted.ensureDeferred
async def test_a_fingerprint_prefix_must_name_one_tunnel(env):
    one, two = two_identifiers_sharing_a_prefix()
    await env.call("PUT", "/api/hosts/one.localhost", {"identifier": one})
    await env.call("PUT", "/api/hosts/two.localhost", {"identifier": two})
    await env.connect(one)
    await env.connect(two)
    prefix = fingerprint(one)[:4]
    code, body, _ = await env.call("DELETE", f"/api/tunnels/{prefix}")
    assert code == 409
    names = ", ".join(sorted([fingerprint(one), fingerprint(two)]))
    assert body == {"error": f"{prefix} names 2 tunnels ({names}): give more hex digits"}
    assert len(env.server.connections()) == 2  # nothing was disconnected

    for bad in ("abc", "xyz12", "g" * 8, "a" * 65):
        code, body, _ = await env.call("DELETE", f"/api/tunnels/{bad}")
        assert code == 400 and "hex digits" in body["error"], bad
    unused = next(
        p
        for p in (f"{n:04x}" for n in range(65536))
        if not any(c.key.hex().startswith(p) for c in env.server.connections())
    )
    assert (await env.call("DELETE", f"/api/tunnels/{unused}"))[:2] == (
        404,
        {"error": f"no connected tunnel {unused}"},
    )
    # the full key's hex, upper case, names one
    full = TunnelKey.of(two).hex().upper()
    code, body, _ = await env.call("DELETE", f"/api/tunnels/{full}")
    assert (code, body["fingerprint"]) == (200, fingerprint(two))


# -- the status page over HTTP ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_status_page_and_its_parts(env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    await env.connect(IDENT)
    code, page, response = await env.call("GET", "/", headers=basic(b"me", TOKEN))
    assert code == 200
    headers = response.headers
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    csp = headers.getRawHeaders(b"content-security-policy")[0]
    assert csp.startswith(b"default-src 'self'")
    assert headers.getRawHeaders(b"x-frame-options") == [b"DENY"]
    assert f'<td class="host">{HOST}</td>' in page
    assert f'<td class="tunnel fingerprint">{fingerprint(IDENT)}</td>' in page
    assert '<td class="connected yes">yes</td>' in page
    assert IDENT not in page
    for path, kind in (
        ("/status.js", b"text/javascript"),
        ("/status.css", b"text/css"),
        ("/status.svg", b"image/svg+xml"),
    ):
        code, text, response = await env.call("GET", path)
        assert code == 200 and text
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)


@pytest_twisted.ensureDeferred
async def test_the_page_shows_sums_over_connected_clients_as_such(env):
    await env.call("PUT", f"/api/hosts/{HOST}", {"identifier": IDENT})
    client = await env.connect(IDENT)
    for n in range(3):
        assert await env.public(f"/echo?echo={n}") == (200, str(n).encode())
    _, page, _ = await env.call("GET", "/")
    mine = page.split('<h3 id="of-clients">Connected clients</h3>', 1)
    assert len(mine) == 2  # requests, bytes and streams are under that heading
    assert '<dd id="total-requests">3</dd>' in mine[1]
    assert '<dd id="total-clients">1</dd>' in mine[0]
    assert html.escape(status.CLIENTS_NOTE) in page and "a client that leaves takes its" in page
    await client.stopService()
    await until(lambda: not env.server.connections(), what="the client gone")
    _, page, _ = await env.call("GET", "/")
    assert '<dd id="total-requests">0</dd>' in page  # as the note says: gone with it
    assert '<dd id="total-bytes-out">0 B</dd>' in page
    # what stays counted is in /metrics, next to the page
    response = await env.http.get(env.url + "/metrics")
    text = (await response.content()).decode()
    (sent,) = [line for line in text.splitlines() if line.startswith("tunnel_sent_bytes_total ")]
    assert float(sent.split()[1]) > 0


# -- the service ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_admin_port_that_cannot_be_bound_fails_the_start(env):
    port = int(env.url.rsplit(":", 1)[1])
    service = AdminService(
        TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), TOKEN, env.routes, env.server
    )
    with pytest.raises(CannotListenError):
        service.startService()


# -- parsers and pieces, without sockets ---------------------------------------------------------

VISIBLE = st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=64).map(bytes)


@given(VISIBLE, st.sampled_from([b"", b"\n", b"\r\n"]))
def test_a_token_is_its_line_without_the_line_ending(token, ending):
    assert parse_token(token + ending) == token


@given(st.binary(max_size=64))
def test_parse_token_takes_one_line_of_visible_ascii_or_says_why(data):
    try:
        token = parse_token(data)
    except TokenFileError as e:
        assert "token" in str(e) and data.decode("latin-1") not in str(e) or not data.strip()
        return
    assert token and all(0x21 <= c <= 0x7E for c in token)
    assert data in (token, token + b"\n", token + b"\r\n")


def test_read_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"abc123\n")
    path.chmod(0o600)
    with global_log() as log:
        assert read_token_file(path) == b"abc123"
    assert log.events == []  # private: nothing to say
    for content, message in (
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"two\nlines\n", "one line of visible ASCII"),
        (b"with space", "one line of visible ASCII"),
        (b"x" * 5000, "too large"),
    ):
        path.write_bytes(content)
        with pytest.raises(TokenFileError, match=message):
            read_token_file(path)
    with pytest.raises(TokenFileError, match="cannot read the token file .*: No such file"):
        read_token_file(tmp_path / "missing")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o602, 0o620])
def test_a_token_file_others_may_open_is_read_with_one_warning(tmp_path, mode):
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    path.chmod(mode)
    with global_log() as log:
        assert read_token_file(path) == TOKEN
    (line,) = log.lines
    assert line == (
        f"the token file {str(path)!r} is open to other users (mode {mode:04o});"
        " anyone who reads it controls the server: chmod 600 it"
    )
    assert log.events[0]["log_level"].name == "warn"
    assert TOKEN.decode() not in line and not any(TOKEN in repr(e).encode() for e in log.events)
    # given a place of its own to go (tunnel-admin: its standard error)
    told = []
    with global_log() as log:
        assert read_token_file(path, warn=told.append) == TOKEN
    assert told == [line] and log.events == []


@given(st.binary(max_size=40).filter(lambda b: b":" not in b), VISIBLE)
def test_basic_offers_its_password_whatever_the_user(user, token):
    header = b"Basic " + base64.b64encode(user + b":" + token)
    assert offered_token(header) == token
    assert offered_token(b"Bearer " + token) == token


@given(st.binary(max_size=80))
def test_offered_token_never_raises(header):
    offered_token(header)


@given(st.text(max_size=8))
def test_ports_are_decimal_1_to_65535(text):
    try:
        port = port_number(text)
    except ApiError as e:
        assert e.code == 400
        assert not (text.isascii() and text.isdigit() and 0 < int(text) <= 65535 and len(text) <= 5)
        return
    assert 1 <= port <= 65535 and text == str(port).zfill(len(text))


@given(st.binary(max_size=200))
def test_any_body_is_an_object_or_a_400(data):
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.content = io.BytesIO(data)
    try:
        body = read_object(request, allowed=frozenset({"identifier", "rules"}))
    except ApiError as e:
        assert e.code == 400 and e.message
        return
    assert isinstance(body, dict) and set(body) <= {"identifier", "rules"}


class HeldHasher:
    """``hash_rules`` that holds every hash until told.  ``finish_latest``
    ends the last one asked first: a password's slow scrypt lets a later,
    quicker change overtake it (what the API must not allow)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred, object]] = []

    def __call__(self, data) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((d, data))
        return d

    def finish_latest(self) -> None:
        d, data = self.waiting.pop()
        d.callback(HostRules.from_api(data, params=ScryptParams(n=2**10, r=1, p=1)))


def api_request(body=None) -> DummyRequest:
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.content = io.BytesIO(b"" if body is None else json.dumps(body).encode())
    return request


def test_changes_apply_in_the_order_their_requests_arrived():
    clock = Clock()
    server = TunnelServer(clock=clock)
    store = MemoryStore()
    routes = Routes(server, store)
    routes.start()
    hasher = HeldHasher()
    api = AdminAPI(routes, server, reactor=clock, hash_rules=hasher)
    password = {"basic_auth": {"user": "alice", "password": "correct horse"}}
    requests = [api_request({"identifier": IDENT, "rules": password}) for _ in range(2)]
    requests += [api_request({"identifier": "second"}), api_request()]
    answers = [
        # a PUT with a password, then one without rules: the second must win
        Deferred.fromCoroutine(api.put_host(requests[0], HOST)),
        Deferred.fromCoroutine(api.put_host(requests[2], HOST)),
        # a PUT with a password, then a DELETE: the host must be gone
        Deferred.fromCoroutine(api.put_host(requests[1], "b.localhost")),
        Deferred.fromCoroutine(api.delete_host(requests[3], "b.localhost")),
    ]
    assert len(hasher.waiting) == 1  # one change at a time: the others wait their turn
    while hasher.waiting:
        hasher.finish_latest()
    assert all(answer.called for answer in answers)
    assert [r.responseCode for r in requests] == [201, 201, 200, 204]
    (entry,) = routes.hosts()
    assert (entry.host, entry.key, dict(entry.rules)) == (HOST, TunnelKey.of("second"), {})
    assert [h.host for h in store.load().result.hosts] == [HOST]
    assert server.vhosts.lookup(HOST)[0].rules is None


def test_a_client_leaving_does_not_cancel_a_change():
    change = Deferred()
    answer = uncancellable(change)
    answer.cancel()  # what klein does when the client goes away
    assert not change.called  # the change goes on
    failures = []
    answer.addErrback(failures.append)
    assert failures[0].check(CancelledError)
    with global_log() as log:
        change.errback(StoreError("disk full"))  # reported, not left unhandled
    assert change.result is None
    assert any("a change failed after its client left" in line for line in log.lines)
    # uncancelled, results pass through
    done = Deferred()
    passed = uncancellable(done)
    done.callback(True)
    assert passed.result is True


def test_the_page_escapes_what_it_shows():
    snapshot = {
        "now": "2025-01-01T00:00:00Z",
        "hosts": [
            {
                "host": "<img src=x onerror=alert(1)>",
                "tunnel": '"quoted"',
                "connected": False,
                "rules": {"basic_auth": {"user": "</td><script>"}},
            }
        ],
        "ports": [],
        "tunnels": [
            {
                "fingerprint": "abcd1234",
                "remote": "<b>",
                "connected_since": "2025-01-01T00:00:00Z",
                "requests": 1,
                "bytes_in": 2048,
                "bytes_out": 10,
                "streams_open": 0,
                "hosts": ["<i>"],
                "ports": [7000],
            }
        ],
        "totals": {
            "clients": 1,
            "hosts": 1,
            "ports": 0,
            "requests": 1,
            "bytes_in": 2048,
            "bytes_out": 10,
            "streams_open": 0,
        },
    }
    page = status.page(snapshot).decode()
    for hostile in ("<img", "<script>", "<b>", "<i>", '"quoted"'):
        assert hostile not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "basic auth (&lt;/td&gt;&lt;script&gt;)" in page
    assert '<dd id="total-bytes-in">2.0 KiB</dd>' in page
    assert "&lt;i&gt;, tcp:7000" in page


def test_a_node_s_page_shows_its_cluster_and_another_server_s_does_not():
    snapshot = {
        "now": "2025-01-01T00:00:00Z",
        "hosts": [],
        "ports": [],
        "tunnels": [],
        "totals": dict.fromkeys(
            ("clients", "hosts", "ports", "requests", "bytes_in", "bytes_out", "streams_open"), 0
        ),
    }
    alone = status.page(snapshot).decode()
    assert 'id="cluster"' not in alone and 'id="links"' not in alone
    snapshot["cluster"] = {
        "node": "<a>",
        "tunnels_held": 3,
        "forwarded": 21,
        "links": [
            {"peer": "b", "state": "open", "streams": 2, "dialed_by": "<a>", "address": None},
            {
                "peer": "<script>",
                "state": "draining",
                "streams": 0,
                "dialed_by": "c",
                "address": "tcp:10.0.0.3:7001",
            },
        ],
    }
    node = status.page(snapshot).decode()
    assert "<a>" not in node and "<script>" not in node
    assert '<dd id="cluster-node">&lt;a&gt;</dd>' in node
    assert '<dd id="cluster-tunnels-held">3</dd>' in node
    assert '<dd id="cluster-forwarded">21</dd>' in node
    links = node.split('<table id="links">', 1)[1].split("</table>", 1)[0]
    assert links.count("<tr>") == 3  # headings and two links
    assert '<td class="peer">b</td><td class="state open">open</td>' in links
    assert '<td class="address">-</td>' in links and "tcp:10.0.0.3:7001" in links
    snapshot["cluster"]["links"] = []
    assert "no link to another node" in status.page(snapshot).decode()


def test_human_bytes_and_rules_summary():
    assert [status.human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 GiB",
    ]
    assert status.rules_summary({}) == "-"
    summary = status.rules_summary(
        {
            "basic_auth": {"user": "alice"},
            "allow": ["10.0.0.0/8", "192.0.2.7/32", "a", "b"],
            "rate": {"per_second": 5, "burst": 10},
        }
    )
    assert summary == "basic auth (alice); allow 10.0.0.0/8 192.0.2.7/32 a (+1); rate 5/s, burst 10"
