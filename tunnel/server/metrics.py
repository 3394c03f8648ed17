"""Prometheus metrics of one tunnel server, on a registry of its own.

``Metrics`` is a ``ServerEvents`` observer (``tunnel.server.events``) and a
prometheus-client collector.  What the server already keeps is read when
Prometheus scrapes (clients connected, open streams, the bytes the yamux
sessions count); what happens only once is tallied in plain integers on the
reactor thread (connects and disconnects of each client, a pool's members
each,
answers by status class, durations in fixed buckets, errors by kind) and
turned into metric families at scrape time.  Per request that is a few list
increments and a bisect: no lock, no label lookup, no object made.

Metrics (``host`` only with ``host_labels``)::

    tunnel_clients_connected               gauge    clients whose control handshake is done
    tunnel_client_connects_total           counter
    tunnel_client_disconnects_total        counter
    tunnel_streams_open                    gauge    yamux streams, control streams excluded
    tunnel_received_bytes_total            counter  Data payload from the clients
    tunnel_sent_bytes_total                counter  Data payload to the clients
    tunnel_requests_total                  counter  code = 1xx..5xx | other [, host]
    tunnel_request_duration_seconds        histogram  from the end of the head [, host]
    tunnel_errors_total                    counter  kind = an ErrorKind

and for a node of a cluster (``server.cluster``)::

    tunnel_cluster_links                   gauge    links to other nodes, state = open | draining
    tunnel_cluster_forwarded_total         counter  requests and TCP connections sent to other nodes
    tunnel_cluster_tunnels_held            gauge    tunnels this node holds records of

``host_labels`` labels requests by the virtual host they were routed to,
only for hosts the server has a route for (``server.vhosts``); every other
Host is counted as ``other``, so an outsider cannot make a series.  A host's
series stay after its route is deleted (counters do not vanish): their
number is bounded by the routes an operator ever added.

``resource()`` serves the registry.  prometheus-client's own Twisted
resource (``prometheus_client.twisted.MetricsResource``) runs the WSGI
exposition in the reactor's thread pool, where collecting would read the
server's live state while the reactor changes it (a session closing
mid-scrape could be counted twice or not at all, and a byte counter go
backwards); ours renders with the same encoders on the reactor thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource

from .events import ErrorKind, ServerEvents

if TYPE_CHECKING:
    from ..yamux import YamuxSession
    from .registry import ClientConnection, TunnelServer

#: upper bounds of the request duration buckets, seconds (+Inf follows)
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: label values of ``code``, by ``status // 100`` (0: anything outside 100-599)
CODE_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
#: the ``host`` label of every request not for a known virtual host
OTHER_HOST = "other"


class _Answers:
    """Requests answered under one label set: counts by class and durations."""

    __slots__ = ("codes", "buckets", "sum")

    def __init__(self) -> None:
        self.codes = [0] * len(CODE_CLASSES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        total = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.buckets, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class Metrics(ServerEvents):
    """The metrics of ``server``, on ``registry`` (a new one if None).

    Requests and errors are counted once it is the ``events`` of the site and
    of the server (``TunnelSite(..., events=metrics)`` and ``server.events =
    metrics``); clients, streams and bytes need neither.  ``close()`` stops
    observing the server's clients.
    """

    def __init__(
        self,
        server: TunnelServer,
        *,
        host_labels: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.server = server
        self.host_labels = host_labels
        self.registry = registry if registry is not None else CollectorRegistry()
        self._answers = _Answers()
        #: known host -> its answers (host_labels only; OTHER_HOST for the rest)
        self._by_host: dict[str, _Answers] = {}
        self._errors = dict.fromkeys(ErrorKind, 0)
        self._connects = 0
        self._disconnects = 0
        #: sessions of connected clients, their bytes read live
        self._live: set[YamuxSession] = set()
        #: bytes of the sessions that ended, added once as each ended
        self._ended_received = 0
        self._ended_sent = 0
        for connection in server.connections():
            if connection.ready:
                self._track(connection.session)
        # each client, a pool's members included (states change once per tunnel)
        self._unobserve = server.observe_members(self._member_ready)
        self.registry.register(self)

    def close(self) -> None:
        """Stop observing the server's clients (the tallies stay)."""
        self._unobserve()

    def resource(self) -> Resource:
        """A twisted.web resource serving the registry (``GET``, the text format
        or OpenMetrics as the scraper asks; ``name[]`` selects metrics)."""
        return MetricsResource(self.registry)

    # -- the events (ServerEvents) -----------------------------------------------------

    def request_done(self, request, seconds: float) -> None:
        answers = self._answers if not self.host_labels else self._answers_for(request)
        code = request.code // 100
        answers.codes[code if 0 < code < 6 else 0] += 1
        answers.buckets[bisect_left(BUCKETS, seconds)] += 1
        answers.sum += seconds

    def error(self, kind: ErrorKind) -> None:
        """Count ``kind``; anything not an ``ErrorKind`` raises KeyError."""
        self._errors[kind] += 1

    def _answers_for(self, request) -> _Answers:
        host = self.host_label(request.getHeader(b"host"))
        answers = self._by_host.get(host)
        if answers is None:
            answers = self._by_host[host] = _Answers()
        return answers

    def host_label(self, host: bytes | None) -> str:
        """The virtual host a Host header value is routed to, or ``other``:
        only a host the server has a route for is ever a label value."""
        if not host:
            return OTHER_HOST
        try:
            route, _ = self.server.vhosts.lookup(host.decode("latin-1"))
        except ValueError:
            return OTHER_HOST
        return route.host if route is not None else OTHER_HOST

    # -- the server's clients ----------------------------------------------------------

    def _member_ready(self, connection: ClientConnection) -> None:
        if self._track(connection.session):
            self._connects += 1

    def _track(self, session: YamuxSession) -> bool:
        if session in self._live or session.closed:
            return False
        self._live.add(session)
        session.when_closed().addCallback(self._session_ended, session)
        return True

    def _session_ended(self, reason: object, session: YamuxSession) -> None:
        if session in self._live:
            self._live.discard(session)
            self._disconnects += 1
            self._ended_received += session.bytes_received
            self._ended_sent += session.bytes_sent

    # -- the collector (prometheus-client calls these) ---------------------------------

    def describe(self) -> list[Metric]:
        """The families without samples: the registry checks names with it."""
        return list(self._families(samples=False))

    def collect(self) -> Iterator[Metric]:
        return self._families(samples=True)

    def _families(self, *, samples: bool) -> Iterator[Metric]:
        server = self.server
        connections = [c for c in server.connections() if c.ready] if samples else []
        clients = GaugeMetricFamily(
            "tunnel_clients_connected", "Tunnel clients connected (control handshake done)."
        )
        streams = GaugeMetricFamily(
            "tunnel_streams_open", "Open yamux streams over all sessions, control streams excluded."
        )
        connects = CounterMetricFamily("tunnel_client_connects", "Tunnel client connects.")
        disconnects = CounterMetricFamily("tunnel_client_disconnects", "Tunnel client disconnects.")
        received = CounterMetricFamily(
            "tunnel_received_bytes", "Data payload bytes received from tunnel clients."
        )
        sent = CounterMetricFamily(
            "tunnel_sent_bytes", "Data payload bytes sent to tunnel clients."
        )
        labels = ["host", "code"] if self.host_labels else ["code"]
        requests = CounterMetricFamily(
            "tunnel_requests", "Public requests answered, by status class.", labels=labels
        )
        duration = HistogramMetricFamily(
            "tunnel_request_duration_seconds",
            "Seconds from the end of a request head to the end of its answer.",
            labels=labels[:-1],
        )
        errors = CounterMetricFamily(
            "tunnel_errors", "Public requests or connections not served, by kind.", labels=["kind"]
        )
        if samples:
            clients.add_metric([], len(connections))
            streams.add_metric([], sum(c.stats().streams_open for c in connections))
            connects.add_metric([], self._connects)
            disconnects.add_metric([], self._disconnects)
            live = self._live
            received.add_metric([], self._ended_received + sum(s.bytes_received for s in live))
            sent.add_metric([], self._ended_sent + sum(s.bytes_sent for s in live))
            if self.host_labels:
                by_label = sorted(self._by_host.items())
            else:
                by_label = [(None, self._answers)]
            for host, answers in by_label:
                prefix = [] if host is None else [host]
                for code, count in zip(CODE_CLASSES, answers.codes, strict=True):
                    if count or code != "other":
                        requests.add_metric([*prefix, code], count)
                duration.add_metric(prefix, answers.cumulative(), answers.sum)
            for kind, count in self._errors.items():
                errors.add_metric([kind.value], count)
        yield from (clients, connects, disconnects, streams, received, sent)
        yield from (requests, duration, errors)
        if server.cluster is not None:
            yield from self._cluster_families(samples)

    def _cluster_families(self, samples: bool) -> Iterator[Metric]:
        links = GaugeMetricFamily(
            "tunnel_cluster_links", "Links to other nodes of the cluster.", labels=["state"]
        )
        forwarded = CounterMetricFamily(
            "tunnel_cluster_forwarded", "Requests and TCP connections sent to other nodes."
        )
        held = GaugeMetricFamily(
            "tunnel_cluster_tunnels_held", "Tunnels this node holds records of in Redis."
        )
        if samples:
            stats = self.server.cluster.stats()
            for state in ("open", "draining"):
                links.add_metric([state], sum(1 for i in stats.links if i.state.value == state))
            forwarded.add_metric([], stats.forwarded)
            held.add_metric([], stats.tunnels_held)
        yield from (links, forwarded, held)


class MetricsResource(Resource):
    """Serves a registry's metrics, collected on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        registry = self.registry
        names = request.args.get(b"name[]")
        if names:
            registry = registry.restricted_registry([n.decode("latin-1") for n in names])
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encoder(registry)
