"""
The flag that tells a request's handler that its caller no longer wants the answer.

Why a type of its own: a handler that forwards its request further along (the host daemon's
proxy, :mod:`negotiator_host.proxy`, calls the guest for a local client) waits for a reply
there, not for its own flag, yet must learn at once that its caller sent ``cancel`` or hung
up, so as to cancel the call it made in turn. A :class:`Cancellation` is a
:class:`threading.Event` (the runner and the command slots read it as one) that also sets the
other events that :meth:`~Cancellation.watch` it, so one thread can wait for "a reply, or a
cancellation" without polling.
"""

import threading
from typing import List

__all__ = ('Cancellation',)


class Cancellation(threading.Event):
    """An event set when a request is cancelled; setting it also sets every watching event."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: List[threading.Event] = []
        self._watchers_lock = threading.Lock()

    def set(self) -> None:
        with self._watchers_lock:
            super().set()
            watchers = list(self._watchers)
        for event in watchers:
            event.set()

    def watch(self, event: threading.Event) -> None:
        """Set ``event`` when this is set (at once, if it is already)."""
        with self._watchers_lock:
            if not self.is_set():
                self._watchers.append(event)
                return
        event.set()

    def unwatch(self, event: threading.Event) -> None:
        """Stop setting ``event`` (the wait that watched is over)."""
        with self._watchers_lock:
            if event in self._watchers:
                self._watchers.remove(event)
