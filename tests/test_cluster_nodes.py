"""Three real ``twistd tunnel-server`` nodes and one real ``redis-server``:
what issue 11 asks of a cluster, through the processes users run.

Each node listens for the public on its own port, for the other nodes on
its own cluster port, and opens the shared ``--tcp`` port on its own
loopback address (127.0.0.1, .2, .3: one machine, three interfaces).  The
test process is the origin (an HTTP server that also accepts a WebSocket
upgrade and echoes, and a TCP echo) and the public client.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from tunnel.koding.identifiers import TunnelKey

from . import redis_server
from .pki import make_pki, ssl_listen
from .processes import (
    Twistd,
    free_port,
    reap_all,
    spawn_client,
    spawn_twistd,
    stop,
    until_children,
)
from .tunnel_env import RawClient

pytestmark = pytest.mark.skipif(not redis_server.available(), reason=redis_server.SKIP_REASON)

IDENTIFIER = "cluster-e2e-identifier-61f0a7d2"
SECRET = "cluster-e2e-shared-secret-3c9b5e"
TOKEN = "cluster-e2e-admin-token-77d1"
HOST = "app.localhost"
KEY = TunnelKey.of(IDENTIFIER)
#: seconds a node's records outlive it (the least the flag allows is 1)
TTL = 2.0


class Origin(Protocol):
    """HTTP/1.1 with keep-alive: ``GET /path`` answers ``NAME: /path`` (NAME
    is ``origin`` unless the factory says); an upgrade answers 101 and then
    echoes every byte."""

    name = b"origin"

    def connectionMade(self) -> None:
        self.buf = b""
        self.echoing = False

    def dataReceived(self, data: bytes) -> None:
        if self.echoing:
            self.transport.write(data)
            return
        self.buf += data
        while b"\r\n\r\n" in self.buf and not self.echoing:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b"\r\n", 1)[0].split(b" ")[1]
            if b"\r\nupgrade: websocket" in head.lower():
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                self.echoing = True
                if self.buf:
                    self.transport.write(self.buf)
                    self.buf = b""
                return
            body = self.name + b": " + path
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Node:
    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.interface = f"127.0.0.{index}"
        self.public = free_port()
        self.cluster = free_port()
        self.admin = free_port()
        self.process: Twistd | None = None


async def exchange(host: str, port: int, data: bytes, until) -> bytes:
    """Send ``data`` on a new connection; what came back once ``until`` holds
    or the connection closed."""
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    client = await connectProtocol(endpoint, RawClient(until))
    client.transport.write(data)
    timer = reactor.callLater(10, client.transport.abortConnection)
    try:
        return await client.done
    finally:
        if timer.active():
            timer.cancel()
        client.transport.loseConnection()


def response_complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


async def get(node: Node, path: str) -> tuple[int, bytes]:
    """A public GET of ``path`` on ``node``: (status, body)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    answer = await exchange("127.0.0.1", node.public, request, response_complete)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def start_node(redis, node: Node, tmp_path, tcp_port: int, *extra: str, pki=None) -> Twistd:
    """``node`` as ``twistd tunnel-server``; with ``pki`` its cluster link is
    TLS (an ssl: listener, nodes dialled as localhost, trusting the CA)."""
    if pki is None:
        listen = f"tcp:{node.cluster}:interface=127.0.0.1"
        advertise = f"127.0.0.1:{node.cluster}"
    else:
        listen = ssl_listen(pki, node.cluster)
        advertise = f"localhost:{node.cluster}"
        extra = (*extra, "--cluster-trust", str(pki.ca_dir))
    node.process = spawn_twistd(
        "tunnel-server",
        "--listen", f"tcp:{node.public}:interface=127.0.0.1",
        "--vhost-file", str(tmp_path / "vhosts"),
        "--tcp", f"{tcp_port}={IDENTIFIER}",
        "--tcp-interface", node.interface,
        "--redis", redis.endpoint,
        "--redis-prefix", "cluster-e2e:",
        "--node-name", node.name,
        "--cluster-listen", listen,
        "--cluster-advertise", advertise,
        "--cluster-secret-file", str(tmp_path / "cluster.secret"),
        "--presence-ttl", str(TTL),
        "--admin", f"tcp:{node.admin}:interface=127.0.0.1",
        "--admin-token-file", str(tmp_path / "admin.token"),
        "--shutdown-grace", "1",
        *extra,
    )  # fmt: skip
    return node.process


