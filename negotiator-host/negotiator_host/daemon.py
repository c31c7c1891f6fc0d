"""
The host daemon: serve the guests' requests on their ``negotiator-guest-to-host.0`` channels.

For every running guest that has the channel, the daemon connects to the channel's socket
as a client and then *serves* on that connection (the guest's ``negotiator-guest --execute``
is the caller). It learns of guests coming and going without a polling loop:

- a long-running ``virsh -c URI event --all --loop --timestamp`` prints one line per domain
  event (started, stopped, crashed, rebooted...); each line schedules a rescan (events that
  come in a burst make one rescan);
- a rescan is one ``virsh list`` plus libvirt's files (:mod:`negotiator_host.discovery`):
  new guests are connected, gone ones dropped, and a guest restarted with a new socket is
  connected again;
- when the ``virsh event`` process ends (libvirtd restarted, or down), it is started again
  after a back-off of 1, 2, 4... up to 30 seconds, followed by a full rescan;
- when a connection ends (the guest's QEMU exited) the daemon rescans a moment later.

A reboot of a guest keeps its QEMU process and socket, so the connection simply stays.

Each guest's connection is its own :class:`~negotiator_common.endpoint.Endpoint` with its
own bounds (requests in flight, line length, stdin size), logging through a child logger
named after the guest; a command runs with ``NEGOTIATOR_GUEST`` set to the guest's name,
and only when the policy (:mod:`negotiator_host.policy`) allows it (a built-in, only where the
policy names it). Across guests, one :class:`~negotiator_common.slots.CommandSlots` bounds the
commands that run at once and the requests that wait for them (round-robin by guest); the wait
is on the request's handler thread, so a guest's pings are answered while its commands wait.
SIGTERM and SIGINT stop the daemon through one path: connections close, running commands are
killed, exit status 0.

Run on the main thread, the daemon adopts the orphans of its commands
(:func:`~negotiator_common.processes.adopt_orphans`), so that a process that left its
command's group can still be found and killed, and reaps those that exit on SIGCHLD
(:class:`~negotiator_common.processes.OrphanReaper`).
"""

import fnmatch
import os
import select
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from negotiator_common import __version__
from negotiator_common.lazylog import get_logger
from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.commands import DEFAULT_COMMANDS_DIR, CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint, EndpointGroup
from negotiator_common.errors import NegotiatorError
from negotiator_common.processes import COMMANDS, OrphanReaper, adopt_orphans
from negotiator_common.service import AgentService, Limits
from negotiator_common.slots import DEFAULT_MAX_COMMANDS, DEFAULT_MAX_QUEUED, CommandSlots
from negotiator_common.transport import Transport

from negotiator_host.channel import connect_socket
from negotiator_host.discovery import LibvirtPaths, LibvirtUnavailable, default_uri, list_guests
from negotiator_host.policy import Policy

__all__ = ('HostDaemon', 'GuestConnection', 'DEFAULT_GUEST_CONCURRENCY', 'DEFAULT_MAX_TIMEOUT', 'default_limits')

logger = get_logger(__name__)  # the library never prints through logging's last resort

DEFAULT_GUEST_CONCURRENCY = 4
"""Requests that one guest may have running on the host at once; more are refused."""

DEFAULT_TIMEOUT = 60.0
"""Seconds a host command may run when the guest does not say."""

DEFAULT_MAX_TIMEOUT = 600.0
"""
The longest a guest may ask a host command to run (``--max-timeout``). A running command holds
one of the host's shared command slots (:mod:`negotiator_common.slots`) for that long: with an
hour, two guests at their bound could keep every other guest's commands waiting for an hour;
ten minutes still leaves room for slow jobs.
"""

RESCAN_DELAY = 0.1
"""Seconds between an event and its rescan, so that a burst of events makes one rescan."""

MAX_BACKOFF = 30.0
STOP_GRACE = 5.0
"""Seconds that stopping waits for killed commands to end."""


