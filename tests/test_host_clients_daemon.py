"""
How GuestChannel and the negotiator-host CLI find their way: through the host daemon when it
serves the guest, directly otherwise, with the same results either way.

The daemon here is tests/support.py's FakeHostDaemon (a stand-in for the daemon's local socket,
not the daemon): it serves alpha, refuses gamma.3 to this user, and does not serve béta-2.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from negotiator_common.errors import CallTimeout, CommandNotAllowed
from negotiator_host import GuestChannel, daemon_guests, map_guests
from negotiator_host.channel import DIRECT, THROUGH_DAEMON
from negotiator_host.local_socket import DEFAULT_SOCKET, socket_path

from fake_libvirt import FakeLibvirt
from support import AGENT_GUESTS, FakeHostDaemon, interruptible, listening_socket, short_tempdir, start_agents
from waiting import wait_dead, wait_until


class World(object):
    """The fake libvirt with three agents, and the fake daemon on the fake's daemon socket."""

    def __init__(self, monkeypatch) -> None:
        self.fake = FakeLibvirt().activate(monkeypatch)
        self.agents = dict(zip(AGENT_GUESTS, start_agents(self.fake)))
        self.daemon = FakeHostDaemon(self.fake.daemon_socket, {'alpha': self.agents['alpha'].path},
                                     refused=['gamma.3'])

    def run_cli(self, *args, stdin=b''):
        process = subprocess.run([sys.executable, '-m', 'negotiator_host'] + list(args), input=stdin,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.fake.environ, timeout=60)
        return process.returncode, process.stdout, process.stderr

    def close(self) -> None:
        self.daemon.stop()
        for agent in self.agents.values():
            agent.stop()
        self.fake.cleanup()


@pytest.fixture
def world(monkeypatch):
    world = World(monkeypatch)
    yield world
    world.close()


def recorder():
    """A socket where a daemon would listen, that never accepts: any connect to it stays in its queue."""
    path = os.path.join(short_tempdir(), 'recorder.sock')
    sock = listening_socket(path)
    sock.setblocking(False)
    return path, sock


def connections_to(sock):
    """How many connections wait in a listening socket's queue (taken out of it)."""
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def stale_socket_file(directory):
    """A socket file that nobody listens on any more (a daemon that died)."""
    path = os.path.join(directory, 'stale.sock')
    listening_socket(path).close()
    return path


# Where the socket is.

def test_socket_path_option_then_environment_then_default(monkeypatch):
    monkeypatch.delenv('NEGOTIATOR_HOST_SOCKET', raising=False)
    assert socket_path() == DEFAULT_SOCKET == '/run/negotiator/host.sock'
    monkeypatch.setenv('NEGOTIATOR_HOST_SOCKET', '/tmp/elsewhere.sock')
    assert socket_path() == '/tmp/elsewhere.sock'
    assert socket_path('/tmp/given.sock') == '/tmp/given.sock'
    assert GuestChannel('web-1').daemon_socket == '/tmp/elsewhere.sock'
    assert GuestChannel('web-1', socket='/tmp/given.sock').daemon_socket == '/tmp/given.sock'


# The API.

def test_through_the_daemon_when_it_serves_the_guest(world):
    out = io.BytesIO()
    with GuestChannel('alpha') as guest:
        assert guest.via is None
        result = guest.execute('two-lines', stdout=out)
        assert guest.via == THROUGH_DAEMON
        assert guest.hello()['via'] == 'negotiator-host-daemon' and guest.hello()['agent'] == 'negotiator-guest'
        assert guest.execute('cat-stdin', input=b'\x00\xff').stdout == b'\x00\xff'
    assert (out.getvalue(), result.stderr, result.exit_status) == (b'one\ntwo\n', b'warn\n', 0)
    assert world.daemon.attached == ['alpha']


def test_reconnects_the_same_way(world):
    guest = GuestChannel('alpha')
    guest.ping()
    guest._endpoint.close('simulated loss')
    guest.ping()
    guest.close()
    assert guest.via == THROUGH_DAEMON and world.daemon.attached == ['alpha', 'alpha']


def test_direct_when_the_daemon_does_not_serve_the_guest(world):
    with GuestChannel('béta-2') as guest:
        assert guest.execute('echo-args', 'hi').stdout == b'hi\n'
        assert guest.via == DIRECT and 'via' not in guest.hello()
    assert world.daemon.attached == [] and world.agents['béta-2'].connections == 1


