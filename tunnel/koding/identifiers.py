"""Identifiers are secrets: what a log may show of one, and its digest.

A log shows a fingerprint (the first 8 hex digits of the identifier's
SHA-256), never a character of the identifier itself: enough to tell two
clients apart and to match a client's own log line, useless for guessing.
"""

from __future__ import annotations

import hashlib


def digest(identifier: str) -> bytes:
    """The SHA-256 of an identifier: an index key that does not reveal it."""
    return hashlib.sha256(identifier.encode("utf-8")).digest()


def fingerprint(identifier: str) -> str:
    """The public short name of an identifier: 8 hex digits of its digest."""
    return digest(identifier).hex()[:8]


def redact(identifier: str) -> str:
    """What logs may show of an identifier."""
    return f"id:{fingerprint(identifier)}"
