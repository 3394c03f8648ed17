"""The access gate: client addresses, rate buckets, basic auth, and their order."""

from __future__ import annotations

import base64
import unicodedata
from ipaddress import ip_address, ip_network

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock

from tunnel.server.access import (
    ALLOWED,
    AUTHENTICATED,
    BUSY,
    CHECK_FAILED,
    CLIENT_BUSY,
    FORBIDDEN,
    MAX_AUTHORIZATION,
    MAX_FORWARDED_ENTRIES,
    WRONG_PASSWORDS,
    AccessGate,
    Decision,
    ThreadPoolVerifier,
    client_address,
    parse_basic,
    parse_forwarded,
)
from tunnel.server.rules import NO_RULES, HostRules, Rate, ScryptParams

CHEAP = ScryptParams(n=2**10, r=1, p=1)
SETTINGS = settings(max_examples=200, deadline=None)
HOST = "app.example.com"
CHALLENGE = (b"WWW-Authenticate", b'Basic realm="app.example.com", charset="UTF-8"')


def rules(**data) -> HostRules:
    return HostRules.from_api(data, params=CHEAP)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class CountingVerify:
    """A synchronous verify that counts its calls (or hands out Deferreds)."""

    def __init__(self, *, later: bool = False) -> None:
        self.calls = 0
        self.later = later
        self.waiting: list[tuple[Deferred, bool]] = []

    def __call__(self, hashed, password):
        self.calls += 1
        if not self.later:
            return succeed(hashed.matches(password))
        d = Deferred()
        self.waiting.append((d, hashed.matches(password)))
        return d

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            d.callback(result)


def gate_with(verify=None, **kw) -> tuple[AccessGate, Clock]:
    clock = Clock()
    return AccessGate(clock, verify=verify or CountingVerify(), **kw), clock


def check(gate, rules, peer="192.0.2.10", xff=(), authorization=None, host=HOST):
    return gate.check(
        rules, peer=peer, forwarded_for=list(xff), authorization=authorization, host=host
    )


def addr(text):
    return ip_address(text)


# -- client addresses --------------------------------------------------------------

