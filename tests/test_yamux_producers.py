"""Producers on a stream: a pull producer (FileSender) is driven to the end.

A pull producer writes one chunk per ``resumeProducing``; the stream must
keep asking (once per clock turn, while its buffer has room) until the
producer unregisters itself, and stop asking once the stream ends.
"""

from __future__ import annotations

import hashlib
import io
import random

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import FileSender

from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import FLAG_ACK, FLAG_RST, INITIAL_WINDOW, TYPE_DATA, TYPE_WINDOW_UPDATE

from .helpers import Wire, frame
from .loopback import SessionPair

CONTENT = random.Random(5).randbytes(1_000_000)


def opened(w: Wire):
    stream = w.session.open_stream()
    stream.attach(Protocol())
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, stream.id, 0))
    w.sent()
    return stream


def turn_until(w: Wire, done, turns: int = 1000, credit: bool = False) -> bytes:
    """Run the Clock a turn at a time until ``done()``; return the Data sent.

    With ``credit`` the peer returns window credit for every byte it got.
    """
    out = bytearray()
    for _ in range(turns):
        if done():
            break
        w.clock.advance(0)
        got = b"".join(body for h, body in w.sent() if h.type == TYPE_DATA)
        out += got
        if credit and got:
            w.feed(frame(TYPE_WINDOW_UPDATE, 0, 1, len(got)))
    return bytes(out)


def test_file_sender_sends_the_whole_file():
    w = Wire(True, config=YamuxConfig(enable_keepalive=False))
    stream = opened(w)
    d = FileSender().beginFileTransfer(io.BytesIO(CONTENT[:100_000]), stream)
    sent = turn_until(w, lambda: d.called)
    assert d.called, f"stalled after {len(sent)} of 100000 bytes"
    assert sent == CONTENT[:100_000]
    stream.loseConnection()
    w.lose()
    assert w.clock.getDelayedCalls() == []


def test_file_sender_beyond_the_window_waits_for_credit_and_resumes():
    w = Wire(True, config=YamuxConfig(enable_keepalive=False))
    stream = opened(w)
    d = FileSender().beginFileTransfer(io.BytesIO(CONTENT), stream)
    sent = turn_until(w, lambda: stream.buffered[0] > 64 * 1024)
    assert len(sent) == INITIAL_WINDOW  # the window is full
    assert turn_until(w, lambda: False, turns=10) == b""  # and the producer paused
    w.feed(frame(TYPE_WINDOW_UPDATE, 0, stream.id, len(sent)))
    sent += turn_until(w, lambda: d.called, credit=True)
    assert d.called
    assert sent == CONTENT
    stream.loseConnection()
    w.lose()
    assert w.clock.getDelayedCalls() == []


def test_a_reset_stops_the_file_sender():
    w = Wire(True, config=YamuxConfig(enable_keepalive=False))
    stream = opened(w)
    d = FileSender().beginFileTransfer(io.BytesIO(CONTENT), stream)
    failures = []
    d.addErrback(failures.append)
    w.clock.advance(0)
    w.feed(frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream.id, 0))
    assert len(failures) == 1  # FileSender was told to stop
    assert w.clock.getDelayedCalls() == []
    w.lose()


@pytest_twisted.ensureDeferred
async def test_file_sender_over_loopback_tcp():
    pair = await SessionPair().start()
    received: defer.Deferred = defer.Deferred()

    class Sink(Protocol):
        def __init__(self):
            self.sha = hashlib.sha256()
            self.n = 0

        def dataReceived(self, data):
            self.sha.update(data)
            self.n += len(data)

        def connectionLost(self, reason):
            received.callback((self.n, self.sha.hexdigest()))

    try:
        pair.server.set_stream_handler(lambda s: s.attach(Sink()))
        stream = pair.client.open_stream()
        stream.attach(Protocol())
        await FileSender().beginFileTransfer(io.BytesIO(CONTENT), stream).addTimeout(10, reactor)
        stream.loseConnection()
        n, digest = await received.addTimeout(10, reactor)
        assert (n, digest) == (len(CONTENT), hashlib.sha256(CONTENT).hexdigest())
    finally:
        await pair.stop()
