"""The command registry and runner, with real executables in a temporary commands directory."""

import json
import os
import socket
import threading
import time

import pytest

from negotiator_common.builtin_commands import DiskUsage
from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    CommandFailed, CommandNotFound, CommandTimedOut, InvalidParams, LimitExceeded,
)
from negotiator_common.runner import run_process
from negotiator_common.service import AgentService, Limits
from negotiator_common.transport import Transport

from support import result_or_error, write_command
from waiting import wait_dead, wait_until


@pytest.fixture
def commands_dir(tmp_path):
    directory = tmp_path / 'commands'
    directory.mkdir()
    os.chmod(str(directory), 0o755)
    write_command(directory, 'args', '#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n')
    write_command(directory, 'fail', '#!/bin/sh\necho out; echo err >&2; exit 3\n')
    write_command(directory, 'cat', '#!/bin/sh\nexec cat\n')
    write_command(directory, 'binary', '#!/bin/sh\nprintf "\\377\\376\\000x"\n')
    write_command(directory, 'env', '#!/bin/sh\nexec env\n')
    write_command(directory, 'big', '#!/bin/sh\nhead -c "$1" /dev/zero\n')
    write_command(directory, 'sleepy', '#!/bin/sh\necho started; sleep 30 & echo $! > "$1"; wait\n')
    write_command(directory, 'stubborn', '#!/bin/sh\ntrap "" TERM\necho $$ > "$1"\nwhile :; do sleep 0.1; done\n')
    write_command(directory, 'leaver', '#!/bin/sh\nsleep 30 > /dev/null 2>&1 &\necho $! > "$1"\n')
    write_command(directory, 'not-executable', '#!/bin/sh\necho no\n', mode=0o644)
    write_command(directory, 'writable', '#!/bin/sh\necho no\n', mode=0o777)
    write_command(directory, '.hidden', '#!/bin/sh\necho no\n')
    return directory


@pytest.fixture
def agent(commands_dir):
    """An AgentClient talking to a real AgentService over a socket pair."""
    server_sock, client_sock = socket.socketpair()
    service = AgentService('negotiator-test', CommandRegistry([str(commands_dir)]),
                           environment=lambda peer: {'NEGOTIATOR_GUEST': peer},
                           limits=Limits(max_stdin=2 * 1024 * 1024, max_args=10000))
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='guest-ü.1').start()
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    client.handshake(timeout=30)
    yield AgentClient(client)
    client.close()
    server.close()


def test_listing_shows_usable_commands_and_builtins(commands_dir):
    names = [c.name for c in CommandRegistry([str(commands_dir)]).list()]
    assert 'args' in names and 'fail' in names
    for builtin in ('os-release', 'hostname', 'uptime', 'ip-addresses', 'disk-usage'):
        assert builtin in names
    assert 'not-executable' not in names
    assert 'writable' not in names  # writable by group and others: refused
    assert '.hidden' not in names


@pytest.mark.parametrize('name', ['../x', 'x;id', '.hidden', '/bin/id', '', '-x', 'a/b', 'x y', 'ü', 'x' * 300, 5])
def test_refused_names(commands_dir, name):
    with pytest.raises(CommandNotFound):
        CommandRegistry([str(commands_dir)]).resolve(name)


def test_world_writable_directory_is_refused(commands_dir):
    os.chmod(str(commands_dir), 0o777)
    try:
        with pytest.raises(CommandNotFound):
            CommandRegistry([str(commands_dir)], builtins=False).resolve('args')
    finally:
        os.chmod(str(commands_dir), 0o755)


def test_link_out_of_the_directory_is_refused(commands_dir, tmp_path):
    outside = write_command(tmp_path, 'outside', '#!/bin/sh\necho outside\n')
    os.symlink(outside, os.path.join(str(commands_dir), 'escape'))
    os.symlink('args', os.path.join(str(commands_dir), 'alias'))
    registry = CommandRegistry([str(commands_dir)])
    with pytest.raises(CommandNotFound):
        registry.resolve('escape')
    assert registry.resolve('alias').path.endswith('alias')


def test_arguments_arrive_byte_for_byte_without_a_shell(agent, tmp_path):
    marker = tmp_path / 'pwned'
    args = ['a b', '"q"', "'s'", 'x;touch %s' % marker, '$(touch %s)' % marker, '`id`', 'back\\slash',
            'tab\there', 'ünïcödé', '', '*']
    result = agent.execute('args', *args)
    assert result.exit_status == 0
    assert result.stdout.decode('utf-8') == ''.join('[%s]\n' % a for a in args)
    assert not marker.exists()


def test_exit_status_and_separate_streams(agent):
    result = agent.execute('fail')
    assert (result.exit_status, result.stdout, result.stderr) == (3, b'out\n', b'err\n')
    with pytest.raises(CommandFailed) as caught:
        agent.execute('fail', check=True)
    assert caught.value.exit_status == 3 and caught.value.stdout == b'out\n' and caught.value.stderr == b'err\n'