PROXIES = (ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32"), ip_network("fd00::/8"))


@pytest.mark.parametrize(
    "peer, xff, client",
    [
        # an untrusted peer's X-Forwarded-For is anyone's invention
        ("192.0.2.10", [b"10.0.0.1"], "192.0.2.10"),
        ("192.0.2.10", [b"127.0.0.1, 10.1.1.1"], "192.0.2.10"),
        ("2001:db8::1", [b"10.0.0.1"], "2001:db8::1"),
        # a trusted proxy vouches for the right-most entry
        ("127.0.0.1", [b"203.0.113.9"], "203.0.113.9"),
        ("127.0.0.1", [b"6.6.6.6, 203.0.113.9"], "203.0.113.9"),
        ("127.0.0.1", [b"6.6.6.6", b"203.0.113.9"], "203.0.113.9"),
        # a chain of trusted proxies is walked through
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.1, 10.0.0.2, 10.0.0.3"], "198.51.100.1"),
        ("10.0.0.1", [b"198.51.100.1, 10.0.0.2", b"10.0.0.3"], "198.51.100.1"),
        # a trusted proxy without the header is the client
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", [b""], "127.0.0.1"),
        # every entry trusted: the left-most is the best known
        ("10.0.0.1", [b"10.0.0.9, 10.0.0.2"], "10.0.0.9"),
        # a malformed entry ends the walk at the last good address
        ("127.0.0.1", [b"198.51.100.1, garbage"], "127.0.0.1"),
        ("10.0.0.1", [b"198.51.100.1, unknown, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", [b"198.51.100.1, _hidden, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", [b"198.51.100.1, 10.0.0.2 10.0.0.3"], "10.0.0.1"),
        ("10.0.0.1", [b"198.51.100.1, fe80::1%eth0"], "10.0.0.1"),
        ("10.0.0.1", [b"198.51.100.1, \xff"], "10.0.0.1"),
        ("10.0.0.1", [b"1" * 100], "10.0.0.1"),
        # empty list elements are skipped
        ("10.0.0.1", [b"198.51.100.1, , ,10.0.0.2,"], "198.51.100.1"),
        # ports and brackets some proxies add
        ("127.0.0.1", [b"203.0.113.9:4711"], "203.0.113.9"),
        ("127.0.0.1", [b"[2001:db8::7]:443"], "2001:db8::7"),
        ("127.0.0.1", [b"[2001:db8::7]"], "2001:db8::7"),
        ("127.0.0.1", [b"2001:db8::7"], "2001:db8::7"),
        ("127.0.0.1", [b"[203.0.113.9]"], "127.0.0.1"),
        ("127.0.0.1", [b"203.0.113.9:99999"], "127.0.0.1"),
        ("127.0.0.1", [b"203.0.113.9:"], "127.0.0.1"),
        ("127.0.0.1", [b"[2001:db8::7]x"], "127.0.0.1"),
        ("127.0.0.1", [b"[2001:db8::7"], "127.0.0.1"),
        # IPv4-mapped IPv6 (a dual-stack listener) is IPv4
        ("::ffff:127.0.0.1", [b"203.0.113.9"], "203.0.113.9"),
        ("::ffff:192.0.2.10", [b"203.0.113.9"], "192.0.2.10"),
        ("127.0.0.1", [b"::ffff:203.0.113.9"], "203.0.113.9"),
        # a zone on the peer is dropped
        ("fe80::1%lo", [], "fe80::1"),
        ("fd00::1", [b"2001:db8::1"], "2001:db8::1"),
    ],
)
def test_client_address(peer, xff, client):
    assert client_address(peer, xff, PROXIES) == addr(client)


@pytest.mark.parametrize("peer", [None, "", "unix", "/tmp/socket", "1.2.3.4.5", "é"])
def test_a_peer_without_an_ip_address_is_no_client(peer):
    assert client_address(peer, [b"203.0.113.9"], (ip_network("0.0.0.0/0"),)) is None


def test_the_walk_reads_a_bounded_number_of_entries():
    everyone = (ip_network("0.0.0.0/0"),)
    entries = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(1000)]
    client = client_address("127.0.0.1", [b", ".join(entries)], everyone)
    assert client == addr(entries[-MAX_FORWARDED_ENTRIES].decode())
    lines = client_address("127.0.0.1", entries, everyone)
    assert lines == client
    # a huge header costs one linear split, not a parse of every entry
    huge = b"9.9.9.9," * 200_000 + b"203.0.113.9"
    assert client_address("127.0.0.1", [huge], PROXIES) == addr("203.0.113.9")


forwarded_entries = st.one_of(
    st.ip_addresses().map(lambda a: str(a).encode()),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:{80}".encode()),
    st.sampled_from([b"10.0.0.1", b"127.0.0.1", b"unknown", b"", b" ", b"fd00::5"]),
    st.binary(max_size=20),
)


def _reference_walk(peer, values, trusted):
    """The walk spelled out naively, to check the bounded one against."""

    def parse(entry):
        return parse_forwarded(entry)

    current = client_address(peer, [], ())
    if current is None or not any(current in n for n in trusted):
        return current
    entries = [e.strip(b" \t") for v in values for e in v.split(b",")]
    for entry in reversed(entries[-MAX_FORWARDED_ENTRIES:]):
        if not entry:
            continue
        address = parse(entry)
        if address is None:
            return current
        current = address
        if not any(current in n for n in trusted):
            return current
    return current


@settings(max_examples=100, deadline=None)
@given(
    peer=st.sampled_from(["127.0.0.1", "10.1.2.3", "192.0.2.10", "fd00::1", "::1"]),
    lines=st.lists(st.lists(forwarded_entries, max_size=6), max_size=8),
    trusted=st.lists(
        st.sampled_from(["10.0.0.0/8", "127.0.0.0/8", "fd00::/8", "::1/128", "0.0.0.0/0"]),
        max_size=3,
    ),
)
def test_the_forwarded_walk_matches_the_naive_one(peer, lines, trusted):
    networks = tuple(ip_network(t) for t in trusted)
    values = [b",".join(line) for line in lines]
    client = client_address(peer, values, networks)
    assert client == _reference_walk(peer, values, networks)
    if not any(addr(peer) in n for n in networks):
        assert client == addr(peer)  # nothing a client writes moves it


@SETTINGS
@given(entry=st.binary(max_size=80))
def test_parse_forwarded_never_raises(entry):
    address = parse_forwarded(entry)
    assert address is None or address.version in (4, 6)


# -- Authorization parsing --------------------------------------------------------


@pytest.mark.parametrize(
    "header, credentials",
    [
        (basic("u", "p"), ("u", "p")),
        (b"basic " + base64.b64encode(b"u:p"), ("u", "p")),
        (b"BASIC   " + base64.b64encode(b"u:p") + b" ", ("u", "p")),
        (basic("u", "p:q:"), ("u", "p:q:")),
        (basic("J\u00f6rg", "caf\u00e9"), ("J\u00f6rg", "caf\u00e9")),
        (basic("Jo\u0308rg", "cafe\u0301"), ("J\u00f6rg", "caf\u00e9")),  # NFC
    ],
)
def test_parse_basic(header, credentials):
    assert parse_basic(header) == credentials


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Basic",
        b"Basic ",
        b"Bearer " + base64.b64encode(b"u:p"),
        b"Basicx " + base64.b64encode(b"u:p"),
        b"Basic " + base64.b64encode(b"u:p")[:-1],
        b"Basic dTpw!",
        b"Basic dTp\nw",
        b"Basic dTpw====",
        b"Basic =dTpw",
        b"Basic dTpwcR==",  # non-canonical: the same bytes as "dTpwcQ=="
        b"Basic " + base64.b64encode(b"no colon"),
        b"Basic " + base64.b64encode(b":password"),
        b"Basic " + base64.b64encode(b"user:"),
        b"Basic " + base64.b64encode(b"u:\xff\xfe"),
        b"Basic " + base64.b64encode(b"u:p\x00"),
        b"Basic " + base64.b64encode(b"u\x7f:p"),
        b"Basic " + base64.b64encode(b"u:" + b"p" * 257),
        b"Basic " + base64.b64encode(b"u" * 129 + b":p"),
        b"Basic " + base64.b64encode(b"u:p") + b" " * MAX_AUTHORIZATION,
    ],
)
def test_parse_basic_refuses(header):
    assert parse_basic(header) is None


