"""
The host daemon: serve the guests' requests on their ``negotiator-guest-to-host.0`` channels,
and share each guest's agent with the host's own callers.

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

With a local socket (``socket_path``; the CLI gives one unless ``--socket ''``), the same
rescans also link the daemon to every served guest's agent on its host-to-guest channel, one
connection per guest (:mod:`negotiator_host.agents`), and the host's callers share those connections through
the socket (:mod:`negotiator_host.local`, :mod:`negotiator_host.proxy`), as far as the
callers' policy (:mod:`negotiator_host.access`) allows, each call written to the audit log
(:mod:`negotiator_host.audit`).

The daemon is a few jobs in one main loop (:mod:`negotiator_host.mainloop`), each in a module
of its own: the rescans (here: which guests to serve), the guests' connections
(:mod:`negotiator_host.connections`), the local clients (:mod:`negotiator_host.local`), the
links to the agents (:mod:`negotiator_host.agents`), the event watcher
(:mod:`negotiator_host.events`); reconnections wait according to :mod:`negotiator_host.backoff`.
SIGTERM and SIGINT stop the daemon through one path, in the order that the guest daemon follows
too (:mod:`negotiator_common.stopping`): no more rescans nor local clients, the guests' running
commands are stopped (SIGTERM, then SIGKILL) and their replies go out to the guests, then the
local clients' calls are cancelled in the guests and their replies go out to the clients, the
connections close (the agents' last, as the clients' calls travel over them), exit status 0.

Run on the main thread, the daemon adopts the orphans of its commands
(:func:`~negotiator_common.processes.adopt_orphans`), so that a process that left its
command's group can still be found and killed, and reaps those that exit on SIGCHLD
(:class:`~negotiator_common.processes.OrphanReaper`).
"""

import fnmatch
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from negotiator_common import __version__
from negotiator_common.lazylog import get_logger
from negotiator_common.channels import GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNELS
from negotiator_common.commands import DEFAULT_COMMANDS_DIR, CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.errors import NegotiatorError
from negotiator_common.service import AgentService, Limits
from negotiator_common.slots import DEFAULT_MAX_COMMANDS, DEFAULT_MAX_QUEUED, CommandSlots

from negotiator_host.agents import AgentLink, GuestAgent, GuestAgents
from negotiator_host.backoff import Backoff
from negotiator_host.connections import GuestConnection, GuestConnections
from negotiator_host.discovery import Guest, LibvirtPaths, LibvirtUnavailable, default_uri, list_guests
from negotiator_host.events import EventWatcher
from negotiator_host.local import LocalServer
from negotiator_host.mainloop import DelayedCall, Job, MainLoop
from negotiator_host.policy import Policy

if TYPE_CHECKING:  # annotations only
    import socket

    from negotiator_host.access import Caller, CallerPolicy
    from negotiator_host.audit import AuditLog

__all__ = ('HostDaemon', 'DEFAULT_GUEST_CONCURRENCY', 'DEFAULT_MAX_TIMEOUT', 'default_limits')

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

RECONNECT_DELAY = 0.5
"""Seconds before a guest whose connection ended is connected again (doubled while it keeps ending at once)."""

CONNECT_RETRY_DELAY = 1.0
"""Seconds before a guest whose socket refused the connection is tried again (then doubled)."""

STABLE_CONNECTION = 5.0
"""Seconds after which a connection that ends had lived well: its guest is reconnected after the first delay."""


def default_limits(max_timeout: float = DEFAULT_MAX_TIMEOUT) -> Limits:
    """
    The host's bounds per request: smaller than a guest's, since many guests share one host.
    ``max_timeout`` is the longest a guest may ask for (the default timeout never exceeds it).
    """
    return Limits(max_line_length=4 * 1024 * 1024, max_stdin=1024 * 1024, max_args=256 * 1024,
                  max_collected_output=4 * 1024 * 1024, default_timeout=min(DEFAULT_TIMEOUT, max_timeout),
                  max_timeout=max_timeout, max_in_flight=DEFAULT_GUEST_CONCURRENCY)


