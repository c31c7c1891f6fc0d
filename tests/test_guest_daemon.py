"""
The guest daemon in real processes, with a pseudo-terminal standing in for the port.

Why a pty: its master behaves like a virtio-serial port seen from the guest. While no
process has the slave open, reading the master fails at once (EIO, which the transport
treats as end of stream) and ``poll()`` reports POLLHUP at once, as a port does with no host
connected; opening the slave path again "connects a host", and data written to the slave
raises SIGIO on an ``O_ASYNC`` master. So the daemon gets the master (as a descriptor) and the
test plays the host on the slave.

What a pty does not simulate: the SIGIO that the virtio_console driver sends when the host
merely opens its end (a pty signals on data only, which is what the tests rely on), and
EBUSY (see test_guest_client.py). Those are for the real-VM tests.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tty

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.service import AGENT_MAX_IN_FLIGHT
from negotiator_common.transport import Transport
from negotiator_guest.daemon import _Session
from negotiator_guest.port import host_connected

from support import result_or_error, write_command
from waiting import process_alive, process_reaped, read_pid, wait_until

DRIVER = r"""
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format='%(relativeCreated)d %(name)s %(message)s')
from negotiator_common.commands import CommandRegistry
from negotiator_common.service import AgentService
from negotiator_guest.daemon import GuestDaemon
service = AgentService('negotiator-guest', CommandRegistry([sys.argv[2]], builtins=False))
daemon = GuestDaemon(service, fd=int(sys.argv[1]), recheck_interval=float(sys.argv[3]))
sys.exit(daemon.run())
"""


def cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as handle:
        fields = handle.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class FakeHost(object):
    """The host side of the port: the pty slave, opened and closed like a host client would."""

    def __init__(self, name):
        self.name = name
        self.fd = None

    def connect(self):
        self.fd = os.open(self.name, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        return self

    def disconnect(self):
        os.close(self.fd)
        self.fd = None

    def send(self, message):
        os.write(self.fd, json.dumps(message).encode() + b'\n')

    def lines(self, seconds):
        """Every line that arrives within ``seconds``."""
        data = b''
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while time.monotonic() < deadline:
            if poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                data += os.read(self.fd, 65536)
        return [json.loads(line) for line in data.split(b'\n') if line.strip()]

    def wait_for(self, request_id, seconds=2.0):
        """The reply to ``request_id``, or None; other lines are ignored."""
        buffer = b''
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while time.monotonic() < deadline:
            if not poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                continue
            buffer += os.read(self.fd, 65536)
            while b'\n' in buffer:
                line, buffer = buffer.split(b'\n', 1)
                if line.strip():
                    message = json.loads(line)
                    if message.get('id') == request_id:
                        return message
        return None


@pytest.fixture
def daemon_on_pty(tmp_path):
    """Start the daemon on a pty master with no host connected; yield (process, FakeHost, commands dir)."""
    commands = tmp_path / 'commands'
    commands.mkdir(mode=0o755)
    master, slave = os.openpty()
    tty.setraw(master)
    host = FakeHost(os.ttyname(slave))
    os.close(slave)  # no host connected
    process = subprocess.Popen([sys.executable, '-c', DRIVER, str(master), str(commands), '30'],
                               pass_fds=[master], stderr=subprocess.PIPE)
    process.port_fd = master  # the port's descriptor number, in the daemon too
    os.close(master)  # only the daemon holds the port now
    # Until the daemon waits for a host (SIGIO armed on the port), or died.
    assert wait_until(lambda: process.poll() is not None or port_flags(process) & os.O_ASYNC, timeout=10)
    assert process.poll() is None, process.stderr.read().decode()
    try:
        yield process, host, commands
    finally:
        if host.fd is not None:
            host.disconnect()
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()


def test_no_busy_loop_without_host_then_prompt_answer(daemon_on_pty):
    process, host, _ = daemon_on_pty
    before = cpu_seconds(process.pid)
    time.sleep(1.0)
    idle_cpu = cpu_seconds(process.pid) - before
    # A loop that retried the EOF would burn about a whole second of CPU here.
    assert idle_cpu < 0.1, 'daemon used %.2f s of CPU in 1 s without a host' % idle_cpu
    host.connect()
    host.send({'jsonrpc': '2.0', 'id': 'p1', 'method': 'ping', 'params': {}})
    # The recheck timer is 30 s here, counted from when the daemon began to wait (over a second
    # ago): an answer within 15 s came from the SIGIO wake-up, not from the recheck.
    reply = host.wait_for('p1', seconds=15.0)
    assert reply is not None, 'no answer within 15 s: the daemon was not woken by SIGIO'
    assert 'result' in reply


def test_sessions_one_after_another_without_spinning_in_between(daemon_on_pty):
    process, host, _ = daemon_on_pty
    for number in range(3):
        host.connect()
        endpoint = Endpoint(Transport(host.fd, close_fd=False), name='guest').start()
        hello = endpoint.handshake(timeout=30)
        assert hello['agent'] == 'negotiator-guest'
        rtt = AgentClient(endpoint).ping(timeout=10)
        assert isinstance(rtt, float) and rtt > 0
        endpoint.close()
        host.disconnect()
        before = cpu_seconds(process.pid)
        time.sleep(0.5)
        assert cpu_seconds(process.pid) - before < 0.1, 'spinning after session %d' % number


def port_flags(process):
    """The open-file flags of the daemon's port, from /proc/PID/fdinfo."""
    with open('/proc/%d/fdinfo/%d' % (process.pid, process.port_fd)) as handle:
        for line in handle:
            if line.startswith('flags:'):
                return int(line.split()[1], 8)
    raise AssertionError('no flags in fdinfo')


