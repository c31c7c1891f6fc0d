"""The host daemon's bounds across guests: commands at once, a fair bounded queue, the longest timeout."""

import os
import subprocess
import sys
import threading

import pytest

from negotiator_common import workers
from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.errors import InvalidParams, LimitExceeded, NegotiatorError
from negotiator_host.daemon import DEFAULT_MAX_TIMEOUT, HostDaemon
from negotiator_host.discovery import LibvirtPaths

from fake_libvirt import FakeLibvirt
from support import GUEST_COMMANDS, FakeGuestSide, make_commands_dir, short_tempdir
from waiting import wait_until

HOLD = '''
import os, sys, time
record = sys.argv[1]
me = os.path.join(record, 'running', str(os.getpid()))
open(me, 'w').close()
with open(os.path.join(record, 'log'), 'a') as log:
    log.write('%s %d\\n' % (os.environ['NEGOTIATOR_GUEST'], len(os.listdir(os.path.dirname(me)))))
while not os.path.exists(os.path.join(record, 'release')):
    time.sleep(0.01)
os.unlink(me)
'''
"""Records itself as running (with how many run now, itself included), waits for ``release``."""


def test_a_guest_asking_beyond_the_longest_timeout_is_refused_naming_it():
    guest = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
    daemon = HostDaemon(commands_dirs=[make_commands_dir(short_tempdir(), GUEST_COMMANDS)], watch=False,
                        paths=LibvirtPaths(None, None))
    connection = daemon.serve_socket('web-1', guest.path)
    try:
        client = guest.accept()
        assert client.endpoint.call('hello')['limits']['max_timeout'] == DEFAULT_MAX_TIMEOUT == 600
        with pytest.raises(InvalidParams) as refused:
            client.endpoint.call('execute', {'command': 'echo-args', 'timeout': 3600}, timeout=10)
        assert 'at most 600' in str(refused.value)
        reply = client.endpoint.call('execute', {'command': 'echo-args', 'args': ['ok'], 'timeout': 600}, timeout=10)
        assert reply['stdout'] == 'ok\n'
    finally:
        connection.endpoint.close()
        guest.close()


def test_the_daemon_bounds_are_options_of_the_daemon_only():
    from negotiator_host.cli import UsageError, parse_options
    options = parse_options(['--daemon', '--max-commands', '3', '--max-queued', '0', '--max-timeout', '90.5'])
    assert options.daemon_limits == {'--max-commands': 3, '--max-queued': 0, '--max-timeout': 90.5}
    for wrong in (['--max-commands', '0'], ['--max-commands', '2.5'], ['--max-queued', '-1'],
                  ['--max-timeout', '0'], ['--max-timeout', 'inf'], ['--max-timeout', 'nan']):
        with pytest.raises(UsageError):
            parse_options(['--daemon'] + wrong)
    with pytest.raises(UsageError):
        parse_options(['--ping', 'web-1', '--max-commands', '2'])


def test_host_daemon_runs_at_most_max_commands_across_guests_and_queues_the_next(tmp_path):
    fake = FakeLibvirt()
    commands = make_commands_dir(fake.root, {'hold': HOLD})
    record = tmp_path / 'record'
    (record / 'running').mkdir(parents=True)
    sides = {}
    for number, name in enumerate(('g1', 'g2', 'g3'), 1):
        sides[name] = FakeGuestSide(fake.socket_path(name, number, GUEST_TO_HOST_CHANNEL))
        fake.add_running(name, number)
    daemon_log = str(tmp_path / 'daemon.log')
    with open(daemon_log, 'wb') as stderr:
        process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', commands,
                                    '--max-commands', '2', '--max-queued', '2', '--max-timeout', '30'],
                                   env=fake.environ, stdout=subprocess.DEVNULL, stderr=stderr)
    outcomes = {}
    threads = []

    def hold(key, client):
        try:
            outcomes[key] = client.execute('hold', str(record), timeout=25).exit_status
        except NegotiatorError as exc:
            outcomes[key] = exc

    def start(key, client):
        threads.append(threading.Thread(target=hold, args=(key, client)))
        threads[-1].start()

    def daemon_text():
        with open(daemon_log) as handle:
            return handle.read()
    try:
        clients = {name: side.accept(timeout=10) for name, side in sides.items()}
        assert clients['g1'].endpoint.call('hello')['limits']['max_timeout'] == 30
        with pytest.raises(InvalidParams) as too_long:
            clients['g1'].endpoint.call('execute', {'command': 'hold', 'timeout': 31}, timeout=10)
        assert 'at most 30' in str(too_long.value)
        start('g1-a', clients['g1'])
        start('g1-b', clients['g1'])
        assert wait_until(lambda: len(os.listdir(str(record / 'running'))) == 2, timeout=10)
        start('g2-a', clients['g2'])
        start('g3-a', clients['g3'])
        assert wait_until(lambda: daemon_text().count('waits for a slot') == 2, timeout=10)
        # Two run and two wait: the next request is refused at once, whichever guest sends it.
        with pytest.raises(LimitExceeded):
            clients['g1'].execute('hold', str(record), timeout=25)
        with pytest.raises(LimitExceeded):
            clients['g3'].execute('hold', str(record), timeout=25)
        # A guest whose command waits is still answered: the ping returns while that command waits.
        rtt = clients['g2'].ping(timeout=10)
        assert isinstance(rtt, float) and rtt > 0
        assert 'g2-a' not in outcomes and 'waits for a slot' in daemon_text()
        # A guest that goes away leaves the queue: its place is free for the next request.
        sides['g3'].close()
        assert wait_until(lambda: 'A command of g3 left the queue' in daemon_text(), timeout=10)
        start('g2-b', clients['g2'])
        assert wait_until(lambda: daemon_text().count('waits for a slot') == 3, timeout=10)
        assert len(os.listdir(str(record / 'running'))) == 2
        open(str(record / 'release'), 'w').close()
        for thread in threads:
            thread.join(30)
        assert isinstance(outcomes.pop('g3-a'), NegotiatorError)
        assert outcomes == {'g1-a': 0, 'g1-b': 0, 'g2-a': 0, 'g2-b': 0}
        with open(str(record / 'log')) as handle:
            runs = [line.split() for line in handle]
        assert sorted(guest for guest, _ in runs) == ['g1', 'g1', 'g2', 'g2']
        assert max(int(count) for _, count in runs) == 2
    finally:
        open(str(record / 'release'), 'w').close()
        process.terminate()
        process.wait(10)
        for side in sides.values():
            side.close()
        fake.cleanup()


