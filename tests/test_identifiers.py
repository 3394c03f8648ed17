"""Identifiers are secrets: logs show a fingerprint, never their characters; a
server keeps a TunnelKey (their SHA-256), which shows only that fingerprint."""

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.koding.identifiers import TunnelKey, digest, fingerprint, redact
from tunnel.koding.states import ClientState, StateChange


def test_redact_is_the_digest_fingerprint() -> None:
    ident = "SECRET-ID-0123456789"
    want = hashlib.sha256(ident.encode()).hexdigest()[:8]
    assert fingerprint(ident) == want
    assert redact(ident) == f"id:{want}"
    assert digest(ident) == hashlib.sha256(ident.encode()).digest()


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x100, exclude_categories=("Cs",)),
        min_size=1,
        max_size=64,
    )
)
def test_redact_shows_no_character_of_the_identifier(ident: str) -> None:
    # non-ASCII identifiers: no character of theirs can appear in hex digits
    shown = redact(ident)
    assert not set(ident) & set(shown)
    assert len(shown) == 11


def test_redact_does_not_reveal_a_prefix_or_the_length() -> None:
    short, long = "abcdefgh", "abcdefgh" * 8
    assert not redact(long).startswith(("id:abc", "abc"))
    assert len(redact(short)) == len(redact(long))


# -- TunnelKey: what a server keeps of an identifier ------------------------------


def test_a_key_is_the_identifier_digest_and_shows_only_its_fingerprint() -> None:
    ident = "SECRET-ID-0123456789"
    key = TunnelKey.of(ident)
    assert key.digest == digest(ident)
    assert key.hex() == hashlib.sha256(ident.encode()).hexdigest()
    assert key.fingerprint == fingerprint(ident)
    assert repr(key) == str(key) == redact(ident) == f"id:{key.fingerprint}"
    assert f"{key}" == f"{key!r}" == redact(ident)  # as a log field shows it
    assert TunnelKey.from_hex(key.hex()) == key


def test_keys_are_equal_and_hash_alike_by_digest() -> None:
    a, b = TunnelKey.of("one"), TunnelKey.of("one")
    assert a == b and a is not b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert a != TunnelKey.of("two")
    assert a != "one"  # an identifier is not its key


def test_matches_confirms_the_identifier_only() -> None:
    key = TunnelKey.of("right")
    assert key.matches("right")
    assert not key.matches("wrong") and not key.matches("right ") and not key.matches("")


def test_coerce_is_the_one_normalising_function() -> None:
    key = TunnelKey.of("ident")
    assert TunnelKey.coerce(key) is key  # a key as it is
    assert TunnelKey.coerce("ident") == key  # an identifier, hashed
    with pytest.raises(ValueError, match="must not be empty"):
        TunnelKey.coerce("")
    for wrong in (b"ident", None, 42):
        with pytest.raises(TypeError):
            TunnelKey.coerce(wrong)


@pytest.mark.parametrize("text", ["", "ab", "0" * 63, "0" * 65, "g" * 64, "é" * 64])
def test_from_hex_refuses_anything_but_64_hex_digits(text: str) -> None:
    with pytest.raises(ValueError):
        TunnelKey.from_hex(text)


def test_a_key_is_32_bytes() -> None:
    with pytest.raises(ValueError):
        TunnelKey(b"short")


@given(st.text(min_size=1, max_size=64))
def test_a_key_never_shows_its_identifier(ident: str) -> None:
    key = TunnelKey.of(ident)
    assert key.matches(ident)
    assert TunnelKey.from_hex(key.hex()) == key
    shown = repr(key)
    assert len(shown) == 11 and shown.startswith("id:")
    if len(ident) > 3:  # long enough not to be hex digits by chance
        assert ident not in shown


def test_a_state_change_names_a_key_and_shows_its_fingerprint_only() -> None:
    secret = "SECRET-ID-0123456789"
    client_side = StateChange(secret, ClientState.CONNECTING, ClientState.CONNECTED)
    server_side = StateChange(TunnelKey.of(secret), ClientState.UNKNOWN, ClientState.CONNECTED)
    assert client_side.key == server_side.key == TunnelKey.of(secret)
    for change in (client_side, server_side):
        assert secret not in repr(change) and secret not in str(change)
        assert redact(secret) in repr(change)
    assert repr(client_side) == f"StateChange({redact(secret)}, CONNECTING -> CONNECTED)"
