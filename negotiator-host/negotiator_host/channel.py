"""
The host's Python API: talk to the agent in one guest, or in many guests at once.

:class:`GuestChannel` reaches a guest's agent one of two ways, and then carries any number of
calls, from any number of threads, over that one connection:

- through the host daemon (``negotiator-host --daemon``), when it listens on its local socket
  (:mod:`negotiator_host.local_socket`) and serves that guest: the daemon holds the guest's
  channel and shares it between every caller on the host;
- directly, on the guest's ``negotiator-host-to-guest.0`` socket (found by
  :mod:`negotiator_host.discovery`, or given as a path), which takes one client at a time:
  when no daemon listens, when it does not serve that guest, or when the caller asks for it.

Either way the connection begins with ``hello`` and the calls, their results, their errors and
their streamed output are the same. Every wait is bounded, and one timeout covers the whole way
to a connection: the daemon's socket, its answer, the discovery, the direct connect and the
handshake.

>>> from negotiator_host import GuestChannel
>>> with GuestChannel('web-1') as guest:
...     print(guest.ping())
...     result = guest.execute('hostname')
...     print(result.exit_status, result.stdout)

:func:`map_guests` runs one function on many guests in parallel and returns, per guest,
the function's value or the exception it raised.
"""

import errno
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from negotiator_common.callstreams import InputSource
from negotiator_common.channels import HOST_TO_GUEST_CHANNELS
from negotiator_common.client import DEFAULT_MAX_OUTPUT, AgentClient, CommandDescription, ExecuteResult
from negotiator_common.deadline import Deadline
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    CallTimeout, ChannelBusy, ChannelNotFound, ConnectionClosed, GuestNotFound, InvalidRequest, NegotiatorError,
)
from negotiator_common.lazylog import get_logger
from negotiator_common.transport import Transport

from negotiator_host.local_socket import socket_path as daemon_socket_path

if TYPE_CHECKING:  # discovery is imported when a direct connection needs it: not through the daemon
    from negotiator_host.discovery import Guest, LibvirtPaths
    from negotiator_host.remote import SshBridge
    from negotiator_common.transfers import LocalFile, Progress
    from negotiator_common.preload import Preload

__all__ = ('GuestChannel', 'GuestOutcome', 'map_guests', 'daemon_guests', 'connect_socket', 'DEFAULT_TIMEOUT',
           'THROUGH_DAEMON', 'DIRECT', 'REMOTE')

DEFAULT_TIMEOUT = 10.0
"""Seconds that connecting and each call may take unless the caller says otherwise."""

THROUGH_DAEMON = 'daemon'
""":attr:`GuestChannel.via` of a connection through the host daemon."""

DIRECT = 'direct'
""":attr:`GuestChannel.via` of a connection to the guest's own channel socket."""

REMOTE = 'ssh'
""":attr:`GuestChannel.via` of a connection to a guest on another hypervisor, over ssh (``hypervisor``)."""

logger = get_logger(__name__)  # lazy: a quick CLI call never imports logging


def _remaining(deadline: Deadline) -> Optional[float]:
    """The time left for the next step of a call (None: no limit); :class:`CallTimeout` if none is left."""
    if deadline.expired:
        raise CallTimeout('the timeout passed before the call could be made')
    return deadline.remaining()


