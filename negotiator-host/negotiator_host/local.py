"""
The host daemon's local socket: where the host's own callers reach the guests through the daemon.

The daemon listens on a UNIX socket (``--socket PATH``, else ``$NEGOTIATOR_HOST_SOCKET``, else
:data:`~negotiator_host.local_socket.DEFAULT_SOCKET`: where the clients look for it too) with the same
line protocol as a channel; each client connection is one
:class:`~negotiator_common.endpoint.Endpoint` whose methods are a
:class:`~negotiator_host.proxy.ProxyService` (attach to a guest by ``hello``, then call it over
the daemon's shared connection). The rules of the socket:

- the daemon makes the socket's directory (0755) if it is missing, and the socket 0666: anyone
  may connect, and the daemon decides who may call which guest, from the kernel's word about the
  client (``SO_PEERCRED``: :class:`~negotiator_host.access.Caller`), never from what the client
  says;
- a socket file that nobody listens on (a daemon that died) is replaced; one that answers
  (another daemon) or a file that is not a socket is an error at start (:class:`LocalSocketError`);
- a uid other than root may hold :data:`MAX_CLIENTS_PER_UID` connections and all together :data:`MAX_CLIENTS`;
  one more gets an error line and is closed, so that one caller cannot use up the daemon's
  threads; each connection has its own bounds (requests in flight, line length: far lower for a
  caller that the policy lets use no guest), and whatever a client sends only ever reaches its
  own connection.

The server is a job of the main loop (:mod:`negotiator_host.mainloop`): it accepts on a thread of
its own, and stops in the order of :mod:`negotiator_common.stopping`: it stops accepting (the
socket file goes) and refuses new calls, then cancels its clients' calls (the daemon's links
send ``cancel`` to the guests), lets their replies go out (bounded in time) and closes the
connections. The links to the guests close after that (:mod:`negotiator_host.agents`).
"""

import os
import socket
import stat
import threading
from typing import TYPE_CHECKING, Callable, List, Optional

from negotiator_common.endpoint import DEFAULT_MAX_CONCURRENT, Endpoint, EndpointGroup
from negotiator_common.errors import ChannelError, LimitExceeded
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import DEFAULT_MAX_LINE_LENGTH, Response, encode_message
from negotiator_common.stopping import stop_serving
from negotiator_common.transport import Transport

from negotiator_host.agents import GuestAgents
from negotiator_host.mainloop import Job
from negotiator_host.proxy import ProxyService

if TYPE_CHECKING:  # annotations only
    from negotiator_host.access import Caller, CallerPolicy
    from negotiator_host.audit import AuditLog

__all__ = ('LocalServer', 'LocalClient', 'LocalSocketError',
           'open_local_socket', 'MAX_CLIENTS', 'MAX_CLIENTS_PER_UID', 'CLIENT_MAX_IN_FLIGHT', 'CLIENT_MAX_LINE_LENGTH',
           'OUTSIDER_MAX_IN_FLIGHT', 'OUTSIDER_MAX_LINE_LENGTH')

logger = get_logger(__name__)  # the library never prints through logging's last resort

DIRECTORY_MODE = 0o755
SOCKET_MODE = 0o666

MAX_CLIENTS = 256
"""Local connections that the daemon holds at once, for all callers together."""

MAX_CLIENTS_PER_UID = 32
"""
Local connections that one uid other than root may hold at once. Root is bounded only by
:data:`MAX_CLIENTS`: it may stop the daemon anyway, and its batch jobs (32 calls at once from
one script) must not be refused by a bound that exists to keep users apart.
"""

CLIENT_MAX_IN_FLIGHT = 2 * DEFAULT_MAX_CONCURRENT
"""Requests that one local connection may have in flight (waiting in a guest's queue included)."""

CLIENT_MAX_LINE_LENGTH = DEFAULT_MAX_LINE_LENGTH
"""The longest line the daemon reads from a local client (a guest's own bound may be lower)."""

OUTSIDER_MAX_LINE_LENGTH = 64 * 1024
"""
The longest line the daemon reads from a caller that its policy lets use no guest at all. Such a
caller may only ask the daemon's ``hello`` (and be refused the rest): without this bound, any
local user could make the daemon hold :data:`MAX_CLIENTS_PER_UID` lines of
:data:`CLIENT_MAX_LINE_LENGTH` bytes (512 MiB).
"""

OUTSIDER_MAX_IN_FLIGHT = 2
"""Requests in flight on the connection of a caller that may use no guest (see :data:`OUTSIDER_MAX_LINE_LENGTH`)."""

STOP_GRACE = 3.0
"""Seconds that stopping gives the guests to answer the local clients' cancelled calls (their kill grace is 2)."""

STOP_KILL_WAIT = 1.0
"""Seconds more for the replies that are late (see :func:`~negotiator_common.stopping.stop_serving`)."""


class LocalSocketError(ChannelError):
    """The local socket cannot be made: another daemon listens there, or the path is not a socket."""


def _clear_stale(path: str) -> None:
    """Remove a socket file at ``path`` that nobody listens on; refuse a live one, or any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LocalSocketError('%s exists and is not a socket: remove it or give --socket another path' % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("Replacing the stale socket %s (nobody listens on it)", path)
        os.unlink(path)
        return
    except OSError as exc:
        raise LocalSocketError('cannot tell whether another daemon listens on %s: %s' % (path, exc)) from exc
    finally:
        probe.close()
    raise LocalSocketError('another negotiator-host daemon listens on %s: stop it, or give --socket another path'
                           % path)


def open_local_socket(path: str) -> socket.socket:
    """The daemon's listening socket at ``path``, made by the rules of this module's documentation."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, DIRECTORY_MODE)
            os.chmod(directory, DIRECTORY_MODE)  # whatever the umask
        except OSError as exc:
            raise LocalSocketError('cannot make the directory of the socket %s: %s' % (path, exc)) from exc
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise LocalSocketError('cannot listen on %s: %s' % (path, exc)) from exc
    return sock


