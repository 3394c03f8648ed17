"""The byte formats of the node-to-node cluster link (pure parsing, no I/O).

A node that holds a tunnel's client serves public requests for it that land
on other nodes: they reach it over one authenticated yamux connection per
pair of nodes (``tunnel.server.clusterlink``).  Every integer is big-endian.

Handshake (on a fresh TCP or TLS connection, before yamux)
----------------------------------------------------------
Both sides send a HELLO at once, without waiting for the other's::

    HELLO = MAGIC (8 bytes: b"TNLCLSTR") || VERSION (1 byte: 1)
            || NONCE (32 random bytes) || NAME_LEN (1 byte, 1..64) || NAME

NAME is the node's name, ``[A-Za-z0-9._-]{1,64}`` in ASCII.  Once the
dialer has the listener's HELLO it sends its PROOF, 32 bytes; the listener
sends its own only after it has checked the dialer's (so whoever connects
gets no MAC over values it knows, to test guesses of the secret on)::

    PROOF = HMAC-SHA256(secret, DOMAIN || ROLE || own NONCE || peer NONCE
                        || own NAME_LEN || own NAME || peer NAME_LEN || peer NAME)

with DOMAIN = b"tunnel cluster link v1\\0" and ROLE = b"D" from the side that
dialed, b"L" from the side that listened, so a proof reflected back at its
sender never verifies.  Each side checks the peer's PROOF (as computed with
the peer's role) with ``hmac.compare_digest``; the secret never crosses the
wire.  A side that has verified the PROOF (the listener: and sent its own)
starts yamux at once: the bytes after the PROOF are yamux frames (the
dialer is the yamux client).  Wrong
magic, version, name or proof: the connection is closed, nothing is said.

Requests (one per yamux stream; either node may open streams)
--------------------------------------------------------------
The opener writes a fixed 36-byte REQUEST and nothing more until it has the
reply::

    REQUEST = OP (1 byte: OPEN=1, PROBE=2) || DIGEST (32 bytes: the tunnel's
              TunnelKey, the SHA-256 of its identifier)
              || PROTOCOL (1 byte: koding TransportProtocol HTTP=1, TCP=2,
                 WS=3; 0 for PROBE) || PORT (u16; 0 for PROBE)

The answerer replies with ONE status byte:

    OPEN:  OK=0x00 (the stream now carries the client's local connection,
           byte for byte, both ways), NO_CLIENT=0x01, TIMEOUT=0x02,
           TOO_MANY_PENDING=0x03, SHUTTING_DOWN=0x04, BAD_REQUEST=0x05
    PROBE: ALIVE=0x10, GONE=0x11 (then the stream closes); also
           SHUTTING_DOWN or BAD_REQUEST

After a status other than OK the stream closes (BAD_REQUEST: reset).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

from ..koding.identifiers import TunnelKey
from ..koding.wire import TransportProtocol

MAGIC = b"TNLCLSTR"
VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32
MAX_NAME = 64
DOMAIN = b"tunnel cluster link v1\x00"
#: everything of a HELLO before the name
HELLO_FIXED = len(MAGIC) + 1 + NONCE_SIZE + 1
#: the most a handshake may send before its PROOF is complete
MAX_HANDSHAKE = HELLO_FIXED + MAX_NAME + PROOF_SIZE

_NAME = re.compile(rb"[A-Za-z0-9._-]{1,64}\Z")


class Role(enum.Enum):
    """Which side of the TCP connection a node is (part of its PROOF)."""

    DIALER = b"D"
    LISTENER = b"L"

    @property
    def other(self) -> Role:
        return Role.LISTENER if self is Role.DIALER else Role.DIALER


class HandshakeError(ValueError):
    """The peer's handshake is not one we accept (the message is safe to log)."""


def check_name(name: str) -> bytes:
    """A node name as it goes on the wire; ValueError if it is not 1..64 of [A-Za-z0-9._-]."""
    raw = name.encode("ascii", "replace")
    if not _NAME.match(raw):
        raise ValueError(f"a node name is 1..{MAX_NAME} of [A-Za-z0-9._-], not {name!r}")
    return raw


def encode_hello(nonce: bytes, name: str) -> bytes:
    raw = check_name(name)
    if len(nonce) != NONCE_SIZE:
        raise ValueError("the nonce is 32 bytes")
    return MAGIC + bytes((VERSION,)) + nonce + bytes((len(raw),)) + raw