def test_sigio_is_off_during_a_session_and_back_on_after_it(daemon_on_pty):
    # During a session every line from the host would raise a SIGIO and wake the main thread.
    process, host, _ = daemon_on_pty
    assert port_flags(process) & os.O_ASYNC, 'no SIGIO while waiting for a host'
    for number in range(2):
        host.connect()
        host.send({'jsonrpc': '2.0', 'id': 'p%d' % number, 'method': 'ping', 'params': {}})
        assert host.wait_for('p%d' % number) is not None
        assert not port_flags(process) & os.O_ASYNC, 'SIGIO still on in session %d' % number
        host.disconnect()
        assert wait_until(lambda: port_flags(process) & os.O_ASYNC, timeout=10), \
            'SIGIO not re-armed after session %d' % number


def test_a_session_is_finished_when_it_wakes_the_main_loop():
    # The main loop checks ``finished`` as soon as the session's thread wakes it, while that
    # thread is still alive: were it "thread not alive", a daemon without SIGIO during sessions
    # would sleep on and never serve the next host (seen in a TCG guest).
    port, host_end = socket.socketpair()
    seen = []
    session = _Session(port.fileno(), Dispatcher(), 1, lambda: seen.append(session.finished))
    session.start()
    host_end.close()
    session.thread.join(5)
    port.close()
    assert seen == [True]


def test_late_reply_of_a_departed_host_never_reaches_the_next(daemon_on_pty, tmp_path):
    process, host, commands = daemon_on_pty
    marker = tmp_path / 'ran'
    write_command(commands, 'slow', 'touch %s; sleep 0.7; echo late' % marker)
    host.connect()
    host.send({'jsonrpc': '2.0', 'id': 'old-1', 'method': 'execute', 'params': {'command': 'slow'}})
    assert wait_until(marker.exists, timeout=3), 'the command never started'
    host.disconnect()  # the first host client vanishes mid-request
    # Until the daemon has seen that session end (it arms SIGIO again to wait for the next host).
    assert wait_until(lambda: port_flags(process) & os.O_ASYNC, timeout=10)
    host.connect()
    host.send({'jsonrpc': '2.0', 'id': 'new-1', 'method': 'ping', 'params': {}})
    lines = host.lines(1.5)
    # (Each session begins with the agent's "session" notice, which carries no id.)
    assert [line.get('id') for line in lines if line.get('method') != 'session'] == ['new-1']