class LocalClient(object):
    """One local connection: the ``caller`` (from ``SO_PEERCRED``), its ``endpoint`` and ``proxy``."""

    def __init__(self, caller: 'Caller', endpoint: Endpoint, proxy: ProxyService) -> None:
        self.caller = caller
        self.endpoint = endpoint
        self.proxy = proxy


def _caller_from_socket(sock: socket.socket) -> 'Caller':
    from negotiator_host.access import Caller  # the daemon's: imported when it serves

    return Caller.from_socket(sock)


class LocalServer(Job):
    """
    Serve local clients on the UNIX socket ``path`` (see the module's documentation).

    :param agents: the guests the daemon serves.
    :param policy: which callers may use which guests.
    :param audit: where every forwarded call and refusal is written.
    :param caller_of: who is at the other end of a connection (:meth:`Caller.from_socket`; tests
                      give their own).
    """

    def __init__(self, path: str, agents: GuestAgents, policy: 'CallerPolicy', audit: 'AuditLog',
                 caller_of: Optional[Callable[[socket.socket], 'Caller']] = None) -> None:
        self.path = path
        self.agents = agents
        self.policy = policy
        self.audit = audit
        self.caller_of = caller_of or _caller_from_socket
        self.endpoints = EndpointGroup()  # every client's connection, until its last reply is out
        self._clients: List[LocalClient] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._inode: Optional[int] = None

    def open(self) -> None:
        """Make the socket (before the main loop runs: an error here stops the daemon at start)."""
        self._sock = open_local_socket(self.path)
        self._inode = os.stat(self.path).st_ino
        logger.info("Serving local clients on %s", self.path)

    @property
    def clients(self) -> List[LocalClient]:
        """The clients connected now (a copy)."""
        with self._lock:
            return list(self._clients)

    # The job.

    def start(self) -> None:
        """Accept clients on a thread of their own."""
        if self._sock is None:
            self.open()
        thread = threading.Thread(target=self._accept_all, name='negotiator-local-accept')
        thread.daemon = True
        thread.start()

    def stop_taking_work(self) -> None:
        """Accept no more clients (the socket file goes) and refuse new calls."""
        self._stopping.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            sock.close()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Remove the socket file, unless another daemon has made its own there since."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def stop(self) -> None:
        """Cancel the clients' calls in the guests, let the replies go out (bounded), close; then the audit log."""
        stop_serving([client.endpoint for client in self.clients], self.endpoints, 'the host daemon is stopping',
                     STOP_GRACE, STOP_KILL_WAIT)
        self.audit.close()

    # Clients.

    def _accept_all(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                logger.warning("Accepting a local client failed", exc_info=True)
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Serve ``conn`` on a thread of its own, unless its caller is unknown or over the bounds."""
        try:
            caller = self.caller_of(conn)
        except OSError as exc:
            logger.warning("Refusing a local client whose credentials cannot be read: %s", exc)
            conn.close()
            return
        refusal = self._over_bounds(caller)
        if refusal is not None:
            logger.warning("Refusing a local connection of %s: %s", caller.describe(), refusal)
            self._refuse(conn, refusal)
            return
        client = self._client(caller, conn)
        thread = threading.Thread(target=self._serve, args=(client,), name='negotiator-local-%d' % caller.pid)
        thread.daemon = True
        thread.start()

    def _over_bounds(self, caller: 'Caller') -> Optional[str]:
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                return 'the host daemon holds %d local connections already' % MAX_CLIENTS
            if caller.uid != 0 and sum(client.caller.uid == caller.uid
                                       for client in self._clients) >= MAX_CLIENTS_PER_UID:
                return 'uid %d holds %d connections to the host daemon already' % (caller.uid, MAX_CLIENTS_PER_UID)
        return None

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        """One error line (best effort: the client may not read), then the connection closes."""
        try:
            conn.setblocking(False)
            conn.send(encode_message(Response(None, error=LimitExceeded(reason))))
        except OSError:
            pass
        conn.close()

    def _client(self, caller: 'Caller', conn: socket.socket) -> LocalClient:
        if self.policy.allows_any(caller):
            max_in_flight, max_line_length = CLIENT_MAX_IN_FLIGHT, CLIENT_MAX_LINE_LENGTH
        else:  # it will be refused every guest: it gets no more than that takes
            max_in_flight, max_line_length = OUTSIDER_MAX_IN_FLIGHT, OUTSIDER_MAX_LINE_LENGTH
        proxy = ProxyService(caller, self.agents, self.policy, self.audit, self._stopping, max_in_flight,
                             max_line_length)
        endpoint = Endpoint(Transport.from_socket(conn), proxy.dispatcher(), name='local %s pid %d' % (
            caller.user, caller.pid), max_line_length=max_line_length, max_concurrent=max_in_flight)
        proxy.bind(endpoint)
        client = LocalClient(caller, endpoint, proxy)
        with self._lock:
            self._clients.append(client)
        self.endpoints.add(endpoint)
        if self._stopping.is_set():  # stop() may have taken its list of clients already
            endpoint.close('the host daemon is stopping')
        return client

    def _serve(self, client: LocalClient) -> None:
        try:
            client.endpoint.run()
        finally:
            client.endpoint.close('the reader ended')
            client.proxy.close()
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