def test_stdin_and_binary_output(agent):
    data = os.urandom(1024 * 1024)
    assert agent.execute('cat', input=data).stdout == data
    assert agent.execute('binary').stdout == b'\xff\xfe\x00x'
    assert agent.execute('cat').stdout == b''  # no input: empty stdin, not a hang


def test_clean_environment(agent):
    lines = agent.execute('env').stdout.decode().splitlines()
    environment = dict(line.split('=', 1) for line in lines)
    assert environment['NEGOTIATOR_GUEST'] == 'guest-ü.1'
    assert environment['NEGOTIATOR_COMMAND'] == 'env'
    assert set(environment) <= {'PATH', 'LANG', 'LC_ALL', 'HOME', 'PWD', 'NEGOTIATOR_GUEST', 'NEGOTIATOR_COMMAND',
                                'NEGOTIATOR_RUN'}
    assert len(environment['NEGOTIATOR_RUN']) == 24  # a random marker of this one run


def test_policy_refuses_as_if_the_command_were_missing():
    server_peer_refused = AgentService('t', CommandRegistry([]), policy=lambda peer, name: False)
    sock_a, sock_b = socket.socketpair()
    server = Endpoint(Transport.from_socket(sock_a), server_peer_refused.dispatcher(), name='refused-peer').start()
    client = Endpoint(Transport.from_socket(sock_b), name='c').start()
    try:
        with pytest.raises(CommandNotFound):
            AgentClient(client).execute('hostname')
        assert AgentClient(client).list_commands() == []
    finally:
        client.close()
        server.close()


def test_unknown_command_and_bad_params(agent):
    with pytest.raises(CommandNotFound):
        agent.execute('no-such-command')
    with pytest.raises(InvalidParams):
        agent.endpoint.call('execute', {'command': 'args', 'args': [1, 2]})
    with pytest.raises(InvalidParams):
        agent.endpoint.call('execute', {'command': 'args', 'args': ['a\0b']})
    with pytest.raises(InvalidParams):
        agent.endpoint.call('execute', {'command': 'args', 'timeout': -1})
    with pytest.raises(LimitExceeded):
        agent.execute('args', 'x' * 20000)
    with pytest.raises(LimitExceeded):  # input in the request, over max_stdin (streamed input has no bound)
        agent.endpoint.call('execute', {'command': 'cat', 'stdin': 'x' * (3 * 1024 * 1024)})
    assert agent.execute('cat', input=b'x' * (3 * 1024 * 1024)).stdout == b'x' * (3 * 1024 * 1024)


def test_timeout_kills_the_whole_process_group(agent, tmp_path):
    pidfile = tmp_path / 'child.pid'
    started = time.monotonic()
    with pytest.raises(CommandTimedOut):
        agent.execute('sleepy', str(pidfile), timeout=2.0)
    # Ended at its 2 s timeout, not after the 30 s sleep it was running.
    assert time.monotonic() - started < 16
    assert wait_dead(int(pidfile.read_text()), timeout=3.0)
    # The next call gets its own reply.
    assert agent.execute('args', 'next').stdout == b'[next]\n'


def test_command_runs_in_a_session_of_its_own(commands_dir):
    script = write_command(commands_dir, 'session', '#!/bin/sh\ncat /proc/$$/stat\n')
    chunks = []
    run_process([script], on_output=lambda stream, chunk: chunks.append(chunk))
    fields = b''.join(chunks).decode().rsplit(')', 1)[1].split()
    pid = int(b''.join(chunks).split()[0])
    # Its own process group and session: a timeout's killpg reaches everything it started.
    assert int(fields[2]) == pid and int(fields[3]) == pid


def test_a_command_that_cannot_start_is_reported(commands_dir):
    script = write_command(commands_dir, 'broken', '#!/no/such/interpreter\n')
    with pytest.raises(CommandNotFound, match='cannot start'):
        run_process([script])


def test_command_ignoring_sigterm_is_killed(tmp_path, commands_dir):
    pidfile = tmp_path / 'stubborn.pid'
    result = run_process([os.path.join(str(commands_dir), 'stubborn'), str(pidfile)], timeout=0.5, kill_grace=0.5)
    assert result.timed_out and result.signal == 9
    assert wait_dead(int(pidfile.read_text()), timeout=3.0)


def test_no_orphan_is_left_behind(tmp_path, commands_dir):
    pidfile = tmp_path / 'leaver.pid'
    result = run_process([os.path.join(str(commands_dir), 'leaver'), str(pidfile)], timeout=10)
    assert result.exit_status == 0
    assert wait_dead(int(pidfile.read_text()), timeout=3.0)


def test_cancellation_stops_a_command(tmp_path, commands_dir):
    cancelled = threading.Event()
    pidfile = tmp_path / 'child.pid'
    threading.Timer(0.3, cancelled.set).start()
    result = run_process([os.path.join(str(commands_dir), 'sleepy'), str(pidfile)], cancelled=cancelled)
    assert result.cancelled and not result.timed_out
    assert wait_dead(int(pidfile.read_text()), timeout=3.0)


