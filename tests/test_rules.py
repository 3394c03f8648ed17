"""Per-host access rules as data: the API form, the stored form, the listing form."""

from __future__ import annotations

import base64
import json
import string
import unicodedata
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.server.rules import (
    MAX_NETWORKS,
    MAX_PASSWORD_BYTES,
    MAX_USER_BYTES,
    NO_RULES,
    SCRYPT,
    HostRules,
    PasswordHash,
    Rate,
    RulesError,
    ScryptParams,
)

#: cheap scrypt parameters (128 KiB, well under a millisecond) for tests
#: that hash many passwords; one test below uses the real defaults
CHEAP = ScryptParams(n=2**10, r=1, p=1)
PASSWORD = "s3cret-Passw0rd"
SETTINGS = settings(max_examples=200, deadline=None)
FUZZ = settings(max_examples=100, deadline=None)


def api(data):
    return HostRules.from_api(data, params=CHEAP)


def test_the_api_example_with_the_default_parameters():
    data = {
        "basic_auth": {"user": "u", "password": "p"},
        "allow": ["10.0.0.0/8", "::1/128"],
        "rate": {"per_second": 5, "burst": 10},
    }
    rules = HostRules.from_api(data)
    assert rules and rules.basic_auth.user == "u"
    assert rules.allow == (ip_network("10.0.0.0/8"), ip_network("::1/128"))
    assert rules.rate == Rate(5, 10)
    assert rules.public() == {
        "basic_auth": {"user": "u"},
        "allow": ["10.0.0.0/8", "::1/128"],
        "rate": {"per_second": 5, "burst": 10},
    }
    stored = rules.stored()
    scrypt = stored["basic_auth"]["scrypt"]
    assert (
        (scrypt["n"], scrypt["r"], scrypt["p"]) == (2**14, 8, 1) == (SCRYPT.n, SCRYPT.r, SCRYPT.p)
    )
    assert len(base64.b64decode(scrypt["salt"])) == 16
    text = json.dumps(stored)
    assert HostRules.from_stored(json.loads(text)) == rules
    assert rules.basic_auth.password.matches(b"p")
    assert not rules.basic_auth.password.matches(b"q")


def test_each_hash_has_its_own_salt():
    one, two = (api({"basic_auth": {"user": "u", "password": PASSWORD}}) for _ in range(2))
    assert one.basic_auth.password.salt != two.basic_auth.password.salt
    assert one.basic_auth.password.digest != two.basic_auth.password.digest
    assert one != two


@pytest.mark.parametrize(
    "data", [None, {}, {"basic_auth": None, "allow": None, "rate": None}], ids=repr
)
def test_no_rules(data):
    rules = api(data)
    assert rules == NO_RULES and not rules
    assert rules.stored() == {} and rules.public() == {}
    assert HostRules.from_stored({}) == NO_RULES


@pytest.mark.parametrize(
    "data",
    [
        {"basic_auth": {"user": "u", "password": PASSWORD}},
        {"allow": ["192.0.2.0/24"]},
        {"rate": {"per_second": 1}},
    ],
)
def test_any_one_rule_is_a_rule(data):
    rules = api(data)
    assert rules
    assert set(rules.stored()) == set(rules.public()) == set(data)


def test_the_stored_form_holds_no_password_and_the_public_form_no_hash():
    rules = api({"basic_auth": {"user": "alice", "password": PASSWORD}})
    stored = json.dumps(rules.stored())
    assert PASSWORD not in stored
    assert set(rules.stored()["basic_auth"]) == {"user", "scrypt"}
    assert rules.public() == {"basic_auth": {"user": "alice"}}
    assert "scrypt" not in json.dumps(rules.public())
    assert PASSWORD not in repr(rules) and "digest=" not in repr(rules)


def test_pool_is_a_rule_of_its_own_and_not_an_access_rule():
    rules = api({"pool": True})
    assert rules.pool and not rules and not rules.empty  # the access gate is skipped
    assert rules.stored() == rules.public() == {"pool": True}
    assert HostRules.from_stored({"pool": True}) == rules
    both = api({"pool": True, "rate": {"per_second": 5}})
    assert (
        both
        and both.pool
        and both.public() == {"rate": {"per_second": 5, "burst": 5}, "pool": True}
    )
    # false or null: not pooled, and nothing is stored
    assert api({"pool": False}) == api({"pool": None}) == NO_RULES
    assert NO_RULES.empty and not NO_RULES.pool
    # rules stored before the pool rule existed load unpooled
    assert not HostRules.from_stored({"rate": {"per_second": 1, "burst": 1}}).pool


