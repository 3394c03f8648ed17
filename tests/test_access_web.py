"""A host's access rules, enforced by the public side on a whole tunnel in memory.

The gate's own logic is tested in test_access.py; here each rule is seen
from the outside: exact statuses and headers, what reaches the origin (and
what does not: a refused request, and the Authorization header holding the
host's password), and a password check that has to wait.
"""

from __future__ import annotations

import base64

from twisted.internet.defer import Deferred

from tunnel.server.access import AccessGate
from tunnel.server.rules import HostRules, ScryptParams

from .memory import MemoryTunnel, parse_response

#: cheap scrypt for tests (the default costs tens of milliseconds per hash)
CHEAP = ScryptParams(n=2**10, r=1, p=1)


def request(path: bytes = b"/headers", *extra: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: app.localhost\r\n" + b"".join(extra) + b"\r\n"


def basic(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode())
    return b"Authorization: Basic " + token + b"\r\n"


def with_rules(env: MemoryTunnel, api_rules: dict) -> None:
    env.server.add_host(env.HOST, env.IDENT, HostRules.from_api(api_rules, params=CHEAP))


class Verifier:
    """A password check the test answers by hand: it waits, as the real one
    (scrypt in a thread) does."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred, bool]] = []

    def __call__(self, stored, password: bytes) -> Deferred:
        d = Deferred()
        self.waiting.append((d, stored.matches(password)))
        return d

    def answer_all(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            d.callback(result)


def test_a_client_outside_the_allowed_networks_gets_403_and_the_origin_nothing():
    with MemoryTunnel() as env:
        with_rules(env, {"allow": ["10.0.0.0/8"]})
        response = parse_response(env.request(request()))
        assert (response.code, response.body) == (403, b"forbidden\n")
        assert env.origin.seen == []
        with_rules(env, {"allow": ["10.0.0.0/8", "127.0.0.0/8"]})
        assert parse_response(env.request(request())).code == 200
        assert len(env.origin.seen) == 1


def test_over_the_rate_a_client_gets_429_with_retry_after_until_tokens_come_back():
    with MemoryTunnel() as env:
        with_rules(env, {"rate": {"per_second": 0.5, "burst": 2}})
        codes = [parse_response(env.request(request())).code for _ in range(3)]
        assert codes == [200, 200, 429]
        refused = parse_response(env.request(request()))
        assert refused.header(b"retry-after") == b"2"
        env.advance(2)  # one token back
        assert parse_response(env.request(request())).code == 200
        assert parse_response(env.request(request())).code == 429
        assert len(env.origin.seen) == 3


def test_basic_auth_asks_for_credentials_and_never_forwards_them():
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=lambda stored, pw: stored.matches(pw))
        with_rules(env, {"basic_auth": {"user": "ops", "password": "s3cret pass"}})
        missing = parse_response(env.request(request()))
        assert missing.code == 401
        assert missing.header(b"www-authenticate") == (
            b'Basic realm="app.localhost", charset="UTF-8"'
        )
        wrong = parse_response(env.request(request(b"/headers", basic("ops", "nope"))))
        assert wrong.code == 401
        assert env.origin.seen == []

        ok = parse_response(env.request(request(b"/headers", basic("ops", "s3cret pass"))))
        assert ok.code == 200
        assert b"authorization" not in ok.body.lower()  # the origin's view of the headers
        (seen,) = env.origin.seen
        assert seen.getHeader(b"authorization") is None


def test_two_authorization_headers_are_no_credentials():
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=lambda stored, pw: stored.matches(pw))
        with_rules(env, {"basic_auth": {"user": "ops", "password": "pw"}})
        both = request(b"/headers", basic("ops", "pw"), basic("ops", "pw"))
        assert parse_response(env.request(both)).code == 401
        assert env.origin.seen == []


def test_a_request_waits_for_its_password_check_with_its_body_unread():
    verifier = Verifier()
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=verifier)
        with_rules(env, {"basic_auth": {"user": "ops", "password": "pw"}})
        client = env.connect()
        body = b"x" * 100
        client.send(
            b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 100\r\n"
            + basic("ops", "pw")
            + b"\r\n"
            + body
        )
        env.flush()
        assert client.received == b"" and len(verifier.waiting) == 1
        assert env.origin.seen == []
        verifier.answer_all()
        env.flush()
        response = parse_response(client.take())
        assert response.code == 200 and response.body.startswith(b"100 ")
        # the same credentials again: decided at once from the gate's cache
        client.send(request(b"/echo?echo=again", basic("ops", "pw")))
        env.flush()
        assert parse_response(client.take()).body == b"again"
        assert verifier.waiting == []
        client.close()


def test_a_client_that_leaves_during_its_password_check_is_never_forwarded():
    verifier = Verifier()
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=verifier)
        with_rules(env, {"basic_auth": {"user": "ops", "password": "pw"}})
        client = env.connect()
        client.send(request(b"/headers", basic("ops", "pw")))
        env.flush()
        client.close()
        env.flush()
        verifier.answer_all()
        env.flush()
        assert env.origin.seen == []
        assert env.server.connection(env.IDENT).stats().requests == 0


def test_a_wrong_password_that_had_to_wait_gets_401():
    verifier = Verifier()
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=verifier)
        with_rules(env, {"basic_auth": {"user": "ops", "password": "pw"}})
        client = env.connect()
        client.send(request(b"/headers", basic("ops", "guess")))
        env.flush()
        verifier.answer_all()
        env.flush()
        response = parse_response(client.take())
        assert response.code == 401 and response.header(b"www-authenticate")
        assert env.origin.seen == []
        client.close()


def test_rules_removed_take_effect_for_the_next_request():
    with MemoryTunnel() as env:
        with_rules(env, {"allow": ["10.0.0.0/8"]})
        assert parse_response(env.request(request())).code == 403
        env.server.add_host(env.HOST, env.IDENT)
        assert parse_response(env.request(request())).code == 200


def test_a_defect_after_a_waited_verdict_gets_a_502_and_one_log_line(monkeypatch):
    verifier = Verifier()
    with MemoryTunnel() as env:
        env.resource.gate = AccessGate(env.clock, verify=verifier)
        with_rules(env, {"basic_auth": {"user": "ops", "password": "pw"}})
        lines = []
        env.resource.public_log.logger.observer = lines.append
        client = env.connect()
        client.send(request(b"/headers", basic("ops", "pw")))
        env.flush()
        ((waiting, _),) = verifier.waiting
        verifier.waiting.clear()
        monkeypatch.setattr(env.resource, "_dispatch", None)  # a defect after the verdict
        waiting.callback(True)
        env.flush()
        response = parse_response(client.take())
        assert response.code == 502
        assert [e["log_format"] for e in lines] == ["deciding a request failed"]
        client.close()
