"""
Commands written in Python that every agent offers without any installation.

They read the facts that operators ask for most (the OS release, IP addresses, disk usage,
host name, uptime) straight from the kernel and ``/etc``, in-process: no shell script, no
``lsb_release``, no fork. Each takes an argument list like an executable would, prints text
by default and JSON with ``--json``, and returns ``(exit_status, stdout, stderr)``.
"""

import fcntl
import json
import os
import socket
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from negotiator_common.deadline import Deadline

__all__ = ('BUILTIN_COMMANDS', 'BuiltinCommand', 'DiskUsage', 'STATVFS_TIMEOUT', 'read_mounts')

BuiltinResult = Tuple[int, bytes, bytes]

_IGNORED_FILESYSTEMS = frozenset((
    'autofs', 'binfmt_misc', 'bpf', 'cgroup', 'cgroup2', 'configfs', 'debugfs', 'devpts', 'devtmpfs',
    'fusectl', 'hugetlbfs', 'mqueue', 'nsfs', 'proc', 'pstore', 'securityfs', 'sysfs', 'tracefs',
    'rpc_pipefs', 'efivarfs', 'ramfs', 'squashfs', 'overlay_internal',
))


class BuiltinCommand(object):
    """A named Python function that behaves like a command."""

    def __init__(self, name: str, description: str, function: Callable[[Sequence[str]], BuiltinResult]) -> None:
        self.name = name
        self.description = description
        self.function = function

    def __call__(self, args: Sequence[str]) -> BuiltinResult:
        return self.function(args)


def _output(args: Sequence[str], data: object, text: str) -> BuiltinResult:
    """Print ``data`` as JSON with ``--json``, else ``text``; refuse any other argument."""
    unknown = [a for a in args if a != '--json']
    if unknown:
        return 2, b'', ('unknown argument %r (the only option is --json)\n' % unknown[0]).encode('utf-8')
    if '--json' in args:
        return 0, (json.dumps(data, indent=2, sort_keys=True) + '\n').encode('utf-8'), b''
    return 0, text.encode('utf-8'), b''


def parse_os_release(text: str) -> Dict[str, str]:
    """Parse the ``KEY=value`` lines of os-release(5), with its shell-like quoting."""
    facts = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#') or '=' not in line:
            continue
        key, _, value = line.partition('=')
        if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
            value = value[1:-1]
            if line.partition('=')[2][0] == '"':
                for escaped in ('\\\\', '\\"', '\\$', '\\`'):
                    value = value.replace(escaped, escaped[1])
        facts[key.strip()] = value
    return facts


def os_release(args: Sequence[str]) -> BuiltinResult:
    for path in ('/etc/os-release', '/usr/lib/os-release'):
        try:
            with open(path, encoding='utf-8', errors='replace') as handle:
                facts = parse_os_release(handle.read())
            break
        except OSError:
            continue
    else:
        return 1, b'', b'neither /etc/os-release nor /usr/lib/os-release exists\n'
    return _output(args, facts, ''.join('%s=%s\n' % item for item in sorted(facts.items())))


def hostname(args: Sequence[str]) -> BuiltinResult:
    name = socket.gethostname()
    return _output(args, {'hostname': name}, name + '\n')


def uptime(args: Sequence[str]) -> BuiltinResult:
    with open('/proc/uptime') as handle:
        seconds = float(handle.read().split()[0])
    from humanfriendly import format_timespan
    return _output(args, {'uptime_seconds': seconds}, 'up %s (%.2f seconds)\n' % (format_timespan(seconds), seconds))


def _ipv4_address(interface: str) -> str:
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack('256s', interface.encode('utf-8')[:15])
        reply = fcntl.ioctl(probe.fileno(), siocgifaddr, request)
    return socket.inet_ntoa(reply[20:24])


def _ipv6_addresses() -> List[Tuple[str, str]]:
    found = []
    try:
        with open('/proc/net/if_inet6') as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 6:
                    packed = bytes.fromhex(fields[0])
                    found.append((fields[5], socket.inet_ntop(socket.AF_INET6, packed)))
    except OSError:
        pass
    return found


def ip_addresses(args: Sequence[str]) -> BuiltinResult:
    addresses: List[Dict[str, str]] = []
    for _, interface in socket.if_nameindex():
        try:
            addresses.append({'interface': interface, 'family': 'inet', 'address': _ipv4_address(interface)})
        except OSError:
            pass  # the interface has no IPv4 address
    addresses.extend({'interface': i, 'family': 'inet6', 'address': a} for i, a in _ipv6_addresses())
    text = ''.join('%(interface)s %(family)s %(address)s\n' % entry for entry in addresses)
    return _output(args, addresses, text)


STATVFS_TIMEOUT = 2.0
"""
Seconds that a file system has to answer ``disk-usage``'s ``statvfs``: a local one answers in
microseconds, a healthy network one in milliseconds; one that has not answered by then is
reported as not responding.
"""


