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
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST = "app.localhost"
IDENT = "bench-identifier-0123456789"
CONCURRENCY = (1, 10, 50)
MiB = 1024 * 1024
KiB = 1024
IDLE_TIMEOUT = 120.0
IDLE_BATCH = 50
READY_TIMEOUT = 30.0
DOWNLOAD_RUNS = 3

GO_REQS = {1: (1800, 0.09), 10: (5500, 0.05), 50: (7300, 0.06)}
GO_P50_C1_MS = 0.51
GO_DOWNLOAD_MBS = (700.0, 0.2)
GO_IDLE_KIB = 38

# -- the child programs ----------------------------------------------------------

#: the origin: ``/`` -> hello, ``/bytes?n=N`` -> N bytes from a push producer
ORIGIN = r"""
import sys
from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

CHUNK = bytes(range(256)) * 256  # 64 KiB


@implementer(IPushProducer)
class Bytes:
    def __init__(self, request, n):
        self.request, self.left = request, n
        self.paused = self.stopped = False

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.stopped = True

    def resumeProducing(self):
        self.paused = False
        write = self.request.write
        while not self.paused and not self.stopped and self.left:
            n = min(len(CHUNK), self.left)
            write(CHUNK if n == len(CHUNK) else CHUNK[:n])
            self.left -= n
        if not self.left and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()


class Origin(Resource):
    isLeaf = True

    def render(self, request):
        if request.path == b"/":
            request.setHeader(b"content-type", b"text/plain")
            return b"hello"
        if request.path == b"/bytes":
            n = int(request.args.get(b"n", [b"0"])[0])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % n)
            if request.method == b"HEAD" or not n:
                return b""
            producer = Bytes(request, n)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found"


class QuietSite(Site):
    def log(self, request):
        pass


reactor.listenTCP(int(sys.argv[1]), QuietSite(Origin()), backlog=1024, interface="127.0.0.1")
reactor.run()
"""

#: many tunnel clients in one reactor; prints "before RSS", then "ready N RSS"
IDLE_CLIENTS = r"""
import sys
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure
from tunnel.client.backoff import exponential_backoff
from tunnel.client import TunnelClientService
from tunnel.client.local import LocalForwarder, LocalTargets

server_port, origin_port, count, batch = (int(a) for a in sys.argv[1:5])


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def say(*words):
    print(*words, flush=True)


async def main():
    targets = LocalTargets(reactor, default=f"tcp:127.0.0.1:{origin_port}")
    forwarder = LocalForwarder(targets.endpoint_for)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server_port)
    say("before", rss_kib())
    services = []
    for start in range(0, count, batch):
        waits = []
        for i in range(start, min(count, start + batch)):
            service = TunnelClientService(
                endpoint,
                f"ident{i}",
                forwarder,
                host=f"127.0.0.1:{server_port}",
                retry=exponential_backoff(initial=0.1, maximum=1.0),
            )
            services.append(service)
            service.startService()
            waits.append(service.when_ready())
        await defer.gatherResults(waits)
        say("progress", len(services))
    say("ready", len(services), rss_kib())


def done(result):
    if isinstance(result, Failure):
        say("failed", result.getErrorMessage())
        reactor.stop()


reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addBoth(done))
reactor.run()
"""

#: fallback load generator: C keep-alive connections, one selector loop
LOADGEN = r"""
import json, selectors, socket, sys, time

port, host_header, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conns, duration, max_requests = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
sel = selectors.DefaultSelector()
latencies, errors, non2xx = [], 0, 0


class Conn:
    def __init__(self):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buf = b""
        sel.register(self.sock, selectors.EVENT_READ, self)

    def send(self):
        self.started = time.perf_counter()
        self.buf = b""
        self.sock.send(request)  # a few bytes: fits any empty socket buffer

    def close(self):
        sel.unregister(self.sock)
        self.sock.close()


def response_done(conn):
    head_end = conn.buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = conn.buf[:head_end].decode("latin-1").split("\r\n")
    length, close = None, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and "close" in value.lower():
            close = True
    if length is None:
        raise ValueError("response without Content-Length")
    if len(conn.buf) < head_end + 4 + length:
        return None
    return int(head[0].split()[1]), close


start = time.perf_counter()
deadline = start + duration
active = []
for _ in range(conns):
    c = Conn()
    active.append(c)
    c.send()
done = 0
while time.perf_counter() < deadline and done < max_requests:
    for key, _ in sel.select(timeout=0.1):
        conn = key.data
        try:
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            conn.buf += data
            result = response_done(conn)
            if result is None:
                continue
            status, close = result
            latencies.append(time.perf_counter() - conn.started)
            done += 1
            if not 200 <= status < 400:
                non2xx += 1
            if close:
                conn.close()
                active.remove(conn)
                conn = Conn()
                active.append(conn)
        except (OSError, ValueError):
            errors += 1
            conn.close()
            active.remove(conn)
            conn = Conn()
            active.append(conn)
        if time.perf_counter() < deadline and done < max_requests:
            conn.send()
elapsed = time.perf_counter() - start
for c in active:
    c.close()
latencies.sort()


def pct(p):
    if not latencies:
        return None
    return latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000


print(json.dumps({"requests": done, "seconds": elapsed, "errors": errors,
                  "non2xx": non2xx, "p50": pct(50), "p99": pct(99)}))
"""

