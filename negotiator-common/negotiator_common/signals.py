"""
Signals as a queue that a daemon's main loop reads: the handlers only queue (as gunicorn does).

Both daemons sleep in one place, their main loop, and must wake at once for a signal (SIGTERM,
SIGINT, SIGCHLD, the guest's SIGIO) and for news from their other threads (a session ended, a
rescan is due). :func:`signal.set_wakeup_fd` makes the interpreter write to a pipe as soon as a
signal arrives, whichever thread it interrupts, so a loop that sleeps in ``poll()`` on that
pipe wakes at once; :meth:`SignalQueue.wake` writes to the same pipe from other threads. The
handlers only append the signal's number to a list: the main loop acts and logs, so no lock
is ever taken inside a handler.

A queue that is never installed (a daemon run on another thread than the main one, as the tests
do: only the main thread may set handlers) still sleeps and wakes: it then only sees
:meth:`~SignalQueue.wake`.
"""

import os
import select
import signal
import threading
from typing import Any, Dict, List, Optional, Sequence

__all__ = ('SignalQueue',)


class SignalQueue(object):
    """
    The signals ``signals`` delivered as a queue, and a sleep that they (or :meth:`wake`) end.

    :meth:`install` on the main thread, :meth:`wait` in the main loop, :meth:`close` when done.
    """

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = list(signals)
        self._queue: List[int] = []
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._previous_handlers: Dict[int, Any] = {}
        self._previous_wakeup_fd: Optional[int] = None
        self._closed = False
        self._closing = threading.Lock()  # never taken by a handler: only wake() and close() take it

    @property
    def installed(self) -> bool:
        """Whether the handlers and the wake-up pipe are in place (between :meth:`install` and :meth:`close`)."""
        return self._previous_wakeup_fd is not None

    def install(self) -> None:
        """Install the handlers and the wake-up pipe (only the main thread may; ValueError elsewhere)."""
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd)
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self._queue.append(signum)

    def wake(self) -> None:
        """
        Wake the main loop (from any thread): its :meth:`wait` returns. After :meth:`close` this
        does nothing: the pipe's descriptor numbers may belong to another file by then.
        """
        with self._closing:
            if self._closed:
                return
            try:
                os.write(self._write_fd, b'\0')
            except BlockingIOError:
                pass  # the pipe is full: the loop wakes anyway

    def wait(self, timeout: Optional[float]) -> List[int]:
        """
        Sleep until a signal, a :meth:`wake` or ``timeout`` seconds (None: no bound), unless a
        signal is queued already; return the queued signals, oldest first (often none).
        """
        if not self._queue:
            poller = select.poll()
            poller.register(self._read_fd, select.POLLIN)
            try:
                poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
            except InterruptedError:  # pragma: no cover (Python 3.5+ retries poll itself)
                pass
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        queued, self._queue = self._queue, []
        return queued

    def close(self) -> None:
        """Put back the previous handlers and wake-up descriptor (if installed); release the pipe."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._previous_wakeup_fd = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()
        for fd in (self._read_fd, self._write_fd):
            os.close(fd)