def test_direct_when_no_daemon_listens(world):
    for path in (os.path.join(world.fake.root, 'missing.sock'), stale_socket_file(world.fake.root)):
        with GuestChannel('alpha', socket=path) as guest:
            assert guest.execute('echo-args', 'hi').stdout == b'hi\n'
            assert guest.via == DIRECT
    assert world.daemon.attached == []


def test_a_refusal_by_the_daemon_is_final(world):
    with pytest.raises(CommandNotAllowed) as info:
        GuestChannel('gamma.3').execute('echo-args', 'hi')
    assert 'may not use gamma.3' in str(info.value)
    assert world.agents['gamma.3'].connections == 0  # never went around the daemon


def test_direct_never_touches_the_daemon_socket(world):
    path, sock = recorder()
    try:
        with GuestChannel('alpha', socket=path, direct=True) as guest:
            assert guest.execute('echo-args', 'hi').stdout == b'hi\n' and guest.via == DIRECT
        assert connections_to(sock) == 0
        # The recorder does record: without direct, the channel connects there, and a daemon that
        # does not answer is an error within the timeout, not a reason to go around it.
        with pytest.raises(CallTimeout) as info:
            GuestChannel('alpha', socket=path, timeout=0.3).ping()
        assert 'host daemon' in str(info.value)
        assert connections_to(sock) == 1
    finally:
        sock.close()


def test_a_socket_path_alone_is_a_direct_connection(world):
    with GuestChannel(socket_path=world.agents['alpha'].path) as guest:
        guest.ping()
        assert guest.via == DIRECT
    assert world.daemon.attached == []


def test_map_guests_goes_each_guest_s_way(world):
    outcomes = map_guests(lambda g: (g.ping(), g.via)[1], ['alpha', 'béta-2', 'gamma.3'])
    assert [o.result for o in outcomes[:2]] == [THROUGH_DAEMON, DIRECT]
    assert isinstance(outcomes[2].error, CommandNotAllowed)
    outcomes = map_guests(lambda g: (g.ping(), g.via)[1], ['alpha', 'gamma.3'], direct=True)
    assert [o.result for o in outcomes] == [DIRECT, DIRECT]
    assert world.daemon.attached == ['alpha']


def test_daemon_guests_lists_what_the_daemon_serves_to_this_user(world):
    assert daemon_guests() == {'alpha': True}
    assert daemon_guests(socket=os.path.join(world.fake.root, 'missing.sock')) is None
    assert daemon_guests(socket=stale_socket_file(world.fake.root)) is None


# The CLI: the same output and statuses either way.

def _same_ping(output):
    return re.sub(rb'answered in [0-9.]+ ms', b'answered in N ms', output)


@pytest.mark.parametrize('args,stdin,expected_status', [
    (['-e', 'binary', 'alpha'], b'', 0),
    (['-e', 'bytes 5000000', 'alpha'], b'', 0),  # more than the output window: credit flows
    (['--stdin', '-e', 'cat-stdin', 'alpha'], b'\x00in\xff', 0),
    (['-e', 'fail', 'alpha'], b'', 3),
    (['-c', 'alpha'], b'', 0),
    (['-p', 'alpha'], b'', 0),
    (['-e', 'two-lines', 'alpha', 'béta-2'], b'', 0),
    (['--json', '-e', 'echo-args hi', 'alpha'], b'', 0),
])
def test_cli_same_output_and_status_both_ways(world, args, stdin, expected_status):
    through = world.run_cli(*args, stdin=stdin)
    assert world.daemon.attached == ['alpha']
    direct = world.run_cli('--direct', *args, stdin=stdin)
    assert world.daemon.attached == ['alpha']
    assert through[0] == direct[0] == expected_status, through[2]
    if '--json' in args:
        through_object, direct_object = json.loads(through[1].decode()), json.loads(direct[1].decode())
        assert through_object.pop('duration') >= 0 and direct_object.pop('duration') >= 0
        assert through_object == direct_object and through_object['stdout'] == 'hi\n'
    elif 'béta-2' in args:  # two guests in parallel: the same lines, in either order
        assert [sorted(stream.splitlines()) for stream in through[1:]] == [
            sorted(stream.splitlines()) for stream in direct[1:]]
        assert b'alpha: one' in through[1] and 'béta-2: warn'.encode() in through[2]
    else:
        assert (_same_ping(through[1]), through[2]) == (_same_ping(direct[1]), direct[2]) and through[1]


def test_cli_timeout_is_75_both_ways(world):
    for way in ([], ['--direct']):
        status, out, err = world.run_cli(*way, '-e', 'sleep 30', '-t', '0.5', 'alpha')
        assert (status, out) == (75, b'')
        assert len(err.splitlines()) == 1 and err.startswith(b'negotiator-host: ')
    assert world.daemon.attached == ['alpha']


