"""Take a connection away from twisted.web's HTTPChannel, losing no bytes.

Used for the CONNECT control path (and WebSocket upgrades).  This touches
HTTPChannel internals, so it lives alone here and ``tests/test_takeover.py``
pins it against the installed Twisted:

* ``render`` runs inside ``LineReceiver.dataReceived``; when it returns, the
  rest of that read goes to ``rawDataReceived``, so that is redirected too;
* bytes read while a request was being handled (or after a request body)
  wait in ``_dataBuffer``;
* HTTPChannel registered itself as the transport's producer and may have
  paused reading; it keeps the transport as ``_networkProducer`` and would
  unregister the new protocol's producer from it (``loseConnection``);
* later reads and the connection's end reach ``dataReceived`` and
  ``connectionLost`` looked up on the channel (by the transport or by
  ``Site``'s wrapper), so instance attributes redirect them;
* a TCP transport keeps its protocol as ``protocol`` and checks it for
  ``IHalfCloseableProtocol`` on a FIN: the new protocol takes that place.
"""

from __future__ import annotations

from twisted.internet.interfaces import IProtocol


class CannotTakeOver(Exception):
    """The request's connection cannot be taken over (e.g. HTTP/2)."""


class _Detached:
    """HTTPChannel's network producer once the transport is no longer its."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def registerProducer(self, producer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def take_over(request, protocol: IProtocol, greeting: bytes = b"") -> None:
    """Give ``request``'s connection to ``protocol``, after writing ``greeting``.

    The request is left unfinished; twisted.web can no longer write to or
    close the connection.  Bytes the client already sent after the request head reach
    ``protocol.dataReceived`` right after ``makeConnection``.
    """
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if channel is None or transport is None or not hasattr(channel, "_dataBuffer"):
        raise CannotTakeOver("this request's connection cannot be taken over")
    channel.setTimeout(None)
    handed_over = getattr(channel, "handed_over", None)
    if handed_over is not None:
        handed_over()  # a channel's own timers (TunnelSite's): they must not outlive it
    transport.unregisterProducer()
    channel._networkProducer = _Detached()
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    channel.rawDataReceived = protocol.dataReceived
    channel.dataReceived = protocol.dataReceived
    channel.connectionLost = protocol.connectionLost
    channel.transport = None
    if IProtocol.providedBy(getattr(transport, "protocol", None)):
        # a TCP transport tells its own protocol of a FIN only if that protocol
        # is IHalfCloseableProtocol; Site's wrapper is not, so the new protocol
        # becomes the transport's (a public half-close then reaches a splice)
        transport.protocol = protocol
    if greeting:
        transport.write(greeting)
    protocol.makeConnection(transport)
    resume = getattr(transport, "resumeProducing", None)
    if resume is not None:
        resume()
    if buffered:
        protocol.dataReceived(buffered)
