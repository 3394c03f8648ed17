"""TCP tunnels end to end, in memory: routing by local port, half-close,
concurrency and a big transfer (tests/memory.py; no sockets, no real time)."""

from __future__ import annotations

import random

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory

from .loopback import BoundedEcho, Sender
from .memory import MemoryTunnel

MiB = 1024 * 1024
BLOCK = random.Random(9).randbytes(4 * MiB)
TCP_PORT = 2222
ECHO_PORT = 7000


class TCPEcho(BoundedEcho):
    """BoundedEcho that also closes its socket once both directions are done
    (a TCP transport, unlike a yamux stream, stays open until told)."""

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


def tcp_env() -> MemoryTunnel:
    env = MemoryTunnel().start(connect=False)
    env.echoes = []  # the local side of each tunnel
    env.listen(
        Factory.forProtocol(lambda: env.echoes.append(TCPEcho()) or env.echoes[-1]), ECHO_PORT
    )
    env.listen(env.server.tcp_factory(), TCP_PORT, interface="")
    env.server.add_addr(env.IDENT, port=TCP_PORT)
    env.client = env.make_client(tcp={TCP_PORT: f"tcp:127.0.0.1:{ECHO_PORT}"})
    env.client.startService()
    env.flush()
    return env


def test_hundred_concurrent_echo_connections_with_half_close():
    rng = random.Random(3)
    sizes = [rng.randrange(0, 300_000) for _ in range(100)]
    with tcp_env() as env:
        senders = [Sender(BLOCK, i * 7919, n) for i, n in enumerate(sizes)]
        for sender in senders:  # all connect before any byte moves
            env.net.connect(TCP_PORT, protocol=sender, settle=False)
        env.flush()
        assert env.now == 0  # no time passed: it is all bytes
        for size, sender in zip(sizes, senders, strict=True):
            received, digest, reason = env.result(sender.finished)
            assert received == size and digest == sender.sent.result
            assert reason.check(ConnectionDone)  # EOF came back: half-close passed through
        connection = env.server.connection(env.IDENT)
        assert len(connection.session.streams) == 1  # only the control stream is left
        assert len(env.net.open_connections()) == 1  # the tunnel; every echo closed


@pytest.mark.slow
def test_64_mib_transfer_sha256():
    with tcp_env() as env:
        sender = env.net.connect(TCP_PORT, protocol=Sender(BLOCK, 0, 64 * MiB))
        received, digest, reason = env.result(sender.finished)
        assert received == 64 * MiB and digest == sender.sent.result
        assert reason.check(ConnectionDone)


def test_mapping_changes_at_run_time_leave_open_connections_alone():
    with tcp_env() as env:
        open_one = env.connect(TCP_PORT)
        open_one.send(b"before")
        env.flush()
        assert open_one.take() == b"before"
        env.server.delete_addr(port=TCP_PORT)
        refused = env.connect(TCP_PORT)
        # aborted at once: no tunnel for this port (a reset, not an EOF)
        assert refused.closed and refused.reason.check(ConnectionLost)
        assert refused.received == b""
        open_one.send(b"still works")
        env.flush()
        assert open_one.take() == b"still works"
        env.server.add_addr(env.IDENT, port=TCP_PORT)
        again = env.connect(TCP_PORT)
        again.send(b"back")
        env.flush()
        assert again.take() == b"back"
        again.close()
        open_one.close()
        env.flush()
        assert open_one.clean and again.clean
        assert env.now == 0


# an abort on either side reaches the other as a reset, never a clean EOF (found
# with this harness, the same on real sockets: tests/test_yamux_abort.py)


def test_an_abort_by_the_local_server_resets_the_public_connection():
    with tcp_env() as env:
        client = env.connect(TCP_PORT)
        client.send(b"hello")
        env.flush()
        assert client.take() == b"hello"
        env.echoes[0].transport.abortConnection()
        env.flush()
        assert client.reason.check(ConnectionLost)  # a reset, not an EOF


def test_an_abort_by_the_public_client_resets_the_local_connection():
    with tcp_env() as env:
        client = env.connect(TCP_PORT)
        client.send(b"hello")
        env.flush()
        assert client.take() == b"hello"
        client.abort()
        env.flush()
        assert env.echoes[0].transport.reason.check(ConnectionLost)


def test_each_tcp_connection_counts_as_a_request_of_its_tunnel():
    with tcp_env() as env:
        connection = env.server.connection(env.IDENT)
        before = connection.stats()
        peers = [env.connect(TCP_PORT) for _ in range(3)]
        for peer in peers:
            peer.send(b"ping")
        env.flush()
        during = connection.stats()
        assert during.requests == before.requests + 3
        assert during.streams_open == 3  # one stream each, the control stream not counted
        assert during.bytes_out >= before.bytes_out + 3 * 4  # "ping" to the client
        assert during.bytes_in >= before.bytes_in + 3 * 4  # and echoed back
        for peer in peers:
            assert peer.take() == b"ping"
            peer.close()
        env.flush()
        assert connection.stats().streams_open == 0
        env.server.delete_addr(port=TCP_PORT)
        refused = env.connect(TCP_PORT)  # no tunnel for it: not counted
        assert refused.closed
        assert connection.stats().requests == before.requests + 3