def connect_socket(path: str, timeout: Optional[float] = DEFAULT_TIMEOUT, name: str = '') -> socket.socket:
    """
    Connect to a guest's channel socket within ``timeout`` seconds.

    A libvirt channel socket takes one client at a time; while another client holds it the
    kernel's backlog fills and a connect would wait: here it is retried until the deadline,
    then :class:`ChannelBusy` is raised. A missing or dead socket raises
    :class:`ChannelNotFound`.
    """
    label = name or path
    deadline = Deadline(timeout)
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except (BlockingIOError, InterruptedError) as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EINTR):
                raise
        except FileNotFoundError as exc:
            sock.close()
            raise ChannelNotFound('the channel socket of %s does not exist (%s): is the guest running?'
                                  % (label, path)) from exc
        except ConnectionRefusedError as exc:
            sock.close()
            raise ChannelNotFound('nothing listens on the channel socket of %s (%s): the guest stopped?'
                                  % (label, path)) from exc
        except PermissionError as exc:
            sock.close()
            raise ChannelNotFound('no permission to open %s: run as root (or as the owner of the socket)'
                                  % path) from exc
        except OSError as exc:
            sock.close()
            raise ChannelNotFound('cannot connect to the channel socket of %s (%s): %s' % (label, path, exc)) from exc
        if deadline.expires_within(delay):
            raise ChannelBusy('the channel of %s is busy: another client holds it (the socket serves one client at'
                              ' a time); try again later' % label)
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _daemon_connection(path: str, deadline: Deadline) -> Optional[socket.socket]:
    """
    A connection to the host daemon's socket at ``path``, or None when no daemon is there (the
    file is missing, nobody listens on it, or this user may not open it): a single connect, so
    that a call without a daemon pays one system call for looking.
    """
    try:
        return connect_socket(path, _remaining(deadline), 'the host daemon')
    except ChannelBusy as exc:
        raise ChannelBusy('the host daemon at %s accepted no connection in time (too many at once?); try again'
                          ' later' % path) from exc
    except ChannelNotFound:
        return None


def _open(sock: socket.socket, deadline: Deadline, name: str,
          params: Dict[str, Any]) -> Tuple[Endpoint, Dict[str, Any]]:
    """An endpoint on ``sock``, started, and the peer's ``hello`` result (with ``params`` sent); closed on failure."""
    endpoint = Endpoint(Transport.from_socket(sock), name=name)
    endpoint.start()
    try:
        return endpoint, endpoint.handshake(_remaining(deadline), agent='negotiator-host', params=params)
    except CallTimeout:
        endpoint.close('no hello reply')
        raise
    except NegotiatorError:
        endpoint.close('handshake failed')
        raise


def daemon_guests(socket: Optional[str] = None,
                  timeout: Optional[float] = DEFAULT_TIMEOUT) -> Optional[Dict[str, bool]]:
    """
    The guests that the host daemon serves to this caller, each with whether its agent is
    connected to the daemon now; None when no daemon listens on its socket (``socket``, else
    ``$NEGOTIATOR_HOST_SOCKET``, else the default). One ``hello`` without a guest: the daemon
    lists only the guests that this user may use.
    """
    path = daemon_socket_path(socket)
    deadline = Deadline(timeout)
    sock = _daemon_connection(path, deadline)
    if sock is None:
        logger.info("No host daemon listens at %s", path)
        return None
    endpoint, info = _open(sock, deadline, 'host-daemon', {})
    endpoint.close()
    listed = info.get('guests')
    if not isinstance(listed, list):
        raise InvalidRequest('the host daemon at %s answered hello without its list of guests' % path)
    served = {entry['name']: entry.get('connected') is True for entry in listed
              if isinstance(entry, dict) and isinstance(entry.get('name'), str)}
    logger.info("The host daemon at %s serves %d guests to this user", path, len(served))
    return served


