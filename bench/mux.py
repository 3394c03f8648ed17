"""Throughput of tunnel.yamux next to raw TCP, over loopback, in one process.

What it measures (all on the real reactor, 127.0.0.1 only, ports chosen by
the OS):

* **raw TCP**: a Twisted client sends ``--size`` MiB to a Twisted server that
  only counts the bytes;
* **yamux, 1 stream**: the same bytes through one yamux stream of one
  loopback session (the dialling side is the yamux client and opens the
  stream with ``StreamClientEndpoint``; the accepting side's session hands it
  to a counting protocol through ``StreamServerEndpoint``);
* **yamux, N streams** (``--streams``, default 16): N streams of one session
  in parallel, each sending ``size / N`` bytes.

The yamux cases run with a ``--window`` KiB stream window (default 256 KiB,
the yamux default), then a second pass with a 4 MiB window
(``YamuxConfig(max_stream_window=...)`` on both sessions).

Every sender is an IPushProducer registered (streaming) on its transport
that, while resumed, writes 64 KiB chunks of one preallocated bytes object,
so memory stays bounded; a case is timed from the first write until the
server side has counted every byte.  Each line shows MiB/s, the ratio to raw
TCP measured in the same run, the CPU seconds the process spent (sender and
receiver share one process, so CPU ~= wall time means the case is CPU-bound
in Python), and the peak RSS of the process so far (``ru_maxrss``, which
never goes down).  A case that takes longer than 120 s (``--timeout``) is
aborted with a snapshot of windows and buffers; one that loses or gains
bytes, ends a connection early or makes yamux log a warning fails too; the
exit status is then 1.  Single runs of 256 MiB vary by 10-20 %;
``--repeat N`` runs each case N times and shows the fastest.

Run it from the repository root::

    .venv/bin/python bench/mux.py [--size MiB] [--window KiB] [--streams N] [--repeat N]

``--only tcp,yamux1`` restricts the cases (``tcp``, ``yamux1``, ``yamuxN``)
and ``--no-second-pass`` skips the 4 MiB-window pass, which is handy for
profiling one case::

    .venv/bin/python -m cProfile -s cumtime bench/mux.py --size 64 --only yamux1 \\
        --no-second-pass | head -60
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.endpoints import (  # noqa: E402
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IPushProducer  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer  # noqa: E402

from tunnel.yamux import (  # noqa: E402
    StreamClientEndpoint,
    StreamServerEndpoint,
    YamuxConfig,
    YamuxSession,
)

MiB = 1024 * 1024
KiB = 1024
CHUNK_SIZE = 64 * KiB
CASE_TIMEOUT = 120.0
SECOND_WINDOW_KIB = 4096
#: one preallocated chunk, written over and over (a non-constant pattern).
CHUNK = bytes(range(256)) * (CHUNK_SIZE // 256)


class CaseFailed(Exception):
    """A case went wrong (early close, wrong byte count, logged error, timeout)."""


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: KiB units)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / MiB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- logging: show warnings and errors, and remember them for the current case


class LogWatch:
    """Log observer that prints warnings/errors and records them per case."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if "log_failure" in event or (level is not None and level >= LogLevel.warn):
            self.events.append(formatEventAsClassicLogText(event) or repr(event))


LOG_WATCH = LogWatch()


# -- sending and receiving protocols -------------------------------------------


@implementer(IPushProducer)
class ChunkProducer:
    """Writes ``total`` bytes as 64 KiB chunks of CHUNK while resumed."""

    def __init__(self, transport, total: int) -> None:
        self.transport = transport
        self.remaining = total
        self.paused = True
        self.stopped = False
        self.pauses = 0
        self._writing = False
        self.finished: defer.Deferred = defer.Deferred()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.pauses += 1
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.stopped = True

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        if self._writing:  # resumed from inside our own write(): the loop goes on
            return
        self._writing = True
        try:
            write = self.transport.write
            chunk = CHUNK
            size = CHUNK_SIZE
            while not self.paused and self.remaining >= size:
                self.remaining -= size
                write(chunk)
            if not self.paused and 0 < self.remaining < size:
                last, self.remaining = self.remaining, 0
                write(chunk[:last])
        finally:
            self._writing = False
        if self.remaining == 0 and not self.finished.called:
            self.transport.unregisterProducer()
            self.finished.callback(None)

    def describe(self) -> str:
        return (
            f"producer remaining={self.remaining} paused={self.paused}"
            f" stopped={self.stopped} pauses={self.pauses}"
        )


