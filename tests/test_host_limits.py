"""The host daemon's bounds across guests: commands at once, a fair bounded queue, the longest timeout."""

import os
import subprocess
import sys
import threading

import pytest

from negotiator_common.errors import InvalidParams, LimitExceeded, NegotiatorError
from negotiator_host.daemon import DEFAULT_MAX_TIMEOUT, HostDaemon
from negotiator_host.discovery import GUEST_TO_HOST_CHANNEL, LibvirtPaths

from test_host_daemon import FakeGuestSide
from test_host_support import GUEST_COMMANDS, FakeLibvirt, make_commands_dir, short_tempdir
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

    def waiting():
        with open(daemon_log) as handle:
            return handle.read().count('waits for a slot')
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
        assert wait_until(lambda: waiting() == 2, timeout=10)
        # Two run and two wait: the next request is refused at once, whichever guest sends it.
        with pytest.raises(LimitExceeded):
            clients['g1'].execute('hold', str(record), timeout=25)
        with pytest.raises(LimitExceeded):
            clients['g3'].execute('hold', str(record), timeout=25)
        assert clients['g2'].ping(timeout=5) < 5  # a guest whose command waits is still answered
        assert len(os.listdir(str(record / 'running'))) == 2
        open(str(record / 'release'), 'w').close()
        for thread in threads:
            thread.join(30)
        assert outcomes == {'g1-a': 0, 'g1-b': 0, 'g2-a': 0, 'g3-a': 0}
        with open(str(record / 'log')) as handle:
            runs = [line.split() for line in handle]
        assert sorted(guest for guest, _ in runs) == ['g1', 'g1', 'g2', 'g3']
        assert max(int(count) for _, count in runs) == 2
    finally:
        open(str(record / 'release'), 'w').close()
        process.terminate()
        process.wait(10)
        for side in sides.values():
            side.close()
        fake.cleanup()
