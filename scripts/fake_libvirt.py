"""
A fake libvirt: the files that ``negotiator_host.discovery`` reads, and a stand-in ``virsh``.

Why: the host finds guests in libvirt's files and through ``virsh`` (``docs/host.rst``, "How
guests and sockets are found"), and both can be pointed elsewhere (``LibvirtPaths``,
``$NEGOTIATOR_LIBVIRT_STATUS_DIR``, ``$NEGOTIATOR_LIBVIRT_CHANNEL_DIR``, ``$PATH``). This fake
tree serves the host's tests (``tests/``) and the benchmark's many-guests figure
(``scripts/benchmark``), so that both run against one imitation of libvirt, with no VM:

- ``run/NAME.xml``: the live status XML of each running guest (:func:`status_xml`);
- ``ch/``: the channel sockets, in the current layout (``domain-ID-SHORTNAME/CHANNEL``) or the
  older flat one (``NAME.CHANNEL``);
- ``xml/NAME.xml``: what ``virsh dumpxml NAME`` prints (:func:`domain_xml`);
- ``bin/virsh``: a stand-in that prints the canned ``list`` and ``dumpxml``, plays ``event
  --loop`` (a line per :meth:`FakeLibvirt.trigger_event`), fails as an unreachable libvirtd
  after :meth:`FakeLibvirt.set_down`, hangs when a file ``hang`` exists, and logs every call
  (:meth:`FakeLibvirt.invocations`, so that tests can count processes);
- ``host.sock``: the host daemon's local socket of this world (``$NEGOTIATOR_HOST_SOCKET`` in
  :attr:`FakeLibvirt.environ`), where a test may start a daemon; the host's own daemon, if one
  runs, is never used by accident.

Standard library and ``negotiator_common.channels`` only (the benchmark imports it before its
virtual environment has more).
"""

import atexit
import os
import shutil
import socket
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

from negotiator_common.channels import HOST_TO_GUEST_CHANNEL, channel_xml

__all__ = ('FakeLibvirt', 'domain_xml', 'listening_socket', 'status_xml')

# Python without site (-S) starts sooner: the benchmark's many-guests figure includes the one
# `virsh list` that `negotiator-host --all` runs (about 20 ms for this stand-in, less than a real one).
FAKE_VIRSH = r'''#!PYTHON -S
import os, sys, time
root = ROOT
with open(os.path.join(root, 'invocations'), 'a') as log:
    log.write(repr(sys.argv[1:]) + '\n')
args = [a for a in sys.argv[1:]]
if '-c' in args:
    del args[args.index('-c'):args.index('-c') + 2]
args = [a for a in args if a != '-q']
if os.path.exists(os.path.join(root, 'down')):
    sys.stderr.write("error: failed to connect to the hypervisor\n"
                     "error: Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory\n")
    sys.exit(1)
if os.path.exists(os.path.join(root, 'hang')):
    time.sleep(60)
if args[0] == 'list':
    with open(os.path.join(root, 'list'), 'rb') as handle:
        sys.stdout.buffer.write(handle.read())
elif args[0] == 'dumpxml':
    path = os.path.join(root, 'xml', args[-1] + '.xml')
    if not os.path.exists(path):
        sys.stderr.write("error: failed to get domain '%s'\n" % args[-1])
        sys.exit(1)
    with open(path, 'rb') as handle:
        sys.stdout.buffer.write(handle.read())
elif args[0] == 'event':
    trigger = os.path.join(root, 'trigger')
    while not os.path.exists(os.path.join(root, 'down')):
        if os.path.exists(trigger):
            os.unlink(trigger)
            sys.stdout.write("2024-01-01 00:00:00.000+0000: event 'lifecycle' for domain 'x': Started Booted\n")
            sys.stdout.flush()
        time.sleep(0.02)
    sys.exit(1)
else:
    sys.stderr.write('error: fake virsh does not know %r\n' % (args,))
    sys.exit(2)
'''


