"""The koding/tunnel control protocol: constants, control messages, JSON framing.

Control messages travel server -> client on the control stream as compact
JSON objects, each followed by a newline (Go's ``json.Encoder``).  The
decoder accepts what Go's ``json.Decoder`` accepts (objects split across
frames or run together, whitespace between them, unknown fields) and bounds
how much it will buffer for one message.
"""

from __future__ import annotations

import codecs
import enum
import json
import re
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

    Each byte is looked at once as it arrives: a small JSON syntax scanner
    (strings, escapes, numbers, literals, nesting) finds where a value ends
    or the first byte that cannot belong to one, and only then is the value
    decoded, once.  So the work is linear in the input however it is split,
    and so is the result: a bad byte is found as soon as it arrives, and more
    than ``max_size`` bytes of one unfinished value are an error.
    ``examined`` counts the bytes looked at, for tests.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max = max_size
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0  # bytes fed so far
        self._value = bytearray()  # the unfinished value, from its first byte
        self._state = _TOP
        self._open = bytearray()  # the containers it is in: ord("{") or ord("[")
        self._key = False  # the string being read is an object's key
        self._rest = b""  # the rest of a literal being read
        self._hex = 0  # hex digits still due in a \u escape
        self.error: ControlMessageError | None = None
        self.examined = 0

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
        end, broken = len(data), None
        ascii_only = data.isascii() and not self._utf8.getstate()[0]
        if not ascii_only:
            end, broken = self._check_utf8(data)
        pos = self._whole_objects(data, out) if ascii_only and self._state == _TOP else 0
        self._scan(data, pos, end, out)
        if broken is not None:
            raise ControlMessageError(broken)
        self._offset += len(data)

    def _check_utf8(self, data: bytes) -> tuple[int, str | None]:
        """(where the scan must stop, why) for the first byte that breaks UTF-8, if any."""
        pending = len(self._utf8.getstate()[0])
        self.examined += len(data)
        try:
            self._utf8.decode(data)
            return len(data), None
        except UnicodeDecodeError as e:
            seen = e.object
            # which byte showed the error: e.end if the bytes before it could
            # still begin a character ("invalid continuation"), else the one before
            try:
                codecs.getincrementaldecoder("utf-8")().decode(seen[: e.end])
                culprit = e.end
            except UnicodeDecodeError:
                culprit = e.end - 1
            start = self._offset - pending + e.start  # positions count from the first byte fed
            if e.end - e.start == 1:
                what = f"byte 0x{seen[e.start]:02x} in position {start}"
            else:
                what = f"bytes in position {start}-{start + e.end - e.start - 1}"
            why = f"control stream is not UTF-8: 'utf-8' codec can't decode {what}: {e.reason}"
            return culprit - pending, why

    def _whole_objects(self, data: bytes, out: list[ControlMessage]) -> int:
        """Decodes the complete, small objects at the start of ``data`` in one go.

        The common case (whole messages in one piece) needs no byte-by-byte
        scan; anything else is left to ``_scan`` from the returned position.
        """
        text = data.decode("ascii")
        pos = 0
        while True:
            start, pos = pos, _SPACE.match(data, pos).end()
            self.examined += pos - start
            if pos == len(data) or data[pos] != 0x7B:  # {
                return pos
            try:
                obj, end = self._decoder.raw_decode(text, pos)
            except (ValueError, RecursionError):
                self.examined += len(data) - pos
                return pos
            self.examined += end - pos
            # a longer one could be nested too deeply, or be too long: let _scan judge
            if end - pos > min(2 * MAX_NESTING + 1, self._max + 1):
                return pos
            out.append(ControlMessage.from_json(obj))
            pos = end

    def _scan(self, data: bytes, pos: int, end: int, out: list[ControlMessage]) -> None:
        while pos < end:
            if self._state == _TOP:
                start = pos
                pos = _SPACE.match(data, pos, end).end()
                self.examined += pos - start
                if pos == end:
                    return
            first = pos  # this value's bytes in this piece start here
            # an unfinished value may hold at most max + 1 bytes
            stop = min(end, pos + self._max + 1 - len(self._value))
            pos, outcome = self._step(data, pos, stop)
            self.examined += pos - first
            if outcome == _ENDED:
                raw = bytes(self._value) + data[first:pos]
                self._value = bytearray()
                out.append(self._decode(raw))
            elif outcome == _BAD:
                self._bad(bytes(self._value) + data[first : pos + 1])
            else:
                self._value += data[first:pos]
                if len(self._value) > self._max:
                    raise ControlMessageError(f"control message longer than {self._max} bytes")

    def _step(self, data: bytes, pos: int, stop: int) -> tuple[int, int]:
        """Scans ``data[pos:stop]``: (where it stopped, _RAN_OUT, _ENDED or _BAD).

        _ENDED: a top-level value ends just before the returned position;
        _BAD: the byte at the returned position cannot continue the JSON text.
        """
        state = self._state
        nest = self._open
        while pos < stop:
            c = data[pos]
            ended = False
            if state == _STRING:
                pos = _STRING_RUN.match(data, pos, stop).end()
                if pos == stop:
                    break
                c = data[pos]
                if c == 0x22:  # "
                    pos += 1
                    if self._key:
                        state = _COLON
                        continue
                    ended = True
                elif c == 0x5C:  # backslash
                    state = _ESCAPE
                    pos += 1
                    continue
                else:  # a control character
                    return self._bad_byte(state, pos)
            elif state == _ESCAPE:
                if c == 0x75:  # u
                    state, self._hex = _HEX, 4
                elif c in _ESCAPES:
                    state = _STRING
                else:
                    return self._bad_byte(state, pos)
                pos += 1
                continue
            elif state == _HEX:
                if c not in _HEX_DIGITS:
                    return self._bad_byte(state, pos)
                self._hex -= 1
                if not self._hex:
                    state = _STRING
                pos += 1
                continue
            elif state in _NUMBER_END:  # digits so far: more, or the number may end here
                if state != _ZERO:
                    pos = _DIGITS.match(data, pos, stop).end()
                    if pos == stop:
                        break
                    c = data[pos]
                if c == 0x2E and state in (_ZERO, _INT):  # .
                    state = _DOT
                elif c in b"eE" and state != _EXP_DIGITS:
                    state = _EXP
                else:
                    ended = True  # not part of the number: looked at again below
                if not ended:
                    pos += 1
                    continue
            elif state in _NUMBER_NEXT:  # -, ., e or e+: a digit must follow
                if state == _MINUS and c == 0x49:  # -Infinity
                    state, self._rest = _LITERAL, b"nfinity"
                elif c in b"0123456789":
                    state = _NUMBER_NEXT[state] if c != 0x30 or state != _MINUS else _ZERO
                elif state == _EXP and c in b"+-":
                    state = _EXP_SIGN
                else:
                    return self._bad_byte(state, pos)
                pos += 1
                continue
            elif state == _LITERAL:
                if c != self._rest[0]:
                    return self._bad_byte(state, pos)
                self._rest = self._rest[1:]
                pos += 1
                if self._rest:
                    continue
                ended = True
            elif c in b" \t\r\n":
                pos = _SPACE.match(data, pos, stop).end()
                continue
            elif state == _COLON:
                if c != 0x3A:  # :
                    return self._bad_byte(state, pos)
                state = _VALUE
                pos += 1
                continue
            elif state == _AFTER:  # , or the closing bracket
                if c == 0x2C:
                    state = _KEY if nest[-1] == 0x7B else _VALUE
                    pos += 1
                    continue
                if c != nest[-1] + 2:  # { + 2 is }, [ + 2 is ]
                    return self._bad_byte(state, pos)
                nest.pop()
                pos += 1
                ended = True
            elif state in (_FIRST_KEY, _KEY):
                if c == 0x22:
                    state, self._key = _STRING, True
                    pos += 1
                    continue
                if c != 0x7D or state != _FIRST_KEY:
                    return self._bad_byte(state, pos)
                nest.pop()
                pos += 1
                ended = True
            elif state == _FIRST_ITEM and c == 0x5D:  # ]
                nest.pop()
                pos += 1
                ended = True
            else:  # _TOP, _VALUE, _FIRST_ITEM: a value begins
                if c in b"{[":
                    if len(nest) == MAX_NESTING:
                        raise ControlMessageError(
                            f"invalid control message: nested more than {MAX_NESTING} deep"
                        )
                    nest.append(c)
                    state = _FIRST_KEY if c == 0x7B else _FIRST_ITEM
                elif c == 0x22:
                    state, self._key = _STRING, False
                elif c in _STARTS:
                    state = _STARTS[c]
                elif c in _LITERALS:
                    state, self._rest = _LITERAL, _LITERALS[c]
                else:
                    return self._bad_byte(state, pos)
                pos += 1
                continue
            # a value ended (pos is just past it)
            if not nest:
                self._state = _TOP
                return pos, _ENDED
            state = _AFTER
        self._state = state
        return pos, _RAN_OUT

    def _bad_byte(self, state: int, pos: int) -> tuple[int, int]:
        self._state = state
        return pos, _BAD

    def _decode(self, raw: bytes) -> ControlMessage:
        """The message in the complete value ``raw``."""
        try:
            obj, _ = self._decoder.raw_decode(raw.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ControlMessageError(f"invalid control message: {e.msg}") from None
        except (RecursionError, ValueError) as e:
            raise ControlMessageError(f"invalid control message: {e}") from None
        self.examined += len(raw)
        return ControlMessage.from_json(obj)

    def _bad(self, raw: bytes) -> None:
        """Raises the error for ``raw``, a value cut off at its first bad byte.

        json says what is wrong, as it would for the whole input.
        """
        self.examined += len(raw)
        try:
            obj, _ = self._decoder.raw_decode(raw.decode("utf-8", "replace"))
        except json.JSONDecodeError as e:
            raise ControlMessageError(f"invalid control message: {e.msg}") from None
        except (RecursionError, ValueError) as e:
            raise ControlMessageError(f"invalid control message: {e}") from None
        ControlMessage.from_json(obj)  # a number cut short ("1.x" is 1): not an object
        raise ControlMessageError(f"invalid control message: unexpected {raw[-1:]!r}")


#: deeper nesting is an error (Python's json could not decode it anyway)
MAX_NESTING = 512

# what the scanner expects next
_TOP = 0  # a top-level value, or whitespace
_VALUE = 1  # a value (after : or a , in an array)
_FIRST_ITEM = 2  # a value or ]
_FIRST_KEY = 3  # a key or }
_KEY = 4  # a key (after a , in an object)
_COLON = 5
_AFTER = 6  # , or the closing bracket
_STRING = 7
_ESCAPE = 8
_HEX = 9
_LITERAL = 10  # the rest of true, false, null, NaN, Infinity
_MINUS = 11  # a digit, or Infinity
_DOT = 12  # a fraction's first digit
_EXP = 13  # + - or an exponent's first digit
_EXP_SIGN = 14  # an exponent's first digit
_ZERO = 15  # a number that is 0 or -0 so far
_INT = 16  # an integer part's digits so far
_FRAC = 17
_EXP_DIGITS = 18

#: states where a number may end, and the state a digit leads to from the others
_NUMBER_END = frozenset({_ZERO, _INT, _FRAC, _EXP_DIGITS})
_NUMBER_NEXT = {_MINUS: _INT, _DOT: _FRAC, _EXP: _EXP_DIGITS, _EXP_SIGN: _EXP_DIGITS}
_STARTS = {0x2D: _MINUS, 0x30: _ZERO, **{c: _INT for c in b"123456789"}}
#: json accepts NaN and Infinity too (Python's extension), so the scanner does
_LITERALS = {ord(w[0]): w[1:].encode() for w in ("true", "false", "null", "NaN", "Infinity")}
_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_SPACE = re.compile(rb"[ \t\r\n]*")
_STRING_RUN = re.compile(rb'[^"\\\x00-\x1f]*')
_DIGITS = re.compile(rb"[0-9]*")

# outcomes of MessageDecoder._step
_RAN_OUT = 0
_ENDED = 1
_BAD = 2
