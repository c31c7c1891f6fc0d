"""
Back-off: when something that failed may be tried again, so that a failure never spins.

The host daemon retries two kinds of things: connecting to a guest (its socket refused, or the
connection ended at once) and running ``virsh event`` (libvirtd down). Each failure of one key
(a guest's name, the event watcher) doubles the wait before its next try, from a first delay
up to :data:`MAX_BACKOFF`; something that then ran long enough starts again from the first
delay (:meth:`Backoff.reset`). The clock is a parameter, so tests step through time.
"""

import threading
import time
from typing import Callable, Dict, Iterable

__all__ = ('Backoff', 'MAX_BACKOFF')

MAX_BACKOFF = 30.0
"""The longest wait between two tries, in seconds."""


class Backoff(object):
    """
    Retry delays and retry times per key.

    :param maximum: the longest delay (seconds).
    :param clock: the time in seconds (:func:`time.monotonic`).
    """

    def __init__(self, maximum: float = MAX_BACKOFF, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.clock = clock
        self._next_delay: Dict[str, float] = {}
        self._retry_at: Dict[str, float] = {}
        self._lock = threading.Lock()

    def failed(self, key: str, first: float) -> float:
        """
        Note a failure of ``key``; return the seconds until it may be tried again: ``first``
        after a first failure (or a :meth:`reset`), then twice the last delay, at most
        :attr:`maximum`.
        """
        with self._lock:
            delay = self._next_delay.get(key, first)
            self._next_delay[key] = min(delay * 2, self.maximum)
            self._retry_at[key] = self.clock() + delay
        return delay

    def reset(self, key: str) -> None:
        """``key`` worked for long enough: its next failure waits the first delay again."""
        with self._lock:
            self._next_delay.pop(key, None)

    def remaining(self, key: str) -> float:
        """Seconds until ``key`` may be tried again (0: now)."""
        return max(0.0, self.retry_at(key) - self.clock())

    def retry_at(self, key: str) -> float:
        """When ``key`` may be tried again, on :attr:`clock` (0: at once)."""
        with self._lock:
            return self._retry_at.get(key, 0.0)

    def forget_all_but(self, keys: Iterable[str]) -> None:
        """Forget the failures of every key not in ``keys`` (guests that are gone)."""
        keep = set(keys)
        with self._lock:
            for table in (self._next_delay, self._retry_at):
                for key in [k for k in table if k not in keep]:
                    del table[key]