def test_output_cap_sets_the_truncation_flag(commands_dir):
    chunks = []
    result = run_process([os.path.join(str(commands_dir), 'big'), '300000'], max_output=100000,
                         on_output=lambda stream, chunk: chunks.append(chunk))
    assert sum(len(c) for c in chunks) == 100000
    assert result.stdout_truncated and not result.stderr_truncated and result.exit_status == 0


def test_large_output_streams_intact(agent):
    # 20 MiB is over the default cap on collected output (16 MiB): this caller asks for more.
    result = agent.execute('big', str(20 * 1024 * 1024), timeout=30, max_output=32 * 1024 * 1024)
    assert len(result.stdout) == 20 * 1024 * 1024 and result.stdout.count(b'\0') == len(result.stdout)
    assert not result.stdout_truncated


def test_slow_command_never_delays_a_ping(agent, commands_dir, tmp_path):
    # The command runs until the test lets it end: a ping and a listing answered before that
    # were never queued behind it.
    write_command(commands_dir, 'gated', '#!/bin/sh\necho started > "$1"\nwhile [ ! -e "$2" ]; do sleep 0.05; done\n')
    started, release = tmp_path / 'started', tmp_path / 'release'
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(result_or_error(agent.execute, 'gated', str(started),
                                                                     str(release), timeout=30)))
    thread.start()
    try:
        assert wait_until(started.exists), 'the command never started'
        assert agent.ping(timeout=5) >= 0
        assert 'args' in [c.name for c in agent.list_commands(timeout=5)]
        assert not outcome, 'the command ended before the ping: this test proved nothing'
    finally:
        release.touch()
        thread.join(10)
    assert outcome and getattr(outcome[0], 'exit_status', None) == 0, outcome


def test_builtins(agent):
    facts = json.loads(agent.execute('os-release', '--json').stdout.decode())
    assert 'ID' in facts
    assert agent.execute('hostname').stdout.decode().strip() == socket.gethostname()
    assert json.loads(agent.execute('uptime', '--json').stdout.decode())['uptime_seconds'] > 0
    mounts = json.loads(agent.execute('disk-usage', '--json').stdout.decode())
    assert any(m['mountpoint'] == '/' for m in mounts)
    addresses = json.loads(agent.execute('ip-addresses', '--json').stdout.decode())
    assert any(a['address'] == '127.0.0.1' for a in addresses)
    assert agent.execute('hostname', '--bogus').exit_status == 2


def test_disk_usage_reports_a_hung_mount_without_piling_up_threads():
    """A statvfs that never returns (a dead NFS server): the call answers, and later calls start no new thread."""
    release = threading.Event()
    calls = []

    def statvfs(path):
        calls.append(path)
        if path == '/hung':
            release.wait(30)
        return os.statvfs('/')
    mounts = [('server:/export', '/hung', 'nfs4'), ('/dev/vda1', '/', 'ext4')]
    disk_usage = DiskUsage(statvfs=statvfs, mounts=lambda: mounts, timeout=0.2)
    try:
        for _ in range(3):
            status, stdout, _ = disk_usage(['--json'])
            by_mount = {fs['mountpoint']: fs for fs in json.loads(stdout.decode())}
            assert status == 0 and by_mount['/hung']['responding'] is False
            assert by_mount['/']['responding'] and by_mount['/']['total_bytes'] > 0
        assert calls.count('/hung') == 1 and calls.count('/') == 3
        assert b'/hung                    not responding' in disk_usage([])[1]
        release.set()
        # Once the mount answers, it is reported again.
        assert wait_until(lambda: json.loads(disk_usage(['--json'])[1].decode())[0]['responding'])
    finally:
        release.set()


def test_listing_is_answered_even_when_every_handler_slot_is_busy(commands_dir, tmp_path):
    # list_commands is answered on the reading thread (no thread to start per call): commands
    # filling every slot of the connection never make a listing fail with LimitExceeded.
    server_sock, client_sock = socket.socketpair()
    service = AgentService('negotiator-test', CommandRegistry([str(commands_dir)]))
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='host',
                      max_concurrent=1).start()
    client = AgentClient(Endpoint(Transport.from_socket(client_sock), name='client').start())
    outcome = []
    busy = threading.Thread(target=lambda: outcome.append(result_or_error(client.execute, 'sleepy', str(tmp_path / 'p'),
                                                                   timeout=2)))
    busy.start()
    try:
        assert wait_until(lambda: (tmp_path / 'p').exists(), 3), 'the command never started'
        with pytest.raises(LimitExceeded):
            client.execute('args', timeout=2)
        assert 'args' in [c.name for c in client.list_commands(timeout=2)]
    finally:
        busy.join(10)
        client.endpoint.close()
        server.close()
    assert len(outcome) == 1 and isinstance(outcome[0], CommandTimedOut), outcome
