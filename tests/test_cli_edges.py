"""
The edges of the two CLIs and of the client under them (``docs/faults.rst``): output held
within its cap, requests checked against the agent's limits before they are sent, no traceback
for any input, Ctrl-C and a closed pipe, and a guest's text shown escaped. The CLIs run as real
subprocesses against real agents on UNIX sockets in a fake libvirt tree (``fake_libvirt``).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from negotiator_common.cli_support import MAX_TIMEOUT_OPTION, UsageError, format_commands, parse_timeout, printable
from negotiator_common.client import DEFAULT_MAX_OUTPUT, AgentClient, CommandDescription
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import CommandNotFound, CommandTimedOut, InvalidRequest, UnsendableRequest
from negotiator_common.service import AgentService, Limits
from negotiator_common.transport import Transport
from negotiator_guest import cli as guest_cli
from negotiator_host.cli import MAX_PENDING_LINE, _LinePrefixer

from fake_libvirt import FakeLibvirt
from support import interruptible, start_agents, start_odd_agent
from measuring import peak_rss, start_measured
from waiting import wait_dead, wait_until

OLD_HELLO = {'protocol': 1, 'agent': 'negotiator-guest', 'version': '0.1.0',
             'capabilities': ['ping', 'list_commands', 'execute', 'stream', 'raw-output', 'cancel'],
             'limits': {'max_stdin': 8 * 1024 * 1024, 'kill_grace': 2.0}}
"""What an agent older than streamed input and credit answers to ``hello``."""

ESCAPE = '\x1b]0;owned\x07\x1b[2J'
"""A window title and a screen clear: what a hostile guest would like to reach the terminal."""


@pytest.fixture
def world(monkeypatch):
    """Three guests with real agents, and ``odd``, whose agent breaks the spec as each test says."""
    fake = FakeLibvirt().activate(monkeypatch)
    agents = start_agents(fake)
    fake.odd_replies = {}
    agents.append(start_odd_agent(fake, 'odd', 7, fake.odd_replies))
    yield fake
    for agent in agents:
        agent.stop()
    fake.cleanup()


def cli_command(*args):
    return [sys.executable, '-m', 'negotiator_host'] + list(args)


def run_cli(fake, *args, stdin=b'', **kwargs):
    process = subprocess.run(cli_command(*args), input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=fake.environ, timeout=60, **kwargs)
    return process.returncode, process.stdout, process.stderr


def assert_one_line_error(status, err, expected):
    assert status == expected, err
    assert b'Traceback' not in err and len(err.decode('utf-8', 'replace').strip().splitlines()) == 1, err


def wait_for_pids(directory, count):
    assert wait_until(lambda: len(os.listdir(str(directory))) >= count, timeout=30)
    return [int(name) for name in os.listdir(str(directory))]


# docs/faults.rst, "A guest streams output without bound": collected output is capped, prefixing is linear.

def test_json_output_is_capped_and_says_so(world):
    status, out, err = run_cli(world, '--json', '--max-output', '1K', '-e', 'bytes 100000', 'alpha', 'gamma.3')
    assert status == 0, err
    for line in out.splitlines():
        result = json.loads(line.decode())
        assert result['stdout'] == 'x' * 1024 and result['stdout_truncated'] and not result['stderr_truncated']


def test_the_api_collects_at_most_its_cap(world):
    from negotiator_host import GuestChannel
    with GuestChannel('alpha') as guest:
        result = guest.execute('bytes', '3000000', max_output=1000)
        assert (result.stdout, result.stdout_truncated) == (b'x' * 1000, True)
        result = guest.execute('bytes', '3000000')
        assert (len(result.stdout), result.stdout_truncated) == (min(3000000, DEFAULT_MAX_OUTPUT), False)


def test_a_guest_streaming_a_lot_cannot_swell_the_cli(world, tmp_path):
    streamed = 256 * 1024 * 1024
    with open(str(tmp_path / 'out'), 'wb') as out:
        process = start_measured(cli_command('--json', '-t', '120', '-e', 'bytes %d' % streamed, 'alpha'),
                                 tmp_path / 'peak', stdout=out, stderr=subprocess.DEVNULL, env=world.environ)
        assert process.wait(180) == 0
    with open(str(tmp_path / 'out'), 'rb') as handle:
        result = json.loads(handle.read().decode())
    assert len(result['stdout']) == DEFAULT_MAX_OUTPUT and result['stdout_truncated']
    peak = peak_rss(tmp_path / 'peak')
    print('CLI peak RSS with %d MiB streamed in --json: %.0f MiB' % (streamed >> 20, peak / 2 ** 20))
    assert peak < 10 * DEFAULT_MAX_OUTPUT < streamed


class _Collect(object):
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data

    def flush(self):
        pass


def test_the_prefixer_holds_at_most_one_piece_of_a_line_without_newline():
    target = _Collect()
    prefixer = _LinePrefixer(b'g: ', target, threading.Lock())
    for _ in range(8):
        prefixer.write(b'z' * 100000)
        assert len(prefixer.partial) < MAX_PENDING_LINE
    prefixer.write(b'\nnext')
    prefixer.close()
    lines = bytes(target.data).split(b'\n')
    assert lines.pop() == b''
    assert all(line.startswith(b'g: ') for line in lines) and lines[-1] == b'g: next'
    assert b''.join(line[3:] for line in lines[:-1]) == b'z' * 800000
    assert max(len(line) for line in lines) == 3 + MAX_PENDING_LINE


# docs/faults.rst, "A request the agent cannot take": what the agent would refuse is refused before sending.

@pytest.mark.parametrize('args', [
    ['--stdin', '-e', 'cat-stdin', 'odd'],
    ['-t', '3', '-e', os.fsdecode(b'echo-args \xff'), 'alpha'],
    ['-t', '100000', '-e', 'echo-args x', 'alpha'],
])
def test_requests_over_the_agents_limits_are_usage_errors(world, args):
    # odd plays an agent older than streamed input: it takes input in the request only (8 MiB).
    world.odd_replies['hello'] = OLD_HELLO
    status, out, err = run_cli(world, *args, stdin=b'x' * (9 * 1024 * 1024))
    assert_one_line_error(status, err, 64)
    assert b'the agent' in err or b'UTF-8' in err


@pytest.fixture
def small_agent():
    """An AgentClient talking to an agent that reads lines of 4 KiB at most, over a socket pair."""
    ours, theirs = socket.socketpair()
    service = AgentService('negotiator-guest', CommandRegistry([]), limits=Limits(max_line_length=4096))
    server = Endpoint(Transport.from_socket(theirs), service.dispatcher(), name='agent').start()
    endpoint = Endpoint(Transport.from_socket(ours), name='client').start()
    client = AgentClient(endpoint, endpoint.handshake(30))
    yield client
    endpoint.close()
    server.close()


def test_a_request_longer_than_the_agents_line_is_refused_before_sending(small_agent):
    with pytest.raises(UnsendableRequest, match='4096'):
        small_agent.execute('echo', 'x' * 5000, timeout=3)
    with pytest.raises(UnsendableRequest, match='UTF-8'):
        small_agent.execute('echo', os.fsdecode(b'\xff'), timeout=3)


def test_a_command_that_ignores_sigterm_is_answered_before_the_callers_deadline(tmp_path):
    # The agent replies only after SIGKILL, kill_grace (2 s) after its own timeout: the command's
    # timeout leaves room for that grace, so the caller gets CommandTimedOut, not CallTimeout.
    commands = tmp_path / 'commands'
    commands.mkdir()
    stubborn = commands / 'stubborn'
    stubborn.write_text('#!/bin/sh\ntrap "" TERM\nsleep 30\n')
    stubborn.chmod(0o755)
    ours, theirs = socket.socketpair()
    service = AgentService('negotiator-guest', CommandRegistry([str(commands)], builtins=False))
    server = Endpoint(Transport.from_socket(theirs), service.dispatcher(), name='agent').start()
    endpoint = Endpoint(Transport.from_socket(ours), name='client').start()
    try:
        client = AgentClient(endpoint, endpoint.handshake(30))
        with pytest.raises(CommandTimedOut) as excinfo:
            client.execute('stubborn', timeout=6)
        assert excinfo.value.data['signal'] == signal.SIGKILL
    finally:
        endpoint.close()
        server.close()


# docs/faults.rst, "Odd input to a CLI, or a reply out of the spec": no traceback for any input, every status in
# the table.

@pytest.mark.parametrize('args,stdin,expected', [
    (['-t', '1e10', '-e', 'echo-args x', 'alpha'], b'', 64),
    ([os.fsdecode(b'al\xffpha'), '-p'], b'', 64),
    (['--max-output', 'lots', '-j', '-e', 'true', 'alpha'], b'', 64),
    (['--stdin', '-e', 'cat-stdin', 'alpha'], None, 64),
])
def test_odd_input_gets_a_status_from_the_table_not_a_traceback(world, args, stdin, expected):
    if stdin is None:  # standard input closed, as with <&- in a shell
        process = subprocess.run(cli_command(*args), stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=world.environ, timeout=60)
        status, err = process.returncode, process.stderr
    else:
        status, out, err = run_cli(world, *args, stdin=stdin)
    assert_one_line_error(status, err, expected)


def test_timeouts_are_bounded_below_what_a_wait_can_take():
    assert parse_timeout(str(MAX_TIMEOUT_OPTION)) == MAX_TIMEOUT_OPTION < threading.TIMEOUT_MAX
    with pytest.raises(UsageError):
        parse_timeout(str(MAX_TIMEOUT_OPTION + 1))


@pytest.mark.parametrize('reply', [
    {'exit_status': 256, 'duration': 0.1},
    {'exit_status': -1, 'duration': 0.1},
    {'exit_status': True, 'duration': 0.1},
    {'exit_status': 0, 'duration': 'soon'},
    {'exit_status': 0, 'duration': -1},
    {'exit_status': None, 'signal': None, 'duration': 0.1},
    {'exit_status': None, 'signal': 200, 'duration': 0.1},
    {'exit_status': 0, 'duration': 0.1, 'stdout_truncated': 'no'},
    ['not', 'an', 'object'],
])
def test_replies_out_of_range_are_protocol_errors(world, reply):
    world.odd_replies['execute'] = reply
    status, out, err = run_cli(world, '-e', 'true', 'odd')
    assert_one_line_error(status, err, 70)
    from negotiator_host import GuestChannel
    with GuestChannel('odd') as guest, pytest.raises(InvalidRequest):
        guest.execute('true')


def test_a_command_killed_by_a_signal_gives_128_plus_it_and_says_so(world):
    world.odd_replies['execute'] = {'exit_status': None, 'signal': 9, 'duration': 0.1}
    status, out, err = run_cli(world, '-e', 'true', 'odd')
    assert (status, out, err) == (137, b'', b'negotiator-host: true in odd was ended by signal 9 (SIGKILL)\n')


def test_text_from_a_guest_reaches_the_terminal_escaped(world):
    world.odd_replies.update(hello={'protocol': 1, 'agent': 'negotiator-guest', 'version': '1' + ESCAPE,
                                    'capabilities': [], 'limits': {}},
                             list_commands={'commands': [{'name': 'evil' + ESCAPE, 'builtin': False,
                                                          'description': ''}]},
                             execute=CommandNotFound('no such command' + ESCAPE))
    for args in (['-p', 'odd'], ['-c', 'odd'], ['-c', 'odd', 'alpha'], ['-e', 'x', 'odd'], ['-g']):
        status, out, err = run_cli(world, *args)
        assert b'\x1b' not in out + err and b'\x07' not in out + err, args
    assert b'\\x1b]0;owned\\x07\\x1b[2J' in run_cli(world, '-c', 'odd')[1]
    assert printable('tab\there \u202e\udcff ok') == 'tab\\x09here \\u202e\\udcff ok'


def test_guest_cli_escapes_the_hosts_names_and_descriptions(monkeypatch, capsys):
    from negotiator_guest.client import HostClient
    listing = [CommandDescription('a' + ESCAPE, False, 'b' + ESCAPE)]
    monkeypatch.setattr(HostClient, 'list_commands', lambda client: listing)
    assert guest_cli.run(['-l', '-c', '/nonexistent']) == 0
    out = capsys.readouterr().out
    assert '\x1b' not in out and out.startswith('a\\x1b]0;owned') and 'b\\x1b]0;owned' in out
    assert '\x1b' not in format_commands(listing, ['guest' + ESCAPE])


def test_both_clis_print_a_failure_in_one_json_shape(world, tmp_path, capsys):
    status, out, err = run_cli(world, '--json', '-p', 'nosuch')
    host = json.loads(out.decode())
    assert guest_cli.run(['--json', '-l', '-c', str(tmp_path / 'vport9p9')]) == status == 69
    guest = json.loads(capsys.readouterr().out)
    assert (host.pop('guest'), host.pop('ok')) == ('nosuch', False)
    assert sorted(host) == sorted(guest) == ['error', 'exit_status'] and host['exit_status'] == guest['exit_status']
    assert sorted(host['error']) == sorted(guest['error']) == ['code', 'data', 'message', 'type']


def test_guest_cli_with_standard_input_closed_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'stdin', None)
    assert guest_cli.run(['-c', '/nonexistent', '--stdin', '-e', 'cat']) == 64
    assert 'standard input is closed' in capsys.readouterr().err


# A closed pipe, and Ctrl-C.

@pytest.mark.parametrize('how', ['one guest', 'several guests', 'json'])
def test_a_closed_pipe_ends_quietly_with_141_and_the_guests_commands_end(world, tmp_path, how):
    args = {'one guest': ['-e', 'flood-pid %s' % tmp_path, 'alpha'],
            'several guests': ['-e', 'flood-pid %s' % tmp_path, 'alpha', 'gamma.3'],
            'json': ['--json', '-e', 'bytes 4000000', 'alpha']}[how]
    process = subprocess.Popen(cli_command('-t', '0', *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=world.environ)
    try:
        assert process.stdout.read(1)
        process.stdout.close()
        assert process.wait(timeout=30) == 141
        assert process.stderr.read() == b''
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    pids = [int(name) for name in os.listdir(str(tmp_path))]
    assert wait_dead(*pids, timeout=10)


@pytest.mark.parametrize('args,guests', [
    (['--json', 'alpha'], 1),
    (['alpha', 'gamma.3'], 2),
    (['--all', '--json'], 4),
])
def test_ctrl_c_cancels_the_calls_in_the_guests_and_exits_130(world, tmp_path, args, guests):
    process = subprocess.Popen(cli_command('-t', '0', '-e', 'sleep-pid %s' % tmp_path, *args),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=world.environ,
                               preexec_fn=interruptible)
    try:
        pids = wait_for_pids(tmp_path, guests)
        process.send_signal(signal.SIGINT)
        # A liveness bound, not a timing claim: the command would run 60 s.
        assert process.wait(timeout=10) == 130
        assert process.stderr.read().strip() == b'negotiator-host: interrupted'
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert wait_dead(*pids, timeout=10)

