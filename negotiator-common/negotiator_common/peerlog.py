"""
Logging what a peer sent without letting the peer write the log.

A hostile or broken peer controls ids, method names, error messages and whole lines; logged
as they come, one reply with a 4 MiB id made a 4 MiB log line, and a stream of one-byte garbage
lines made thousands of warnings a second (``docs/faults.rst``, the log flood row). Two tools
keep the log bounded, in lines and in bytes, whatever the peer does (``docs/security.rst``,
"Logs"):

- :func:`cut` shows a peer's value as a short ``repr`` (newlines escaped, so a value can never
  forge a log line) with a note of its full length (:class:`Cut` does it only if the line is
  logged at all);
- :class:`Complaints` lets through a few lines of one kind of complaint per interval and
  counts the rest, then says how many it suppressed.
"""

import reprlib
import threading
import time
from typing import Any, Callable, Dict, Hashable, Tuple

__all__ = ('cut', 'Cut', 'Complaints', 'CUT_LENGTH', 'COMPLAINTS_PER_INTERVAL', 'COMPLAINT_INTERVAL')

CUT_LENGTH = 120
"""Characters of a peer's value that a log line shows."""

COMPLAINTS_PER_INTERVAL = 5
"""Lines of one kind of complaint about one peer that are logged per interval; the rest are counted."""

COMPLAINT_INTERVAL = 10.0
"""Seconds of one rate-limiting interval."""

_Window = Tuple[float, int, int, str]
"""One kind of complaint: when its interval began, lines logged, lines suppressed, the level."""


def _short_repr(limit: int) -> reprlib.Repr:
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlong = 40
    shortener.maxlevel = 3
    return shortener


_SHORTENER = _short_repr(CUT_LENGTH)


def cut(value: Any, limit: int = CUT_LENGTH) -> str:
    """
    ``repr(value)`` in at most about ``limit`` characters, for a log line.

    Strings and bytes are cut before they are rendered (a 4 MiB id costs no 4 MiB ``repr``) and
    keep a note of their full length; containers are rendered a few items and levels deep.
    """
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        unit = 'characters' if isinstance(value, str) else 'bytes'
        return '%s... (%d %s)' % (repr(value[:limit]), len(value), unit)
    text = (_SHORTENER if limit == CUT_LENGTH else _short_repr(limit)).repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + '... (cut)'


class Cut(object):
    """:func:`cut` deferred to the moment a log record is formatted: free when the level is off."""

    __slots__ = ('value',)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return cut(self.value)


class Complaints(object):
    """
    Rate-limited log lines about one peer: at most ``per_interval`` lines of each kind in each
    ``interval`` seconds; the next line of that kind after the interval (or :meth:`flush`) first
    says how many were suppressed.

    :param log: the logger (a :class:`~negotiator_common.lazylog.LazyLogger` or a real one).
    :param peer: names the peer in the summary lines.
    """

    def __init__(self, log: Any, peer: str, per_interval: int = COMPLAINTS_PER_INTERVAL,
                 interval: float = COMPLAINT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.peer = peer
        self.per_interval = per_interval
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: Dict[Hashable, _Window] = {}

    def complain(self, level: str, kind: Hashable, message: str, *args: Any) -> None:
        """
        Log ``message % args`` at ``level`` (``'debug'``, ``'warning'``...) unless this kind of
        complaint has used up its lines for the current interval.
        """
        now = self._clock()
        with self._lock:
            started, logged, suppressed, _ = self._windows.get(kind, (now, 0, 0, level))
            if now - started >= self.interval:
                self._summarise(kind, suppressed, now - started, level)
                started, logged, suppressed = now, 0, 0
            allowed = logged < self.per_interval
            if allowed:
                logged += 1
            else:
                suppressed += 1
            self._windows[kind] = (started, logged, suppressed, level)
        if allowed:
            getattr(self.log, level)(message, *args)

    def flush(self) -> None:
        """Say how many complaints of each kind were suppressed and not yet reported (the peer left)."""
        now = self._clock()
        with self._lock:
            windows, self._windows = self._windows, {}
        for kind, (started, _, suppressed, level) in windows.items():
            self._summarise(kind, suppressed, now - started, level)

    def _summarise(self, kind: Hashable, suppressed: int, seconds: float, level: str) -> None:
        if suppressed:
            getattr(self.log, level)("%d more complaints (%s) about %s suppressed in %.0f seconds",
                                     suppressed, kind, self.peer, seconds)
