"""Running the real twistd plugins as child processes, on the test reactor."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tunnel.observe import OneShot

from . import live

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


def spawn_twistd(name: str, *argv: str, twistd_args: tuple[str, ...] = ()) -> Twistd:
    """Start ``twistd -n TWISTD_ARGS... NAME ARGV...`` from the checkout (its
    plugins, its code)."""
    env = {k: v for k, v in os.environ.items() if k != "TUNNEL_IDENTIFIER"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    process = Twistd(name)
    args = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", *twistd_args]
    args += [name, *argv]
    reactor.spawnProcess(process, sys.executable, args, env=env, path=str(REPO_ROOT))
    return process


def spawn_client(servers: list[int], identifier_file, local_port: int, *extra: str) -> Twistd:
    """``twistd tunnel-client`` to our servers on 127.0.0.1 ``servers`` (one
    ``--server`` each), its identifier read from ``identifier_file``, its
    local site on 127.0.0.1:``local_port``, then the ``extra`` arguments."""
    argv = [arg for port in servers for arg in ("--server", f"tcp:127.0.0.1:{port}")]
    argv += ["--identifier-file", str(identifier_file), "--local", f"tcp:127.0.0.1:{local_port}"]
    argv += extra
    return spawn_twistd("tunnel-client", *argv)


def free_port() -> int:
    """A port that was free a moment ago (for children that need a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until_children(what: str, check, *processes: Twistd, timeout: float = TIMEOUT):
    """``live.until`` for the twistd tests: ``await check()`` until it returns
    non-None (errors while a child starts count as "not yet"); fails at once
    if a child died, and shows the children's logs if time runs out."""

    def children_alive() -> None:
        for p in processes:
            assert p.running, f"{p.name} died while waiting for {what}:\n{p.log}"

    async def done():
        result = await check()
        return (result,) if result is not None else None

    try:
        (result,) = await live.until(
            done,
            what=what,
            timeout=timeout,
            interval=0.05,
            retry_on=(Exception,),
            guard=children_alive,
        )
    except AssertionError as e:
        if all(p.running for p in processes):
            logs = "\n".join(f"--- {p.name}:\n{p.log}" for p in processes)
            raise AssertionError(f"{e}\n{logs}") from None
        raise
    return result


async def stop(process: Twistd) -> None:
    """SIGTERM, then expect twistd's clean shutdown."""
    process.signal("TERM")
    await process.ended()
    status = process.reason
    # twistd stops the reactor on SIGTERM, runs stopService, logs its goodbye
    # and then re-raises the signal on itself (app._exitWithSignal), so the
    # clean outcome is "terminated by SIGTERM" after that log, or exit code 0.
    clean_status = status.exitCode == 0 or status.signal == signal.SIGTERM
    assert clean_status, f"{process.name} ended with {status!r}:\n{process.log}"
    log = process.log
    assert "Received SIGTERM, shutting down." in log, log
    assert "Main loop terminated." in log, log
    assert "Server Shut Down." in log, log
    assert "Traceback" not in log and "Unhandled" not in log, log
