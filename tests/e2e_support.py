"""
Helpers for the end-to-end tests (``tests/test_e2e_*.py``) on real libvirt/QEMU guests.

Why: an agent guest costs about 15 s until its agent answers (boot under TCG, then Python over
9p), so the end-to-end modules share their guests between tests (module-scoped fixtures) and
boot the guests they need side by side. The CLIs run as users run them: the installed
``negotiator-host`` of the virtual environment running the tests, as a subprocess.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from support import write_command
from vmfixtures import VENV_BIN, negotiator_vm, wait_for_agent
from waiting import wait_until

__all__ = ('HOST_CLI', 'GUEST_CLI', 'host_cli', 'start_agents', 'remove_guests', 'start_host_daemon',
           'stop_host_daemon', 'read_log')

HOST_CLI = os.path.join(VENV_BIN, 'negotiator-host')
GUEST_CLI = os.path.join(VENV_BIN, 'negotiator-guest')


def host_cli(*args, input=None, timeout=120):
    """Run ``negotiator-host ARGS...`` and return the CompletedProcess (bytes, both streams kept apart)."""
    return subprocess.run([HOST_CLI] + list(args), input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def start_agents(image, commands_per_guest, **kwargs):
    """
    Start one agent guest per entry of ``commands_per_guest`` (a list of ``{name: script}``),
    all at once, and return them once every agent answers a ping. The guests are removed
    again if any of them fails to come up (the error says why; nothing skips).
    """
    if VENV_BIN.startswith('/tmp/'):
        pytest.fail('the tests run from %s, which the guest cannot see (its /tmp is its own)' % VENV_BIN,
                    pytrace=False)
    guests = []
    try:
        for commands in commands_per_guest:
            init_script, files = negotiator_vm.agent_guest_files(VENV_BIN, commands, **kwargs)
            guests.append(negotiator_vm.start_guest(init_script, files=files, image=image))
        for guest in guests:
            guest.wait_for_console(negotiator_vm.AGENT_READY, timeout=90)
        for guest in guests:
            wait_for_agent(guest)
    except BaseException:
        remove_guests(guests)
        raise
    return guests


def remove_guests(guests):
    for guest in guests:
        print('--- console of %s ---\n%s' % (guest.name, guest.console_tail(60)))
        guest.remove()


def start_host_daemon(guest, commands, policy=None):
    """
    ``negotiator-host --daemon GUEST`` serving only ``guest`` (other test sessions on this machine
    run guests and daemons of their own), with ``commands`` (``{name: script}``) in a commands
    directory and ``policy`` (the text of a policy file) if given. Returns the process once the
    daemon serves the guest; ``process.workdir`` and ``process.log_path`` say where things are.
    Stop it with :func:`stop_host_daemon`.
    """
    workdir = tempfile.mkdtemp(prefix='negotiator-e2e-host-')
    os.chmod(workdir, 0o755)
    directory = os.path.join(workdir, 'commands')
    os.mkdir(directory, 0o755)
    for name, text in commands.items():
        write_command(directory, name, text)
    argv = [HOST_CLI, '--daemon', '--commands-dir', directory]
    if policy is not None:
        policy_path = os.path.join(workdir, 'policy.ini')
        with open(policy_path, 'w') as handle:
            handle.write(policy)
        argv += ['--policy', policy_path]
    log_path = os.path.join(workdir, 'daemon.log')
    with open(log_path, 'wb') as log:
        process = subprocess.Popen(argv + [guest.name], stdout=log, stderr=subprocess.STDOUT)
    process.workdir, process.log_path = workdir, log_path
    if not wait_until(lambda: 'Serving guest %s' % guest.name in read_log(process) or process.poll() is not None,
                      timeout=30, interval=0.1) or process.poll() is not None:
        stop_host_daemon(process)
        pytest.fail('the host daemon did not connect to %s:\n%s' % (guest.name, read_log(process)), pytrace=False)
    return process


def stop_host_daemon(process):
    """Stop a daemon of :func:`start_host_daemon` (SIGTERM, then SIGKILL), print its log, remove its files."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print('--- host daemon log ---\n%s' % read_log(process)[-20000:])
    shutil.rmtree(process.workdir, ignore_errors=True)


def read_log(process):
    """What a daemon of :func:`start_host_daemon` has logged so far."""
    with open(process.log_path, 'rb') as handle:
        return handle.read().decode('utf-8', 'replace')