class GuestChannel(object):
    """
    One guest's agent, over one connection shared by every thread.

    :param name: the guest's libvirt name (its socket is found by discovery), or
    :param socket_path: the channel's UNIX socket (no discovery at all; alone, without a name,
                        it is always a direct connection).
    :param uri: the libvirt URI (default: ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``).
    :param timeout: seconds for connecting and for each call unless a call says otherwise
                    (None: no bound).
    :param channel_names: the channels to look for, in order of preference.
    :param paths: libvirt's directories (tests use a fake tree).
    :param direct: connect to the guest's channel socket even when the host daemon serves it.
    :param socket: the host daemon's local socket (default: ``$NEGOTIATOR_HOST_SOCKET``, else
                   ``/run/negotiator/host.sock``; see :mod:`negotiator_host.local_socket`).
    :param hypervisor: ``[USER@]HOST``: the guest runs on that hypervisor, reached with
                       ``ssh HOST negotiator-host --bridge NAME`` (:mod:`negotiator_host.remote`;
                       the options above then apply there, not here).
    :param ssh: the ssh command and its options, as an argv list (``['ssh', '-p', '2222']``).

    A channel with a guest name goes through the host daemon when the daemon listens on its
    socket and serves that guest, and connects directly otherwise: when the socket is missing
    or nobody listens on it, or when the daemon answers that it does not serve the guest
    (:class:`ChannelNotFound`, or :class:`GuestNotFound`). A refusal by the daemon
    (:class:`CommandNotAllowed`: this user may not use that guest) is raised, never a reason to
    go around the daemon; so are its other errors. One timeout covers both ways.
    :attr:`via` says which way the connection went, and :meth:`hello` returns what the agent
    said, with ``"via": "negotiator-host-daemon"`` added by the daemon.

    The connection opens at the first call (or :meth:`connect`) and closes with
    :meth:`close` or at the end of a ``with`` block. Many threads may call at once: calls are
    routed by id, so a slow command never delays a ``ping``. If the connection closes under a
    call (the guest stopped, the agent restarted), the call raises :class:`ConnectionClosed`
    and the next call connects again, the same way or the other.
    """

    def __init__(self, name: Optional[str] = None, socket_path: Optional[str] = None, uri: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT,
                 channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS,
                 paths: 'Optional[LibvirtPaths]' = None, direct: bool = False, socket: Optional[str] = None,
                 hypervisor: Optional[str] = None, ssh: Sequence[str] = ('ssh',)) -> None:
        if not name and not socket_path:
            raise ValueError('GuestChannel needs a guest name or a socket path')
        if hypervisor is not None:
            from negotiator_host.remote import check_guest_name, check_hypervisor
            check_hypervisor(hypervisor)
            check_guest_name(name or '')
        self.name = name or socket_path or ''
        self.socket_path = socket_path
        self.uri = uri
        self.timeout = timeout
        self.channel_names = tuple(channel_names)
        self.paths = paths
        self.direct = direct or not name
        self.daemon_socket = daemon_socket_path(socket)
        self.hypervisor = hypervisor
        self.ssh = tuple(ssh)
        self.via: Optional[str] = None
        """How the connection went: :data:`THROUGH_DAEMON` or :data:`DIRECT` (None before the first)."""
        self.agent_info: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self._endpoint: Optional[Endpoint] = None
        self._client: Optional[AgentClient] = None
        self._bridge: 'Optional[SshBridge]' = None

    def __repr__(self) -> str:
        return 'GuestChannel(%r)' % self.name

    # Lifecycle.

    def connect(self, timeout: Optional[float] = None) -> 'GuestChannel':
        """Connect (through the daemon or directly) and handshake (a no-op when connected); return self."""
        self._connected_client(self._call_timeout(timeout))
        return self

    def _connected_client(self, timeout: Optional[float]) -> AgentClient:
        with self._lock:
            if self._client is not None and self._endpoint is not None and not self._endpoint.closed:
                return self._client
            deadline = Deadline(timeout)
            endpoint: Optional[Endpoint] = None
            reason = 'a direct connection was asked for'
            if self.hypervisor is not None:
                endpoint = self._connect_over_ssh(self.hypervisor, deadline)
            elif not self.direct:
                endpoint, reason = self._attach_through_daemon(deadline)
            if endpoint is None:
                endpoint = self._connect_directly(deadline, reason)
            self._endpoint, self._client = endpoint, AgentClient(endpoint, self.agent_info)
            return self._client

    def _attach_through_daemon(self, deadline: Deadline) -> Tuple[Optional[Endpoint], str]:
        """
        The connection through the host daemon, attached to this guest; or None and why not,
        when there is no daemon or it does not serve this guest (then a direct connection is
        the way, within what is left of ``deadline``).
        """
        sock = _daemon_connection(self.daemon_socket, deadline)
        if sock is None:
            return None, 'no host daemon listens at %s' % self.daemon_socket
        try:
            endpoint, info = _open(sock, deadline, self.name, {'guest': self.name})
        except (ChannelNotFound, GuestNotFound):
            return None, 'the host daemon at %s does not serve it' % self.daemon_socket
        except CallTimeout as exc:
            raise CallTimeout('the host daemon at %s did not answer about %s within %s seconds'
                              % (self.daemon_socket, self.name, deadline.timeout)) from exc
        except ConnectionClosed as exc:
            raise ConnectionClosed('the host daemon at %s closed the connection before it answered about %s (%s):'
                                   ' it refuses a user connections beyond its bound per user, and any connection'
                                   ' while it stops; its log says which'
                                   % (self.daemon_socket, self.name, exc)) from exc
        logger.info("Talking to %s through the host daemon at %s", self.name, self.daemon_socket)
        self.agent_info, self.via = info, THROUGH_DAEMON
        return endpoint, ''

    def _connect_over_ssh(self, hypervisor: str, deadline: Deadline) -> Endpoint:
        """
        The connection through ``ssh HYPERVISOR negotiator-host --bridge NAME``
        (:mod:`negotiator_host.remote`), which attaches to the guest as a local caller of the
        daemon there would; an early end is explained by ssh's status and its standard error.
        """
        from negotiator_host.remote import SshBridge
        self._close_bridge()
        bridge = SshBridge(hypervisor, self.name, self.ssh)
        sock = bridge.start()
        self._bridge = bridge
        try:
            endpoint, info = _open(sock, deadline, self.name, {'guest': self.name})
        except NegotiatorError as exc:
            failure = bridge.failure(exc)
            self._close_bridge()
            raise failure from exc
        logger.info("Talking to %s on %s over ssh (%s)", self.name, hypervisor, info.get('via') or 'direct there')
        self.agent_info, self.via = info, REMOTE
        return endpoint

    def _close_bridge(self) -> None:
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.close()

    def _connect_directly(self, deadline: Deadline, reason: str) -> Endpoint:
        """The connection to the guest's own channel socket (found by discovery unless given)."""
        path = self.socket_path
        if path is None:
            from negotiator_host.discovery import find_guest
            guest = find_guest(self.name, uri=self.uri, paths=self.paths, timeout=_remaining(deadline))
            path = guest.require_socket(self.channel_names)
        sock = connect_socket(path, _remaining(deadline), self.name)
        try:
            endpoint, info = _open(sock, deadline, self.name, {})
        except CallTimeout as exc:
            raise CallTimeout('the agent in %s did not answer within %s seconds: is negotiator-guest --daemon'
                              ' running in the guest? (another client may also hold the channel)'
                              % (self.name, deadline.timeout)) from exc
        logger.info("Talking to %s directly at %s (%s)", self.name, path, reason)
        self.agent_info, self.via = info, DIRECT
        return endpoint

    def close(self) -> None:
        """Close the connection (calls in flight fail with :class:`ConnectionClosed`)."""
        with self._lock:
            endpoint, self._endpoint, self._client = self._endpoint, None, None
        if endpoint is not None:
            endpoint.close()
        with self._lock:
            self._close_bridge()

    def __enter__(self) -> 'GuestChannel':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Calls. ``timeout=None`` means the channel's timeout.

    def _call_timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    def hello(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Connect if needed and return what the agent said in ``hello`` (``agent``, ``version``,
        ``capabilities``, ``limits``)."""
        self._connected_client(self._call_timeout(timeout))
        return dict(self.agent_info)

    def ping(self, timeout: Optional[float] = None) -> float:
        """The round-trip time of one ``ping``, in seconds (the connection is made first, untimed)."""
        timeout = self._call_timeout(timeout)
        deadline = Deadline(timeout)
        client = self._connected_client(timeout)
        return client.ping(timeout=_remaining(deadline))

    def list_commands(self, timeout: Optional[float] = None) -> List[CommandDescription]:
        """The commands that the guest's agent offers (each with ``name``, ``builtin``, ``description``)."""
        timeout = self._call_timeout(timeout)
        deadline = Deadline(timeout)
        client = self._connected_client(timeout)
        return client.list_commands(timeout=_remaining(deadline))

    def execute(self, command: str, *args: str, input: Optional[InputSource] = None, timeout: Optional[float] = None,
                check: bool = False, stdout: Optional[BinaryIO] = None,
                stderr: Optional[BinaryIO] = None, max_output: Optional[int] = DEFAULT_MAX_OUTPUT) -> ExecuteResult:
        """
        Run ``command`` with ``args`` in the guest and return an :class:`ExecuteResult`
        (``exit_status``, None when a signal ended the command: see ``signal``; ``stdout``,
        ``stderr`` as bytes; ``duration``; the truncation flags and ``output_abandoned``).

        ``input`` is the command's standard input: bytes, a binary file object (read until its
        end) or an iterable of byte chunks; beyond 64 KiB, or from a file or an iterable, it
        streams as the command reads it, of any length, with bounded memory on both sides (an
        agent older than streamed input takes at most its ``max_stdin``, else
        :class:`UnsendableRequest`). With ``stdout``/``stderr`` binary file objects the output
        is written there as it arrives instead of being collected, within a window of credit,
        so that a slow file slows this command only, never the other calls; if writing to them
        fails, the connection is closed (the guest cancels the command) and the call raises
        that error. Collected output keeps at most ``max_output`` bytes per stream
        (16 MiB by default, :data:`~negotiator_common.client.DEFAULT_MAX_OUTPUT`; None for no
        bound, at your own risk), and ``stdout_truncated``/``stderr_truncated`` say when more
        was dropped, so a guest cannot make the host hold more. ``timeout`` bounds the whole
        call (None: the channel's; the guest kills the command a little earlier). With
        ``check``, a non-zero exit status raises :class:`CommandFailed`. A request over the
        limits the agent announced (input, arguments, timeout, line length) or an argument
        that is not valid UTF-8 raises :class:`UnsendableRequest` before anything is sent; a
        reply out of the spec (an exit status outside 0 to 255, a duration that is not a
        number) raises :class:`~negotiator_common.errors.InvalidRequest`.

        >>> GuestChannel('web-1').execute('cat', input=b'hello').stdout
        b'hello'
        """
        timeout = self._call_timeout(timeout)
        deadline = Deadline(timeout)
        client = self._connected_client(timeout)
        return client.execute(command, *args, input=input, timeout=_remaining(deadline), check=check,
                              stdout=stdout, stderr=stderr, max_output=max_output)

    def push(self, source: 'LocalFile', target: str, recursive: bool = False, mode: Optional[int] = None,
             owner: Optional[str] = None, progress: Optional['Progress'] = None) -> Dict[str, Any]:
        """
        Copy ``source`` (a local path, or a binary file object) to ``target`` in the guest:
        atomically, checked by CRC-32 end to end, with the source file's mode (or ``mode``)
        and, when asked, ``owner`` (``USER`` or ``USER:GROUP``); a directory with ``recursive``
        (tree, modes and symlinks). The guest's owner must have turned file access on
        (``negotiator-guest --daemon --allow-files``), else
        :class:`~negotiator_common.errors.CommandNotAllowed`. The transfer has no timeout (the
        connection is made within the channel's); ``progress(done, total)`` follows it. See
        :meth:`negotiator_common.client.AgentClient.push` for the details and the errors.

        >>> GuestChannel('web-1').push('./app.conf', '/etc/app/')['path']
        '/etc/app/app.conf'
        """
        client = self._connected_client(self.timeout)
        return client.push(source, target, recursive=recursive, mode=mode, owner=owner, progress=progress)

    def pull(self, source: str, target: 'LocalFile', recursive: bool = False,
             progress: Optional['Progress'] = None, max_size: Optional[int] = None) -> Dict[str, Any]:
        """
        Copy ``source`` in the guest to ``target`` (a local path, written atomically, or a binary
        file object), checked by CRC-32; a directory with ``recursive``; at most ``max_size``
        bytes. See :meth:`negotiator_common.client.AgentClient.pull`.
        """
        client = self._connected_client(self.timeout)
        return client.pull(source, target, recursive=recursive, progress=progress, max_size=max_size)


    def exec(self, argv: Sequence[str], input: Optional[InputSource] = None, timeout: Optional[float] = None,
             check: bool = False, stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None,
             cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None,
             max_output: Optional[int] = DEFAULT_MAX_OUTPUT, warm: bool = False,
             preload: 'Optional[Preload]' = None) -> ExecuteResult:
        """
        Run the program ``argv`` (a list; no shell is added: ``['/bin/sh', '-c', SCRIPT]`` is
        the caller's choice) in the guest, in the directory ``cwd`` (default ``/``) with
        ``env`` added to the agent's clean environment, and return an :class:`ExecuteResult`.
        ``input``, ``timeout``, ``check``, ``stdout``, ``stderr`` and ``max_output`` work as
        in :meth:`execute`. The guest's agent runs it only when its owner started it with
        ``negotiator-guest --daemon --allow-exec``; otherwise (or for an agent older than
        ``exec``) the call raises :class:`~negotiator_common.errors.CommandNotAllowed`, which
        names the switch (exit status 77 in the CLIs).

        With ``warm``, ``argv`` is a Python interpreter alone and ``input`` its program: an
        agent that offers it (``warm-python`` in its ``hello``) runs the program in a process
        forked from that interpreter with its standard library already imported, which saves
        seconds per program in an emulated guest (``docs/protocol.rst``, "Warm Python");
        otherwise the interpreter starts as usual. ``preload``
        (:class:`~negotiator_common.preload.Preload`) adds modules that such a warm Python imports
        from a zip archive before it forks the program (the connection plugin for Ansible sends a
        module's ``module_utils`` this way).

        >>> GuestChannel('web-1').exec(['/bin/sh', '-c', 'echo $0 | tr a-z A-Z', 'hi']).stdout
        b'HI\\n'
        """
        timeout = self._call_timeout(timeout)
        deadline = Deadline(timeout)
        client = self._connected_client(timeout)
        return client.exec(argv, input=input, timeout=_remaining(deadline), check=check, stdout=stdout,
                           stderr=stderr, cwd=cwd, env=env, max_output=max_output, warm=warm,
                           preload=preload)


class GuestOutcome(object):
    """
    What :func:`map_guests` got from one guest (``guest``, its name): ``result``, or ``error``
    (the exception, kept, never raised), and the call's ``duration`` in seconds.
    """

    __slots__ = ('guest', 'result', 'error', 'duration')

    def __init__(self, guest: str, result: Any = None, error: Optional[BaseException] = None,
                 duration: float = 0.0) -> None:
        self.guest = guest
        self.result = result
        self.error = error
        self.duration = duration

    @property
    def ok(self) -> bool:
        """Whether the function returned (rather than raised)."""
        return self.error is None

    def value(self) -> Any:
        """The result, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.result

    def __repr__(self) -> str:
        detail = 'result=%r' % (self.result,) if self.ok else 'error=%r' % (self.error,)
        return 'GuestOutcome(%r, %s)' % (self.guest, detail)


def map_guests(function: Callable[[GuestChannel], Any], guests: "Iterable[Union[str, Guest, GuestChannel]]",
               max_workers: int = 16, uri: Optional[str] = None, timeout: Optional[float] = DEFAULT_TIMEOUT,
               paths: 'Optional[LibvirtPaths]' = None,
               channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS, direct: bool = False,
               socket: Optional[str] = None, hypervisor: Optional[str] = None,
               ssh: Sequence[str] = ('ssh',)) -> List[GuestOutcome]:
    """
    Call ``function(channel)`` for every guest in parallel; one :class:`GuestOutcome` per guest,
    in the order given.

    ``guests`` are names, :class:`~negotiator_host.discovery.Guest` objects (from
    :func:`~negotiator_host.discovery.list_guests`: no more discovery) or open channels.
    Each channel opened here goes through the host daemon or directly as :class:`GuestChannel`
    decides, with ``direct`` and ``socket`` as given (and the other keywords; with
    ``hypervisor``, every guest named is on that hypervisor, each reached over its own ssh).
    An exception in one guest never stops the others: it is kept in that guest's outcome.
    If the calling thread is interrupted (``KeyboardInterrupt``), the channels that this
    function opened are closed at once (each agent cancels its command) and the exception
    goes on, without waiting for the calls.

    >>> for outcome in map_guests(lambda g: g.execute('uptime').stdout, ['web-1', 'web-2']):
    ...     print(outcome.guest, outcome.result if outcome.ok else outcome.error)
    """
    items = list(guests)
    if not items:
        return []
    from concurrent.futures import ThreadPoolExecutor  # imported lazily: a one-guest call needs no pool

    calls = _GuestCalls(function, dict(uri=uri, timeout=timeout, paths=paths, channel_names=channel_names,
                                       direct=direct, socket=socket, hypervisor=hypervisor, ssh=ssh))
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(items))))
    try:
        outcomes = list(pool.map(calls.run, items))
    except BaseException:
        # Ctrl-C (or any exception) in the waiting thread: the calls are abandoned, their
        # connections closed at once, and the workers are not waited for.
        calls.interrupt()
        pool.shutdown(wait=False)
        raise
    pool.shutdown()
    return outcomes


class _GuestCalls(object):
    """The calls of one :func:`map_guests`: a channel per guest (unless given one), closed after its call."""

    def __init__(self, function: Callable[[GuestChannel], Any], options: Dict[str, Any]) -> None:
        self.function = function
        self.options = options
        """The keyword arguments of each :class:`GuestChannel` opened here."""
        self.channel_names: Sequence[str] = options['channel_names']
        self.interrupted = threading.Event()
        self.owned: List[GuestChannel] = []
        self.owned_lock = threading.Lock()

    def run(self, item: "Union[str, Guest, GuestChannel]") -> GuestOutcome:
        """Call the function for one guest; whatever it raises is kept in the outcome."""
        from negotiator_host.discovery import Guest
        started = time.monotonic()
        channel = self._channel_for(item)
        try:
            if self.interrupted.is_set():
                raise ConnectionClosed('the caller was interrupted before this guest was called')
            if isinstance(item, Guest) and channel.socket_path is None:
                item.require_socket(self.channel_names)
            return GuestOutcome(channel.name, result=self.function(channel), duration=time.monotonic() - started)
        except Exception as exc:
            return GuestOutcome(channel.name, error=exc, duration=time.monotonic() - started)
        finally:
            if channel is not item:
                channel.close()

    def interrupt(self) -> None:
        """
        Close every channel opened here, at once: each agent cancels its command, and the
        workers are freed instead of waiting for every remote call to run its course; guests
        not yet called are not called.
        """
        self.interrupted.set()
        with self.owned_lock:
            for channel in self.owned:
                channel.close()

    def _channel_for(self, item: "Union[str, Guest, GuestChannel]") -> GuestChannel:
        from negotiator_host.discovery import Guest
        if isinstance(item, GuestChannel):
            return item
        if isinstance(item, Guest):
            channel = GuestChannel(item.name, socket_path=item.socket_for(self.channel_names), **self.options)
        else:
            channel = GuestChannel(item, **self.options)
        with self.owned_lock:
            self.owned.append(channel)
        return channel
