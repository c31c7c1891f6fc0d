"""
``negotiator-host --exec``, ``--bridge`` and ``--hypervisor`` (issue 15), without a VM.

A fake libvirt lists two guests, each with a real agent that allows exec (FakeGuestAgent); a
real host daemon serves alpha only, so beta is reached directly. ssh is a fake here
(``FAKE_SSH``): it runs the remote command with ``/bin/sh -c`` on this machine, as sshd runs it
with the user's shell, and plays an unreachable host and a host without negotiator-host. The
real ssh through a real sshd is in tests/test_e2e_exec.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ChannelNotFound, CommandNotAllowed
from negotiator_common.transport import Transport
from negotiator_host.audit import AuditLog
from negotiator_host.channel import REMOTE, GuestChannel
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths
from negotiator_host.remote import SshBridge

from fake_libvirt import FakeLibvirt
from support import GUEST_COMMANDS, FakeGuestAgent, make_commands_dir
from waiting import wait_until

GUESTS = ('alpha', 'beta')

FAKE_SSH = '''#!%(python)s
import os, sys
arguments = sys.argv[1:]
host, command = arguments[arguments.index('--') + 1:]
if host == 'unreachable':
    sys.stderr.write('ssh: Could not resolve hostname unreachable: Name or service not known\\n')
    sys.exit(255)
environ = dict(os.environ)
if host == 'bare':
    environ['PATH'] = '/usr/bin:/bin'
os.execve('/bin/sh', ['/bin/sh', '-c', command], environ)
'''


class World(object):
    """The fake guests and their agents, the host daemon serving alpha, and the fake ssh."""

    def __init__(self, monkeypatch, tmp_path):
        self.fake = FakeLibvirt().activate(monkeypatch)
        monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
        self.commands = make_commands_dir(self.fake.root, GUEST_COMMANDS)
        self.agents = {}
        for number, name in enumerate(GUESTS, 1):
            self.fake.add_running(name, number)
            path = self.fake.socket_path(name, number, 'negotiator-host-to-guest.0')
            self.agents[name] = FakeGuestAgent(path, self.commands, name=name, allow_exec=name != 'beta')
        self.audit_path = str(tmp_path / 'audit.log')
        self.daemon = HostDaemon(commands_dirs=[self.commands], watch=False, socket_path=self.fake.daemon_socket,
                                 paths=LibvirtPaths(self.fake.status_dir, self.fake.channel_dir),
                                 guest_patterns=['alpha'], audit=AuditLog(self.audit_path))
        self.daemon.request_rescan(0)
        self.thread = threading.Thread(target=self.daemon.run)
        self.thread.start()
        assert wait_until(self.linked, timeout=10)
        self.ssh = str(tmp_path / 'ssh')
        with open(self.ssh, 'w') as handle:
            handle.write(FAKE_SSH % {'python': sys.executable})
        os.chmod(self.ssh, 0o755)

    def linked(self):
        agent = self.daemon.agents.get('alpha')
        return agent is not None and agent.link is not None

    def cli(self, *args, stdin=b''):
        process = subprocess.run([sys.executable, '-m', 'negotiator_host'] + list(args), input=stdin,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        return process.returncode, process.stdout, process.stderr

    def audit(self):
        with open(self.audit_path) as handle:
            return [json.loads(line) for line in handle]

    def close(self):
        self.daemon.stop()
        self.thread.join(30)
        for agent in self.agents.values():
            agent.stop()
        self.fake.cleanup()


@pytest.fixture
def world(monkeypatch, tmp_path):
    world = World(monkeypatch, tmp_path)
    yield world
    world.close()


class Bridged(object):
    """``negotiator-host --bridge GUEST`` with a socket as its standard input and output, and an endpoint on it."""

    def __init__(self, guest):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--bridge', guest], stdin=theirs,
                                        stdout=theirs, stderr=subprocess.PIPE)
        theirs.close()
        self.endpoint = Endpoint(Transport.from_socket(ours), name='bridged').start()

    def hello(self, guest):
        return self.endpoint.handshake(timeout=20, params={'guest': guest})

    def close(self):
        self.endpoint.close()
        status = self.process.wait(30)
        self.process.stderr.close()
        return status


@pytest.mark.parametrize('guest, through_daemon', [('alpha', True), ('beta', False)])
def test_the_bridge_carries_the_protocol_through_the_daemon_or_directly(world, guest, through_daemon):
    bridged = Bridged(guest)
    try:
        hello = bridged.hello(guest)
        assert (hello.get('via') == 'negotiator-host-daemon') == through_daemon
        client = AgentClient(bridged.endpoint, hello)
        assert client.execute('echo-args', 'hi there').stdout == b'hi there\n'
        data = os.urandom(300 * 1024)
        assert client.execute('cat-stdin', input=data).stdout == data
    finally:
        assert bridged.close() == 0


def test_exec_through_the_daemon_is_audited_with_its_argv(world):
    with GuestChannel('alpha') as guest:
        result = guest.exec(['/bin/sh', '-c', 'cat; exit 3', 'x' * 300], input=b'in')
    assert (result.exit_status, result.stdout) == (3, b'in')
    record = [r for r in world.audit() if r['method'] == 'exec'][-1]
    assert record['argv'][:2] == ['/bin/sh', '-c'] and record['argv'][3] != 'x' * 300
    assert record['exit_status'] == 3


def test_the_cli_exec_streams_and_exits_with_the_programs_status(world):
    script = 'tr a-z A-Z; echo "$0" >&2; exit 5'
    status, out, err = world.cli('--exec', '--stdin', 'alpha', '--', '/bin/sh', '-c', script, "it's", stdin=b'quiet')
    assert (status, out, err) == (5, b'QUIET', b"it's\n")
    status, out, _ = world.cli('--exec', 'alpha', '--cwd', '/tmp', '--', 'pwd')
    assert (status, out) == (0, b'/tmp\n')


def test_the_cli_exec_on_a_guest_without_the_switch_is_77_naming_it(world):
    status, _, err = world.cli('--exec', 'beta', '--', 'true')
    assert status == 77 and b'--allow-exec' in err


@pytest.mark.parametrize('args', [
    ['--exec', 'alpha'], ['--exec', 'alpha', 'beta', '--', 'true'], ['--exec', '--all', '--', 'true'],
    ['--bridge', 'alpha', 'beta'], ['--bridge', '--json', 'alpha'], ['--cwd', '/', '--ping', 'alpha'],
    ['--hypervisor', '-oProxyCommand=x', '--ping', 'alpha'], ['--hypervisor', 'h', '--ping', '-x'],
    ['--hypervisor', 'h', '--list-guests'], ['--hypervisor', 'h', '--bridge', 'alpha'], ['--ssh', 'ssh', '--ping', 'a'],
    ['--hypervisor', 'h', '--ssh', '', '--ping', 'a'],
])
def test_wrong_command_lines_are_64(world, args):
    assert world.cli(*args)[0] == 64


def test_the_bridge_to_an_unknown_guest_says_so_with_69(world):
    status, out, err = world.cli('--bridge', 'nosuch')
    assert (status, out) == (69, b'') and b'nosuch' in err


def test_a_guest_on_another_hypervisor_over_ssh(world):
    with GuestChannel('alpha', hypervisor='root@hv', ssh=[world.ssh]) as guest:
        assert guest.exec(['/bin/sh', '-c', 'echo "$1" | rev', 'sh', 'abc']).stdout == b'cba\n'
        assert guest.via == REMOTE and guest.hello()['via'] == 'negotiator-host-daemon'
    with GuestChannel('beta', hypervisor='hv', ssh=[world.ssh]) as guest:
        assert guest.execute('echo-args', 'x').stdout == b'x\n' and 'via' not in guest.hello()
    status, out, _ = world.cli('--hypervisor', 'hv', '--ssh', world.ssh, '--exec', 'alpha', '--', 'echo', 'far')
    assert (status, out) == (0, b'far\n')


@pytest.mark.parametrize('hypervisor, guest, error, words', [
    ('unreachable', 'alpha', ChannelNotFound, 'could not reach unreachable: ssh: Could not resolve hostname'),
    ('bare', 'alpha', ChannelNotFound, 'negotiator-host is not installed on bare'),
    ('hv', 'nosuch', ChannelNotFound, 'on hv:'),
])
def test_what_goes_wrong_over_ssh_is_said(world, hypervisor, guest, error, words):
    with pytest.raises(error) as caught:
        GuestChannel(guest, hypervisor=hypervisor, ssh=[world.ssh], timeout=30).ping()
    assert words in caught.value.message
    status, _, err = world.cli('--hypervisor', hypervisor, '--ssh', world.ssh, '--ping', guest)
    assert status == 69 and words.encode() in err


def test_exec_refused_over_ssh_is_77(world):
    with pytest.raises(CommandNotAllowed):
        GuestChannel('beta', hypervisor='hv', ssh=[world.ssh]).exec(['true'])


def test_names_cannot_become_options_and_are_quoted_for_the_remote_shell():
    for hypervisor, guest in (('-oProxyCommand=x', 'g'), ('a b', 'g'), ('h', '-x'), ('h', 'a\nb'), ('h', '')):
        with pytest.raises(ValueError):
            GuestChannel(guest, hypervisor=hypervisor)
    argv = SshBridge('root@hv', "we b'1", ssh=['ssh', '-p', '2222']).argv
    assert argv == ['ssh', '-p', '2222', '-T', '-o', 'BatchMode=yes', '--', 'root@hv',
                    "negotiator-host --bridge -- 'we b'\"'\"'1'"]


@pytest.mark.parametrize('args, closed', [
    (['--bridge', 'alpha'], 0), (['--bridge', 'beta'], 0), (['--ping', 'beta'], 1), (['--ping', 'alpha'], 1)])
def test_a_closed_standard_stream_reads_as_empty_and_writes_nowhere(world, args, closed):
    # Python leaves sys.stdin (or stdout) None then, and the channel's socket would take the free
    # descriptor: a traceback before, and output meant for the terminal sent into the channel.
    process = subprocess.run([sys.executable, '-m', 'negotiator_host'] + args, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, preexec_fn=lambda: os.close(closed), timeout=60)
    assert (process.returncode, process.stderr) == (0, b''), process.stderr.decode()[-2000:]
    assert world.cli('--ping', 'alpha')[0] == 0  # the daemon's link and the agents serve on