@pytest.mark.parametrize("value", [1, 0, "true", [], {}])
def test_pool_must_be_a_boolean(value):
    with pytest.raises(RulesError, match="pool must be true or false"):
        api({"pool": value})
    with pytest.raises(RulesError, match="pool must be true or false"):
        HostRules.from_stored({"pool": value})


def test_networks_are_kept_in_canonical_form_once_each():
    rules = api({"allow": ["::0001/128", "10.0.0.7", "10.0.0.0/08", "10.0.0.7/32", "::1"]})
    assert rules.public()["allow"] == ["::1/128", "10.0.0.7/32", "10.0.0.0/8"]
    assert HostRules.from_stored(rules.stored()) == rules


def test_allows():
    rules = api({"allow": ["10.0.0.0/8", "2001:db8::/32"]})
    assert rules.allows(ip_address("10.1.2.3"))
    assert rules.allows(ip_address("2001:db8::5"))
    assert not rules.allows(ip_address("11.0.0.1"))
    assert not rules.allows(ip_address("::ffff:10.1.2.3"))  # the gate unmaps these first
    assert not rules.allows(None)
    assert NO_RULES.allows(None) and NO_RULES.allows(ip_address("11.0.0.1"))


@pytest.mark.parametrize(
    "per_second, burst", [(2.5, 3), (0.001, 1), (1, 1), (1_000_000, 1_000_000)]
)
def test_the_burst_defaults_to_a_second_of_requests(per_second, burst):
    assert api({"rate": {"per_second": per_second}}).rate == Rate(per_second, burst)


def test_credentials_are_normalised_to_nfc():
    decomposed = "Jose\u0301"
    rules = api({"basic_auth": {"user": decomposed, "password": "cafe\u0301"}})
    assert rules.basic_auth.user == "Jos\u00e9"
    assert rules.basic_auth.password.matches("caf\u00e9".encode())


def test_a_hash_keeps_the_parameters_it_was_made_with():
    rules = api({"basic_auth": {"user": "u", "password": PASSWORD}})
    scrypt = rules.stored()["basic_auth"]["scrypt"]
    assert (scrypt["n"], scrypt["r"], scrypt["p"]) == (2**10, 1, 1)
    back = HostRules.from_stored(json.loads(json.dumps(rules.stored())))
    assert back.basic_auth.password.params == CHEAP
    assert back.basic_auth.password.matches(PASSWORD.encode())


