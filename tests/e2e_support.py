"""
Helpers for the end-to-end tests (``tests/test_e2e_*.py``) on real libvirt/QEMU guests.

Why: an agent guest costs about 15 s until its agent answers (boot under TCG, then Python over
9p), so the end-to-end modules share their guests between tests (module-scoped fixtures) and
boot the guests they need side by side. The CLIs run as users run them: the installed
``negotiator-host`` of the virtual environment running the tests, as a subprocess (as another
user: a forked child that gives up root, :func:`host_cli_as`). A host daemon of these tests has
its own socket and audit log, and the calls that should go through it name it (``daemon=``).
"""

import importlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings

import pytest

from negotiator_host import cli as host_cli_module

from support import write_command
from vmfixtures import VENV_BIN, negotiator_vm, wait_for_agent
from waiting import wait_until

__all__ = ('HOST_CLI', 'GUEST_CLI', 'host_cli', 'host_cli_argv', 'host_cli_as', 'start_agents', 'remove_guests',
           'start_host_daemon', 'restart_host_daemon', 'stop_host_daemon', 'read_log', 'local_connections')

HOST_CLI = os.path.join(VENV_BIN, 'negotiator-host')
GUEST_CLI = os.path.join(VENV_BIN, 'negotiator-guest')


def host_cli(*args, daemon=None, input=None, timeout=120):
    """
    Run ``negotiator-host ARGS...`` and return the CompletedProcess (bytes, both streams kept
    apart); with ``daemon`` (a process of :func:`start_host_daemon`), the call looks for the
    host daemon at that daemon's socket (``--socket``).
    """
    return subprocess.run(host_cli_argv(*args, daemon=daemon), input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def host_cli_argv(*args, daemon=None):
    """The command line of :func:`host_cli` (for a test that starts the process itself)."""
    socket_option = ['--socket', daemon.socket_path] if daemon is not None else []
    return [HOST_CLI] + socket_option + list(args)


CLI_LAZY_IMPORTS = ('logging', 'shlex', 'unicodedata', 'humanfriendly', 'negotiator_common.client',
                    'negotiator_common.exit_status', 'negotiator_host.channel', 'negotiator_host.discovery',
                    'negotiator_host.policy')
"""What the CLI imports only when it runs (so that a quick call pays for no more): :func:`host_cli_as`
imports them before its child gives up root."""


def host_cli_as(user, *args, daemon, timeout=120):
    """
    :func:`host_cli` through ``daemon`` as another ``user``, in a real process of that user (the
    daemon learns who calls from the kernel, ``SO_PEERCRED``): a child forked from the tests
    drops root for the user's uid, gid and groups, then runs the CLI's code (already imported:
    the tests' virtual environment may not be readable by that user). Returns the
    CompletedProcess of the child (its exit status, its standard output and error).
    """
    account = pwd.getpwnam(user)
    argv = ['--socket', daemon.socket_path] + list(args)
    for name in CLI_LAZY_IMPORTS:
        importlib.import_module(name)
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        with warnings.catch_warnings():
            # Python 3.12+ warns when a process with threads forks: the child only runs the
            # CLI's code on objects of its own, then _exit()s.
            warnings.simplefilter('ignore', DeprecationWarning)
            child = os.fork()
        if child == 0:
            _run_cli_as(account, argv, stdout.fileno(), stderr.fileno())
        status = _wait_for_child(child, timeout)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess([HOST_CLI] + argv, status, stdout.read(), stderr.read())


def _run_cli_as(account, argv, stdout, stderr):
    """In the child of :func:`host_cli_as`: become ``account``, run the CLI, exit with its status (never returns)."""
    status = 70
    try:
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        sys.stdout, sys.stderr = os.fdopen(1, 'w'), os.fdopen(2, 'w')
        os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
        status = host_cli_module.run(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _wait_for_child(pid, timeout):
    """The exit status of the child ``pid`` (128+N for signal N); killed, and the test failed, after ``timeout``."""
    ended = []

    def reaped():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ended.append(status)
        return bool(ended)
    if not wait_until(reaped, timeout=timeout, interval=0.05):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail('the call as another user did not end within %s s' % timeout, pytrace=False)
    status = ended[0]
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


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


def start_host_daemon(guest, commands, policy=None, options=()):
    """
    ``negotiator-host --daemon GUEST`` serving only ``guest`` (other test sessions on this machine
    run guests and daemons of their own), with ``commands`` (``{name: script}``) in a commands
    directory, ``policy`` (the text of a policy file) if given, and the daemon ``options`` (e.g.
    ``['--allow-group', 'nogroup']``). The daemon gets a socket and an audit log of its own in
    its work directory, never the defaults under /run and /var/log, which another session's daemon
    may hold. Returns the process once the daemon serves the guest in both directions (its
    connection to the guest-to-host channel, and its link to the guest's agent, which the
    daemon's callers share); ``process.workdir``, ``process.log_path``, ``process.socket_path``
    and ``process.audit_path`` say where things are. Call the guest through it with
    ``host_cli(..., daemon=process)``; stop it with :func:`stop_host_daemon`.
    """
    workdir = tempfile.mkdtemp(prefix='negotiator-e2e-host-')
    os.chmod(workdir, 0o755)  # the daemon's callers that are not root reach its socket here
    directory = os.path.join(workdir, 'commands')
    os.mkdir(directory, 0o755)
    for name, text in commands.items():
        write_command(directory, name, text)
    socket_path = os.path.join(workdir, 'host.sock')
    audit_path = os.path.join(workdir, 'audit', 'audit.log')
    argv = [HOST_CLI, '--daemon', '--commands-dir', directory, '--socket', socket_path, '--audit-log', audit_path]
    if policy is not None:
        policy_path = os.path.join(workdir, 'policy.ini')
        with open(policy_path, 'w') as handle:
            handle.write(policy)
        argv += ['--policy', policy_path]
    argv += list(options) + [guest.name]
    process = _started_daemon(argv, os.path.join(workdir, 'daemon.log'))
    process.workdir, process.socket_path, process.audit_path = workdir, socket_path, audit_path
    return _serving(process, guest)


def restart_host_daemon(process, guest):
    """
    The daemon of :func:`start_host_daemon` started again as it was (same options, socket, audit
    log and work directory; its log goes on in the same file) once ``process`` has exited: the
    test stops it (SIGTERM) when and as it needs.
    """
    process.wait(30)
    restarted = _started_daemon(process.args, process.log_path)
    restarted.workdir, restarted.socket_path, restarted.audit_path = (
        process.workdir, process.socket_path, process.audit_path)
    return _serving(restarted, guest)


def _started_daemon(argv, log_path):
    """The daemon's process, logging to the end of ``log_path`` (``process.log_start``: where its lines begin)."""
    with open(log_path, 'ab') as log:
        start = log.tell()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    process.log_path, process.log_start = log_path, start
    return process


def _serving(process, guest):
    """``process`` once it serves ``guest`` (its log says so for both channels); the test fails if it does not."""
    wanted = ('Serving guest %s ' % guest.name, 'Linked to the agent of guest %s ' % guest.name)

    def serving():
        log = read_log(process, since_start=True)
        return all(line in log for line in wanted) or process.poll() is not None
    if not wait_until(serving, timeout=60, interval=0.1) or process.poll() is not None:
        stop_host_daemon(process)
        pytest.fail('the host daemon did not serve %s:\n%s' % (guest.name, read_log(process)), pytrace=False)
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


def read_log(process, since_start=False):
    """What a daemon of :func:`start_host_daemon` has logged so far (``since_start``: this process only, not
    the daemon that it restarted)."""
    with open(process.log_path, 'rb') as handle:
        if since_start:
            handle.seek(process.log_start)
        return handle.read().decode('utf-8', 'replace')


def local_connections(process):
    """
    How many local clients a daemon of :func:`start_host_daemon` holds connections with now, as
    the kernel says (``/proc/net/unix``: the connected sockets bound to its socket's path).
    """
    count = 0
    with open('/proc/net/unix') as handle:
        next(handle)  # the header
        for line in handle:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == process.socket_path and fields[5] == '03':  # 03: connected
                count += 1
    return count
