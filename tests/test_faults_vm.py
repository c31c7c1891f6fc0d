"""
Fault matrix rows that need a real virtio-serial port (``docs/faults.rst``): real guests.

Two guests are shared by the whole module (each boot costs about 11 s): ``agent`` runs
negotiator-guest --daemon under supervisord from the start; ``late`` starts its daemon some
seconds after boot, so the host can connect before anything serves the port. ``late`` is
destroyed by the last test that uses it.

The libvirtd test stops the machine's libvirtd for a moment: it starts it again by the
means ``scripts/setup-host`` uses (it runs setup-host), in a ``finally``.
"""

import os
import shlex
import signal
import subprocess
import threading
import time

import pytest

from negotiator_common.errors import (
    CallTimeout, ChannelBusy, ConnectionClosed, NegotiatorError,
)
from negotiator_common.endpoint import Endpoint
from negotiator_common.transport import Transport
from negotiator_host import GuestChannel
from negotiator_host.channel import connect_socket

from e2e_support import read_log, start_host_daemon, stop_host_daemon
from support import result_or_error
from vmfixtures import VENV_BIN, negotiator_vm, vm_host, wait_for_agent  # noqa: F401 (vm_host: a fixture)
from waiting import process_reaped, wait_until

pytestmark = pytest.mark.vm

H2G = 'negotiator-host-to-guest.0'
PIDS = '/tmp/long.pids'

GUEST_COMMANDS = {
    # A shell and its child, both recorded, then waiting: SIGTERM must reach both.
    'long': '#!/bin/sh\nsleep 120 & echo $$ $! > %s\nwait\n' % PIDS,
    'pids': '#!/bin/sh\ncat %s 2>/dev/null\ntrue\n' % PIDS,
    # For each pid given: is it still a process (any state but zombie gone)? Print "PID STATE".
    'proc-state': ('#!/bin/sh\nfor p in "$@"; do [ -r /proc/$p/stat ] && echo "$p $(cut -d" " -f3 /proc/$p/stat)";'
                   ' done\ntrue\n'),
    'nap': '#!/bin/sh\nsleep "$1"\necho woke\n',
    'echo': '#!/bin/sh\necho "$@"\n',
    'daemon-pid': "#!/bin/sh\npgrep -o -f 'negotiator-guest --daemon'\n",
    'stop-daemon': "#!/bin/sh\nkill -TERM $(pgrep -o -f 'negotiator-guest --daemon')\n",
    # Open the daemon's port as another process would; report the errno's name.
    'grab-port': '''#!/bin/sh
for d in /sys/class/virtio-ports/*; do
  [ "$(cat "$d/name")" = %s ] && dev=/dev/$(basename "$d")
done
exec /usr/bin/python3 -c '
import errno, os, sys
try:
    os.open(sys.argv[1], os.O_RDWR | os.O_NONBLOCK)
except OSError as exc:
    print(errno.errorcode[exc.errno], sys.argv[1])
else:
    print("opened", sys.argv[1])
' "$dev"
''' % H2G,
    'second-daemon': ('#!/bin/sh\nexec %s/negotiator-guest --daemon --commands-dir /tmp/negotiator-commands\n'
                      % VENV_BIN),
    'ask-host': '#!/bin/sh\nexec %s/negotiator-guest --timeout 20 --execute "$*"\n' % VENV_BIN,
}

HOST_COMMANDS = {'whoami-guest': '#!/bin/sh\necho "asked by $NEGOTIATOR_GUEST"\n'}


def channel(guest, timeout=20.0):
    return GuestChannel(socket_path=guest.channel_path(H2G), timeout=timeout)


def run(guest, command, *args, timeout=30.0):
    with channel(guest, timeout) as ch:
        return ch.execute(command, *args, timeout=timeout)


def _remove(guest):
    print('--- console of %s ---\n%s' % (guest.name, guest.console_tail(40)))
    guest.remove()


@pytest.fixture(scope='module')
def agent(vm_host):  # noqa: F811 (the imported fixture)
    guest = negotiator_vm.start_agent_guest(VENV_BIN, commands=GUEST_COMMANDS, image=vm_host,
                                            name_prefix='negotiator-test-faults-')
    try:
        wait_for_agent(guest)
        yield guest
    finally:
        _remove(guest)


