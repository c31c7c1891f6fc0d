"""
The guest's client side (HostClient and the CLI's client mode) against a fake host daemon.

The fake host daemon runs in this process: it holds a pty master and serves the standard
methods (negotiator-common's AgentService) on it, one session per client; the client opens
the pty slave as it would open ``negotiator-guest-to-host.0``. EBUSY is simulated by
replacing ``os.open`` (as root, a pty cannot refuse a second open the way a port does).
"""

import errno
import json
import os
import subprocess
import sys
import threading
import time
import tty

import pytest

from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ChannelBusy, CommandNotFound, ConnectionClosed
from negotiator_common.exit_status import EXIT_UNAVAILABLE
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport
from negotiator_guest import cli, port
from negotiator_guest.client import HostClient
from negotiator_guest.port import host_connected

from support import write_command
from waiting import wait_until


class FakeHostDaemon(object):
    """A host daemon on a pty master: a new endpoint whenever a guest client opens the slave."""

    def __init__(self, commands_dir):
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        self.path = os.ttyname(slave)
        os.close(slave)
        self.service = AgentService('negotiator-host', CommandRegistry([commands_dir], builtins=False),
                                    environment=lambda peer: {'NEGOTIATOR_GUEST': 'test-guest'})
        self.sessions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.daemon = True
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if not wait_until(lambda: self._stop.is_set() or host_connected(self.master), interval=0.005):
                continue
            if self._stop.is_set():
                return
            self.sessions += 1
            Endpoint(Transport(self.master, close_fd=False), self.service.dispatcher(), name='test-guest').run()

    def close(self):
        self._stop.set()


@pytest.fixture
def host(tmp_path):
    commands = tmp_path / 'host-commands'
    commands.mkdir(mode=0o755)
    write_command(commands, 'greet', 'echo "hello $1 from $NEGOTIATOR_GUEST"')
    # Bytes that are not UTF-8, on both streams, and a status of its own.
    write_command(commands, 'binary', r"printf '\377\000out'; printf '\376err' >&2; exit 3")
    write_command(commands, 'upper', "tr a-z A-Z")
    write_command(commands, 'suicide', 'kill -9 $$')
    write_command(commands, 'slow', 'sleep 60')
    daemon = FakeHostDaemon(str(commands))
    yield daemon
    daemon.close()


def test_ping_and_list_commands_per_call(host):
    client = HostClient(host.path, timeout=5)
    rtt = client.ping()
    assert isinstance(rtt, float) and rtt > 0
    assert not host_connected(host.master)  # the port was released after the call
    names = [c.name for c in client.list_commands()]
    assert names == ['binary', 'greet', 'slow', 'suicide', 'upper']
    assert not host_connected(host.master)


def test_context_manager_keeps_one_connection(host):
    with HostClient(host.path, timeout=5) as client:
        assert client.hello['agent'] == 'negotiator-host'
        client.ping()
        assert host_connected(host.master)  # still open between calls of the block
        result = client.execute('greet', 'world')
    assert result.exit_status == 0 and result.stdout == b'hello world from test-guest\n'
    assert host.sessions == 1 and not host_connected(host.master)


def test_execute_with_input_and_errors(host):
    client = HostClient(host.path, timeout=5)
    assert client.execute('upper', input=b'abc').stdout == b'ABC'
    with pytest.raises(CommandNotFound):
        client.execute('nonexistent')


def test_no_host_daemon_connected_fails_fast(host, monkeypatch):
    # Simulated: a pty slave always has its master "connected" while the pty exists, so the
    # port's POLLHUP (no host client on the host side) is faked by host_connected().
    from negotiator_guest import client as client_module
    monkeypatch.setattr(client_module, 'host_connected', lambda fd: False)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed) as info:
        HostClient(host.path, timeout=60, connect_timeout=0.3).ping()
    assert time.monotonic() - started < 30  # the 0.3 s connect timeout, not the 60 s call timeout
    assert 'negotiator-host --daemon' in str(info.value)
    assert not host_connected(host.master)  # and the port was released


