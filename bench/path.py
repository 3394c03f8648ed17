"""The download path of the whole tunnel, in one process: CPU per MiB, not wall time.

A fixed workload through the real code (127.0.0.1 only, ports chosen by the
OS, one reactor): a raw origin answers ``GET /blob`` with a Content-Length
and ``--size`` MiB written in ``--origin-chunk`` KiB pieces of one bytes
object from a push producer (as the Go ``reforigin`` streams); a
``TunnelClientService`` with ``LocalForwarder`` (the client's real path:
local TCP read -> yamux stream -> frames) carries it to a ``TunnelServer``
behind a ``TunnelSite`` (frames -> stream -> ``Forward`` -> twisted.web),
and a raw public client reads the response, counting bytes without keeping
them.  Downloads repeat on one kept public connection (the tunnel keeps its
stream too), after one warm-up download.

Everything shares one core, so the wall time is the sum of the parts and
the figure that matters is the process's **CPU per MiB** (user and system
time from ``getrusage``), which other work on the machine changes far less
than it changes throughput between processes.  It is the instrument for
the per-chunk cost of the data path: Python calls, copies, syscalls.  The
origin and the public reader are in it too but do the same work whatever
the tunnel does.

Run it from the repository root::

    .venv/bin/python bench/path.py [--size MiB] [--repeat N] [--profile]
    valgrind --tool=callgrind --callgrind-out-file=cg.out \\
        .venv/bin/python bench/path.py --size 20 --repeat 1

``--profile`` runs the timed downloads under cProfile and prints the
functions by own time with their calls per MiB.  ``--tree DIR`` imports
``tunnel`` from another checkout (to compare two trees with the same script).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=200, help="MiB per download (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="timed downloads (default 3)")
    parser.add_argument(
        "--origin-chunk", type=int, default=32, help="KiB per origin write (default 32, as Go's)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="instead of downloads: this many small requests, one after the other",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the timed downloads")
    parser.add_argument("--tree", help="import tunnel from this checkout")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TREE = os.path.abspath(ARGS.tree) if ARGS is not None and ARGS.tree else ROOT
sys.path[:] = [_TREE] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _TREE]

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.endpoints import (  # noqa: E402
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IPushProducer  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from zope.interface import implementer  # noqa: E402

from tunnel.client import LocalForwarder, LocalTargets, TunnelClientService  # noqa: E402
from tunnel.server import TunnelResource, TunnelServer, TunnelSite  # noqa: E402

MiB = 1024 * 1024
HOST = "app.localhost"
IDENT = "bench-path-identifier-0123"


@implementer(IPushProducer)
class OriginProtocol(Protocol):
    """Answers each ``GET /blob?n=N`` with N bytes, as a push producer."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.head = b""
        self.left = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        while b"\r\n\r\n" in self.head:
            request, _, self.head = self.head.partition(b"\r\n\r\n")
            n = int(request.split(b" ", 2)[1].partition(b"n=")[2])
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % n
            )
            self.left = n
            self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk, write = self.chunk, self.transport.write
        size = len(chunk)
        while self.left and not self.paused:
            if self.left >= size:
                write(chunk)
                self.left -= size
            else:
                write(chunk[: self.left])
                self.left = 0

    def stopProducing(self) -> None:
        self.left = 0


