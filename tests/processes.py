"""Running the real twistd plugins as child processes, on the test reactor."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tunnel.observe import OneShot

REPO_ROOT = Path(__file__).resolve().parents[1]
TWISTD = "from twisted.scripts.twistd import run; run()"
TIMEOUT = 15.0  # for each wait on a child


class Twistd(ProcessProtocol):
    """A twistd child: collects its log (stdout and stderr) and its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.reason = None
        self._ended = OneShot()

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        # called once the child has exited and all its pipes are closed
        self.reason = reason.value  # ProcessDone or ProcessTerminated
        self._ended.fire(None)

    @property
    def log(self) -> str:
        return self.output.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self.reason is None

    def ended(self, timeout: float = TIMEOUT) -> Deferred:
        """Fires (with None) once the child has ended; see ``reason``."""
        d = self._ended.when()
        if not d.called:
            d.addTimeout(timeout, reactor)
        return d

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    async def reap(self) -> None:
        """SIGKILL if still running, and wait for the end."""
        if self.running:
            self.signal("KILL")
        await self.ended()


async def reap_all(processes: list[Twistd], timeout: float = 10.0) -> None:
    """SIGKILL every child still running, then wait for each (best effort)."""
    for process in processes:
        if process.running:
            process.signal("KILL")
    for process in processes:
        if process.running:
            try:
                await process.ended(timeout)
            except Exception:
                pass


def spawn_twistd(name: str, *argv: str) -> Twistd:
    """Start ``twistd -n NAME ARGV...`` from the checkout (its plugins, its code)."""
    env = {k: v for k, v in os.environ.items() if k != "TUNNEL_IDENTIFIER"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    process = Twistd(name)
    args = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", name, *argv]
    reactor.spawnProcess(process, sys.executable, args, env=env, path=str(REPO_ROOT))
    return process


def free_port() -> int:
    """A port that was free a moment ago (for children that need a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