def test_cli_verbose_says_which_way(world):
    status, out, err = world.run_cli('-v', '-p', 'alpha')
    assert status == 0 and b'through the host daemon' in err
    status, out, err = world.run_cli('-v', '-p', 'béta-2')
    assert status == 0 and b'directly' in err and b'does not serve it' in err
    status, out, err = world.run_cli('-v', '--direct', '-p', 'alpha')
    assert status == 0 and b'directly' in err and b'direct connection was asked for' in err


def test_cli_refusal_is_77_and_never_goes_direct(world):
    for args in (['-e', 'echo-args hi', 'gamma.3'], ['-p', 'gamma.3', 'alpha']):
        status, out, err = world.run_cli(*args)
        assert status == 77 and b'may not use gamma.3' in err and b'Traceback' not in err
    assert world.agents['gamma.3'].connections == 0


def test_cli_direct_never_touches_the_socket(world):
    path, sock = recorder()
    try:
        for args in (['-e', 'echo-args hi', 'alpha'], ['-p', 'alpha', 'béta-2'], ['--list-guests']):
            status, out, err = world.run_cli('--direct', '--socket', path, *args)
            assert status == 0, err
        assert connections_to(sock) == 0
    finally:
        sock.close()


def test_cli_socket_option_names_the_daemon(world):
    other = FakeHostDaemon(os.path.join(world.fake.root, 'other.sock'), {'béta-2': world.agents['béta-2'].path})
    try:
        status, out, err = world.run_cli('--socket', other.path, '-v', '-e', 'echo-args hi', 'béta-2')
        assert (status, out) == (0, b'hi\n') and b'through the host daemon' in err
        assert other.attached == ['béta-2'] and world.daemon.attached == []
    finally:
        other.stop()


def test_cli_goes_direct_past_a_stale_socket(world):
    status, out, err = world.run_cli('--socket', stale_socket_file(world.fake.root), '-e', 'echo-args hi', 'alpha')
    assert (status, out, err) == (0, b'hi\n', b'')


def test_list_guests_daemon_column(world):
    status, out, err = world.run_cli('--list-guests')
    assert status == 0
    lines = out.decode().splitlines()
    assert 'Daemon' in lines[1]
    rows = {line.split()[1]: line for line in lines if line.startswith('|') and 'Guest' not in line}
    assert rows['alpha'].rstrip(' |').endswith('yes') and rows['béta-2'].rstrip(' |').endswith('no')
    status, out, err = world.run_cli('--list-guests', '--json')
    rows = {row['name']: row for row in json.loads(out.decode())}
    assert {name: row['daemon'] for name, row in rows.items()} == {'alpha': True, 'béta-2': False, 'gamma.3': False}
    assert rows['alpha']['reachable'] and rows['béta-2']['reachable']
    assert rows['gamma.3']['error']['type'] == 'CommandNotAllowed'


def test_list_guests_without_a_daemon_says_no_everywhere(world):
    world.daemon.stop()
    status, out, err = world.run_cli('--list-guests', '--json')
    rows = json.loads(out.decode())
    assert status == 0 and [row['daemon'] for row in rows] == [False, False, False]
    assert all(row['reachable'] for row in rows), rows


def test_direct_is_not_an_option_of_the_daemon(world):
    status, out, err = world.run_cli('--daemon', '--direct')
    assert status == 64 and b'--direct' in err


def test_looking_for_the_daemon_imports_nothing(world):
    # Without a daemon, a call costs one connect more than --direct: not one module more.
    code = ('import sys; from negotiator_host import cli; status = cli.run(sys.argv[1:]); '
            'print(status, " ".join(sorted(sys.modules)))')
    missing = os.path.join(world.fake.root, 'missing.sock')
    imported = []
    for way in (['--socket', missing], ['--direct']):
        process = subprocess.run([sys.executable, '-c', code] + way + ['-p', 'alpha'], stdout=subprocess.PIPE,
                                 env=world.fake.environ, timeout=60)
        status, modules = process.stdout.splitlines()[-1].split(b' ', 1)
        assert status == b'0'
        imported.append(set(modules.split()))
    assert imported[0] == imported[1] and b'logging' not in imported[0]


