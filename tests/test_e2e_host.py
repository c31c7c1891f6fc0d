"""
End to end, host to guest: the installed ``negotiator-host`` CLI and the Python API against two
real libvirt/QEMU guests, each running ``negotiator-guest --daemon`` under supervisord.

Why: only a real guest proves that discovery finds libvirt's sockets, that the virtio-serial
port carries every byte (arguments, binary input and output, 64 MiB), that timeouts, parallel
callers and garbage on the channel leave the agent serving. The two guests boot once for the
whole module (about 20 s) and the tests share them: none of them disturbs the agents.
"""

import hashlib
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import vm_host  # noqa: E402,F401 (a fixture)
from e2e_support import HOST_CLI, host_cli, remove_guests, start_agents  # noqa: E402
from measuring import peak_rss, start_measured  # noqa: E402
from waiting import wait_until  # noqa: E402

from negotiator_common.errors import CommandNotFound, CommandTimedOut  # noqa: E402
from negotiator_host import GuestChannel, map_guests  # noqa: E402

pytestmark = pytest.mark.vm

CHANNEL = 'negotiator-host-to-guest.0'

COMMANDS = {
    # Its arguments, NUL-separated, exactly as the guest received them.
    'argv': '#!/bin/sh\nprintf "%s\\0" "$@"\n',
    'status': '#!/bin/sh\nexit "$1"\n',
    'signal': '#!/bin/sh\nkill -TERM $$\n',
    'split': '#!/bin/sh\nprintf "to stdout\\n"\nprintf "to stderr\\n" >&2\nexit 3\n',
    'sha': '#!/bin/sh\nsha256sum | cut -d" " -f1\n',
    'binary': '#!/bin/sh\nprintf "\\377\\376\\000\\200 not UTF-8\\n"\n',
    'catfile': '#!/bin/sh\nexec cat "$1"\n',
    'slow': '#!/bin/sh\necho started\nexec sleep 60\n',
    'echo-later': '#!/bin/sh\nsleep 0.5\nprintf "%s\\n" "$1"\n',
    # held-echo TAG WORD: says it started, waits for ``release TAG``, then prints WORD.
    'held-echo': ('#!/bin/sh\ntouch "/tmp/held-$1-$2"\n'
                  'while [ ! -e "/tmp/release-$1" ]; do sleep 0.1; done\nprintf "%s\\n" "$2"\n'),
    'count-held': '#!/bin/sh\nls /tmp | grep -c "^held-$1-" || true\n',
    'release': '#!/bin/sh\ntouch "/tmp/release-$1"\n',
}

TRICKY_ARGS = [
    'with space', "single ' quote", 'double " quote', 'semi;colon', '$(touch /tmp/pwned)', '`touch /tmp/pwned`',
    'back\\slash \\n', 'tab\there', 'ünïcödé 日本語 ✓', '', 'new\nline', '*', '--option-like', '-', '  padded  ',
    '$HOME', '|&<>', '',
]


@pytest.fixture(scope='module')
def guests(vm_host):  # noqa: F811 (the fixture)
    started = time.monotonic()
    pair = start_agents(vm_host, [dict(COMMANDS, ident='#!/bin/sh\necho guest-%s\necho second line\n' % tag)
                                  for tag in 'AB'])
    print('two agent guests answered %.1f s after the start' % (time.monotonic() - started))
    yield pair
    remove_guests(pair)


@pytest.fixture(scope='module')
def guest(guests):
    return guests[0]


def execute(guest, command_line, *options, **kwargs):
    return host_cli('--execute', command_line, guest.name, *options, **kwargs)


# Discovery: guests are found by name through libvirt.

def test_list_guests_shows_both_guests_reachable(guests):
    result = host_cli('--list-guests', '--json')
    assert result.returncode == 0, result.stderr
    rows = {row['name']: row for row in json.loads(result.stdout.decode())}
    for guest in guests:
        row = rows[guest.name]
        assert row['state'] == 'running' and row['reachable'] is True, row
        assert row['agent'] == 'negotiator-guest' and row['rtt'] > 0
        assert row['channel'] == guest.channel_path(CHANNEL)
    text = host_cli('--list-guests')
    assert text.returncode == 0
    for guest in guests:
        line = [line for line in text.stdout.decode().splitlines() if guest.name in line]
        assert line and 'running' in line[0] and 'yes' in line[0], text.stdout