def test_busy_port_is_retried_then_succeeds(host, monkeypatch):
    attempts = []
    real_open = os.open

    def busy_twice(path, flags, mode=0o777):
        attempts.append(path)
        if len(attempts) <= 2:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_open(path, flags, mode)
    monkeypatch.setattr(port.os, 'open', busy_twice)
    rtt = HostClient(host.path, timeout=5).ping()
    assert isinstance(rtt, float) and rtt > 0
    assert len(attempts) == 3


def always_busy(path, flags, mode=0o777):
    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)


def test_busy_port_gives_up_with_channel_busy(monkeypatch):
    monkeypatch.setattr(port.os, 'open', always_busy)
    started = time.monotonic()
    with pytest.raises(ChannelBusy):
        HostClient('/dev/vport1p2', timeout=60, busy_timeout=0.3).ping()
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 30  # it retried for the 0.3 s busy timeout, not for the 60 s call timeout


def test_cli_busy_port_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(port.os, 'open', always_busy)
    assert cli.run(['-c', '/dev/vport1p2', '-l']) == EXIT_UNAVAILABLE == 69
    assert 'in use by another process' in capsys.readouterr().err


def run_cli(*arguments, input=b''):
    return subprocess.run([sys.executable, '-m', 'negotiator_guest'] + list(arguments), input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)


def test_cli_execute_passes_bytes_and_status_through(host):
    process = run_cli('-c', host.path, '-e', 'binary')
    assert process.returncode == 3
    assert process.stdout == b'\xff\x00out'
    assert process.stderr == b'\xfeerr'


def test_cli_execute_splits_with_shlex_and_forwards_stdin(host):
    process = run_cli('-c', host.path, '--execute', "greet 'two words'")
    assert process.stdout == b'hello two words from test-guest\n' and process.returncode == 0
    process = run_cli('-c', host.path, '-i', '-e', 'upper', input=b'shout')
    assert process.stdout == b'SHOUT'
    process = run_cli('-c', host.path, '-e', 'upper', input=b'ignored without -i')
    assert process.stdout == b''


def test_cli_signal_exit_status_and_note(host):
    process = run_cli('-c', host.path, '-e', 'suicide')
    assert process.returncode == 128 + 9
    assert process.stderr == b'negotiator-guest: suicide on the host was ended by signal 9 (SIGKILL)\n'


def test_cli_json(host):
    process = run_cli('-c', host.path, '-j', '-e', 'binary')
    data = json.loads(process.stdout.decode())
    assert process.returncode == 3 and data['exit_status'] == 3
    import base64
    assert base64.b64decode(data['stdout_b64']) == b'\xff\x00out'
    data = json.loads(run_cli('-c', host.path, '--json', '-l').stdout.decode())
    assert [c['name'] for c in data['commands']][:2] == ['binary', 'greet']


def test_cli_list_commands_text(host):
    process = run_cli('-c', host.path, '--list-commands')
    assert process.returncode == 0
    assert process.stdout.decode().split() == ['binary', 'greet', 'slow', 'suicide', 'upper']


def test_cli_refused_and_timeout_statuses(host):
    process = run_cli('-c', host.path, '-e', 'nonexistent')
    assert process.returncode == 77 and b'--list-commands' in process.stderr
    started = time.monotonic()
    process = run_cli('-c', host.path, '-t', '1.5', '-e', 'slow')
    assert process.returncode == 75, process.stderr
    assert time.monotonic() - started < 30  # the 1.5 s timeout, not the command's 60 s sleep
    assert len(process.stderr.decode().strip().splitlines()) == 1  # one line that says what to do
    data = json.loads(run_cli('-c', host.path, '-j', '-t', '1', '-e', 'slow').stdout.decode())
    assert data['error']['type'] in ('CommandTimedOut', 'CallTimeout') and data['exit_status'] == 75


def test_cli_missing_port_exit_status(tmp_path):
    process = run_cli('-c', str(tmp_path / 'vport9p9'), '-l')
    assert process.returncode == 69
    assert b'does not exist' in process.stderr
