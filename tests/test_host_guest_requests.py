"""
What a guest's requests meet on the host daemon: the policy file, hidden commands, the built-ins, odd strings.

A guest is a socket pair served by a real :class:`HostDaemon`'s dispatcher (as ``serve_socket``
does with a guest's channel); the raw side reads the very bytes that the guest would.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import CommandNotFound
from negotiator_common.transport import Transport
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths
from negotiator_host.policy import Policy, PolicyError

from support import GUEST_COMMANDS, make_commands_dir, short_tempdir

BUILTINS = ['disk-usage', 'hostname', 'ip-addresses', 'os-release', 'uptime']


class ServedGuest(object):
    """A guest called ``name`` served by ``daemon``: ``raw`` is the guest's end of the channel."""

    def __init__(self, daemon, name):
        self.raw, served = socket.socketpair()
        self.raw.settimeout(10)
        self.endpoint = Endpoint(Transport.from_socket(served), daemon.dispatcher, name=name).start()
        self.buffer = b''
        self.host_side = None

    def exchange(self, request):
        """Send one request line; return the reply line, as bytes."""
        self.raw.sendall(json.dumps(request).encode('ascii') + b'\n')
        while b'\n' not in self.buffer:
            data = self.raw.recv(65536)
            assert data, 'the daemon closed the channel'
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b'\n')
        return line

    def client(self):
        """An AgentClient on the raw end (use it instead of :meth:`exchange`, not with it)."""
        self.host_side = Endpoint(Transport.from_socket(self.raw), name='host').start()
        return AgentClient(self.host_side)

    def close(self):
        if self.host_side is not None:
            self.host_side.close()
        else:
            self.raw.close()
        self.endpoint.close()


@pytest.fixture
def served():
    """``served(policy) -> ServedGuest`` of guest ``web-1``, on a daemon with the test commands."""
    guests = []
    commands = make_commands_dir(short_tempdir(), GUEST_COMMANDS)

    def serve(policy=None, name='web-1'):
        options = {} if policy is None else {'policy': policy}  # None: the daemon's default
        daemon = HostDaemon(commands_dirs=[commands], watch=False, paths=LibvirtPaths(None, None), **options)
        guest = ServedGuest(daemon, name)
        guest.commands = commands
        guests.append(guest)
        return guest

    yield serve
    for guest in guests:
        guest.close()


# The file's format.

@pytest.mark.parametrize('line, pattern', [
    ('allow = deploy-status   # reload-* stays off', '#'),
    ('allow = deploy-status ; restore-* never', ';'),
    ('allow = "deploy-status"', '"deploy-status"'),
    ('allow = ../bin/sh', '../bin/sh'),
    ('allow = a,b', 'a,b'),
])
def test_a_pattern_no_command_name_can_hold_is_an_error_naming_the_line(line, pattern):
    with pytest.raises(PolicyError) as caught:
        Policy.parse('# hosts\n[web-*]\n%s\n' % line, 'host-policy.ini')
    assert str(caught.value).startswith("host-policy.ini, line 3: %r is not a command pattern" % pattern)


def test_comments_are_whole_lines_and_patterns_may_continue_on_indented_lines():
    policy = Policy.parse('# one\n; two\n[web-*]\n  # three\nallow = deploy-status\n'
                          '    reload-[a-z]* ?-x\n\n\t!x\n[db-[0-9]]\nallow =\n')
    assert policy.rules == [('web-*', ['deploy-status', 'reload-[a-z]*', '?-x', '!x']), ('db-[0-9]', [])]
    assert policy.allows('web-1', 'reload-nginx') and not policy.allows('web-1', 'restore-production')


@pytest.mark.parametrize('text, message', [
    ('[web-*]\nalow = x\n', "line 2: unknown key 'alow'"),
    ('allow = x\n', "line 1: 'allow' is outside any [section]"),
    ('[a]\nallow = x\n\n[a]\n', 'line 4: section [a] is already on line 1'),
    ('[a]\nallow = x\nallow = y\n', 'line 3: section [a] has "allow" already on line 2'),
    ('[a] # web\nallow = x\n', "line 1: expected a [section]"),
    ('[a]\nx\n', "line 2: expected a [section]"),
])
def test_every_format_error_names_its_line(text, message):
    with pytest.raises(PolicyError) as caught:
        Policy.parse(text, 'p.ini')
    assert str(caught.value).startswith('p.ini, %s' % message)