@SETTINGS
@given(header=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(b"Basic ".__add__)))
def test_parse_basic_never_raises(header):
    parsed = parse_basic(header)
    assert parsed is None or all(isinstance(part, str) and part for part in parsed)


credential_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
)


@SETTINGS
@given(user=credential_text.filter(lambda u: ":" not in u), password=credential_text)
def test_parse_basic_reads_what_a_browser_writes(user, password):
    parsed = parse_basic(basic(user, password))
    nfc = (unicodedata.normalize("NFC", user), unicodedata.normalize("NFC", password))
    assert parsed == nfc


# -- the gate: no rules, allow ------------------------------------------------------


def test_a_host_without_rules_is_allowed_at_once():
    gate, _ = gate_with()
    assert check(gate, NO_RULES, peer=None, xff=[b"garbage"]) is ALLOWED


def test_allow():
    gate, _ = gate_with(trusted_proxies=[ip_network("127.0.0.1/32")])
    only = rules(allow=["192.0.2.0/24", "2001:db8::/32"])
    assert check(gate, only, peer="192.0.2.10") is ALLOWED
    assert check(gate, only, peer="2001:db8::1") is ALLOWED
    assert check(gate, only, peer="::ffff:192.0.2.10") is ALLOWED
    denied = check(gate, only, peer="198.51.100.1")
    assert denied is FORBIDDEN
    assert (denied.status, denied.message, denied.headers) == (403, "forbidden", ())
    assert not denied.allowed and denied.decision is Decision.FORBIDDEN
    assert check(gate, only, peer=None) is FORBIDDEN  # no address: not in any network
    # through a trusted proxy, the address it vouches for counts
    assert check(gate, only, peer="127.0.0.1", xff=[b"192.0.2.77"]) is ALLOWED
    assert check(gate, only, peer="127.0.0.1", xff=[b"198.51.100.1"]) is FORBIDDEN
    assert check(gate, only, peer="127.0.0.1") is FORBIDDEN


def test_a_client_cannot_spoof_its_way_into_the_allow_list():
    gate, _ = gate_with(trusted_proxies=[ip_network("127.0.0.1/32")])
    only = rules(allow=["10.0.0.0/8"])
    for xff in ([b"10.0.0.1"], [b"10.0.0.1, 10.0.0.2"], [b"10.0.0.1", b"10.0.0.1"]):
        assert check(gate, only, peer="198.51.100.1", xff=xff) is FORBIDDEN
    # through the trusted proxy, what the client wrote is left of what it saw
    assert check(gate, only, peer="127.0.0.1", xff=[b"10.0.0.1, 198.51.100.1"]) is FORBIDDEN


