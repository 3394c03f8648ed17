"""A real ``redis-server`` for the tests: started on a free 127.0.0.1 port in
a temporary directory, and killed after.

``RedisServer.start()`` runs Debian's ``redis-server`` with its log on a
pipe and returns once the log says "Ready to accept connections" and the
server answered PING: the wait reads the pipe with a deadline (no sleep),
so it is as short as the server's start.  ``stop()`` kills it (SIGKILL, as
a crash would) and ``start()`` again brings it back on the same port and
directory, which is how the tests cut the store off Redis and give it back.

By default nothing is kept on disk (``--save ""``, no AOF); a server made
with ``persistent=True`` appends every write to its AOF (written before the
reply, fsynced by nobody: it survives SIGKILL, which is all a test needs).

``command()`` is a small blocking RESP client for the test's own checks
(``CLIENT KILL``, ``INFO commandstats``, ``FLUSHALL``): answers from a
server on loopback take microseconds, so it never holds the reactor for
long.  Tests skip, with the reason, where ``redis-server`` is not installed.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
#: seconds the server gets to say it is ready
START_TIMEOUT = 10.0
#: attempts at starting a server (a port taken meanwhile: choose again, or
#: after a restart wait a little for it and try the same one again)
START_ATTEMPTS = 5
#: seconds between attempts at restarting on the same port (times the attempt)
RESTART_PAUSE = 0.2
SKIP_REASON = "redis-server is not installed (Debian's redis-server package; .ci/run installs it)"


def available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def require() -> None:
    """Skip the calling test (or fixture) when there is no redis-server."""
    if not available():
        pytest.skip(SKIP_REASON)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisError(Exception):
    """An error reply to ``command()``."""


def _encode(*args: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("redis-server closed the connection")
        self.buffer += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n + 2:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n + 2 :]
        return data

    def reply(self):
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.exactly(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"not RESP: {line!r}")


class RedisServer:
    """One redis-server child process on 127.0.0.1:``port``."""

    def __init__(
        self, directory: Path, *, persistent: bool = False, password: str | None = None
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.password = password
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string of this server."""
        return f"tcp:127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        argv = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", "",
            "--daemonize", "no",
            "--save", "",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "no"]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self) -> RedisServer:
        """Start the server (on the same port as before, if it ran already)
        and return once it answers PING."""
        assert self.process is None, "already running"
        require()
        # a fresh port may be taken between choosing it and binding it: choose
        # again; the same port after a restart may be taken meanwhile by
        # another process (a client's ephemeral port, briefly): try again
        for attempt in range(START_ATTEMPTS):
            if not self.starts:
                self.port = _free_port()
            log = self._spawn()
            if log is None:
                self.starts += 1
                assert self.command("PING") == "PONG"
                return self
            if "Address already in use" in log and attempt + 1 < START_ATTEMPTS:
                if self.starts:
                    time.sleep(RESTART_PAUSE * (attempt + 1))
                continue
            raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
        raise AssertionError("unreachable")

    def _spawn(self) -> str | None:
        """Run the server and read its log until it is ready: None, or the log
        if it ended (or timed out) first."""
        self.process = subprocess.Popen(
            self._argv(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
        )
        assert self.process.stdout is not None
        log = b""
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while b"Ready to accept connections" not in log:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.stop()
                    return log.decode(errors="replace") + "\n(timed out)"
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:  # it ended
                    self.stop()
                    return log.decode(errors="replace")
                log += chunk
        # the rest of its log is not read: nothing more is written to the pipe
        # than a pipe holds in a test's lifetime, and the pipe closes with it
        return None

    def stop(self) -> None:
        """SIGKILL the server, as a crash would, and wait for its end."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    def command(self, *args: str | bytes | int, timeout: float = 5.0):
        """Send one command on a new connection and return the reply (bytes,
        int, str for a status, lists); an error reply raises RedisError."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            reader = _Reader(sock)
            if self.password is not None:
                sock.sendall(_encode("AUTH", self.password))
                reader.reply()
            sock.sendall(_encode(*args))
            return reader.reply()

    def commandstats(self) -> dict[str, int]:
        """How many times each command ran (``INFO commandstats``), by name."""
        text = self.command("INFO", "commandstats").decode()
        calls = {}
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_") :].partition(":")
                stats = dict(field.split("=", 1) for field in fields.split(","))
                calls[name] = int(stats["calls"])
        return calls


class running:
    """``with running() as redis:`` a server in a temporary directory."""

    def __init__(self, *, persistent: bool = False, password: str | None = None) -> None:
        self.persistent = persistent
        self.password = password

    def __enter__(self) -> RedisServer:
        require()
        self._directory = tempfile.TemporaryDirectory(prefix="redis-test-")
        self.server = RedisServer(
            Path(self._directory.name), persistent=self.persistent, password=self.password
        )
        try:
            return self.server.start()
        except BaseException:
            self._directory.cleanup()
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            self.server.stop()
        finally:
            self._directory.cleanup()
