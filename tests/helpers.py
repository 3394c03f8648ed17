"""Helpers shared by the tests: frame decoding and sessions on StringTransports."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from tunnel.yamux import YamuxConfig, YamuxSession
from tunnel.yamux.frame import HEADER_SIZE, TYPE_DATA, Header, decode, encode

#: Go recordings, made with the Go pair through a recording relay (see
#: tests/vectors/README.md); TUNNEL_VECTORS points elsewhere.
VECTORS = Path(os.environ.get("TUNNEL_VECTORS", Path(__file__).resolve().parent / "vectors"))


def split_frames(data: bytes) -> list[tuple[Header, bytes]]:
    """Decode a complete byte string of yamux frames (asserts it is whole)."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= HEADER_SIZE, f"partial header at {pos}"
        h = decode(data[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        body = b""
        if h.type == TYPE_DATA:
            body = data[pos : pos + h.length]
            assert len(body) == h.length, "partial body"
            pos += h.length
        out.append((h, body))
    return out


def frame(type: int, flags: int, sid: int, length: int, body: bytes = b"") -> bytes:
    return encode(type, flags, sid, length) + body


def data_frame(sid: int, body: bytes, flags: int = 0) -> bytes:
    return encode(TYPE_DATA, flags, sid, len(body)) + body


class Wire:
    """A session driven over a StringTransport with a Clock."""

    def __init__(self, is_client: bool, config: YamuxConfig | None = None, **kw) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.session = YamuxSession(is_client, clock=self.clock, config=config, **kw)
        self.session.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.session.dataReceived(data)

    def sent(self) -> list[tuple[Header, bytes]]:
        """Frames written since the last call."""
        out = split_frames(self.transport.value())
        self.transport.clear()
        return out

    def lose(self, reason=None) -> None:
        self.session.connectionLost(reason)


class Collect:
    """A log observer: every event while it is installed, and them formatted."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    @property
    def lines(self) -> list[str]:
        return [formatEvent(e) or "" for e in self.events]

    def of(self, namespace_prefix: str) -> list[str]:
        """The formatted events of loggers whose namespace starts so."""
        return [
            formatEvent(e) or ""
            for e in self.events
            if e.get("log_namespace", "").startswith(namespace_prefix)
        ]