@pytest.fixture(scope='module')
def late(vm_host):  # noqa: F811
    """A guest whose daemon starts DELAY seconds after boot (unsupervised)."""
    init_script, files = negotiator_vm.agent_guest_files(VENV_BIN, commands=GUEST_COMMANDS, supervised=False)
    ready = 'echo %s' % shlex.quote(negotiator_vm.AGENT_READY)
    assert ready in init_script
    init_script = init_script.replace(ready, 'echo negotiator-late-boot\nsleep 8\n' + ready)
    guest = negotiator_vm.start_guest(init_script, files=files, image=vm_host, name_prefix='negotiator-test-faults-')
    try:
        guest.wait_for_console('negotiator-late-boot', timeout=60)
        yield guest
    finally:
        _remove(guest)


def test_host_connects_before_the_guest_daemon_starts(late):
    # The guest has booted; its daemon starts seconds from now. Connect and call at once.
    started = time.monotonic()
    try:
        with channel(late, timeout=40) as ch:
            first = ch.ping()
        outcome = 'succeeded (%.3f s round trip)' % first
    except (CallTimeout, ConnectionClosed) as exc:
        outcome = 'failed clearly: %s: %s' % (type(exc).__name__, exc)
    took = time.monotonic() - started
    print('first call, made before the daemon started: %s after %.1f s' % (outcome, took))
    assert took < 45
    late.wait_for_console(negotiator_vm.AGENT_READY, timeout=30)
    wait_for_agent(late, timeout=60)
    assert run(late, 'echo', 'next').stdout == b'next\n'


def test_guest_shut_down_during_a_call_fails_clearly(late):
    outcome = []
    path = late.channel_path(H2G)
    with channel(late, timeout=90) as ch:
        ch.ping()
        caller = threading.Thread(target=lambda: outcome.append(result_or_error(ch.execute, 'long', timeout=90)))
        caller.start()
        assert wait_until(lambda: len(ch.execute('pids').stdout.split()) == 2, timeout=20, interval=0.2), \
            'the long command did not start'
        started = time.monotonic()
        late.destroy()  # virsh destroy: QEMU is killed, its socket closes
        caller.join(30)
        took = time.monotonic() - started
    assert not caller.is_alive(), 'the call hung after the guest was destroyed'
    assert isinstance(outcome[0], ConnectionClosed), outcome
    # Noticed when the socket closed, not at the call's 90 s timeout.
    assert took < 40, 'the call took %.1f s to notice' % took
    print('call failed %.2f s after virsh destroy: %s' % (took, outcome[0]))
    # And the next call says at once that there is nothing to talk to.
    with pytest.raises(NegotiatorError):
        with GuestChannel(socket_path=path, timeout=3) as ch:
            ch.ping()


def test_client_timeout_with_a_late_reply_in_flight(agent):
    # The raw endpoint, so that the agent's own command timeout (10 s) outlasts the call's (1.5 s).
    endpoint = Endpoint(Transport.from_socket(connect_socket(agent.channel_path(H2G), 10)), name='early').start()
    try:
        endpoint.handshake(30)
        with pytest.raises(CallTimeout):
            endpoint.call('execute', {'command': 'nap', 'args': ['3'], 'timeout': 10}, timeout=1.5)
    finally:
        endpoint.close()
    # The guest replies to the departed client about 1.5 s later; a new client must get its own reply.
    with channel(agent) as ch:
        assert ch.execute('echo', 'mine').stdout == b'mine\n'
        time.sleep(2.0)
        assert ch.execute('echo', 'still', 'mine').stdout == b'still mine\n'


def test_two_host_clients_at_once(agent):
    path = agent.channel_path(H2G)
    with GuestChannel(socket_path=path, timeout=10) as first:
        first.ping()
        started = time.monotonic()
        with pytest.raises((CallTimeout, ChannelBusy)) as excinfo:
            with GuestChannel(socket_path=path, timeout=3) as second:
                second.ping()
        waited = time.monotonic() - started
        print('second client: %s after %.1f s' % (type(excinfo.value).__name__, waited))
        assert waited < 6
        # The first client is undisturbed.
        assert first.execute('echo', 'first').stdout == b'first\n'
    # Once the first has gone, a second client is served (its stale attempt left no trace).
    with GuestChannel(socket_path=path, timeout=10) as second:
        assert second.execute('echo', 'second').stdout == b'second\n'


