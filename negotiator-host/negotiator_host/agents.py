"""
The host daemon's connections to the guests' agents: one per guest, shared by every local caller.

A libvirt channel socket takes one client at a time, so callers that each connect to a guest
queue for its socket one after another. The host daemon instead holds the guest's
``negotiator-host-to-guest.0`` channel itself, as libvirtd holds the QEMU guest agent's socket,
and its local clients' requests travel over that one connection, multiplexed by id
(:mod:`negotiator_host.proxy`).

Each guest the daemon serves is a :class:`GuestAgent`: its socket's path, its fair queue (the
guest's requests in flight, :class:`~negotiator_common.slots.CommandSlots` served in turn by
caller) and, while connected, an :class:`AgentLink`, one connection that made its ``hello``. A
link is made on a thread of its own (connect, resynchronise with ``hello``), so that a guest
whose agent does not answer never delays the main loop or the other guests. The daemon decides
when (:mod:`negotiator_host.daemon`): a rescan that finds the guest running, and again after a
back-off whenever the link ends:

- the connection closed (the guest's QEMU exited, or the socket broke);
- the agent announced a new ``session`` (it restarted while QEMU kept the socket open): the
  calls waiting on the old agent have failed already (the endpoint does that), and the link is
  made again so that the new agent's ``hello`` (its version and limits) is the one in use;
- the connection or the ``hello`` failed (the agent is not running yet, or a direct client holds
  the socket).

The queue outlives the links: calls that wait for a slot go on waiting across a reconnection.
A guest that is gone (the rescan no longer finds it, or its socket changed) is dropped: its link
is closed and its calls in flight fail with ``ConnectionClosed``.
"""

import threading
import time
from typing import Any, Callable, Dict, Optional

from negotiator_common.client import announces
from negotiator_common.endpoint import CANCEL_METHOD, DEFAULT_MAX_CONCURRENT, Endpoint
from negotiator_common.errors import NegotiatorError
from negotiator_common.lazylog import get_logger
from negotiator_common.slots import CommandSlots
from negotiator_common.transport import Transport

from negotiator_host.channel import connect_socket
from negotiator_host.mainloop import Job

__all__ = ('AgentLink', 'GuestAgent', 'GuestAgents', 'DAEMON_AGENT', 'CONNECT_TIMEOUT', 'HELLO_TIMEOUT',
           'MAX_QUEUED_PER_GUEST')

logger = get_logger(__name__)  # the library never prints through logging's last resort

DAEMON_AGENT = 'negotiator-host-daemon'
"""What the daemon calls itself: in its ``hello`` to the agents, and to its local clients."""

CONNECT_TIMEOUT = 2.0
"""Seconds that connecting to a guest's channel socket may take (it is busy while a direct client holds it)."""

HELLO_TIMEOUT = 5.0
"""Seconds that a guest's agent gets to answer ``hello`` before the link is given up (and tried again later)."""

MAX_QUEUED_PER_GUEST = 128
"""Calls that wait for a slot of one guest (beyond its ``max_in_flight``); more are refused with ``LimitExceeded``."""


