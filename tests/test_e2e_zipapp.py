"""
End to end, the single-file agent on a real guest: Python 3.6, then a restart onto Python 3.13.

Why: old guests run the agent as ``python3 negotiator-guest.pyz --daemon`` (docs/guest.rst),
on the Python they have, which the other end-to-end tests (the installed package on this
interpreter) do not prove. One guest does it all, to keep the suite's time: its supervisord
starts the archive (built by this module's set-up into /var/tmp, which the guest shares) on
Python 3.6; the core checks run; a command of the agent then names Python 3.13 and stops the
agent, supervisord starts it again (``scripts/switch_agent.py``), and the same checks run on
3.13. The interpreters are the host's (pyenv's), which the guest runs from the shared root. The
guest's own commands call the host through the same wrapper as the agent, so the client mode of
the archive runs on the same Python as its daemon.
"""

import hashlib
import os
import shlex
import shutil
import signal
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import negotiator_vm, vm_host, wait_for_agent  # noqa: E402,F401 (a fixture)
from e2e_support import host_cli, start_host_daemon, stop_host_daemon  # noqa: E402
from support import GUEST_PYTHONS, build_zipapp, interpreter  # noqa: E402

import switch_agent  # noqa: E402 (scripts/ is on the tests' path: pytest.ini)

pytestmark = pytest.mark.vm

TRICKY_ARGS = [
    'with space', "single ' quote", 'double " quote', 'semi;colon', '$(touch /tmp/pwned)', '`touch /tmp/pwned`',
    'back\\slash \\n', 'tab\there', 'ünïcödé 日本語 ✓', '', 'new\nline', '*', '--option-like', '-', '$HOME', '|&<>',
]

HOST_COMMANDS = {'whoami-guest': '#!/bin/sh\necho "NEGOTIATOR_GUEST=$NEGOTIATOR_GUEST"\necho "args: $*"\n'}


class AgentPhase(object):
    """The agent as one phase of this module finds it: the Python it should run on, what runs, how it came."""

    def __init__(self, python, process, restart=None):
        self.python = python
        self.process = process  # (pid, argv) of the agent, as /proc in the guest says
        self.restart = restart  # (agent before, result of the restart-agent call), if this phase restarted it


@pytest.fixture(scope='module')
def zipapp():
    """The archive, built from this checkout, and the wrapper that runs it: (bin folder, archive path)."""
    directory = tempfile.mkdtemp(prefix='negotiator-zipapp-', dir='/var/tmp')  # not /tmp: the guest's own
    os.chmod(directory, 0o755)
    archive = os.path.join(directory, 'negotiator-guest.pyz')
    print(build_zipapp(archive))
    bindir = os.path.join(directory, 'bin')
    os.mkdir(bindir, 0o755)
    switch_agent.write_wrapper(bindir, [interpreter(GUEST_PYTHONS[0]), archive])
    yield bindir, archive
    shutil.rmtree(directory, ignore_errors=True)


def guest_commands(bindir):
    commands = dict(switch_agent.COMMANDS)
    commands.update({
        'argv': '#!/bin/sh\nprintf "%s\\0" "$@"\n',
        'sha': '#!/bin/sh\nsha256sum | cut -d" " -f1\n',
        'catfile': '#!/bin/sh\nexec cat "$1"\n',
        'slow': '#!/bin/sh\necho started\nexec sleep 60\n',
        # Python starts slowly over 9p under TCG, and the archive's modules are compiled at each start.
        'ask-host': '#!/bin/sh\nexec %s --timeout 60 --execute "$*"\n'
                    % shlex.quote(os.path.join(bindir, 'negotiator-guest')),
    })
    return commands


@pytest.fixture(scope='module')
def guest(vm_host, zipapp):  # noqa: F811 (the fixture)
    bindir, _ = zipapp
    started = negotiator_vm.start_agent_guest(bindir, commands=guest_commands(bindir), image=vm_host)
    try:
        wait_for_agent(started)
        yield started
    finally:
        print('--- console of %s ---\n%s' % (started.name, started.console_tail(60)))
        started.remove()


