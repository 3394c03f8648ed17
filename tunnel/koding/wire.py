"""The koding/tunnel control protocol: constants, control messages, JSON framing.

Control messages travel server -> client on the control stream as compact
JSON objects, each followed by a newline (Go's ``json.Encoder``).  The
decoder accepts what Go's ``json.Decoder`` accepts (objects split across
frames or run together, whitespace between them, unknown fields) and bounds
how much it will buffer for one message.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

CONTROL_PATH = "/_controlPath/"
IDENTIFIER_HEADER = b"X-Ktunnel-Identifier"
CONNECTED_STATUS = b"200 Connected to Tunnel"
CONNECTED_REPLY = b"HTTP/1.1 200 Connected to Tunnel\n\n"
HANDSHAKE_REQUEST = b"controlHandshake"
HANDSHAKE_RESPONSE = b"controlOk"
NO_LOCAL_SERVER = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 15\r\n\r\nno local server"

#: the largest control message we buffer before declaring the stream broken
MAX_MESSAGE_SIZE = 64 * 1024


class Action(enum.IntEnum):
    REQUEST_CLIENT_SESSION = 1


class TransportProtocol(enum.IntEnum):
    HTTP = 1
    TCP = 2
    WS = 3


class ControlMessageError(ValueError):
    """A control message that is not valid JSON or has fields of the wrong type."""


@dataclass(frozen=True)
class ControlMessage:
    action: int = Action.REQUEST_CLIENT_SESSION
    transport_protocol: int = TransportProtocol.HTTP
    local_port: int = 0

    def encode(self) -> bytes:
        """Compact JSON plus newline, field order as Go writes it."""
        return b'{"action":%d,"transportProtocol":%d,"localPort":%d}\n' % (
            self.action,
            self.transport_protocol,
            self.local_port,
        )

    @classmethod
    def from_json(cls, obj: object) -> ControlMessage:
        """Build a message from a decoded JSON value, with Go's type rules.

        Missing fields are zero and unknown fields are ignored, as in Go; a
        field of the wrong type is an error, as in Go; so is a value out of
        range (a port outside 0-65535), which Go would accept and fail to dial.
        """
        if obj is None:
            return cls(0, 0, 0)
        if not isinstance(obj, dict):
            raise ControlMessageError(f"control message is not an object: {obj!r:.80}")
        values = []
        for name, bits in (("action", 32), ("transportProtocol", 32), ("localPort", 16)):
            value = obj.get(name, 0)
            if value is None:
                value = 0
            if isinstance(value, bool) or not isinstance(value, int):
                raise ControlMessageError(f"{name} must be an integer, got {value!r:.80}")
            if not 0 <= value < 2**bits:
                raise ControlMessageError(f"{name} out of range: {value}")
            values.append(value)
        return cls(*values)


class MessageDecoder:
    """Incremental decoder of a stream of JSON control messages.

    ``feed`` returns the messages completed so far.  Bad input makes it
    return the good messages that came before it and set ``error``; every
    later call raises that error (Go's decoder hands out the good messages
    one by one too before it fails).
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buffer = ""
        self._pending = b""
        self._max = max_size
        self._decoder = json.JSONDecoder()
        self.error: ControlMessageError | None = None

    def feed(self, data: bytes) -> list[ControlMessage]:
        if self.error is not None:
            raise self.error
        out: list[ControlMessage] = []
        try:
            self._feed(data, out)
        except ControlMessageError as e:
            self.error = e
        return out

    def _feed(self, data: bytes, out: list[ControlMessage]) -> None:
        raw = self._pending + data
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                raise ControlMessageError(f"control stream is not UTF-8: {e}") from None
            text = raw[: e.start].decode("utf-8")
            self._pending = raw[e.start :]
        buf = self._buffer + text
        pos = 0
        end = len(buf)
        while True:
            while pos < end and buf[pos] in " \t\r\n":
                pos += 1
            if pos == end:
                break
            try:
                obj, pos = self._decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if _incomplete(buf, e):
                    break
                self._buffer = ""
                raise ControlMessageError(f"invalid control message: {e.msg}") from None
            except (RecursionError, ValueError) as e:
                self._buffer = ""
                raise ControlMessageError(f"invalid control message: {e}") from None
            out.append(ControlMessage.from_json(obj))
        self._buffer = buf[pos:]
        if len(self._buffer) + len(self._pending) > self._max:
            raise ControlMessageError(f"control message longer than {self._max} bytes")


def _incomplete(buf: str, error: json.JSONDecodeError) -> bool:
    """True if the JSON text that failed may still be completed by more input."""
    if error.pos >= len(buf) or error.msg.startswith("Unterminated string"):
        return True
    rest = buf[error.pos :]
    if any(literal.startswith(rest) for literal in ("true", "false", "null")):
        return True
    return len(rest) < 32 and all(c in "0123456789.eE+-" for c in rest)
