"""How much a Twisted TCP transport reads and sends at once.

Twisted's TCP transports read at most ``bufferSize`` (64 KiB) per readiness
event, pause their producer once more than ``bufferSize`` waits to be
sent, and hand the kernel at most ``SEND_LIMIT`` (128 KiB) per send.  Every
read and send costs the same Python work (the reactor's dispatch, the
protocol's callbacks, a frame header) whatever its size, so a connection
that carries bulk data spends less CPU per MiB in larger pieces.  Memory
stays bounded by whoever limits what is in flight (yamux windows, a
producer's pause), not by these sizes.
"""

from __future__ import annotations

from typing import Any


def size_transport(transport: Any, read_size: int | None, send_size: int | None) -> None:
    """Set a TCP transport's read size (and write-pause threshold) and largest send.

    Transports that are not Twisted file descriptors (TLS, in-memory test
    transports, a yamux stream) have no such sizes and are left alone;
    None leaves a size at Twisted's default.
    """
    if not isinstance(getattr(transport, "bufferSize", None), int):
        return
    if not isinstance(getattr(transport, "SEND_LIMIT", None), int):
        return
    if read_size is not None:
        transport.bufferSize = read_size
    if send_size is not None:
        transport.SEND_LIMIT = send_size