@dataclass(frozen=True)
class Hello:
    nonce: bytes
    name: str


def parse_hello(data: bytes) -> tuple[Hello, int] | None:
    """The HELLO at the start of ``data`` and its length, or None if more is
    needed; HandshakeError as soon as what is there cannot be a HELLO."""
    head = data[: len(MAGIC)]
    if head != MAGIC[: len(head)]:
        raise HandshakeError("not a cluster node (bad magic)")
    if len(data) > len(MAGIC) and data[len(MAGIC)] != VERSION:
        raise HandshakeError(f"unsupported cluster link version {data[len(MAGIC)]}")
    if len(data) < HELLO_FIXED:
        return None
    size = data[HELLO_FIXED - 1]
    if not 1 <= size <= MAX_NAME:
        raise HandshakeError(f"bad node name length {size}")
    end = HELLO_FIXED + size
    if len(data) < end:
        return None
    raw = data[HELLO_FIXED:end]
    if not _NAME.match(raw):
        raise HandshakeError("bad node name")
    nonce = data[len(MAGIC) + 1 : HELLO_FIXED - 1]
    return Hello(nonce, raw.decode("ascii")), end


def proof(
    secret: bytes, role: Role, own_nonce: bytes, peer_nonce: bytes, own_name: str, peer_name: str
) -> bytes:
    """The PROOF that the side in ``role`` sends (see the module docstring)."""
    own, peer = check_name(own_name), check_name(peer_name)
    message = b"".join(
        (
            DOMAIN,
            role.value,
            own_nonce,
            peer_nonce,
            bytes((len(own),)),
            own,
            bytes((len(peer),)),
            peer,
        )
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


# -- requests ------------------------------------------------------------------


class Op(enum.IntEnum):
    OPEN = 1
    PROBE = 2


class Status(enum.IntEnum):
    OK = 0x00
    NO_CLIENT = 0x01
    TIMEOUT = 0x02
    TOO_MANY_PENDING = 0x03
    SHUTTING_DOWN = 0x04
    BAD_REQUEST = 0x05
    ALIVE = 0x10
    GONE = 0x11


_REQUEST = struct.Struct("!B32sBH")
REQUEST_SIZE = _REQUEST.size  # 36


class BadRequest(ValueError):
    """A REQUEST that is not valid (the message is safe to log)."""


@dataclass(frozen=True)
class Request:
    op: Op
    key: TunnelKey
    protocol: int = 0
    port: int = 0

    def encode(self) -> bytes:
        return _REQUEST.pack(self.op, self.key.digest, self.protocol, self.port)


def open_request(key: TunnelKey, protocol: int, port: int) -> Request:
    """An OPEN for ``key``; ValueError for a protocol or port out of range."""
    if int(protocol) not in TransportProtocol.__members__.values():
        raise ValueError(f"unknown transport protocol {protocol}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return Request(Op.OPEN, key, int(protocol), port)


def probe_request(key: TunnelKey) -> Request:
    return Request(Op.PROBE, key)


def parse_request(data: bytes) -> Request:
    """The REQUEST of exactly ``REQUEST_SIZE`` bytes; BadRequest if it is not valid."""
    if len(data) != REQUEST_SIZE:
        raise BadRequest(f"a request is {REQUEST_SIZE} bytes, not {len(data)}")
    op, digest, protocol, port = _REQUEST.unpack(data)
    key = TunnelKey(digest)
    if op == Op.OPEN:
        if protocol not in TransportProtocol.__members__.values():
            raise BadRequest(f"unknown transport protocol {protocol}")
        return Request(Op.OPEN, key, protocol, port)
    if op == Op.PROBE:
        if protocol or port:
            raise BadRequest("a probe carries no protocol or port")
        return Request(Op.PROBE, key)
    raise BadRequest(f"unknown op {op}")


def parse_status(value: int, op: Op) -> Status:
    """The reply byte to an ``op``; BadRequest if it is not one that op can get."""
    try:
        status = Status(value)
    except ValueError:
        raise BadRequest(f"unknown status {value:#x}") from None
    if status in (Status.SHUTTING_DOWN, Status.BAD_REQUEST):
        return status
    probe_reply = status in (Status.ALIVE, Status.GONE)
    if probe_reply != (op is Op.PROBE):
        raise BadRequest(f"status {status.name} is no reply to {op.name}")
    return status
