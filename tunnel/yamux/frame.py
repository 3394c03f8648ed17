"""The yamux frame codec: 12-byte headers and an incremental parser.

The parser never buffers a Data body it is not going to deliver: the
receiver decides from the header alone (stream known? window large enough?)
and bodies for unknown streams are skipped byte-for-byte so framing stays in
step.  Bodies are handed on in the pieces they arrived in, so a 256 KiB frame
costs no reassembly copy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

from .errors import InvalidType, InvalidVersion

VERSION = 0

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
TYPE_NAMES = {
    TYPE_DATA: "Data",
    TYPE_WINDOW_UPDATE: "WindowUpdate",
    TYPE_PING: "Ping",
    TYPE_GO_AWAY: "GoAway",
}

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GOAWAY_NORMAL = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


_FLAG_NAMES = ((FLAG_SYN, "SYN"), (FLAG_ACK, "ACK"), (FLAG_FIN, "FIN"), (FLAG_RST, "RST"))


class Header(NamedTuple):
    version: int
    type: int
    flags: int
    stream_id: int
    length: int

    def __str__(self) -> str:
        names = [n for bit, n in _FLAG_NAMES if self.flags & bit]
        return (
            f"{TYPE_NAMES.get(self.type, self.type)}"
            f"[{'|'.join(names) or '-'}] sid={self.stream_id} len={self.length}"
        )


def encode(type: int, flags: int, stream_id: int, length: int) -> bytes:
    """Return the 12-byte header of one frame (version 0)."""
    return _pack(VERSION, type, flags, stream_id, length)


def decode(data: bytes) -> Header:
    """Decode exactly one 12-byte header, without validating it."""
    return Header(*_unpack_from(data))


class FrameReceiver(Protocol):
    """What a FrameParser drives (the session implements it)."""

    def dataHeaderReceived(self, header: Header) -> Callable[[bytes], None] | None:
        """A Data header arrived: return a sink for its body, or None to skip it.

        May raise ProtocolError (for example when the length exceeds the window).
        """

    def dataFrameEnded(self, header: Header) -> None:
        """The whole body of a Data frame was delivered or skipped."""

    def controlFrameReceived(self, header: Header) -> None:
        """A WindowUpdate, Ping or GoAway frame arrived."""


class FrameParser:
    """Incremental yamux parser: feed it bytes, it drives a FrameReceiver.

    Raises a ProtocolError subclass for a header with a bad version or type, or
    whatever the receiver raises; after an error (or ``stop()``) it ignores all
    further input.
    """

    __slots__ = ("_receiver", "_partial", "_header", "_remaining", "_sink", "_stopped")

    def __init__(self, receiver: FrameReceiver) -> None:
        self._receiver = receiver
        self._partial = b""
        self._header: Header | None = None
        self._remaining = 0
        self._sink: Callable[[bytes], None] | None = None
        self._stopped = False

    def stop(self) -> None:
        """Ignore every byte from now on."""
        self._stopped = True

    @property
    def idle(self) -> bool:
        """True between frames (no partial header or body pending)."""
        return not self._partial and self._header is None

    def feed(self, data: bytes) -> None:
        if self._stopped:
            return
        try:
            self._feed(data)
        except BaseException:
            self._stopped = True
            raise

    def _feed(self, data: bytes) -> None:
        receiver = self._receiver
        end = len(data)
        pos = 0
        while pos < end and not self._stopped:
            remaining = self._remaining
            if remaining:
                take = end - pos
                if take > remaining:
                    take = remaining
                sink = self._sink
                if sink is not None:
                    sink(data if take == end else data[pos : pos + take])
                pos += take
                self._remaining = remaining = remaining - take
                if not remaining:
                    header = self._header
                    self._header = self._sink = None
                    receiver.dataFrameEnded(header)
                continue
            if self._partial:
                need = HEADER_SIZE - len(self._partial)
                self._partial += data[pos : pos + need]
                pos += need
                if len(self._partial) < HEADER_SIZE:
                    return
                raw, offset = self._partial, 0
                self._partial = b""
            elif end - pos < HEADER_SIZE:
                self._partial = data[pos:]
                return
            else:
                raw, offset = data, pos
                pos += HEADER_SIZE
            header = Header(*_unpack_from(raw, offset))
            if header.version != VERSION:
                raise InvalidVersion(f"unsupported yamux version {header.version}")
            ftype = header.type
            if ftype == TYPE_DATA:
                sink = receiver.dataHeaderReceived(header)
                if header.length:
                    self._header = header
                    self._remaining = header.length
                    self._sink = sink
                else:
                    receiver.dataFrameEnded(header)
            elif ftype <= TYPE_GO_AWAY:
                receiver.controlFrameReceived(header)
            else:
                raise InvalidType(f"unknown yamux frame type {ftype}")
