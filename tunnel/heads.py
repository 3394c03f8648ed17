"""Reading HTTP-style heads that arrive in pieces, bounded and in linear time.

A head arrives in any number of pieces; rebuilding it and searching it from
its start on every piece costs the square of its length (a 64 KiB head fed
byte by byte is about two billion byte comparisons).  ``HeadScanner`` keeps
what it has seen, resumes each search where the last one stopped (three
bytes back, so a blank line split across pieces is still found) and never
looks at more than its bound, so a head costs time in proportion to its
length however it is split.
"""

from __future__ import annotations


class HeadTooLarge(ValueError):
    """More than the bound arrived without a complete head, or a line was too long."""


class HeadScanner:
    """Collects heads ended by a blank line, under one shared bound.

    :param limit: the scanner fails once more than ``limit`` bytes arrived
        without completing a head (interim heads read before count too).
    :param bare_lf: accept ``\\n\\n`` as well as ``\\r\\n\\r\\n`` (whichever ends first).
    :param max_line: fail on a line with more than this many bytes before its ``\\n``.

    ``examined`` counts the bytes its searches looked at, so that tests can
    check the work done is linear in the input.
    """

    def __init__(self, limit: int, *, bare_lf: bool = False, max_line: int | None = None) -> None:
        self._limit = limit
        self._ends = (b"\r\n\r\n", b"\n\n") if bare_lf else (b"\r\n\r\n",)
        self._max_line = max_line
        self._held = bytearray()  # the current head so far
        self._line = 0  # bytes of its last, unfinished line
        self._count = 0  # bytes of every head so far, for the shared bound
        self.examined = 0

    def feed(self, data: bytes, start: int = 0) -> tuple[bytes, int] | None:
        """Reads ``data[start:]``; returns ``(head, end)`` once a head is complete.

        ``head`` includes its blank line and ``data[end:]`` is what follows it
        (the next head, for an interim response, or the body).  Until then
        the bytes are kept and None is returned.  Raises HeadTooLarge.
        """
        if start >= len(data):
            return None
        room = self._limit + 1 - self._count  # the head may end on the byte after the bound
        stop = min(len(data), start + room)
        end = self._find_end(data, start, stop)
        upto = stop if end < 0 else end
        if self._max_line is not None:
            self._check_lines(data, start, upto)
        self._count += upto - start
        if end < 0:
            self._held += data[start:stop]
            if self._count > self._limit:
                raise HeadTooLarge(f"more than {self._limit} bytes without the end of the head")
            return None
        head = bytes(self._held) + data[start:end]
        self._held = bytearray()
        self._line = 0
        return head, end

    def _find_end(self, data: bytes, start: int, stop: int) -> int:
        """Where the first blank line in ``data[start:stop]`` ends, or -1."""
        kept = len(self._held)
        best = -1
        if kept:
            # a blank line that began in the bytes kept from the last piece
            probe = bytes(self._held[-3:]) + data[start : min(start + 3, stop)]
            self.examined += len(probe)
            seen = min(kept, 3)
            for blank in self._ends:
                at = probe.find(blank, max(0, seen - len(blank) + 1))
                if at >= 0 and (best < 0 or start + at + len(blank) - seen < best):
                    best = start + at + len(blank) - seen
            if best >= 0:
                return best
        for blank in self._ends:
            # only a blank line that ends before the one found already matters
            limit = stop if best < 0 else best - 1
            at = data.find(blank, start, limit)
            self.examined += (at + len(blank) if at >= 0 else limit) - start
            if at >= 0:
                best = at + len(blank)
        return best

    def _check_lines(self, data: bytes, start: int, stop: int) -> None:
        """Fails if a line (its bytes before ``\\n``) in ``data[start:stop]`` is too long."""
        if self._line + (stop - start) <= self._max_line:
            last = data.rfind(b"\n", start, stop)
            self._line = stop - last - 1 if last >= 0 else self._line + (stop - start)
            self.examined += stop - start
            return
        lines = data[start:stop].split(b"\n")
        self.examined += stop - start
        lines[0] = self._line + len(lines[0])
        self._line = len(lines[-1]) if len(lines) > 1 else lines[0]
        if max(lines[0], max(map(len, lines[1:]), default=0)) > self._max_line:
            raise HeadTooLarge(f"a header line longer than {self._max_line} bytes")
