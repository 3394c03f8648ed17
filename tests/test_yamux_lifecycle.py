"""The stream's lifecycle machine (stream.py's table), row by row.

Each test drives one path through the phases with frames and protocol
calls, and checks the phase, the public StreamState derived from it, and
what the protocol is told.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from tunnel.yamux import Phase, StreamState, YamuxConfig
from tunnel.yamux.errors import UnexpectedFin
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_SYN,
    GOAWAY_PROTOCOL_ERROR,
    TYPE_GO_AWAY,
    TYPE_WINDOW_UPDATE,
)

from .helpers import Wire, data_frame, frame


@implementer(IHalfCloseableProtocol)
class Half(Protocol):
    def __init__(self) -> None:
        self.events: list = []

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data, self.transport.phase))

    def readConnectionLost(self) -> None:
        self.events.append(("read_lost", self.transport.phase))

    def writeConnectionLost(self) -> None:
        self.events.append(("write_lost", self.transport.phase))

    def connectionLost(self, reason) -> None:
        self.events.append(("lost", type(reason.value).__name__, self.transport.phase))


def accepted(w: Wire, sid: int = 1):
    proto = Half()
    w.session.set_stream_handler(lambda s: s.attach(proto))
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0))
    w.sent()
    return w.session.streams[sid], proto


def fin(sid: int = 1) -> bytes:
    return frame(TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0)


def wire(is_client: bool = False) -> Wire:
    return Wire(is_client, config=YamuxConfig(enable_keepalive=False))


def test_we_fin_first_then_the_peer_while_paused_drains_before_the_end():
    """OPEN -> WRITE_CLOSED -> DRAINING -> CLOSING -> CLOSED."""
    w = wire()
    stream, proto = accepted(w)
    stream.loseWriteConnection()
    assert stream.phase is Phase.WRITE_CLOSED and stream.state is StreamState.LOCAL_CLOSE
    stream.pauseProducing()
    w.feed(data_frame(1, b"late") + fin())
    assert stream.phase is Phase.DRAINING and stream.state is StreamState.CLOSED
    assert 1 in w.session.streams  # not over: the data and the EOF are still owed
    stream.resumeProducing()
    assert proto.events == [
        ("write_lost", Phase.WRITE_CLOSED),
        ("data", b"late", Phase.DRAINING),
        ("read_lost", Phase.CLOSING),
        ("lost", "ConnectionDone", Phase.CLOSED),
    ]
    assert w.session.streams == {}
    w.lose()


def test_lose_connection_lingers_until_the_peer_fin():
    """OPEN -> WRITE_CLOSED -> LINGERING -> CLOSING -> CLOSED."""
    w = wire()
    stream, proto = accepted(w)
    stream.loseConnection()
    assert stream.phase is Phase.LINGERING and stream.state is StreamState.LOCAL_CLOSE
    assert proto.events == [("lost", "ConnectionDone", Phase.LINGERING)]
    assert stream.disconnecting and not stream.connected
    w.feed(data_frame(1, b"dropped") + fin())
    assert stream.phase is Phase.CLOSED and not stream.disconnecting
    assert len(proto.events) == 1  # nothing after connectionLost
    w.lose()


def test_the_peer_fins_first_then_we_do():
    """OPEN -> READ_CLOSING -> READ_CLOSED -> CLOSING -> CLOSED."""
    w = wire()
    stream, proto = accepted(w)
    w.feed(fin())
    assert stream.phase is Phase.READ_CLOSED and stream.state is StreamState.REMOTE_CLOSE
    stream.write(b"reply")
    stream.loseWriteConnection()
    assert proto.events == [
        ("read_lost", Phase.READ_CLOSED),
        ("write_lost", Phase.CLOSING),
        ("lost", "ConnectionDone", Phase.CLOSED),
    ]
    w.lose()


def test_peer_fin_waits_behind_buffered_data_while_we_fin():
    """OPEN -> READ_CLOSING -> DRAINING -> CLOSING -> CLOSED."""
    w = wire()
    stream, proto = accepted(w)
    stream.pauseProducing()
    w.feed(data_frame(1, b"queued") + fin())
    assert stream.phase is Phase.READ_CLOSING and stream.state is StreamState.REMOTE_CLOSE
    stream.loseWriteConnection()
    assert stream.phase is Phase.DRAINING
    stream.resumeProducing()
    assert [e[0] for e in proto.events] == ["write_lost", "data", "read_lost", "lost"]
    assert stream.phase is Phase.CLOSED
    w.lose()


def test_fin_before_ack_lingers_and_the_ack_starts_the_close_timer():
    """SYN_SENT is OPEN awaiting the ACK; the ACK may come after our FIN."""
    w = Wire(True, config=YamuxConfig(enable_keepalive=False, stream_open_timeout=None))
    stream = w.session.open_stream()
    assert stream.phase is Phase.OPEN and stream.state is StreamState.SYN_SENT
    stream.loseConnection()
    assert stream.phase is Phase.LINGERING and w.clock.getDelayedCalls() == []
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, stream.id, 0))
    assert stream.phase is Phase.LINGERING and len(w.clock.getDelayedCalls()) == 1
    w.feed(fin(stream.id))
    assert stream.phase is Phase.CLOSED and w.clock.getDelayedCalls() == []
    w.lose()


def test_a_second_fin_is_rejected_at_the_header_before_its_credit_is_used():
    """Go's order: the flags are checked before the window grows.  The credit
    here would have let our queued data and FIN out, ending the stream before
    its FIN was looked at."""
    w = wire()
    stream = w.session.open_stream()
    stream.attach(Protocol())  # not half-closeable: the peer's FIN closes our side
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, stream.id, 0))
    stream.write(b"x" * (256 * 1024 + 10))
    w.feed(fin(stream.id))
    assert stream.phase is Phase.READ_CLOSED and stream.buffered[0] == 10
    w.sent()
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_FIN, stream.id, 10))
    assert [(h.type, h.length) for h, _ in w.sent()] == [(TYPE_GO_AWAY, GOAWAY_PROTOCOL_ERROR)]
    w.lose()
    assert isinstance(w.session.close_reason, UnexpectedFin)


def test_traffic_counters_count_data_payloads_each_way():
    w = wire()
    stream, proto = accepted(w)
    w.feed(data_frame(1, b"hello") + data_frame(1, b"!"))
    stream.write(b"answer")
    w.sent()
    # control frames (the SYN, its ACK, window updates) are not traffic
    assert (w.session.bytes_received, w.session.bytes_sent) == (6, 6)
