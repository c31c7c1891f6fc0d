"""
Finding and opening the guest's virtio-serial ports.

A port is found by its channel name (``docs/guest.rst``, "Ports"), in this order for each
name: the udev link ``/dev/virtio-ports/NAME``; then the kernel's own record
``/sys/class/virtio-ports/vportNpM/name`` (for guests without udev), which gives
``/dev/vportNpM``. The daemon falls back to ``/dev/vport0p1`` last, as older guests did; the
client does not (that port, if any, is the daemon's). The numbers are not stable (our test
guest had ``vport1p1``), which is why the name comes first.

Every function takes a ``root`` directory so that tests can build a fake ``/dev`` and
``/sys`` tree. A port is opened once (a second ``open()`` fails with EBUSY), non-blocking,
and close-on-exec, so that no command the daemon runs keeps the port open after it exits.
"""

import errno
import os
import select
from typing import List, Optional, Sequence

from negotiator_common.channels import channel_xml
from negotiator_common.errors import ChannelBusy, ChannelNotFound
from negotiator_common.lazylog import get_logger

__all__ = ('FALLBACK_DEVICE', 'OPEN_FLAGS', 'candidate_paths', 'find_port', 'open_port', 'host_connected')

logger = get_logger(__name__)  # the library never prints through logging's last resort

FALLBACK_DEVICE = '/dev/vport0p1'
"""The daemon's last resort when no port carries one of its channel names."""

OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, 'O_NOCTTY', 0)
"""How a port is opened (O_NOCTTY only matters for the pseudo-terminals that tests use)."""


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip('/'))


def _sysfs_ports(root: str) -> List[str]:
    directory = _under(root, '/sys/class/virtio-ports')
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _sysfs_name(root: str, port: str) -> str:
    try:
        with open(_under(root, '/sys/class/virtio-ports/%s/name' % port)) as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ''


def candidate_paths(names: Sequence[str], root: str = '/', fallback: Optional[str] = None) -> List[str]:
    """
    Every device path that may be the port, best first, as seen from ``root``.

    For each name: ``/dev/virtio-ports/NAME`` (if present), then every ``/dev/vportNpM``
    whose sysfs ``name`` is NAME (if present); then ``fallback`` (if present).
    """
    found: List[str] = []
    ports = _sysfs_ports(root)
    for name in names:
        link = _under(root, '/dev/virtio-ports/%s' % name)
        if os.path.exists(link):
            found.append(link)
        for port in ports:
            if _sysfs_name(root, port) == name:
                device = _under(root, '/dev/%s' % port)
                if os.path.exists(device):
                    found.append(device)
    if fallback is not None and os.path.exists(_under(root, fallback)):
        found.append(_under(root, fallback))
    return found


def find_port(names: Sequence[str], root: str = '/', fallback: Optional[str] = None) -> str:
    """
    The device path of the first port found for ``names``.

    :raises ChannelNotFound: with the libvirt XML that creates the port.
    """
    paths = candidate_paths(names, root, fallback)
    if paths:
        logger.debug("Port for %s: %s", ' or '.join(names), paths[0])
        return paths[0]
    raise ChannelNotFound(
        "no virtio-serial port named %s in this guest (looked in /dev/virtio-ports and "
        "/sys/class/virtio-ports%s). Add %s to the guest's libvirt XML (virsh edit), then shut "
        "the guest down and start it again: a reboot does not add devices."
        % (' or '.join(names), ', then %s' % fallback if fallback else '', channel_xml(names[0])),
        {'channels': list(names)})


def open_port(path: str) -> int:
    """
    Open a port for reading and writing: non-blocking, close-on-exec; return the descriptor.

    :raises ChannelBusy: another process holds the port (EBUSY).
    :raises ChannelNotFound: there is no such device.
    """
    try:
        return os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ChannelBusy('%s is in use by another process (a virtio-serial port opens only once); '
                              'if it is not a client, stop the other negotiator-guest using it' % path,
                              {'path': path}) from exc
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            raise ChannelNotFound('%s does not exist (%s)' % (path, exc.strerror), {'path': path}) from exc
        raise


def host_connected(fd: int) -> bool:
    """
    Is a process connected to the other end of the port right now? (Never blocks.)

    With no host side connected a virtio-serial port reports POLLHUP (with POLLIN, though
    nothing is to be read), so the absence of POLLHUP is what says "connected".
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _, flags in poller.poll(0):
        if flags & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return False
    return True
