"""Go's koding/tunnel pair next to ours, back to back in one run, against one origin.

The measuring instrument of issue 9.  Two tunnels run side by side on
127.0.0.1, each process on its own (ports chosen by the OS):

* the **Go pair**: ``refserver -listen 127.0.0.1:0 -vhost app.localhost=ID``
  and ``refclient -server ADDR -ident ID -local ORIGIN`` (koding/tunnel, from
  ``../shared/goref`` next to this checkout, or ``$TUNNEL_GOREF``);
* **our pair**: ``twistd -n tunnel-server --listen
  tcp:PORT:interface=127.0.0.1:backlog=1024 --vhost app.localhost=ID`` and
  ``twistd -n tunnel-client --server tcp:127.0.0.1:PORT --identifier-file F
  --local tcp:127.0.0.1:ORIGIN`` (``tunnel`` imported from this checkout, or
  from ``--tree DIR``);
* one **origin** both clients forward to: the Go ``reforigin`` (``GET /hello``
  -> ``hello``, ``GET /blob?n=N`` -> N bytes);
* the load: ``wrk`` and ``curl``, one case at a time (both tunnels are up all
  the time; only one is loaded at a time).

Each pair's processes start once and serve every round.  In each round
(``--rounds``, default 3) every case runs on the Go pair and then on ours,
the other way round in the next round; each figure is the **median over the
rounds**, and its ratio is ours / Go:

1. **req/s** of ``GET /hello`` with ``Host: app.localhost`` at 1, 10 and 50
   keep-alive connections, ``--duration`` seconds each (default 5; ``wrk -t
   min(c, 2) -c C -d D --latency``).  Goal: ratio >= 1.0 each.
2. **p50 latency at c=1**, from wrk's latency distribution.  Goal: <= 1.0.
3. **CPU per request, server + client**: the CPU seconds (utime + stime from
   ``/proc/PID/stat``, all threads) the tunnel server and tunnel client
   processes used from the start of the c=10 case's wrk to 0.2 s after it
   ended, plus the same for the c=50 case, divided by the requests wrk
   completed in those two cases, in microseconds; one value per round.  The
   origin and wrk are not counted.  Goal: <= 1.0.
4. **100 MiB download** (``GET /blob?n=104857600``) with ``curl -o
   /dev/null``, in MB/s (10^6 bytes/s): the median of 3 downloads per round.
   Goal: ratio >= 1.2.  Next to it, for reference, the **CPU per MiB** the
   tunnel server and client used during those downloads (``/proc`` as in 3,
   in milliseconds per MiB): a figure that other work on the machine moves
   far less than it moves the throughput of four processes on two cores.

Once per run, after the rounds:

5. **Server RSS per idle tunnel**: a separate server per pair with 1,000
   vhosts ``ident{i}.localhost`` for identifiers ``ident{i}`` (Go:
   ``refserver -many 1000 -prefix ident``; ours: 1,000 ``--vhost`` flags), its
   VmRSS read 0.5 s after it answers and again 1 s after Go's ``manyclients -n
   1000 -prefix ident`` printed ``connected 1000/1000``: (after - before) /
   1000, in KiB.  The same Go clients for both servers.  Goal: <= 0.5.
6. **Stalled consumer**: on a fresh pair of each kind (the rounds' servers
   keep memory freed after their downloads, which would hide growth), after 20
   ``GET /hello`` and a 4 MiB download to warm it up, a raw socket sends ``GET
   /blob?n=1073741824`` through the tunnel, reads the head and 64 KiB of body
   and then stops reading (the socket stays open).  The tunnel server's VmRSS
   is sampled every 0.1 s until it is stable (within 256 KiB over the last
   1 s; at most 15 s); the figure is its growth over the VmRSS read just
   before the request, in MiB.
   Our server must stay within two stream windows + 4 MiB, a window being
   the largest a tunnel session's stream may have in the tree measured
   (``LARGE_WINDOWS``: ``max_grown_window``, else ``max_stream_window``);
   Go's is shown for reference.  The socket is then closed and ``GET /hello`` must
   answer 200 again within 10 s.

``--mixed`` adds req/s at c=10 and c=50 of our server with the Go client and
of the Go server with our client (each server gets a second vhost,
``mixed.localhost``, whose client is the other pair's), reported without goal.

When the Go programs are missing or cannot run, one line says that the Go
pair is skipped and why, and ours is measured alone against a Python origin
with the same routes (``bench/harness.py``'s), without ratios; the idle
tunnels are then ``TunnelClientService`` instances in one Python process.

Run it from the repository root::

    .venv/bin/python bench/compare.py [--rounds N] [--duration S] [--mixed]
    .venv/bin/python bench/compare.py --quick     # 1 round of 1 s cases, small sizes
    .venv/bin/python bench/compare.py --tree ../other-checkout --json figures.json

``--quick``: 1 round, 1 s cases, a 16 MiB download, 100 idle tunnels, a
256 MiB stalled download, no warm-up.  ``--only go|ours`` measures one pair.
``--cases`` picks the cases (``load`` for 1-3, ``download``, ``idle``,
``stall``; default all), e.g. ``--cases download --rounds 3``.
``--json FILE`` writes every raw figure.  A default run takes about 2 minutes
(3 with ``--mixed``).

A wrk run with socket errors or non-2xx answers, a short or failed download,
a stalled request not answered 200 or a server that does not recover fails
its figure (FAIL, with the reason under the table).  Every child is stopped
(SIGTERM, then SIGKILL) when the script ends, also on Ctrl-C or a failure,
and gets SIGKILL if the script itself is killed.  Exit status: 0 when every
row passes, 2 when all was measured but a goal is missed, 1 when something
failed (a process died, a load had errors, ...).

The figures move by 10-30 % between runs on a 2-core machine, more when
something else is running: check the load average printed first.
"""

