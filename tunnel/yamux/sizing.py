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


#: glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(
    trim_threshold: int = 16 * 1024 * 1024,
    mmap_threshold: int = 8 * 1024 * 1024,
    *,
    libc: Any = None,
) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it at once.

    For the programs (``twistd tunnel-server``, ``twistd tunnel-client``),
    not for a library to call: it is process-wide.  Every piece a transport
    reads or joins is a new bytes object; above 128 KiB glibc gives such
    blocks back to the kernel when they are freed (its heap top is trimmed
    past ``trim_threshold``, a block over ``mmap_threshold`` is mapped and
    unmapped), so the next piece faults its pages in again: with 512 KiB
    pieces that was 100-370 page faults per MiB relayed and a third more
    system time (``bench/path.py`` reports them).  With this, up to
    ``trim_threshold`` bytes of freed heap stay in the process (its RSS
    after a burst) for the next pieces.

    Returns True when glibc took both settings, False where there is no
    glibc (nothing to do: other allocators have their own policies).
    """
    if libc is None:
        import ctypes  # noqa: PLC0415
        import platform  # noqa: PLC0415

        if platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on error
    trimmed = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and trimmed
