"""
The host daemon's main loop, and the jobs that plug into it.

The main loop is the daemon's one place that sleeps and its one thread that decides. It sleeps
until the earliest time at which one of its jobs has work (:meth:`Job.due`), a wake-up from
another thread (:meth:`MainLoop.wake`) or a signal; then it runs every job whose time has come
(:meth:`Job.run_due`), one after the other, on its own thread. Signal handlers only queue the
signal (:class:`~negotiator_common.signals.SignalQueue`): SIGTERM and SIGINT stop the loop,
SIGCHLD has it reap the adopted orphans of commands
(:class:`~negotiator_common.processes.OrphanReaper`), a little later.

A job is one duty of the daemon, with threads of its own if it needs them: keeping the guests
connected (:mod:`negotiator_host.connections`), rescanning libvirt (a :class:`DelayedCall`),
watching libvirt's events (:mod:`negotiator_host.events`). Another duty, such as serving local
clients on a UNIX socket, plugs in as one more :class:`Job`: its threads wake the loop when
they have news, and it stops with the others.

The daemon stops through one path, whatever asked (a signal, :meth:`MainLoop.stop`): first
every job stops taking work (:meth:`Job.stop_taking_work`, in the jobs' order), then every job
stops what it runs (:meth:`Job.stop`, in order, each bounded in time), so that no job starts
anything new while another is being stopped (the order of :mod:`negotiator_common.stopping`).
"""

import signal
import threading
import time
from typing import Callable, List, Optional, Sequence

from negotiator_common.lazylog import get_logger
from negotiator_common.processes import OrphanReaper, adopt_orphans
from negotiator_common.signals import SignalQueue

__all__ = ('Job', 'DelayedCall', 'MainLoop', 'STOP_SIGNALS')

logger = get_logger(__name__)  # the library never prints through logging's last resort

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop the daemon (with exit status 0)."""


class Job(object):
    """
    One duty of the daemon in its main loop (this base does nothing: override what applies).

    :meth:`start`, :meth:`due` and :meth:`run_due` are called on the main loop's thread;
    :meth:`due` should be cheap, as it is asked before every sleep.
    """

    def start(self) -> None:
        """Begin, before the loop first sleeps (start threads here)."""

    def due(self) -> Optional[float]:
        """When this job next has work to do (on :func:`time.monotonic`'s clock), or None."""
        return None

    def run_due(self, now: float) -> None:
        """Do the work that is due at ``now`` (the loop calls this once :meth:`due` has come)."""

    def stop_taking_work(self) -> None:
        """The daemon stops: take no new work (quickly, without waiting for anything)."""

    def stop(self) -> None:
        """The daemon stops: end what runs, waiting a bounded time for it."""


class DelayedCall(Job):
    """
    A job that calls ``action`` on the loop's thread when asked (:meth:`request`) and its delay
    has passed; earlier requests win, so that a burst of requests makes one call.
    """

    def __init__(self, action: Callable[[], None], wake: Callable[[], None]) -> None:
        self.action = action
        self.wake = wake
        self._at: Optional[float] = None
        self._lock = threading.Lock()

    def request(self, delay: float) -> None:
        """Call the action ``delay`` seconds from now, unless an earlier call is due (any thread)."""
        with self._lock:
            at = time.monotonic() + delay
            if self._at is None or at < self._at:
                self._at = at
        self.wake()

    def due(self) -> Optional[float]:
        with self._lock:
            return self._at

    def run_due(self, now: float) -> None:
        with self._lock:
            if self._at is None or self._at > now:
                return
            self._at = None
        self.action()


class MainLoop(object):
    """
    Run ``jobs`` until SIGTERM, SIGINT or :meth:`stop`; see the module's documentation.

    Run on the main thread, the loop installs its signal handlers and adopts the orphans of the
    daemon's commands (:func:`~negotiator_common.processes.adopt_orphans`), so that a process
    that left its command's group can still be found and killed; elsewhere (tests) it does
    neither, and only :meth:`stop` ends it.
    """

    def __init__(self, jobs: Sequence[Job] = ()) -> None:
        self.jobs: List[Job] = list(jobs)
        self.stop_reason = ''
        self._stopping = threading.Event()
        self._reaper = OrphanReaper()
        self._signals: Optional[SignalQueue] = None

    @property
    def stopping(self) -> bool:
        """Whether the loop was asked to stop (it may still be stopping its jobs)."""
        return self._stopping.is_set()

    def wake(self) -> None:
        """Wake the loop from any thread, so that it looks at its jobs' :meth:`~Job.due` again."""
        signals = self._signals
        if signals is not None:
            signals.wake()

    def stop(self, reason: str = 'asked to stop') -> None:
        """Ask the loop to stop (any thread); the first reason given is the one logged."""
        self.stop_reason = self.stop_reason or reason
        self._stopping.set()
        self.wake()

    def run(self) -> None:
        """Start the jobs, run them until stopped, then stop them (see the module's documentation)."""
        self._signals = SignalQueue(STOP_SIGNALS + (signal.SIGCHLD,))
        try:
            if threading.current_thread() is threading.main_thread():
                self._signals.install()
                adopt_orphans()
            for job in self.jobs:
                job.start()
            while not self.stopping:
                self._turn()
        finally:
            self._stop_jobs()
            self._signals.close()

    def _turn(self) -> None:
        """Sleep until the next due time, a wake-up or a signal; then act on the signals and the due jobs."""
        assert self._signals is not None
        times = [t for t in [job.due() for job in self.jobs] + [self._reaper.due] if t is not None]
        timeout = max(0.0, min(times) - time.monotonic()) if times else None
        for signum in self._signals.wait(timeout):
            if signum == signal.SIGCHLD:
                self._reaper.child_exited()  # the sweep waits a little: the runner reaps its own first
            else:
                self.stop('signal %d' % signum)
        self._reaper.sweep_if_due()
        if self.stopping:
            return
        now = time.monotonic()
        for job in self.jobs:
            due = job.due()
            if due is not None and due <= now:
                job.run_due(now)

    def _stop_jobs(self) -> None:
        self._stopping.set()
        logger.info("Stopping (%s)", self.stop_reason or 'asked to stop')
        for job in self.jobs:
            job.stop_taking_work()
        for job in self.jobs:
            job.stop()
        logger.info("Stopped")
