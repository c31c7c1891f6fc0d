"""
The hardening findings (``docs/faults.rst``, the rows after "Hostile peers") on one real guest.

Why: the unit tests prove each defence with fakes; these prove that the same defences hold
where they matter, with a real guest kernel driving the virtio-serial port, a real
``negotiator-host --daemon`` reading it, and commands that run inside the guest:

- a command that closes its output (``exec >/dev/null 2>&1``) or leaves a ``setsid`` child
  holding it still ends at its timeout, and nothing it started survives in the guest;
- a hostile program in the guest that writes a malformed message, a 4 MiB line of empty JSON
  objects and a flood of garbage to the guest-to-host port neither cuts itself off nor
  makes the host daemon take memory or fill its log, and is answered afterwards;
- Ctrl-C of ``negotiator-host --execute`` ends the CLI at once and kills the command in the guest.

One guest is shared by the module (a boot costs about 15 s), and so is one host daemon: it holds
the guest's host-to-guest channel, so every call of the tests goes through it, as on a host
where the daemon runs.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from negotiator_common.endpoint import Endpoint  # noqa: E402
from negotiator_common.errors import CommandTimedOut  # noqa: E402
from negotiator_common.transport import Transport  # noqa: E402
from negotiator_host import GuestChannel  # noqa: E402
from negotiator_host.channel import connect_socket  # noqa: E402

from vmfixtures import vm_host  # noqa: E402,F401 (a fixture)
from e2e_support import (  # noqa: E402
    GUEST_CLI, host_cli_argv, read_log, remove_guests, start_agents, start_host_daemon, stop_host_daemon,
)
from measuring import status_kib  # noqa: E402
from support import interruptible  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.vm

# A program in the guest that attacks the host daemon through the guest-to-host port, then
# asks it for a ping on the same connection and prints the answer (exit status 1 without one).
HOSTILE = r'''
import os, sys, threading, time
dev = None
for entry in os.listdir('/sys/class/virtio-ports'):
    with open('/sys/class/virtio-ports/%s/name' % entry) as handle:
        if handle.read().strip() == 'negotiator-guest-to-host.0':
            dev = '/dev/' + entry
fd = os.open(dev, os.O_RDWR)
answered = threading.Event()

def drain():
    # Read every reply (the host answers each bad line), so that the host never waits for us.
    pending = b''
    while not answered.is_set():
        chunk = os.read(fd, 65536)
        pending += chunk
        lines = pending.split(b'\n')
        pending = lines.pop()
        for line in lines:
            if b'"probe"' in line:
                print('probe answered: %s' % line.decode('utf-8', 'replace')[:200])
                answered.set()

def send(data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

threading.Thread(target=drain, daemon=True).start()
send(b'\n{"jsonrpc":"2.0","method":"output","params":{"id":[1]}}\n')
send(b'{"jsonrpc":"2.0","id":{"an":"object"},"result":1}\n')
send(b'{"jsonrpc":"2.0","id":"' + b'i' * (1024 * 1024) + b'","result":1}\n')
objects = (4 * 1024 * 1024 - 100) // 3
send(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":[' + b','.join([b'{}'] * objects) + b']}}\n')
send(b'x\n' * 20000)
send(b'{"jsonrpc":"2.0","id":"probe","method":"ping"}\n')
sys.exit(0 if answered.wait(90) else 1)
'''

GUEST_COMMANDS = {
    # The everyday logging idiom: no pipe stays open, the shell sleeps on.
    'quiet-nap': '#!/bin/sh\nexec >/dev/null 2>&1\nsleep "$1"\n',
    # A child in a session of its own keeps the command's stdout open.
    'escape': '#!/bin/sh\nsetsid sleep "$1" &\nsleep "$1"\n',
    # The pids of the processes whose command line is exactly "sleep SECONDS".
    'find-sleep': ('#!/bin/sh\nfor p in /proc/[0-9]*; do\n'
                   '  [ "$(tr "\\0" " " < $p/cmdline 2>/dev/null)" = "sleep $1 " ] && echo ${p#/proc/}\n'
                   'done\ntrue\n'),
    # Says on the console that it runs, then sleeps long.
    'long': '#!/bin/sh\necho "negotiator-long-started $$" > /dev/console\nexec sleep "$1"\n',
    'hostile': '#!/usr/bin/python3\n' + HOSTILE,
    'ask-host': '#!/bin/sh\nexec %s --timeout 60 --execute "$*"\n' % GUEST_CLI,
}

HOST_COMMANDS = {'whoami-guest': '#!/bin/sh\necho "asked by $NEGOTIATOR_GUEST"\n'}


@pytest.fixture(scope='module')
def guest(vm_host):  # noqa: F811 (the fixture)
    (started,) = start_agents(vm_host, [GUEST_COMMANDS])
    yield started
    remove_guests([started])


@pytest.fixture(scope='module')
def host_daemon(guest):
    process = start_host_daemon(guest, HOST_COMMANDS)
    yield process
    stop_host_daemon(process)


def channel(guest, daemon, timeout=60.0):
    """The guest's agent through the module's host daemon (it holds the guest's channel)."""
    return GuestChannel(guest.name, socket=daemon.socket_path, timeout=timeout)


def sleeping(guest, daemon, seconds):
    with channel(guest, daemon) as ch:
        return ch.execute('find-sleep', str(seconds)).stdout.split()


def execute_with_the_guests_timeout(guest, daemon, command, args, command_timeout):
    """
    ``execute`` through the daemon with ``command_timeout`` for the guest to kill the command,
    and room for its reply: the API gives the guest its caller's timeout less only the kill grace
    and a second, which an agent under TCG on a loaded host can overrun, and then the caller's
    own timeout (not the guest's) would end the call.
    """
    endpoint = Endpoint(Transport.from_socket(connect_socket(daemon.socket_path, 10)), name=guest.name).start()
    try:
        endpoint.handshake(30, params={'guest': guest.name})
        return endpoint.call('execute', {'command': command, 'args': args, 'timeout': command_timeout}, timeout=60)
    finally:
        endpoint.close()


def test_a_command_that_closes_its_output_still_ends_at_its_timeout(guest, host_daemon):
    started = time.monotonic()
    with pytest.raises(CommandTimedOut) as excinfo:
        execute_with_the_guests_timeout(guest, host_daemon, 'quiet-nap', ['4242'], 3)
    took = time.monotonic() - started
    print('quiet-nap with a 3 s timeout ended after %.1f s: %s' % (took, excinfo.value))
    assert took < 30, 'the timeout was escaped (%.1f s)' % took
    assert wait_until(lambda: not sleeping(guest, host_daemon, 4242), timeout=10, interval=0.5)


def test_a_setsid_child_holding_the_output_neither_holds_the_reply_nor_survives(guest, host_daemon):
    started = time.monotonic()
    with pytest.raises(CommandTimedOut):
        execute_with_the_guests_timeout(guest, host_daemon, 'escape', ['4711'], 3)
    took = time.monotonic() - started
    print('escape with a 3 s timeout ended after %.1f s' % took)
    assert took < 30, 'the reply waited for the escaped child (%.1f s)' % took
    assert wait_until(lambda: not sleeping(guest, host_daemon, 4711), timeout=10, interval=0.5), \
        sleeping(guest, host_daemon, 4711)


def test_a_hostile_guest_program_is_answered_and_the_host_daemon_stays_small(guest, host_daemon):
    with channel(guest, host_daemon, timeout=180) as ch:
        attack = ch.execute('hostile', timeout=170)
    print(attack.stdout.decode('utf-8', 'replace'), attack.stderr.decode('utf-8', 'replace')[-2000:])
    assert attack.exit_status == 0 and b'probe answered' in attack.stdout, 'the attacker was cut off'
    assert b'"result"' in attack.stdout
    # The host daemon still serves the guest's ordinary callers.
    with channel(guest, host_daemon) as ch:
        result = ch.execute('ask-host', 'whoami-guest', timeout=90)
    assert result.stdout == b'asked by %s\n' % guest.name.encode(), (result.stderr, read_log(host_daemon)[-3000:])
    peak = status_kib(host_daemon.pid, 'VmHWM')
    print('host daemon peak RSS: %d MiB' % (peak // 1024))
    assert peak < 200 * 1024, 'the host daemon peaked at %d MiB' % (peak // 1024)
    log = read_log(host_daemon)
    assert len(log) < 1024 * 1024, 'the attack wrote %d bytes of log' % len(log)
    assert max(len(line) for line in log.splitlines()) < 1000


def test_ctrl_c_ends_the_cli_at_once_and_kills_the_command_in_the_guest(guest, host_daemon):
    cli = subprocess.Popen(host_cli_argv('--timeout', '200', '--execute', 'long 600', guest.name, daemon=host_daemon),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible)
    try:
        guest.wait_for_console('negotiator-long-started', timeout=60)
        started = time.monotonic()
        cli.send_signal(signal.SIGINT)
        status = cli.wait(10)
        took = time.monotonic() - started
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    print('Ctrl-C: exit status %s after %.2f s; stderr %r' % (status, took, cli.stderr.read()))
    assert status == 130
    assert wait_until(lambda: not sleeping(guest, host_daemon, 600), timeout=15, interval=0.5), 'the command survived'