@asynccontextmanager
async def three_nodes(tmp_path, *node_argv: str, pki=None, persistent: bool = False):
    """A redis-server and three twistd nodes on it, listening; all ended after."""
    with redis_server.running(persistent=persistent) as redis:
        cluster = Cluster(redis, tmp_path, *node_argv, pki=pki)
        try:
            await cluster.up()
            yield cluster
        finally:
            await cluster.close()


class Cluster:
    """The nodes, their clients, the origin and Redis of one test."""

    def __init__(self, redis, tmp_path, *node_argv: str, pki=None) -> None:
        self.redis = redis
        self.tmp_path = tmp_path
        (tmp_path / "vhosts").write_text(f"{HOST}={IDENTIFIER}\n")
        (tmp_path / "cluster.secret").write_text(SECRET + "\n")
        (tmp_path / "identifier").write_text(IDENTIFIER + "\n")
        (tmp_path / "admin.token").write_text(TOKEN + "\n")
        self.origin = reactor.listenTCP(0, Factory.forProtocol(Origin), interface="127.0.0.1")
        self.echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.tcp_port = free_port()
        self.nodes = [Node(name, i) for i, name in enumerate("abc", 1)]
        self.processes: list[Twistd] = []
        for node in self.nodes:
            process = start_node(redis, node, tmp_path, self.tcp_port, *node_argv, pki=pki)
            self.processes.append(process)
        self.origins = [self.origin]

    def named_origin(self, name: bytes):
        """One more origin, answering ``NAME: /path``, for a client of its own."""
        factory = Factory.forProtocol(type("Named", (Origin,), {"name": name}))
        origin = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.origins.append(origin)
        return origin

    async def up(self) -> None:
        """Wait until every node answers on its public and admin ports."""

        async def answering():
            for node in self.nodes:
                await get(node, "/up")  # any answer (a 502 before a client comes)
                await admin_get(node, "/api/cluster")
            return True

        await until_children("the nodes to listen", answering, *self.running())

    def client(self, *servers: Node, origin=None) -> Twistd:
        process = spawn_client(
            [node.public for node in servers],
            self.tmp_path / "identifier",
            (origin or self.origin).getHost().port,
            "--tcp-local",
            f"{self.tcp_port}=tcp:127.0.0.1:{self.echo.getHost().port}",
        )
        self.processes.append(process)
        return process

    def running(self) -> list[Twistd]:
        return [p for p in self.processes if p.running]

    async def close(self) -> None:
        await reap_all(self.processes)
        for origin in self.origins:
            await origin.stopListening()
        await self.echo.stopListening()

    def check_logs(self) -> None:
        for process in self.processes:
            log = process.log
            assert "Traceback" not in log and "Unhandled" not in log, f"{process.name}:\n{log}"
            for secret in (IDENTIFIER, SECRET, TOKEN):
                assert secret not in log, f"{process.name}:\n{log}"


async def served(node: Node, path: str):
    code, body = await get(node, path)
    return body if code == 200 else None


async def admin_get(node: Node, path: str) -> bytes:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = await exchange("127.0.0.1", node.admin, request, lambda b: False)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    return body


def metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics")


