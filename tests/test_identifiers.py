"""Identifiers are secrets: logs show a fingerprint, never their characters."""

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from tunnel.koding.identifiers import digest, fingerprint, redact


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
