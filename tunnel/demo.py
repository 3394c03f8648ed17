"""A whole tunnel on this machine: ``python -m tunnel.demo``.

Starts a small local site, a tunnel server on 127.0.0.1 and a tunnel client
that connects the two, then prints the public URL.  ``*.localhost`` names
resolve to 127.0.0.1 in curl and browsers, so ``http://app.localhost:PORT/``
works without DNS setup.  ``--check`` makes one request through the tunnel,
prints the answer and exits (0 on success).
"""

from __future__ import annotations

import argparse
import secrets
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site

from .client import LocalForwarder, LocalTargets, TunnelClientService
from .server import TunnelResource, TunnelServer, TunnelSite

PAGE = b"""<!doctype html>
<title>tunnel demo</title>
<h1>Hello through the tunnel</h1>
<p>This page is served by a local site on 127.0.0.1:%d and reached through
the tunnel server on port %d.</p>
"""


class DemoSite(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.ports = (0, 0)

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return PAGE % self.ports


async def run(port: int, host: str, check: bool) -> int:
    site = DemoSite()
    local = TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1")
    origin = await local.listen(Site(site))
    identifier = secrets.token_urlsafe(24)
    server = TunnelServer()
    server.add_host(host, identifier)
    public = await TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1").listen(
        TunnelSite(TunnelResource(server))
    )
    public_port = public.getHost().port
    site.ports = (origin.getHost().port, public_port)
    targets = LocalTargets(reactor, default=f"tcp:127.0.0.1:{origin.getHost().port}")
    client = TunnelClientService(
        TCP4ClientEndpoint(reactor, "127.0.0.1", public_port),
        identifier,
        LocalForwarder(targets.endpoint_for),
        host=f"127.0.0.1:{public_port}",
    )
    client.startService()
    await client.when_ready()
    url = f"http://{host}:{public_port}/"
    print(f"tunnel up: {url}  (try: curl {url})", flush=True)
    if not check:
        await defer.Deferred()  # until Ctrl-C
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    http = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
    response = await http.get(f"http://127.0.0.1:{public_port}/", headers={"Host": host})
    body = await response.content()
    print(response.code, body.decode(errors="replace"), flush=True)
    await client.stopService()
    await server.stop(grace=1.0)
    await public.stopListening()
    await origin.stopListening()
    return 0 if response.code == 200 and b"Hello through the tunnel" in body else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="public port (0: any free)")
    parser.add_argument("--host", default="app.localhost", help="public host name")
    parser.add_argument("--check", action="store_true", help="one request, then exit")
    parser.add_argument("--verbose", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    if args.verbose:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    return task.react(lambda _: defer.ensureDeferred(run(args.port, args.host, args.check)))


if __name__ == "__main__":
    sys.exit(main())
