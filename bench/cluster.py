"""What a cluster costs: a request forwarded across nodes next to one served
locally, and what the nodes ask of Redis.

Separate processes, all on 127.0.0.1 with ports chosen by the OS:

* ``redis-server`` (Debian's), in a temporary folder, nothing saved;
* the origin: the Python origin of ``bench/harness.py`` (``/hello``,
  ``/bytes?n=N``);
* two nodes, ``twistd tunnel-server --redis ... --cluster-listen ...``
  (``a`` and ``b``), sharing the registry and the presence records in Redis;
* one ``twistd tunnel-client`` connected to ``b`` only;
* the load generator (``wrk``, or the Python fallback of ``harness.py``).

Cases, interleaved over ``--rounds`` rounds (medians reported):

* **load**: ``GET /hello`` at 1, 10 and 50 keep-alive connections for
  ``--duration`` seconds, through ``b`` (the node that holds the client:
  served locally) and through ``a`` (forwarded over the cluster link to
  ``b``): req/s, p50, and the CPU time per request of each node and of the
  client (from ``/proc``), plus the Redis commands per request (``INFO
  commandstats`` before and after);
* **download**: ``/bytes?n=`` (``--download-mib``, 100 by default) through
  ``b`` and through ``a``, MB/s (best of 3);
* **presence**: ``--idle-tunnels`` more clients (one process of
  ``TunnelClientService`` instances, as ``bench/http.py`` does) connect to
  ``b``; then, with nothing else going on for ``--idle-window`` seconds,
  what the two nodes ask of Redis per second: round trips (scripts and
  PINGs), commands run (Redis counts those a script runs too) and the
  microseconds Redis is busy with them (``INFO commandstats``), next to the
  same window with one tunnel: the cost of keeping N tunnels' records alive;
  and node ``b``'s VmRSS per tunnel;
* **connections** (first, while node ``a`` is fresh: after the load its
  heap has room that was freed): ``--idle-connections`` public keep-alive
  connections to ``a``, each after one forwarded request, left idle: node
  ``a``'s VmRSS per connection.

Run it from the repository root::

    .venv/bin/python bench/cluster.py [--rounds N] [--duration S] [--quick]

Every load is bounded in time; every child is stopped before the script
exits.  Exit status 1 if a case failed (non-2xx answers, socket errors, a
short download, a child that died).
"""

from __future__ import annotations

import os
import sys

# bench/ last on sys.path: bench/http.py would otherwise shadow the standard
# library's http package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import argparse  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from harness import (  # noqa: E402
    IDLE_CLIENTS,
    ORIGIN,
    READY_TIMEOUT,
    BenchFailed,
    Children,
    cpu_seconds,
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
IDENT = "cluster-bench-identifier"
SECRET = "cluster-bench-secret-0123456789"
IDLE_BATCH = 50
IDLE_TIMEOUT = 120.0


def redis_command(port: int, *args: str) -> bytes:
    """One command to Redis on 127.0.0.1:``port``, its reply's raw bytes."""
    payload = b"*%d\r\n" % len(args)
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
            if reply.startswith(b"$"):
                size, _, rest = reply[1:].partition(b"\r\n")
                if len(rest) >= int(size) + 2:
                    return rest[: int(size)]
            elif reply.endswith(b"\r\n"):
                return reply
    return reply