def read_mounts(path: str = '/proc/mounts') -> List[Tuple[str, str, str]]:
    """``(device, mountpoint, type)`` of each mounted file system worth reporting, each mountpoint once."""
    mounts = []
    seen = set()
    with open(path) as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 3 or fields[2] in _IGNORED_FILESYSTEMS:
                continue
            mountpoint = fields[1].replace('\\040', ' ')
            if mountpoint not in seen:
                seen.add(mountpoint)
                mounts.append((fields[0], mountpoint, fields[2]))
    return mounts


class _Probe(object):
    """One ``statvfs`` call on a thread of its own, and the time by which it should have answered."""

    def __init__(self, mountpoint: str, answer_by: Deadline) -> None:
        self.mountpoint = mountpoint
        self.answer_by = answer_by
        self.done = threading.Event()
        self.stats: Optional[os.statvfs_result] = None


class DiskUsage(object):
    """
    The ``disk-usage`` command: size, use and free space of each mounted file system.

    ``statvfs`` on a hung network mount (an NFS server gone) blocks in the kernel, and no
    signal or timeout can interrupt it: called on the handler's thread, it would hang the
    request for good. So each ``statvfs`` runs on a thread of its own, all at once, and the
    command waits at most ``timeout`` seconds for them; a file system that has not answered
    is reported as not responding. Its thread stays blocked until the kernel gives up: while
    it does, later calls report the same mount as not responding at once, without starting
    another thread for it, so repeated calls cannot pile up threads on a dead mount (at most
    one per mountpoint).

    :param statvfs: ``os.statvfs`` (tests give a fake).
    :param mounts: returns the ``(device, mountpoint, type)`` to report (:func:`read_mounts`).
    """

    def __init__(self, statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 mounts: Callable[[], List[Tuple[str, str, str]]] = read_mounts,
                 timeout: float = STATVFS_TIMEOUT) -> None:
        self.statvfs = statvfs
        self.mounts = mounts
        self.timeout = timeout
        self._pending: Dict[str, _Probe] = {}
        self._lock = threading.Lock()

    def __call__(self, args: Sequence[str]) -> BuiltinResult:
        mounts = self.mounts()
        probes = [self._probe(mountpoint) for _, mountpoint, _ in mounts]
        for probe in probes:
            probe.done.wait(probe.answer_by.remaining())
        filesystems: List[Dict[str, Any]] = []
        for (device, mountpoint, fstype), probe in zip(mounts, probes):
            entry: Dict[str, Any] = {'mountpoint': mountpoint, 'device': device, 'type': fstype}
            if not probe.done.is_set():
                entry['responding'] = False
                filesystems.append(entry)
            elif probe.stats is not None and probe.stats.f_blocks:
                entry.update(_usage(probe.stats), responding=True)
                filesystems.append(entry)
        return _output(args, filesystems, self._table(filesystems))

    def _probe(self, mountpoint: str) -> _Probe:
        """The probe of ``mountpoint`` still running (a hung mount's), else a new one on a new thread."""
        with self._lock:
            probe = self._pending.get(mountpoint)
            if probe is not None:
                return probe
            probe = self._pending[mountpoint] = _Probe(mountpoint, Deadline(self.timeout))
        thread = threading.Thread(target=self._run_probe, args=(probe,), name='negotiator-statvfs')
        thread.daemon = True
        thread.start()
        return probe

    def _run_probe(self, probe: _Probe) -> None:
        try:
            probe.stats = self.statvfs(probe.mountpoint)
        except OSError:
            pass  # not ours to see (permissions) or gone meanwhile: left out, as df does
        finally:
            with self._lock:
                del self._pending[probe.mountpoint]
            probe.done.set()

    def _table(self, filesystems: List[Dict[str, Any]]) -> str:
        lines = ['%-24s %8s %14s %14s %14s' % ('MOUNTPOINT', 'USED%', 'USED', 'AVAILABLE', 'TOTAL')]
        for fs in filesystems:
            if fs['responding']:
                lines.append('%-24s %7.1f%% %14d %14d %14d' % (fs['mountpoint'], fs['used_percent'], fs['used_bytes'],
                                                              fs['available_bytes'], fs['total_bytes']))
            else:
                lines.append('%-24s not responding (no answer within %g seconds)' % (fs['mountpoint'], self.timeout))
        return '\n'.join(lines) + '\n'


def _usage(stats: os.statvfs_result) -> Dict[str, Any]:
    total = stats.f_blocks * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize
    used = total - stats.f_bfree * stats.f_frsize
    percent = round(100.0 * used / (used + available), 1) if used + available else 0.0
    return {'total_bytes': total, 'used_bytes': used, 'available_bytes': available, 'used_percent': percent}


disk_usage = DiskUsage()


BUILTIN_COMMANDS: Dict[str, BuiltinCommand] = {command.name: command for command in (
    BuiltinCommand('os-release', 'the operating system release (/etc/os-release)', os_release),
    BuiltinCommand('hostname', 'the host name', hostname),
    BuiltinCommand('uptime', 'time since boot', uptime),
    BuiltinCommand('ip-addresses', 'IPv4 and IPv6 addresses by interface', ip_addresses),
    BuiltinCommand('disk-usage', 'size, use and free space of each mounted file system', disk_usage),
)}
"""Built-in commands by name; a file of the same name in a commands directory takes precedence."""