def test_sigterm_kills_commands_releases_port_and_exits_zero(tmp_path):
    """The real CLI, on a pty slave (the test holds the master as an always-connected host)."""
    commands = tmp_path / 'commands'
    commands.mkdir(mode=0o755)
    pids = tmp_path / 'pids'
    pids.mkdir()
    write_command(commands, 'obedient', 'echo $$ > %s/obedient; exec sleep 60' % pids)
    # Ignores SIGTERM (and so does the sleep it becomes): only the daemon's SIGKILL ends it.
    write_command(commands, 'stubborn', "trap '' TERM; echo $$ > %s/stubborn; exec sleep 60" % pids)
    master, slave = os.openpty()
    tty.setraw(master)
    name = os.ttyname(slave)
    os.close(slave)
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_guest', '--daemon', '-c', name,
                                '--commands-dir', str(commands), '-v'], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: host_connected(master))  # the daemon has opened the port (the slave)
        transport = Transport(master, close_fd=False)
        endpoint = Endpoint(transport, name='guest').start()
        endpoint.handshake(timeout=30)
        client = AgentClient(endpoint)
        outcomes = {}
        workers = []
        for command in ('obedient', 'stubborn'):
            worker = threading.Thread(target=lambda c=command: outcomes.update({c: result_or_error(client.execute, c,
                                                                                             timeout=60)}))
            worker.daemon = True
            worker.start()
            workers.append(worker)
        names = ('obedient', 'stubborn')
        assert wait_until(lambda: all((pids / n).exists() and (pids / n).read_text().strip() for n in names))
        running = {n: int((pids / n).read_text()) for n in names}
        assert all(process_alive(pid) for pid in running.values())
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        took = time.monotonic() - started
        log = process.stderr.read().decode()
        assert status == 0, log
        # Within STOP_TIMEOUT and the kill wait (under 2 s), not after the commands' 60 s sleep.
        assert took < 30, 'took %.2f s to stop' % took
        assert wait_until(lambda: not any(process_alive(pid) for pid in running.values())), log
        # Each caller got the reply of its stopped command before the session closed.
        for worker in workers:
            worker.join(5)
        assert {n: getattr(o, 'signal', o) for n, o in outcomes.items()} == {'obedient': 15, 'stubborn': 9}, log
        # Released: with nobody holding the slave any more, the master reports POLLHUP.
        poller = select.poll()
        poller.register(master, select.POLLIN)
        assert any(flags & select.POLLHUP for _, flags in poller.poll(500)), 'the port is still held open'
        assert 'Stopping (received SIGTERM)' in log
        endpoint.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
        os.close(master)


def test_sigint_also_stops_cleanly(daemon_on_pty):
    process, host, _ = daemon_on_pty
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=2) == 0
    assert b'KeyboardInterrupt' not in process.stderr.read()


def test_a_malformed_message_leaves_the_session_serving(daemon_on_pty):
    # docs/faults.rst, "A message of an unexpected shape": this line killed the session's reader
    # (a traceback, then a new session).
    process, host, _ = daemon_on_pty
    host.connect()
    host.send({'jsonrpc': '2.0', 'method': 'output', 'params': {'id': [1]}})
    host.send({'jsonrpc': '2.0', 'id': 'after', 'method': 'ping', 'params': {}})
    assert host.wait_for('after') is not None
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=5) == 0
    log = process.stderr.read()
    assert b'Traceback' not in log and b'session 2' not in log


# Leaves its process group at once (waiting on a FIFO until it has), ignores SIGTERM, holds stdout.
ESCAPER = r'''mkfifo "$1/left"
setsid sh -c 'trap "" TERM; echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" &
read left < "$1/left"
echo $$ > "$1/leader"
exec sleep 60'''


def _pids(directory):
    """The (escaped, leader) pids that ESCAPER wrote in ``directory``, once both are there."""
    return [read_pid(directory / name) for name in ('escaped', 'leader')]


