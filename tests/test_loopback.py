"""Two sessions over a real 127.0.0.1 connection: many streams, big streams,
flow control."""

from __future__ import annotations

import math
import random

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol

from tunnel.yamux import StreamClientEndpoint, StreamServerEndpoint, YamuxConfig

from .live import until
from .loopback import BoundedEcho, Sender, SessionPair, SliceProducer

MiB = 1024 * 1024


def random_block(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def echo_streams(pair: SessionPair, sizes: list[int], block: bytes) -> None:
    StreamServerEndpoint(pair.server).listen(Factory.forProtocol(BoundedEcho))
    endpoint = StreamClientEndpoint(pair.client)
    rng = random.Random(7)
    senders = []
    for size in sizes:
        sender = Sender(block, rng.randrange(len(block)), size)
        await endpoint.connect(Factory.forProtocol(lambda s=sender: s))
        senders.append(sender)
    results = await defer.gatherResults([s.finished for s in senders])
    sent = [s.sent.result for s in senders]
    for size, digest, (received, got, reason) in zip(sizes, sent, results, strict=True):
        assert received == size
        assert got == digest
        assert reason.check(ConnectionDone)
    assert pair.client.streams == {} and pair.server.streams == {}


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_thousand_concurrent_streams_echo_sha256():
    rng = random.Random(2026)
    # log-uniform sizes from 0 to 4 MiB: every order of magnitude is covered
    sizes = [int(math.exp(rng.uniform(0, math.log(4 * MiB)))) - 1 for _ in range(1000)]
    sizes[:3] = [0, 1, 4 * MiB]
    pair = await SessionPair().start()
    try:
        await echo_streams(pair, sizes, random_block(8 * MiB, 1))
    finally:
        await pair.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_one_stream_moves_256_mib():
    pair = await SessionPair().start()
    done: defer.Deferred = defer.Deferred()

    class Count(Protocol):
        n = 0

        def dataReceived(self, data):
            self.n += len(data)
            if self.n == 256 * MiB:
                done.callback(self.n)

    try:
        StreamServerEndpoint(pair.server).listen(Factory.forProtocol(Count))
        proto = await StreamClientEndpoint(pair.client).connect(Factory.forProtocol(Protocol))
        producer = SliceProducer(proto.transport, random_block(4 * MiB, 3), 0, 256 * MiB)
        producer.start()
        assert await done == 256 * MiB
        assert producer.pauses > 0  # backpressure reached the producer
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_stalled_consumer_bounds_sender_to_one_window_then_resumes():
    config = YamuxConfig()
    pair = await SessionPair(config).start()
    receivers = []
    total = 16 * MiB

    class Sink(Protocol):
        n = 0

        def connectionMade(self):
            receivers.append(self)
            self.transport.pauseProducing()  # the application stops reading

        def dataReceived(self, data):
            self.n += len(data)

    try:
        StreamServerEndpoint(pair.server).listen(Factory.forProtocol(Sink))
        proto = await StreamClientEndpoint(pair.client).connect(Factory.forProtocol(Protocol))
        out = proto.transport
        producer = SliceProducer(out, random_block(MiB, 4), 0, total)
        producer.start()
        await until(
            lambda: receivers and receivers[0].transport.buffered[1] > 0, timeout=30, interval=0.005
        )
        sink = receivers[0]
        inbound = sink.transport
        # wait until the sender has used up its window, its producer is paused and
        # the window's bytes (in flight on the socket a moment ago) have arrived
        await until(
            lambda: (
                out.send_window == 0
                and producer.paused
                and inbound.buffered[1] >= config.max_stream_window
            ),
            timeout=30,
            interval=0.005,
        )
        assert inbound.buffered[1] == config.max_stream_window
        assert sink.n == 0
        assert out.buffered[0] <= config.write_buffer_size + producer.chunk
        assert producer.left > total // 2  # the rest never left the producer
        inbound.resumeProducing()
        await producer.done
        await until(lambda: sink.n == total, timeout=30, interval=0.005)
        assert inbound.buffered == (0, 0)
    finally:
        await pair.stop()
