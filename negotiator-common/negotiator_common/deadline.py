"""
A point in time by which something must be done: one type for every bounded wait.

Every wait of negotiator is bounded by a caller's timeout in seconds, where None means no
bound, and a wait made of several steps (find a guest, connect, shake hands, call) must share
one timeout between them. :class:`Deadline` turns the timeout into a point on
:func:`time.monotonic` once, at the start, and each step asks how much of it is left, so that
no step can add its own full timeout to the time already spent.
"""

import time
from typing import Optional

__all__ = ('Deadline', 'NO_DEADLINE')


class Deadline(object):
    """
    ``timeout`` seconds from now (None: no limit, and every question below says so).

    Immutable: a step that must end sooner gets a new one from :meth:`capped`.
    """

    __slots__ = ('timeout', 'at')

    def __init__(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self.at: Optional[float] = None if timeout is None else time.monotonic() + timeout
        """The :func:`time.monotonic` value at which the deadline passes (None: never)."""

    def remaining(self) -> Optional[float]:
        """Seconds left, never below 0 (None: no limit): what to give a wait as its timeout."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.at is not None and time.monotonic() >= self.at

    def expires_within(self, seconds: float) -> bool:
        """True if the deadline passes in the next ``seconds``: a retry that waits that long would miss it."""
        return self.at is not None and time.monotonic() + seconds > self.at

    def capped(self, seconds: float) -> 'Deadline':
        """A deadline ``seconds`` from now, or this one if it comes first: one step of a longer wait."""
        step = Deadline(seconds)
        if self.at is not None and step.at is not None and self.at < step.at:
            return self
        return step

    def __repr__(self) -> str:
        left = self.remaining()
        return 'Deadline(no limit)' if left is None else 'Deadline(%.3f seconds left)' % left


NO_DEADLINE = Deadline(None)
"""The deadline that never passes: the default of a wait that the caller did not bound."""
