"""TCP transports whose writes leave in the same reactor turn.

Twisted's TCP transport (``abstract.FileDescriptor.write``) only buffers:
the bytes leave on a later reactor turn, once epoll says the socket is
writable, and each write registers for writability and unregisters after
(two ``epoll_ctl`` calls).  A request through the tunnel crosses four
connections each way, so that is a reactor turn and two system calls per
crossing, and most of the latency of a small request.

``write_through(transport)`` makes a connection send at once what it is
given while nothing waits in its buffer, and buffer (and wait for
writability) only what the kernel did not take, exactly as before.  Order
is kept (nothing is sent past buffered bytes), producers are paused on the
same rule (the buffer's size), and a connection that is closing, aborted,
half closed, under ``startTLS``, or feeding a pull producer keeps Twisted's
path.  Under TLS the TCP connection below the TLS layer writes through.
A send that fails leaves the bytes buffered, so the reactor meets
the error on its next turn and closes the connection as it always does.

Small writes that leave at once must not wait for Nagle's algorithm, so
the connection also gets ``TCP_NODELAY`` (as Go sets on every TCP
connection).

This subclasses Twisted's own TCP classes and reads the buffer state
``abstract.FileDescriptor`` keeps (``dataBuffer``, ``offset``,
``_tempDataLen``, ``_writeDisconnecting``, and ``tcp.Connection``'s
``_aborting``); tests/test_writethrough.py
fails loudly if a Twisted release renames them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol

#: a sequence up to this size is joined and sent in one piece; a larger one
#: (a frame header and its payload) is gathered by sendmsg without a copy
_JOIN_LIMIT = 16 * 1024


class WriteThroughMixin:
    """Over a ``tcp.Connection`` class: send at once when nothing is buffered."""

    def write(self, data: bytes) -> None:
        if data and isinstance(data, bytes) and self._can_send_now():
            sent = self._send_now((data,))
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if not self._can_send_now():
            super().writeSequence(iovec)  # type: ignore[misc]
            return
        chunks = list(iovec)
        if sum(map(len, chunks)) <= _JOIN_LIMIT:
            # a head in pieces: one join is cheaper than a gather
            self.write(b"".join(chunks))
            return
        sent = self._send_now(chunks)
        rest = _skip(chunks, sent) if sent else chunks
        if rest:
            super().writeSequence(rest)  # type: ignore[misc]

    def _can_send_now(self) -> bool:
        """True when bytes written now would be the next to leave."""
        this: Any = self
        if not this.connected or this.disconnecting or this.TLS:
            return False
        if this._writeDisconnecting or this._writeDisconnected or this._aborting:
            return False
        if this.producer is not None and not this.streamingProducer:
            # a pull producer is asked for more when the buffer drains
            return False
        return this._tempDataLen == 0 and this.offset == len(this.dataBuffer)

    def _send_now(self, chunks: list[bytes] | tuple[bytes, ...]) -> int:
        """Hand ``chunks`` to the kernel; how many bytes it took (0 on any error)."""
        try:
            if len(chunks) == 1:
                return self.socket.send(chunks[0])  # type: ignore[attr-defined]
            return self.socket.sendmsg(chunks)  # type: ignore[attr-defined]
        except OSError:
            # a full kernel buffer, or an error: the bytes stay buffered and
            # the reactor's doWrite sends them or meets the error and closes
            # the connection on its usual path
            return 0


def _skip(chunks: list[bytes], count: int) -> list[bytes]:
    """``chunks`` without their first ``count`` bytes."""
    for i, chunk in enumerate(chunks):
        if count < len(chunk):
            rest = chunks[i:]
            if count:
                rest[0] = chunk[count:]
            return rest
        count -= len(chunk)
    return []


_classes: dict[type, type] = {}


def _write_through_class(base: type) -> type:
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = type(
            f"WriteThrough{base.__name__}",
            (WriteThroughMixin, base),
            {"__module__": __name__, "__doc__": f"A {base.__name__} whose writes leave at once."},
        )
    return cls


def write_through(transport: Any) -> bool:
    """Let a Twisted TCP transport send its writes at once (and set TCP_NODELAY).

    Under TLS (an endpoint's ``TLSMemoryBIOProtocol``) the TCP connection
    below carries the records; anything else (in-memory test transports, a
    yamux stream) is left alone.  Returns whether the transport now writes
    through.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        return write_through(transport.transport)
    base = type(transport)
    if issubclass(base, WriteThroughMixin):
        return True
    if not issubclass(base, tcp.Connection):
        return False
    transport.setTcpNoDelay(True)
    transport.__class__ = _write_through_class(base)
    return True
