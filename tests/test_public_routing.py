"""Where a public request goes and what the origin is told about it (issue 8,
item 4), as raw bytes in memory (tests/memory.py).

A request the public side refuses must be refused before any tunnel work:
the origin gets no connection at all.  The origin here is raw: it records
exactly the bytes it received, connection by connection.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from .memory import MemoryTunnel, Peer, parse_response

ORIGIN_PORT = 9000
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class RawOrigin(Peer):
    """Records what it receives; answers ``ANSWER`` and closes after a head."""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.transport.disconnecting:
            self.transport.write(ANSWER)
            self.transport.loseConnection()


def raw_env() -> MemoryTunnel:
    env = MemoryTunnel().start(connect=False)
    env.origins = []
    env.listen(
        Factory.forProtocol(lambda: env.origins.append(RawOrigin()) or env.origins[-1]),
        ORIGIN_PORT,
    )
    env.client = env.make_client(local=f"tcp:127.0.0.1:{ORIGIN_PORT}")
    env.client.startService()
    env.flush()
    return env


def head_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def header(raw: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in head_lines(raw)[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            out.append(value.strip())
    return out


# -- X-Forwarded-* (item 4) ------------------------------------------------------------


def test_x_forwarded_host_and_proto_are_what_the_server_saw_and_for_is_appended():
    with raw_env() as env:
        raw = env.request(
            b"GET /x HTTP/1.1\r\nHost: app.localhost\r\n"
            b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
        )
        assert parse_response(raw).body == b"ok"
        (origin,) = env.origins
        assert header(origin.received, b"x-forwarded-host") == [b"app.localhost"]
        assert header(origin.received, b"x-forwarded-proto") == [b"http"]
        assert header(origin.received, b"x-forwarded-for") == [b"10.0.0.1, 127.0.0.1"]


def test_x_forwarded_host_is_replaced_on_the_upgrade_path_too():
    with raw_env() as env:
        raw = env.request(
            b"GET /chat HTTP/1.1\r\nHost: app.localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nx-forwarded-host: evil.example\r\n"
            b"X-FORWARDED-PROTO: https\r\n\r\n"
        )
        assert parse_response(raw).body == b"ok"  # a 200, relayed as it is
        (origin,) = env.origins
        assert header(origin.received, b"x-forwarded-host") == [b"app.localhost"]
        assert header(origin.received, b"x-forwarded-proto") == [b"http"]
