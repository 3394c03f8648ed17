"""TunnelClientService's life, on a Clock with dials the test answers by hand.

The reconnect loop is Twisted's ClientService; these tests pin what our thin
layer adds or corrects (spec.md 2.12): ready only after the CONNECT and
control handshake, failed handshakes counted as failed attempts (without
ClientService's NoTransition on their loss), the policy's delays and its
give-up, and stopping in every phase: dialling, in the handshake, waiting to
retry, connected (a drain) and after giving up.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer

from tunnel.client import TunnelClientService, TunnelServerError, exponential_backoff
from tunnel.koding.states import ClientState
from tunnel.koding.wire import CONNECTED_REPLY, ControlMessage
from tunnel.yamux import YamuxConfig
from tunnel.yamux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    TYPE_GO_AWAY,
    TYPE_WINDOW_UPDATE,
)

from .helpers import data_frame, frame, split_frames
from .test_client_waiters import SERVER_ACCEPTS

S = ClientState
#: no pings: the tests move the clock by whole retry delays
QUIET = YamuxConfig(enable_keepalive=False)
REFUSED_CONNECT = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nnope"


class Dial:
    """One connect() of the service; the test decides how it goes."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred = Deferred(self._cancel)
        self.protocol = None
        self.transport: StringTransport | None = None

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True

    def refuse(self) -> None:
        self.deferred.errback(ConnectionRefusedError())

    def connect(self) -> Dial:
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)
        return self

    def receive(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Exception | None = None) -> None:
        """The transport reports the connection gone (as a reactor would)."""
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    def frames(self):
        """The yamux frames the client sent since the last call (the CONNECT
        request is skipped)."""
        data = self.transport.value()
        self.transport.clear()
        if data.startswith(b"CONNECT "):
            data = data[data.index(b"\r\n\r\n") + 4 :]
        return split_frames(data)

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting


@implementer(IStreamClientEndpoint)
class Dialler:
    def __init__(self) -> None:
        self.dials: list[Dial] = []

    def connect(self, factory) -> Deferred:
        self.dials.append(Dial(factory))
        return self.dials[-1].deferred

    @property
    def last(self) -> Dial:
        return self.dials[-1]


class Recording:
    """A retry policy that records what it was asked."""

    def __init__(self, delays: dict[int, float | None] | None = None, default=1.0) -> None:
        self.delays = delays or {}
        self.default = default
        self.asked: list[int] = []

    def __call__(self, attempt: int) -> float | None:
        self.asked.append(attempt)
        return self.delays.get(attempt, self.default)


class Client:
    """A service, its clock and dialler, and what it reported."""

    def __init__(self, retry=None, **kwargs) -> None:
        self.clock = Clock()
        self.dialler = Dialler()
        self.tunnels: list = []
        self.retry = retry if retry is not None else Recording()
        self.service = TunnelClientService(
            self.dialler,
            "ident",
            self._forward,
            clock=self.clock,
            retry=self.retry,
            yamux_config=QUIET,
            **kwargs,
        )
        self.changes = []
        self.service.observe_states(self.changes.append)

    def _forward(self, stream, message) -> None:
        stream.attach(Protocol())
        self.tunnels.append((stream, message))

    def states(self) -> list[ClientState]:
        return [c.current for c in self.changes]

    def connect(self) -> Dial:
        """Answer the current dial: connected, tunnel accepted, handshake done."""
        dial = self.dialler.last.connect()
        dial.receive(SERVER_ACCEPTS)
        assert self.service.state == S.CONNECTED
        dial.frames()
        return dial

    def assert_quiet(self) -> None:
        """Nothing left scheduled (retry, handshake or drain timers)."""
        assert self.clock.getDelayedCalls() == []


