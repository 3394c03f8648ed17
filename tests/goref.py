"""The Go reference programs (koding/tunnel, ../shared/goref) as children on the
test reactor.

They are tools, not part of the project: a clone with nothing beside it has
no ../shared, so ``missing_reason()`` says why they cannot run and the tests
that need them skip.  ``TUNNEL_GOREF`` points at another folder.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

from twisted.internet import reactor, task

from .processes import REPO_ROOT, TIMEOUT, Twistd

GOREF_ENV = "TUNNEL_GOREF"
BINARIES = ("refserver", "refclient", "reforigin", "wsclient")


def goref_dir() -> Path:
    """Where the Go binaries are: $TUNNEL_GOREF, else ../shared/goref."""
    return Path(os.environ.get(GOREF_ENV) or REPO_ROOT.parent / "shared" / "goref")


def missing_reason() -> str | None:
    """Why the Go reference programs cannot run here, or None when they can."""
    folder = goref_dir()
    missing = [name for name in BINARIES if not os.access(folder / name, os.X_OK)]
    if missing:
        return (
            f"Go reference binaries not found in {folder} (missing: {', '.join(missing)});"
            f" set {GOREF_ENV} to the folder that holds them"
        )
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"Go reference binaries are linux/amd64; this is {sys.platform}/{platform.machine()}"
    return None


class GoProcess(Twistd):
    """A Go child: the same bookkeeping as a twistd child (output, end, reap)."""


def spawn_go(name: str, *argv: str) -> GoProcess:
    """Start ``goref/NAME ARGV...`` with an empty environment."""
    path = str(goref_dir() / name)
    process = GoProcess(name)
    reactor.spawnProcess(process, path, [path, *argv], env={}, path=str(REPO_ROOT))
    return process


async def wait_for_line(process: Twistd, pattern: str, timeout: float = TIMEOUT) -> re.Match:
    """Wait (bounded) until ``process``'s output matches ``pattern``; fail fast
    if it ends first."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = reactor.seconds() + timeout
    while True:
        match = regex.search(process.log)
        if match is not None:
            return match
        if not process.running:
            raise AssertionError(
                f"{process.name} ended ({process.reason!r}) before printing"
                f" {pattern!r}:\n{process.log}"
            )
        if reactor.seconds() > deadline:
            raise AssertionError(
                f"{process.name} did not print {pattern!r} in {timeout} s:\n{process.log}"
            )
        await task.deferLater(reactor, 0.02, lambda: None)


async def exit_status(process: Twistd, timeout: float = TIMEOUT) -> int | None:
    """Wait (bounded) for ``process`` to end; its exit code (None if signalled)."""
    await process.ended(timeout)
    return process.reason.exitCode
