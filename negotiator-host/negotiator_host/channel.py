"""
The host's Python API: talk to the agent in one guest, or in many guests at once.

:class:`GuestChannel` connects to a guest's ``negotiator-host-to-guest.0`` socket (found by
:mod:`negotiator_host.discovery`, or given as a path), resynchronises with ``hello`` and then
carries any number of calls, from any number of threads, over that one connection. Every
wait is bounded: the connect, the handshake and each call.

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
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Optional, Sequence, Union

from negotiator_common.channels import HOST_TO_GUEST_CHANNELS
from negotiator_common.client import DEFAULT_MAX_OUTPUT, AgentClient, CommandDescription, ExecuteResult
from negotiator_common.deadline import Deadline
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    CallTimeout, ChannelBusy, ChannelNotFound, ConnectionClosed, NegotiatorError,
)
from negotiator_common.lazylog import get_logger
from negotiator_common.transport import Transport

from negotiator_host.discovery import Guest, LibvirtPaths, find_guest

__all__ = ('GuestChannel', 'GuestOutcome', 'map_guests', 'connect_socket', 'DEFAULT_TIMEOUT')

DEFAULT_TIMEOUT = 10.0
"""Seconds that connecting and each call may take unless the caller says otherwise."""

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


class GuestChannel(object):
    """
    One guest's agent, over one connection shared by every thread.

    :param name: the guest's libvirt name (its socket is found by discovery), or
    :param socket_path: the channel's UNIX socket (no discovery at all).
    :param uri: the libvirt URI (default: ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``).
    :param timeout: seconds for connecting and for each call unless a call says otherwise
                    (None: no bound).
    :param channel_names: the channels to look for, in order of preference.
    :param paths: libvirt's directories (tests use a fake tree).

    The connection opens at the first call (or :meth:`connect`) and closes with
    :meth:`close` or at the end of a ``with`` block. Many threads may call at once: calls are
    routed by id, so a slow command never delays a ``ping``. If the connection closes under a
    call (the guest stopped, the agent restarted), the call raises :class:`ConnectionClosed`
    and the next call connects again.
    """

    def __init__(self, name: Optional[str] = None, socket_path: Optional[str] = None, uri: Optional[str] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT,
                 channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS,
                 paths: Optional[LibvirtPaths] = None) -> None:
        if not name and not socket_path:
            raise ValueError('GuestChannel needs a guest name or a socket path')
        self.name = name or socket_path or ''
        self.socket_path = socket_path
        self.uri = uri
        self.timeout = timeout
        self.channel_names = tuple(channel_names)
        self.paths = paths
        self.agent_info: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self._endpoint: Optional[Endpoint] = None
        self._client: Optional[AgentClient] = None

    def __repr__(self) -> str:
        return 'GuestChannel(%r)' % self.name

    # Lifecycle.

    def connect(self, timeout: Optional[float] = None) -> 'GuestChannel':
        """Find the socket, connect and handshake (a no-op when connected); return self."""
        self._connected_client(self._call_timeout(timeout))
        return self

    def _connected_client(self, timeout: Optional[float]) -> AgentClient:
        with self._lock:
            if self._client is not None and self._endpoint is not None and not self._endpoint.closed:
                return self._client
            deadline = Deadline(timeout)
            path = self.socket_path
            if path is None:
                guest: Guest = find_guest(self.name, uri=self.uri, paths=self.paths,
                                   timeout=_remaining(deadline))
                path = guest.require_socket(self.channel_names)
            sock = connect_socket(path, _remaining(deadline), self.name)
            endpoint = Endpoint(Transport.from_socket(sock), name=self.name)
            endpoint.start()
            try:
                self.agent_info = endpoint.handshake(_remaining(deadline), agent='negotiator-host')
            except CallTimeout as exc:
                endpoint.close('no hello reply')
                raise CallTimeout('the agent in %s did not answer within %s seconds: is negotiator-guest --daemon'
                                  ' running in the guest? (another client may also hold the channel)'
                                  % (self.name, timeout)) from exc
            except NegotiatorError:
                endpoint.close('handshake failed')
                raise
            self._endpoint, self._client = endpoint, AgentClient(endpoint, self.agent_info)
            return self._client

    def close(self) -> None:
        """Close the connection (calls in flight fail with :class:`ConnectionClosed`)."""
        with self._lock:
            endpoint, self._endpoint, self._client = self._endpoint, None, None
        if endpoint is not None:
            endpoint.close()

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

    def execute(self, command: str, *args: str, input: Optional[bytes] = None, timeout: Optional[float] = None,
                check: bool = False, stdout: Optional[BinaryIO] = None,
                stderr: Optional[BinaryIO] = None, max_output: Optional[int] = DEFAULT_MAX_OUTPUT) -> ExecuteResult:
        """
        Run ``command`` with ``args`` in the guest and return an :class:`ExecuteResult`
        (``exit_status``, None when a signal ended the command: see ``signal``; ``stdout``,
        ``stderr`` as bytes; ``duration``; the truncation flags and ``output_abandoned``).

        ``input`` (bytes) is the command's standard input. With ``stdout``/``stderr`` binary
        file objects the output is written there as it arrives instead of being collected; if
        writing to them fails, the connection is closed (the guest cancels the command) and the
        call raises that error. Collected output keeps at most ``max_output`` bytes per stream
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


def map_guests(function: Callable[[GuestChannel], Any], guests: Iterable[Union[str, Guest, GuestChannel]],
               max_workers: int = 16, uri: Optional[str] = None, timeout: Optional[float] = DEFAULT_TIMEOUT,
               paths: Optional[LibvirtPaths] = None,
               channel_names: Sequence[str] = HOST_TO_GUEST_CHANNELS) -> List[GuestOutcome]:
    """
    Call ``function(channel)`` for every guest in parallel; one :class:`GuestOutcome` per guest,
    in the order given.

    ``guests`` are names, :class:`~negotiator_host.discovery.Guest` objects (from
    :func:`~negotiator_host.discovery.list_guests`: no more discovery) or open channels.
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

    calls = _GuestCalls(function, uri, timeout, paths, channel_names)
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

    def __init__(self, function: Callable[[GuestChannel], Any], uri: Optional[str], timeout: Optional[float],
                 paths: Optional[LibvirtPaths], channel_names: Sequence[str]) -> None:
        self.function = function
        self.uri = uri
        self.timeout = timeout
        self.paths = paths
        self.channel_names = channel_names
        self.interrupted = threading.Event()
        self.owned: List[GuestChannel] = []
        self.owned_lock = threading.Lock()

    def run(self, item: Union[str, Guest, GuestChannel]) -> GuestOutcome:
        """Call the function for one guest; whatever it raises is kept in the outcome."""
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

    def _channel_for(self, item: Union[str, Guest, GuestChannel]) -> GuestChannel:
        if isinstance(item, GuestChannel):
            return item
        if isinstance(item, Guest):
            channel = GuestChannel(item.name, socket_path=item.socket_for(self.channel_names), uri=self.uri,
                                   timeout=self.timeout, channel_names=self.channel_names, paths=self.paths)
        else:
            channel = GuestChannel(item, uri=self.uri, timeout=self.timeout, channel_names=self.channel_names,
                                   paths=self.paths)
        with self.owned_lock:
            self.owned.append(channel)
        return channel
