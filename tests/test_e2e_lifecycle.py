"""
End to end, both directions and the hard cases, on one real guest with ``negotiator-host --daemon``.

Why: the guest-to-host direction needs the host daemon connected to a real guest's channel,
and the failures that matter in production only happen on a real guest: the guest daemon
killed by SIGKILL in the middle of a request (supervisord restarts it), and a hard reset of
the guest. The host daemon is restricted to this module's guest (``--daemon GUEST-PATTERN``),
since other test sessions on this machine run their own host daemons and guests. The daemon
holds the guest's host-to-guest channel too, so the tests call the guest through it.

The tests run in file order and share the guest: the daemon kill and the reset come last.
"""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import vm_host, wait_for_agent  # noqa: E402,F401 (a fixture)
from e2e_support import (  # noqa: E402
    GUEST_CLI, host_cli, read_log, remove_guests, start_agents, start_host_daemon, stop_host_daemon,
)
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.vm

# Guest commands: the host drives the guest side through them (host -> guest -> host in one call).
GUEST_COMMANDS = {
    'ask-host': '#!/bin/sh\nexec %s --timeout 30 --execute "$*"\n' % GUEST_CLI,
    'list-host': '#!/bin/sh\nexec %s --timeout 30 --list-commands\n' % GUEST_CLI,
    'daemon-pid': '#!/bin/sh\necho $PPID\n',
    'argv': '#!/bin/sh\nprintf "%s\\0" "$@"\n',
    # A command's parent is the agent itself (setsid and env exec): check that, then SIGKILL it
    # while this very request is in flight.
    'kill-daemon': '#!/bin/sh\n'
                   'parent=$(tr "\\0" " " < /proc/$PPID/cmdline)\n'
                   'echo "agent $PPID: $parent"\n'
                   'case "$parent" in *negotiator-guest*--daemon*) ;; *) echo "not the agent" >&2; exit 1;; esac\n'
                   'sleep 1\n'
                   'kill -9 $PPID\n'
                   'exec sleep 30\n',
}

HOST_COMMANDS = {
    'whoami-guest': '#!/bin/sh\necho "NEGOTIATOR_GUEST=$NEGOTIATOR_GUEST"\necho "args: $*"\n',
    'forbidden': '#!/bin/sh\ntouch "$(dirname "$0")/../forbidden-ran"\necho should not run\n',
}


@pytest.fixture(scope='module')
def guest(vm_host):  # noqa: F811 (the fixture)
    (started,) = start_agents(vm_host, [GUEST_COMMANDS])
    yield started
    remove_guests([started])


@pytest.fixture(scope='module')
def host_daemon(guest):
    """``negotiator-host --daemon`` for this guest only, with a policy; yields (process, workdir)."""
    policy = '[%s]\nallow = whoami-guest hostname\n\n[*]\nallow = forbidden-for-everyone-else\n' % guest.name
    process = start_host_daemon(guest, HOST_COMMANDS, policy)
    try:
        yield process, process.workdir
    finally:
        stop_host_daemon(process)


def execute(guest, host_daemon, command_line, timeout=60):
    process, _ = host_daemon
    return host_cli('--timeout', str(timeout), '--execute', command_line, guest.name, daemon=process)


# Guest to host.

def test_a_guest_program_runs_a_host_command_that_sees_the_guests_name(guest, host_daemon):
    result = execute(guest, host_daemon, 'ask-host whoami-guest one two')
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('NEGOTIATOR_GUEST=%s\nargs: one two\n' % guest.name).encode()


def test_the_hosts_policy_refuses_and_narrows_the_listing(guest, host_daemon):
    process, workdir = host_daemon
    result = execute(guest, host_daemon, 'ask-host forbidden')
    assert result.returncode == 77, (result.returncode, result.stdout, result.stderr)
    # Refused, and answered as if it did not exist: only the host's log says why.
    assert b"no command 'forbidden'" in result.stderr and b'policy' not in result.stderr
    assert not os.path.exists(os.path.join(workdir, 'forbidden-ran'))
    listing = execute(guest, host_daemon, 'list-host')
    assert listing.returncode == 0, listing.stderr
    assert sorted(line.split()[0] for line in listing.stdout.decode().splitlines()) == ['hostname', 'whoami-guest']
    assert 'Refused forbidden for %s' % guest.name in read_log(process)


def test_the_host_daemon_serves_only_the_guests_it_was_given(guest, host_daemon):
    process, _ = host_daemon
    served = [line for line in read_log(process).splitlines() if 'Serving guest ' in line]
    assert served and all('Serving guest %s ' % guest.name in line for line in served), served


# The guest daemon killed mid-request.

def test_guest_daemon_killed_mid_request_is_restarted_and_the_caller_gets_an_error(guest, host_daemon):
    before = execute(guest, host_daemon, 'daemon-pid')
    assert before.returncode == 0, before.stderr
    started = time.monotonic()
    # No --timeout: the caller would wait forever if nothing told it that the agent died.
    result = host_cli('--timeout', '0', '--execute', 'kill-daemon', guest.name, daemon=host_daemon[0], timeout=60)
    elapsed = time.monotonic() - started
    print('the caller returned %.1f s after the call: %r' % (elapsed, result.stderr))
    assert b'agent %s: ' % before.stdout.strip() in result.stdout, 'the command did not find the agent'
    assert result.returncode in (69, 70, 75), (result.returncode, result.stderr)
    assert result.stderr.startswith(b'negotiator-host: ') and b'lost' in result.stderr
    assert elapsed < 30
    wait_for_agent(guest, timeout=60, daemon=host_daemon[0])
    after = execute(guest, host_daemon, 'daemon-pid')
    assert after.returncode == 0, after.stderr
    assert after.stdout != before.stdout, 'the agent was not restarted'
    assert 'exited: negotiator-guest (terminated by SIGKILL' in guest.read_console()
    # Both directions work again.
    assert execute(guest, host_daemon, 'argv again').stdout == b'again\0'
    assert execute(guest, host_daemon, 'ask-host whoami-guest').returncode == 0


# A hard reset of the guest.

def test_guest_reset_both_directions_work_again(guest, host_daemon):
    process, _ = host_daemon
    boots = guest.read_console().count('negotiator-agent-guest: ready')
    guest.reset()
    rebooted = wait_until(lambda: guest.read_console().count('negotiator-agent-guest: ready') > boots,
                          timeout=90, interval=0.5)
    assert rebooted, guest.console_tail()
    started = time.monotonic()
    wait_for_agent(guest, timeout=90, daemon=process)
    print('agent answered %.1f s after the reboot was seen' % (time.monotonic() - started))
    assert execute(guest, host_daemon, 'argv after-reset').stdout == b'after-reset\0'
    result = wait_until(lambda: execute(guest, host_daemon, 'ask-host whoami-guest reset').returncode == 0,
                        timeout=30, interval=0.5)
    assert result, 'guest to host does not work after the reset:\n%s' % read_log(process)[-3000:]
    result = execute(guest, host_daemon, 'ask-host whoami-guest reset')
    assert result.stdout == ('NEGOTIATOR_GUEST=%s\nargs: reset\n' % guest.name).encode()
    assert process.poll() is None, 'the host daemon died'