@pytest.fixture
def host_daemon(guest):
    """
    The host daemon, for the test of the guest-to-host direction only: it holds the guest's
    host-to-guest channel while it runs, and the other tests (and the restarts of the agent)
    talk to the agent directly.
    """
    process = start_host_daemon(guest, HOST_COMMANDS, '[%s]\nallow = whoami-guest\n' % guest.name)
    yield process
    stop_host_daemon(process)


def execute(guest, command_line, timeout=60, daemon=None):
    return host_cli('--timeout', str(timeout), '--execute', command_line, guest.name, daemon=daemon,
                    timeout=timeout + 60)


@pytest.fixture(scope='module', params=GUEST_PYTHONS, ids=['python' + version for version in GUEST_PYTHONS])
def agent(request, guest, zipapp):
    """
    The agent on each Python in turn: the guest starts it on the first; every other comes by a
    restart that a command of the agent asks for (checked by test_the_agent_runs_the_archive).
    """
    _, archive = zipapp
    python = interpreter(request.param)
    process = switch_agent.agent_process(guest)
    if process[1][0] == python:
        return AgentPhase(python, process)
    result, before, after = switch_agent.restart_agent(guest, [python, archive])
    return AgentPhase(python, after, (before, result))


def test_the_agent_runs_the_archive(agent, guest, zipapp):
    _, archive = zipapp
    pid, argv = agent.process
    assert argv[:3] == [agent.python, archive, '--daemon'], argv
    ping = host_cli('--ping', guest.name)
    assert ping.returncode == 0 and ping.stdout.decode().startswith('%s: agent negotiator-guest ' % guest.name)
    if agent.restart is not None:
        (old_pid, old_argv), call = agent.restart
        assert pid != old_pid and old_argv[0] != agent.python
        # The agent stopped the command that stopped it and replied before it exited, then
        # exited cleanly, and supervisord started it again.
        assert (call.exit_status, call.signal) == (None, signal.SIGTERM), call
        assert 'exited: negotiator-guest (exit status 0; expected)' in guest.read_console()


def test_list_commands(agent, guest):
    result = host_cli('--list-commands', guest.name)
    assert result.returncode == 0, result.stderr
    names = set(result.stdout.decode().split())
    assert {'argv', 'sha', 'catfile', 'slow', 'ask-host', 'os-release', 'hostname', 'uptime'} <= names


def test_arguments_arrive_byte_for_byte(agent, guest):
    result = execute(guest, 'argv ' + ' '.join(shlex.quote(arg) for arg in TRICKY_ARGS))
    assert (result.returncode, result.stderr) == (0, b'')
    assert result.stdout == b''.join(arg.encode('utf-8') + b'\0' for arg in TRICKY_ARGS)
    check = execute(guest, 'catfile /tmp/pwned')  # no shell ran the substitutions
    assert check.returncode != 0 and b'No such file' in check.stderr


def test_binary_stdin(agent, guest):
    data = os.urandom(1024 * 1024)
    result = host_cli('--timeout', '60', '--stdin', '--execute', 'sha', guest.name, input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == hashlib.sha256(data).hexdigest()


def test_16_mib_of_output_arrive_intact(agent, guest):
    # The guest reads the file from the host's /var/tmp (its own, read-only, over 9p).
    path = os.path.join(guest.workdir, 'big-%s.bin' % os.path.basename(agent.python))
    data = os.urandom(16 * 1024 * 1024)
    with open(path, 'wb') as handle:
        handle.write(data)
    try:
        result = host_cli('--timeout', '120', '--execute', 'catfile ' + path, guest.name, timeout=180)
    finally:
        os.unlink(path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(data) and hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_timeout_kills_a_slow_command_and_the_next_call_gets_its_own_reply(agent, guest):
    result = host_cli('--timeout', '4', '--execute', 'slow', guest.name)
    assert result.returncode == 75, (result.returncode, result.stderr)
    assert b'slow' in result.stderr and (b'killed' in result.stderr or b'did not reply' in result.stderr)
    after = execute(guest, 'argv next-call')
    assert (after.returncode, after.stdout) == (0, b'next-call\0')


def test_a_guest_program_calls_the_host_with_the_archive(agent, guest, host_daemon):
    result = execute(guest, 'ask-host whoami-guest one two', timeout=180, daemon=host_daemon)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('NEGOTIATOR_GUEST=%s\nargs: one two\n' % guest.name).encode()
