"""The tunnel server as one twisted.application service, stopped gracefully.

``TunnelServerService`` owns the server's listeners (its children) and its
``Routes``.  Started, it first loads the routes (hosts and TCP ports from
the store, then the ones the command line seeds) and only then lets its
listeners start, so no public request meets a table still loading.  When
stopped, it first lets the clients' open tunnels finish
(``TunnelServer.stop``: GoAway, up to ``grace`` seconds), then stops
listening and closes the routes.  It is what ``twistd tunnel-server`` runs,
and what a program that embeds the server adds to its own service tree.

twistd starts an application synchronously, before its reactor runs
(``privilegedStartService``, then ``startService``), and ignores a Deferred
either returns.  So routes that load at once (``MemoryStore``) and
listeners are started right there, and a port that cannot be bound (a
``--listen`` or a seeded ``--tcp`` port) raises, which makes twistd exit
with the error.  Routes that load later (a store working in threads) start
the listeners when they are loaded; if that fails, ``fatal`` logs the error
and stops the reactor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..koding.identifiers import TunnelKey
from .registry import TunnelServer
from .routes import Routes


class Phase(enum.Enum):
    IDLE = "idle"  # not started
    LOADING = "loading"  # the routes load; nothing listens yet
    SERVING = "serving"  # the listeners are started
    FAILED = "failed"  # the routes or a listener could not start
    STOPPED = "stopped"


def _stop_the_reactor(failure: Failure) -> None:
    from twisted.internet import reactor

    if reactor.running:
        reactor.stop()


class TunnelServerService(MultiService):
    """Routes, then listeners, plus the server's graceful stop (GoAway, then a
    grace period).

    :param server: the registry whose clients are drained on stop.
    :param grace: seconds open tunnels may go on after stopService.
    :param routes: loaded before the listeners start, closed after they stop
        (None: the server's tables are filled by the embedding code).
    :param seed_hosts: host -> tunnel, made sure of once the routes are
        loaded (``Routes.seed``: what ``--vhost`` gives).
    :param seed_ports: TCP port -> tunnel, likewise (``--tcp``).
    :param seed_rules: host -> stored rules for some of ``seed_hosts`` (the
        rule flags), replacing what is stored for them.
    """

    log = Logger()

    def __init__(
        self,
        server: TunnelServer,
        grace: float = 10.0,
        *,
        routes: Routes | None = None,
        seed_hosts: Mapping[str, str | TunnelKey] | None = None,
        seed_ports: Mapping[int, str | TunnelKey] | None = None,
        seed_rules: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.grace = grace
        self.routes = routes
        self.seed_hosts = dict(seed_hosts or {})
        self.seed_ports = dict(seed_ports or {})
        self.seed_rules = dict(seed_rules or {})
        if routes is None and (self.seed_hosts or self.seed_ports or self.seed_rules):
            raise ValueError("seeding needs routes")
        self.phase = Phase.IDLE
        #: called when the server cannot start after the reactor runs (routes
        #: that load late, or a listener started then): stops the reactor
        self.fatal: Callable[[Failure], None] = _stop_the_reactor

    def listen(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> StreamServerEndpointService:
        """Serve ``factory`` (a TunnelSite, or ``server.tcp_factory()``) on
        ``endpoint`` (call it before the service starts)."""
        listener = StreamServerEndpointService(endpoint, factory)
        # as twisted.application.strports.service() does: a port that cannot be
        # bound fails the start (twistd exits with the error) rather than leaving
        # a server running that does not listen
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        return listener

    def prepare(self) -> Deferred[None]:
        """Load the routes, then seed them (nothing to do without routes)."""
        routes = self.routes
        if routes is None:
            return succeed(None)
        return routes.start().addCallback(
            lambda _: routes.seed(self.seed_hosts, self.seed_ports, self.seed_rules)
        )

    # -- IService --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._begin()

    def startService(self) -> None:
        Service.startService(self)
        if self.phase is Phase.IDLE:  # an embedding program need not call the above
            self._begin()
        elif self.phase is Phase.SERVING:
            for child in self:
                child.startService()

    def stopService(self) -> Deferred:
        phase, self.phase = self.phase, Phase.STOPPED
        d = self.server.stop(self.grace)
        if phase is Phase.SERVING:
            d.addCallback(lambda _: MultiService.stopService(self))
        else:
            # FAILED: the listeners that did start; LOADING, IDLE: none
            Service.stopService(self)
            started = [child for child in self if child.running]
            d.addCallback(lambda _: gatherResults([c.stopService() for c in started]))
        if self.routes is not None and phase is not Phase.FAILED:  # FAILED closed them
            d.addCallback(lambda _: self.routes.stop())
        return d

    # -- starting ----------------------------------------------------------------

    def _begin(self) -> None:
        """Load the routes; start the listeners now if they are loaded (raising
        what fails), else when they are."""
        self.phase = Phase.LOADING
        outcome: list = []
        d = self.prepare().addBoth(lambda result: outcome.append(result) or result)
        if not outcome:
            d.addCallbacks(self._loaded_late, self._failed_late)
            return
        d.addErrback(lambda _: None)  # raised below instead
        if isinstance(outcome[0], Failure):
            self._abandon()
            outcome[0].raiseException()
        try:
            self._start_listeners(now=self.running)
        except BaseException:
            self._abandon()
            raise

    def _start_listeners(self, now: bool) -> None:
        """Bind the listeners (and start them if the service runs already)."""
        self.phase = Phase.SERVING
        for child in self:
            child.privilegedStartService()
            if now:
                child.startService()

    def _loaded_late(self, _: None) -> None:
        if self.phase is Phase.LOADING:
            try:
                self._start_listeners(now=self.running)
            except Exception:
                self._failed_late(Failure())

    def _failed_late(self, failure: Failure) -> None:
        if self.phase is Phase.STOPPED:
            return
        self._abandon()
        self.log.critical("the tunnel server cannot start: {why}", why=failure.getErrorMessage())
        self.fatal(failure)

    def _abandon(self) -> None:
        """The start failed: close what the routes opened (their listeners, the store)."""
        self.phase = Phase.FAILED
        if self.routes is not None:
            self.routes.stop().addErrback(
                lambda f: self.log.error(
                    "closing the routes failed: {why}", why=f.getErrorMessage()
                )
            )