def results(d: Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


# -- becoming ready ---------------------------------------------------------------------------


def test_ready_only_after_the_connect_and_the_control_handshake():
    client = Client()
    first = client.service.when_ready()
    client.service.startService()
    assert client.states() == [S.STARTED, S.CONNECTING]
    dial = client.dialler.last.connect()
    assert not first.called  # TCP is up, the tunnel is not
    dial.receive(CONNECTED_REPLY)
    assert not first.called and client.service.state == S.CONNECTING
    dial.receive(SERVER_ACCEPTS[len(CONNECTED_REPLY) :])
    assert results(first) == [client.service.protocol]
    assert client.service.protocol.session is not None
    assert client.states() == [S.STARTED, S.CONNECTING, S.CONNECTED]
    assert client.service.last_error is None
    dial.lose()
    client.service.stopService()
    client.assert_quiet()


def test_when_ready_gives_every_caller_the_protocol():
    client = Client()
    client.service.startService()
    first, second = client.service.when_ready(), client.service.when_ready()
    assert first is not second
    first.addCallback(lambda _: "consumed")
    client.connect()
    protocol = client.service.protocol
    assert results(second) == [protocol]
    assert results(client.service.when_ready()) == [protocol]  # connected: at once
    client.service.stopService()
    client.dialler.last.lose()
    client.assert_quiet()


# -- failed attempts and the retry policy --------------------------------------------------------


@pytest.mark.parametrize("how", ["refused dial", "refused CONNECT", "lost in the handshake"])
def test_a_failed_attempt_is_retried_after_the_policy_delay(how):
    """A handshake that fails is a failed attempt: the next delay is for
    attempt 2, not 1 again (ClientService resets its count on a connection it
    accepted), and the connection's loss reaches no ClientService transition
    (without our layer: NoTransition raised out of connectionLost)."""
    retry = Recording({1: 0.5, 2: 0.75})
    client = Client(retry)
    client.service.startService()
    for attempt in (1, 2):
        dial = client.dialler.last
        if how == "refused dial":
            dial.refuse()
            expected = ConnectionRefusedError
        else:
            dial.connect()
            if how == "refused CONNECT":
                dial.receive(REFUSED_CONNECT)
                assert dial.closing
                expected = TunnelServerError
            else:
                expected = ConnectionLost
            dial.lose(ConnectionLost("cut"))
        assert retry.asked == list(range(1, attempt + 1))
        assert isinstance(client.service.last_error, expected)
        delay = retry.delays[attempt]
        client.clock.advance(delay / 2)
        assert len(client.dialler.dials) == attempt  # still waiting
        client.clock.advance(delay / 2)
        assert len(client.dialler.dials) == attempt + 1
    assert client.states() == [S.STARTED, S.CONNECTING, S.CONNECTING, S.CONNECTING]
    # the retries say why the previous attempt failed
    assert [type(c.error) for c in client.changes[2:]] == [expected, expected]
    if how == "refused CONNECT":
        assert "status=502" in str(client.service.last_error)
    client.service.stopService()
    client.assert_quiet()


def test_the_attempt_count_restarts_after_a_connection_that_lived():
    """A link up for ``min_uptime`` (10 s by default) restarts the count."""
    policy = exponential_backoff(initial=0.5, maximum=4.0, rng=random.Random(7).random)
    asked: list[tuple[int, float]] = []

    def recording(attempt: int) -> float | None:
        asked.append((attempt, policy(attempt)))
        return asked[-1][1]

    client = Client(recording)
    client.service.startService()
    for _ in range(3):
        client.dialler.last.refuse()
        client.clock.advance(asked[-1][1])
    dial = client.connect()
    client.clock.advance(10.0)
    dial.lose(ConnectionLost("the link died"))
    assert client.service.state == S.DISCONNECTED
    assert isinstance(client.service.last_error, ConnectionLost)
    assert [a for a, _ in asked] == [1, 2, 3, 1]
    delays = [d for _, d in asked]
    assert len(set(delays)) == 4  # jittered
    client.clock.advance(delays[-1])
    assert len(client.dialler.dials) == 5
    assert client.states()[-3:] == [S.CONNECTED, S.DISCONNECTED, S.CONNECTING]
    client.service.stopService()
    client.assert_quiet()


def test_the_policy_gives_up():
    retry = Recording({3: None}, default=0.5)
    client = Client(retry)
    early = client.service.when_ready()
    client.service.startService()
    for _ in range(3):
        client.dialler.last.connect().receive(REFUSED_CONNECT)
        client.dialler.last.lose()
        client.clock.advance(0.5)
    assert retry.asked == [1, 2, 3]
    assert len(client.dialler.dials) == 3
    assert client.states() == [S.STARTED, S.CONNECTING, S.CONNECTING, S.CONNECTING, S.CLOSED]
    assert isinstance(client.changes[-1].error, TunnelServerError)
    client.assert_quiet()
    for d in (early, client.service.when_ready()):
        [failure] = results(d)
        assert failure.value is client.service.last_error
    assert client.service.running  # nobody stopped it: it stopped trying
    stopped = results(client.service.stopService())
    assert stopped == [None] and client.states()[-1] == S.CLOSED
    assert client.states().count(S.CLOSED) == 1
    # and it can be started again
    client.service.startService()
    assert client.states()[-2:] == [S.STARTED, S.CONNECTING]
    client.connect()
    client.service.stopService()
    client.dialler.last.lose()
    client.assert_quiet()


def test_links_that_die_young_count_as_failures():
    """A server that accepts the tunnel and drops it at once is backed off
    from: each link lost within ``min_uptime`` is one more failure in a row
    (after the failures before it), until a link lives long enough."""
    retry = Recording(default=2.0)
    client = Client(retry, min_uptime=5.0)
    client.service.startService()
    client.dialler.last.refuse()  # 1
    client.clock.advance(2.0)
    for _ in range(4):  # 2, 3, 4, 5: up 4.9 s each, short of min_uptime
        dial = client.connect()
        client.clock.advance(4.9)
        dial.lose(ConnectionLost("the node drops it"))
        client.clock.advance(2.0)
    client.dialler.last.refuse()  # 6: a failed dial goes on counting
    client.clock.advance(2.0)
    dial = client.connect()
    client.clock.advance(5.0)  # this one lived: the count restarts
    dial.lose(ConnectionLost("the node died"))
    client.clock.advance(2.0)
    dial = client.connect()
    dial.lose(ConnectionLost("at once"))  # right after a long link: 2
    assert retry.asked == [1, 2, 3, 4, 5, 6, 1, 2]
    client.service.stopService()
    client.assert_quiet()


def test_a_flapping_server_gets_growing_delays_and_bounded_logs():
    """The review's case: accept, then drop at once, forever.  With the
    default policy (no jitter here) the delays grow to its 60 s cap, so ten
    minutes bring a couple of dozen attempts and four log lines each, not
    two attempts a second."""
    policy = exponential_backoff(rng=lambda: 0.5)
    delays: list[float] = []

    def recording(attempt: int) -> float | None:
        delays.append(policy(attempt))
        return delays[-1]

    client = Client(recording)
    with capturedLogs() as events:
        client.service.startService()
        while client.clock.seconds() < 600:
            dial = client.connect()
            dial.lose(ConnectionLost("the node drops it"))
            client.clock.advance(delays[-1])
        client.service.stopService()
    assert all(a < b for a, b in zip(delays[:11], delays[1:12], strict=True))
    assert delays[:3] == [0.5, 0.75, 1.125]
    assert delays[-1] == 60.0
    assert len(client.dialler.dials) < 25
    assert len(events) < 5 * 25


def test_a_dial_that_never_answers_is_cancelled_after_the_handshake_timeout():
    """A vanished machine answers no SYN: the dial is given up after
    ``handshake_timeout`` (not the endpoint's 30 s) and the next one follows."""
    client = Client(handshake_timeout=3.0)
    client.service.startService()
    client.clock.advance(2.99)
    assert not client.dialler.last.cancelled
    client.clock.advance(0.01)
    assert client.dialler.last.cancelled
    error = client.service.last_error
    assert isinstance(error, TimeoutError) and "no connection after 3 seconds" in str(error)
    client.clock.advance(1.0)  # Recording's delay
    assert len(client.dialler.dials) == 2
    assert client.changes[-1].current == S.CONNECTING and client.changes[-1].error is error
    dial = client.connect()  # a dial that connects in time keeps no timer
    client.clock.advance(60.0)
    assert client.service.state == S.CONNECTED
    client.service.stopService()
    dial.lose()
    client.assert_quiet()


# -- stopping ------------------------------------------------------------------------------------


def test_stop_while_dialling_cancels_the_dial():
    client = Client()
    waiting = client.service.when_ready()
    client.service.startService()
    stopped = results(client.service.stopService())
    assert client.dialler.last.cancelled
    assert stopped == [None] and client.service.state == S.CLOSED
    assert results(waiting)[0].check(CancelledError)
    assert client.service.last_error is None  # a stop is not an error
    client.assert_quiet()


def test_stop_in_the_handshake_aborts_the_connection_and_waits_for_it():
    client = Client()
    client.service.startService()
    dial = client.dialler.last.connect()
    dial.receive(CONNECTED_REPLY)  # the CONNECT is accepted, the control handshake is not done
    stopping = results(client.service.stopService())
    assert dial.transport.disconnected  # aborted
    assert stopping == []  # until the connection is really gone
    dial.lose(ConnectionLost("aborted"))
    assert stopping == [None]
    assert client.states() == [S.STARTED, S.CONNECTING, S.CLOSED]
    assert client.retry.asked == []  # not a failed attempt: nothing is retried
    client.assert_quiet()


def test_stop_while_waiting_to_retry():
    client = Client(Recording(default=30.0))
    waiting = client.service.when_ready()
    client.service.startService()
    client.dialler.last.refuse()
    assert client.clock.getDelayedCalls()  # the retry
    assert results(client.service.stopService()) == [None]
    assert client.service.state == S.CLOSED
    assert results(waiting)[0].check(CancelledError)
    client.assert_quiet()
    assert len(client.dialler.dials) == 1 and client.retry.asked == [1]


def open_tunnel(client: Client, dial: Dial, port: int) -> list:
    """The server asks for a tunnel; returns the frames the client answered with."""
    dial.receive(data_frame(1, ControlMessage(1, 1, port).encode()))
    return dial.frames()


def test_stop_drains_open_tunnels_and_refuses_new_ones():
    client = Client(stop_timeout=5.0)
    client.service.startService()
    dial = client.connect()
    assert [(h.type, h.flags, h.stream_id) for h, _ in open_tunnel(client, dial, 80)] == [
        (TYPE_WINDOW_UPDATE, FLAG_SYN, 3)
    ]
    [(stream, message)] = client.tunnels
    dial.receive(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 3, 0))

    stopping = results(client.service.stopService())
    assert [(h.type, h.length) for h, _ in dial.frames()] == [(TYPE_GO_AWAY, 0)]
    # a tunnel asked for now is refused at once (opened and reset), not forwarded
    answer = [(h.type, h.flags, h.stream_id) for h, _ in open_tunnel(client, dial, 80)]
    assert answer == [(TYPE_WINDOW_UPDATE, FLAG_SYN, 5), (TYPE_WINDOW_UPDATE, FLAG_RST, 5)]
    assert len(client.tunnels) == 1
    assert client.service.state == S.CONNECTED and not dial.closing

    # the open tunnel finishes: then the connection closes
    stream.write(b"the answer")
    stream.loseConnection()
    dial.receive(data_frame(3, b"", FLAG_FIN))
    assert dial.closing and stopping == []
    dial.lose()
    assert stopping == [None]
    assert client.states() == [S.STARTED, S.CONNECTING, S.CONNECTED, S.CLOSED]
    assert client.service.last_error is None
    client.assert_quiet()


