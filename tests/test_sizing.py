"""Bulk data in large pieces (tunnel/yamux/sizing.py) and where the sizes apply.

Tunnel sessions read and send in pieces of ``LARGE_WINDOWS.read_size`` and
``send_size`` rather than Twisted's 64 KiB reads and 128 KiB sends, and the
client reads its local connections the same way; only those transports are
changed, never Twisted's class defaults.  ``keep_freed_memory`` is the
allocator setting the programs can make so that large pieces do not fault
their pages in again each time.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tunnel.client.local import LOCAL_READ_SIZE, LOCAL_SEND_SIZE
from tunnel.server import TunnelResource, TunnelServer, TunnelSite
from tunnel.server.site import PUBLIC_READ_SIZE, PUBLIC_SEND_SIZE
from tunnel.yamux import LARGE_WINDOWS, YamuxConfig
from tunnel.yamux.sizing import keep_freed_memory, size_transport

from .loopback import SessionPair, forwarded_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024
MIB = 1024 * KIB
DEFAULTS = (FileDescriptor.bufferSize, FileDescriptor.SEND_LIMIT)


def test_twisted_defaults_are_what_the_sizes_replace():
    assert DEFAULTS == (64 * KIB, 128 * KIB)
    assert LARGE_WINDOWS.read_size == LOCAL_READ_SIZE == 256 * KIB
    assert LARGE_WINDOWS.send_size == LOCAL_SEND_SIZE == 512 * KIB
    assert LARGE_WINDOWS.max_frame_size == 256 * KIB
    assert YamuxConfig().read_size is None and YamuxConfig().send_size is None


def test_size_transport_changes_one_transport_not_the_class():
    sized, other = FileDescriptor(reactor), FileDescriptor(reactor)
    size_transport(sized, 256 * KIB, 512 * KIB)
    assert (sized.bufferSize, sized.SEND_LIMIT) == (256 * KIB, 512 * KIB)
    assert (other.bufferSize, other.SEND_LIMIT) == DEFAULTS
    assert (FileDescriptor.bufferSize, FileDescriptor.SEND_LIMIT) == DEFAULTS


def test_none_keeps_a_size_at_twisted_s_default():
    sized = FileDescriptor(reactor)
    size_transport(sized, None, 1 * MIB)
    assert (sized.bufferSize, sized.SEND_LIMIT) == (DEFAULTS[0], 1 * MIB)
    size_transport(sized, 128 * KIB, None)
    assert (sized.bufferSize, sized.SEND_LIMIT) == (128 * KIB, 1 * MIB)


def test_transports_without_sizes_are_left_alone():
    transport = StringTransport()
    size_transport(transport, 256 * KIB, 512 * KIB)
    assert not hasattr(transport, "bufferSize") and not hasattr(transport, "SEND_LIMIT")


@pytest.mark.parametrize("name", ["read_size", "send_size"])
def test_sizes_below_1_kib_are_refused(name):
    with pytest.raises(ValueError, match=name):
        YamuxConfig(**{name: 1023})


@pytest_twisted.ensureDeferred
async def test_a_session_sizes_its_tcp_transport_from_its_config():
    pair = await SessionPair(LARGE_WINDOWS).start()
    plain = await SessionPair(YamuxConfig()).start()
    try:
        for session in (pair.client, pair.server):
            transport = session.transport
            assert (transport.bufferSize, transport.SEND_LIMIT) == (256 * KIB, 512 * KIB)
        for session in (plain.client, plain.server):
            transport = session.transport
            assert (transport.bufferSize, transport.SEND_LIMIT) == DEFAULTS
    finally:
        await pair.stop()
        await plain.stop()


@pytest_twisted.ensureDeferred
async def test_the_client_reads_its_local_connections_in_large_pieces():
    async with forwarded_local(LARGE_WINDOWS) as local:
        assert (local.bufferSize, local.SEND_LIMIT) == (LOCAL_READ_SIZE, LOCAL_SEND_SIZE)


def test_public_connections_move_bodies_in_large_pieces():
    class TCPLike(StringTransport):
        """As a TCP transport: Twisted's sizes as class attributes."""

        bufferSize = FileDescriptor.bufferSize
        SEND_LIMIT = FileDescriptor.SEND_LIMIT

    clock = Clock()
    site = TunnelSite(TunnelResource(TunnelServer(clock=clock)), reactor=clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
    transport = TCPLike()
    channel.makeConnection(transport)
    assert (transport.bufferSize, transport.SEND_LIMIT) == (PUBLIC_READ_SIZE, PUBLIC_SEND_SIZE)
    assert (TCPLike.bufferSize, TCPLike.SEND_LIMIT) == DEFAULTS
    channel.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


class FakeLibc:
    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_keep_freed_memory_sets_glibc_s_trim_and_mmap_thresholds():
    libc = FakeLibc(1)
    assert keep_freed_memory(libc=libc) is True
    # M_TRIM_THRESHOLD (-1) and M_MMAP_THRESHOLD (-3), mallopt(3)
    assert libc.calls == [(-1, 16 * MIB), (-3, 8 * MIB)]
    libc = FakeLibc(1)
    keep_freed_memory(4 * MIB, 2 * MIB, libc=libc)
    assert libc.calls == [(-1, 4 * MIB), (-3, 2 * MIB)]


def test_keep_freed_memory_says_when_it_could_not():
    assert keep_freed_memory(libc=FakeLibc(0)) is False
    assert keep_freed_memory(libc=object()) is False  # no mallopt at all


CHURN = r"""
import resource, sys
from tunnel.yamux.sizing import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # glibc's own threshold adjustments settle first
    pieces = [bytes(1 << 20) for _ in range(4)]
    del pieces
before = faults()
for _ in range(50):  # 4 MiB of 1 MiB pieces, made and freed
    pieces = [bytes(1 << 20) for _ in range(4)]
    del pieces
print(faults() - before)
"""


def churn_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,  # python -c imports tunnel from this checkout
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_large_pieces_are_reused_without_page_faults():
    """In a child process (the setting is process-wide): pieces of 1 MiB made
    and freed 200 times fault their pages in again with glibc's defaults,
    and not once with keep_freed_memory."""
    default, kept = churn_faults("default"), churn_faults("keep")
    assert default > 1000
    assert kept * 20 < default