def default_limits(max_timeout: float = DEFAULT_MAX_TIMEOUT) -> Limits:
    """
    The host's bounds per request: smaller than a guest's, since many guests share one host.
    ``max_timeout`` is the longest a guest may ask for (the default timeout never exceeds it).
    """
    return Limits(max_line_length=4 * 1024 * 1024, max_stdin=1024 * 1024, max_args=256 * 1024,
                  max_collected_output=4 * 1024 * 1024, default_timeout=min(DEFAULT_TIMEOUT, max_timeout),
                  max_timeout=max_timeout)


class GuestConnection(object):
    """The daemon's connection to one guest's channel."""

    def __init__(self, name: str, path: str, endpoint: Endpoint) -> None:
        self.name = name
        self.path = path
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.log = logger.getChild(name.replace('.', '_') or 'guest')

    @property
    def closed(self) -> bool:
        return self.endpoint.closed


class HostDaemon(object):
    """
    Serve every running guest's ``negotiator-guest-to-host.0`` channel.

    :param uri: the libvirt URI (default: ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``).
    :param commands_dirs: the host's commands directories.
    :param policy: which guests may run which commands (default: :meth:`Policy.default`, every
                   command of the commands directories and no built-in).
    :param paths: libvirt's directories (tests use a fake tree).
    :param watch: run ``virsh event`` and rescan (False: serve only what :meth:`serve_socket` is given).
    :param guest_patterns: serve only the guests whose names match one of these shell-style
                           patterns (:func:`fnmatch.fnmatchcase`); empty: every guest.
    :param max_commands: commands that run at once for all guests together.
    :param max_queued: requests that wait for one of those slots, for all guests together
                       (served round-robin by guest); more are refused with ``LimitExceeded``.
    """

    def __init__(self, uri: Optional[str] = None, commands_dirs: Sequence[str] = (DEFAULT_COMMANDS_DIR,),
                 policy: Optional[Policy] = None, paths: Optional[LibvirtPaths] = None,
                 max_concurrent: int = DEFAULT_GUEST_CONCURRENCY, limits: Optional[Limits] = None,
                 watch: bool = True, channel: str = GUEST_TO_HOST_CHANNEL,
                 guest_patterns: Sequence[str] = (), max_commands: int = DEFAULT_MAX_COMMANDS,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.uri = uri or default_uri()
        self.guest_patterns = tuple(guest_patterns)
        self.paths = paths or LibvirtPaths.for_uri(self.uri)
        self.channel = channel
        self.watch = watch
        self.max_concurrent = max_concurrent
        self.limits = limits or default_limits()
        self.policy = policy if policy is not None else Policy.default()
        self.slots = CommandSlots(max_commands, max_queued)
        self.service = AgentService('negotiator-host', CommandRegistry(list(commands_dirs)), version=__version__,
                                    policy=self.policy.allows, builtin_policy=self.policy.names, limits=self.limits,
                                    environment=lambda peer: {'NEGOTIATOR_GUEST': peer}, slots=self.slots)
        self.dispatcher = Dispatcher()
        self.service.register(self.dispatcher)
        self.endpoints = EndpointGroup()  # every guest's connection, until its last reply is out
        self.connections: Dict[str, GuestConnection] = {}
        self._lock = threading.Lock()
        self._retry_at: Dict[str, float] = {}
        self._backoff: Dict[str, float] = {}
        self._rescan_at: Optional[float] = None
        self._signals: List[int] = []
        self._reaper = OrphanReaper()
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._watcher: Optional[threading.Thread] = None
        self._watcher_process: Any = None
        self._watcher_backoff = 1.0
        self._watcher_restart_at: Optional[float] = None
        self.stop_reason = ''

    # Serving one guest.

    def serve_socket(self, name: str, path: str, timeout: float = 2.0) -> GuestConnection:
        """Connect to ``path`` (a guest's channel socket) and serve the guest ``name`` on it."""
        sock = connect_socket(path, timeout, name)
        endpoint = Endpoint(Transport.from_socket(sock), self.dispatcher, name=name,
                            max_line_length=self.limits.max_line_length, max_concurrent=self.max_concurrent)
        self.endpoints.add(endpoint)
        connection = GuestConnection(name, path, endpoint)
        with self._lock:
            old = self.connections.get(name)
            self.connections[name] = connection
        if old is not None:
            old.endpoint.close('replaced by a new connection')
        thread = threading.Thread(target=self._run_connection, args=(connection,),
                                  name='negotiator-host-%s' % name)
        thread.daemon = True
        thread.start()
        connection.log.info("Serving guest %s on %s", name, path)
        return connection

    def _run_connection(self, connection: GuestConnection) -> None:
        try:
            connection.endpoint.run()
        finally:
            # However the reader ended, the guest is forgotten and connected again: a dead
            # reader must never leave a guest cut off until the daemon restarts.
            connection.endpoint.close('the reader ended')
            self._connection_ended(connection)

    def _connection_ended(self, connection: GuestConnection) -> None:
        """Forget a closed connection and schedule its reconnection (unless the daemon stops)."""
        with self._lock:
            if self.connections.get(connection.name) is connection:
                del self.connections[connection.name]
        if self._stopping.is_set():
            return
        connection.log.info("Guest %s disconnected (%s)", connection.name, connection.endpoint.close_reason)
        # A connection that ended at once must not be retried in a tight loop.
        lived = time.monotonic() - connection.started
        delay = self._backoff.get(connection.name, 0.5) if lived < 5 else 0.5
        self._backoff[connection.name] = min(delay * 2, MAX_BACKOFF)
        self._retry_at[connection.name] = time.monotonic() + delay
        self.request_rescan(delay)

    def wants(self, name: str) -> bool:
        """Whether this daemon serves guest ``name`` (it matches a guest pattern, or there are none)."""
        return not self.guest_patterns or any(fnmatch.fnmatchcase(name, p) for p in self.guest_patterns)

    # Rescans.

    def request_rescan(self, delay: float = RESCAN_DELAY) -> None:
        """Schedule a rescan ``delay`` seconds from now (earlier requests win); safe from any thread."""
        with self._lock:
            at = time.monotonic() + delay
            if self._rescan_at is None or at < self._rescan_at:
                self._rescan_at = at
        self._wake()

    def rescan(self) -> None:
        """Connect to every running guest with the channel; drop connections of guests that are gone."""
        try:
            guests = list_guests(self.uri, self.paths)
        except LibvirtUnavailable as exc:
            logger.warning("Rescan failed, keeping the %d connections there are: %s", len(self.connections), exc)
            return
        wanted: Dict[str, str] = {}
        for guest in guests:
            if not self.wants(guest.name):
                continue
            path = guest.socket_for([self.channel])
            if path is not None:
                wanted[guest.name] = path
            else:
                logger.debug("Guest %s has no %s channel", guest.name, self.channel)
        with self._lock:
            current = dict(self.connections)
        for name, connection in current.items():
            if wanted.get(name) != connection.path:
                connection.log.info("Dropping guest %s: it stopped or its channel changed", name)
                connection.endpoint.close('guest stopped')
                with self._lock:
                    if self.connections.get(name) is connection:
                        del self.connections[name]
        now = time.monotonic()
        for name, path in sorted(wanted.items()):
            with self._lock:
                connected = name in self.connections
            if connected or self._stopping.is_set():
                continue
            if self._retry_at.get(name, 0) > now:
                self.request_rescan(self._retry_at[name] - now)
                continue
            try:
                self.serve_socket(name, path)
            except NegotiatorError as exc:
                delay = self._backoff.get(name, 1.0)
                self._backoff[name] = min(delay * 2, MAX_BACKOFF)
                self._retry_at[name] = now + delay
                logger.warning("Cannot connect to guest %s (retrying in %s s): %s", name, delay, exc)
                self.request_rescan(delay)
        for name in list(self._backoff):
            if name not in wanted:
                self._backoff.pop(name, None)
                self._retry_at.pop(name, None)

    # Watching libvirt's events.

    def _start_watcher(self) -> None:
        self._watcher_restart_at = None
        self._watcher = threading.Thread(target=self._watch_events, name='negotiator-host-events')
        self._watcher.daemon = True
        self._watcher.start()

    def _watch_events(self) -> None:
        from executor import ExternalCommand  # imported lazily

        started = time.monotonic()
        command = ExternalCommand('virsh', '-q', '-c', self.uri, 'event', '--all', '--loop', '--timestamp',
                                  shell=False, asynchronous=True, capture=True, capture_stderr=True,
                                  buffered=False, check=False, silent=True)
        try:
            command.start()
        except Exception as exc:
            logger.warning("Cannot run virsh event: %s", exc)
        else:
            self._watcher_process = command.subprocess
            logger.info("Watching libvirt's events at %s", self.uri)
            # Events that happened before the watcher ran are found by a full rescan.
            self.request_rescan(0)
            for line in iter(command.subprocess.stdout.readline, b''):
                text = line.decode('utf-8', 'replace').strip()
                if text:
                    logger.debug("libvirt: %s", text)
                    self.request_rescan()
            command.subprocess.wait()
            errors = command.subprocess.stderr.read().decode('utf-8', 'replace').strip()
            if not self._stopping.is_set():
                logger.warning("virsh event ended (status %s)%s", command.subprocess.returncode,
                               ': %s' % ' '.join(errors.split()) if errors else '')
        if time.monotonic() - started > 60:
            self._watcher_backoff = 1.0
        with self._lock:
            self._watcher_restart_at = time.monotonic() + self._watcher_backoff
        self._watcher_backoff = min(self._watcher_backoff * 2, MAX_BACKOFF)
        self.request_rescan(0)

    # The main loop.

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b'x')
        except OSError:
            pass  # the pipe is full: the main loop wakes anyway

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only record it: the main loop acts, logs and stops (no lock is taken here).
        self._signals.append(signum)
        self._wake()

    def _on_child_exit(self, signum: int, frame: Any) -> None:
        self._reaper.child_exited()  # only a time is noted: the main loop sweeps
        self._wake()

    def stop(self, reason: str = 'asked to stop') -> None:
        """Ask the main loop to stop (safe from any thread)."""
        self.stop_reason = self.stop_reason or reason
        self._stopping.set()
        self._wake()

    def run(self) -> int:
        """Serve until SIGTERM, SIGINT or :meth:`stop`; return the exit status (0)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handlers[signum] = signal.signal(signum, self._on_signal)
            handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child_exit)
            adopt_orphans()
        logger.info("negotiator-host %s daemon serving %s channels (libvirt %s) of %s", __version__, self.channel,
                    self.uri, 'guests matching %s' % ' '.join(self.guest_patterns) if self.guest_patterns
                    else 'every guest')
        try:
            if self.watch:
                self._start_watcher()
                self.request_rescan(0)
            while not self._stopping.is_set():
                if self._signals:
                    self.stop('signal %d' % self._signals[-1])
                    break
                now = time.monotonic()
                with self._lock:
                    due = [t for t in (self._rescan_at, self._watcher_restart_at, self._reaper.due) if t is not None]
                timeout = max(0.0, min(due) - now) if due else None
                try:
                    select.select([self._wake_read], [], [], timeout)
                except InterruptedError:  # pragma: no cover (Python 3.5+ retries)
                    pass
                try:
                    while os.read(self._wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._reaper.sweep_if_due()
                now = time.monotonic()
                if self._stopping.is_set() or self._signals:
                    continue
                with self._lock:
                    restart = self._watcher_restart_at is not None and self._watcher_restart_at <= now
                    rescan = self._rescan_at is not None and self._rescan_at <= now
                    if rescan:
                        self._rescan_at = None
                if restart:
                    self._start_watcher()
                if rescan:
                    self.rescan()
        finally:
            self._shutdown()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return 0

    def _shutdown(self) -> None:
        self._stopping.set()
        logger.info("Stopping (%s)", self.stop_reason or 'asked to stop')
        process = self._watcher_process
        if process is not None and process.poll() is None:
            process.terminate()
        with self._lock:
            connections, self.connections = list(self.connections.values()), {}
        for connection in connections:
            connection.endpoint.close('the host daemon is stopping')
        if not self.endpoints.wait_replies(STOP_GRACE):
            COMMANDS.kill_all(give_up_after=1.0)
            if not self.endpoints.wait_replies(1.0):
                logger.warning("Some commands were still running when the daemon stopped")
        if process is not None:
            try:
                process.wait(timeout=STOP_GRACE)
            except Exception:
                process.kill()
        logger.info("Stopped")
