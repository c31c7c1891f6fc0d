"""
A bound on the commands that run at once across every peer, with a fair queue in front of it.

Each connection bounds its own requests in flight (the endpoint's ``max_concurrent``), but
a host serves many guests: 50 guests at a bound of 4, each request with 1 MiB of standard
input, held 506 MiB, 252 threads and 200 child processes in the host daemon. The host daemon
therefore shares one :class:`CommandSlots` between all its guests' connections:

- at most ``limit`` commands run at once;
- up to ``max_queued`` more wait, and a free slot goes to the peers in turn (round-robin by
  peer, first come first served within a peer), so a guest that queues many requests
  delays another guest's request by at most one of its own per turn;
- beyond that a request is refused at once with :class:`LimitExceeded`, which frees its
  memory and thread;
- a waiting request leaves the queue when its caller goes away (``cancelled``) or its time
  runs out, and its place and turn go to the next.

The wait happens on the request's handler thread, never on a connection's reading thread,
so a guest's pings are answered while its commands wait.

The host daemon's proxy (:mod:`negotiator_host.proxy`) keeps one more per guest, whose slots are
the guest's requests in flight and whose peers are the local callers' uids: many local callers
share one connection to a guest, in turn, without going over what the guest takes.
"""

import collections
import threading
from typing import Deque, Dict

from negotiator_common.deadline import Deadline
from negotiator_common.errors import ConnectionClosed, LimitExceeded
from negotiator_common.lazylog import get_logger

__all__ = ('CommandSlots', 'DEFAULT_MAX_COMMANDS', 'DEFAULT_MAX_QUEUED')

DEFAULT_MAX_COMMANDS = 8
"""Commands that the host daemon runs at once for all guests together."""

DEFAULT_MAX_QUEUED = 32
"""Requests that wait for a slot on the host daemon, for all guests together; more are refused."""

_log = get_logger(__name__)

CANCEL_CHECK_INTERVAL = 0.1
"""Seconds between two looks at a waiting request's cancellation (an Event cannot wait on two)."""


class _Waiter(object):
    __slots__ = ('granted',)

    def __init__(self) -> None:
        self.granted = threading.Event()


class CommandSlots(object):
    """
    At most ``limit`` holders at once; at most ``max_queued`` waiters, served round-robin by peer.

    Use :meth:`acquire` and then :meth:`release` exactly once, in a ``finally``. ``scope`` says in
    the errors what the slots are shared by.
    """

    def __init__(self, limit: int = DEFAULT_MAX_COMMANDS, max_queued: int = DEFAULT_MAX_QUEUED,
                 scope: str = 'on this host, for all guests together') -> None:
        if limit < 1 or max_queued < 0:
            raise ValueError('a command limit of at least 1 and a queue of at least 0 are needed')
        self.limit = limit
        self.max_queued = max_queued
        self.scope = scope
        self._lock = threading.Lock()
        self._running = 0
        self._queues: Dict[str, Deque[_Waiter]] = collections.OrderedDict()
        self._queued = 0

    @property
    def running(self) -> int:
        """Slots held now."""
        return self._running

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._queued

    def acquire(self, peer: str, deadline: Deadline, cancelled: threading.Event) -> None:
        """
        Take a slot for one of ``peer``'s commands, waiting in the queue if every slot is taken.

        :raises LimitExceeded: the queue is full (at once), or ``deadline`` passed while waiting.
        :raises ConnectionClosed: ``cancelled`` was set while waiting (the caller went away).
        """
        with self._lock:
            if self._running < self.limit and not self._queued:
                self._running += 1
                return
            if self._queued >= self.max_queued:
                raise LimitExceeded('busy: %d commands run and %d wait %s; try again later'
                                    % (self._running, self._queued, self.scope))
            waiter = _Waiter()
            self._queues.setdefault(peer, collections.deque()).append(waiter)
            self._queued += 1
            _log.info("A command of %s waits for a slot (%d run, %d wait)", peer or 'the peer', self._running,
                      self._queued)
        self._wait(peer, waiter, deadline, cancelled)

    def _wait(self, peer: str, waiter: _Waiter, deadline: Deadline, cancelled: threading.Event) -> None:
        while not waiter.granted.is_set():
            if cancelled.is_set():
                self._leave(peer, waiter, ConnectionClosed('the caller went away while its command waited for a slot'))
            if deadline.expired:
                self._leave(peer, waiter, LimitExceeded(
                    'no command slot became free in time: %d commands run at once %s' % (self.limit, self.scope)))
            remaining = deadline.remaining()
            waiter.granted.wait(CANCEL_CHECK_INTERVAL if remaining is None else min(remaining, CANCEL_CHECK_INTERVAL))

    def _leave(self, peer: str, waiter: _Waiter, error: Exception) -> None:
        """Take ``waiter`` out of the queue and raise ``error``, unless a slot was granted meanwhile."""
        with self._lock:
            if waiter.granted.is_set():
                return  # granted just now: the caller holds the slot and must release it
            queue = self._queues[peer]
            queue.remove(waiter)
            if not queue:
                del self._queues[peer]
            self._queued -= 1
        _log.info("A command of %s left the queue: %s", peer or 'the peer', error)
        raise error

    def release(self) -> None:
        """Give a slot back: to the next peer's first waiter in turn, else free it."""
        with self._lock:
            self._running -= 1
            self._grant()

    def resize(self, limit: int) -> None:
        """Change :attr:`limit` (a guest announced another bound); waiters take the slots that it frees."""
        if limit < 1:
            raise ValueError('a command limit of at least 1 is needed')
        with self._lock:
            self.limit = limit
            self._grant()

    def _grant(self) -> None:
        """Give the free slots to the waiters, a peer at a time in turn (called with the lock held)."""
        while self._queues and self._running < self.limit:
            peer, queue = next(iter(self._queues.items()))
            waiter = queue.popleft()
            del self._queues[peer]
            if queue:
                self._queues[peer] = queue  # back of the line: the other peers come first
            self._queued -= 1
            self._running += 1
            waiter.granted.set()  # under the lock: a waiter that is leaving sees it, or is not in the queue