# -- the gate: rate ---------------------------------------------------------------


def test_rate_spends_a_burst_then_refills():
    gate, clock = gate_with()
    limited = rules(rate={"per_second": 1, "burst": 2})
    assert check(gate, limited) is ALLOWED
    assert check(gate, limited) is ALLOWED
    denied = check(gate, limited)
    assert (denied.status, denied.message) == (429, "too many requests")
    assert denied.headers == ((b"Retry-After", b"1"),)
    assert denied.decision is Decision.RATE_LIMITED
    clock.advance(0.5)
    assert check(gate, limited).status == 429  # half a token; a denial spends nothing
    clock.advance(0.5)
    assert check(gate, limited) is ALLOWED
    assert check(gate, limited).status == 429
    clock.advance(60)
    assert [check(gate, limited) is ALLOWED for _ in range(3)] == [True, True, False]


def test_retry_after_is_the_whole_seconds_until_the_next_token():
    gate, clock = gate_with()
    slow = rules(rate={"per_second": 0.1, "burst": 1})
    assert check(gate, slow) is ALLOWED
    assert check(gate, slow).headers == ((b"Retry-After", b"10"),)
    clock.advance(9.5)
    assert check(gate, slow).headers == ((b"Retry-After", b"1"),)
    clock.advance(0.5)
    assert check(gate, slow) is ALLOWED
    fast = rules(rate={"per_second": 1000, "burst": 1})
    assert check(gate, fast, host="fast.example.com") is ALLOWED
    assert check(gate, fast, host="fast.example.com").headers == (
        (b"Retry-After", b"1"),
    )  # never 0


def test_buckets_are_per_client_and_per_host():
    gate, _ = gate_with()
    one = rules(rate={"per_second": 1, "burst": 1})
    assert check(gate, one, peer="192.0.2.1") is ALLOWED
    assert check(gate, one, peer="192.0.2.1").status == 429
    assert check(gate, one, peer="192.0.2.2") is ALLOWED
    assert check(gate, one, peer="192.0.2.1", host="other.example.com") is ALLOWED


def test_ipv6_clients_share_a_bucket_per_64():
    gate, _ = gate_with()
    one = rules(rate={"per_second": 1, "burst": 1})
    assert check(gate, one, peer="2001:db8:0:1::1") is ALLOWED
    assert check(gate, one, peer="2001:db8:0:1:ffff::2").status == 429
    assert check(gate, one, peer="2001:db8:0:2::1") is ALLOWED
    gate, _ = gate_with(ipv6_prefix=128)
    assert check(gate, one, peer="2001:db8:0:1::1") is ALLOWED
    assert check(gate, one, peer="2001:db8:0:1::2") is ALLOWED


def test_rate_buckets_are_a_bounded_lru():
    gate, _ = gate_with(max_buckets=3)
    one = rules(rate={"per_second": 0.01, "burst": 1})
    for n in range(1, 4):
        assert check(gate, one, peer=f"192.0.2.{n}") is ALLOWED
    assert check(gate, one, peer="192.0.2.1").status == 429  # 1 is now the most recent
    assert check(gate, one, peer="192.0.2.4") is ALLOWED  # evicts 2
    assert len(gate.limiter) == 3
    assert check(gate, one, peer="192.0.2.2") is ALLOWED  # forgotten: a fresh bucket
    assert check(gate, one, peer="192.0.2.1").status == 429  # kept
    for n in range(1000):
        check(gate, one, peer=f"198.51.{n // 256}.{n % 256}")
    assert len(gate.limiter) == 3


def test_a_denied_address_takes_no_bucket():
    gate, _ = gate_with()
    both = rules(allow=["192.0.2.0/24"], rate={"per_second": 1, "burst": 1})
    for n in range(50):
        assert check(gate, both, peer=f"198.51.100.{n}") is FORBIDDEN
    assert len(gate.limiter) == 0


# -- the gate: basic auth ---------------------------------------------------------

SECRET = "correct horse"
AUTH = rules(basic_auth={"user": "alice", "password": SECRET})


def test_no_credentials_get_a_challenge():
    gate, _ = gate_with()
    for header in (None, b"", b"Bearer token", b"Basic !!"):
        denied = check(gate, AUTH, authorization=header)
        assert (denied.status, denied.message, denied.headers) == (
            401,
            "unauthorized",
            (CHALLENGE,),
        )
        assert denied.decision is Decision.UNAUTHORIZED and not denied.authenticated


