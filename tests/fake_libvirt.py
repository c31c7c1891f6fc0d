"""
A fake libvirt for the tests (no tests here).

- :class:`FakeLibvirt`: a fake libvirt tree (status XML and channel directories in both
  layouts) and a stand-in ``virsh`` placed first on ``PATH`` that prints canned output and
  logs each invocation, so tests can count processes.
- :func:`status_xml`, :func:`domain_xml`: the XML that libvirt writes for a running guest
  and that ``virsh dumpxml`` prints.
"""

import os
import shutil
import socket
import sys
from typing import Dict, List, Optional

from support import listening_socket, short_tempdir

FAKE_VIRSH = r'''#!PYTHON
import os, sys, time
root = os.environ['FAKE_VIRSH_ROOT']
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


def status_xml(name: str, domain_id: int, channels: Dict[str, str], state: str = 'running') -> str:
    devices = ''.join(
        "<channel type='unix'><source mode='bind' path='%s'/><target type='virtio' name='%s' state='connected'/>"
        "<alias name='channel%d'/></channel>" % (path, channel, index)
        for index, (channel, path) in enumerate(sorted(channels.items())))
    return ("<domstatus state='%s' reason='booted' pid='4242'><monitor path='/x/monitor.sock'/>"
            "<domain type='kvm' id='%d'><name>%s</name><uuid>00000000-0000-0000-0000-000000000000</uuid>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>%s</devices></domain></domstatus>"
            % (state, domain_id, _escape(name), devices))


def domain_xml(name: str, domain_id: Optional[int], channels: Dict[str, str]) -> str:
    devices = ''.join(
        "<channel type='unix'><source mode='bind' path='%s'/><target type='virtio' name='%s'/></channel>"
        % (path, channel) for channel, path in sorted(channels.items()))
    id_attribute = " id='%d'" % domain_id if domain_id else ''
    return "<domain type='kvm'%s><name>%s</name><devices>%s</devices></domain>" % (id_attribute, _escape(name), devices)


def _escape(text: str) -> str:
    return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


class FakeLibvirt(object):
    """A fake libvirt tree plus a stand-in virsh; ``environ`` is what a CLI subprocess needs."""

    def __init__(self) -> None:
        self.root = short_tempdir()
        self.status_dir = os.path.join(self.root, 'run')
        self.channel_dir = os.path.join(self.root, 'ch')
        self.bin_dir = os.path.join(self.root, 'bin')
        for directory in (self.status_dir, self.channel_dir, self.bin_dir, os.path.join(self.root, 'xml')):
            os.makedirs(directory)
        virsh = os.path.join(self.bin_dir, 'virsh')
        with open(virsh, 'w') as handle:
            handle.write(FAKE_VIRSH.replace('PYTHON', sys.executable, 1))
        os.chmod(virsh, 0o755)
        self.rows: List[str] = []
        self.write_list()
        self.sockets: List[socket.socket] = []

    @property
    def environ(self) -> Dict[str, str]:
        environ = dict(os.environ)
        environ.update(PATH=self.bin_dir + os.pathsep + os.environ.get('PATH', ''), FAKE_VIRSH_ROOT=self.root,
                       NEGOTIATOR_LIBVIRT_STATUS_DIR=self.status_dir, NEGOTIATOR_LIBVIRT_CHANNEL_DIR=self.channel_dir,
                       LIBVIRT_DEFAULT_URI='qemu:///system')
        return environ

    def activate(self, monkeypatch) -> 'FakeLibvirt':
        for name, value in self.environ.items():
            if os.environ.get(name) != value:
                monkeypatch.setenv(name, value)
        return self

    def write_list(self) -> None:
        text = ' Id   Name   State\n' + '-' * 30 + '\n' + ''.join(' %s\n' % row for row in self.rows) + '\n'
        with open(os.path.join(self.root, 'list'), 'wb') as handle:
            handle.write(text.encode('utf-8'))

    def add_running(self, name: str, domain_id: int, state: str = 'running') -> None:
        self.rows.append('%-4d %s   %s' % (domain_id, name, state))
        self.write_list()

    def set_down(self, down: bool = True) -> None:
        path = os.path.join(self.root, 'down')
        if down:
            open(path, 'w').close()
        elif os.path.exists(path):
            os.unlink(path)

    def invocations(self) -> List[str]:
        try:
            with open(os.path.join(self.root, 'invocations')) as handle:
                return handle.read().splitlines()
        except FileNotFoundError:
            return []

    def trigger_event(self) -> None:
        open(os.path.join(self.root, 'trigger'), 'w').close()

    def socket_path(self, name: str, domain_id: int, channel: str, layout: str = 'directory') -> str:
        if layout == 'directory':
            return os.path.join(self.channel_dir, 'domain-%d-%s' % (domain_id, name[:20]), channel)
        return os.path.join(self.channel_dir, '%s.%s' % (name, channel))

    def add_guest(self, name: str, domain_id: int, channels=('negotiator-host-to-guest.0',), layout: str = 'directory',
                  status: bool = True, listen: bool = False, list_row: bool = True) -> Dict[str, str]:
        """A running guest: sockets in the given layout, a status XML (if ``status``), a dumpxml."""
        paths = {}
        for channel in channels:
            path = self.socket_path(name, domain_id, channel, layout)
            if listen:
                self.sockets.append(listening_socket(path))
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, 'w').close()
            paths[channel] = path
        if status:
            with open(os.path.join(self.status_dir, name + '.xml'), 'w', encoding='utf-8') as handle:
                handle.write(status_xml(name, domain_id, paths))
        with open(os.path.join(self.root, 'xml', name + '.xml'), 'w', encoding='utf-8') as handle:
            handle.write(domain_xml(name, domain_id, paths))
        if list_row:
            self.add_running(name, domain_id)
        return paths

    def cleanup(self) -> None:
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.root, ignore_errors=True)
