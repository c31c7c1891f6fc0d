"""
Shared fixtures of the negotiator-host tests (no tests here).

- :class:`FakeLibvirt`: a fake libvirt tree (status XML and channel directories in both
  layouts) and a stand-in ``virsh`` placed first on ``PATH`` that prints canned output and
  logs each invocation, so tests can count processes.
- :class:`FakeGuestAgent`: a real agent (AgentService + Endpoint from negotiator-common)
  listening on a UNIX socket, one client at a time, like QEMU's chardev socket.
- :class:`OddAgent`: the same, answering some methods with canned replies out of the spec
  (a hostile guest).
"""

import atexit
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import threading
from typing import Dict, List, Optional

from negotiator_common.commands import CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport

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


def short_tempdir() -> str:
    """A temporary directory with a short path (UNIX socket paths are limited to 107 bytes), removed at exit."""
    path = tempfile.mkdtemp(prefix='nh-', dir='/tmp')
    atexit.register(shutil.rmtree, path, True)
    return path


def listening_socket(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    return sock


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


def make_commands_dir(root: str, scripts: Dict[str, str]) -> str:
    """A commands directory with Python scripts (name -> body)."""
    directory = os.path.join(root, 'commands')
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    for name, body in scripts.items():
        path = os.path.join(directory, name)
        with open(path, 'w') as handle:
            handle.write('#!%s\n%s' % (sys.executable, textwrap.dedent(body)))
        os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return directory


GUEST_COMMANDS = {
    'echo-args': '''
        import sys
        sys.stdout.write(' '.join(sys.argv[1:]) + '\\n')
    ''',
    'cat-stdin': '''
        import sys
        sys.stdout.buffer.write(sys.stdin.buffer.read())
    ''',
    'binary': '''
        import sys
        sys.stdout.buffer.write(bytes(range(256)) * 4)
        sys.stderr.buffer.write(b'err\\xff\\n')
    ''',
    'fail': '''
        import sys
        sys.stdout.write('partial\\n')
        sys.stderr.write('it failed\\n')
        sys.exit(3)
    ''',
    'two-lines': '''
        import sys
        sys.stdout.write('one\\ntwo\\n')
        sys.stderr.write('warn\\n')
    ''',
    'sleep': '''
        import sys, time
        time.sleep(float(sys.argv[1]))
        sys.stdout.write('slept\\n')
    ''',
    'whoami-guest': '''
        import os, sys
        sys.stdout.write(os.environ.get('NEGOTIATOR_GUEST', '<unset>') + '\\n')
    ''',
    'bytes': '''
        import sys
        size, block = int(sys.argv[1]), b'x' * 1048576
        while size > 0:
            size -= sys.stdout.buffer.write(block[:size])
    ''',
    'sleep-pid': '''
        import os, sys, time
        open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()
        time.sleep(60)
    ''',
    'flood-pid': '''
        import os, sys
        open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()
        block = b'y' * 65535 + b'\\n'
        while True:
            sys.stdout.buffer.write(block)
    ''',
}


class FakeGuestAgent(object):
    """
    A real negotiator agent serving on a listening UNIX socket: one client at a time, as
    QEMU's chardev socket does. ``policy`` as in AgentService.
    """

    def __init__(self, path: str, commands_dir: str, name: str = 'guest', policy=None) -> None:
        self.path = path
        kwargs = {'policy': policy} if policy else {}
        self.service = AgentService('negotiator-guest', CommandRegistry([commands_dir]), **kwargs)
        self.sock = listening_socket(path)
        self.name = name
        self.connections = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._serve)
        self._thread.daemon = True
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.setblocking(True)
            endpoint = Endpoint(Transport.from_socket(conn), self.dispatcher(), name=self.name)
            endpoint.run()

    def dispatcher(self) -> Dispatcher:
        return self.service.dispatcher()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class OddAgent(FakeGuestAgent):
    """
    An agent that answers the methods named in ``replies`` with those canned results (or raises
    the exception given instead), and the others as a real agent does: a guest that breaks the
    spec (an exit status of 256, a duration of "soon", escape sequences in its names).
    """

    METHODS = ('hello', 'ping', 'list_commands', 'execute')

    def __init__(self, path: str, commands_dir: str, replies: Dict[str, object], name: str = 'odd') -> None:
        self.replies = replies
        super().__init__(path, commands_dir, name=name)

    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher()
        standard = self.service.dispatcher()
        for method in self.METHODS:
            dispatcher.register(method, self._answer(method, standard), inline=method != 'execute')
        return dispatcher

    def _answer(self, method: str, standard: Dispatcher):
        from negotiator_common.protocol import Request

        def answer(params, context):
            if method not in self.replies:
                response = standard.dispatch(Request(context.request_id, method, params), context)
                if response.error is not None:
                    raise response.error
                return response.result
            reply = self.replies[method]
            if isinstance(reply, Exception):
                raise reply
            return reply
        return answer


AGENT_GUESTS = ('alpha', 'béta-2', 'gamma.3')
"""Names of the guests that :func:`start_agents` runs: a plain one, a non-ASCII one, one with a dot."""


def start_odd_agent(fake: 'FakeLibvirt', name: str, number: int, replies: Dict[str, object]) -> OddAgent:
    """An :class:`OddAgent` on the channel socket of a running guest ``name`` (id ``number``) in ``fake``."""
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    agent = OddAgent(fake.socket_path(name, number, 'negotiator-host-to-guest.0'), commands, replies, name=name)
    fake.add_running(name, number)
    return agent


def start_agents(fake: 'FakeLibvirt') -> List['FakeGuestAgent']:
    """Real agents on the channel sockets of three running guests (ids 1 to 3) in ``fake``."""
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    agents = []
    for number, name in enumerate(AGENT_GUESTS, 1):
        path = fake.socket_path(name, number, 'negotiator-host-to-guest.0')
        agents.append(FakeGuestAgent(path, commands, name=name))
        fake.add_running(name, number)
    return agents