def listening_socket(path: str) -> socket.socket:
    """A UNIX socket listening at ``path`` (its directory made), one client at a time, as QEMU's chardev."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


def status_xml(name: str, domain_id: int, channels: Dict[str, str], state: str = 'running') -> str:
    """The live status XML that libvirt keeps for a running guest (``<domstatus>``, as libvirt writes it)."""
    devices = ''.join(
        "<channel type='unix'><source mode='bind' path='%s'/><target type='virtio' name='%s' state='connected'/>"
        "<alias name='channel%d'/></channel>" % (path, channel, index)
        for index, (channel, path) in enumerate(sorted(channels.items())))
    return ("<domstatus state='%s' reason='booted' pid='4242'><monitor path='/x/monitor.sock'/>"
            "<domain type='kvm' id='%d'><name>%s</name><uuid>00000000-0000-0000-0000-000000000000</uuid>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>%s</devices></domain></domstatus>"
            % (state, domain_id, _escape(name), devices))


def domain_xml(name: str, domain_id: Optional[int], channels: Dict[str, str]) -> str:
    """What ``virsh dumpxml`` prints for a guest (an ``id`` only when ``domain_id``: it runs)."""
    devices = ''.join(channel_xml(channel, path) for channel, path in sorted(channels.items()))
    id_attribute = " id='%d'" % domain_id if domain_id else ''
    return "<domain type='kvm'%s><name>%s</name><devices>%s</devices></domain>" % (id_attribute, _escape(name), devices)


def _escape(text: str) -> str:
    return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


class FakeLibvirt(object):
    """
    A fake libvirt tree plus a stand-in ``virsh`` (see the module's documentation), in a new
    directory under ``/tmp`` (short: UNIX socket paths are limited to 107 bytes), removed by
    :meth:`cleanup` or at exit. :attr:`environ` is what a CLI subprocess needs to use it.
    """

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix='nh-', dir='/tmp')
        atexit.register(shutil.rmtree, self.root, True)
        self.status_dir = os.path.join(self.root, 'run')
        self.channel_dir = os.path.join(self.root, 'ch')
        self.bin_dir = os.path.join(self.root, 'bin')
        for directory in (self.status_dir, self.channel_dir, self.bin_dir, os.path.join(self.root, 'xml')):
            os.makedirs(directory)
        virsh = os.path.join(self.bin_dir, 'virsh')
        with open(virsh, 'w') as handle:
            handle.write(FAKE_VIRSH.replace('PYTHON', sys.executable, 1).replace('ROOT', repr(self.root), 1))
        os.chmod(virsh, 0o755)
        self.rows: List[str] = []
        self.write_list()
        self.listeners: Dict[str, socket.socket] = {}
        self.daemon_socket = os.path.join(self.root, 'host.sock')
        """The host daemon's socket in this fake world (nothing listens on it unless a test starts a daemon there)."""

    @property
    def environ(self) -> Dict[str, str]:
        """This process's environment, pointed at the fake."""
        return self.environ_from(os.environ)

    def environ_from(self, base: Mapping[str, str]) -> Dict[str, str]:
        """
        ``base`` pointed at the fake: its ``virsh`` first on ``PATH``, its directories for discovery,
        and a host daemon's socket of its own (``NEGOTIATOR_HOST_SOCKET``), so that a daemon started
        with it never takes the host's ``/run/negotiator/host.sock``.
        """
        environ = dict(base)
        environ.update(PATH=self.bin_dir + os.pathsep + base.get('PATH', ''),
                       NEGOTIATOR_LIBVIRT_STATUS_DIR=self.status_dir, NEGOTIATOR_LIBVIRT_CHANNEL_DIR=self.channel_dir,
                       LIBVIRT_DEFAULT_URI='qemu:///system', NEGOTIATOR_HOST_SOCKET=self.daemon_socket)
        return environ

    def activate(self, monkeypatch) -> 'FakeLibvirt':
        """Point this process at the fake for one test (pytest's ``monkeypatch`` undoes it)."""
        for name, value in self.environ.items():
            if os.environ.get(name) != value:
                monkeypatch.setenv(name, value)
        return self

    def write_list(self) -> None:
        """Write :attr:`rows` as the table that ``virsh list`` prints."""
        text = ' Id   Name   State\n' + '-' * 30 + '\n' + ''.join(' %s\n' % row for row in self.rows) + '\n'
        with open(os.path.join(self.root, 'list'), 'wb') as handle:
            handle.write(text.encode('utf-8'))

    def add_running(self, name: str, domain_id: int, state: str = 'running') -> None:
        """A row of ``virsh list``."""
        self.rows.append('%-4d %s   %s' % (domain_id, name, state))
        self.write_list()

    def set_down(self, down: bool = True) -> None:
        """libvirtd stops (``virsh`` fails to connect, ``event --loop`` ends) or comes back."""
        path = os.path.join(self.root, 'down')
        if down:
            open(path, 'w').close()
        elif os.path.exists(path):
            os.unlink(path)

    def invocations(self) -> List[str]:
        """Every ``virsh`` call so far, one ``repr`` of its arguments each."""
        try:
            with open(os.path.join(self.root, 'invocations')) as handle:
                return handle.read().splitlines()
        except FileNotFoundError:
            return []

    def trigger_event(self) -> None:
        """Make each running ``virsh event --loop`` print one domain event."""
        open(os.path.join(self.root, 'trigger'), 'w').close()

    def socket_path(self, name: str, domain_id: int, channel: str, layout: str = 'directory') -> str:
        """Where libvirt puts a channel's socket, in the current ``directory`` layout or the older flat one."""
        if layout == 'directory':
            return os.path.join(self.channel_dir, 'domain-%d-%s' % (domain_id, name[:20]), channel)
        return os.path.join(self.channel_dir, '%s.%s' % (name, channel))

    def add_guest(self, name: str, domain_id: int, channels: Sequence[str] = (HOST_TO_GUEST_CHANNEL,),
                  layout: str = 'directory', status: bool = True, listen: bool = False,
                  list_row: bool = True) -> Dict[str, str]:
        """
        A running guest: its sockets in the given layout (listening ones, in :attr:`listeners`, with
        ``listen``; else plain files), then :meth:`add_domain`. Returns channel name to socket path.
        """
        paths = {}
        for channel in channels:
            path = self.socket_path(name, domain_id, channel, layout)
            if listen:
                self.listeners[path] = listening_socket(path)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, 'w').close()
            paths[channel] = path
        self.add_domain(name, domain_id, paths, status=status, list_row=list_row)
        return paths

    def add_domain(self, name: str, domain_id: int, paths: Dict[str, str], status: bool = True,
                   list_row: bool = True) -> None:
        """A running guest whose channel sockets are ``paths`` (wherever they are): its status XML (if
        ``status``), its ``dumpxml`` and its row of ``virsh list`` (if ``list_row``)."""
        if status:
            with open(os.path.join(self.status_dir, name + '.xml'), 'w', encoding='utf-8') as handle:
                handle.write(status_xml(name, domain_id, paths))
        with open(os.path.join(self.root, 'xml', name + '.xml'), 'w', encoding='utf-8') as handle:
            handle.write(domain_xml(name, domain_id, paths))
        if list_row:
            self.add_running(name, domain_id)

    def cleanup(self) -> None:
        """Close the listening sockets and remove the tree."""
        for sock in self.listeners.values():
            sock.close()
        shutil.rmtree(self.root, ignore_errors=True)