def test_stop_closes_a_drain_that_does_not_finish_in_time():
    client = Client(stop_timeout=5.0)
    client.service.startService()
    dial = client.connect()
    open_tunnel(client, dial, 80)
    stopping = results(client.service.stopService())
    client.clock.advance(4.9)
    assert not dial.closing
    client.clock.advance(0.1)
    assert dial.closing  # GoAway and close: the stream ends with the session
    dial.lose()
    assert stopping == [None] and client.service.state == S.CLOSED
    client.assert_quiet()


def test_a_drain_ends_early_if_the_server_goes_first():
    client = Client(stop_timeout=5.0)
    client.service.startService()
    dial = client.connect()
    open_tunnel(client, dial, 80)
    stopping = results(client.service.stopService())
    dial.lose(ConnectionLost("the server went away"))
    assert stopping == [None]
    assert client.states()[-2:] == [S.CONNECTED, S.CLOSED]  # no DISCONNECTED, no retry
    assert client.retry.asked == []
    client.assert_quiet()


def test_start_during_a_stop_waits_for_it():
    client = Client()
    client.service.startService()
    dial = client.connect()
    open_tunnel(client, dial, 80)
    stopping = results(client.service.stopService())
    assert results(client.service.stopService()) == []  # a second stop waits for the same
    client.service.startService()
    assert len(client.dialler.dials) == 1  # not while the old connection drains
    dial.lose()
    assert stopping == [None]
    assert len(client.dialler.dials) == 2
    assert client.states()[-3:] == [S.CLOSED, S.STARTED, S.CONNECTING]
    client.connect()
    client.service.stopService()
    client.dialler.last.lose()
    client.assert_quiet()


def test_stop_before_start_does_nothing():
    client = Client()
    assert results(client.service.stopService()) == [None]
    assert client.states() == []
    client.assert_quiet()


@pytest.mark.parametrize("state", [S.STARTED, S.CONNECTING, S.CONNECTED])
def test_a_state_observer_may_stop_the_service(state):
    """Observers run synchronously, Connecting ones inside ClientService's dial,
    where it cannot be stopped (automat refuses the re-entrant stop()): that
    stop is taken on the next turn."""
    client = Client()
    stops: list = []

    def stop_on(change) -> None:
        if change.current == state and not stops:
            stops.append(results(client.service.stopService()))

    client.service.observe_states(stop_on)
    client.service.startService()
    if state == S.CONNECTED:
        dial = client.dialler.last.connect()
        dial.receive(SERVER_ACCEPTS)
        assert dial.closing  # the drain found no tunnel open: closed at once
        dial.lose()
    client.clock.advance(0)
    assert stops == [[None]]
    assert client.service.state == S.CLOSED and not client.service.running
    if state == S.CONNECTING:
        assert client.dialler.last.cancelled
    assert len(client.dialler.dials) == (0 if state == S.STARTED else 1)
    client.assert_quiet()
