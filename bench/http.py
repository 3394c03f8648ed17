"""The HTTP tunnel end to end, next to the same origin reached directly, in one run.

Four separate processes, all on 127.0.0.1 with ports chosen by the OS, so
that (as in the Go reference measurement) each side of the tunnel gets its
own core when one is free:

* an **origin**: a small twisted.web site (``sys.executable -c ...``) where
  ``/`` answers ``hello`` and ``/bytes?n=N`` streams N bytes from an
  IPushProducer with a Content-Length;
* a **tunnel server**: ``twistd -n tunnel-server --listen tcp:PORT:interface=127.0.0.1
  --vhost app.localhost=IDENT`` (the plugin as deployed, with its defaults);
* a **tunnel client**: ``twistd -n tunnel-client --server tcp:127.0.0.1:PORT
  --identifier-file F --local tcp:127.0.0.1:ORIGIN``;
* the **load generator**: ``wrk`` (installed with ``apt-get install -y wrk``
  when missing and we are root; a keep-alive HTTP/1.1 load generator in a
  Python subprocess otherwise, or with ``--loadgen python``).

What it measures, each case once through the tunnel (``Host: app.localhost``
to the tunnel server) and once directly against the origin, back to back:

* **req/s** of ``GET /`` at 1, 10 and 50 keep-alive connections for
  ``--duration`` seconds each (wrk ``-t min(c, 2) -c C --latency``), with the
  p50/p99 latency and the CPU share each process used during the case
  (from ``/proc/PID/stat``, 100 % = one core);
* a **100 MiB download** (``/bytes?n=104857600``, ``--download-mib``) with
  curl (``-o /dev/null -w '%{size_download} %{time_total}'``), in MB/s
  (10^6 bytes/s), the best of 3 runs (one takes well under a second and
  varies by +/-30 %);
* **memory**: peak (VmHWM) and current (VmRSS) resident size of the tunnel
  server and client processes after all of the above;
* **RSS per idle tunnel**: one more tunnel server process with 1,000 vhosts
  (``--idle-tunnels``), whose VmRSS is read before and after one separate
  client process has connected 1,000 ``TunnelClientService`` instances to it
  (50 at a time, each with its own identifier); (after - before) / 1,000.

The ratio column is tunnel / direct, measured in the same run.  Beware that
the origin here is Python too (Go measured against a Go origin), so "direct"
is much slower than Go's direct and the ratios are flattered accordingly;
compare absolute req/s with Go as well.  On a 2-core machine wrk, the origin,
the server and the client share the cores.

Go reference (koding/tunnel, the bar this rebuild is held to):

* 1.8k / 5.5k / 7.3k req/s at concurrency 1 / 10 / 50
  (0.09 / 0.05 / 0.06 of direct); p50 0.51 ms at c=1;
* 100 MiB download at 0.7 GB/s (0.2 of direct);
* 38 KiB of server memory per idle tunnel.

Run it from the repository root::

    .venv/bin/python bench/http.py [--duration S] [--quick]

``--quick`` (1 s per case, a 16 MiB download, 100 idle tunnels) checks that
everything works.  ``--profile-server FILE`` instead runs only the tunnel at
concurrency 10 with the server under twistd's cProfile, stops the server
gracefully so the stats are written, and prints the top functions::

    .venv/bin/python bench/http.py --profile-server /tmp/server.prof --duration 10

Every load is bounded in time (and the Python fallback in count too); every
child process is stopped (SIGTERM, then SIGKILL) before the script exits.
The exit status is 1 if a case failed (non-2xx answers, socket errors, a
short download, a process that died).
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's ``http`` package for every
# script run from bench/ (their folder comes first on sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "http":
    # Imported in place of the standard library (``python bench/mux.py`` ->
    # twisted -> ``from http import cookiejar``): put the real package in
    # sys.modules, which is what the import statement then hands out.
    import importlib.machinery
    import importlib.util

    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    _spec = importlib.machinery.PathFinder.find_spec("http", _path)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["http"] = _real
    _spec.loader.exec_module(_real)
else:
    # bench/ last: the standard library's http first, then bench/harness.py
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import argparse  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from harness import (  # noqa: E402
    IDLE_CLIENTS,
    ORIGIN,
    READY_TIMEOUT,
    BenchFailed,
    Children,
    CpuMeter,
    KiB,
    Load,
    MiB,
    download,
    find_wrk,
    free_port,
    http_get,
    proc_status,
    run_python_load,
    run_wrk,
    wait_http,
)

HOST = "app.localhost"
IDENT = "bench-identifier-0123456789"
CONCURRENCY = (1, 10, 50)
IDLE_TIMEOUT = 120.0
IDLE_BATCH = 50
DOWNLOAD_RUNS = 3

GO_REQS = {1: (1800, 0.09), 10: (5500, 0.05), 50: (7300, 0.06)}
GO_P50_C1_MS = 0.51
GO_DOWNLOAD_MBS = (700.0, 0.2)
GO_IDLE_KIB = 38

# -- the cases -------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children) -> None:
        self.args = args
        self.children = children
        self.failures: list[str] = []
        self.loads: dict[tuple[str, int], Load] = {}
        self.downloads: dict[str, float] = {}
        self.memory: dict[str, dict[str, int]] = {}
        self.idle: dict[str, float] = {}

    # -- setup

    def start_tunnel(self, profile: str | None = None) -> None:
        children = self.children
        self.origin_port = free_port()
        self.origin = children.start(
            "origin", [sys.executable, "-c", ORIGIN, str(self.origin_port)]
        )
        wait_http(children, self.origin_port, None, 200, READY_TIMEOUT)

        self.server_port = free_port()
        extra = [f"--profile={profile}", "--profiler=cprofile", "--savestats"] if profile else []
        self.server = children.twistd(
            "server",
            [
                "tunnel-server",
                "--listen",
                f"tcp:{self.server_port}:interface=127.0.0.1",
                "--vhost",
                f"{HOST}={IDENT}",
                "--shutdown-grace",
                "2",
            ],
            extra,
        )
        ident_file = os.path.join(children.tmp, "identifier")
        with open(ident_file, "w") as f:
            f.write(IDENT + "\n")
        wait_http(children, self.server_port, HOST, 502, READY_TIMEOUT)  # up, no client yet
        self.client = children.twistd(
            "client",
            [
                "tunnel-client",
                "--server",
                f"tcp:127.0.0.1:{self.server_port}",
                "--identifier-file",
                ident_file,
                "--local",
                f"tcp:127.0.0.1:{self.origin_port}",
                "--stop-timeout",
                "2",
            ],
        )
        wait_http(children, self.server_port, HOST, 200, READY_TIMEOUT)
        status, body = http_get(self.server_port, "/", HOST)
        if body != b"hello":
            raise BenchFailed(f"the tunnel answered {status} {body[:80]!r}, not hello")

    def meter(self) -> CpuMeter:
        return CpuMeter({"server": self.server, "client": self.client, "origin": self.origin})

    def load(self, route: str, conns: int, duration: int) -> Load:
        port, host = (self.server_port, HOST) if route == "tunnel" else (self.origin_port, None)
        meter = self.meter()
        if self.args.wrk:
            result = run_wrk(port, host, conns, duration)
        else:
            result = run_python_load(port, host, conns, duration)
        result.cpu = meter.shares()
        self.children.check_alive()
        return result

    # -- cases

    def requests(self) -> None:
        duration = self.args.duration
        if not self.args.quick:
            for route in ("tunnel", "direct"):  # warm up: first connections, imports, caches
                self.load(route, 10, 1)
        print(
            f"\n{'GET /':<14} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            f" {'errors':>6}   CPU % server/client/origin",
            flush=True,
        )
        for conns in CONCURRENCY:
            for route in ("tunnel", "direct"):
                result = self.load(route, conns, duration)
                self.loads[(route, conns)] = result
                bad = result.errors + result.non2xx
                if bad:
                    self.failures.append(
                        f"{route} c={conns}: {result.errors} socket errors,"
                        f" {result.non2xx} non-2xx answers"
                    )
                cpu = "/".join(f"{result.cpu[k]:.0f}" for k in ("server", "client", "origin"))
                print(
                    f"{route:<14} {conns:>5} {result.rps:>9.0f} {_ms(result.p50):>8}"
                    f" {_ms(result.p99):>8} {bad:>6}   {cpu}",
                    flush=True,
                )

    def downloads_case(self) -> None:
        n = self.args.download_mib * MiB
        timeout = 120.0
        print(
            f"\n{'download':<14} {'MiB':>5} {'MB/s':>9} {'secs':>8}   CPU % server/client/origin"
            f"  (best of {DOWNLOAD_RUNS})",
            flush=True,
        )
        for route in ("tunnel", "direct"):
            port, host = (self.server_port, HOST) if route == "tunnel" else (self.origin_port, None)
            best = None
            for _ in range(DOWNLOAD_RUNS):
                meter = self.meter()
                size, seconds, status = download(port, host, n, timeout)
                cpu = "/".join(f"{v:.0f}" for v in meter.shares().values())
                self.children.check_alive()
                if size != n or status != 200:
                    self.failures.append(f"{route} download: status {status}, {size} of {n} bytes")
                    break
                if best is None or seconds < best[0]:
                    best = (seconds, cpu)
            if best is None:
                continue
            seconds, cpu = best
            rate = n / seconds / 1e6 if seconds else 0.0
            self.downloads[route] = rate
            print(
                f"{route:<14} {n // MiB:>5} {rate:>9.0f} {seconds:>8.3f}   {cpu}",
                flush=True,
            )

    def memory_case(self) -> None:
        for name, proc in (("server", self.server), ("client", self.client)):
            self.memory[name] = proc_status(proc.pid)

    def idle_case(self) -> None:
        """RSS of a fresh server before and after N idle clients connect."""
        count = self.args.idle_tunnels
        children = self.children
        port = free_port()
        vhosts = []
        for i in range(count):
            vhosts += ["--vhost", f"h{i}.localhost=ident{i}"]
        server = children.twistd(
            "idle-server",
            [
                "tunnel-server",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--shutdown-grace",
                "1",
                *vhosts,
            ],
        )
        wait_http(children, port, "h0.localhost", 502, READY_TIMEOUT)
        time.sleep(0.5)
        before = proc_status(server.pid)["VmRSS"]
        client = children.start(
            "idle-clients",
            [
                sys.executable,
                "-c",
                IDLE_CLIENTS,
                str(port),
                str(self.origin_port),
                str(count),
                str(IDLE_BATCH),
            ],
        )
        out = os.path.join(children.tmp, "idle-clients.out")
        deadline = time.monotonic() + IDLE_TIMEOUT
        started = time.monotonic()
        ready = None
        client_before = 0
        while ready is None:
            if time.monotonic() > deadline:
                raise BenchFailed(
                    f"{count} idle clients not connected after {IDLE_TIMEOUT:g} s\n"
                    + children.tail("idle-clients")
                )
            children.check_alive()
            with open(out) as f:
                lines = f.read().splitlines()
            for line in lines:
                words = line.split()
                if words[:1] == ["failed"]:
                    raise BenchFailed(f"idle clients: {line}\n" + children.tail("idle-clients"))
                if words[:1] == ["before"]:
                    client_before = int(words[1])
                if words[:1] == ["ready"]:
                    ready = int(words[2])
            time.sleep(0.1)
        connect_secs = time.monotonic() - started
        time.sleep(1.0)  # let the last handshakes settle on the server side
        after = proc_status(server.pid)["VmRSS"]
        for i in (0, count - 1):  # the tunnels work, not just the sessions
            status, body = http_get(port, "/", f"h{i}.localhost")
            if status != 200 or body != b"hello":
                self.failures.append(f"idle tunnel h{i}: {status} {body[:80]!r}")
        self.idle = {
            "count": count,
            "before": before,
            "after": after,
            "per": (after - before) / count,
            "client_before": client_before,
            "client_per": (ready - client_before) / count,
            "client_after": ready,
            "secs": connect_secs,
        }
        children.stop(client)
        children.stop(server)
        print(
            f"\nidle tunnels: {count} connected in {connect_secs:.1f} s;"
            f" server VmRSS {before / KiB:.1f} -> {after / KiB:.1f} MiB",
            flush=True,
        )

    # -- the table

    def table(self) -> None:
        print("\n" + "=" * 94)
        print(f"{'case':<34} {'tunnel':>12} {'direct':>12} {'ratio':>7}   Go reference")
        print("-" * 94)
        for conns in CONCURRENCY:
            t, d = self.loads.get(("tunnel", conns)), self.loads.get(("direct", conns))
            if not (t and d):
                continue
            go_rps, go_ratio = GO_REQS[conns]
            _row(
                f"GET / req/s, c={conns}",
                f"{t.rps:.0f}",
                f"{d.rps:.0f}",
                t.rps / d.rps if d.rps else None,
                f"{go_rps / 1000:.1f}k req/s ({go_ratio:.2f})",
            )
        for conns in CONCURRENCY:
            t, d = self.loads.get(("tunnel", conns)), self.loads.get(("direct", conns))
            if not (t and d):
                continue
            for label in ("p50", "p99"):
                tv, dv = getattr(t, label), getattr(d, label)
                go = f"{GO_P50_C1_MS} ms" if (label, conns) == ("p50", 1) else ""
                _row(
                    f"GET / {label} ms, c={conns}",
                    _ms(tv),
                    _ms(dv),
                    tv / dv if tv and dv else None,
                    go,
                )
        if len(self.downloads) == 2:
            t, d = self.downloads["tunnel"], self.downloads["direct"]
            _row(
                f"{self.args.download_mib} MiB download, MB/s",
                f"{t:.0f}",
                f"{d:.0f}",
                t / d if d else None,
                f"{GO_DOWNLOAD_MBS[0]:.0f} MB/s ({GO_DOWNLOAD_MBS[1]:.1f})",
            )
        print("-" * 94)
        print(f"{'memory':<34} {'peak MiB':>12} {'now MiB':>12}")
        for name, status in self.memory.items():
            print(
                f"{name + ' process RSS':<34}"
                f" {status['VmHWM'] / KiB:>12.1f} {status['VmRSS'] / KiB:>12.1f}"
            )
        if self.idle:
            idle = self.idle
            print("-" * 94)
            print(
                f"{'idle tunnels (' + str(idle['count']) + ')':<34}"
                f" {'before MiB':>12} {'after MiB':>12} {'KiB/tun':>7}"
            )
            print(
                f"{'server VmRSS':<34} {idle['before'] / KiB:>12.1f} {idle['after'] / KiB:>12.1f}"
                f" {idle['per']:>7.1f}   {GO_IDLE_KIB} KiB per idle tunnel"
            )
            print(
                f"{'client VmRSS (one process)':<34} {idle['client_before'] / KiB:>12.1f}"
                f" {idle['client_after'] / KiB:>12.1f} {idle['client_per']:>7.1f}"
            )
        print("=" * 94)
        print("ratio = tunnel / direct (for latencies: how many times slower)")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(case: str, tunnel: str, direct: str, ratio: float | None, go: str) -> None:
    text = f"{ratio:.2f}" if ratio is not None else "-"
    print(f"{case:<34} {tunnel:>12} {direct:>12} {text:>7}   {go}", flush=True)


# -- profiling -------------------------------------------------------------------


def profile_server(bench: Bench, path: str) -> None:
    """Load the tunnel at c=10 with the server under cProfile; print its top functions."""
    import pstats

    bench.start_tunnel(profile=path)
    result = bench.load("tunnel", 10, bench.args.duration)
    print(
        f"tunnel c=10 under cProfile: {result.rps:.0f} req/s,"
        f" errors {result.errors + result.non2xx},"
        f" server CPU {result.cpu['server']:.0f} %",
        flush=True,
    )
    bench.children.stop(bench.client, grace=10)
    code = bench.children.stop(bench.server, grace=30)
    if not os.path.exists(path):
        raise BenchFailed(f"the server (status {code}) wrote no profile to {path}")
    for key in ("cumulative", "tottime"):
        print(f"\n--- top 25 by {key} ---", flush=True)
        pstats.Stats(path, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(25)


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per load case (default 5)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 s cases, a 16 MiB download, 100 idle tunnels, no warm-up",
    )
    parser.add_argument(
        "--download-mib", type=int, default=None, help="size of the download (default 100)"
    )
    parser.add_argument(
        "--idle-tunnels", type=int, default=None, help="idle tunnels to connect (default 1000)"
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk (installed with apt-get if missing), the Python fallback, or auto",
    )
    parser.add_argument(
        "--profile-server",
        metavar="FILE",
        help="only profile the server (cProfile stats to FILE) under load at c=10",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.duration is None:
        args.duration = 1 if quick else 5
    if args.download_mib is None:
        args.download_mib = 16 if quick else 100
    if args.idle_tunnels is None:
        args.idle_tunnels = 100 if quick else 1000
    if args.duration < 1 or args.duration > 300:
        parser.error("--duration must be 1..300 seconds")
    if args.download_mib < 1 or args.idle_tunnels < 1 or args.idle_tunnels > 5000:
        parser.error("--download-mib must be positive and --idle-tunnels 1..5000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.wrk = None
    if args.loadgen != "python":
        args.wrk = find_wrk(allow_install=True)
        if args.wrk is None and args.loadgen == "wrk":
            print("wrk is not available", file=sys.stderr)
            return 1
    import twisted

    loadgen = "wrk" if args.wrk else "Python fallback load generator (slower than wrk)"
    print(
        f"tunnel HTTP benchmark: Python {platform.python_version()}, Twisted {twisted.__version__},"
        f" {os.cpu_count()} cores, load: {loadgen}, {args.duration} s per case",
        flush=True,
    )
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"note: load average {busy:.2f} before the run; other work may skew the figures")
    tmp = tempfile.mkdtemp(prefix="tunnel-bench-")
    children = Children(tmp)
    bench = Bench(args, children)
    ok = False
    try:
        if args.profile_server:
            profile_server(bench, args.profile_server)
            ok = True
            return 0
        bench.start_tunnel()
        bench.requests()
        bench.downloads_case()
        bench.memory_case()
        bench.idle_case()
        bench.table()
        ok = not bench.failures
        for failure in bench.failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 0 if ok else 1
    except (BenchFailed, subprocess.TimeoutExpired, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
