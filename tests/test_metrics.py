"""The server's Prometheus metrics (issue 10), read as a scraper reads them:
the text format of the Metrics registry, parsed with prometheus-client's own
parser, over a whole tunnel in memory (tests/memory.py) on one Clock."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site

from tunnel.server.access import AccessGate
from tunnel.server.events import ErrorKind, ServerEvents
from tunnel.server.metrics import BUCKETS, OTHER_HOST, Metrics
from tunnel.server.registry import TunnelServer
from tunnel.server.rules import HostRules, ScryptParams

from .memory import MemoryTunnel, parse_response

KB100 = 100_000
#: cheap scrypt for tests (the default costs tens of milliseconds per hash)
CHEAP = ScryptParams(n=2**10, r=1, p=1)
RAW_PORT = 9000


def samples(metrics: Metrics) -> dict:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


@contextlib.contextmanager
def tunnel(connect: bool = True, *, local=None, site_kwargs=None, server_kwargs=None, **options):
    """A MemoryTunnel whose site and server report to a Metrics of its server,
    the client connected after the Metrics exists (so its connect is counted).
    ``local``: a protocol factory to be the client's local server instead of
    the Origin resource."""
    env = MemoryTunnel(site_kwargs=site_kwargs, server_kwargs=server_kwargs)
    env.start(connect=False)
    metrics = Metrics(env.server, **options)
    env.site.events = env.server.events = metrics
    if local is not None:
        env.listen(local, RAW_PORT)
    if connect:
        connect_client(env, local=None if local is None else f"tcp:127.0.0.1:{RAW_PORT}")
    with env:
        yield env, metrics
    metrics.close()


def connect_client(env: MemoryTunnel, local: str | None = None) -> None:
    env.client = env.make_client(local=local)
    env.client.startService()
    env.run_until(lambda: env.server.state(env.IDENT).name == "CONNECTED", limit=5)


def stop_client(env: MemoryTunnel) -> None:
    env.result(env.client.stopService(), limit=env.client.stop_timeout + 1)
    env.flush()


def test_connects_and_disconnects_as_a_client_comes_and_goes():
    with tunnel(connect=False) as (env, metrics):
        assert value(metrics, "tunnel_clients_connected") == 0
        assert value(metrics, "tunnel_client_connects_total") == 0
        connect_client(env)
        assert value(metrics, "tunnel_clients_connected") == 1
        assert value(metrics, "tunnel_client_connects_total") == 1
        assert value(metrics, "tunnel_client_disconnects_total") == 0
        stop_client(env)
        assert value(metrics, "tunnel_clients_connected") == 0
        assert value(metrics, "tunnel_client_disconnects_total") == 1
        connect_client(env)
        assert value(metrics, "tunnel_clients_connected") == 1
        assert value(metrics, "tunnel_client_connects_total") == 2


def test_a_client_connected_before_the_metrics_is_counted_as_connected():
    with MemoryTunnel() as env:
        metrics = Metrics(env.server)
        assert value(metrics, "tunnel_clients_connected") == 1
        assert value(metrics, "tunnel_client_connects_total") == 0
        env.get(b"/bytes?n=1000")
        assert value(metrics, "tunnel_received_bytes_total") > 1000  # its bytes are read live
        metrics.close()


def test_requests_by_status_class():
    with tunnel() as (env, metrics):
        assert env.get(b"/echo?echo=hi").code == 200
        assert env.get(b"/status?n=404").code == 404
        assert env.get(b"/status?n=302").code == 302
        assert env.get(b"/", host=b"nobody.example").code == 502  # no virtual host
        stop_client(env)
        assert env.get(b"/").code == 502  # no client session
        counts = {
            code: value(metrics, "tunnel_requests_total", code=f"{code}xx") for code in "12345"
        }
        assert counts == {"1": 0, "2": 1, "3": 1, "4": 1, "5": 2}
        assert ("tunnel_requests_total", (("code", "other"),)) not in samples(metrics)


def test_a_status_outside_100_to_599_is_counted_as_other():
    with tunnel() as (env, metrics):
        assert env.get(b"/status?n=799").code == 799
        assert value(metrics, "tunnel_requests_total", code="other") == 1


def test_the_duration_histogram_counts_each_request_once_in_its_bucket():
    with tunnel() as (env, metrics):
        env.get(b"/echo?echo=now")  # no time passes on the Clock: 0 s
        peer = env.connect()
        peer.send(b"GET /delay?n=0.2 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.flush()
        env.advance(0.2)
        assert parse_response(peer.received).body == b"late"
        peer.close()
        env.flush()
        buckets = {
            le: value(metrics, "tunnel_request_duration_seconds_bucket", le=le)
            for le in ("0.001", "0.1", "0.25", "30.0", "+Inf")
        }
        assert buckets == {"0.001": 1, "0.1": 1, "0.25": 2, "30.0": 2, "+Inf": 2}
        assert value(metrics, "tunnel_request_duration_seconds_count") == 2
        assert value(metrics, "tunnel_request_duration_seconds_sum") == pytest.approx(0.2)


def test_the_buckets_run_from_1_ms_to_30_s():
    assert BUCKETS[0] == 0.001 and BUCKETS[-1] == 30.0
    assert list(BUCKETS) == sorted(set(BUCKETS))


def test_a_request_slower_than_30_s_lands_in_inf_only():
    with tunnel() as (env, metrics):
        peer = env.connect()
        peer.send(b"GET /delay?n=31 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.advance(31)
        assert parse_response(peer.received).code == 200
        peer.close()
        env.flush()
        assert value(metrics, "tunnel_request_duration_seconds_bucket", le="30.0") == 0
        assert value(metrics, "tunnel_request_duration_seconds_bucket", le="+Inf") == 1


def test_bytes_each_way_move_by_the_bodies_sizes():
    with tunnel() as (env, metrics):
        received = value(metrics, "tunnel_received_bytes_total")
        sent = value(metrics, "tunnel_sent_bytes_total")
        assert len(env.get(b"/bytes?n=%d" % KB100).body) == KB100
        grown = value(metrics, "tunnel_received_bytes_total") - received
        assert KB100 < grown < KB100 + 500  # the body and the origin's head
        assert 0 < value(metrics, "tunnel_sent_bytes_total") - sent < 500  # the request head
        sent = value(metrics, "tunnel_sent_bytes_total")
        body = b"x" * KB100
        raw = env.request(
            b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        assert parse_response(raw).body.startswith(b"%d " % KB100)
        assert KB100 < value(metrics, "tunnel_sent_bytes_total") - sent < KB100 + 500


def test_open_streams_during_a_request_control_streams_excluded():
    with tunnel(site_kwargs={}) as (env, metrics):
        assert value(metrics, "tunnel_streams_open") == 0
        peer = env.connect()
        peer.send(b"GET /delay?n=5 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.flush()
        assert value(metrics, "tunnel_streams_open") == 1
        env.advance(5)
        assert parse_response(peer.received).body == b"late"
        peer.close()
        env.advance(env.server.stream_idle_timeout + 1)  # the kept stream is let go
        assert value(metrics, "tunnel_streams_open") == 0


def test_counters_never_go_back_when_a_session_ends():
    with tunnel() as (env, metrics):
        env.get(b"/bytes?n=%d" % KB100)
        before = samples(metrics)
        stop_client(env)
        after = samples(metrics)
        for name in ("tunnel_received_bytes_total", "tunnel_sent_bytes_total"):
            assert after[(name, ())] >= before[(name, ())] > 0
        connect_client(env)
        env.get(b"/bytes?n=%d" % KB100)
        again = samples(metrics)
        assert all(
            again[key] >= after[key] for key in after if key[0].endswith(("_total", "_bucket"))
        )
        received = ("tunnel_received_bytes_total", ())
        assert again[received] - after[received] > KB100


def test_errors_by_kind_start_at_zero_and_only_known_kinds_count():
    with tunnel() as (env, metrics):
        every = {
            kind.value: value(metrics, "tunnel_errors_total", kind=kind.value) for kind in ErrorKind
        }
        assert every == dict.fromkeys(every, 0)
        metrics.error(ErrorKind.RATE_LIMITED)
        metrics.error(ErrorKind.RATE_LIMITED)
        with pytest.raises(KeyError):
            metrics.error("anything a peer sent")
        assert value(metrics, "tunnel_errors_total", kind="rate_limited") == 2
        kinds = {
            dict(labels)["kind"]
            for name, labels in samples(metrics)
            if name == "tunnel_errors_total"
        }
        assert kinds == {kind.value for kind in ErrorKind}


def test_the_site_reports_a_slow_head_and_a_refused_request():
    with tunnel(site_kwargs={"head_timeout": 5}) as (env, metrics):
        slow = env.connect()
        slow.send(b"GET / HT")
        env.advance(5)
        assert slow.closed
        assert value(metrics, "tunnel_errors_total", kind="head_timeout") == 1
        env.request(b"GET / HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: gzip\r\n\r\n")
        env.advance(1)  # the refusal's linger
        assert value(metrics, "tunnel_errors_total", kind="bad_request") == 1
        # refused by the channel: no request was answered through twisted.web
        assert value(metrics, "tunnel_request_duration_seconds_count") == 0


def test_host_labels_only_for_known_hosts():
    with tunnel(host_labels=True) as (env, metrics):
        env.server.add_host("b.localhost:8080", env.IDENT)
        env.get(b"/echo?echo=1")
        env.get(b"/echo?echo=1", host=b"APP.localhost.:80")
        env.get(b"/echo?echo=1", host=b"b.localhost:8080")
        env.get(b"/", host=b"x9f3.random.example")
        env.get(b"/", host=b"b.localhost:8081")  # only :8080 is known
        got = {
            dict(labels)["host"]: v
            for (name, labels), v in samples(metrics).items()
            if name == "tunnel_requests_total" and v
        }
        assert got == {"app.localhost": 2, "b.localhost:8080": 1, OTHER_HOST: 2}
        count = value(metrics, "tunnel_request_duration_seconds_count", host="app.localhost")
        assert count == 2


def test_without_host_labels_no_host_appears():
    with tunnel() as (env, metrics):
        env.get(b"/echo?echo=1")
        assert all("host" not in dict(labels) for _, labels in samples(metrics))


@given(st.binary(max_size=40))
def test_host_label_is_a_known_host_or_other_whatever_the_header(host):
    server = TunnelServer(clock=object())
    server.add_host("app.localhost", "ident-a")
    server.add_host("b.localhost:8080", "ident-b")
    server.add_host("c.localhost", "ident-b")
    metrics = Metrics(server, host_labels=True)
    assert metrics.host_label(host) in {
        "app.localhost",
        "b.localhost:8080",
        "c.localhost",
        OTHER_HOST,
    }


@pytest.mark.parametrize(
    "host, label",
    [
        (b"app.localhost", "app.localhost"),
        (b"App.Localhost.:1234", "app.localhost"),
        (b"b.localhost:8080", "b.localhost:8080"),
        (b"b.localhost", OTHER_HOST),
        (b"c.localhost:8080", "c.localhost"),
        (b"[::1]", OTHER_HOST),
        (b"app.localhost:99999", OTHER_HOST),
        (None, OTHER_HOST),
    ],
)
def test_host_label_examples(host, label):
    server = TunnelServer(clock=object())
    server.add_host("app.localhost", "ident-a")
    server.add_host("b.localhost:8080", "ident-b")
    server.add_host("c.localhost", "ident-c")
    assert Metrics(server, host_labels=True).host_label(host) == label


def test_each_metrics_has_its_own_registry_and_the_global_one_is_untouched():
    with MemoryTunnel() as env:
        one, two = Metrics(env.server), Metrics(env.server)
        assert one.registry is not two.registry
        assert value(one, "tunnel_clients_connected") == value(two, "tunnel_clients_connected") == 1
        assert REGISTRY.get_sample_value("tunnel_client_connects_total") is None
        one.close()
        two.close()


def test_the_resource_serves_the_text_format_over_http():
    with tunnel() as (env, metrics):
        env.get(b"/echo?echo=1")
        port = env.listen(Site(metrics.resource(), reactor=env.clock), 9100)
        raw = env.request(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", port=9100
        )
        response = parse_response(raw)
        assert response.code == 200
        assert response.header(b"content-type").startswith(b"text/plain; version=")
        families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}
        assert families["tunnel_requests"].type == "counter"
        assert families["tunnel_request_duration_seconds"].type == "histogram"
        assert families["tunnel_clients_connected"].samples[0].value == 1
        assert port.getHost().port == 9100


def test_the_resource_speaks_openmetrics_and_selects_by_name():
    with tunnel() as (env, metrics):
        env.listen(Site(metrics.resource(), reactor=env.clock), 9100)
        raw = env.request(
            b"GET /metrics?name[]=tunnel_clients_connected HTTP/1.1\r\nHost: x\r\n"
            b"Accept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n",
            port=9100,
        )
        response = parse_response(raw)
        assert response.header(b"content-type").startswith(b"application/openmetrics-text")
        assert response.body == (
            b"# HELP tunnel_clients_connected Tunnel clients connected (control handshake done).\n"
            b"# TYPE tunnel_clients_connected gauge\ntunnel_clients_connected 1.0\n# EOF\n"
        )


class Recording(ServerEvents):
    def __init__(self) -> None:
        self.done: list[tuple[bytes, int, float]] = []
        self.errors: list[ErrorKind] = []

    def request_done(self, request, seconds: float) -> None:
        self.done.append((request.uri, request.code, seconds))

    def error(self, kind: ErrorKind) -> None:
        self.errors.append(kind)


def test_the_site_tells_its_events_of_each_request_with_its_duration():
    events = Recording()
    with MemoryTunnel(site_kwargs={"events": events}) as env:
        peer = env.connect()
        peer.send(
            b"GET /delay?n=1.5 HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
            b"GET /status?n=204 HTTP/1.1\r\nHost: app.localhost\r\n\r\n"
        )
        env.advance(1.5)
        peer.close()
        env.flush()
    assert events.done == [(b"/delay?n=1.5", 200, 1.5), (b"/status?n=204", 204, 0.0)]
    assert events.errors == []


def test_a_site_without_events_times_nothing():
    with MemoryTunnel() as env:
        env.get(b"/echo?echo=1")
        channel = env.site.protocol()
        assert env.site.events is None
        assert channel.head_clock is None and channel.events is None


# -- errors by kind, where they happen ----------------------------------------------------


def errors(metrics: Metrics) -> dict[str, float]:
    """The error kinds counted so far (non-zero only)."""
    return {
        dict(labels)["kind"]: v
        for (name, labels), v in samples(metrics).items()
        if name == "tunnel_errors_total" and v
    }


def test_no_virtual_host_and_no_client_session():
    with tunnel() as (env, metrics):
        assert env.get(b"/", host=b"nobody.example").code == 502
        assert errors(metrics) == {"no_vhost": 1}
        stop_client(env)
        assert env.get(b"/").code == 502
        assert errors(metrics) == {"no_vhost": 1, "no_client": 1}


def test_refusals_of_the_resource_are_bad_requests():
    with tunnel() as (env, metrics):
        assert env.get(b"/", headers=b"Host: other\r\n").code == 400  # two Host headers
        raw = env.request(b"CONNECT app.localhost:443 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        assert parse_response(raw).code == 501
        assert errors(metrics) == {"bad_request": 2}


def test_a_tunnel_timeout():
    with tunnel() as (env, metrics):
        env.tunnel_connection().freeze()  # the client hears nothing from now on
        peer = env.connect()
        peer.send(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.advance(env.server.tunnel_timeout)
        assert parse_response(peer.take()).code == 502
        assert errors(metrics) == {"tunnel_timeout": 1}
        env.tunnel_connection().thaw()
        peer.close()
        env.flush()


def test_too_many_pending_tunnels():
    with tunnel(server_kwargs={"max_pending_tunnels": 0}) as (env, metrics):
        assert env.get(b"/").code == 502
        assert errors(metrics) == {"too_many_pending": 1}


class Garbage(Protocol):
    """A local server that answers anything with what is not HTTP."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def test_an_origin_error():
    with tunnel(local=Factory.forProtocol(Garbage)) as (env, metrics):
        assert env.get(b"/").code == 502
        assert errors(metrics) == {"origin_error": 1}