#: fallback download client (when curl is missing): prints "SIZE SECONDS STATUS"
DOWNLOAD = r"""
import http.client, sys, time
port, host_header, path, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
start = time.perf_counter()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
conn.request("GET", path, headers={"Host": host_header})
response = conn.getresponse()
size = 0
while True:
    chunk = response.read(1 << 20)
    if not chunk:
        break
    size += len(chunk)
print(size, time.perf_counter() - start, response.status)
"""


# -- processes -------------------------------------------------------------------


class BenchFailed(Exception):
    pass


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (bound to 0, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    prior = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + prior if prior else "")
    return env


class Children:
    """The child processes of the run; ``stop_all`` ends every one of them."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = os.path.join(self.tmp, f"{name}.out")
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
            )
        self.procs.append((name, proc, out))
        return proc

    def twistd(
        self, name: str, plugin_args: list[str], extra: tuple[str, ...] | list[str] = ()
    ) -> subprocess.Popen:
        log = os.path.join(self.tmp, f"{name}.log")
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            *extra,
            *plugin_args,
        ]
        return self.start(name, argv)

    def check_alive(self) -> None:
        for name, proc, _ in self.procs:
            if proc.poll() is not None:
                raise BenchFailed(f"{name} exited with status {proc.returncode}\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        text = []
        for suffix in ("out", "log"):
            path = os.path.join(self.tmp, f"{name}.{suffix}")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 8192))
                    body = f.read().decode("utf-8", "replace").splitlines()[-lines:]
                text.append(f"--- {path}\n" + "\n".join(body))
        return "\n".join(text)

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> int | None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception as e:  # keep going: every child must end
                print(f"could not stop pid {proc.pid}: {e}", file=sys.stderr)
                proc.kill()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.startswith("Vm"):
                fields[name] = int(value.split()[0])
    return fields


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


class CpuMeter:
    """CPU share (100 % = one core) of named processes over an interval."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.procs = procs
        self.start = time.perf_counter()
        self.before = {name: cpu_seconds(p.pid) for name, p in procs.items()}

    def shares(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {
            name: 100 * (cpu_seconds(p.pid) - self.before[name]) / wall
            for name, p in self.procs.items()
        }


def http_get(port: int, path: str, host: str | None = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(
    children: Children, port: int, host: str | None, want: int | None, timeout: float
) -> None:
    """Poll (bounded) until GET / answers (with status ``want``, if given)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            status, body = http_get(port, "/", host, timeout=2.0)
            if want is None or status == want:
                return
            last = f"{status} {body[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise BenchFailed(f"127.0.0.1:{port} (Host {host}) not ready after {timeout:g} s: {last}")


# -- load generation -------------------------------------------------------------


class Load:
    """One load run: throughput, latency percentiles, errors."""

    def __init__(self, rps: float, requests: int, p50: float | None, p99: float | None) -> None:
        self.rps = rps
        self.requests = requests
        self.p50 = p50  # milliseconds
        self.p99 = p99
        self.errors = 0
        self.non2xx = 0
        self.cpu: dict[str, float] = {}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_time(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> Load:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if not rps or not total:
        raise BenchFailed(f"cannot read wrk's output:\n{text}")
    pcts = {
        m.group(1): _wrk_time(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    }
    load = Load(float(rps.group(1)), int(total.group(1)), pcts.get("50"), pcts.get("99"))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        load.errors = sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        load.non2xx = int(non2xx.group(1))
    return load


def run_wrk(port: int, host: str | None, conns: int, duration: int) -> Load:
    argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{duration}s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(f"http://127.0.0.1:{port}/")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise BenchFailed(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def run_python_load(port: int, host: str | None, conns: int, duration: int) -> Load:
    max_requests = 2_000_000
    argv = [sys.executable, "-c", LOADGEN, str(port), host or f"127.0.0.1:{port}", "/"]
    argv += [str(conns), str(duration), str(max_requests)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise BenchFailed(f"the Python load generator failed: {done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    load = Load(data["requests"] / data["seconds"], data["requests"], data["p50"], data["p99"])
    load.errors, load.non2xx = data["errors"], data["non2xx"]
    return load


def find_wrk(allow_install: bool) -> str | None:
    path = shutil.which("wrk")
    if path or not allow_install:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    print("wrk is missing; trying `apt-get install -y wrk` once ...", flush=True)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "wrk"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("wrk")


def download(port: int, host: str | None, n: int, timeout: float) -> tuple[int, float, int]:
    """(bytes, seconds, status) of GET /bytes?n=N, timed by curl (or Python)."""
    path = f"/bytes?n={n}"
    if shutil.which("curl"):
        argv = ["curl", "-s", "-o", "/dev/null", "--max-time", str(int(timeout))]
        argv += ["-w", "%{size_download} %{time_total} %{http_code}"]
        if host:
            argv += ["-H", f"Host: {host}"]
        argv.append(f"http://127.0.0.1:{port}{path}")
    else:
        argv = [sys.executable, "-c", DOWNLOAD, str(port), host or f"127.0.0.1:{port}", path]
        argv.append(str(timeout))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    try:
        size, seconds, status = done.stdout.split()
        return int(float(size)), float(seconds), int(status)
    except ValueError:
        raise BenchFailed(f"download of {path} failed: {done.stdout} {done.stderr}".strip())


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