def _in_flight_limit(hello: Dict[str, Any]) -> int:
    """The ``max_in_flight`` an agent announced, or the protocol's default for an agent older than it."""
    limits = hello.get('limits')
    value: Any = limits.get('max_in_flight') if isinstance(limits, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return DEFAULT_MAX_CONCURRENT


class AgentLink(object):
    """One connection to a guest's agent, after its ``hello``: ``endpoint`` and ``hello`` (what the agent said)."""

    def __init__(self, name: str, endpoint: Endpoint, hello: Dict[str, Any]) -> None:
        self.name = name
        self.endpoint = endpoint
        self.hello = hello
        self.started = time.monotonic()
        self.can_cancel = announces(hello, CANCEL_METHOD)
        """Whether the agent serves ``cancel`` (else a caller that goes away leaves its command to run its course)."""

    @property
    def lifetime(self) -> float:
        """Seconds since the link was made."""
        return time.monotonic() - self.started


class GuestAgent(object):
    """
    A guest served on its host-to-guest channel: ``name``, socket ``path``, ``queue`` (its fair
    queue), ``log`` (its child logger) and the current :attr:`link` (None while not connected).
    """

    def __init__(self, name: str, path: str, max_queued: int = MAX_QUEUED_PER_GUEST) -> None:
        self.name = name
        self.path = path
        self.queue = CommandSlots(DEFAULT_MAX_CONCURRENT, max_queued, scope='in guest %s' % name)
        self.log = logger.getChild(name.replace('.', '_') or 'guest')
        self.dropped = False
        self._link: Optional[AgentLink] = None
        self._connecting = False
        self._changed = threading.Condition()

    @property
    def link(self) -> Optional[AgentLink]:
        return self._link

    @property
    def connecting(self) -> bool:
        """Whether a link is being made now."""
        return self._connecting

    def wait_link(self, timeout: float) -> Optional[AgentLink]:
        """The link; while one is being made, wait for it (at most ``timeout`` seconds); None if there is none."""
        with self._changed:
            self._changed.wait_for(lambda: not self._connecting, timeout)
            return self._link

    def _begin(self) -> bool:
        """Note that a link is being made; False if one is already, or the guest is connected or dropped."""
        with self._changed:
            if self._connecting or self._link is not None or self.dropped:
                return False
            self._connecting = True
            return True

    def _set_link(self, link: Optional[AgentLink]) -> None:
        with self._changed:
            self._link = link
            self._connecting = False
            self._changed.notify_all()
        if link is not None:
            self.queue.resize(_in_flight_limit(link.hello))

    def _close(self, reason: str) -> None:
        link = self._link
        if link is not None:
            link.endpoint.close(reason)


LinkEnded = Callable[[GuestAgent, Optional[AgentLink], Optional[NegotiatorError]], None]
"""``on_end(agent, link, error)``: the link that ended (None if it was never made), or why it could not be made."""


class GuestAgents(Job):
    """
    The guests served on their host-to-guest channels, by name (safe from any thread).

    :param on_end: called when a link ends or could not be made, on the link's thread (the
                   daemon decides when to try again).
    """

    def __init__(self, on_end: LinkEnded, max_queued: int = MAX_QUEUED_PER_GUEST,
                 connect_timeout: float = CONNECT_TIMEOUT, hello_timeout: float = HELLO_TIMEOUT) -> None:
        self.on_end = on_end
        self.max_queued = max_queued
        self.connect_timeout = connect_timeout
        self.hello_timeout = hello_timeout
        self._agents: Dict[str, GuestAgent] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def serve(self, name: str, path: str) -> GuestAgent:
        """The guest ``name`` served on the socket ``path`` (a guest whose socket changed is served anew)."""
        with self._lock:
            agent = self._agents.get(name)
            if agent is not None and agent.path == path:
                return agent
            self._agents[name] = new = GuestAgent(name, path, self.max_queued)
        if agent is not None:
            self._retire(agent, 'its channel socket changed')
        return new

    def drop(self, name: str, reason: str) -> None:
        """Serve guest ``name`` no more: close its link (its calls in flight fail)."""
        with self._lock:
            agent = self._agents.pop(name, None)
        if agent is not None:
            self._retire(agent, reason)

    @staticmethod
    def _retire(agent: GuestAgent, reason: str) -> None:
        agent.dropped = True
        agent.log.info("No longer serving local callers of guest %s: %s", agent.name, reason)
        agent._close(reason)

    def get(self, name: str) -> Optional[GuestAgent]:
        with self._lock:
            return self._agents.get(name)

    def snapshot(self) -> Dict[str, GuestAgent]:
        """The guests served now, by name (a copy)."""
        with self._lock:
            return dict(self._agents)

    def connect(self, agent: GuestAgent) -> bool:
        """Start making a link to ``agent`` on a thread of its own; False if one is made already (or connected)."""
        if self._stopping or not agent._begin():
            return False
        thread = threading.Thread(target=self._keep_link, args=(agent,), name='negotiator-agent-%s' % agent.name)
        thread.daemon = True
        thread.start()
        return True

    def _keep_link(self, agent: GuestAgent) -> None:
        """The link's thread: make the link, wait until it ends, say so."""
        link: Optional[AgentLink] = None
        error: Optional[NegotiatorError] = None
        try:
            link = self._open(agent)
            agent._set_link(link)
            if agent.dropped or self._stopping:  # dropped while the link was made: its close found none
                link.endpoint.close('the guest is no longer served')
            link.endpoint.wait_closed()
            agent.log.info("Link to the agent of guest %s ended (%s)", agent.name, link.endpoint.close_reason)
        except NegotiatorError as exc:
            error = exc
        finally:
            agent._set_link(None)
            self.on_end(agent, link, error)

    def _open(self, agent: GuestAgent) -> AgentLink:
        """Connect to the agent's socket and exchange ``hello`` (resynchronising); raise if either fails."""
        sock = connect_socket(agent.path, self.connect_timeout, agent.name)
        endpoint = Endpoint(Transport.from_socket(sock), name=agent.name,
                            on_session=lambda params: endpoint.close('the agent began a new session'))
        endpoint.start()
        try:
            hello = endpoint.handshake(self.hello_timeout, agent=DAEMON_AGENT)
        except NegotiatorError:
            endpoint.close('no hello from the agent')
            raise
        agent.log.info("Linked to the agent of guest %s (%s %s) on %s", agent.name, hello.get('agent'),
                       hello.get('version'), agent.path)
        return AgentLink(agent.name, endpoint, hello)

    # The job.

    def stop_taking_work(self) -> None:
        """Make no more links."""
        self._stopping = True

    def stop(self) -> None:
        """Close every link (the local clients were stopped before: their replies are out)."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
        for agent in agents:
            agent.dropped = True
            agent._close('the host daemon is stopping')