def test_the_right_credentials_pass_and_are_remembered():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    passed = check(gate, AUTH, authorization=basic("alice", SECRET))
    assert passed is AUTHENTICATED and passed.allowed and passed.authenticated
    assert verify.calls == 1
    for _ in range(5):
        assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    assert verify.calls == 1  # a browser re-sending the header costs no scrypt


def test_wrong_credentials_are_refused_and_remembered():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    for _ in range(3):
        denied = check(gate, AUTH, authorization=basic("alice", "wrong"))
        assert denied.status == 401 and denied.headers == (CHALLENGE,)
    assert verify.calls == 1


def test_a_wrong_user_costs_the_same_password_check():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    assert check(gate, AUTH, authorization=basic("mallory", SECRET)).status == 401
    assert verify.calls == 1  # no fast answer telling which user names exist
    assert check(gate, AUTH, authorization=basic("Alice", SECRET)).status == 401
    assert verify.calls == 2


def test_a_changed_password_is_checked_afresh():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    again = rules(basic_auth={"user": "alice", "password": SECRET})  # a new salt
    assert check(gate, again, authorization=basic("alice", SECRET)) is AUTHENTICATED
    assert verify.calls == 2
    changed = rules(basic_auth={"user": "alice", "password": "new"})
    assert check(gate, changed, authorization=basic("alice", SECRET)).status == 401


def test_a_flood_of_wrong_passwords_does_not_evict_good_ones():
    verify = CountingVerify()
    gate, _ = gate_with(verify, cache_size=2)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    for n in range(20):  # from many addresses: each stays under the wrong-password limit
        guess = basic("alice", f"guess{n}")
        assert check(gate, AUTH, peer=f"198.51.100.{n}", authorization=guess).status == 401
    assert verify.calls == 21
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    assert verify.calls == 21
    assert check(gate, AUTH, authorization=basic("alice", "guess0")).status == 401
    assert verify.calls == 22  # long evicted from the bounded cache of bad ones


def test_a_new_password_is_checked_off_the_spot_and_shared():
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify)
    first = check(gate, AUTH, authorization=basic("alice", SECRET))
    second = check(gate, AUTH, authorization=basic("alice", SECRET))
    wrong = check(gate, AUTH, authorization=basic("alice", "wrong"))
    assert all(isinstance(d, Deferred) and not d.called for d in (first, second, wrong))
    assert verify.calls == 2 and gate.passwords.pending == 2
    results = []
    for d in (first, second, wrong):
        d.addCallback(results.append)
    verify.finish()
    assert results[:2] == [AUTHENTICATED, AUTHENTICATED]
    assert results[2].status == 401
    assert gate.passwords.pending == 0
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED


def test_one_client_gets_its_share_of_the_checks_and_no_more():
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify, max_running=2, max_queued=2, per_client=2)
    waiting = [check(gate, AUTH, authorization=basic("alice", f"guess{n}")) for n in range(2)]
    assert all(isinstance(d, Deferred) for d in waiting)
    # a third different password from the same client: 429, its own doing
    over = check(gate, AUTH, authorization=basic("alice", SECRET))
    assert over is CLIENT_BUSY
    assert (over.status, over.headers) == (429, ((b"Retry-After", b"1"),))
    assert over.decision is Decision.RATE_LIMITED
    # on another host too: the share is the client's, not per host
    other = check(gate, AUTH, authorization=basic("alice", SECRET), host="other.example.com")
    assert other is CLIENT_BUSY
    # the same credentials as a running check join it rather than count again
    assert isinstance(check(gate, AUTH, authorization=basic("alice", "guess0")), Deferred)
    # another client is not held back by it
    elsewhere = check(gate, AUTH, peer="192.0.2.99", authorization=basic("alice", SECRET))
    assert isinstance(elsewhere, Deferred)
    assert verify.calls == 2 and gate.passwords.queued == 1
    verify.finish()  # the two guesses: the queued check runs now
    assert all(d.called for d in waiting) and verify.calls == 3
    verify.finish()
    assert elsewhere.result is AUTHENTICATED
    assert gate.passwords.pending == 0
    later = check(gate, AUTH, authorization=basic("alice", "guess9"))  # room again
    verify.finish()
    assert later.result.status == 401


