"""
``negotiator-host --bridge GUEST``: one guest's channel on standard input and output, so that
``ssh HYPERVISOR negotiator-host --bridge GUEST`` carries the protocol from another machine.

The bridge finds its way to the guest as :class:`~negotiator_host.channel.GuestChannel` does:
through the host daemon's shared connection when the daemon listens on its socket and serves
the guest (its policy decides whether this user may use it, and its audit log records every
call), or to the guest's own channel socket otherwise. Then it copies bytes both ways, and never
looks at them: the caller on the other end speaks the protocol of the daemon's local socket, and
so starts with ``hello`` and ``{"guest": NAME}`` (``docs/protocol.rst``, "Bridges"); an agent
reached directly takes that ``hello`` as any other.

To know whether the daemon serves the guest, the bridge makes that attach itself first (one
``hello``, answered before any byte of the caller is passed on): the caller's own ``hello``
then attaches again to the same guest, which the daemon allows. A daemon that does not serve
the guest sends the bridge to its channel; a daemon that refuses this user is final, as for
any call. What the bridge cannot reach it says on standard error, with the exit status of any
call (69 unavailable, 77 refused...), before it copies anything.
"""

import os
import socket
import threading
from typing import Optional, Tuple

from negotiator_common.deadline import Deadline
from negotiator_common.errors import CallTimeout, ChannelNotFound, ConnectionClosed, GuestNotFound, InvalidRequest
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import Request, Response, encode_message, parse_line

from negotiator_host.channel import DIRECT, THROUGH_DAEMON, connect_socket
from negotiator_host.local_socket import socket_path as daemon_socket_path

__all__ = ('open_guest_socket', 'run_bridge', 'BRIDGE_HELLO_ID', 'COPY_SIZE')

logger = get_logger(__name__)

BRIDGE_HELLO_ID = 'negotiator-bridge'
"""The id of the bridge's own ``hello`` to the daemon (the caller's ids are its own: nothing is shared)."""

COPY_SIZE = 256 * 1024
"""Bytes copied at a time, each way."""

_MAX_HELLO_REPLY = 1024 * 1024
"""The longest reply to the bridge's ``hello`` that it reads (a guest's ``hello`` is a few hundred bytes)."""


def _daemon_attach(path: str, name: str, deadline: Deadline) -> Tuple[Optional[socket.socket], bytes]:
    """
    A connection to the daemon at ``path``, attached to guest ``name``, and the bytes that came
    after the daemon's answer (none, from a daemon that keeps to the protocol); (None, b'')
    when no daemon listens or it does not serve the guest. Its refusal, or any other error, is raised.
    """
    try:
        sock = connect_socket(path, deadline.remaining(), 'the host daemon')
    except ChannelNotFound:
        return None, b''
    try:
        sock.setblocking(True)
        sock.sendall(encode_message(Request(BRIDGE_HELLO_ID, 'hello', {'guest': name})))
        line, rest = _read_line(sock, deadline)
        reply = parse_line(line)
        if not isinstance(reply, Response) or reply.id != BRIDGE_HELLO_ID:
            raise InvalidRequest('the host daemon at %s answered hello with %r' % (path, reply))
        if isinstance(reply.error, (ChannelNotFound, GuestNotFound)):
            sock.close()
            return None, b''
        if reply.error is not None:
            raise reply.error
        return sock, rest
    except BaseException:
        sock.close()
        raise


def _read_line(sock: socket.socket, deadline: Deadline) -> Tuple[bytes, bytes]:
    """One line from ``sock`` (without its newline) and what came after it, within ``deadline``."""
    received = b''
    while b'\n' not in received:
        if len(received) > _MAX_HELLO_REPLY:
            raise InvalidRequest('the host daemon answered hello with more than %d bytes' % _MAX_HELLO_REPLY)
        if deadline.expired:
            raise CallTimeout('the host daemon did not answer hello in time')
        sock.settimeout(deadline.remaining())
        try:
            chunk = sock.recv(COPY_SIZE)
        except socket.timeout:
            raise CallTimeout('the host daemon did not answer hello in time') from None
        if not chunk:
            raise ConnectionClosed('the host daemon closed the connection before it answered hello')
        received += chunk
    sock.settimeout(None)
    line, _, rest = received.partition(b'\n')
    return line, rest


def open_guest_socket(name: str, uri: Optional[str] = None, timeout: Optional[float] = None, direct: bool = False,
                      daemon_socket: Optional[str] = None) -> Tuple[socket.socket, bytes, str]:
    """
    A connected socket to guest ``name``'s agent, what it already sent (for the caller), and
    which way it goes (:data:`~negotiator_host.channel.THROUGH_DAEMON` or
    :data:`~negotiator_host.channel.DIRECT`), as the module's documentation says.
    """
    deadline = Deadline(timeout)
    if not direct:
        path = daemon_socket_path(daemon_socket)
        sock, rest = _daemon_attach(path, name, deadline)
        if sock is not None:
            logger.info("Bridging %s through the host daemon at %s", name, path)
            return sock, rest, THROUGH_DAEMON
    from negotiator_host.discovery import find_guest
    guest = find_guest(name, uri=uri, timeout=deadline.remaining())
    sock = connect_socket(guest.require_socket(), deadline.remaining(), name)
    sock.setblocking(True)
    logger.info("Bridging %s directly", name)
    return sock, b'', DIRECT


def _copy_in(source: int, sock: socket.socket) -> None:
    """The caller's bytes (standard input) to the guest's side until their end, then the writing half closes."""
    try:
        while True:
            chunk = os.read(source, COPY_SIZE)
            if not chunk:
                break
            sock.sendall(chunk)
    except OSError as exc:
        logger.debug("Bridge input ended: %s", exc)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _write_all(target: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view):]


def run_bridge(sock: socket.socket, already: bytes = b'', source: int = 0, target: int = 1) -> None:
    """
    Copy bytes between ``sock`` and the descriptors ``source`` (to the guest) and ``target``
    (from it; ``already`` first) until the guest's side closes, or ``target`` does; return then.
    The input is copied by a thread of its own, so that neither way ever waits for the other.
    """
    writer = threading.Thread(target=_copy_in, args=(source, sock), name='negotiator-bridge-input')
    writer.daemon = True  # an input that never ends (a terminal) must not hold the program
    writer.start()
    try:
        if already:
            _write_all(target, already)
        while True:
            chunk = sock.recv(COPY_SIZE)
            if not chunk:
                return
            _write_all(target, chunk)
    except OSError as exc:
        logger.debug("Bridge output ended: %s", exc)
    finally:
        sock.close()