class HostDaemon(object):
    """
    Serve every running guest's ``negotiator-guest-to-host.0`` channel (and, with a
    ``socket_path``, its agent to local callers).

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
    :param socket_path: serve local clients on this UNIX socket (:mod:`negotiator_host.local`;
                        the CLI gives :func:`~negotiator_host.local_socket.socket_path`), holding the
                        host-to-guest channel of every guest served (:mod:`negotiator_host.agents`);
                        None (the CLI's ``--socket ''``): neither, the guests' agents are left to
                        direct callers.
    :param caller_policy: which local callers may use which guests (default: root only).
    :param audit: where every local call is written (default: nowhere).
    :param caller_of: who a local client is (default: its ``SO_PEERCRED``; tests give their own).
    """

    def __init__(self, uri: Optional[str] = None, commands_dirs: Sequence[str] = (DEFAULT_COMMANDS_DIR,),
                 policy: Optional[Policy] = None, paths: Optional[LibvirtPaths] = None,
                 limits: Optional[Limits] = None,
                 watch: bool = True, channel: str = GUEST_TO_HOST_CHANNEL,
                 guest_patterns: Sequence[str] = (), max_commands: int = DEFAULT_MAX_COMMANDS,
                 max_queued: int = DEFAULT_MAX_QUEUED, socket_path: Optional[str] = None,
                 caller_policy: 'Optional[CallerPolicy]' = None, audit: 'Optional[AuditLog]' = None,
                 caller_of: 'Optional[Callable[[socket.socket], Caller]]' = None) -> None:
        self.uri = uri or default_uri()
        self.guest_patterns = tuple(guest_patterns)
        self.paths = paths or LibvirtPaths.for_uri(self.uri)
        self.channel = channel
        self.watch = watch
        self.limits = limits or default_limits()
        self.policy = policy if policy is not None else Policy.default()
        self.slots = CommandSlots(max_commands, max_queued)
        self.service = AgentService('negotiator-host', CommandRegistry(list(commands_dirs)), version=__version__,
                                    policy=self.policy.allows, builtin_policy=self.policy.names, limits=self.limits,
                                    environment=lambda peer: {'NEGOTIATOR_GUEST': peer}, slots=self.slots)
        self.dispatcher = Dispatcher()
        self.service.register(self.dispatcher)
        self._connections = GuestConnections(self.dispatcher, self.limits.max_line_length, self.limits.max_in_flight,
                                             on_end=self._connection_ended, log_name=__name__)
        self._backoff = Backoff()
        self._agent_backoff = Backoff()
        self._loop = MainLoop()
        self._rescans = DelayedCall(self.rescan, self._loop.wake)
        self._agents = GuestAgents(on_end=self._link_ended)
        jobs: List[Job] = [self._rescans, self._connections]
        self._local: Optional[LocalServer] = None
        if socket_path is not None:
            self._local = self._local_server(socket_path, caller_policy, audit, caller_of)
            jobs += [self._local, self._agents]
        if watch:
            jobs.append(EventWatcher(self.uri, on_event=self.request_rescan,
                                     on_events_missed=lambda: self.request_rescan(0)))
        self._loop.jobs = jobs

    def _local_server(self, path: str, caller_policy: 'Optional[CallerPolicy]', audit: 'Optional[AuditLog]',
                      caller_of: 'Optional[Callable[[socket.socket], Caller]]') -> LocalServer:
        if caller_policy is None:
            from negotiator_host.access import CallerPolicy
            caller_policy = CallerPolicy()
        if audit is None:
            from negotiator_host.audit import AuditLog
            audit = AuditLog(None)
        return LocalServer(path, self._agents, caller_policy, audit, caller_of)

    @property
    def agents(self) -> Dict[str, GuestAgent]:
        """The guests served to local clients now, by name (a copy)."""
        return self._agents.snapshot()

    @property
    def local(self) -> Optional[LocalServer]:
        """The local socket's server (None without a socket)."""
        return self._local

    @property
    def connections(self) -> Dict[str, GuestConnection]:
        """The guests served now, by name (a copy)."""
        return self._connections.snapshot()

    @property
    def stop_reason(self) -> str:
        return self._loop.stop_reason

    # Serving one guest.

    def serve_socket(self, name: str, path: str, timeout: float = 2.0) -> GuestConnection:
        """Connect to ``path`` (a guest's channel socket) and serve the guest ``name`` on it."""
        return self._connections.connect(name, path, timeout)

    def _connection_ended(self, connection: GuestConnection) -> None:
        """Schedule the reconnection of a guest whose connection ended (unless the daemon stops)."""
        if self._loop.stopping:
            return
        connection.log.info("Guest %s disconnected (%s)", connection.name, connection.endpoint.close_reason)
        # A connection that ended at once must not be retried in a tight loop.
        if connection.lifetime >= STABLE_CONNECTION:
            self._backoff.reset(connection.name)
        self.request_rescan(self._backoff.failed(connection.name, RECONNECT_DELAY))

    def serve_agent(self, name: str, path: str) -> GuestAgent:
        """Serve guest ``name``'s agent, at the host-to-guest socket ``path``, to local clients (linked on a thread)."""
        agent = self._agents.serve(name, path)
        self._agents.connect(agent)
        return agent

    def _link_ended(self, agent: GuestAgent, link: Optional[AgentLink], error: Optional[NegotiatorError]) -> None:
        """Schedule a new link to a guest whose link ended or could not be made (unless it is gone)."""
        if self._loop.stopping or agent.dropped:
            return
        if link is not None and link.lifetime >= STABLE_CONNECTION:
            self._agent_backoff.reset(agent.name)
        delay = self._agent_backoff.failed(agent.name, CONNECT_RETRY_DELAY if link is None else RECONNECT_DELAY)
        if error is not None:
            agent.log.warning("Cannot link to the agent of guest %s (retrying in %s s): %s", agent.name, delay, error)
        self.request_rescan(delay)

    def wants(self, name: str) -> bool:
        """Whether this daemon serves guest ``name`` (it matches a guest pattern, or there are none)."""
        return not self.guest_patterns or any(fnmatch.fnmatchcase(name, p) for p in self.guest_patterns)

    # Rescans.

    def request_rescan(self, delay: float = RESCAN_DELAY) -> None:
        """Schedule a rescan ``delay`` seconds from now (earlier requests win); safe from any thread."""
        self._rescans.request(delay)

    def rescan(self) -> None:
        """Connect to every running guest with the channel; drop connections of guests that are gone."""
        try:
            guests = list_guests(self.uri, self.paths)
        except LibvirtUnavailable as exc:
            logger.warning("Rescan failed, keeping the %d connections there are: %s", len(self.connections), exc)
            return
        wanted = self._wanted_sockets(guests, [self.channel])
        for name, connection in self.connections.items():
            if wanted.get(name) != connection.path:
                connection.log.info("Dropping guest %s: it stopped or its channel changed", name)
                self._connections.drop(connection, 'guest stopped')
        for name, path in sorted(wanted.items()):
            self._connect_when_due(name, path)
        self._backoff.forget_all_but(wanted)
        if self._local is not None:
            self._rescan_agents(self._wanted_sockets(guests, HOST_TO_GUEST_CHANNELS))

    def _wanted_sockets(self, guests: List[Guest], channels: Sequence[str]) -> Dict[str, str]:
        """The socket of the first of ``channels`` of each guest to serve, by name."""
        wanted: Dict[str, str] = {}
        for guest in guests:
            if not self.wants(guest.name):
                continue
            path = guest.socket_for(channels)
            if path is not None:
                wanted[guest.name] = path
            else:
                logger.debug("Guest %s has no %s channel", guest.name, channels[0])
        return wanted

    def _rescan_agents(self, wanted: Dict[str, str]) -> None:
        """Link to the agent of every guest in ``wanted`` (name: socket) when due; drop the others."""
        for name, agent in self.agents.items():
            if wanted.get(name) != agent.path:
                self._agents.drop(name, 'the guest stopped or its channel changed')
        for name, path in sorted(wanted.items()):
            agent = self._agents.serve(name, path)
            wait = self._agent_backoff.remaining(name)
            if wait > 0:
                self.request_rescan(wait)
            elif not self._loop.stopping:
                self._agents.connect(agent)
        self._agent_backoff.forget_all_but(wanted)

    def _connect_when_due(self, name: str, path: str) -> None:
        """Connect to guest ``name`` unless it is connected or its back-off is not over (then rescan when it is)."""
        if name in self._connections or self._loop.stopping:
            return
        wait = self._backoff.remaining(name)
        if wait > 0:
            self.request_rescan(wait)
            return
        try:
            self.serve_socket(name, path)
        except NegotiatorError as exc:
            delay = self._backoff.failed(name, CONNECT_RETRY_DELAY)
            logger.warning("Cannot connect to guest %s (retrying in %s s): %s", name, delay, exc)
            self.request_rescan(delay)

    # The main loop.

    def stop(self, reason: str = 'asked to stop') -> None:
        """Ask the main loop to stop (safe from any thread)."""
        self._loop.stop(reason)

    def run(self) -> int:
        """
        Serve until SIGTERM, SIGINT or :meth:`stop`; return the exit status (0). The local socket
        is made first: :class:`~negotiator_host.local.LocalSocketError` if it cannot be.
        """
        if self._local is not None:
            self._local.open()
        logger.info("negotiator-host %s daemon serving %s channels (libvirt %s) of %s", __version__, self.channel,
                    self.uri, 'guests matching %s' % ' '.join(self.guest_patterns) if self.guest_patterns
                    else 'every guest')
        if self.watch:
            self.request_rescan(0)
        self._loop.run()
        return 0