def test_checks_beyond_the_running_ones_wait_in_order_then_get_503():
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify, max_running=1, max_queued=2, per_client=1)
    answers = [
        check(gate, AUTH, peer=f"192.0.2.{n}", authorization=basic("alice", f"guess{n}"))
        for n in range(1, 4)
    ]
    assert all(isinstance(d, Deferred) and not d.called for d in answers)
    assert (gate.passwords.running, gate.passwords.queued) == (1, 2)
    busy = check(gate, AUTH, peer="192.0.2.4", authorization=basic("alice", SECRET))
    assert busy is BUSY
    assert (busy.status, busy.headers) == (503, ((b"Retry-After", b"1"),))
    assert busy.decision is Decision.UNAVAILABLE
    for n in range(3):  # one at a time, first come first served
        assert [d.called for d in answers] == [True] * n + [False] * (3 - n)
        assert verify.calls == n + 1
        verify.finish()
    assert all(d.result.status == 401 for d in answers)
    assert gate.passwords.pending == 0


def test_a_queued_check_nobody_waits_for_is_dropped():
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify, max_running=1, max_queued=4, per_client=1)
    running = check(gate, AUTH, peer="192.0.2.1", authorization=basic("alice", "guess"))
    gone = check(gate, AUTH, peer="192.0.2.2", authorization=basic("alice", SECRET))
    assert gate.passwords.queued == 1
    gone.cancel()  # its client left before its turn
    gone.addErrback(lambda f: f.trap(CancelledError))
    assert gate.passwords.queued == 0 and gate.passwords.pending == 1
    # the client's share is free again
    again = check(gate, AUTH, peer="192.0.2.2", authorization=basic("alice", SECRET))
    assert isinstance(again, Deferred)
    verify.finish()
    assert running.result.status == 401 and verify.calls == 2
    verify.finish()
    assert again.result is AUTHENTICATED


def test_many_clients_guessing_at_once_leave_room_for_a_login():
    """The reviewer's attack: one client with 12 connections, each sending a fresh
    wrong password, kept every first login waiting for a slot (503).  Now it
    takes its own share; so do a few more guessers and an IPv6 /64 spreading
    over its addresses; a first login (on any host) still waits its turn and
    passes, and each guesser is stopped after its wrong passwords."""
    verify = CountingVerify(later=True)
    gate, clock = gate_with(verify)  # the defaults: 4 running, 64 queued, 2 per client
    attackers = ["198.51.100.7", "198.51.100.8", "203.0.113.1"]
    spread = [f"2001:db8:1:2::{n:x}" for n in range(1, 13)]
    answers = {}
    for peer in attackers:
        answers[peer] = [
            check(gate, AUTH, peer=peer, authorization=basic("alice", f"{peer}-{n}"))
            for n in range(12)
        ]
    answers["v6"] = [
        check(gate, AUTH, peer=peer, authorization=basic("alice", f"v6-{n}"))
        for n, peer in enumerate(spread)
    ]
    for peer, got in answers.items():
        assert [isinstance(d, Deferred) for d in got] == [True, True] + [False] * 10, peer
        assert all(v is CLIENT_BUSY for v in got[2:]), peer
    assert gate.passwords.pending == 8
    logins = [
        check(gate, AUTH, peer="192.0.2.10", authorization=basic("alice", SECRET), host=host)
        for host in (HOST, "other.example.com")
    ]
    assert all(isinstance(d, Deferred) for d in logins)  # queued, not refused
    while not all(d.called for d in logins):
        verify.finish()
    assert [d.result for d in logins] == [AUTHENTICATED, AUTHENTICATED]

    # the guessers keep going: each is stopped after WRONG_PASSWORDS.burst misses
    tries = {peer: 0 for peer in attackers}
    for _ in range(40):
        for peer in attackers:
            tries[peer] += 1
            check(gate, AUTH, peer=peer, authorization=basic("alice", f"more-{peer}-{tries[peer]}"))
        verify.finish()
    assert verify.calls == 8 + 2 + (WRONG_PASSWORDS.burst - 2) * len(attackers)
    for peer in attackers:
        stopped = check(gate, AUTH, peer=peer, authorization=basic("alice", SECRET))
        assert (stopped.status, stopped.message) == (429, "too many wrong passwords, retry later")
        assert stopped.headers == ((b"Retry-After", b"30"),)
    # the legitimate client is unaffected, cached or checked afresh
    assert check(gate, AUTH, peer="192.0.2.10", authorization=basic("alice", SECRET)) is (
        AUTHENTICATED
    )
    fresh = check(gate, AUTH, peer="192.0.2.10", authorization=basic("alice", SECRET), host="c.com")
    verify.finish()
    assert fresh.result is AUTHENTICATED
    clock.advance(30)  # one more try for each guesser, then 30 s more
    assert isinstance(check(gate, AUTH, peer=attackers[0], authorization=basic("a", "x")), Deferred)