LONG_USER = "u" * (MAX_USER_BYTES + 1)
LONG_PASSWORD = "p" * (MAX_PASSWORD_BYTES + 1)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "rules must be an object"),
        ("basic", "rules must be an object"),
        ({"deny": []}, "unknown field 'deny'"),
        ({"basic_auth": "u:p"}, "basic_auth must be an object"),
        ({"basic_auth": {"user": "u"}}, "missing field 'password'"),
        ({"basic_auth": {"password": PASSWORD}}, "missing field 'user'"),
        ({"basic_auth": {"user": "u", "password": PASSWORD, "pasword": 1}}, "'pasword'"),
        ({"basic_auth": {"user": "", "password": PASSWORD}}, "user must not be empty"),
        ({"basic_auth": {"user": "a:b", "password": PASSWORD}}, "must not contain ':'"),
        ({"basic_auth": {"user": 7, "password": PASSWORD}}, "user must be a string"),
        ({"basic_auth": {"user": "a\tb", "password": PASSWORD}}, "control characters"),
        ({"basic_auth": {"user": LONG_USER, "password": PASSWORD}}, "at most 128 bytes"),
        ({"basic_auth": {"user": "\u00e9" * 65, "password": PASSWORD}}, "at most 128 bytes"),
        ({"basic_auth": {"user": "u", "password": ""}}, "password must not be empty"),
        ({"basic_auth": {"user": "u", "password": None}}, "password must be a string"),
        ({"basic_auth": {"user": "u", "password": LONG_PASSWORD}}, "at most 256 bytes"),
        ({"basic_auth": {"user": "u", "password": "x" * 10_000}}, "at most 256 bytes"),
        ({"basic_auth": {"user": "u", "password": "pw\ud800"}}, "valid Unicode"),
        ({"basic_auth": {"user": "u", "password": "pw\x7f"}}, "control characters"),
        ({"allow": "10.0.0.0/8"}, "allow must be a list"),
        ({"allow": []}, "must not be empty"),
        ({"allow": [10]}, "allow entries must be strings"),
        ({"allow": ["10.0.0.0/33"]}, "is not a network"),
        ({"allow": ["example.com"]}, "is not a network"),
        ({"allow": [" 10.0.0.0/8"]}, "is not a network"),
        ({"allow": ["fe80::%eth0/64"]}, "is not a network"),
        ({"allow": ["1" * 100]}, "is not a network"),
        ({"allow": ["10.0.0.1/8"]}, "host bits set (did you mean 10.0.0.0/8?)"),
        ({"allow": ["2001:db8::1/32"]}, "did you mean 2001:db8::/32?"),
        ({"allow": ["::ffff:10.0.0.0/104"]}, "as an IPv4 network"),
        ({"allow": ["10.0.0.0/8"] * (MAX_NETWORKS + 1)}, "at most 256 networks"),
        ({"rate": 5}, "rate must be an object"),
        ({"rate": {"burst": 5}}, "missing field 'per_second'"),
        ({"rate": {"per_second": 1, "window": 5}}, "unknown field 'window'"),
        ({"rate": {"per_second": 0}}, "rate.per_second must be from"),
        ({"rate": {"per_second": -1}}, "rate.per_second must be from"),
        ({"rate": {"per_second": 0.0001}}, "rate.per_second must be from"),
        ({"rate": {"per_second": 10**7}}, "rate.per_second must be from"),
        ({"rate": {"per_second": float("nan")}}, "rate.per_second must be a number"),
        ({"rate": {"per_second": float("inf")}}, "rate.per_second must be a number"),
        ({"rate": {"per_second": True}}, "rate.per_second must be a number"),
        ({"rate": {"per_second": "5"}}, "rate.per_second must be a number"),
        ({"rate": {"per_second": 5, "burst": 0}}, "rate.burst must be from 1"),
        ({"rate": {"per_second": 5, "burst": 10**7}}, "rate.burst must be from 1"),
        ({"rate": {"per_second": 5, "burst": 2.0}}, "rate.burst must be an integer"),
        ({"rate": {"per_second": 5, "burst": True}}, "rate.burst must be an integer"),
    ],
)
def test_bad_rules_get_a_clear_message_without_the_password(data, message):
    with pytest.raises(RulesError) as raised:
        api(data)
    text = str(raised.value)
    assert message in text
    assert PASSWORD not in text and "x" * 20 not in text and "p" * 20 not in text


def test_unknown_fields_are_shown_briefly():
    with pytest.raises(RulesError) as raised:
        api({"k" * 1000: 1, "b": 2, "c": 3, "d": 4})
    assert len(str(raised.value)) < 200


def _stored(**scrypt):
    good = api({"basic_auth": {"user": "u", "password": PASSWORD}}).stored()
    good["basic_auth"]["scrypt"].update(scrypt)
    return good


@pytest.mark.parametrize(
    "data, message",
    [
        ({"basic_auth": None}, "basic_auth must be an object"),
        ({"allow": None}, "allow must be a list"),
        ({"basic_auth": {"user": "u", "password": PASSWORD}}, "unknown field 'password'"),
        ({"basic_auth": {"user": "u"}}, "missing field 'scrypt'"),
        ({"basic_auth": {"user": "Jose\u0301", "scrypt": {}}}, "not a stored user name"),
        (_stored(n=1000), "power of two"),
        (_stored(n=2**21), "power of two"),
        (_stored(n=2**9), "power of two"),
        (_stored(n=2.0**10), "n must be an integer"),
        (_stored(r=0), "scrypt r must be"),
        (_stored(r=33), "scrypt r must be"),
        (_stored(p=17), "scrypt p must be"),
        (_stored(n=2**20, r=32), "too much memory"),
        (_stored(salt="not base64!"), "salt must be base64"),
        (_stored(salt="QQ="), "salt must be base64"),
        (_stored(salt=base64.b64encode(b"x" * 4).decode()), "salt must be 8 to 64 bytes"),
        (_stored(hash=base64.b64encode(b"x" * 65).decode()), "hash must be 16 to 64 bytes"),
        (_stored(hash=5), "hash must be base64"),
        (_stored(extra=1), "unknown field 'extra'"),
    ],
)
def test_damaged_stored_rules_are_refused(data, message):
    with pytest.raises(RulesError) as raised:
        HostRules.from_stored(data)
    assert message in str(raised.value)