def commandstats(port: int) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) from ``INFO commandstats``."""
    stats = {}
    for line in redis_command(port, "INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            values = dict(f.split("=") for f in fields.split(","))
            stats[name] = (int(values["calls"]), int(values["usec"]))
    return stats


#: what a node sends itself; every other command counted ran inside a script
#: (Redis 7 counts those in commandstats too)
SENT = {"eval", "evalsha", "ping", "subscribe", "auth", "select"}


def counted(before: dict, after: dict) -> tuple[int, int, int]:
    """(round trips, commands run, usec) between two commandstats: round
    trips are what nodes sent (scripts, PINGs), commands run include those
    the scripts ran; INFO itself left out."""
    sent = run = usec = 0
    for name, (c, u) in after.items():
        if name == "info":
            continue
        c0, u0 = before.get(name, (0, 0))
        run += c - c0
        if name in SENT:
            sent += c - c0
            usec += u - u0  # a script's time includes the commands it ran
    return sent, run, usec


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children) -> None:
        self.args = args
        self.children = children
        self.tmp = children.tmp
        self.rows: dict[str, list[dict]] = {}
        self.downloads: dict[str, list[float]] = {}
        self.failures: list[str] = []

    # -- processes ------------------------------------------------------------------

    def start(self) -> None:
        self.redis_port = free_port()
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        argv = [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", self.tmp]
        self.children.start("redis", argv)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if redis_command(self.redis_port, "PING").startswith(b"+PONG"):
                    break
            except OSError:
                pass
            self.children.check_alive()
            if time.monotonic() > deadline:
                raise BenchFailed("redis-server did not start")
            time.sleep(0.05)
        self.origin_port = free_port()
        self.children.start("origin", [sys.executable, "-c", ORIGIN, str(self.origin_port)])
        wait_http(self.children, self.origin_port, None, 200, READY_TIMEOUT, path="/hello")
        with open(os.path.join(self.tmp, "secret"), "w") as f:
            f.write(SECRET + "\n")
        with open(os.path.join(self.tmp, "vhosts"), "w") as f:
            f.write(f"{HOST}={IDENT}\n")
            for i in range(self.args.idle_tunnels):
                f.write(f"h{i}.localhost=ident{i}\n")
        with open(os.path.join(self.tmp, "identifier"), "w") as f:
            f.write(IDENT + "\n")
        self.ports = {}
        self.procs = {}
        for name in ("a", "b"):
            self.procs[name], self.ports[name] = self.node(name)
        argv = ["tunnel-client", "--server", f"tcp:127.0.0.1:{self.ports['b']}"]
        argv += ["--identifier-file", os.path.join(self.tmp, "identifier")]
        argv += ["--local", f"tcp:127.0.0.1:{self.origin_port}", "--stop-timeout", "2"]
        self.procs["client"] = self.children.twistd("client", argv)
        for name in ("b", "a"):
            wait_http(self.children, self.ports[name], HOST, 200, READY_TIMEOUT, path="/hello")
            status, body = http_get(self.ports[name], "/hello", HOST)
            if (status, body) != (200, b"hello"):
                raise BenchFailed(f"node {name} answered {status} {body[:80]!r}")

    def node(self, name: str):
        port, cluster = free_port(), free_port()
        argv = ["tunnel-server", "--listen", f"tcp:{port}:interface=127.0.0.1:backlog=1024"]
        argv += ["--vhost-file", os.path.join(self.tmp, "vhosts")]
        argv += ["--redis", f"tcp:127.0.0.1:{self.redis_port}", "--redis-prefix", "bench:"]
        argv += ["--node-name", name, "--cluster-secret-file", os.path.join(self.tmp, "secret")]
        argv += ["--cluster-listen", f"tcp:{cluster}:interface=127.0.0.1"]
        argv += ["--cluster-advertise", f"127.0.0.1:{cluster}", "--shutdown-grace", "2"]
        return self.children.twistd(name, argv), port

    # -- cases ------------------------------------------------------------------------

    def load(self, via: str, conns: int) -> None:
        procs = {name: self.procs[name] for name in ("a", "b", "client")}
        cpu_before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        redis_before = commandstats(self.redis_port)
        port, duration = self.ports[via], self.args.duration
        if self.args.wrk:
            result = run_wrk(port, HOST, conns, duration, path="/hello")
        else:
            result = run_python_load(port, HOST, conns, duration, path="/hello")
        calls, _, _ = counted(redis_before, commandstats(self.redis_port))
        cpu = {name: cpu_seconds(p.pid) - cpu_before[name] for name, p in procs.items()}
        self.children.check_alive()
        if result.errors or result.non2xx:
            self.failures.append(
                f"via {via} c={conns}: {result.errors} socket errors, {result.non2xx} non-2xx"
            )
        requests = max(result.requests, 1)
        self.rows.setdefault(f"{via} c={conns}", []).append(
            {
                "rps": result.rps,
                "p50": result.p50,
                "cpu_us": {name: 1e6 * s / requests for name, s in cpu.items()},
                "redis_per_request": calls / requests,
            }
        )

    def download_case(self, via: str) -> None:
        n = self.args.download_mib * 1024 * 1024
        best = 0.0
        for _ in range(3):
            size, seconds, status = download(self.ports[via], HOST, n, timeout=60)
            if status != 200 or size != n:
                self.failures.append(f"download via {via}: {status}, {size} of {n} bytes")
                return
            best = max(best, size / seconds / 1e6)
        self.downloads.setdefault(via, []).append(best)

    def presence_case(self) -> dict:
        count = self.args.idle_tunnels
        window = self.args.idle_window
        quiet_before = commandstats(self.redis_port)
        time.sleep(window)  # measuring an idle period: the wait is the measurement
        sent0, run0, usec0 = counted(quiet_before, commandstats(self.redis_port))
        rss_before = proc_status(self.procs["b"].pid)["VmRSS"]
        argv = [sys.executable, "-c", IDLE_CLIENTS, str(self.ports["b"]), str(self.origin_port)]
        argv += [str(count), str(IDLE_BATCH)]
        self.children.start("idle-clients", argv)
        out = os.path.join(self.tmp, "idle-clients.out")
        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            with open(out) as f:
                text = f.read()
            if "ready" in text:
                break
            if "failed" in text or time.monotonic() > deadline:
                raise BenchFailed("idle clients did not connect:\n" + text[-2000:])
            self.children.check_alive()
            time.sleep(0.1)
        rss_after = proc_status(self.procs["b"].pid)["VmRSS"]
        connected = commandstats(self.redis_port)
        time.sleep(window)
        sent1, run1, usec1 = counted(connected, commandstats(self.redis_port))
        return {
            "tunnels": count + 1,
            "rss_per_tunnel_kib": (rss_after - rss_before) / count,
            "window": window,
            "before": {"sent": sent0 / window, "run": run0 / window, "usec": usec0 / window},
            "after": {"sent": sent1 / window, "run": run1 / window, "usec": usec1 / window},
        }

    def connections_case(self) -> dict:
        """VmRSS of node a before and after N public keep-alive connections,
        each of which made one forwarded request, sit idle on it."""
        count = self.args.idle_connections
        proc = self.procs["a"]
        before = proc_status(proc.pid)["VmRSS"]
        request = f"GET /hello HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        socks = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", self.ports["a"]), timeout=10)
                sock.sendall(request)
                answer = b""
                while not answer.endswith(b"hello"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise BenchFailed(f"a closed an idle connection: {answer[:200]!r}")
                    answer += chunk
                socks.append(sock)
            after = proc_status(proc.pid)["VmRSS"]
        finally:
            for sock in socks:
                sock.close()
        return {"connections": count, "rss_per_connection_kib": (after - before) / count}

    # -- report ---------------------------------------------------------------------

    def report(self, presence: dict | None, connections: dict | None) -> None:
        print(
            f"\n{'case':<16} {'req/s':>8} {'p50 ms':>7} {'CPU/req µs a':>13} {'b':>6}"
            f" {'client':>7} {'Redis trips/req':>16}"
        )
        for conns in self.args.concurrency:
            for via in ("b", "a"):
                runs = self.rows.get(f"{via} c={conns}", [])
                if not runs:
                    continue
                med = statistics.median
                cpu = {n: med(r["cpu_us"][n] for r in runs) for n in ("a", "b", "client")}
                label = f"{'local' if via == 'b' else 'forwarded'} c={conns}"
                p50 = med(r["p50"] for r in runs if r["p50"] is not None)
                print(
                    f"{label:<16} {med(r['rps'] for r in runs):>8,.0f} {p50:>7.2f}"
                    f" {cpu['a']:>9.0f} {cpu['b']:>6.0f} {cpu['client']:>7.0f}"
                    f" {med(r['redis_per_request'] for r in runs):>16.4f}"
                )
        if self.rows.get("a c=1") and self.rows.get("b c=1"):
            hop = statistics.median(r["p50"] for r in self.rows["a c=1"]) - statistics.median(
                r["p50"] for r in self.rows["b c=1"]
            )
            print(f"\ncross-node hop at c=1: +{hop:.2f} ms p50")
        for via, values in self.downloads.items():
            label = "local" if via == "b" else "forwarded"
            print(f"download {label}: {statistics.median(values):,.0f} MB/s")
        if presence:
            print(
                f"\nRedis, two idle nodes ({presence['window']:g} s windows):"
                " round trips/s, commands run/s (inside scripts too), Redis busy µs/s"
            )
            for label, figures in (
                ("1 tunnel", presence["before"]),
                (f"{presence['tunnels']:,} tunnels", presence["after"]),
            ):
                print(
                    f"  {label:<16} {figures['sent']:>8.1f} {figures['run']:>10.1f}"
                    f" {figures['usec']:>8.0f}"
                )
            print(f"node b VmRSS per tunnel: {presence['rss_per_tunnel_kib']:.1f} KiB")
        if connections:
            per = connections["rss_per_connection_kib"]
            print(
                f"node a VmRSS per idle public connection ({connections['connections']:,},"
                f" each after one forwarded request): {per:.1f} KiB"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="seconds per load case")
    p.add_argument("--download-mib", type=int, default=100)
    p.add_argument("--idle-tunnels", type=int, default=1000)
    p.add_argument("--idle-window", type=float, default=10.0)
    p.add_argument("--idle-connections", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="1 round of 1 s cases, 100 idle tunnels")
    p.add_argument("--loadgen", choices=("wrk", "python"), default="wrk")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.download_mib = 1, 1, 16
        args.idle_tunnels, args.idle_window, args.idle_connections = 100, 3.0, 100
    args.concurrency = (1, 10, 50)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("redis-server") and not os.access("/usr/bin/redis-server", os.X_OK):
        print("redis-server is not installed (Debian's redis-server package)", file=sys.stderr)
        return 1
    args.wrk = find_wrk(allow_install=True) if args.loadgen == "wrk" else None
    load1, _, _ = os.getloadavg()
    print(
        f"cluster: {os.cpu_count()} cores, load average {load1:.2f};"
        f" {args.rounds} round(s) of {args.duration} s cases;"
        f" load: {'wrk' if args.wrk else 'Python fallback'}",
        flush=True,
    )
    tmp = tempfile.mkdtemp(prefix="tunnel-cluster-")
    children = Children(tmp, die_with_parent=True)
    bench = Bench(args, children)
    ok = False
    try:
        bench.start()
        # first, on a fresh node: later the heap has room freed by the load
        connections = bench.connections_case() if args.idle_connections else None
        for _ in range(args.rounds):
            for conns in args.concurrency:
                for via in ("b", "a"):
                    bench.load(via, conns)
            for via in ("b", "a"):
                bench.download_case(via)
        presence = bench.presence_case() if args.idle_tunnels else None
        bench.report(presence, connections)
        for failure in bench.failures:
            print(f"FAILED: {failure}")
        ok = not bench.failures
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
