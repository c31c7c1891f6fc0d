"""
Watching libvirt's domain events: one long-running ``virsh event --all --loop --timestamp``.

``virsh event`` prints one line per domain event (started, stopped, crashed, rebooted...), so
the daemon learns of guests coming and going without polling. Each line is passed on as
``on_event()`` (the daemon rescans a moment later, so that a burst makes one rescan). Whenever
events may have been missed (the watcher has just started, or it ended), it says
``on_events_missed()``, and the daemon rescans everything at once. When the process ends
(libvirtd restarted, or down), it is started again after a back-off of 1, 2, 4... up to 30
seconds (:mod:`negotiator_host.backoff`), from 1 again once it ran for a minute.

The watcher is a job of the main loop (:mod:`negotiator_host.mainloop`): a thread of its own
reads the process's output, and the loop starts the process again when its back-off is over.
"""

import subprocess
import threading
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

from negotiator_common.lazylog import get_logger

from negotiator_host.backoff import Backoff
from negotiator_host.mainloop import Job

if TYPE_CHECKING:  # annotations only: executor is imported when the watcher starts
    from negotiator_common.external import ExternalProgram

__all__ = ('EventWatcher', 'virsh_event_argv', 'FIRST_RESTART_DELAY', 'STABLE_RUN', 'STOP_WAIT')

logger = get_logger(__name__)  # the library never prints through logging's last resort

FIRST_RESTART_DELAY = 1.0
"""Seconds before the watcher starts again after it ended for the first time (then 2, 4...)."""

STABLE_RUN = 60.0
"""Seconds after which a watcher that ends had run well: it starts again after the first delay."""

STOP_WAIT = 5.0
"""Seconds that stopping waits for the process to end after SIGTERM, before SIGKILL."""

_BACKOFF_KEY = 'virsh event'


def virsh_event_argv(uri: str) -> List[str]:
    """The argv of the watcher for libvirt at ``uri``."""
    return ['virsh', '-q', '-c', uri, 'event', '--all', '--loop', '--timestamp']


class EventWatcher(Job):
    """
    Run ``virsh event`` for libvirt at ``uri`` on a thread, pass its lines on, start it again after it ended.

    :param on_event: called for each line (an event), on the watcher's thread.
    :param on_events_missed: called when the watcher started or ended (rescan everything), on its thread.
    :param backoff: when to start again (tests give one with their own clock).
    :param argv: the program to run instead of :func:`virsh_event_argv` (tests).
    """

    def __init__(self, uri: str, on_event: Callable[[], None], on_events_missed: Callable[[], None],
                 backoff: Optional[Backoff] = None, argv: Optional[Sequence[str]] = None) -> None:
        self.uri = uri
        self.argv = list(argv) if argv is not None else virsh_event_argv(uri)
        self.on_event = on_event
        self.on_events_missed = on_events_missed
        self.backoff = backoff or Backoff()
        self._lock = threading.Lock()
        self._restart_at: Optional[float] = None
        self._process: 'Optional[subprocess.Popen]' = None
        self._stopping = False

    # The job.

    def start(self) -> None:
        """Start the process on a thread of its own."""
        with self._lock:
            self._restart_at = None
        thread = threading.Thread(target=self._watch, name='negotiator-host-events')
        thread.daemon = True
        thread.start()

    def due(self) -> Optional[float]:
        """When the process that ended starts again, or None while it runs."""
        with self._lock:
            return self._restart_at

    def run_due(self, now: float) -> None:
        self.start()

    def stop_taking_work(self) -> None:
        """Stop the process (SIGTERM); it is not started again."""
        with self._lock:
            self._stopping = True
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def stop(self) -> None:
        """Wait for the process to end (at most :data:`STOP_WAIT` seconds, then SIGKILL)."""
        with self._lock:
            process = self._process
        if process is not None:
            try:
                process.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()

    # The watcher's thread.

    def _watch(self) -> None:
        started = self.backoff.clock()
        program = self._start_process()
        if program is not None:
            try:
                self._read(program.process)
            finally:
                program.close()
        if self.backoff.clock() - started > STABLE_RUN:
            self.backoff.reset(_BACKOFF_KEY)
        self.backoff.failed(_BACKOFF_KEY, FIRST_RESTART_DELAY)
        with self._lock:
            self._restart_at = None if self._stopping else self.backoff.retry_at(_BACKOFF_KEY)
        self.on_events_missed()

    def _start_process(self) -> 'Optional[ExternalProgram]':
        from negotiator_common.external import ExternalProgram  # imported lazily: executor is slow to import

        program = ExternalProgram(self.argv)
        try:
            process = program.start()
        except Exception as exc:
            program.close()
            logger.warning("Cannot run virsh event: %s", exc)
            return None
        with self._lock:
            self._process = process
            stopping = self._stopping
        if stopping:  # the daemon began to stop while the process started
            process.terminate()
        logger.info("Watching libvirt's events at %s", self.uri)
        # Events that happened before the watcher ran are found by a full rescan.
        self.on_events_missed()
        return program

    def _read(self, process: 'subprocess.Popen') -> None:
        """Pass on each line until the process ends; log why it ended unless the daemon stopped it."""
        assert process.stdout is not None and process.stderr is not None
        for line in iter(process.stdout.readline, b''):
            text = line.decode('utf-8', 'replace').strip()
            if text:
                logger.debug("libvirt: %s", text)
                self.on_event()
        process.wait()
        errors = process.stderr.read().decode('utf-8', 'replace').strip()
        with self._lock:
            stopping = self._stopping
        if not stopping:
            logger.warning("virsh event ended (status %s)%s", process.returncode,
                           ': %s' % ' '.join(errors.split()) if errors else '')

