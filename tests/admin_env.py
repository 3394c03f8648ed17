"""The admin endpoint on real sockets, for the tests of the API, tunnel-admin and
the status page: a TunnelServer with Routes over a MemoryStore, its public
site, the admin endpoint (``AdminService``), real tunnel clients and an
origin, all on 127.0.0.1; and the helpers those tests share."""

from __future__ import annotations

import base64
import contextlib
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from tunnel.admin.service import AdminService
from tunnel.server.metrics import Metrics
from tunnel.server.routes import Routes, TCPPorts
from tunnel.server.store import MemoryStore

from .helpers import Collect
from .live import http_client
from .tunnel_env import TunnelEnv

TOKEN = b"s3cret-admin-token"
IDENT = "admin-test-identifier-7b1d"
HOST = TunnelEnv.HOST  # app.localhost


def auth(token: bytes = TOKEN) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Bearer " + token]}


def basic(user: bytes, password: bytes) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Basic " + base64.b64encode(user + b":" + password)]}


JSON = {b"content-type": [b"application/json"]}


@contextlib.contextmanager
def global_log():
    collect = Collect()
    globalLogPublisher.addObserver(collect)
    try:
        yield collect
    finally:
        globalLogPublisher.removeObserver(collect)


class AdminEnv:
    """An origin, a tunnel server with its public site, Routes over a
    MemoryStore, the admin endpoint, and tunnel clients made on demand.

    Routes start empty: every host and port is added through the API.
    """

    def __init__(self, store=None) -> None:
        self.store = store if store is not None else MemoryStore()
        self.clients = []
        #: every body the admin endpoint answered (checked for identifiers)
        self.bodies: list[bytes] = []

    async def start(self) -> AdminEnv:
        self.tunnel = await TunnelEnv().start(connect=False)
        self.server = self.tunnel.server
        self.server.delete_host(HOST)  # TunnelEnv adds one directly; ours come from the API
        self.routes = Routes(
            self.server, self.store, listen_tcp=TCPPorts(self.server, interface="127.0.0.1")
        )
        await self.routes.start()
        self.metrics = Metrics(self.server)
        self.admin = AdminService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            TOKEN,
            self.routes,
            self.server,
            self.metrics,
        )
        self.admin.startService()
        port = await self.admin.when_listening()
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.http = http_client()
        return self

    async def stop(self) -> None:
        for client in self.clients:
            if client.running:
                await client.stopService()
        if self.admin.running:
            await self.admin.stopService()
        await self.routes.stop()
        self.metrics.close()
        await self.tunnel.stop()

    async def call(self, method, path, body=None, *, headers=None, raw=None):
        """(status, decoded JSON or text, response) from the admin endpoint."""
        sent = dict(auth() if headers is None else headers)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault(b"content-type", [b"application/json"])
        response = await self.http.request(method, self.url + path, headers=sent, data=data)
        content = await response.content()
        self.bodies.append(content)
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.startswith(b"application/json") and content:
            return response.code, json.loads(content), response
        return response.code, content.decode("utf-8", "replace"), response

    async def connect(self, identifier: str = IDENT):
        """A tunnel client holding ``identifier``, once the server sees it ready."""
        client = self.tunnel.make_client(identifier=identifier)
        self.clients.append(client)
        client.startService()
        await client.when_ready()
        await self.server.when_connected(identifier)
        return client

    async def public(self, path: str, host: str = HOST):
        response = await self.http.get(self.tunnel.url + path, headers={b"host": [host.encode()]})
        return response.code, await response.content()


class Raw(Protocol):
    """A client that writes bytes as given: what it received, and ``closed``
    (fired with the reason when the connection ends)."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(reason)


async def raw_connection(url: str) -> Raw:
    """A Raw client connected to ``url``'s port on 127.0.0.1."""
    port = int(url.rsplit(":", 1)[1])
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())