def test_a_public_client_gone_before_its_answer():
    with tunnel() as (env, metrics):
        peer = env.connect()
        peer.send(b"GET /delay?n=5 HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        env.flush()
        peer.abort()
        env.flush()
        assert errors(metrics) == {"client_gone": 1}
        assert value(metrics, "tunnel_request_duration_seconds_count") == 0  # not answered
        env.advance(env.server.stream_idle_timeout + 5)


def test_a_chunked_body_over_the_limit():
    with tunnel(site_kwargs={"max_body": 10}) as (env, metrics):
        raw = env.request(
            b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n0123456789abcdef\r\n0\r\n\r\n"
        )
        assert parse_response(raw).code == 413
        env.advance(1)  # the answer's linger
        assert errors(metrics) == {"body_too_large": 1}


def test_a_body_too_slow():
    with tunnel(site_kwargs={"body_timeout": 1, "body_min_rate": 100}) as (env, metrics):
        peer = env.connect()
        peer.send(b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 1000\r\n\r\n")
        env.advance(2)
        assert parse_response(peer.received).code == 408
        env.advance(1)
        assert errors(metrics) == {"body_timeout": 1}


def test_control_requests_refused():
    with tunnel() as (env, metrics):
        raw = env.request(
            b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-Ktunnel-Identifier: not-a-tunnel\r\n\r\n"
        )
        assert parse_response(raw).code == 502
        raw = env.request(
            b"CONNECT /_controlPath/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-Ktunnel-Identifier: %s\r\n\r\n" % env.IDENT.encode()
        )
        assert parse_response(raw).code == 502  # connected already
        assert errors(metrics) == {"control_refused": 2}


TCP_PORT = 7000


def test_tcp_connections_unmapped_or_failed():
    with tunnel() as (env, metrics):
        env.listen(env.server.tcp_factory(), TCP_PORT)
        env.listen(env.server.tcp_factory(), TCP_PORT + 1)
        unmapped = env.connect(TCP_PORT)
        env.flush()
        assert unmapped.closed
        env.server.add_addr("nobody-connects-with-this", port=TCP_PORT + 1)
        failed = env.connect(TCP_PORT + 1)
        env.flush()
        assert failed.closed
        assert errors(metrics) == {"tcp_unmapped": 1, "tcp_failed": 1}


def test_a_server_without_events_reports_nothing_and_serves_the_same():
    with MemoryTunnel() as env:
        assert env.server.events is None
        assert env.get(b"/", host=b"nobody.example").code == 502
        assert env.get(b"/echo?echo=1").body == b"1"


def test_access_rule_denials_by_kind():
    with tunnel() as (env, metrics):
        env.resource.gate = AccessGate(env.clock, verify=lambda stored, pw: stored.matches(pw))
        rules = {"allow": ["10.0.0.0/8"]}
        env.server.add_host("deny.localhost", env.IDENT, HostRules.from_api(rules, params=CHEAP))
        rules = {"rate": {"per_second": 1, "burst": 1}}
        env.server.add_host("rate.localhost", env.IDENT, HostRules.from_api(rules, params=CHEAP))
        rules = {"basic_auth": {"user": "ops", "password": "pw"}}
        env.server.add_host("auth.localhost", env.IDENT, HostRules.from_api(rules, params=CHEAP))
        assert env.get(b"/", host=b"deny.localhost").code == 403
        assert [env.get(b"/echo?echo=1", host=b"rate.localhost").code for _ in "12"] == [200, 429]
        assert env.get(b"/", host=b"auth.localhost").code == 401
        assert errors(metrics) == {"forbidden": 1, "rate_limited": 1, "unauthorized": 1}


def test_every_denial_of_the_gate_has_a_kind():
    from tunnel.server.access import Decision
    from tunnel.server.web import _DENIALS

    assert set(_DENIALS) == set(Decision) - {Decision.ALLOWED}
    assert _DENIALS[Decision.UNAVAILABLE] is ErrorKind.AUTH_UNAVAILABLE