def test_scrypt_parameters_bound_the_memory_of_a_check():
    assert ScryptParams().memory < 17 * 2**20
    assert ScryptParams(n=2**20, r=2).memory < ScryptParams.MAX_MEMORY + 2**20
    assert PasswordHash.of(b"pw", ScryptParams(n=2**12, r=16, p=2)).matches(b"pw")  # maxmem
    digest = PasswordHash.of(b"pw", CHEAP)
    assert digest.matches(b"pw") and not digest.matches(b"pW")


# -- properties --------------------------------------------------------------------

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
users = texts.filter(lambda u: ":" not in u)
v4_networks = st.builds(
    lambda a, p: str(IPv4Network((a, p), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_networks = st.builds(
    lambda a, p: str(IPv6Network((a, p), strict=False)),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
).filter(lambda n: not ip_network(n).subnet_of(ip_network("::ffff:0:0/96")))
rates = st.fixed_dictionaries(
    {"per_second": st.one_of(st.integers(1, 10**6), st.floats(0.001, 10**6))},
    optional={"burst": st.integers(1, 10**6)},
)
api_rules = st.fixed_dictionaries(
    {},
    optional={
        "basic_auth": st.fixed_dictionaries({"user": users, "password": texts}),
        "allow": st.lists(st.one_of(v4_networks, v6_networks), min_size=1, max_size=8),
        "rate": rates,
        "pool": st.booleans(),
    },
)


@SETTINGS
@given(data=api_rules)
def test_stored_rules_round_trip_exactly_through_json(data):
    rules = api(data)
    assert bool(rules) == bool(set(data) - {"pool"})  # pool is not an access rule
    assert rules.pool == data.get("pool", False)
    assert rules.empty == (not rules and not data.get("pool"))
    stored = json.loads(json.dumps(rules.stored()))
    back = HostRules.from_stored(stored)
    assert back == rules
    assert back.stored() == stored
    assert back.public() == rules.public()
    assert "scrypt" not in json.dumps(rules.public())
    if "basic_auth" in data:
        password = unicodedata.normalize("NFC", data["basic_auth"]["password"])
        assert back.basic_auth.password.matches(password.encode())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.0/8", "::1", "u", "per_second", "burst", "user", "password"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "basic_auth",
                    "allow",
                    "rate",
                    "pool",
                    "user",
                    "password",
                    "per_second",
                    "burst",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(data=json_values)
def test_from_api_only_ever_raises_rules_error(data):
    try:
        rules = api(data)
    except RulesError as error:
        assert str(error)
        return
    assert HostRules.from_stored(rules.stored()) == rules


@FUZZ
@given(data=json_values)
def test_from_stored_only_ever_raises_rules_error(data):
    if not isinstance(data, dict):
        data = {"rules": data}
    try:
        HostRules.from_stored(data)
    except RulesError:
        pass


secret_passwords = st.text(alphabet=string.ascii_letters + string.digits, min_size=12, max_size=40)
broken_other_parts = st.sampled_from(
    [
        {"allow": ["10.0.0.1/8"]},
        {"rate": {"per_second": 0}},
        {"basic_auth_": 1},
        {"allow": "x"},
    ]
)


@SETTINGS
@given(password=secret_passwords, broken=broken_other_parts, user=st.sampled_from(["", "a:b", 1]))
def test_no_error_message_repeats_the_password(password, broken, user):
    for data in (
        {"basic_auth": {"user": "u", "password": password}, **broken},
        {"basic_auth": {"user": user, "password": password}},
        {"basic_auth": {"user": "u", "password": password + "\x00"}},
        {"basic_auth": {"user": "u", "password": password * 30}},
    ):
        with pytest.raises(RulesError) as raised:
            api(data)
        assert password not in str(raised.value)
