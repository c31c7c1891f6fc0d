"""
The host daemon's connections to its guests: one per guest, each served on a thread of its own.

:class:`GuestConnections` connects to a guest's channel socket as a client and serves the
guest's requests on that connection, with an :class:`~negotiator_common.endpoint.Endpoint` of
its own (its own bounds, a child logger named after the guest). It keeps at most one connection
per guest (a new one replaces the old), and forgets a connection as soon as it ends, whatever
ended it (the guest's QEMU exited, a read failed, the daemon dropped it), then says so through
``on_end``: the daemon decides when to connect again. A dead reader must never leave a guest cut
off until the daemon restarts.

The connections are a job of the main loop (:mod:`negotiator_host.mainloop`): when the daemon
stops, they stop in the order that both daemons share (:func:`~negotiator_common.stopping.stop_serving`):
the guests' requests are cancelled (their commands killed) while the connections stay open, so
that each guest gets the replies of its stopped commands; then the connections close.
"""

import threading
import time
from typing import Callable, Dict

from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint, EndpointGroup
from negotiator_common.lazylog import get_logger
from negotiator_common.stopping import stop_serving
from negotiator_common.transport import Transport

from negotiator_host.channel import connect_socket
from negotiator_host.mainloop import Job

__all__ = ('GuestConnection', 'GuestConnections', 'STOP_GRACE', 'STOP_KILL_WAIT')

STOP_GRACE = 5.0
"""Seconds that stopping gives the guests' running commands to end after SIGTERM."""

STOP_KILL_WAIT = 1.0
"""Seconds that stopping gives SIGKILLed commands to die and their replies to go out."""


class GuestConnection(object):
    """
    The daemon's connection to one guest's channel: ``name``, socket ``path``, ``endpoint``, and
    ``log``, the guest's own logger (a child of the logger ``log_name``, named after the guest).
    """

    def __init__(self, name: str, path: str, endpoint: Endpoint, log_name: str) -> None:
        self.name = name
        self.path = path
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.log = get_logger(log_name).getChild(name.replace('.', '_') or 'guest')

    @property
    def closed(self) -> bool:
        return self.endpoint.closed

    @property
    def lifetime(self) -> float:
        """Seconds since the connection was made."""
        return time.monotonic() - self.started


class GuestConnections(Job):
    """
    The live connections, by guest name (safe from any thread).

    :param dispatcher: the methods served to every guest.
    :param max_line_length: the longest line a guest may send.
    :param max_concurrent: requests that one guest may have running at once.
    :param on_end: called with each connection that ended, on its thread, once it is forgotten.
    :param log_name: the daemon's logger: each guest logs through a child of it named after the guest.
    """

    def __init__(self, dispatcher: Dispatcher, max_line_length: int, max_concurrent: int,
                 on_end: Callable[[GuestConnection], None], log_name: str) -> None:
        self.dispatcher = dispatcher
        self.max_line_length = max_line_length
        self.max_concurrent = max_concurrent
        self.on_end = on_end
        self.log_name = log_name
        self.endpoints = EndpointGroup()  # every guest's connection, until its last reply is out
        self._connections: Dict[str, GuestConnection] = {}
        self._lock = threading.Lock()

    def connect(self, name: str, path: str, timeout: float = 2.0) -> GuestConnection:
        """
        Connect to ``path`` (guest ``name``'s channel socket) and serve the guest on it, replacing
        any connection the guest had; raises :class:`~negotiator_common.errors.NegotiatorError`
        when the socket cannot be connected to.
        """
        sock = connect_socket(path, timeout, name)
        endpoint = Endpoint(Transport.from_socket(sock), self.dispatcher, name=name,
                            max_line_length=self.max_line_length, max_concurrent=self.max_concurrent)
        self.endpoints.add(endpoint)
        connection = GuestConnection(name, path, endpoint, self.log_name)
        with self._lock:
            old = self._connections.get(name)
            self._connections[name] = connection
        if old is not None:
            old.endpoint.close('replaced by a new connection')
        thread = threading.Thread(target=self._serve, args=(connection,), name='negotiator-host-%s' % name)
        thread.daemon = True
        thread.start()
        connection.log.info("Serving guest %s on %s", name, path)
        return connection

    def _serve(self, connection: GuestConnection) -> None:
        try:
            connection.endpoint.run()
        finally:
            # However the reader ended, the guest is forgotten, and the daemon hears of it.
            connection.endpoint.close('the reader ended')
            self._forget(connection)
            self.on_end(connection)

    def _forget(self, connection: GuestConnection) -> None:
        with self._lock:
            if self._connections.get(connection.name) is connection:
                del self._connections[connection.name]

    def drop(self, connection: GuestConnection, reason: str) -> None:
        """Close ``connection`` and forget it now (``on_end`` still follows, from its thread)."""
        connection.endpoint.close(reason)
        self._forget(connection)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._connections

    def snapshot(self) -> Dict[str, GuestConnection]:
        """The connections now, by guest name (a copy)."""
        with self._lock:
            return dict(self._connections)

    def stop(self) -> None:
        """Stop serving every guest: cancel, wait for the replies (bounded), close."""
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
        stop_serving([c.endpoint for c in connections], self.endpoints, 'the host daemon is stopping',
                     STOP_GRACE, STOP_KILL_WAIT)
