"""Errors of the yamux layer.

Protocol errors carry the GoAway code to send; stream-level failures are
``ConnectionLost`` subclasses so that ordinary Twisted protocols see them as
the reason in ``connectionLost``.
"""

from twisted.internet.error import ConnectionLost


class YamuxError(Exception):
    """Base class of the errors raised by this package."""


class ProtocolError(YamuxError):
    """The peer broke the yamux protocol; the session answers with GoAway."""

    code = 1  # frame.GOAWAY_PROTOCOL_ERROR


class InvalidVersion(ProtocolError):
    """A frame header carried a version other than 0."""


class InvalidType(ProtocolError):
    """A frame header carried a type other than Data, WindowUpdate, Ping, GoAway."""


class InvalidStreamId(ProtocolError):
    """A Data or WindowUpdate frame used stream 0."""


class DuplicateStream(ProtocolError):
    """A SYN named a stream id that is currently open."""


class WindowExceeded(ProtocolError):
    """A Data frame was larger than the receive window we granted."""


class UnexpectedFin(ProtocolError):
    """A second FIN arrived on a stream that had already been half-closed."""


class InternalError(YamuxError):
    """Something on our side failed; the session answers with GoAway(2)."""

    code = 2  # frame.GOAWAY_INTERNAL_ERROR


class SessionClosed(YamuxError):
    """The session is closed or closing; no stream can be opened."""


class RemoteGoAway(YamuxError):
    """The peer sent GoAway and accepts no new streams."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(f"the remote end sent GoAway (code {code})")
        self.code = code


class TooManyStreams(YamuxError):
    """A local limit (pending opens, open streams, stream ids) refused an open."""


class PingTimeout(YamuxError):
    """A ping was not answered in time."""


class StreamReset(ConnectionLost):
    """The peer aborted the stream with RST (or refused to accept it)."""


class StreamOpenTimeout(ConnectionLost):
    """The peer did not acknowledge our SYN in time; the stream was reset."""


class StreamCloseTimeout(ConnectionLost):
    """The peer did not answer our FIN in time; the stream was reset."""


class SessionLost(ConnectionLost):
    """The session ended while the stream was still open."""


class KeepAliveTimeout(ConnectionLost):
    """The peer stopped answering keepalive pings; the session was dropped."""