class Source(Protocol):
    """The sending side of one connection or stream; started by the case."""

    def __init__(self, case: Case, total: int) -> None:
        self.case = case
        self.total = total
        self.producer: ChunkProducer | None = None
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.producer = ChunkProducer(self.transport, self.total)

    def connectionLost(self, reason) -> None:
        if not self.case.received_all():
            self.case.fail(
                f"a sending {self.case.kind} ended before the receiver had everything"
                f" ({self.case.received} of {self.case.expected} bytes):"
                f" {reason.type.__name__}: {reason.getErrorMessage()}"
            )
        self.lost_reason = reason
        self.lost.callback(None)


class Sink(Protocol):
    """The receiving side: counts bytes and reports them to the case."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.received = 0
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.case.sinks.append(self)
        self.case.sink_made()

    def dataReceived(self, data: bytes) -> None:
        n = len(data)
        self.received += n
        self.case.count(n)

    def connectionLost(self, reason) -> None:
        if not self.case.received_all():
            self.case.fail(
                f"a receiving {self.case.kind} ended after {self.received} bytes"
                f" (case total {self.case.received} of {self.case.expected}):"
                f" {reason.type.__name__}: {reason.getErrorMessage()}"
            )
        self.lost_reason = reason
        self.lost.callback(None)


# -- one case -----------------------------------------------------------------


class Case:
    """State shared by the protocols of one case, plus its result."""

    def __init__(self, name: str, kind: str, expected: int, connections: int) -> None:
        self.name = name
        self.kind = kind  # "connection" or "stream"
        self.expected = expected
        self.connections = connections
        self.received = 0
        self.sinks: list[Sink] = []
        self.sources: list[Source] = []
        self.sessions: dict[str, YamuxSession] = {}
        self.transports: list = []  # TCP transports to abort on timeout
        self.start = 0.0
        self.end = 0.0
        self.cpu_start = 0.0
        self.cpu_end = 0.0
        self.all_sinks: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()
        self.error: str | None = None
        self.aborted = False

    def received_all(self) -> bool:
        return self.received >= self.expected

    def sink_made(self) -> None:
        if len(self.sinks) == self.connections and not self.all_sinks.called:
            self.all_sinks.callback(None)

    def count(self, n: int) -> None:
        self.received += n
        if self.received >= self.expected and not self.end:
            self.end = time.perf_counter()
            self.cpu_end = cpu_seconds()
            if not self.done.called:
                self.done.callback(None)
        if self.received > self.expected:
            self.fail(f"received {self.received} bytes, {self.expected} were sent")

    def fail(self, message: str) -> None:
        if self.aborted:
            return
        if self.error is None:
            self.error = message
        for d in (self.done, self.all_sinks):
            if not d.called:
                d.errback(CaseFailed(message))

    def describe(self) -> str:
        """A snapshot of where the bytes are, for a timeout report."""
        lines = [f"received {self.received} of {self.expected} bytes"]
        for i, source in enumerate(self.sources):
            transport = source.transport
            line = f"  source {i}: " + (source.producer.describe() if source.producer else "-")
            if transport is not None and hasattr(transport, "send_window"):
                line += (
                    f"; stream {transport!r} send_window={transport.send_window}"
                    f" buffered(send, recv)={transport.buffered}"
                    f" producer_paused={transport._producer_paused}"
                )
            lines.append(line)
        for i, sink in enumerate(self.sinks):
            transport = sink.transport
            line = f"  sink {i}: received={sink.received}"
            if transport is not None and hasattr(transport, "receive_window"):
                line += (
                    f"; stream {transport!r} receive_window={transport.receive_window}"
                    f" buffered(send, recv)={transport.buffered} paused={transport._paused}"
                )
            lines.append(line)
        for role, session in self.sessions.items():
            tcp = session.transport
            lines.append(
                f"  {role} session {session!r}: closed={session.closed}"
                f" write_paused={session._write_paused} ready={len(session._ready)}"
                f" parser_idle={session._parser.idle}"
                f" streams={ {sid: s.state.value for sid, s in session.streams.items()} }"
                + (
                    f"; tcp producerPaused={getattr(tcp, 'producerPaused', '?')}"
                    f" buffered={len(getattr(tcp, 'dataBuffer', b''))}"
                    f"+{getattr(tcp, '_tempDataLen', '?')}"
                    if tcp is not None
                    else ""
                )
            )
        return "\n".join(lines)

    def abort(self) -> None:
        """Drop every connection of the case at once (after a timeout)."""
        for session in self.sessions.values():
            session.abort()
        for transport in self.transports:
            if transport is not None and transport.connected:
                transport.abortConnection()

    def begin(self) -> None:
        self.cpu_start = cpu_seconds()
        self.start = time.perf_counter()
        for source in self.sources:
            source.producer.start()


async def _listen(factory: Factory):
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    return await endpoint.listen(factory)


def _connect(port, protocol: Protocol) -> defer.Deferred:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    return connectProtocol(endpoint, protocol)


async def run_tcp(case: Case) -> None:
    """One TCP connection, client to server."""
    port = await _listen(Factory.forProtocol(lambda: Sink(case)))
    try:
        source = Source(case, case.expected)
        case.sources.append(source)
        await _connect(port, source)
        case.transports.append(source.transport)
        await case.all_sinks
        case.transports.append(case.sinks[0].transport)
        case.begin()
        await case.done
        source.transport.loseConnection()
        await defer.gatherResults([source.lost, case.sinks[0].lost])
    finally:
        await port.stopListening()


async def run_yamux(case: Case, streams: int, window: int) -> None:
    """``streams`` streams of one loopback yamux session, client to server."""
    config = YamuxConfig(max_stream_window=window)

    def build_server():
        session = YamuxSession(False, config=config)
        case.sessions["server"] = session
        StreamServerEndpoint(session).listen(Factory.forProtocol(lambda: Sink(case)))
        return session

    port = await _listen(Factory.forProtocol(build_server))
    try:
        client = YamuxSession(True, config=config)
        case.sessions["client"] = client
        await _connect(port, client)
        case.transports.append(client.transport)
        each, extra = divmod(case.expected, streams)
        opener = StreamClientEndpoint(client)
        for i in range(streams):
            source = Source(case, each + (1 if i < extra else 0))
            case.sources.append(source)
            await opener.connect(Factory.forProtocol(lambda s=source: s))
        await case.all_sinks  # every stream reached the server's factory
        case.begin()
        await case.done
        totals = sorted(sink.received for sink in case.sinks)
        wanted = sorted(source.total for source in case.sources)
        if totals != wanted:
            raise CaseFailed(f"per-stream byte counts {totals} differ from those sent {wanted}")
        # orderly close: FIN from each client stream, FIN back from each sink
        for source in case.sources:
            source.transport.loseConnection()
        await defer.gatherResults([s.lost for s in case.sources + case.sinks])
        while client.streams or case.sessions["server"].streams:
            await _sleep(0.01)
        server = case.sessions["server"]
        closed = [client.when_closed(), server.when_closed()]
        client.close()
        server.close()
        await defer.gatherResults(closed)
    finally:
        await port.stopListening()


def _sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def run_case(case: Case, body, timeout: float = CASE_TIMEOUT) -> None:
    """Run ``body(case)`` bounded by ``timeout`` seconds; record an error in case.error."""
    LOG_WATCH.events.clear()
    work = defer.Deferred.fromCoroutine(body(case))
    timed_out: list[str] = []
    earlier: list[str | None] = []

    def on_timeout() -> None:
        timed_out.append(case.describe())
        earlier.append(case.error)
        case.aborted = True  # what the abort itself breaks is no news
        case.abort()
        work.cancel()

    timer = reactor.callLater(timeout, on_timeout)
    try:
        await work
    except defer.CancelledError:
        case.error = case.error or "cancelled"
    except Exception as e:
        case.error = case.error or f"{type(e).__name__}: {e}"
    finally:
        if timer.active():
            timer.cancel()
        for d in (case.done, case.all_sinks):  # failed but maybe never awaited
            d.addErrback(lambda _: None)
    if timed_out:
        before = f" ({earlier[0]})" if earlier[0] else ""
        case.error = f"timed out after {timeout:g} s{before}; state then:\n{timed_out[0]}"
    if LOG_WATCH.events and case.error is None:
        case.error = "warnings or errors were logged:\n" + "\n".join(LOG_WATCH.events)


# -- the run ------------------------------------------------------------------

HEADER_LINE = (
    f"{'case':<34} {'MiB':>6} {'secs':>7} {'MiB/s':>8} {'vs TCP':>7} {'CPU s':>6} {'peak RSS':>9}"
)


def report(case: Case, tcp_rate: float | None) -> float | None:
    rss = f"{peak_rss_mib():7.1f} MiB"
    if case.error is not None:
        print(f"{case.name:<34} FAILED{'':>30} {rss}", flush=True)
        print("    " + case.error.replace("\n", "\n    "), flush=True)
        return None
    secs = case.end - case.start
    rate = case.expected / MiB / secs
    ratio = f"{rate / tcp_rate:6.2f}x" if tcp_rate else f"{'n/a':>7}"
    print(
        f"{case.name:<34} {case.expected / MiB:6.0f} {secs:7.3f} {rate:8.1f} {ratio} "
        f"{case.cpu_end - case.cpu_start:6.2f} {rss}",
        flush=True,
    )
    return rate


async def measure(name: str, kind: str, size: int, connections: int, body, args) -> Case:
    """Run a case ``args.repeat`` times (fresh connections each time); keep the fastest."""
    best: Case | None = None
    for _ in range(args.repeat):
        case = Case(name, kind, size, connections)
        await run_case(case, body, args.timeout)
        if case.error is not None:
            return case
        if best is None or case.end - case.start < best.end - best.start:
            best = case
    return best


async def main(args: argparse.Namespace) -> int:
    size = int(args.size * MiB)
    only = set(args.only.split(",")) if args.only else {"tcp", "yamux1", "yamuxN"}
    windows = [args.window]
    if not args.no_second_pass and args.window != SECOND_WINDOW_KIB:
        windows.append(SECOND_WINDOW_KIB)
    best_of = f", best of {args.repeat} runs" if args.repeat > 1 else ""
    print(
        f"{size / MiB:g} MiB per case, {CHUNK_SIZE // KiB} KiB writes{best_of},"
        f" reactor {type(reactor).__name__}, Python {sys.version.split()[0]}",
        flush=True,
    )
    print(f"peak RSS before the first case: {peak_rss_mib():.1f} MiB", flush=True)
    print(HEADER_LINE, flush=True)
    failures = 0
    tcp_rate = None
    if "tcp" in only:
        case = await measure("raw TCP", "connection", size, 1, run_tcp, args)
        tcp_rate = report(case, None)
        failures += case.error is not None
    for window_kib in windows:
        plans = []
        if "yamux1" in only:
            plans.append(1)
        if "yamuxN" in only:
            plans.append(args.streams)
        for streams in plans:
            label = "stream" if streams == 1 else "streams"
            name = f"yamux {streams} {label}, {window_kib} KiB window"

            def body(c, streams=streams, window_kib=window_kib):
                return run_yamux(c, streams, window_kib * KiB)

            case = await measure(name, "stream", size, streams, body, args)
            report(case, tcp_rate)
            failures += case.error is not None
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=float, default=256, help="MiB sent in each case (default 256)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=256,
        help="yamux stream window in KiB for the first pass (default 256)",
    )
    parser.add_argument(
        "--streams", type=int, default=16, help="streams of the parallel case (default 16)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated cases to run: tcp, yamux1, yamuxN (default all)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each case; the fastest is shown"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=CASE_TIMEOUT,
        help=f"seconds after which a case is aborted (default {CASE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--no-second-pass",
        action="store_true",
        help=f"skip the pass with a {SECOND_WINDOW_KIB} KiB window",
    )
    args = parser.parse_args(argv)
    if args.size <= 0 or args.streams < 1 or args.repeat < 1 or args.timeout <= 0:
        parser.error("--size, --streams, --repeat and --timeout must be positive")
    if args.only and not set(args.only.split(",")) <= {"tcp", "yamux1", "yamuxN"}:
        parser.error("--only takes tcp, yamux1 and/or yamuxN")
    try:
        YamuxConfig(max_stream_window=args.window * KiB)
    except ValueError as e:
        parser.error(str(e))
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            ),
            LOG_WATCH,
        ],
        redirectStandardIO=False,
    )
    outcome: list[int] = []

    def finished(result):
        if isinstance(result, int):
            outcome.append(result)
        else:
            print(f"benchmark crashed: {result.getTraceback()}", file=sys.stderr)
            outcome.append(1)
        reactor.stop()

    def start() -> None:
        defer.Deferred.fromCoroutine(main(args)).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    failures = outcome[0] if outcome else 1
    if failures:
        print(f"{failures} case(s) failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run())
