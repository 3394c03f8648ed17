"""twistd plugin implementations (Options and makeService for each)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from twisted.application.service import IService
from twisted.python import usage


class StartRefused(SystemExit):
    """What ``makeService`` raises for a configuration it cannot start with
    (an endpoint that does not parse, an unusable ``--db``): twistd lets a
    SystemExit end the program with its message and status 1, where any
    other exception from ``makeService`` is printed as a traceback."""


def refuse_usage_errors(
    name: str,
) -> Callable[[Callable[[usage.Options], IService]], Callable[[usage.Options], IService]]:
    """Make ``makeService`` turn a UsageError into one line and exit status 1."""

    def decorate(make: Callable[[usage.Options], IService]) -> Callable[[usage.Options], IService]:
        @functools.wraps(make)
        def makeService(options: usage.Options) -> IService:
            try:
                return make(options)
            except usage.UsageError as e:
                raise StartRefused(f"twistd {name}: {e}") from None

        return makeService

    return decorate
