"""A twisted.web Site for the public side, hardened against slow clients.

twisted.web restarts its idle timer on every byte, so a client trickling a
request head ("slowloris") holds a connection forever.  ``TunnelSite``
gives each request head a deadline (``head_timeout``, counted from the
connection's start or the end of the previous response) and keeps an idle
timeout on top.  Connections taken over (tunnel control, WebSocket) are
not affected: their heads are complete and no response ends on them.  It
also leaves out the per-request access log unless asked.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from ..timers import cancel
from .bodies import StreamingChannel, streaming_request


class HeadDeadlineChannel(HTTPChannel):
    """An HTTPChannel that drops clients too slow to send a request head."""

    head_timeout: float | None = 30.0
    _head_timer = None
    _log = Logger()

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        if self.head_timeout is not None and self.transport is not None:
            self._head_timer = self.callLater(self.head_timeout, self._too_slow)

    def _disarm(self) -> None:
        cancel(self._head_timer)
        self._head_timer = None

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request) -> None:
        self._arm()  # the next head (maybe pipelined, parsed just below) is due
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        self._log.info(
            "dropping {peer}: no complete request head within {t} s",
            peer=self.transport.getPeer(),
            t=self.head_timeout,
        )
        self.transport.abortConnection()


class TunnelChannel(StreamingChannel, HeadDeadlineChannel):
    """TunnelSite's channel: head deadline, and request bodies that stream."""


class TunnelSite(Site):
    """The Site to serve a TunnelResource (or a tree containing one) with.

    :param head_timeout: seconds a client has to send each request head.
    :param idle_timeout: seconds an idle connection is kept.
    :param access_log: None for no access log, ``"-"`` for the twistd log,
        or a file path.
    :param max_body: the largest request body in bytes (None: no limit, which
        is safe because bodies stream to the origin and are never stored).

    Its requests stream their bodies (``bodies.StreamingRequest`` is mixed into
    ``requestFactory``): ``render()`` runs once the head is in, and the
    forwarder sends the body on as it arrives.
    """

    def __init__(
        self,
        resource,
        *,
        head_timeout: float | None = 30.0,
        idle_timeout: float = 60.0,
        access_log: str | None = None,
        max_body: int | None = None,
        **kwargs,
    ) -> None:
        if access_log not in (None, "-"):
            kwargs["logPath"] = access_log
        super().__init__(resource, timeout=idle_timeout, **kwargs)
        self.requestFactory = streaming_request(self.requestFactory)
        self.head_timeout = head_timeout
        self.access_log = access_log
        self.max_body = max_body

    def protocol(self) -> HeadDeadlineChannel:
        channel = TunnelChannel()
        channel.head_timeout = self.head_timeout
        return channel

    def log(self, request) -> None:
        if self.access_log is not None:
            super().log(request)