def test_port_held_by_another_process_is_ebusy(agent):
    assert run(agent, 'grab-port').stdout.split()[0] == b'EBUSY'
    result = run(agent, 'second-daemon', timeout=60)
    assert result.exit_status == 69, result.stderr
    assert b'in use by another process' in result.stderr
    # The serving daemon is untouched.
    assert run(agent, 'echo', 'alive').stdout == b'alive\n'


def test_guest_daemon_sigterm_during_a_long_command(agent):
    old_daemon = run(agent, 'daemon-pid').stdout.split()[0]
    outcome = []
    with channel(agent, timeout=90) as ch:
        caller = threading.Thread(target=lambda: outcome.append(result_or_error(ch.execute, 'long', timeout=90)))
        caller.start()
        assert wait_until(lambda: len(ch.execute('pids').stdout.split()) == 2, timeout=20, interval=0.2), \
            'the long command did not start'
        pids = ch.execute('pids').stdout.split()
        started = time.monotonic()
        ch.execute('stop-daemon')
        caller.join(30)
        took = time.monotonic() - started
    assert not caller.is_alive()
    result = outcome[0]
    print('the long call ended %.2f s after SIGTERM: %r' % (took, result))
    # The daemon answers for the command it killed before it goes (no wait for the caller's timeout).
    assert not isinstance(result, Exception) and result.signal == signal.SIGTERM, result
    assert took < 40, 'the caller waited %.1f s: for its 90 s timeout?' % took
    # supervisord starts a new daemon; from a second call: nothing of the command is left.
    wait_for_agent(agent, timeout=60)
    assert run(agent, 'daemon-pid').stdout.split()[0] != old_daemon
    left = run(agent, 'proc-state', *[p.decode() for p in pids]).stdout
    assert left == b'', 'processes of the killed command survive: %r' % left


def test_libvirtd_stopped_and_started_under_a_running_host_daemon(agent):
    daemon = start_host_daemon(agent, HOST_COMMANDS, options=['-v'])
    stopped_libvirtd = False

    def ask_host():
        # Through the daemon, which holds the guest's channel (and needs no virsh to find it).
        with GuestChannel(agent.name, socket=daemon.socket_path, timeout=40) as ch:
            return ch.execute('ask-host', 'whoami-guest', timeout=40)
    attempts = []

    def served():
        attempts.append(ask_host())
        return attempts[-1].exit_status == 0
    try:
        wait_until(served, timeout=40, interval=1)
        result = attempts[-1]
        assert result.stdout == b'asked by %s\n' % agent.name.encode(), result.stderr
        pid = _libvirtd_pid()
        assert pid, 'libvirtd is not running'
        os.kill(pid, signal.SIGTERM)
        stopped_libvirtd = True
        assert wait_until(lambda: process_reaped(pid), 10, interval=0.2), 'libvirtd did not stop'
        # Without libvirtd: the daemon lives, and the guest it serves is still served.
        result = ask_host()
        assert daemon.poll() is None
        assert result.exit_status == 0 and result.stdout.startswith(b'asked by'), result.stderr
        negotiator_vm.ensure_host(force=True)  # starts libvirtd as setup-host does
        stopped_libvirtd = False
        # The daemon starts watching libvirt's events again (back-off 1, 2, 4... s) and serves on.
        assert wait_until(lambda: read_log(daemon).count("Watching libvirt's events") >= 2, 40, interval=0.2), \
            read_log(daemon)
        result = ask_host()
        assert result.exit_status == 0 and result.stdout.startswith(b'asked by'), result.stderr
        assert daemon.poll() is None
    finally:
        if stopped_libvirtd or not _libvirtd_pid():
            negotiator_vm.ensure_host(force=True)
        stop_host_daemon(daemon)
    assert _libvirtd_pid()


def _libvirtd_pid():
    for line in subprocess.run(['pgrep', '-x', 'libvirtd'], stdout=subprocess.PIPE,
                               universal_newlines=True).stdout.split():
        try:
            with open('/proc/%s/stat' % line) as handle:
                if handle.read().rsplit(')', 1)[1].split()[0] != 'Z':
                    return int(line)
        except OSError:
            pass
    return None