def _start_escaper(host, directory):
    host.connect()
    endpoint = Endpoint(Transport(host.fd, close_fd=False), name='guest').start()
    endpoint.handshake(timeout=30)
    caller = threading.Thread(target=result_or_error, args=(AgentClient(endpoint).execute, 'escaper', str(directory)),
                              kwargs={'timeout': 60})
    caller.daemon = True
    caller.start()
    return endpoint, _pids(directory)


def test_no_process_of_a_command_outlives_its_departed_host(daemon_on_pty, tmp_path):
    process, host, commands = daemon_on_pty
    write_command(commands, 'escaper', ESCAPER)
    endpoint, pids = _start_escaper(host, tmp_path)
    try:
        endpoint.close()
        host.disconnect()
        # Killed (SIGKILL after the grace: it ignores SIGTERM) and reaped: not even a zombie is left.
        assert wait_until(lambda: all(process_reaped(pid) for pid in pids))
    finally:
        for pid in pids:
            result_or_error(os.kill, pid, signal.SIGKILL)


def test_no_process_of_a_command_outlives_the_daemon(daemon_on_pty, tmp_path):
    process, host, commands = daemon_on_pty
    write_command(commands, 'escaper', ESCAPER)
    endpoint, pids = _start_escaper(host, tmp_path)
    try:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not any(process_alive(pid) for pid in pids), process.stderr.read().decode()
    finally:
        endpoint.close()
        for pid in pids:
            result_or_error(os.kill, pid, signal.SIGKILL)


def test_the_daemon_reaps_what_a_finished_command_left_running(daemon_on_pty, tmp_path):
    # A process that left the group of a command that exited normally is left alone; the daemon
    # adopted it and reaps it when it ends.
    process, host, commands = daemon_on_pty
    write_command(commands, 'starter', 'mkfifo "$1/left"\n'
                  'setsid sh -c \'echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60\' sh "$1" >/dev/null 2>&1 &\n'
                  'read left < "$1/left"')
    host.connect()
    endpoint = Endpoint(Transport(host.fd, close_fd=False), name='guest').start()
    endpoint.handshake(timeout=30)
    try:
        result = AgentClient(endpoint).execute('starter', str(tmp_path), timeout=10)
        assert result.exit_status == 0 and not result.output_abandoned
        escaped = int((tmp_path / 'escaped').read_text())
        with open('/proc/%d/stat' % escaped) as handle:
            assert int(handle.read().rsplit(')', 1)[1].split()[1]) == process.pid  # adopted
        os.kill(escaped, signal.SIGKILL)
        assert wait_until(lambda: process_reaped(escaped))
    finally:
        endpoint.close()


# Waits until COUNT commands have started in DIRECTORY (its own mark first): with fewer run at
# once it waits for ever, and the call times out.
GATHER = r'''touch "$1/started.$$"
while [ "$(ls "$1" | grep -c '^started\.')" -lt "$2" ]; do sleep 0.05; done'''


def test_the_agent_runs_32_commands_of_one_connection_at_once(daemon_on_pty, tmp_path):
    # The host daemon carries every caller of the host over one connection: 32 concurrent calls
    # must run in one round, none refused and none waiting for another to end.
    process, host, commands = daemon_on_pty
    write_command(commands, 'gather', GATHER)
    host.connect()
    endpoint = Endpoint(Transport(host.fd, close_fd=False), name='guest').start()
    try:
        hello = endpoint.handshake(timeout=30)
        assert hello['limits']['max_in_flight'] == AGENT_MAX_IN_FLIGHT >= 32
        client = AgentClient(endpoint, hello)
        results = []
        callers = [threading.Thread(target=lambda: results.append(result_or_error(
            client.execute, 'gather', str(tmp_path), '32', timeout=60))) for _ in range(32)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(90)
        assert [getattr(result, 'exit_status', result) for result in results] == [0] * 32
    finally:
        endpoint.close()
        host.disconnect()
