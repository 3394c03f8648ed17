"""Server CPU per forwarded request, and the cost of parsing one response.

Two measurements, in one process and without sockets:

* **server CPU per request**: N requests pushed through the in-memory tunnel
  (``tests/memory.py``'s ``MemoryTunnel``: the real TunnelSite, TunnelServer,
  yamux, TunnelClientService) to a raw origin that answers every request with
  the same small response.  Only the time spent inside the server's
  protocols is counted: every call the memory network makes into a
  protocol on the server's port (the public HTTP connections and the
  client's tunnel connection) is timed with ``time.process_time``; the
  client, the origin and the network's own work are left out.  Cases: ``GET``
  (no body, 2-byte answer), ``POST 4 KiB`` (Content-Length body) and ``POST
  64 KiB chunked``; each public request on its own connection, one at a time.
  ``--tree DIR`` runs the same against another checkout (e.g. the commit
  before the one forwarder: ``git archive COMMIT | tar -x -C DIR``), whose
  ``tunnel`` and ``tests`` packages are then imported instead.
* **parser cost per response** (``--parsers``): one small response
  (``HTTP/1.1 200 OK`` with 5 header fields and a 2-byte body) parsed by
  httptools with a fresh parser each time (what ``http1.ResponseReader``
  does), by ``ResponseReader`` itself (head scan + httptools + our checks),
  and by h11 (a fresh client Connection, which must be told of the request
  first).

Run from the repository root::

    .venv/bin/python bench/forward.py [-n 2000] [--tree DIR] [--parsers]

Figures move by 10-30 % between runs on a loaded machine; compare runs made
back to back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def server_cpu(n: int) -> dict[str, float]:
    from twisted.internet.protocol import Factory, Protocol

    from tests import memory
    from tests.memory import MemoryTunnel

    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    class Origin(Protocol):
        """Answers once a request's end is seen (our framing: a blank line,
        Content-Length, or the last chunk), then closes."""

        def connectionMade(self) -> None:
            self.buf = b""
            self.done = False

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            if self.done or b"\r\n\r\n" not in self.buf:
                return
            head, body = self.buf.split(b"\r\n\r\n", 1)
            lower = head.lower()
            if b"content-length:" in lower:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) < length:
                    return
            elif b"transfer-encoding: chunked" in lower and not body.endswith(b"0\r\n\r\n"):
                return
            self.done = True
            self.transport.write(answer)
            self.transport.loseConnection()

    spent = [0.0]
    original = memory.MemoryTransport._call

    def timed(self, f, *args):
        if getattr(self._host, "port", None) != MemoryTunnel.PUBLIC_PORT:
            return original(self, f, *args)
        start = time.process_time()
        try:
            return original(self, f, *args)
        finally:
            spent[0] += time.process_time() - start

    memory.MemoryTransport._call = timed
    env = MemoryTunnel().start(connect=False)
    env.listen(Factory.forProtocol(Origin), 9000)
    env.client = env.make_client(local="tcp:127.0.0.1:9000")
    env.client.startService()
    env.flush()
    host = b"Host: app.localhost\r\n"
    body4k = b"x" * 4096
    chunk = b"y" * 8192
    cases = {
        "GET": b"GET / HTTP/1.1\r\n" + host + b"\r\n",
        "POST 4 KiB": b"POST /up HTTP/1.1\r\n" + host + b"Content-Length: 4096\r\n\r\n" + body4k,
        "POST 64 KiB chunked": b"POST /up HTTP/1.1\r\n"
        + host
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + (b"2000\r\n" + chunk + b"\r\n") * 8
        + b"0\r\n\r\n",
    }
    out = {}
    try:
        for name, request in cases.items():
            for _ in range(min(50, n)):  # warm up
                env.request(request)
            spent[0] = 0.0
            for _ in range(n):
                raw = env.request(request)
                assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"ok"), raw[:200]
            out[name] = spent[0] / n * 1e6
    finally:
        memory.MemoryTransport._call = original
        env.stop(check=False)
    return out


def parsers(n: int) -> dict[str, float]:
    import h11
    import httptools

    from tunnel.server.http1 import ResponseReader

    response = (
        b"HTTP/1.1 200 OK\r\nServer: origin\r\nDate: Mon, 30 Nov 2026 08:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nCache-Control: no-cache\r\nContent-Length: 2\r\n\r\nok"
    )

    class Callbacks:
        def on_status(self, status):
            pass

        def on_header(self, name, value):
            pass

        def on_headers_complete(self):
            pass

        def on_body(self, body):
            pass

        def on_message_complete(self):
            pass

    class Sink:
        def interim(self, head):
            pass

        def final(self, head):
            pass

        def upgraded(self, head, rest):
            pass

        def body(self, data):
            pass

        def complete(self):
            pass

    def run_httptools():
        httptools.HttpResponseParser(Callbacks()).feed_data(response)

    def run_reader():
        ResponseReader(Sink()).feed(response)

    request = h11.Request(method="GET", target="/", headers=[("Host", "app.localhost")])

    def run_h11():
        conn = h11.Connection(h11.CLIENT)
        conn.send(request)
        conn.send(h11.EndOfMessage())
        conn.receive_data(response)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                break

    out = {}
    for name, f in (("httptools", run_httptools), ("ResponseReader", run_reader), ("h11", run_h11)):
        for _ in range(1000):
            f()
        start = time.process_time()
        for _ in range(n):
            f()
        out[name] = (time.process_time() - start) / n * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="requests per case")
    parser.add_argument("--tree", help="a checkout to measure instead of this one")
    parser.add_argument("--parsers", action="store_true", help="parser cost per response")
    args = parser.parse_args()
    root = os.path.abspath(args.tree or os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, root)
    import tunnel

    print(f"tunnel from {os.path.dirname(tunnel.__file__)}; load {os.getloadavg()[0]:.2f}")
    if args.parsers:
        for name, us in parsers(args.n * 10).items():
            print(f"  parse one response  {name:<20} {us:7.2f} us")
        return
    for name, us in server_cpu(args.n).items():
        print(f"  server CPU per request  {name:<22} {us:7.1f} us")


if __name__ == "__main__":
    main()
