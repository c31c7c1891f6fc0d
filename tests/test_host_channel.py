"""GuestChannel and map_guests against a real in-process agent on a UNIX socket."""

import io
import os
import signal
import threading
import time

import pytest

from negotiator_common.errors import (
    CallTimeout, ChannelBusy, ChannelNotFound, CommandFailed, CommandNotFound, CommandTimedOut,
    GuestNotFound,
)
from negotiator_host import GuestChannel, LibvirtPaths, list_guests, map_guests
from negotiator_host.channel import connect_socket

from fake_libvirt import FakeLibvirt
from support import (
    GUEST_COMMANDS, FakeGuestAgent, listening_socket, make_commands_dir, result_or_error, short_tempdir, start_agents,
)
from waiting import process_alive, wait_until


@pytest.fixture
def agent():
    root = short_tempdir()
    server = FakeGuestAgent(os.path.join(root, 'sock'), make_commands_dir(root, GUEST_COMMANDS))
    yield server
    server.stop()


def test_ping_and_hello(agent):
    with GuestChannel(socket_path=agent.path) as guest:
        rtt = guest.ping()
        assert isinstance(rtt, float) and rtt > 0
        assert guest.hello()['agent'] == 'negotiator-guest'


def test_list_commands_shows_directory_and_builtins(agent):
    with GuestChannel(socket_path=agent.path) as guest:
        names = {c.name: c for c in guest.list_commands()}
    assert 'cat-stdin' in names and not names['cat-stdin'].builtin
    assert any(c.builtin for c in names.values())


def test_execute_stdin_binary_output_and_exit_status(agent):
    with GuestChannel(socket_path=agent.path) as guest:
        assert guest.execute('cat-stdin', input=b'\x00\xffhello\n').stdout == b'\x00\xffhello\n'
        binary = guest.execute('binary')
        assert binary.stdout == bytes(range(256)) * 4 and binary.stderr == b'err\xff\n'
        failed = guest.execute('fail')
        assert failed.exit_status == 3 and failed.stdout == b'partial\n' and failed.stderr == b'it failed\n'
        with pytest.raises(CommandFailed) as info:
            guest.execute('fail', check=True)
        assert info.value.exit_status == 3
        assert guest.execute('echo-args', 'a b', ';id', '$(x)').stdout == b'a b ;id $(x)\n'


def test_execute_streams_into_file_objects(agent):
    out, err = io.BytesIO(), io.BytesIO()
    with GuestChannel(socket_path=agent.path) as guest:
        result = guest.execute('two-lines', stdout=out, stderr=err)
    assert (out.getvalue(), err.getvalue(), result.exit_status) == (b'one\ntwo\n', b'warn\n', 0)


def test_unknown_command_and_timeout(agent):
    with GuestChannel(socket_path=agent.path, timeout=60) as guest:
        with pytest.raises(CommandNotFound):
            guest.execute('nosuch')
        started = time.monotonic()
        # The agent kills the command a little before the caller's deadline and says so.
        with pytest.raises(CommandTimedOut):
            guest.execute('sleep', '30', timeout=0.5)
        # At its 0.5 s timeout: not after the 30 s sleep, nor at the channel's 60 s timeout.
        assert time.monotonic() - started < 15


def test_refused_command_raises_command_not_found():
    root = short_tempdir()
    server = FakeGuestAgent(os.path.join(root, 'sock'), make_commands_dir(root, GUEST_COMMANDS),
                            policy=lambda peer, command: command != 'fail')
    try:
        with GuestChannel(socket_path=server.path) as guest:
            with pytest.raises(CommandNotFound):
                guest.execute('fail')
            assert guest.execute('echo-args', 'ok').stdout == b'ok\n'
    finally:
        server.stop()


def test_threads_share_one_connection(agent):
    errors = []
    with GuestChannel(socket_path=agent.path) as guest:
        def work(number):
            try:
                for _ in range(5):
                    data = ('thread %d\n' % number).encode()
                    assert guest.execute('cat-stdin', input=data).stdout == data
                    guest.ping()
            except Exception as exc:  # pragma: no cover (reported below)
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert agent.connections == 1


