"""Identifiers are secrets: what a log may show of one, and its digest."""

from __future__ import annotations

import hashlib


def redact(identifier: str) -> str:
    """What logs may show of an identifier: a short prefix and its length."""
    shown = identifier[:3] if len(identifier) >= 8 else ""
    return f"{shown}…({len(identifier)} chars)"


def digest(identifier: str) -> bytes:
    """The SHA-256 of an identifier: an index key that does not reveal it."""
    return hashlib.sha256(identifier.encode("utf-8")).digest()
