"""Twisted endpoints over a yamux session, so higher layers use plain protocols.

``StreamClientEndpoint.connect(factory)`` opens a stream and connects the
factory's protocol to it; ``StreamServerEndpoint.listen(factory)`` hands every
stream the peer opens to the factory.  Modelled on magic-wormhole's
SubchannelConnectorEndpoint / SubchannelListenerEndpoint.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from .session import YamuxSession
from .stream import YamuxStream


def connect_stream(stream: YamuxStream, factory: IProtocolFactory) -> bool:
    """Build ``factory``'s protocol for ``stream`` and attach it; RST if refused."""
    protocol = factory.buildProtocol(stream.getPeer())
    if protocol is None:
        stream.abortConnection()
        return False
    stream.attach(protocol)
    return True


def protocol_for(stream: YamuxStream, factory: IProtocolFactory):
    """``connect_stream`` as an endpoint's ``connect`` result: the protocol."""
    if not connect_stream(stream, factory):
        raise ConnectionRefusedError("the factory refused the stream")
    return stream.protocol


@implementer(IStreamClientEndpoint)
class StreamClientEndpoint:
    """Each ``connect`` opens a new stream on ``session``.

    The Deferred fires as soon as the SYN is sent (data may follow before the
    peer's ACK, as in yamux), or once ``max_pending_opens`` allows it; a
    refusal by the peer reaches the protocol as ``StreamReset`` in
    ``connectionLost``.
    """

    def __init__(self, session: YamuxSession) -> None:
        self._session = session

    def connect(self, factory: IProtocolFactory) -> Deferred:
        return self._session.request_stream().addCallback(protocol_for, factory)


@implementer(IListeningPort)
class StreamListeningPort:
    """Accepts the peer's streams into a factory until ``stopListening``."""

    log = Logger()

    def __init__(self, session: YamuxSession, factory: IProtocolFactory) -> None:
        self._session = session
        self.factory = factory
        self.listening = False

    def startListening(self) -> None:
        if not self.listening:
            self.listening = True
            self.factory.doStart()
            self._session.set_stream_handler(self._accept)

    def stopListening(self) -> Deferred:
        if self.listening:
            self.listening = False
            self._session.set_stream_handler(None)
            self.factory.doStop()
        return succeed(None)

    def getHost(self):
        return self._session.host_address

    def _accept(self, stream: YamuxStream) -> None:
        try:
            connect_stream(stream, self.factory)
        except Exception:
            self.log.failure("building a protocol for stream {sid} failed", sid=stream.id)
            stream.abortConnection()


@implementer(IStreamServerEndpoint)
class StreamServerEndpoint:
    """Listen for streams opened by the peer of ``session``.

    Streams that arrived before ``listen`` wait in the session's backlog and
    are delivered first.
    """

    def __init__(self, session: YamuxSession) -> None:
        self._session = session

    def listen(self, factory: IProtocolFactory) -> Deferred:
        port = StreamListeningPort(self._session, factory)
        port.startListening()
        return succeed(port)
