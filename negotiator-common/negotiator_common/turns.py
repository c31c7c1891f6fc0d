"""
Turns at one costly thing, served to the waiter that used it least of late.

Why: an endpoint parses a line above 64 KiB only in its turn (one at a time per process, so
that sixteen guests' 4 MiB lines are not parsed at once; ``docs/faults.rst``). With a plain lock
the turns go to whoever the scheduler wakes: under eight guests that sent costly 4 MiB lines
without pause, another guest's 1 MiB request waited 275 ms in the median and 670 ms at most.
:class:`Turns` gives the next turn to the waiting user with the least recent use (seconds held,
decaying by half every :data:`HALF_LIFE` seconds), so a guest that parses little goes before
those that keep the parser busy, and waits at most for the turn in progress.
"""

import itertools
import threading
import time
from typing import Any, Dict

__all__ = ('Turns', 'Usage', 'HALF_LIFE')

HALF_LIFE = 1.0
"""Seconds after which a user's recent use of the turns counts half."""


class Usage(object):
    """How much one user (an endpoint) held the turns of late: decayed seconds."""

    __slots__ = ('seconds', 'updated')

    def __init__(self) -> None:
        self.seconds = 0.0
        self.updated = time.monotonic()

    def current(self, now: float) -> float:
        """The decayed use as of ``now``."""
        return self.seconds * 0.5 ** ((now - self.updated) / HALF_LIFE)

    def add(self, seconds: float, now: float) -> None:
        self.seconds = self.current(now) + seconds
        self.updated = now


class Turns(object):
    """One holder at a time; among the waiters, the least recent user first (then the first to come)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._busy = False
        self._waiting: Dict[int, Usage] = {}
        self._arrivals = itertools.count()

    def hold(self, usage: Usage) -> '_Turn':
        """A context manager: wait for a turn, hold it inside, and add the time held to ``usage``."""
        return _Turn(self, usage)

    def _acquire(self, usage: Usage) -> None:
        with self._condition:
            ticket = next(self._arrivals)
            self._waiting[ticket] = usage
            try:
                self._condition.wait_for(lambda: not self._busy and self._next() == ticket)
            except BaseException:
                del self._waiting[ticket]
                self._condition.notify_all()  # the turn this waiter may have been chosen for goes on
                raise
            del self._waiting[ticket]
            self._busy = True

    def _next(self) -> int:
        """The waiter to serve: least recent use now, then the earliest ticket."""
        now = time.monotonic()
        return min(self._waiting, key=lambda ticket: (self._waiting[ticket].current(now), ticket))

    def _release(self, usage: Usage, held: float) -> None:
        with self._condition:
            usage.add(held, time.monotonic())
            self._busy = False
            self._condition.notify_all()


class _Turn(object):
    __slots__ = ('turns', 'usage', 'started')

    def __init__(self, turns: Turns, usage: Usage) -> None:
        self.turns = turns
        self.usage = usage
        self.started = 0.0

    def __enter__(self) -> None:
        self.turns._acquire(self.usage)
        self.started = time.monotonic()

    def __exit__(self, *exc_info: Any) -> None:
        self.turns._release(self.usage, time.monotonic() - self.started)