def test_the_daemon_exits_64_on_a_comment_at_the_end_of_an_allow_line(tmp_path):
    policy = tmp_path / 'host-policy.ini'
    policy.write_text('[web-*]\nallow = deploy-status   # reload-* stays off\n')
    process = subprocess.run([sys.executable, '-m', 'negotiator_host', '--daemon', '--policy', str(policy)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert process.returncode == 64
    assert process.stderr.startswith(b"negotiator-host: %s, line 2: '#' is not a command pattern"
                                     % str(policy).encode())


# Hidden and missing commands.

def test_a_hidden_command_gets_the_same_reply_as_a_missing_one_and_the_log_tells_them_apart(served, caplog):
    guest = served(Policy.parse('[web-*]\nallow = echo-*\n'))
    caplog.set_level(logging.INFO)
    request = {'jsonrpc': '2.0', 'id': 1, 'method': 'execute', 'params': {'command': 'cat-stdin'}}
    hidden = guest.exchange(request)
    os.unlink(os.path.join(guest.commands, 'cat-stdin'))
    missing = guest.exchange(request)
    assert hidden == missing
    assert json.loads(hidden.decode())['error']['code'] == CommandNotFound.code
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Refused ')]
    assert messages == ['Refused cat-stdin for web-1: not allowed by the policy',
                        "Refused 'cat-stdin' for web-1: no such command"]


# The built-ins.

def test_without_a_policy_file_a_guest_gets_the_commands_directories_and_no_builtin(served):
    client = served().client()
    names = [c.name for c in client.list_commands()]
    assert 'echo-args' in names and not set(BUILTINS) & set(names)
    for builtin in BUILTINS:
        with pytest.raises(CommandNotFound):
            client.execute(builtin)
    assert client.execute('echo-args', 'x').stdout == b'x\n'


def test_a_builtin_reaches_a_guest_only_where_the_policy_names_it(served):
    policy = Policy.parse('[web-*]\nallow = * host* ip-addresse?\n\n[web-1]\nallow = uptime\n')
    web1, web2 = served(policy, 'web-1').client(), served(policy, 'web-2').client()
    assert [c.name for c in web1.list_commands() if c.builtin] == ['uptime']
    assert [c.name for c in web2.list_commands() if c.builtin] == []
    assert web1.execute('uptime').exit_status == 0
    for client, builtin in ((web2, 'uptime'), (web1, 'hostname'), (web1, 'ip-addresses')):
        with pytest.raises(CommandNotFound):
            client.execute(builtin)
    assert web2.execute('echo-args', 'y').stdout == b'y\n'


# Strings that UTF-8 cannot carry.

@pytest.mark.parametrize('params', [
    {'command': 'echo-args', 'args': ['\ud800']},
    {'command': 'echo-args', 'args': ['ok', '\udcff']},
    {'command': 'cat-stdin', 'stdin': 'x\udcff'},
    {'command': 'hostname', 'args': ['\ud800']},
], ids=['high-surrogate', 'escaped-byte', 'stdin', 'builtin'])
def test_a_lone_surrogate_is_refused_cleanly(served, caplog, params):
    guest = served(Policy.parse('[*]\nallow = * hostname\n'))
    caplog.set_level(logging.INFO)
    reply = json.loads(guest.exchange({'jsonrpc': '2.0', 'id': 7, 'method': 'execute', 'params': params}).decode())
    assert reply['error']['code'] == -32602, reply
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


@pytest.mark.parametrize('method, params', [
    ('exec', {'argv': ['/bin/sh', '-c', 'id']}),
    ('push', {'path': '/tmp/from-a-guest', 'stdin_stream': True}),
    ('pull', {'path': '/etc/shadow'}),
])
def test_a_guest_can_neither_run_programs_nor_move_files_on_the_host(served, method, params):
    # The host daemon serves its commands only: exec is refused (-32011) and the file methods are
    # not even served there (-32601).
    guest = served()
    hello = json.loads(guest.exchange({'jsonrpc': '2.0', 'id': 1, 'method': 'hello', 'params': {'protocol': 1}}))
    assert not {'exec', 'files'} & set(hello['result']['capabilities'])
    reply = json.loads(guest.exchange({'jsonrpc': '2.0', 'id': 2, 'method': method, 'params': params}))
    assert reply['error']['code'] in (-32011, -32601), reply
    assert not os.path.exists('/tmp/from-a-guest')
