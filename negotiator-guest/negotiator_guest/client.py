"""
The guest's Python API for asking the host: :class:`HostClient`.

The host daemon (``negotiator-host --daemon``) serves the port ``negotiator-guest-to-host.0``.
A guest-side client opens that port for the length of one call (or of a ``with`` block), so
that other programs in the guest can use it in between: a port opens once, and a second
``open()`` fails with EBUSY, which is retried for a moment (:data:`BUSY_TIMEOUT`) before
:class:`~negotiator_common.errors.ChannelBusy` is raised. Every connection starts with the
resynchronising handshake, so bytes left behind by an earlier client are dropped.

Example::

    from negotiator_guest import HostClient

    with HostClient(timeout=30) as host:
        for command in host.list_commands():
            print(command.name)
        result = host.execute('backup-done', 'web01', input=b'report')
        print(result.exit_status, result.stdout.decode())
"""

import os
import time
from typing import Any, BinaryIO, List, Optional

from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.lazylog import get_logger
from negotiator_common.callstreams import InputSource
from negotiator_common.client import DEFAULT_MAX_OUTPUT, AgentClient, CommandDescription, ExecuteResult
from negotiator_common.deadline import Deadline
from negotiator_common.endpoint import DEFAULT_TIMEOUT, Endpoint
from negotiator_common.errors import ChannelBusy, ConnectionClosed
from negotiator_common.transport import Transport

from negotiator_guest.port import find_port, host_connected, open_port

__all__ = ('HostClient', 'BUSY_TIMEOUT', 'CONNECT_TIMEOUT', 'RETRY_INTERVAL')

logger = get_logger(__name__)  # the library never prints through logging's last resort

BUSY_TIMEOUT = 2.0
"""Seconds to keep retrying a port that another process holds (EBUSY)."""

CONNECT_TIMEOUT = 1.0
"""Seconds to wait for the host daemon to be connected to the port's other end."""

RETRY_INTERVAL = 0.05
"""Seconds between attempts while the port is busy or the host is not connected."""


class HostClient(object):
    """
    Calls to the host daemon over ``negotiator-guest-to-host.0``.

    Each method opens the port, calls, and closes it again; inside ``with HostClient() as
    host:`` one connection serves every call of the block.

    :param character_device: the port's path (None: find it by channel name).
    :param timeout: the default bound, in seconds, of one call including connecting (None: no bound).
    :param busy_timeout: how long an EBUSY port is retried.
    :param root: where ``/dev`` and ``/sys`` are looked up (tests use a fake tree).
    """

    def __init__(self, character_device: Optional[str] = None, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 busy_timeout: float = BUSY_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 root: str = '/') -> None:
        self.character_device = character_device
        self.timeout = timeout
        self.busy_timeout = busy_timeout
        self.connect_timeout = connect_timeout
        self.root = root
        self.hello: dict = {}
        self._client: Optional[AgentClient] = None

    # Connecting.

    def _open(self, deadline: Deadline) -> int:
        path = self.character_device or find_port((GUEST_TO_HOST_CHANNEL,), self.root)
        give_up = deadline.capped(self.busy_timeout)
        while True:
            try:
                fd = open_port(path)
                break
            except ChannelBusy:
                if give_up.expired:
                    raise
                logger.debug("%s is busy; retrying", path)
                time.sleep(RETRY_INTERVAL)
        try:
            give_up = deadline.capped(self.connect_timeout)
            while not host_connected(fd):
                if give_up.expired:
                    raise ConnectionClosed(
                        'the host side of %s is not connected: is negotiator-host --daemon running on the '
                        'host, and does it know this guest?' % path, {'path': path})
                time.sleep(RETRY_INTERVAL)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def connect(self) -> AgentClient:
        """Open the port and shake hands; return the connected :class:`AgentClient`."""
        if self._client is not None:
            return self._client
        deadline = Deadline(self.timeout)
        endpoint = Endpoint(Transport(self._open(deadline)), name='host').start()
        try:
            self.hello = endpoint.handshake(deadline.remaining(), agent='negotiator-guest')
        except BaseException:
            endpoint.close()
            raise
        self._client = AgentClient(endpoint, self.hello)
        return self._client

    def close(self) -> None:
        """Release the port."""
        client, self._client = self._client, None
        if client is not None:
            client.endpoint.close()

    def __enter__(self) -> 'HostClient':
        self.connect()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _call(self, method: str, *args: Any, **kw: Any) -> Any:
        if self._client is not None:
            return getattr(self._client, method)(*args, **kw)
        deadline = Deadline(kw['timeout'])
        client = self.connect()
        try:
            left = deadline.remaining()
            if left is not None:
                # Connecting took part of the caller's time (a timeout of 0 would be refused, not timed out).
                kw['timeout'] = max(0.001, left)
            return getattr(client, method)(*args, **kw)
        finally:
            self.close()

    # The calls.

    def ping(self, timeout: Optional[float] = None) -> float:
        """The round-trip time of one ``ping`` to the host daemon, in seconds."""
        return self._call('ping', timeout=self._timeout(timeout))

    def list_commands(self, timeout: Optional[float] = None) -> List[CommandDescription]:
        """The commands that the host offers this guest."""
        return self._call('list_commands', timeout=self._timeout(timeout))

    def execute(self, command: str, *args: str, input: Optional[InputSource] = None, timeout: Optional[float] = None,
                check: bool = False, stdout: Optional[BinaryIO] = None,
                stderr: Optional[BinaryIO] = None, max_output: Optional[int] = DEFAULT_MAX_OUTPUT) -> ExecuteResult:
        """
        Run one of the host's commands; see :meth:`negotiator_common.client.AgentClient.execute`.

        ``input`` (bytes, a binary file object or an iterable of byte chunks) streams to the
        command's standard input as it reads it, when the host daemon announces streamed input.

        ``stdout``/``stderr`` (binary file objects) receive the output as it streams in;
        without them it is collected into the :class:`ExecuteResult`, at most ``max_output``
        bytes per stream (16 MiB by default; the truncation flags say when more was dropped).
        With ``check`` a non-zero exit raises :class:`~negotiator_common.errors.CommandFailed`.
        """
        return self._call('execute', command, *args, input=input, timeout=self._timeout(timeout), check=check,
                          stdout=stdout, stderr=stderr, max_output=max_output)

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout
