"""Tunables of a yamux session; the defaults match hashicorp/yamux.

``LARGE_WINDOWS`` is the variant for tunnel sessions: 1 MiB stream windows
(a single download no longer waits for credit every 256 KiB on a fast link),
with at most 16 MiB of extra window per session.
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
    #: window beyond the initial 256 KiB that the streams of one session may
    #: hold together (None: no bound).  A stream opened while it is spent gets
    #: the initial 256 KiB window, so what a session can be made to buffer is
    #: at most 256 KiB per stream plus this.
    receive_budget: int | None = None
    #: seconds to wait for the ACK of a stream we opened (None: forever).
    stream_open_timeout: float | None = 75.0
    #: seconds to wait for the peer's FIN after a full local close (None: forever).
    stream_close_timeout: float | None = 300.0
    #: largest Data body we send in one frame, so streams interleave.
    max_frame_size: int = 64 * 1024
    #: bytes a stream may queue before its producer is paused.
    write_buffer_size: int = 64 * 1024
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
        if self.receive_budget is not None and self.receive_budget < 0:
            raise ValueError("receive_budget must not be negative")
        for name in ("accept_backlog", "max_streams", "max_pending_opens", "max_pings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_frame_size < 1024:
            raise ValueError("max_frame_size must be at least 1024")
        if self.write_buffer_size < 1:
            raise ValueError("write_buffer_size must be positive")
        if self.keepalive_interval <= 0 or self.keepalive_timeout <= 0:
            raise ValueError("keepalive_interval and keepalive_timeout must be positive")


#: tunnel sessions: larger receive windows within a per-session budget
LARGE_WINDOWS = YamuxConfig(max_stream_window=1024 * 1024, receive_budget=16 * 1024 * 1024)