async def websocket_echo(node: Node, message: bytes) -> bytes:
    upgrade = (
        f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    answer = await exchange(
        "127.0.0.1", node.public, upgrade + message, lambda b: b.endswith(message)
    )
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    return answer.partition(b"\r\n\r\n")[2]


async def tcp_echo(node: Node, port: int, message: bytes) -> bytes:
    return await exchange(node.interface, port, message, lambda b: len(b) >= len(message))


@pytest_twisted.ensureDeferred
async def test_any_node_serves_a_tunnel_held_by_another_http_websocket_tcp(tmp_path):
    async with three_nodes(tmp_path) as cluster:
        redis = cluster.redis
        a, b, c = cluster.nodes
        cluster.client(b)
        body = await until_children(
            "a to serve b's client", lambda: served(a, "/one"), *cluster.running()
        )
        assert body == b"origin: /one"
        # c looked it up before the client came: its answer is cached (1 s)
        body = await until_children("c to serve it", lambda: served(c, "/two"), *cluster.running())
        assert body == b"origin: /two"
        # kept streams across nodes: many requests, each answered right
        for n in range(20):
            assert await get(a, f"/n{n}") == (200, f"origin: /n{n}".encode())
        message = b"a websocket frame's bytes, carried through a and b" * 100
        assert await websocket_echo(a, message) == message
        for node in (a, c):
            data = b"tcp through %s " % node.name.encode() * 1000
            assert await tcp_echo(node, cluster.tcp_port, data) == data
        # what the operator sees: a forwarded, over one link to b, which holds it
        seen_a = json.loads(await admin_get(a, "/api/cluster"))
        assert seen_a["node"] == "a" and seen_a["tunnels_held"] == 0
        assert seen_a["forwarded"] >= 23  # 21 GETs, the upgrade, a TCP connection
        assert [(link["peer"], link["state"]) for link in seen_a["links"]] == [("b", "open")]
        seen_b = json.loads(await admin_get(b, "/api/cluster"))
        assert seen_b["tunnels_held"] == 1 and seen_b["forwarded"] == 0
        page_a = (await admin_get(a, "/")).decode()  # the status page says the same
        assert '<dd id="cluster-node">a</dd>' in page_a
        assert f'<dd id="cluster-forwarded">{seen_a["forwarded"]}</dd>' in page_a
        assert '<td class="peer">b</td><td class="state open">open</td>' in page_a
        metrics_a = await admin_get(a, "/metrics")
        assert metric(metrics_a, "tunnel_cluster_forwarded_total") == seen_a["forwarded"]
        assert metric(metrics_a, 'tunnel_cluster_links{state="open"}') == 1
        assert metric(metrics_a, "tunnel_clients_connected") == 0
        assert metric(await admin_get(b, "/metrics"), "tunnel_clients_connected") == 1
        # a node stopped gracefully takes its records with it, at once
        started = time.monotonic()
        await stop(b.process)
        assert time.monotonic() - started < 5
        assert redis.command("KEYS", "cluster-e2e:presence:*") == []
        assert redis.command("EXISTS", "cluster-e2e:node:b") == 0
        assert await get(a, "/after") == (502, b"no client session established\n")
        cluster.check_logs()


@pytest_twisted.ensureDeferred
async def test_one_identifier_is_held_by_one_node_until_its_client_dies(tmp_path):
    async with three_nodes(tmp_path) as cluster:
        a, b, c = cluster.nodes
        first = cluster.client(b)
        await until_children("b's client", lambda: served(a, "/first"), *cluster.running())
        second = cluster.client(c)  # the same identifier, on another node

        async def refused():
            return True if f"{KEY} is connected already" in c.process.log else None

        await until_children("c to refuse the duplicate", refused, *cluster.running())
        assert f"client {KEY} connected" not in c.process.log
        assert await get(a, "/still") == (200, b"origin: /still")

        first.signal("KILL")  # b sees the session end, and lets the tunnel go
        await first.ended()

        async def c_holds_it():
            return True if f"client {KEY} connected" in c.process.log else None

        await until_children("c to take the newcomer", c_holds_it, *cluster.running())
        body = await until_children(
            "a to serve c's client", lambda: served(a, "/second"), *cluster.running()
        )
        assert body == b"origin: /second"
        assert second.running
        cluster.check_logs()


@pytest_twisted.ensureDeferred
async def test_a_killed_nodes_client_is_served_again_within_backoff_and_ttl(tmp_path):
    async with three_nodes(tmp_path) as cluster:
        a, b, c = cluster.nodes
        client = cluster.client(b, c)
        await until_children("the client on b or c", lambda: served(a, "/up"), *cluster.running())
        held = b if f"up at tcp:127.0.0.1:{b.public} (" in client.log else c
        other = c if held is b else b
        held.process.signal("KILL")
        await held.process.ended()
        killed = time.monotonic()

        # during the gap every request gets an answer (a 502), never a hang
        gap: list[int] = []

        async def back():
            started = time.monotonic()
            code, body = await get(a, "/back")
            assert time.monotonic() - started < 8, "a request hung"
            if code == 200:
                return body
            assert code == 502, (code, body)
            gap.append(code)
            return None

        alive = [p for p in cluster.running() if p is not held.process]
        body = await until_children("a to serve the client again", back, *alive, timeout=25)
        assert body == b"origin: /back"
        assert gap, "the client was back before a request could see it gone"
        took = time.monotonic() - killed
        assert took < TTL + 10, took  # the TTL plus a few of the client's backoff delays
        assert f"up at tcp:127.0.0.1:{other.public} (" in client.log
        assert await get(other, "/there") == (200, b"origin: /there")
        for process in alive:
            assert "Traceback" not in process.log, process.log


@pytest_twisted.ensureDeferred
async def test_nodes_serve_on_while_redis_is_down_and_meet_again_after(tmp_path):
    # persistent: the hosts survive the restart (what an empty one does is
    # test_redis_store's); the presence records may have expired meanwhile
    async with three_nodes(tmp_path, persistent=True) as cluster:
        redis = cluster.redis
        a, b, c = cluster.nodes
        cluster.client(b)
        await until_children("a to serve b's client", lambda: served(a, "/up"), *cluster.running())
        redis.stop()
        # b serves its client; a forwards to the holder it knew
        for node in (b, a, a):
            assert await get(node, "/down") == (200, b"origin: /down")
        redis.start()

        async def c_finds_it():
            return await served(c, "/again")

        body = await until_children("c to find b's client", c_finds_it, *cluster.running())
        assert body == b"origin: /again"
        cluster.check_logs()


@pytest_twisted.ensureDeferred
async def test_a_pooled_host_with_clients_on_two_nodes_loses_no_request_to_a_killed_one(tmp_path):
    async with three_nodes(tmp_path, "--pool", HOST) as cluster:
        a, b, c = cluster.nodes
        one = cluster.client(a, origin=cluster.named_origin(b"one"))
        cluster.client(b, origin=cluster.named_origin(b"two"))
        seen: set[bytes] = set()

        async def both_serve():
            code, body = await get(c, "/which")
            if code == 200:
                seen.add(body.split(b":")[0])
            return True if seen == {b"one", b"two"} else None

        # c holds no client: it takes the pool's two nodes in turn
        await until_children("both clients to serve", both_serve, *cluster.running())
        answers = [await get(c, f"/turn{n}") for n in range(4)]
        assert sorted(body.split(b":")[0] for _, body in answers) == [
            b"one",
            b"one",
            b"two",
            b"two",
        ]

        one.signal("KILL")
        await one.ended()
        # from now on every request is answered, by the client that is left
        for n in range(10):
            for node in (c, a, b):
                assert await get(node, f"/after{n}") == (200, b"two: /after%d" % n)
        cluster.check_logs()


@pytest_twisted.ensureDeferred
async def test_nodes_link_over_tls_when_told_whom_to_trust(tmp_path):
    pki = make_pki(tmp_path)
    async with three_nodes(tmp_path, pki=pki) as cluster:
        a, b, c = cluster.nodes
        cluster.client(b)
        body = await until_children(
            "a to serve b's client over TLS", lambda: served(a, "/tls"), *cluster.running()
        )
        assert body == b"origin: /tls"
        links = json.loads(await admin_get(a, "/api/cluster"))["links"]
        assert [(link["peer"], link["address"]) for link in links] == [
            ("b", f"localhost:{b.cluster}")
        ]
        cluster.check_logs()
