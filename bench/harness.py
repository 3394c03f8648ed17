"""Pieces the benchmarks share: child processes, /proc readings, wrk and curl.

``bench/http.py`` and ``bench/compare.py`` start their origin, tunnel server,
tunnel client and load generator as separate processes with ``Children`` (each
one's output goes to a file in a temporary folder; ``stop_all`` ends every one
of them), read CPU time and memory from ``/proc``, load with ``wrk`` (or a
Python fallback) and download with ``curl`` (or a Python fallback).

A script in bench/ that imports this module must put bench/ *last* on
``sys.path`` (``bench/http.py`` shadows the standard library's ``http``).
"""

from __future__ import annotations

import ctypes
import functools
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MiB = 1024 * 1024
KiB = 1024
READY_TIMEOUT = 30.0

# -- the child programs ----------------------------------------------------------

#: the origin: ``/`` and ``/hello`` -> hello; ``/bytes?n=N`` and ``/blob?n=N`` -> N bytes
#: (byte k = k % 256, as the Go reforigin sends) from a push producer, with a Content-Length
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
        if request.path in (b"/", b"/hello"):
            request.setHeader(b"content-type", b"text/plain")
            return b"hello"
        if request.path in (b"/bytes", b"/blob"):
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


_PR_SET_PDEATHSIG = 1


def _child_setup(prctl) -> None:
    """In the child before exec: more file descriptors; with ``prctl`` (libc's),
    SIGKILL when the parent dies, so that not even a killed run leaves children."""
    _raise_nofile()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_env(tree: str = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    prior = env.get("PYTHONPATH")
    env["PYTHONPATH"] = tree + (os.pathsep + prior if prior else "")
    return env


class Children:
    """The child processes of the run; ``stop_all`` ends every one of them.

    Python children import ``tunnel`` from ``tree`` (first on their
    PYTHONPATH; default: this checkout).
    """

    def __init__(self, tmp: str, tree: str = ROOT, die_with_parent: bool = False) -> None:
        self.tmp = tmp
        self.tree = tree
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        prctl = None
        if die_with_parent and sys.platform == "linux":
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork
        self._setup = functools.partial(_child_setup, prctl)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``argv`` with its output in ``TMP/NAME.out``; ``env`` replaces
        the environment (default: ours, with ``tree`` on PYTHONPATH)."""
        out = os.path.join(self.tmp, f"{name}.out")
        with open(out, "wb") as f:
            proc = subprocess.Popen(
                argv,
                cwd=self.tree,  # python -c puts its working directory first on sys.path
                env=_child_env(self.tree) if env is None else env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                preexec_fn=self._setup,
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
        """SIGTERM, then SIGKILL after ``grace`` seconds; the child is then
        forgotten (``check_alive`` no longer looks at it)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = [entry for entry in self.procs if entry[1] is not proc]
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in list(reversed(self.procs)):
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

    def seconds(self) -> dict[str, float]:
        """CPU seconds (utime + stime) each process used since the meter started."""
        return {name: cpu_seconds(p.pid) - self.before[name] for name, p in self.procs.items()}


def http_get(port: int, path: str, host: str | None = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http(
    children: Children,
    port: int,
    host: str | None,
    want: int | None,
    timeout: float,
    path: str = "/",
) -> None:
    """Poll (bounded) until GET ``path`` answers (with status ``want``, if given)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            status, body = http_get(port, path, host, timeout=2.0)
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


def run_wrk(port: int, host: str | None, conns: int, duration: int, path: str = "/") -> Load:
    argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{duration}s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise BenchFailed(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def run_python_load(
    port: int, host: str | None, conns: int, duration: int, path: str = "/"
) -> Load:
    max_requests = 2_000_000
    argv = [sys.executable, "-c", LOADGEN, str(port), host or f"127.0.0.1:{port}", path]
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


def download(
    port: int, host: str | None, n: int, timeout: float, route: str = "/bytes"
) -> tuple[int, float, int]:
    """(bytes, seconds, status) of GET ROUTE?n=N, timed by curl (or Python)."""
    path = f"{route}?n={n}"
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
