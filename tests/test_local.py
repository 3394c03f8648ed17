"""Which local endpoint a control message reaches: the public Host header
must not pick an arbitrary local port unless that is asked for.

The routing table on its own, the forwarder on a hand-driven session, and
whole public requests through the in-memory tunnel (tests/memory.py)."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.server import Site

from tunnel.client.local import LocalForwarder, LocalTargets, connect_error
from tunnel.koding.wire import NO_LOCAL_SERVER, ControlMessage, TransportProtocol
from tunnel.yamux.frame import FLAG_FIN, TYPE_DATA, TYPE_WINDOW_UPDATE

from .helpers import Wire
from .memory import ClockRequest, MemoryTunnel
from .tunnel_env import Origin

HTTP, TCP, WS = TransportProtocol.HTTP, TransportProtocol.TCP, TransportProtocol.WS


def msg(protocol, port):
    return ControlMessage(1, protocol, port)


@pytest.fixture
def targets():
    return LocalTargets(
        reactor,
        default="tcp:127.0.0.1:8000",
        ports={8080: "tcp:127.0.0.1:9080"},
        tcp_ports={2222: "tcp:127.0.0.1:22"},
    )


def test_forged_host_ports_go_to_the_default(targets):
    # Host: app.example.com:22 must not reach 127.0.0.1:22
    assert targets.description(msg(HTTP, 22)) == "tcp:127.0.0.1:8000"
    assert targets.description(msg(WS, 6379)) == "tcp:127.0.0.1:8000"


def test_port_zero_means_80_and_mapped_ports_win(targets):
    assert targets.description(msg(HTTP, 0)) == "tcp:127.0.0.1:8000"
    targets.ports[80] = "tcp:127.0.0.1:7080"
    assert targets.description(msg(HTTP, 0)) == "tcp:127.0.0.1:7080"
    assert targets.description(msg(HTTP, 8080)) == "tcp:127.0.0.1:9080"


def test_tcp_tunnels_need_an_explicit_mapping(targets):
    assert targets.description(msg(TCP, 2222)) == "tcp:127.0.0.1:22"
    assert targets.description(msg(TCP, 3306)) is None
    assert targets.endpoint_for(msg(TCP, 3306)) is None


def test_any_port_is_an_explicit_opt_in():
    targets = LocalTargets(reactor, default="tcp:127.0.0.1:8000", allow_any_port=True)
    assert targets.description(msg(HTTP, 3000)).startswith("tcp:127.0.0.1:3000")
    assert targets.description(msg(HTTP, 0)).startswith("tcp:127.0.0.1:80")
    assert targets.description(msg(TCP, 5432)).startswith("tcp:127.0.0.1:5432")


def test_endpoints_are_built_once_per_target(targets):
    first = targets.endpoint_for(msg(HTTP, 8080))
    assert targets.endpoint_for(msg(HTTP, 8080)) is first


@pytest.mark.parametrize("protocol", [HTTP, WS, TCP])
def test_no_endpoint_answers_like_go(protocol):
    """HTTP/WS get Go's exact 503 'no local server'; TCP is just closed."""
    wire = Wire(False)
    wire.feed(bytes.fromhex("000100010000000100000000"))  # the peer opens stream 1
    stream = wire.session.streams[1]
    wire.sent()
    LocalForwarder(lambda message: None)(stream, msg(protocol, 9))
    frames = wire.sent()
    body = b"".join(b for h, b in frames if h.type == TYPE_DATA)
    assert body == (b"" if protocol == TCP else NO_LOCAL_SERVER)
    assert (frames[-1][0].type, frames[-1][0].flags) == (TYPE_WINDOW_UPDATE, FLAG_FIN)
    wire.lose()


def test_public_host_ports_reach_only_configured_local_servers():
    env = MemoryTunnel().start(connect=False)
    mapped = Origin(clock=env.clock)
    env.listen(Site(mapped, requestFactory=ClockRequest, reactor=env.clock), 9080)
    trapped = []  # a local service on 127.0.0.1:22 that no public request may reach
    env.listen(Factory.forProtocol(lambda: trapped.append(1) or Protocol()), 22)
    env.client = env.make_client(ports={8080: "tcp:127.0.0.1:9080"})
    env.client.startService()
    with env:
        response = env.get(b"/echo?echo=mapped", host=b"app.localhost:8080")
        assert (response.code, response.body) == (200, b"mapped")
        assert len(mapped.seen) == 1 and env.origin.seen == []
        for forged in (b"app.localhost:22", b"app.localhost", b"app.localhost:0"):
            response = env.get(b"/echo?echo=default", host=forged)
            assert (response.code, response.body) == (200, b"default")
        assert len(env.origin.seen) == 3 and len(mapped.seen) == 1
        assert trapped == []


@pytest.mark.parametrize("local", ["tcp:127.0.0.1:9999", None], ids=["refused", "unset"])
def test_no_local_server_reaches_the_public_client_as_go_s_503(local):
    env = MemoryTunnel().start(connect=False)
    env.client = env.make_client(local=local)
    if local is None:
        env.client.forwarder = LocalForwarder(lambda message: None)
    env.client.startService()
    with env:
        raw = env.request(b"GET /echo HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        assert raw == NO_LOCAL_SERVER  # the client's answer, relayed byte for byte
        assert env.client.state.name == "CONNECTED"  # the tunnel is unharmed


def test_a_connect_error_with_a_nested_failure_is_told_in_one_line():
    """Twisted may wrap the reason a connect failed in a Failure inside a
    ConnectError; its repr ("[Failure instance: Traceback ...]") must not
    reach the log, only what went wrong."""
    lost = Failure(ConnectionLost("gone"))
    nested = Failure(ConnectError(string=lost))
    assert connect_error(nested) == (
        "An error occurred while connecting: " + lost.getErrorMessage()
    )
    assert "Traceback" not in connect_error(nested)
    plain = Failure(ConnectError(string="refused"))
    assert connect_error(plain) == plain.getErrorMessage()