def test_slow_command_does_not_block_ping(agent):
    # Proved by order, not by time: the ping is answered while the command (a 60 s sleep) still
    # runs; then the test kills the command.
    piddir = short_tempdir()
    outcome = []
    with GuestChannel(socket_path=agent.path) as guest:
        thread = threading.Thread(target=lambda: outcome.append(result_or_error(guest.execute, 'sleep-pid', piddir)))
        thread.start()
        try:
            assert wait_until(lambda: os.listdir(piddir)), 'the slow command did not start'
            pid = int(os.listdir(piddir)[0])
            rtt = guest.ping()
            assert isinstance(rtt, float) and rtt > 0
            assert thread.is_alive() and process_alive(pid), 'the command ended before the ping: nothing proved'
        finally:
            for name in os.listdir(piddir):
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            thread.join(10)
    assert getattr(outcome[0], 'signal', None) == signal.SIGKILL, outcome


def test_missing_socket_and_busy_socket():
    root = short_tempdir()
    with pytest.raises(ChannelNotFound):
        GuestChannel(socket_path=os.path.join(root, 'nothing')).ping()
    # A socket that never accepts: the backlog fills, then connects wait; every wait is bounded.
    sock = listening_socket(os.path.join(root, 'busy'))
    sock.listen(0)
    held = []
    started = time.monotonic()
    with pytest.raises((ChannelBusy, CallTimeout)):
        for _ in range(5):
            held.append(connect_socket(os.path.join(root, 'busy'), timeout=0.3))
        GuestChannel(socket_path=os.path.join(root, 'busy'), timeout=0.3).ping()
    # Each wait ended at its 0.3 s (under 2 s for all six): not at a 10 s default timeout.
    assert time.monotonic() - started < 6
    for conn in held:
        conn.close()
    sock.close()


def test_silent_socket_times_out_with_a_hint():
    root = short_tempdir()
    sock = listening_socket(os.path.join(root, 'silent'))
    try:
        with pytest.raises(CallTimeout) as info:
            GuestChannel(socket_path=os.path.join(root, 'silent'), timeout=0.3).ping()
        assert 'negotiator-guest --daemon' in str(info.value)
    finally:
        sock.close()


def test_reconnects_after_the_agent_restarts(agent):
    guest = GuestChannel(socket_path=agent.path)
    guest.ping()
    guest._endpoint.close('simulated loss')
    rtt = guest.ping()
    assert isinstance(rtt, float) and rtt > 0
    assert agent.connections == 2
    guest.close()


def test_guest_by_name_through_discovery_and_map_guests(monkeypatch):
    fake = FakeLibvirt().activate(monkeypatch)
    try:
        agents = start_agents(fake)
        fake.add_running('no-channel', 9)
        paths = LibvirtPaths(fake.status_dir, fake.channel_dir)
        with GuestChannel('béta-2', paths=paths) as guest:
            assert guest.execute('echo-args', 'hi').stdout == b'hi\n'
        names = ['alpha', 'béta-2', 'gamma.3', 'missing']
        outcomes = map_guests(lambda g: g.execute('echo-args', g.name).stdout, names, paths=paths)
        assert [o.guest for o in outcomes] == names
        assert [o.result for o in outcomes[:3]] == [b'alpha\n', 'béta-2\n'.encode(), b'gamma.3\n']
        assert isinstance(outcomes[3].error, GuestNotFound)
        # Guest objects from one listing: no discovery per guest.
        before = len(fake.invocations())
        running = list_guests(paths=paths)
        outcomes = map_guests(lambda g: g.ping(), running, paths=paths)
        assert len(fake.invocations()) == before + 1
        assert [o.ok for o in outcomes] == [True, True, True, False]
        assert isinstance(outcomes[3].error, ChannelNotFound)
        for server in agents:
            server.stop()
    finally:
        fake.cleanup()
