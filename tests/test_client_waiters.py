"""Every ``when_*()`` of a connection hands each caller a Deferred of its own.

Regression: TunnelClientProtocol.when_ready()/when_lost() returned one shared
Deferred, so once the service had chained its callbacks onto it, later
callers got None (or whatever the service's callbacks returned).  The same
helper (tunnel.observe.OneShot) now backs the control stream's and the
server registry's waiters; these tests pin their documented results.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tunnel.client import TunnelClientProtocol, TunnelServerError
from tunnel.koding.control import ControlProtocol, HandshakeError
from tunnel.koding.wire import CONNECTED_REPLY, HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE
from tunnel.server import NoClientSession, TunnelServer
from tunnel.yamux import YamuxSession
from tunnel.yamux.frame import FLAG_ACK, FLAG_SYN, TYPE_WINDOW_UPDATE

from .helpers import data_frame, frame

#: what a koding server sends a client that it accepts: the reply, the ACK of
#: the control stream and ``controlOk``
SERVER_ACCEPTS = (
    CONNECTED_REPLY + frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0) + data_frame(1, HANDSHAKE_RESPONSE)
)


def _refuse(stream, message) -> None:
    stream.abortConnection()


def client_protocol() -> tuple[TunnelClientProtocol, StringTransport, Clock]:
    clock = Clock()
    transport = StringTransport()
    protocol = TunnelClientProtocol("ident", "server:80", _refuse, clock)
    protocol.makeConnection(transport)
    return protocol, transport, clock


def results(d) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


# -- TunnelClientProtocol ------------------------------------------------------------------


def test_client_when_ready_gives_every_caller_the_protocol():
    protocol, transport, clock = client_protocol()
    first = protocol.when_ready()
    first.addCallback(lambda _: "consumed by the service")
    second = protocol.when_ready()
    assert second is not first
    protocol.dataReceived(SERVER_ACCEPTS)
    assert results(second) == [protocol]
    assert results(protocol.when_ready()) == [protocol]  # after the event: at once
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_client_when_lost_gives_every_caller_the_reason():
    protocol, transport, clock = client_protocol()
    protocol.dataReceived(SERVER_ACCEPTS)
    first = protocol.when_lost()
    first.addCallback(lambda _: None)
    second = protocol.when_lost()
    assert second is not first
    protocol.connectionLost(Failure(ConnectionLost("gone")))
    later = protocol.when_lost()
    for d in (second, later):
        [reason] = results(d)
        assert isinstance(reason, ConnectionLost)  # a value, never a failure


def test_client_when_ready_fails_for_every_caller_if_the_connection_fails_first():
    protocol, transport, clock = client_protocol()
    first = protocol.when_ready()
    first.addErrback(lambda _: None)  # one caller handles its failure ...
    second = protocol.when_ready()
    protocol.dataReceived(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nnope")
    protocol.connectionLost(Failure(ConnectionDone()))
    # ... which leaves the others' failures alone
    for d in (second, protocol.when_ready()):
        [failure] = results(d)
        assert failure.check(TunnelServerError) and "status=502" in str(failure.value)
    [reason] = results(protocol.when_lost())
    assert isinstance(reason, TunnelServerError)


def test_client_cancelled_waiter_leaves_the_others():
    protocol, transport, clock = client_protocol()
    cancelled = protocol.when_ready()
    kept = protocol.when_ready()
    cancelled.cancel()
    assert results(cancelled)[0].check(CancelledError)
    protocol.dataReceived(SERVER_ACCEPTS)
    assert results(kept) == [protocol]
    protocol.connectionLost(Failure(ConnectionDone()))


# -- ControlProtocol -------------------------------------------------------------------------


def control(is_client: bool = True) -> tuple[ControlProtocol, StringTransport, Clock]:
    clock = Clock()
    transport = StringTransport()
    protocol = ControlProtocol(is_client, clock)
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_control_when_ready_and_when_lost_per_caller():
    protocol, transport, clock = control()
    first, second = protocol.when_ready(), protocol.when_ready()
    lost_first, lost_second = protocol.when_lost(), protocol.when_lost()
    assert first is not second and lost_first is not lost_second
    first.addCallback(lambda _: "consumed")
    lost_first.addCallback(lambda _: "consumed")
    protocol.dataReceived(HANDSHAKE_RESPONSE)
    assert results(second) == [protocol]
    assert results(protocol.when_ready()) == [protocol]
    protocol.connectionLost(Failure(ConnectionDone()))
    [reason] = results(lost_second)
    assert isinstance(reason, ConnectionDone)
    [reason] = results(protocol.when_lost())
    assert isinstance(reason, ConnectionDone)
    assert clock.getDelayedCalls() == []


def test_control_when_ready_fails_when_the_handshake_does():
    protocol, transport, clock = control(is_client=False)
    waiting = protocol.when_ready()
    lost = protocol.when_lost()
    clock.advance(protocol.timeout)  # no controlHandshake in time: aborted
    assert transport.disconnecting or transport.disconnected or not waiting.called
    protocol.connectionLost(Failure(ConnectionLost("aborted")))
    for d in (waiting, protocol.when_ready()):
        [failure] = results(d)
        assert failure.check(HandshakeError)
        assert "timeout getting session" in str(failure.value)
    [reason] = results(lost)  # when_lost never errbacks
    assert isinstance(reason, ConnectionLost)


def test_control_server_side_answers_then_is_ready():
    protocol, transport, clock = control(is_client=False)
    protocol.dataReceived(HANDSHAKE_REQUEST)
    assert transport.value() == HANDSHAKE_RESPONSE
    assert results(protocol.when_ready()) == [protocol]
    protocol.connectionLost(Failure(ConnectionDone()))


# -- the server registry ---------------------------------------------------------------------


def attach(server: TunnelServer, clock: Clock):
    transport = StringTransport()
    session = YamuxSession(False, clock=clock, quiet_until_peer_speaks=True)
    connection = server.attach_session("ident", session)
    session.makeConnection(transport)
    return connection, session


def handshake(session: YamuxSession) -> None:
    session.dataReceived(
        frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + data_frame(1, HANDSHAKE_REQUEST)
    )


def test_client_connection_when_ready_per_caller():
    clock = Clock()
    server = TunnelServer(clock=clock)
    server.add_host("app.test", "ident")
    connection, session = attach(server, clock)
    first, second = connection.when_ready(), connection.when_ready()
    assert first is not second
    first.addCallback(lambda _: "consumed")
    handshake(session)
    assert results(second) == [connection]
    assert results(connection.when_ready()) == [connection]
    session.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_client_connection_when_ready_fails_if_the_session_ends_first():
    clock = Clock()
    server = TunnelServer(clock=clock)
    server.add_host("app.test", "ident")
    connection, session = attach(server, clock)
    waiting = connection.when_ready()
    session.connectionLost(Failure(ConnectionLost("gone")))
    for d in (waiting, connection.when_ready()):
        assert results(d)[0].check(NoClientSession)
    assert clock.getDelayedCalls() == []


def test_when_connected_per_caller_and_at_once_when_connected():
    clock = Clock()
    server = TunnelServer(clock=clock)
    server.add_host("app.test", "ident")
    first, second = server.when_connected("ident"), server.when_connected("ident")
    assert first is not second
    first.addCallback(lambda _: "consumed")
    connection, session = attach(server, clock)
    handshake(session)
    assert results(second) == [None]
    assert results(server.when_connected("ident")) == [None]
    session.connectionLost(Failure(ConnectionDone()))
    # after a disconnect it waits for the next connect
    again = server.when_connected("ident")
    assert not again.called
    connection, session = attach(server, clock)
    handshake(session)
    assert results(again) == [None]
    session.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_cancelled_when_connected_is_forgotten():
    """Regression: each when_connected() stayed in the on_connect table until
    the identifier connected, cancelled or not: polling with a timeout for a
    client that never came grew it without bound."""
    server = TunnelServer(clock=Clock())
    waiter = server.when_connected("never")
    waiter.cancel()
    assert results(waiter)[0].check(CancelledError)
    gone = weakref.ref(waiter)
    del waiter
    gc.collect()
    assert gone() is None