from __future__ import annotations

import os
import sys

# bench/ last on sys.path: bench/http.py would otherwise shadow the standard
# library's http package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from harness import (  # noqa: E402
    IDLE_CLIENTS,
    ORIGIN,
    READY_TIMEOUT,
    ROOT,
    BenchFailed,
    Children,
    CpuMeter,
    KiB,
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
IDENT = "compare-identifier-0123456789"
MIXED_HOST = "mixed.localhost"
MIXED_IDENT = "compare-mixed-0123456789"
#: idle tunnels: identifiers ident0.., hosts ident0.localhost.. (lower case: Go
#: looks the Host up lower-cased)
IDLE_PREFIX = "ident"
CONCURRENCY = (1, 10, 50)
CPU_CASES = (10, 50)
MIXED_CASES = (10, 50)
DOWNLOAD_RUNS = 3
CASES = ("load", "download", "idle", "stall")
SETTLE = 0.2  # seconds after a load that still count towards its CPU
IDLE_TIMEOUT = 120.0
IDLE_BATCH = 50
STALL_READ = 64 * KiB
STALL_WARMUP_REQUESTS = 20
STALL_WARMUP_MIB = 4
STALL_STABLE_SECS = 1.0
STALL_STABLE_KIB = 256
STALL_LIMIT = 15.0
RECOVER_TIMEOUT = 10.0

GOREF_ENV = "TUNNEL_GOREF"
GO_BINARIES = ("refserver", "refclient", "reforigin", "manyclients")


# -- the Go programs -------------------------------------------------------------


def goref_dir() -> str:
    """Where the Go binaries are: $TUNNEL_GOREF, else ../shared/goref beside the checkout."""
    return os.environ.get(GOREF_ENV) or os.path.join(os.path.dirname(ROOT), "shared", "goref")