def test_wrong_passwords_are_limited_per_client_and_host_without_a_rate_rule():
    verify = CountingVerify()
    gate, clock = gate_with(verify, failures=Rate(per_second=0.1, burst=3))
    for n in range(3):
        assert check(gate, AUTH, authorization=basic("alice", f"guess{n}")).status == 401
    blocked = check(gate, AUTH, authorization=basic("alice", SECRET))
    assert (blocked.status, blocked.decision) == (429, Decision.RATE_LIMITED)
    assert blocked.headers == ((b"Retry-After", b"10"),)
    # even the right password: else the cache of good ones would answer guesses
    assert verify.calls == 3
    # repeating a wrong password already checked costs nothing and counts nothing
    gate, clock = gate_with(verify, failures=Rate(per_second=0.1, burst=3))
    for _ in range(10):
        assert check(gate, AUTH, authorization=basic("alice", "typo")).status == 401
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    # another client, another host, are not blocked by the first one's misses
    for n in range(3):
        check(gate, AUTH, authorization=basic("alice", f"guess{n}"))
    assert check(gate, AUTH, authorization=basic("alice", "again")).status == 429
    assert check(gate, AUTH, peer="192.0.2.11", authorization=basic("alice", SECRET)) is (
        AUTHENTICATED
    )
    assert check(gate, AUTH, authorization=basic("alice", SECRET), host="b.example") is (
        AUTHENTICATED
    )
    # an IPv6 /64 is one client
    for n in range(3):
        check(gate, AUTH, peer=f"2001:db8::{n + 1}", authorization=basic("alice", f"v6-{n}"))
    assert (
        check(gate, AUTH, peer="2001:db8::ff", authorization=basic("alice", SECRET)).status == 429
    )
    # without credentials, the challenge as ever; a token back after 10 s
    assert check(gate, AUTH).status == 401
    clock.advance(10)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED
    assert check(gate, AUTH, authorization=basic("alice", "guess9")).status == 401
    assert check(gate, AUTH, authorization=basic("alice", SECRET)).status == 429


def test_clients_without_an_address_are_held_to_the_global_bounds_only():
    """A UNIX socket peer: nothing tells its clients apart, so one guesser
    must not take the share, or the bucket, of all of them."""
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify, max_running=2, max_queued=2, per_client=1)
    waiting = [check(gate, AUTH, peer=None, authorization=basic("a", f"g{n}")) for n in range(4)]
    assert all(isinstance(d, Deferred) for d in waiting)
    assert check(gate, AUTH, peer=None, authorization=basic("a", "g9")) is BUSY
    while verify.waiting:
        verify.finish()
    for n in range(20):
        guess = check(gate, AUTH, peer=None, authorization=basic("alice", f"more{n}"))
        verify.finish()
        assert guess.result.status == 401
    assert len(gate.passwords.failures) == 0
    login = check(gate, AUTH, peer=None, authorization=basic("alice", SECRET))
    verify.finish()
    assert login.result is AUTHENTICATED


def test_the_wrong_password_buckets_are_a_bounded_lru_and_can_be_off():
    verify = CountingVerify()
    gate, _ = gate_with(verify, max_buckets=5, failures=Rate(per_second=0.01, burst=1))
    for n in range(1000):
        check(gate, AUTH, peer=f"198.51.{n // 256}.{n % 256}", authorization=basic("a", f"{n}"))
    assert len(gate.passwords.failures) == 5
    gate, _ = gate_with(CountingVerify(), failures=None)
    for n in range(50):
        assert check(gate, AUTH, authorization=basic("alice", f"guess{n}")).status == 401
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED


def test_a_cancelled_wait_leaves_the_check_running():
    verify = CountingVerify(later=True)
    gate, _ = gate_with(verify)
    gone = check(gate, AUTH, authorization=basic("alice", SECRET))
    stays = check(gate, AUTH, authorization=basic("alice", SECRET))
    gone.cancel()
    failures = []
    gone.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)
    verify.finish()
    assert stays.result is AUTHENTICATED
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is AUTHENTICATED