def test_ping_and_list_commands_by_name(guest):
    result = host_cli('--ping', guest.name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith('%s: agent negotiator-guest ' % guest.name)
    result = host_cli('--list-commands', guest.name)
    assert result.returncode == 0, result.stderr
    names = result.stdout.decode().split()
    assert set(COMMANDS) | {'ident', 'os-release', 'hostname', 'uptime'} <= set(names)


def test_unknown_guest_and_unknown_command_fail_with_their_statuses(guest):
    result = host_cli('--ping', guest.name + '-no-such-guest')
    assert result.returncode == 69 and b'no-such-guest' in result.stderr
    result = execute(guest, 'no-such-command')
    assert result.returncode == 77 and b'no-such-command' in result.stderr


# --execute: bytes and statuses.

def test_arguments_arrive_byte_for_byte(guest):
    result = execute(guest, 'argv ' + ' '.join(shlex.quote(arg) for arg in TRICKY_ARGS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b''.join(arg.encode('utf-8') + b'\0' for arg in TRICKY_ARGS)
    assert result.stderr == b''
    # And no shell ran them: the command substitutions created nothing.
    assert execute(guest, 'status 0').returncode == 0
    check = execute(guest, 'catfile /tmp/pwned')
    assert check.returncode != 0 and b'No such file' in check.stderr


def test_remote_exit_status_becomes_the_clis(guest):
    for status in (0, 1, 3, 42, 255):
        assert execute(guest, 'status %d' % status).returncode == status
    assert execute(guest, 'signal').returncode == 128 + 15


def test_stdout_and_stderr_are_kept_apart(guest):
    result = execute(guest, 'split')
    assert (result.returncode, result.stdout, result.stderr) == (3, b'to stdout\n', b'to stderr\n')


def test_one_mib_of_binary_stdin(guest):
    data = os.urandom(1024 * 1024)
    result = host_cli('--stdin', '--execute', 'sha', guest.name, input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


def test_non_utf8_output(guest):
    result = execute(guest, 'binary')
    assert result.returncode == 0 and result.stdout == b'\xff\xfe\x00\x80 not UTF-8\n'
    result = host_cli('--json', '--execute', 'binary', guest.name)
    data = json.loads(result.stdout.decode())
    assert data['ok'] and data['guest'] == guest.name
    assert 'stdout' not in data and data['stdout_b64'] == '//4AgCBub3QgVVRGLTgK'


def test_64_mib_output_streams_intact_in_bounded_memory(guest, tmp_path):
    # The guest reads the file from the host's /var/tmp (its own, read-only, over 9p).
    path = os.path.join(guest.workdir, 'big.bin')
    expected = hashlib.sha256()
    with open(path, 'wb') as handle:
        for _ in range(64):
            chunk = os.urandom(1024 * 1024)
            expected.update(chunk)
            handle.write(chunk)
    started = time.monotonic()
    report = tmp_path / 'peak'
    process = start_measured([HOST_CLI, '--timeout', '120', '--execute', 'catfile ' + path, guest.name], report,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    received = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: process.stdout.read(1024 * 1024), b''):
        received.update(chunk)
        size += len(chunk)
    errors = process.stderr.read()
    process.wait()
    seconds = time.monotonic() - started
    os.unlink(path)
    assert process.returncode == 0, errors
    assert size == 64 * 1024 * 1024 and received.hexdigest() == expected.hexdigest()
    max_rss_mib = peak_rss(report) / 2.0 ** 20
    print('64 MiB in %.1f s (%.1f MiB/s), CLI peak RSS %.1f MiB' % (seconds, 64 / seconds, max_rss_mib))
    assert max_rss_mib < 100, 'the CLI held the output in memory: peak RSS %.1f MiB' % max_rss_mib


def test_timeout_bounds_a_slow_command_and_the_next_call_gets_its_own_reply(guest):
    started = time.monotonic()
    result = execute(guest, 'slow', '--timeout', '4')
    elapsed = time.monotonic() - started
    assert result.returncode == 75, (result.returncode, result.stderr)
    # Honoured: nowhere near the command's 60 s of sleep.
    assert elapsed < 30, 'took %.1f s for --timeout 4' % elapsed
    assert b'slow' in result.stderr and (b'killed' in result.stderr or b'did not reply' in result.stderr)
    after = execute(guest, 'argv next-call')
    assert (after.returncode, after.stdout) == (0, b'next-call\0')


# Many callers, many guests.

def test_eight_cli_calls_at_once_each_get_their_own_answer(guest):
    processes = [subprocess.Popen([HOST_CLI, '--timeout', '60', '--execute', 'echo-later caller-%d' % number,
                                   guest.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for number in range(8)]
    outputs = [process.communicate(timeout=90) for process in processes]
    for number, (process, (stdout, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, stderr
        assert stdout == b'caller-%d\n' % number


def test_all_over_two_guests(guests):
    names = {guest.name: tag for guest, tag in zip(guests, 'AB')}
    # Other guests may run on this machine (other test sessions): only ours are checked, and
    # a short --timeout bounds the wait for those that do not answer.
    result = host_cli('--all', '--timeout', '6', '--execute', 'ident')
    lines = result.stdout.decode().splitlines()
    for name, tag in names.items():
        assert [line for line in lines if line.startswith(name + ': ')] == [
            '%s: guest-%s' % (name, tag), '%s: second line' % name], result.stdout
    result = host_cli('--all', '--json', '--timeout', '6', '--execute', 'ident')
    objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
    by_guest = {data['guest']: data for data in objects}
    assert len(by_guest) == len(objects), 'one object per guest'
    for name, tag in names.items():
        data = by_guest[name]
        assert data['ok'] and data['exit_status'] == 0 and data['stdout'] == 'guest-%s\nsecond line\n' % tag
    assert (result.returncode == 0) == all(data['ok'] for data in objects)
    # The same two by name, and nothing else.
    result = host_cli('--json', '--execute', 'ident', *sorted(names))
    assert result.returncode == 0
    assert sorted(json.loads(line)['guest'] for line in result.stdout.decode().splitlines()) == sorted(names)


# The Python API.

def test_python_api_on_a_guest_found_by_name(guest):
    with GuestChannel(guest.name, timeout=20) as channel:
        assert channel.hello()['agent'] == 'negotiator-guest'
        assert channel.ping() > 0
        assert {'argv', 'ident'} <= {command.name for command in channel.list_commands()}
        result = channel.execute('argv', *TRICKY_ARGS)
        assert result.exit_status == 0 and result.stdout.split(b'\0')[:-1] == [
            arg.encode('utf-8') for arg in TRICKY_ARGS]
        assert channel.execute('sha', input=b'\x00\xff' * 1000).stdout.decode().strip() == \
            hashlib.sha256(b'\x00\xff' * 1000).hexdigest()
        with pytest.raises(CommandNotFound):
            channel.execute('no-such-command')
        with pytest.raises(CommandTimedOut):
            channel.execute('slow', timeout=3)


def test_python_api_serves_many_threads_over_one_connection(guest):
    """Each thread gets its own reply, and a ping is answered while all of them wait in the guest.

    Proven by order, not by time: the eight commands cannot end before the test releases them,
    so a ping that returns with none of them ended was not queued behind them.
    """
    with GuestChannel(guest.name, timeout=60) as channel:
        results = {}

        def call(number):
            results[number] = channel.execute('held-echo', 'api', 'thread-%d' % number).stdout
        threads = [threading.Thread(target=call, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        try:
            assert wait_until(lambda: channel.execute('count-held', 'api').stdout == b'8\n',
                              timeout=60, interval=0.2), 'the eight commands did not all start'
            assert channel.ping() > 0
            assert results == {} and all(thread.is_alive() for thread in threads)
        finally:
            channel.execute('release', 'api')
            for thread in threads:
                thread.join(60)
        assert results == {number: b'thread-%d\n' % number for number in range(8)}


def test_map_guests_over_both(guests):
    outcomes = map_guests(lambda channel: channel.execute('ident').stdout, [guest.name for guest in guests],
                          timeout=20)
    assert [(outcome.guest, outcome.ok, outcome.result) for outcome in outcomes] == [
        (guest.name, True, b'guest-%s\nsecond line\n' % tag.encode()) for guest, tag in zip(guests, 'AB')]


# Garbage on the channel.

def _send_garbage(guest, payload):
    with guest.connect(CHANNEL, timeout=10) as sock:
        sock.settimeout(60)
        sock.sendall(payload)
        # Then speak properly on the same connection: the agent answers.
        sock.sendall(b'\n{"jsonrpc": "2.0", "id": "after-garbage", "method": "ping"}\n')
        received = [b'']

        def answered():
            chunk = sock.recv(65536)
            assert chunk, 'the agent closed the channel'
            received[0] = received[0][-65536:] + chunk
            return b'"after-garbage"' in received[0]
        assert wait_until(answered, timeout=60, interval=0)


@pytest.mark.parametrize('payload', [
    pytest.param(lambda: bytes(random.Random(5).getrandbits(8) for _ in range(256 * 1024)), id='random-bytes'),
    pytest.param(lambda: b'{"jsonrpc": "2.0", "id": 1, "method": "exec', id='half-json'),
    pytest.param(lambda: b'{"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"x": "' + b'x' * (40 << 20),
                 id='40-mib-line'),
])
def test_garbage_on_the_socket_leaves_the_agent_working(guest, payload):
    started = time.monotonic()
    _send_garbage(guest, payload())
    result = execute(guest, 'argv still-working')
    assert (result.returncode, result.stdout) == (0, b'still-working\0'), result.stderr
    print('garbage handled and a call made in %.1f s' % (time.monotonic() - started))


def test_garbage_on_a_dropped_connection_leaves_the_agent_working(guest):
    # Half a request, then the client vanishes: the next client is not confused by it.
    with guest.connect(CHANNEL, timeout=10) as sock:
        sock.sendall(b'{"jsonrpc": "2.0", "id": 3, "method": "execute", "params": {"command": "ar')
    result = execute(guest, 'argv clean')
    assert (result.returncode, result.stdout) == (0, b'clean\0'), result.stderr
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(guest.channel_path(CHANNEL))
        sock.sendall(os.urandom(4096))
    assert host_cli('--ping', guest.name).returncode == 0
