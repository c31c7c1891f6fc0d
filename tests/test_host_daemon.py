"""The host daemon: serving a guest's socket, following libvirt's events, policy, clean stop."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.errors import CommandNotFound
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths
from negotiator_host.policy import Policy, PolicyError

from fake_libvirt import FakeLibvirt
from support import GUEST_COMMANDS, FakeGuestSide, make_commands_dir, result_or_error, short_tempdir
from waiting import process_alive, process_reaped, wait_dead, wait_until


@pytest.fixture
def host_commands():
    return make_commands_dir(short_tempdir(), GUEST_COMMANDS)


def test_serves_a_guest_socket_with_negotiator_guest_set(host_commands):
    guest = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
    daemon = HostDaemon(commands_dirs=[host_commands], watch=False, paths=LibvirtPaths(None, None))
    connection = daemon.serve_socket('web-1.ä', guest.path)
    try:
        client = guest.accept()
        assert client.endpoint.call('hello')['agent'] == 'negotiator-host'
        assert client.execute('whoami-guest').stdout == 'web-1.ä\n'.encode()
        assert client.execute('cat-stdin', input=b'\xff\x00').stdout == b'\xff\x00'
        assert 'echo-args' in [c.name for c in client.list_commands()]
        with pytest.raises(CommandNotFound):
            client.execute('../../bin/sh')
    finally:
        connection.endpoint.close()
        guest.close()


def test_policy_refuses_and_narrows_the_listing(host_commands):
    policy = Policy.parse('[web-*]\nallow = echo-* whoami-guest\n\n[*]\nallow = hostname\n')
    guests = {}
    daemon = HostDaemon(commands_dirs=[host_commands], watch=False, policy=policy, paths=LibvirtPaths(None, None))
    try:
        for name in ('web-1', 'db-1'):
            guests[name] = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
            daemon.serve_socket(name, guests[name].path)
        web, db = guests['web-1'].accept(), guests['db-1'].accept()
        assert web.execute('echo-args', 'x').stdout == b'x\n'
        with pytest.raises(CommandNotFound):
            web.execute('cat-stdin')
        with pytest.raises(CommandNotFound):
            db.execute('echo-args')
        assert [c.name for c in db.list_commands()] == ['hostname']
        assert sorted(c.name for c in web.list_commands()) == ['echo-args', 'hostname', 'whoami-guest']
    finally:
        daemon.stop()
        for connection in list(daemon.connections.values()):
            connection.endpoint.close()
        for guest in guests.values():
            guest.close()


def test_policy_file_format():
    policy = Policy.parse('# comment\n[gäste-*]\nallow = a-* b\n[DEFAULT]\nallow = c\n')
    assert policy.allows('gäste-1', 'a-1') and policy.allows('gäste-1', 'b')
    assert not policy.allows('gäste-1', 'c') and not policy.allows('other', 'b')
    assert policy.allows('DEFAULT', 'c') and not policy.allows('x', 'c')
    with pytest.raises(PolicyError):
        Policy.parse('[web-*]\nalow = x\n')
    with pytest.raises(PolicyError):
        Policy.parse('allow = x\n')
    with pytest.raises(PolicyError):
        Policy.load('/nonexistent/policy.ini')


def test_follows_guests_through_libvirt_events(monkeypatch, host_commands):
    fake = FakeLibvirt().activate(monkeypatch)
    daemon = HostDaemon(commands_dirs=[host_commands], paths=LibvirtPaths(fake.status_dir, fake.channel_dir))
    thread = threading.Thread(target=daemon.run)
    thread.start()
    guest = None
    try:
        assert wait_until(lambda: any('event' in i for i in fake.invocations()))
        # A guest starts: it is listed by virsh, its socket appears, libvirt sends an event.
        path = fake.socket_path('new-guest', 7, GUEST_TO_HOST_CHANNEL)
        guest = FakeGuestSide(path)
        fake.add_running('new-guest', 7)
        # The daemon has no polling loop: only the event makes it connect (accept fails otherwise).
        fake.trigger_event()
        client = guest.accept(timeout=15)
        assert client.execute('whoami-guest').stdout == b'new-guest\n'
        # It stops: the next event drops it.
        fake.rows = []
        fake.write_list()
        fake.trigger_event()
        assert wait_until(lambda: 'new-guest' not in daemon.connections)
        assert wait_until(lambda: guest.endpoint.closed)
        # libvirtd restarts: the watcher ends and is started again.
        watchers = len([i for i in fake.invocations() if 'event' in i])
        fake.set_down()
        watcher = os.path.join(fake.bin_dir, 'virsh') + ' .*event'
        assert wait_until(lambda: not subprocess.run(['pgrep', '-f', watcher], stdout=subprocess.PIPE).stdout)
        fake.set_down(False)
        assert wait_until(lambda: len([i for i in fake.invocations() if 'event' in i]) > watchers, timeout=8)
    finally:
        daemon.stop()
        thread.join(10)
        assert not thread.is_alive()
        if guest is not None:
            guest.close()
        fake.cleanup()


def test_sigterm_stops_cleanly_kills_commands_and_replies_for_them(host_commands):
    # The stop order of both daemons (negotiator_common.stopping): the guest whose command the
    # stop killed gets that command's reply (ended by signal 15), not ConnectionClosed.
    fake = FakeLibvirt()
    path = fake.socket_path('victim', 3, GUEST_TO_HOST_CHANNEL)
    guest = FakeGuestSide(path)
    fake.add_running('victim', 3)
    environ = fake.environ
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', host_commands,
                                '--audit-log', ''], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outcomes = []
    try:
        client = guest.accept(timeout=10)
        caller = threading.Thread(
            target=lambda: outcomes.append(result_or_error(client.execute, 'sleep', '30', timeout=60)))
        caller.start()
        pattern = os.path.join(host_commands, 'sleep') + ' 30'
        children = wait_until(lambda: subprocess.run(['pgrep', '-f', pattern], stdout=subprocess.PIPE).stdout.split())
        assert children
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert wait_until(lambda: all(process_reaped(int(pid)) for pid in children))
        assert b'Stopping (signal 15)' in process.stderr.read()
        caller.join(10)
        assert len(outcomes) == 1 and getattr(outcomes[0], 'signal', None) == 15, outcomes
        assert client.endpoint.wait_closed(5)
    finally:
        if process.poll() is None:
            process.kill()
        guest.close()
        fake.cleanup()


def test_guest_patterns_restrict_the_daemon_to_matching_guests(monkeypatch, host_commands):
    fake = FakeLibvirt().activate(monkeypatch)
    sides = {}
    for number, name in enumerate(('web-1', 'web-2', 'db-1'), 1):
        path = fake.add_guest(name, number, channels=(GUEST_TO_HOST_CHANNEL,))[GUEST_TO_HOST_CHANNEL]
        os.unlink(path)  # a plain file: the guest's side listens there instead
        sides[name] = FakeGuestSide(path)
    daemon = HostDaemon(commands_dirs=[host_commands], watch=False, guest_patterns=['web-[2-9]', 'db-*'],
                        paths=LibvirtPaths(fake.status_dir, fake.channel_dir))
    try:
        assert daemon.wants('web-2') and daemon.wants('db-1') and not daemon.wants('web-1')
        daemon.rescan()
        assert sorted(daemon.connections) == ['db-1', 'web-2']
        assert sides['web-2'].accept(timeout=5).execute('whoami-guest').stdout == b'web-2\n'
        assert sides['db-1'].accept(timeout=5).execute('whoami-guest').stdout == b'db-1\n'
        sides['web-1'].sock.settimeout(0.3)
        with pytest.raises(OSError):
            sides['web-1'].sock.accept()  # nobody connected to the guest that matches no pattern
        assert HostDaemon(watch=False, paths=LibvirtPaths(None, None)).wants('anything')
    finally:
        daemon.stop()
        for connection in list(daemon.connections.values()):
            connection.endpoint.close()
        for side in sides.values():
            side.close()
        fake.cleanup()


def test_cli_daemon_takes_guest_patterns():
    from negotiator_host.cli import UsageError, parse_options
    options = parse_options(['--daemon', 'web-*', 'db-?'])
    assert options.action == 'daemon' and options.guests == ['web-*', 'db-?']
    assert parse_options(['--daemon']).guests == []
    with pytest.raises(UsageError):
        parse_options(['--daemon', '--all'])


# Leaves its process group at once (waiting on a FIFO until it has), ignores SIGTERM, holds stdout.
ESCAPER = r'''#!/bin/sh
mkfifo "$1/left"
setsid sh -c 'trap "" TERM; echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" &
read left < "$1/left"
exec sleep 60
'''


def _escaped_pids(directories):
    files = [os.path.join(d, 'escaped') for d in directories]
    assert wait_until(lambda: all(os.path.exists(f) and open(f).read().strip() for f in files))
    return [int(open(f).read()) for f in files]


def test_escaping_commands_time_out_free_their_slots_and_die_with_their_guest_or_the_daemon(host_commands):
    # Four commands that each leave a process holding their output: every one is answered at
    # its timeout (before the fix none was, and a fifth request got LimitExceeded), and no
    # process of theirs is left after a timeout, after the guest disconnects, or once the daemon
    # has stopped.
    with open(os.path.join(host_commands, 'escaper'), 'w') as handle:
        handle.write(ESCAPER)
    os.chmod(os.path.join(host_commands, 'escaper'), 0o755)
    fake = FakeLibvirt()
    guest = FakeGuestSide(fake.socket_path('escapee', 3, GUEST_TO_HOST_CHANNEL))
    fake.add_running('escapee', 3)
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', host_commands,
                                '--audit-log', ''], env=fake.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    directories = [short_tempdir() for _ in range(6)]
    pids = []
    outcomes = []

    def call(client, directory, timeout=1):
        try:
            client.endpoint.call('execute', {'command': 'escaper', 'args': [directory], 'timeout': timeout},
                                 timeout=20)
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    def start_call(client, directory):
        caller = threading.Thread(target=call, args=(client, directory, 60))
        caller.daemon = True
        caller.start()
        pids.extend(_escaped_pids([directory]))

    try:
        client = guest.accept(timeout=10)
        callers = [threading.Thread(target=call, args=(client, d)) for d in directories[:4]]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        pids.extend(_escaped_pids(directories[:4]))
        assert outcomes == ['CommandTimedOut'] * 4
        assert client.execute('echo-args', 'next', timeout=10).stdout == b'next\n'
        assert not any(process_alive(pid) for pid in pids)
        # The guest goes away while one runs; the daemon connects again.
        start_call(client, directories[4])
        client.endpoint.close()
        assert wait_dead(pids[-1])
        client = guest.accept(timeout=15)
        # One more, running when the daemon is told to stop.
        start_call(client, directories[5])
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not any(process_alive(pid) for pid in pids), process.stderr.read().decode()
    finally:
        for pid in pids:
            result_or_error(os.kill, pid, signal.SIGKILL)
        if process.poll() is None:
            process.terminate()  # not kill(): the daemon stops its virsh watcher
            result_or_error(process.wait, 10)
        guest.close()
        fake.cleanup()