class Reader(Protocol):
    """The public client: one GET at a time, the body counted, not kept."""

    def __init__(self) -> None:
        self.done: defer.Deferred | None = None
        self.head = b""
        self.left = -1

    def get(self, n: int) -> defer.Deferred:
        self.done = defer.Deferred()
        self.head, self.left = b"", -1
        self.transport.write(b"GET /blob?n=%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (n, HOST.encode()))
        return self.done

    def dataReceived(self, data: bytes) -> None:
        if self.left < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer {head[:200]!r}")
            length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")]
            self.left = int(length[0].split(b":")[1])
        self.left -= len(data)
        if self.left <= 0:
            if self.left < 0:
                raise RuntimeError("more body than its Content-Length")
            done, self.done = self.done, None
            done.callback(None)

    def connectionLost(self, reason) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done.errback(reason)


def cpu() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


async def main(args: argparse.Namespace) -> None:
    listen = TCP4ServerEndpoint(reactor, 0, backlog=64, interface="127.0.0.1")
    chunk = bytes(range(256)) * (args.origin_chunk * 4)
    origin = await listen.listen(Factory.forProtocol(lambda: OriginProtocol(chunk)))
    server = TunnelServer()
    server.add_host(HOST, IDENT)
    public = await TCP4ServerEndpoint(reactor, 0, backlog=64, interface="127.0.0.1").listen(
        TunnelSite(TunnelResource(server))
    )
    port = public.getHost().port
    targets = LocalTargets(reactor, default=f"tcp:127.0.0.1:{origin.getHost().port}")
    client = TunnelClientService(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        IDENT,
        LocalForwarder(targets.endpoint_for),
        host=f"127.0.0.1:{port}",
    )
    client.startService()
    await client.when_ready()
    reader = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Reader())
    if args.requests:
        await requests(reader, args.requests)
    else:
        await downloads(reader, args)
    reader.transport.loseConnection()
    await client.stopService()
    await server.stop(grace=1.0)
    await public.stopListening()
    await origin.stopListening()


async def requests(reader: Reader, count: int) -> None:
    """``count`` requests for 5 bytes on one kept connection: CPU per request."""
    for _ in range(20):  # warm-up: the kept stream, imports
        await reader.get(5)
    u0, s0, _ = cpu()
    t0 = time.perf_counter()
    for _ in range(count):
        await reader.get(5)
    wall = time.perf_counter() - t0
    u1, s1, _ = cpu()
    user, system = (u1 - u0) * 1e6 / count, (s1 - s0) * 1e6 / count
    print(
        f"{count} requests: {count / wall:.0f}/s wall;  CPU us/request {user + system:.0f}"
        f" (user {user:.0f}, sys {system:.0f})  [tree {_TREE}]"
    )


async def downloads(reader: Reader, args: argparse.Namespace) -> None:
    n = args.size * MiB
    await reader.get(min(n, 4 * MiB))  # warm-up: connections, stream, imports
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
    rows = []
    for _ in range(args.repeat):
        u0, s0, f0 = cpu()
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        await reader.get(n)
        if profile is not None:
            profile.disable()
        wall = time.perf_counter() - t0
        u1, s1, f1 = cpu()
        user, system = (u1 - u0) * 1e3 / args.size, (s1 - s0) * 1e3 / args.size
        faults = (f1 - f0) / args.size
        rows.append((user + system, user, system, n / wall / MiB, faults))
        print(
            f"{args.size} MiB: {n / wall / MiB:7.0f} MiB/s wall;  CPU ms/MiB"
            f" {user + system:.3f} (user {user:.3f}, sys {system:.3f});"
            f" {faults:.0f} page faults/MiB",
            flush=True,
        )
    rows.sort()
    total, user, system, rate, faults = rows[len(rows) // 2]
    print(
        f"median CPU ms/MiB {total:.3f} (user {user:.3f}, sys {system:.3f});"
        f" {faults:.0f} page faults/MiB; {rate:.0f} MiB/s"
        f"  [tree {_TREE}]"
    )
    if profile is not None:
        import pstats

        stats = pstats.Stats(profile)
        per = args.size * args.repeat
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:40]
        print(f"\n{'own s':>7} {'calls/MiB':>10}  function")
        for (file, line, name), (_, calls, own, _, _) in entries:
            where = f"{os.path.relpath(file, _TREE) if file.startswith(_TREE) else file}:{line}"
            print(f"{own:7.3f} {calls / per:10.1f}  {name} ({where[-60:]})")


if __name__ == "__main__":
    from twisted.internet import task

    task.react(lambda _: defer.ensureDeferred(main(ARGS)))
