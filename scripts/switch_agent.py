"""
An agent guest whose agent can be restarted as another program: another Python, the single file
or the installed package. Used by tests/test_e2e_zipapp.py and scripts/benchmark (its "single
file" figures); :func:`find_python` finds the other Pythons for them and for the archive's tests.

Why: a guest costs seconds to boot under TCG, so one guest serves several variants of the agent
in turn. Its supervisord (``negotiator_vm.agent_guest_files``) starts ``BINDIR/negotiator-guest
--daemon ...``, and :func:`write_wrapper` makes that a wrapper which runs the program named in
the guest's ``/tmp/agent-argv`` (a shell-quoted argv prefix), else a default. The guest command
``restart-agent ARGV`` writes the file and stops the agent with SIGTERM while it runs, so the
agent stops it, replies (the command ends by signal 15) and exits with status 0; supervisord
starts it again, now as the new program. The agent is every command's parent, so
``agent-process`` reads its pid and argv from ``/proc/$PPID``.

Host side (:func:`agent_process`, :func:`restart_agent`) uses ``negotiator_host``'s Python API;
the wrapper and the commands are plain shell, run in the guest.
"""

import os
import shlex
import subprocess
import time

__all__ = ('COMMANDS', 'AGENT_ARGV_FILE', 'agent_process', 'find_python', 'restart_agent', 'write_wrapper')

AGENT_ARGV_FILE = '/tmp/agent-argv'
"""In the guest (its own tmpfs): the argv prefix that the wrapper runs, as shell words."""

COMMANDS = {
    # The agent's pid, then its argv (NUL-separated): the agent is the parent of its commands.
    'agent-process': '#!/bin/sh\necho $PPID\ncat /proc/$PPID/cmdline\n',
    # Name the next program, then stop the agent while this command runs (see the module's text).
    'restart-agent': '#!/bin/sh\nprintf "%%s" "$1" > %s\nkill -TERM $PPID\nexec sleep 30\n' % AGENT_ARGV_FILE,
}
"""Guest commands (name: script) that the guest must offer for :func:`agent_process` and :func:`restart_agent`."""


def find_python(version):
    """
    The real path of CPython ``version`` (``'3.6'``): the first ``pythonVERSION`` on PATH that
    runs and says it is that version (a pyenv shim of a version that pyenv does not select
    fails, and the search goes on; ``scripts/test`` puts every pyenv interpreter on PATH), or
    None. The real path, not a shim: a guest runs it from the shared root, where no shim would
    know which version to choose.
    """
    for folder in os.environ.get('PATH', os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or os.curdir, 'python' + version)
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        result = subprocess.run([candidate, '-c', 'import os, sys; print(os.path.realpath(sys.executable));'
                                 ' print("%d.%d" % sys.version_info[:2])'],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        if result.returncode == 0 and result.stdout.split()[1:] == [version]:
            return result.stdout.split()[0]
    return None


def write_wrapper(bindir, default_argv):
    """Write ``BINDIR/negotiator-guest``: runs the program of ``/tmp/agent-argv`` (else ``default_argv``)."""
    path = os.path.join(bindir, 'negotiator-guest')
    with open(path, 'w') as handle:
        handle.write('#!/bin/sh\n'
                     '# The program that %s names (shell words), else the default; then our arguments.\n'
                     'if [ -r %s ]; then eval "set -- $(cat %s) \\"\\$@\\""; else set -- %s "$@"; fi\n'
                     'exec "$@"\n' % (AGENT_ARGV_FILE, AGENT_ARGV_FILE, AGENT_ARGV_FILE,
                                      ' '.join(shlex.quote(arg) for arg in default_argv)))
    os.chmod(path, 0o755)
    return path


def _channel(guest, timeout):
    from negotiator_common.channels import HOST_TO_GUEST_CHANNEL
    from negotiator_host import GuestChannel
    return GuestChannel(socket_path=guest.channel_path(HOST_TO_GUEST_CHANNEL), timeout=timeout)


def agent_process(guest, timeout=60):
    """``(pid, argv)`` of the agent running in ``guest`` (a ``negotiator_vm.Guest``)."""
    with _channel(guest, timeout) as channel:
        result = channel.execute('agent-process', check=True)
    pid, cmdline = result.stdout.split(b'\n', 1)
    return int(pid), [arg.decode('utf-8', 'replace') for arg in cmdline.split(b'\0')[:-1]]


def restart_agent(guest, argv, timeout=180):
    """
    Restart the agent of ``guest`` as ``argv`` (a list: the program, then its first arguments)
    and wait until it answers. Returns ``(result, before, after)``: the ExecuteResult of the
    ``restart-agent`` call, and :func:`agent_process` before and after. Raises RuntimeError
    when no new agent answers within ``timeout`` seconds.
    """
    from negotiator_common.errors import NegotiatorError
    before = agent_process(guest)
    with _channel(guest, 60) as channel:
        result = channel.execute('restart-agent', ' '.join(shlex.quote(arg) for arg in argv))
    deadline = time.monotonic() + timeout
    while True:
        try:
            after = agent_process(guest, timeout=10)
            if after[0] != before[0]:
                return result, before, after
        except (NegotiatorError, OSError):
            pass  # stopping, or starting (Python over 9p under TCG takes seconds)
        if time.monotonic() >= deadline:
            raise RuntimeError('no new agent answered in %s within %d s; console:\n%s'
                               % (guest.name, timeout, guest.console_tail(40)))
        time.sleep(0.5)