def _daemon_figures(pid, command):
    """Peak and current memory (MiB) and threads of process ``pid``, and how many of its children run ``command``."""
    with open('/proc/%d/status' % pid) as handle:
        status = dict(line.split(':', 1) for line in handle if ':' in line)
    children = subprocess.run(['pgrep', '-P', str(pid), '-f', command], stdout=subprocess.PIPE).stdout.split()
    return {'peak_mib': int(status['VmHWM'].split()[0]) / 1024.0, 'rss_mib': int(status['VmRSS'].split()[0]) / 1024.0,
            'threads': int(status['Threads']), 'children': len(children)}


def test_fifty_guests_at_their_bound_with_1_mib_of_stdin_stay_below_the_documented_memory(tmp_path):
    """
    50 guests, each with 4 requests (its own bound) of a command that waits, with 1 MiB of binary
    standard input each: the daemon runs 8, queues 32, refuses the rest at once, and its peak
    memory stays below the figure in docs/host.rst (200 MiB). The figures are printed (``pytest -s``).
    """
    fake = FakeLibvirt()
    release = str(tmp_path / 'release')
    commands = str(tmp_path / 'commands')
    os.mkdir(commands)
    hold = os.path.join(commands, 'hold')
    with open(hold, 'w') as handle:
        handle.write('#!/bin/sh\nwhile [ ! -e "$1" ]; do sleep 0.1; done\n')
    os.chmod(hold, 0o755)
    sides = []
    for number in range(1, 51):
        sides.append(FakeGuestSide(fake.socket_path('guest-%d' % number, number, GUEST_TO_HOST_CHANNEL)))
        fake.add_running('guest-%d' % number, number)
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', commands, '-q'],
                               env=fake.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outcomes = []
    stdin = os.urandom(1024 * 1024)

    def call(client):
        try:
            outcomes.append(client.execute('hold', release, input=stdin, timeout=120).exit_status)
        except NegotiatorError as exc:
            outcomes.append(exc)
    threads = []
    try:
        clients = [side.accept(timeout=20) for side in sides]
        for client in clients:
            for _ in range(4):
                threads.append(threading.Thread(target=call, args=(client,)))
                threads[-1].start()
        assert wait_until(lambda: len(outcomes) == 160, timeout=60)
        assert wait_until(lambda: _daemon_figures(process.pid, hold)['children'] == 8, timeout=20)
        figures = _daemon_figures(process.pid, hold)
        print('\n50 guests x 4 requests x 1 MiB stdin: %(peak_mib).0f MiB peak, %(rss_mib).0f MiB now, '
              '%(threads)d threads, %(children)d children' % figures)
        assert all(isinstance(outcome, LimitExceeded) for outcome in outcomes)
        # Before the bound across guests: 596 MiB, 252 threads and 200 children.
        assert figures['peak_mib'] < 200
        # A reading thread per guest, a handler per request held or queued, at most MAX_IDLE idle ones, a few more.
        assert figures['threads'] < 100 + workers.MAX_IDLE
        open(release, 'w').close()
        for thread in threads:
            thread.join(60)
        assert outcomes.count(0) == 40
    finally:
        open(release, 'w').close()
        process.terminate()
        process.wait(10)
        for side in sides:
            side.close()
        fake.cleanup()
