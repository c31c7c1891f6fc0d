"""
The guest daemon: serve one host session after another on the port, until told to stop.

A virtio-serial port has no ``accept()``. While no host client is connected, ``read()``
returns 0 bytes at once and ``poll()`` reports POLLIN|POLLHUP at once (``docs/guest.rst``,
"How the daemon behaves"), so a read loop that simply retries spins at 100% CPU. The daemon
therefore alternates between two states:

- **a session**: a new :class:`~negotiator_common.endpoint.Endpoint` reads and serves the
  port on a thread of its own until end of stream (the host client went away). A new
  endpoint per session means that a late reply to an earlier client's request is dropped
  instead of reaching the next client, and that closing it cancels that client's commands.
- **waiting for a host** (:func:`wait_for_host`): the port is opened with ``O_ASYNC`` and
  owned by this process (``F_SETOWN``), so the ``virtio_console`` driver sends SIGIO when the
  host side opens the port (and when data arrives, which is why ``O_ASYNC`` is off during a
  session). The main thread sleeps in ``poll()`` on the wake-up pipe of
  :func:`signal.set_wakeup_fd` and, as a safety net for a lost signal, wakes every
  :data:`RECHECK_INTERVAL` seconds. After a wake-up, ``poll()`` with timeout 0 tells whether a
  host is connected (no POLLHUP), and a session starts.

Signals are handled as gunicorn does (:class:`~negotiator_common.signals.SignalQueue`): the
handlers only queue the signal number; the main loop acts. SIGTERM and SIGINT take one shutdown
path, in the order that both daemons share (:func:`~negotiator_common.stopping.stop_serving`):
cancel the session's requests while the session stays open (the runner sends their commands'
processes SIGTERM), wait for the handlers to finish, SIGKILL every process of a command still
left at the deadline, let the replies go out, close the session, release the port, and return
exit status 0 within :data:`STOP_TIMEOUT` seconds (plus a little).

The daemon adopts the orphans of its commands (:func:`~negotiator_common.processes.adopt_orphans`),
so that a process that left its command's group can still be found and killed; SIGCHLD makes
the main loop reap those that exit (:class:`~negotiator_common.processes.OrphanReaper`).
"""

import errno
import fcntl
import os
import signal
import threading
import time
from typing import Callable, List, Optional

from negotiator_common.channels import HOST_TO_GUEST_CHANNELS
from negotiator_common.lazylog import get_logger
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import DEFAULT_MAX_CONCURRENT, Endpoint, EndpointGroup
from negotiator_common.processes import OrphanReaper, adopt_orphans
from negotiator_common.service import AgentService
from negotiator_common.signals import SignalQueue
from negotiator_common.stopping import stop_serving
from negotiator_common.transport import Transport

from negotiator_guest.port import FALLBACK_DEVICE, find_port, host_connected, open_port

__all__ = ('GuestDaemon', 'wait_for_host', 'RECHECK_INTERVAL', 'STOP_TIMEOUT', 'STOP_KILL_WAIT', 'STOP_SIGNALS')

logger = get_logger(__name__)  # the library never prints through logging's last resort

RECHECK_INTERVAL = 3.0
"""Seconds between checks for a host while waiting, in case a SIGIO was missed."""

STOP_TIMEOUT = 1.2
"""Seconds that running commands get to die after SIGTERM or SIGINT before their groups are SIGKILLed."""

