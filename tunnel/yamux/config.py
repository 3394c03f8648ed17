"""Tunables of a yamux session; the defaults match hashicorp/yamux.

``LARGE_WINDOWS`` is the variant for tunnel sessions:

* stream windows that start at yamux's 256 KiB and grow to 4 MiB on a
  stream that carries bulk data (a download no longer waits for credit every
  few hundred KiB, which on two busy cores costs it a scheduling round each
  time), with at most 16 MiB of extra window per session;
* bulk data moved in 256 KiB pieces (frames, socket reads) rather than
  Twisted's 64 KiB: each piece costs the same Python work whatever its size,
  so fewer pieces per MiB is less CPU per MiB (``bench/path.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .frame import INITIAL_WINDOW, MAX_WINDOW


@dataclass(frozen=True)
class YamuxConfig:
    """Limits and timers of one session.

    Every quantity a peer can make us hold is bounded here: streams
    (``max_streams``), streams not yet accepted (``accept_backlog``), our own
    opens awaiting an ACK (``max_pending_opens``), bytes per stream (the
    receive window), control frames queued behind a peer that does not read
    (``max_control_backlog``) and outstanding pings (``max_pings``).
    """

    #: streams the peer may open that no handler has taken yet; more are RST.
    accept_backlog: int = 256
    #: concurrently open streams (both directions); further SYNs are RST.
    max_streams: int = 65536
    #: our own SYNs that may await an ACK at once.
    max_pending_opens: int = 256
    enable_keepalive: bool = True
    #: seconds between keepalive pings.
    keepalive_interval: float = 30.0
    #: seconds to wait for a ping reply before dropping the session.
    keepalive_timeout: float = 10.0
    #: receive window we grant per stream (>= 256 KiB; larger windows are
    #: announced to the peer with the SYN/ACK delta, which Go's sender honours;
    #: Go's MaxStreamWindowSize).
    max_stream_window: int = INITIAL_WINDOW
    #: a stream's receive window may grow up to this (None: it keeps the
    #: window it opened with, as Go's does): each time the peer has sent a
    #: whole window's worth since the window last grew, the next credit
    #: doubles it, within ``receive_budget``.  Only streams that carry bulk
    #: data grow, so a session's budget is not held by streams that carry small
    #: responses (or wait in a keep-alive pool).  Growth travels as extra
    #: WindowUpdate credit, which Go's sender honours.
    max_grown_window: int | None = None
    #: window beyond the initial 256 KiB that the streams of one session may
    #: hold together (None: no bound).  A stream opened while it is spent gets
    #: the initial 256 KiB window, and a window grows only while it lasts, so
    #: what a session can be made to buffer is at most 256 KiB per stream plus
    #: this.
    receive_budget: int | None = None
    #: seconds to wait for the ACK of a stream we opened (None: forever).
    stream_open_timeout: float | None = 75.0
    #: seconds to wait for the peer's FIN after a full local close (None: forever).
    stream_close_timeout: float | None = 300.0
    #: largest Data body we send in one frame, so streams interleave.
    max_frame_size: int = 64 * 1024
    #: bytes a stream may queue before its producer is paused.
    write_buffer_size: int = 64 * 1024
    #: bytes the session's TCP transport reads at once, which is also what it
    #: buffers before it pauses the session (Twisted's ``bufferSize``); None
    #: keeps the transport's default (64 KiB).  Memory stays bounded by the
    #: windows and by ``max_control_backlog`` whatever this is.
    read_size: int | None = None
    #: the most the session's TCP transport hands the kernel in one send
    #: (Twisted's ``SEND_LIMIT``); None keeps its default (128 KiB).
    send_size: int | None = None
    #: bytes of control frames that may pile up while the socket is blocked.
    max_control_backlog: int = 256 * 1024
    #: outstanding pings (keepalive included).
    max_pings: int = 64
    #: seconds an orderly close may wait for the socket to flush before aborting.
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not INITIAL_WINDOW <= self.max_stream_window <= MAX_WINDOW:
            raise ValueError(
                f"max_stream_window must be within [{INITIAL_WINDOW}, {MAX_WINDOW}],"
                f" got {self.max_stream_window}"
            )
        grown = self.max_grown_window
        if grown is not None and not self.max_stream_window <= grown <= MAX_WINDOW:
            raise ValueError(
                f"max_grown_window must be None or within [max_stream_window, {MAX_WINDOW}],"
                f" got {grown}"
            )
        if self.receive_budget is not None and self.receive_budget < 0:
            raise ValueError("receive_budget must not be negative")
        for name in ("accept_backlog", "max_streams", "max_pending_opens", "max_pings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_frame_size < 1024:
            raise ValueError("max_frame_size must be at least 1024")
        if self.write_buffer_size < 1:
            raise ValueError("write_buffer_size must be positive")
        for name in ("read_size", "send_size"):
            value = getattr(self, name)
            if value is not None and value < 1024:
                raise ValueError(f"{name} must be None or at least 1024")
        if self.keepalive_interval <= 0 or self.keepalive_timeout <= 0:
            raise ValueError("keepalive_interval and keepalive_timeout must be positive")


#: tunnel sessions: receive windows that grow to 4 MiB within a per-session
#: budget, and bulk data in 256 KiB frames and socket reads (sends of up to
#: two of them)
LARGE_WINDOWS = YamuxConfig(
    max_stream_window=INITIAL_WINDOW,
    max_grown_window=4 * 1024 * 1024,
    receive_budget=16 * 1024 * 1024,
    max_frame_size=256 * 1024,
    read_size=256 * 1024,
    send_size=512 * 1024,
)