def go_missing_reason() -> str | None:
    """Why the Go reference programs cannot run here, or None when they can."""
    folder = goref_dir()
    missing = [name for name in GO_BINARIES if not os.access(os.path.join(folder, name), os.X_OK)]
    if missing:
        return f"not found in {folder} (missing: {', '.join(missing)}; set {GOREF_ENV})"
    for name in GO_BINARIES:
        try:
            done = subprocess.run(
                [os.path.join(folder, name), "-h"], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{folder}/{name} cannot run here: {e}"
        if "Usage of" not in done.stderr + done.stdout:
            return f"{folder}/{name} -h did not print its usage (status {done.returncode})"
    return None


# -- the run ---------------------------------------------------------------------


@dataclass
class Pair:
    """One tunnel (a server and a client process) reached as ``Host: host`` on ``port``."""

    key: str
    label: str
    port: int
    host: str
    server: subprocess.Popen
    client: subprocess.Popen


class Compare:
    def __init__(self, args: argparse.Namespace, children: Children, go: bool) -> None:
        self.args = args
        self.children = children
        self.go = go  # the Go programs can run
        self.go_env: dict[str, str] = {}  # the Go children get an empty environment
        self.pairs: list[Pair] = []
        self.mixed: list[Pair] = []
        self.loads: list[dict] = []
        self.downloads: list[dict] = []
        self.idle: dict[str, dict] = {}
        self.stall: dict[str, dict] = {}
        self.errors: dict[tuple[str, str], list[str]] = {}  # (figure, pair) -> reasons
        self.failures: list[str] = []

    def error(self, figure: str, pair: str, reason: str) -> None:
        self.errors.setdefault((figure, pair), []).append(reason)
        self.failures.append(f"{figure}, {pair}: {reason}")

    # -- processes

    def go_binary(self, name: str) -> str:
        return os.path.join(goref_dir(), name)

    def wait_line(self, name: str, pattern: str, timeout: float) -> re.Match:
        """Wait (bounded) until child ``name``'s output matches ``pattern``."""
        regex = re.compile(pattern, re.M)
        path = os.path.join(self.children.tmp, f"{name}.out")
        deadline = time.monotonic() + timeout
        while True:
            with open(path, encoding="utf-8", errors="replace") as f:
                match = regex.search(f.read())
            if match:
                return match
            self.children.check_alive()
            if time.monotonic() > deadline:
                raise BenchFailed(
                    f"{name} did not print {pattern!r} in {timeout:g} s\n"
                    + self.children.tail(name)
                )
            time.sleep(0.05)

    def start_origin(self) -> None:
        if self.go:
            name = "go-origin"
            argv = [self.go_binary("reforigin"), "-listen", "127.0.0.1:0"]
            self.children.start(name, argv, env=self.go_env)
            self.origin_port = int(self.wait_line(name, r"listening on [\d.]+:(\d+)", 10).group(1))
        else:
            self.origin_port = free_port()
            argv = [sys.executable, "-c", ORIGIN, str(self.origin_port)]
            self.children.start("py-origin", argv)
        wait_http(self.children, self.origin_port, None, 200, READY_TIMEOUT, path="/hello")

    def go_server(self, name: str, flags: list[str]) -> tuple[subprocess.Popen, int]:
        argv = [self.go_binary("refserver"), "-listen", "127.0.0.1:0", "-quiet", *flags]
        proc = self.children.start(name, argv, env=self.go_env)
        port = int(self.wait_line(name, r"listening on [\d.]+:(\d+)", 10).group(1))
        return proc, port

    def our_server(
        self, name: str, vhosts: list[tuple[str, str]], probe: str
    ) -> tuple[subprocess.Popen, int]:
        port = free_port()
        argv = ["tunnel-server", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
        for host, ident in vhosts:
            argv += ["--vhost", f"{host}={ident}"]
        proc = self.children.twistd(name, argv + ["--shutdown-grace", "2"])
        wait_http(self.children, port, probe, None, READY_TIMEOUT, path="/hello")  # answers
        return proc, port

    def go_client(self, name: str, port: int, ident: str) -> subprocess.Popen:
        argv = [self.go_binary("refclient"), "-server", f"127.0.0.1:{port}", "-ident", ident]
        argv += ["-local", f"127.0.0.1:{self.origin_port}", "-quiet"]
        return self.children.start(name, argv, env=self.go_env)

    def our_client(self, name: str, port: int, ident: str) -> subprocess.Popen:
        ident_file = os.path.join(self.children.tmp, f"{name}.identifier")
        with open(ident_file, "w") as f:
            f.write(ident + "\n")
        argv = ["tunnel-client", "--server", f"tcp:127.0.0.1:{port}"]
        argv += ["--identifier-file", ident_file, "--local", f"tcp:127.0.0.1:{self.origin_port}"]
        return self.children.twistd(name, argv + ["--stop-timeout", "2"])

    def ready(self, pair: Pair) -> None:
        wait_http(self.children, pair.port, pair.host, 200, READY_TIMEOUT, path="/hello")
        status, body = http_get(pair.port, "/hello", pair.host)
        if (status, body) != (200, b"hello"):
            raise BenchFailed(f"{pair.label} answered {status} {body[:80]!r}, not hello")

    def start_pair(self, key: str, name: str, mixed: bool = False) -> Pair:
        """Start the Go pair (``key`` "go") or ours as NAME-server and NAME-client;
        with ``mixed`` the server also has MIXED_HOST for a client of the other kind."""
        vhosts = [(HOST, IDENT)] + ([(MIXED_HOST, MIXED_IDENT)] if mixed else [])
        if key == "go":
            flags = [arg for host, ident in vhosts for arg in ("-vhost", f"{host}={ident}")]
            server, port = self.go_server(f"{name}-server", flags)
            client = self.go_client(f"{name}-client", port, IDENT)
            return Pair("go", "Go", port, HOST, server, client)
        server, port = self.our_server(f"{name}-server", vhosts, HOST)
        client = self.our_client(f"{name}-client", port, IDENT)
        return Pair("ours", "ours", port, HOST, server, client)

    def start_pairs(self) -> None:
        only, mixed = self.args.only, self.args.mixed
        for key in ("go", "ours"):
            if only in ("both", key):
                self.pairs.append(self.start_pair(key, key, mixed))
        if mixed:
            go, ours = self.pairs
            client = self.go_client("go-client-mixed", ours.port, MIXED_IDENT)
            label = "our server + Go client"
            self.mixed.append(Pair("ours+go", label, ours.port, MIXED_HOST, ours.server, client))
            client = self.our_client("our-client-mixed", go.port, MIXED_IDENT)
            label = "Go server + our client"
            self.mixed.append(Pair("go+ours", label, go.port, MIXED_HOST, go.server, client))
        for pair in self.pairs + self.mixed:
            self.ready(pair)

    # -- the cases

    def load(self, round_: int, pair: Pair, conns: int, duration: int, record: bool = True):
        meter = CpuMeter({"server": pair.server, "client": pair.client})
        if self.args.wrk:
            result = run_wrk(pair.port, pair.host, conns, duration, path="/hello")
        else:
            result = run_python_load(pair.port, pair.host, conns, duration, path="/hello")
        time.sleep(SETTLE)
        cpu = meter.seconds()
        self.children.check_alive()
        if not record:
            return
        entry = {
            "round": round_,
            "pair": pair.key,
            "conns": conns,
            "rps": result.rps,
            "requests": result.requests,
            "p50_ms": result.p50,
            "p99_ms": result.p99,
            "socket_errors": result.errors,
            "non2xx": result.non2xx,
            "cpu_s": cpu,
        }
        self.loads.append(entry)
        if result.errors or result.non2xx:
            self.error(
                f"req/s c={conns}",
                pair.key,
                f"round {round_}: {result.errors} socket errors,"
                f" {result.non2xx} non-2xx or 3xx responses",
            )
        print(
            f"round {round_}  c={conns:<3} {pair.label:<23} {result.rps:>9,.0f} req/s"
            f"  p50 {_num(result.p50, '.2f')} ms  p99 {_num(result.p99, '.2f')} ms"
            f"  errors {result.errors + result.non2xx}"
            f"  CPU s server/client {cpu['server']:.2f}/{cpu['client']:.2f}",
            flush=True,
        )

    def download_case(self, round_: int, pair: Pair) -> None:
        n = self.args.download_mib * MiB
        rates, cpus = [], []
        for _ in range(DOWNLOAD_RUNS):
            meter = CpuMeter({"server": pair.server, "client": pair.client})
            size, seconds, status = download(pair.port, pair.host, n, 120.0, route="/blob")
            cpu = meter.seconds()
            self.children.check_alive()
            if size != n or status != 200:
                self.error("download", pair.key, f"round {round_}: {status}, {size} of {n} bytes")
                break
            rates.append(n / seconds / 1e6 if seconds else 0.0)
            cpus.append((cpu["server"] + cpu["client"]) * 1e3 / self.args.download_mib)
        if not rates:
            return
        rate, cpu_mib = statistics.median(rates), statistics.median(cpus)
        self.downloads.append(
            {
                "round": round_,
                "pair": pair.key,
                "runs_mbs": rates,
                "mbs": rate,
                "runs_cpu_ms_per_mib": cpus,
                "cpu_ms_per_mib": cpu_mib,
            }
        )
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(
            f"round {round_}  download {pair.label:<20} {rate:>9,.0f} MB/s  (median of {runs})"
            f"  CPU server+client {cpu_mib:.2f} ms/MiB",
            flush=True,
        )

    def rounds(self) -> None:
        duration = self.args.duration
        cases = self.args.cases
        if not self.args.quick:
            for pair in self.pairs + self.mixed:  # warm up: first connections, imports, caches
                self.load(0, pair, 10, 1, record=False)
        for round_ in range(1, self.args.rounds + 1):
            order = self.pairs if round_ % 2 else self.pairs[::-1]
            for conns in CONCURRENCY if "load" in cases else ():
                for pair in order:
                    self.load(round_, pair, conns, duration)
            for pair in order if "download" in cases else ():
                self.download_case(round_, pair)
            mixed = self.mixed if round_ % 2 else self.mixed[::-1]
            for conns in MIXED_CASES if mixed and "load" in cases else ():
                for pair in mixed:
                    self.load(round_, pair, conns, duration)

    def idle_case(self) -> None:
        """RSS of a fresh server per pair before and after N idle clients connect."""
        for pair in self.pairs:
            self.idle[pair.key] = self.idle_one(pair.key)

    def idle_one(self, key: str) -> dict:
        count = self.args.idle_tunnels
        children = self.children
        name = f"idle-{key}-server"
        if key == "go":
            server, port = self.go_server(name, ["-many", str(count), "-prefix", IDLE_PREFIX])
            wait_http(children, port, f"{IDLE_PREFIX}0.localhost", None, READY_TIMEOUT, "/hello")
        else:
            vhosts = [(f"{IDLE_PREFIX}{i}.localhost", f"{IDLE_PREFIX}{i}") for i in range(count)]
            server, port = self.our_server(name, vhosts, f"{IDLE_PREFIX}0.localhost")
        time.sleep(0.5)
        before = proc_status(server.pid)["VmRSS"]
        started = time.monotonic()
        clients_name = f"idle-{key}-clients"
        if self.go:
            argv = [self.go_binary("manyclients"), "-n", str(count), "-prefix", IDLE_PREFIX]
            argv += ["-server", f"127.0.0.1:{port}", "-local", f"127.0.0.1:{self.origin_port}"]
            clients = children.start(clients_name, argv, env=self.go_env)
            self.wait_line(clients_name, rf"^connected {count}/{count}$", IDLE_TIMEOUT)
            kind = "Go manyclients"
        else:  # TunnelClientService instances named ident0.. (IDLE_PREFIX)
            argv = [sys.executable, "-c", IDLE_CLIENTS, str(port), str(self.origin_port)]
            clients = children.start(clients_name, argv + [str(count), str(IDLE_BATCH)])
            self.wait_line(clients_name, r"^ready ", IDLE_TIMEOUT)
            kind = "Python TunnelClientService"
        connect_secs = time.monotonic() - started
        time.sleep(1.0)  # let the last handshakes settle on the server side
        after = proc_status(server.pid)["VmRSS"]
        for i in (0, count - 1):  # the tunnels work, not just the sessions
            status, body = http_get(port, "/hello", f"{IDLE_PREFIX}{i}.localhost")
            if (status, body) != (200, b"hello"):
                self.error("idle", key, f"tunnel {IDLE_PREFIX}{i}: {status} {body[:80]!r}")
        children.stop(clients)
        children.stop(server)
        per = (after - before) / count
        print(
            f"idle tunnels  {key:<6} {count} {kind} clients connected in {connect_secs:.1f} s;"
            f" server VmRSS {before / KiB:.1f} -> {after / KiB:.1f} MiB: {per:.1f} KiB per tunnel",
            flush=True,
        )
        return {
            "count": count,
            "clients": kind,
            "before_kib": before,
            "after_kib": after,
            "per_tunnel_kib": per,
            "connect_secs": connect_secs,
        }

    def stall_case(self) -> None:
        """On a fresh pair of each kind (the rounds' servers keep the memory
        their downloads freed, which would hide growth), warmed up by a few
        requests and a small download."""
        for main in self.pairs:
            pair = self.start_pair(main.key, f"stall-{main.key}")
            self.ready(pair)
            for _ in range(STALL_WARMUP_REQUESTS):
                http_get(pair.port, "/hello", pair.host)
            n = STALL_WARMUP_MIB * MiB
            size, _, status = download(pair.port, pair.host, n, 60.0, route="/blob")
            if (size, status) != (n, 200):
                self.error("stall", pair.key, f"warm-up download: {status}, {size} of {n} bytes")
            time.sleep(0.5)
            self.stall[pair.key] = self.stall_one(pair)
            self.children.stop(pair.client)
            self.children.stop(pair.server)

    def stall_one(self, pair: Pair) -> dict:
        """Growth of the server's RSS behind a public client that stopped reading."""
        size = self.args.stall_mib * MiB

        def rss() -> int:
            return proc_status(pair.server.pid)["VmRSS"]

        before = rss()
        samples: list[tuple[float, int]] = []  # (seconds since the reading stopped, KiB)
        stable = False
        with socket.create_connection(("127.0.0.1", pair.port), timeout=10) as sock:
            problem = self.stall_request(sock, pair.host, size)
            if problem:
                self.error("stall", pair.key, problem)
            else:  # stop reading; watch the server's memory settle
                start = time.monotonic()
                while not stable and time.monotonic() - start < STALL_LIMIT:
                    time.sleep(0.1)
                    elapsed = time.monotonic() - start
                    samples.append((elapsed, rss()))
                    recent = [kib for t, kib in samples if t >= elapsed - STALL_STABLE_SECS]
                    spread = max(recent) - min(recent)
                    stable = elapsed >= STALL_STABLE_SECS and spread <= STALL_STABLE_KIB
        growth = peak = None
        if samples:
            growth = (samples[-1][1] - before) / KiB
            peak = (max(kib for _, kib in samples) - before) / KiB
        recovered = self.recover(pair)
        if recovered is None:
            self.error("stall", pair.key, f"GET /hello not 200 within {RECOVER_TIMEOUT:g} s")
        time.sleep(1.0)
        after_close = rss()
        if samples:
            settle = f"stable after {samples[-1][0]:.1f} s" if stable else "NOT stable"
            grew = f"+ {growth:.1f} MiB ({settle}, peak +{peak:.1f})"
        else:
            grew = "(not measured)"
        back = f"{recovered:.2f} s" if recovered is not None else "never"
        print(
            f"stall         {pair.label:<6} VmRSS {before / KiB:.1f} MiB {grew};"
            f" closed: 200 again in {back},"
            f" VmRSS {after_close / KiB:.1f} MiB 1 s later",
            flush=True,
        )
        return {
            "size": size,
            "before_kib": before,
            "growth_mib": growth,
            "peak_growth_mib": peak,
            "stable": stable,
            "samples": samples,
            "recovered_secs": recovered,
            "after_close_kib": after_close,
        }

    @staticmethod
    def stall_request(sock: socket.socket, host: str, size: int) -> str | None:
        """Ask for SIZE bytes and read the head and STALL_READ bytes of body;
        what went wrong, or None."""
        try:
            sock.sendall(f"GET /blob?n={size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < STALL_READ:
                chunk = sock.recv(16 * KiB)
                if not chunk:
                    break
                data += chunk
        except OSError as e:
            return f"GET /blob?n={size}: {e}"
        head, _, body = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status_line.split()[1:2] != ["200"] or len(body) < STALL_READ:
            return f"GET /blob?n={size}: {status_line!r}, {len(body)} body bytes"
        return None

    def recover(self, pair: Pair) -> float | None:
        """Seconds until GET /hello answers 200 hello again, or None."""
        start = time.monotonic()
        while time.monotonic() - start < RECOVER_TIMEOUT:
            self.children.check_alive()
            try:
                if http_get(pair.port, "/hello", pair.host, timeout=2.0) == (200, b"hello"):
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.05)
        return None

    # -- the figures

    def medians(self) -> dict[str, dict[str, float]]:
        """figure -> pair -> median over the rounds."""
        keys = [p.key for p in self.pairs + self.mixed]
        out: dict[str, dict[str, float]] = {}

        def put(figure: str, key: str, values: list[float]) -> None:
            if values:
                out.setdefault(figure, {})[key] = statistics.median(values)

        rounds = range(1, self.args.rounds + 1)
        for key in keys:
            for conns in CONCURRENCY:
                loads = [e for e in self.loads if e["pair"] == key and e["conns"] == conns]
                put(f"req/s c={conns}", key, [e["rps"] for e in loads])
                if conns == 1:
                    put("p50 ms c=1", key, [e["p50_ms"] for e in loads if e["p50_ms"]])
            per_request = []
            for r in rounds:
                loads = [
                    e
                    for e in self.loads
                    if (e["pair"], e["round"]) == (key, r) and e["conns"] in CPU_CASES
                ]
                requests = sum(e["requests"] for e in loads)
                if len(loads) == len(CPU_CASES) and requests:
                    cpu = sum(e["cpu_s"]["server"] + e["cpu_s"]["client"] for e in loads)
                    per_request.append(cpu / requests * 1e6)
            put("CPU us/req", key, per_request)
            downloads = [d for d in self.downloads if d["pair"] == key]
            put("download", key, [d["mbs"] for d in downloads])
            put("download CPU", key, [d["cpu_ms_per_mib"] for d in downloads])
            if key in self.idle:
                out.setdefault("idle", {})[key] = self.idle[key]["per_tunnel_kib"]
            if self.stall.get(key, {}).get("growth_mib") is not None:
                out.setdefault("stall", {})[key] = self.stall[key]["growth_mib"]
        return out

    def rows(self) -> list[dict]:
        medians = self.medians()
        window_mib = self.args.window / MiB
        bound = 2 * window_mib + 4
        specs = [
            *((f"req/s c={c}", f"req/s c={c}", "{:,.0f}", ">=", 1.0) for c in CONCURRENCY),
            ("p50 ms c=1", "p50 ms c=1", "{:.2f}", "<=", 1.0),
            ("CPU us/req", "CPU us/req srv+cli", "{:.0f}", "<=", 1.0),
            ("download", f"download MB/s {self.args.download_mib} MiB", "{:,.0f}", ">=", 1.2),
            ("idle", f"RSS KiB/idle tunnel ({self.args.idle_tunnels})", "{:.1f}", "<=", 0.5),
        ]
        rows = []
        for figure, label, fmt, op, goal in specs:
            values = medians.get(figure, {})
            go, ours = values.get("go"), values.get("ours")
            ratio = ours / go if go and ours is not None else None
            bad = self._bad(figure)
            passed = None
            if ratio is not None:
                passed = (ratio >= goal if op == ">=" else ratio <= goal) and not bad
            elif bad:
                passed = False
            rows.append(
                {
                    "figure": label,
                    "go": go,
                    "ours": ours,
                    "ratio": ratio,
                    "goal": f"{op} {goal}",
                    "pass": passed,
                    "fmt": fmt,
                }
            )
        values = medians.get("download CPU", {})
        go, ours = values.get("go"), values.get("ours")
        rows.append(
            {
                "figure": "download CPU ms/MiB srv+cli",
                "go": go,
                "ours": ours,
                "ratio": ours / go if go and ours is not None else None,
                "goal": "(ref)",
                "pass": None,
                "fmt": "{:.2f}",
            }
        )
        values = medians.get("stall", {})
        go, ours = values.get("go"), values.get("ours")
        passed = None
        if ours is not None or self._bad("stall"):
            passed = ours is not None and ours <= bound and not self._bad("stall")
        rows.append(
            {
                "figure": f"stall growth MiB ({self.args.stall_mib} MiB)",
                "go": go,
                "ours": ours,
                "ratio": None,
                "goal": f"<= {bound:.1f}",
                "pass": passed,
                "fmt": "{:.1f}",
                "bound_mib": bound,
                "window_bytes": self.args.window,
            }
        )
        return rows

    def _bad(self, figure: str) -> bool:
        """Whether a measurement behind ``figure`` of the Go pair or ours had errors."""
        behind = {"CPU us/req": ("req/s c=10", "req/s c=50"), "p50 ms c=1": ("req/s c=1",)}
        names = behind.get(figure, (figure,))
        return any((name, key) in self.errors for name in names for key in ("go", "ours"))

    def table(self, rows: list[dict]) -> None:
        print()
        print(f"{'figure':<28}{'Go':<11}{'ours':<11}{'ours/Go':<10}{'goal':<10}")
        for row in rows:
            fmt = row["fmt"]
            go = "-" if row["go"] is None else fmt.format(row["go"])
            ours = "-" if row["ours"] is None else fmt.format(row["ours"])
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
            mark = {True: "PASS", False: "FAIL", None: ""}[row["pass"]]
            print(f"{row['figure']:<28}{go:<11}{ours:<11}{ratio:<10}{row['goal']:<10}{mark}")
        window = self.args.window
        print(
            f"(medians of {self.args.rounds} round(s); stall goal: two windows of"
            f" {window // KiB} KiB + 4 MiB, for ours; Go's for reference)"
        )
        if self.mixed:
            medians = self.medians()
            print(f"\n{'mixed pairs, req/s':<28}" + "".join(f"{f'c={c}':<11}" for c in MIXED_CASES))
            for pair in self.mixed:
                cells = [medians.get(f"req/s c={c}", {}).get(pair.key) for c in MIXED_CASES]
                text = "".join(f"{'-' if v is None else f'{v:,.0f}':<11}" for v in cells)
                print(f"{pair.label:<28}{text}")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


#: the largest window a stream of a tunnel session may have (trees before
#: LARGE_WINDOWS use YamuxConfig(), trees before max_grown_window a fixed window)
_WINDOW = """
from tunnel.yamux import config
c = getattr(config, "LARGE_WINDOWS", None) or config.YamuxConfig()
print(getattr(c, "max_grown_window", None) or c.max_stream_window)
"""


def stream_window(tree: str) -> int:
    """The largest stream window of a tunnel session, as the measured tree has it."""
    code = _WINDOW
    env = dict(os.environ, PYTHONPATH=tree)
    argv = [sys.executable, "-c", code]  # -c: the working directory comes first on sys.path
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, timeout=30)
    if done.returncode != 0:
        raise BenchFailed(f"cannot read YamuxConfig from {tree}: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def describe_tree(tree: str) -> str:
    """``BRANCH COMMIT[-dirty]`` of a checkout, as git tells it."""
    words = []
    for argv in (["rev-parse", "--abbrev-ref", "HEAD"], ["describe", "--always", "--dirty"]):
        try:
            done = subprocess.run(
                ["git", "-C", tree, *argv], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return "git not available"
        if done.returncode != 0:
            return "not a git checkout"
        words.append(done.stdout.strip())
    return " ".join(words)


# -- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    parser.add_argument(
        "--duration", type=int, default=None, help="seconds per load case (default 5)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 1 s cases, a 16 MiB download, 100 idle tunnels, a 256 MiB stall",
    )
    parser.add_argument(
        "--only", choices=("both", "go", "ours"), default="both", help="pairs to measure"
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="also req/s of our server + Go client and Go server + our client",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases to run, of {', '.join(CASES)} (default: all)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every raw figure to FILE")
    parser.add_argument(
        "--tree", metavar="DIR", help="run our pair from this checkout (default: this one)"
    )
    args = parser.parse_args(argv)
    args.cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown or not args.cases:
        parser.error(f"--cases takes some of {', '.join(CASES)}; not {', '.join(unknown)}")
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else 1 if quick else 3
    args.duration = args.duration if args.duration is not None else 1 if quick else 5
    args.download_mib = 16 if quick else 100
    args.idle_tunnels = 100 if quick else 1000
    args.stall_mib = 256 if quick else 1024
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be 1..300 seconds")
    args.tree = os.path.abspath(args.tree) if args.tree else ROOT
    if not os.path.isdir(os.path.join(args.tree, "tunnel")):
        parser.error(f"--tree {args.tree} has no tunnel/ package")
    if args.mixed and args.only != "both":
        parser.error("--mixed needs both pairs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    import twisted

    load1, load5, load15 = os.getloadavg()
    print(
        f"tunnel vs koding/tunnel: Python {platform.python_version()},"
        f" Twisted {twisted.__version__}, {os.cpu_count()} cores;"
        f" load average {load1:.2f} {load5:.2f} {load15:.2f}",
        flush=True,
    )
    reason = go_missing_reason()
    go = reason is None  # with --only ours too: the Go origin and idle clients
    if reason is not None:
        if args.only == "go":
            print(f"cannot measure the Go pair: Go programs {reason}", file=sys.stderr)
            return 1
        print(f"Go pair skipped: Go programs {reason}; ours alone, against a Python origin")
        args.only, args.mixed = "ours", False
    args.wrk = find_wrk(allow_install=True)
    args.window = stream_window(args.tree)
    print(
        f"ours from {args.tree} ({describe_tree(args.tree)}); Go from {goref_dir()}\n"
        f"{args.rounds} round(s), {args.duration} s per load case,"
        f" load: {'wrk' if args.wrk else 'Python fallback load generator (slower than wrk)'},"
        f" origin: {'Go reforigin' if go else 'Python (bench/harness.py)'}",
        flush=True,
    )
    if load1 > 0.5:
        print(f"note: load average {load1:.2f}; other work may skew the figures", flush=True)

    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    tmp = tempfile.mkdtemp(prefix="tunnel-compare-")
    children = Children(tmp, tree=args.tree, die_with_parent=True)
    bench = Compare(args, children, go)
    ok = False
    try:
        bench.start_origin()
        bench.start_pairs()
        bench.rounds()
        if "idle" in args.cases:
            bench.idle_case()
        if "stall" in args.cases:
            bench.stall_case()
        rows = bench.rows()
        bench.table(rows)
        for failure in bench.failures:
            print(f"FAILED: {failure}")
        elapsed = time.monotonic() - began
        print(f"\n{elapsed:.0f} s in all", flush=True)
        if args.json:
            write_json(args, bench, rows, elapsed, reason)
        ok = not bench.failures
        if not ok:
            return 1
        return 0 if all(row["pass"] is not False for row in rows) else 2
    except (BenchFailed, subprocess.TimeoutExpired, OSError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


def write_json(
    args: argparse.Namespace, bench: Compare, rows: list[dict], elapsed: float, skipped: str | None
) -> None:
    data = {
        "meta": {
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "rounds": args.rounds,
            "duration": args.duration,
            "quick": args.quick,
            "tree": args.tree,
            "tree_git": describe_tree(args.tree),
            "goref": goref_dir(),
            "go_skipped": skipped,
            "window_bytes": args.window,
            "download_mib": args.download_mib,
            "idle_tunnels": args.idle_tunnels,
            "stall_mib": args.stall_mib,
            "cases": list(args.cases),
            "loadgen": "wrk" if args.wrk else "python",
            "elapsed_secs": elapsed,
        },
        "figures": [{k: v for k, v in row.items() if k != "fmt"} for row in rows],
        "mixed": {
            pair.key: {
                f"req/s c={c}": bench.medians().get(f"req/s c={c}", {}).get(pair.key)
                for c in MIXED_CASES
            }
            for pair in bench.mixed
        },
        "loads": bench.loads,
        "downloads": bench.downloads,
        "idle": bench.idle,
        "stall": bench.stall,
        "failures": bench.failures,
    }
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    print(f"raw figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