STOP_KILL_WAIT = 0.4
"""Seconds that SIGKILLed commands get to die and their handlers to return, when stopping."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def wait_for_host(signals: SignalQueue, recheck_interval: Optional[float]) -> List[int]:
    """
    The waiting strategy while no host is connected: sleep until SIGIO (the port driver's news
    that the host side opened), a stop signal, or ``recheck_interval`` seconds.

    This is the one place to change if a guest kernel turns out not to send SIGIO on connect
    (then: a shorter interval, at the cost of more wake-ups at rest).
    """
    return signals.wait(recheck_interval)


class _Session(object):
    """One host session: an endpoint reading the port on its own thread until end of stream."""

    def __init__(self, fd: int, dispatcher: Dispatcher, number: int, on_end: Callable[[], None],
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> None:
        self.number = number
        self.transport = Transport(fd, close_fd=False)
        # The bound that hello announces (limits.max_in_flight), so a caller that keeps to it is never refused.
        self.endpoint = Endpoint(self.transport, dispatcher, name='host', max_concurrent=max_concurrent)
        self._on_end = on_end
        self._ended = False
        self.thread = threading.Thread(target=self._run, name='negotiator-session-%d' % number)
        self.thread.daemon = True

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            # Before reading anything: a host client still waiting for replies from a daemon
            # that died learns that they are lost (a new client drops this while resynchronising).
            self.endpoint.announce_session({'agent': 'negotiator-guest', 'pid': os.getpid()})
            self.endpoint.run()
        finally:
            # Set before the main loop is woken: the thread itself is still alive at that moment.
            self._ended = True
            self._on_end()

    @property
    def finished(self) -> bool:
        return self._ended


class GuestDaemon(object):
    """
    Serve the host's requests on a port, one host session after another, until SIGTERM/SIGINT.

    :param service: the methods and commands to serve (an :class:`AgentService`).
    :param path: the port's device path (None: find it by channel name, see
                 :func:`~negotiator_guest.port.find_port`).
    :param fd: an open descriptor to serve instead of opening ``path`` (the daemon owns and
               closes it).
    :param root: where ``/dev`` and ``/sys`` are looked up (tests use a fake tree).
    """

    def __init__(self, service: AgentService, path: Optional[str] = None, fd: Optional[int] = None,
                 recheck_interval: float = RECHECK_INTERVAL, stop_timeout: float = STOP_TIMEOUT,
                 root: str = '/') -> None:
        self.service = service
        self.path = path
        self.fd = fd
        self.recheck_interval = recheck_interval
        self.stop_timeout = stop_timeout
        self.root = root
        self.dispatcher = service.register(Dispatcher())
        self.endpoints = EndpointGroup()
        self.sessions_served = 0
        self._session: Optional[_Session] = None
        self._signals = SignalQueue(STOP_SIGNALS + (signal.SIGIO, signal.SIGCHLD))
        self._reaper = OrphanReaper()
        self._stop_reason: Optional[str] = None

    def open(self) -> None:
        """Find and open the port (raises ChannelNotFound or ChannelBusy)."""
        if self.fd is None:
            if self.path is None:
                self.path = find_port(HOST_TO_GUEST_CHANNELS, self.root, fallback=FALLBACK_DEVICE)
            self.fd = open_port(self.path)
        else:
            os.set_inheritable(self.fd, False)
            os.set_blocking(self.fd, False)
            self.path = self.path or '<descriptor %d>' % self.fd

    def _sigio(self, enabled: bool) -> None:
        """
        Ask the kernel for SIGIO when the port changes (host opens, data), or stop asking.

        SIGIO is on while the daemon waits for a host and off during a session, which reads the
        port itself: otherwise every line from the host would raise a SIGIO, run the Python
        signal handler and wake the main thread to contend for the GIL with the session's
        thread (py-spy: about a tenth of the daemon's time during a stream of pings in a TCG
        guest). A host that connects between the end of a session and the re-arming sends no
        signal: it is found by the check that follows a session that read something, or else
        by the next periodic check.
        """
        assert self.fd is not None
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if enabled:
                fcntl.fcntl(self.fd, fcntl.F_SETOWN, os.getpid())
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_ASYNC)
            else:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_ASYNC)
        except OSError as exc:
            if enabled:
                logger.warning("No SIGIO from %s (%s): checking for a host every %s seconds instead",
                               self.path, exc, self.recheck_interval)

    def stop(self, reason: str = 'stop requested') -> None:
        """Ask the main loop to stop (any thread); it returns within about ``stop_timeout`` seconds."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._signals.wake()

    def run(self) -> int:
        """Serve until stopped; return the exit status (0). Must run on the main thread."""
        if self.fd is None:
            self.open()
        assert self.fd is not None
        self._signals.install()
        adopt_orphans()
        try:
            self._sigio(True)
            logger.info("Serving host requests on %s (pid %d)", self.path, os.getpid())
            if self.service.allow_exec:
                logger.warning("exec is switched on (--allow-exec): the host may run any program as this user")
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        assert self.fd is not None
        check = True
        while self._stop_reason is None:
            if self._session is None and check and host_connected(self.fd):
                self._start_session()
            if self._session is None:
                received = wait_for_host(self._signals, self._timeout(self.recheck_interval))
                # Woken by SIGIO or by a timer (nothing received): look again.
                check = not received or signal.SIGIO in received
            else:
                received = self._signals.wait(self._timeout(None))
            for signum in received:
                if signum in STOP_SIGNALS:
                    self.stop('received %s' % signal.Signals(signum).name)
                elif signum == signal.SIGCHLD:
                    self._reaper.child_exited()
            self._reaper.sweep_if_due()
            if self._session is not None and self._session.finished:
                session, self._session = self._session, None
                self._sigio(True)
                logger.debug("Host session %d ended: %s", session.number, session.endpoint.close_reason)
                # A session that read nothing (the host left at once) is no reason to look again
                # before the next SIGIO or timer: that keeps an odd device from spinning us.
                check = session.transport.bytes_read > 0 or signal.SIGIO in received

    def _timeout(self, longest: Optional[float]) -> Optional[float]:
        """How long the main loop may sleep: at most ``longest``, and not past a due sweep for orphans."""
        if self._reaper.due is None:
            return longest
        until_sweep = max(0.0, self._reaper.due - time.monotonic())
        return until_sweep if longest is None else min(longest, until_sweep)

    def _start_session(self) -> None:
        assert self.fd is not None
        self.sessions_served += 1
        self._session = _Session(self.fd, self.dispatcher, self.sessions_served, self._signals.wake,
                                 self.service.limits.max_in_flight)
        self.endpoints.add(self._session.endpoint)
        logger.debug("Host connected: session %d", self.sessions_served)
        self._sigio(False)
        self._session.start()

    def _shutdown(self) -> None:
        """Stop the session in the one order of :mod:`negotiator_common.stopping`, then release the port."""
        reason = self._stop_reason or 'stopped'
        logger.info("Stopping (%s)", reason)
        deadline = time.monotonic() + self.stop_timeout
        session, self._session = self._session, None
        stop_serving([session.endpoint] if session is not None else [], self.endpoints,
                     'daemon stopping: %s' % reason, self.stop_timeout, STOP_KILL_WAIT)
        if session is not None:
            session.thread.join(max(0.1, deadline - time.monotonic()))
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
            self.fd = None
        self._signals.close()
        logger.info("Stopped; port %s released", self.path)