def test_a_call_through_the_daemon_imports_neither_discovery_nor_hashing(world):
    # The CLI's way to the daemon's socket (docs/benchmark.rst, "one CLI call through the daemon").
    code = ('import sys; from negotiator_host import cli; status = cli.run(sys.argv[1:]); '
            'print(status, " ".join(sorted(sys.modules)))')
    process = subprocess.run([sys.executable, '-c', code, '--execute=echo-args hello', 'alpha'],
                             stdout=subprocess.PIPE, env=world.fake.environ, timeout=60)
    printed, last = process.stdout.splitlines()[:-1], process.stdout.splitlines()[-1]
    status, modules = last.split(b' ', 1)
    assert (status, printed, world.daemon.attached) == (b'0', [b'hello'], ['alpha'])
    assert not {b'negotiator_host.discovery', b'secrets', b'hashlib', b'base64', b'logging'} & set(modules.split())


def _modules_after(argv, env, code):
    process = subprocess.run([sys.executable, '-c', code] + argv, stdout=subprocess.PIPE, env=env, timeout=60)
    lines = process.stdout.splitlines()
    status, modules = lines[-1].split(b' ', 1)
    return status, lines[:-1], set(modules.decode().split())


def test_the_plain_execute_through_the_daemon_imports_only_what_a_socket_and_json_client_does(world):
    # negotiator_host.oneshot: the console script's quick way (docs/benchmark.rst, "one CLI call
    # through the daemon"); what it imports beyond the floor's socket and json is its own code.
    program = ('import sys\nfrom negotiator_host.oneshot import main\ntry:\n    main()\nexcept SystemExit as exc:\n'
               '    status = exc.code\nsys.stdout.flush()\nprint(status, " ".join(sorted(sys.modules)))\n')
    floor = 'import sys, socket, json, math, os, time\nprint(0, " ".join(sorted(sys.modules)))\n'
    status, printed, modules = _modules_after(['--execute=echo-args hello', 'alpha'], world.fake.environ, program)
    assert (status, printed, world.daemon.attached) == (b'0', [b'hello'], ['alpha'])
    _, _, floor_modules = _modules_after([], world.fake.environ, floor)
    assert {name.split('.')[0] for name in modules - floor_modules} == {'negotiator_host', 'negotiator_common'}
    assert 'negotiator_host.cli' not in modules


@pytest.mark.parametrize('argv', [
    ['-v', '--execute=echo-args hello', 'alpha'],          # any other option
    ['--execute=echo-args "hello"', 'alpha'],              # a shell's quoting
    ['--execute=echo-args hello', 'alpha', 'béta-2'],      # two guests
    ['--execute=echo-args hello', '--timeout=1m', 'alpha'],  # a timespan
])
def test_any_other_call_goes_the_full_way_with_the_same_answer(world, argv):
    program = ('import sys\nfrom negotiator_host.oneshot import main\ntry:\n    main()\nexcept SystemExit as exc:\n'
               '    status = exc.code\nsys.stdout.flush()\nprint(status, " ".join(sorted(sys.modules)))\n')
    status, printed, modules = _modules_after(argv, world.fake.environ, program)
    assert status == b'0' and printed[-1].endswith(b'hello') and 'negotiator_host.cli' in modules


def test_the_quick_way_leaves_a_guest_the_daemon_does_not_serve_to_the_full_way(world):
    # béta-2 is not served: nothing ran through the daemon, and the full way goes direct.
    status, out, err = world.run_cli('--execute=echo-args hello', 'béta-2')
    assert (status, out, err) == (0, b'hello\n', b'')


def test_the_quick_way_says_a_refusal_once(world):
    status, out, err = world.run_cli('--execute=echo-args hello', 'gamma.3')
    assert status == 77 and out == b'' and len(err.splitlines()) == 1
    assert world.daemon.refusals == 1


@pytest.mark.parametrize('how', ['closed pipe', 'ctrl-c'])
def test_the_quick_way_ends_as_the_full_way_and_the_command_ends_too(world, tmp_path, how):
    command = ('flood-pid %s' if how == 'closed pipe' else 'sleep-pid %s') % tmp_path
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '-t', '60', '-e', command, 'alpha'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=world.fake.environ,
                               preexec_fn=interruptible)
    try:
        assert wait_until(lambda: os.listdir(str(tmp_path)), timeout=30)
        if how == 'closed pipe':
            assert process.stdout.read(1)
            process.stdout.close()
        else:
            process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == (141 if how == 'closed pipe' else 130)
        assert process.stderr.read() == (b'' if how == 'closed pipe' else b'negotiator-host: interrupted\n')
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert world.daemon.attached == ['alpha']
    assert wait_dead(*[int(name) for name in os.listdir(str(tmp_path))], timeout=10)
