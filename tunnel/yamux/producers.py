"""Driving a pull producer (IPullProducer) as a push producer.

A consumer asks a pull producer for data by calling ``resumeProducing``
once per chunk it wants.  A stream only pauses and resumes push producers,
so, like ``twisted.web._http2.H2Stream`` (with Twisted's private
``_PullToPush``), it wraps a pull producer in ``PullToPush``: one
``resumeProducing`` per turn of the session's clock while not paused.  A
clock turn rather than a loop lets the reactor write between chunks, never
recurses (``write`` may call back into us), and runs on an injected Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..timers import cancel


@implementer(IPushProducer)
class PullToPush:
    """A pull ``producer`` registered with ``consumer``, seen as a push producer."""

    log = Logger()

    def __init__(self, producer: Any, consumer: IConsumer, clock: IReactorTime) -> None:
        self.producer = producer
        self._consumer = consumer
        self._clock = clock
        self._paused = False
        self._stopped = False
        self._call: Any = None

    def start(self) -> None:
        """Begin pulling (the consumer calls this once it is registered)."""
        self._schedule()

    def stop(self) -> None:
        """The consumer unregistered the producer: ask it for nothing more."""
        self._stopped = True
        cancel(self._call)
        self._call = None

    def pauseProducing(self) -> None:
        self._paused = True
        cancel(self._call)
        self._call = None

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stop()
        self.producer.stopProducing()

    def _schedule(self) -> None:
        if self._call is None and not self._paused and not self._stopped:
            self._call = self._clock.callLater(0, self._pull)

    def _pull(self) -> None:
        self._call = None
        try:
            self.producer.resumeProducing()
        except Exception:
            self.log.failure("pull producer {p!r} failed", p=self.producer)
            self._consumer.unregisterProducer()  # as _PullToPush does
            return
        self._schedule()