def test_a_failed_check_is_503_and_not_remembered():
    calls = []

    def broken(hashed, password):
        calls.append(password)
        return fail(MemoryError("scrypt could not allocate"))

    gate, _ = gate_with(broken)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is CHECK_FAILED
    assert CHECK_FAILED.status == 503 and CHECK_FAILED.headers == ((b"Retry-After", b"1"),)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is CHECK_FAILED
    assert len(calls) == 2 and gate.passwords.pending == 0

    def raises(hashed, password):
        raise ValueError("memory limit exceeded")

    gate, _ = gate_with(raises)
    assert check(gate, AUTH, authorization=basic("alice", SECRET)) is CHECK_FAILED


@pytest.mark.parametrize(
    "host, realm",
    [
        ("app.example.com", b"app.example.com"),
        ("app.example.com:8080", b"app.example.com:8080"),
        ("[::1]:80", b"[::1]:80"),
        ('evil", Basic realm="x', b"tunnel"),
        ("a\\b", b"tunnel"),
        ("caf\u00e9.example", b"tunnel"),
        ("", b"tunnel"),
        ("a" * 300, b"tunnel"),
    ],
)
def test_the_realm_is_the_host_only_when_it_is_plainly_one(host, realm):
    gate, _ = gate_with()
    denied = check(gate, AUTH, host=host)
    assert denied.headers == (
        (b"WWW-Authenticate", b'Basic realm="' + realm + b'", charset="UTF-8"'),
    )


@SETTINGS
@given(header=st.one_of(st.binary(max_size=120), st.binary(max_size=120).map(b"Basic ".__add__)))
def test_any_authorization_header_is_a_verdict(header):
    gate, _ = gate_with()
    verdict = check(gate, AUTH, authorization=header)
    assert verdict.status == 401 and not verdict.authenticated


# -- the order of the rules -------------------------------------------------------

ALL = rules(
    allow=["192.0.2.0/24"],
    rate={"per_second": 1, "burst": 1},
    basic_auth={"user": "alice", "password": SECRET},
)


def test_allow_comes_first_and_says_nothing_of_a_password():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    denied = check(gate, ALL, peer="198.51.100.1", authorization=basic("alice", SECRET))
    assert denied is FORBIDDEN and not any(h == b"WWW-Authenticate" for h, _ in denied.headers)
    assert verify.calls == 0 and len(gate.limiter) == 0


def test_rate_comes_before_the_password_check():
    verify = CountingVerify()
    gate, _ = gate_with(verify)
    assert check(gate, ALL, authorization=basic("alice", "guess")).status == 401
    assert verify.calls == 1
    assert check(gate, ALL, authorization=basic("alice", "guess2")).status == 429
    assert check(gate, ALL, authorization=basic("alice", SECRET)).status == 429
    assert verify.calls == 1  # a guesser spends tokens, not our CPU


def test_every_rule_passed():
    gate, _ = gate_with()
    assert check(gate, ALL, authorization=basic("alice", SECRET)) is AUTHENTICATED


# -- the real thread pool ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_passwords_are_checked_on_the_gates_own_threads():
    """The default verifier: real scrypt (the default parameters) off the reactor thread."""
    real = HostRules.from_api({"basic_auth": {"user": "alice", "password": SECRET}})
    gate = AccessGate(reactor)
    gate.startService()
    try:
        ticks = []
        reactor.callLater(0, ticks.append, "reactor ran")
        pending = check(gate, real, authorization=basic("alice", SECRET))
        wrong = check(gate, real, authorization=basic("alice", "wrong"))
        assert isinstance(pending, Deferred) and isinstance(wrong, Deferred)
        assert await pending is AUTHENTICATED
        assert ticks == ["reactor ran"]  # while scrypt ran, the reactor did not wait
        assert (await wrong).status == 401
        assert check(gate, real, authorization=basic("alice", SECRET)) is AUTHENTICATED
    finally:
        gate.stopService()
    assert check(gate, real, authorization=basic("alice", "other")) is CHECK_FAILED


def test_a_stopped_verifier_refuses_work_without_starting_threads():
    verifier = ThreadPoolVerifier(reactor)
    verifier.stop()
    failures = []
    verifier(AUTH.basic_auth.password, b"x").addErrback(failures.append)
    assert failures and "stopped" in failures[0].getErrorMessage()
