"""Identifiers are secrets: what a log may show of one, and what a server keeps.

A server keeps a ``TunnelKey`` (the identifier's SHA-256), never the
identifier: a client proves it holds the identifier by sending it, and the
server hashes what it was sent.  A log, a listing or a metric shows the key's
fingerprint (its first 8 hex digits): enough to tell two clients apart and
to match a client's own log line, useless for guessing.
"""

from __future__ import annotations

import hashlib
import hmac

#: hex digits of a fingerprint
FINGERPRINT_LENGTH = 8


def digest(identifier: str) -> bytes:
    """The SHA-256 of an identifier: an index key that does not reveal it."""
    return hashlib.sha256(identifier.encode("utf-8")).digest()


def fingerprint(identifier: str) -> str:
    """The public short name of an identifier: 8 hex digits of its digest."""
    return digest(identifier).hex()[:FINGERPRINT_LENGTH]


def redact(identifier: str) -> str:
    """What logs may show of an identifier."""
    return f"id:{fingerprint(identifier)}"


class TunnelKey:
    """What the server knows of a tunnel's identifier: its SHA-256.

    Keys are dictionary keys (equal digests, equal keys); ``matches`` is the
    constant-time check of an offered identifier.  ``str()`` and ``repr()``
    show the fingerprint only, so a key is safe in any log line.
    """

    __slots__ = ("digest",)

    def __init__(self, digest: bytes) -> None:
        if len(digest) != 32:
            raise ValueError("a tunnel key is a 32-byte SHA-256 digest")
        self.digest = digest

    @classmethod
    def of(cls, identifier: str) -> TunnelKey:
        """The key of ``identifier`` (which must not be empty)."""
        if not identifier:
            raise ValueError("the identifier must not be empty")
        return cls(digest(identifier))

    @classmethod
    def coerce(cls, tunnel: str | TunnelKey) -> TunnelKey:
        """The one way the server's API turns what it is given into a key.

        A ``TunnelKey`` is returned as it is; a ``str`` is an identifier and
        is hashed here (so code that embeds the server may keep passing
        identifiers, and nothing past this call holds one).  An empty
        identifier is a ValueError, anything else a TypeError.
        """
        if isinstance(tunnel, TunnelKey):
            return tunnel
        if isinstance(tunnel, str):
            return cls.of(tunnel)
        raise TypeError(f"a tunnel is an identifier or a TunnelKey, not {type(tunnel).__name__}")

    @classmethod
    def from_hex(cls, text: str) -> TunnelKey:
        """The key written by ``hex()`` (64 hex digits); ValueError otherwise."""
        if len(text) != 64:
            raise ValueError("a tunnel key is 64 hex digits")
        return cls(bytes.fromhex(text))

    def hex(self) -> str:
        return self.digest.hex()

    @property
    def fingerprint(self) -> str:
        """The public short name: 8 hex digits of the digest."""
        return self.digest.hex()[:FINGERPRINT_LENGTH]

    def matches(self, identifier: str) -> bool:
        """True if ``identifier`` is the one this key was made of (constant time)."""
        return hmac.compare_digest(self.digest, digest(identifier))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TunnelKey):
            return NotImplemented
        return hmac.compare_digest(self.digest, other.digest)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"id:{self.fingerprint}"

    __str__ = __repr__
