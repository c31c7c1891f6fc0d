"""
End to end, ``exec`` (issue 15) on a real libvirt/QEMU guest running ``negotiator-guest --daemon
--allow-exec``, and the same guest reached over a real ssh (a real ``sshd`` on this machine,
tests/sshd_support.py) with ``--hypervisor root@127.0.0.1``.

Why: only a real guest proves that the switch reaches the agent from its command line, that a
program runs there with its streamed input and its status, and that ssh carries the protocol
through ``negotiator-host --bridge``; only a real sshd proves the argv and the quoting that ssh
and the remote shell see. One guest and one sshd for the whole module; the last test switches
exec off in that guest (its agent restarts without the switch).
"""

import hashlib
import io
import os
import subprocess
import sys
import zipfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import VENV_BIN, vm_host  # noqa: E402,F401 (a fixture)
from e2e_support import HOST_CLI, remove_guests, start_agents  # noqa: E402
from sshd_support import Sshd  # noqa: E402
from support import result_or_error  # noqa: E402
from waiting import wait_until  # noqa: E402

from negotiator_common.errors import ChannelNotFound, CommandNotAllowed, CommandTimedOut  # noqa: E402
from negotiator_common.preload import Preload  # noqa: E402
from negotiator_host import GuestChannel  # noqa: E402

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


@pytest.fixture(scope='module')
def guest(vm_host):  # noqa: F811 (the fixture)
    guests = start_agents(vm_host, [{}], daemon_args=['--allow-exec'])
    yield guests[0]
    remove_guests(guests)


@pytest.fixture(scope='module')
def sshd():
    server = Sshd(VENV_BIN)
    yield server
    server.stop()


def cli(*args, input=b''):
    process = subprocess.run([HOST_CLI] + list(args), input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=120)
    return process.returncode, process.stdout, process.stderr


def test_exec_with_streamed_input(guest):
    data = os.urandom(2 * MIB + 3)
    with GuestChannel(guest.name, direct=True, timeout=120) as channel:
        assert 'exec' in channel.hello()['capabilities']
        result = channel.exec(['sha256sum'], input=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_a_python_program_runs_warm_in_the_guest_when_asked(guest):
    program = b"import sys\nprint('warm' if 'json' in sys.modules else 'cold', sys.stdin.read() == '')\nsys.exit(5)\n"
    with GuestChannel(guest.name, direct=True, timeout=120) as channel:
        assert 'warm-python' in channel.hello()['capabilities']
        cold = channel.exec(['/usr/bin/python3'], input=program)
        warm = [channel.exec(['/usr/bin/python3'], input=program, warm=True) for _ in range(2)]
        with pytest.raises(CommandTimedOut):
            channel.exec(['/usr/bin/python3'], input=b'import signal; signal.pause()', warm=True, timeout=5)
        after = channel.exec(['/usr/bin/python3'], input=program, warm=True)
    assert (cold.exit_status, cold.stdout) == (5, b'cold True\n')
    assert [(result.exit_status, result.stdout) for result in warm + [after]] == [(5, b'warm True\n')] * 3


def test_preloaded_libraries_are_imported_once_in_the_guest_before_the_programs_run(guest):
    written = io.BytesIO()
    with zipfile.ZipFile(written, 'w') as archive:
        archive.writestr('probe/__init__.py', '')
        archive.writestr('probe/lib.py', 'import os\nIMPORTED_IN = os.getpid()\n')
    preload = Preload(written.getvalue(), ['probe.lib'])
    program = b"import os, probe.lib\nprint(probe.lib.IMPORTED_IN != os.getpid(), probe.lib.IMPORTED_IN)\n"
    with GuestChannel(guest.name, direct=True, timeout=120) as channel:
        runs = [channel.exec(['/usr/bin/python3'], input=program, warm=True, preload=preload) for _ in range(3)]
        without = channel.exec(['/usr/bin/python3'], input=program, warm=True)
    assert [result.exit_status for result in runs] == [0] * 3
    assert len({result.stdout for result in runs}) == 1 and runs[0].stdout.startswith(b'True ')  # one zygote's import
    assert without.exit_status == 1 and b"No module named 'probe'" in without.stderr


def test_pipes_quotes_and_a_non_zero_exit_through_sh_c(guest):
    script = "printf '%s\\n' \"it's\" 'a \"b\" $HOME' | tr a-z A-Z; echo \"$1\" >&2; exit 7"
    status, out, err = cli('--direct', '--exec', guest.name, '--', '/bin/sh', '-c', script, 'sh', 'x y')
    assert (status, out, err) == (7, b'IT\'S\nA "B" $HOME\n', b'x y\n')
    status, out, _ = cli('--direct', '--stdin', '--exec', guest.name, '--', 'wc', '-c', input=b'12345')
    assert (status, out.strip()) == (0, b'5')


def test_the_guest_over_ssh_through_a_real_sshd(guest, sshd):
    with GuestChannel(guest.name, hypervisor='root@127.0.0.1', ssh=sshd.ssh, timeout=120) as channel:
        result = channel.exec(['/bin/sh', '-c', 'cat | rev; exit 3'], input=b'abc\n')
        assert (result.exit_status, result.stdout) == (3, b'cba\n')
    status, out, _ = cli('--hypervisor', 'root@127.0.0.1', '--ssh', 'ssh -F %s' % sshd.client_config,
                         '--exec', guest.name, '--', 'echo', "it's far")
    assert (status, out) == (0, b"it's far\n")
    with pytest.raises(ChannelNotFound) as caught:
        with GuestChannel('no-such-guest', hypervisor='root@127.0.0.1', ssh=sshd.ssh, timeout=60) as channel:
            channel.ping()
    assert 'on root@127.0.0.1' in caught.value.message and 'no-such-guest' in caught.value.message
    with pytest.raises(ChannelNotFound) as caught:
        with GuestChannel(guest.name, hypervisor='root@127.0.0.1', ssh=sshd.ssh + ['-p', '1'], timeout=60) as channel:
            channel.ping()
    assert 'could not reach root@127.0.0.1' in caught.value.message


def test_exec_switched_off_is_77(guest):
    """
    Last: the agent restarts without --allow-exec. supervisord (which would start it again with
    the switch) is frozen, the agent (the parent of the command) is stopped, and a plain agent
    takes the port as soon as the old one has released it.
    """
    agent = '%s/negotiator-guest --daemon --commands-dir /tmp/negotiator-commands' % VENV_BIN
    restart = ('touch /tmp/restarting; kill -STOP "$(cat /tmp/supervisord.pid)"; kill "$1";'
               ' until %s >>/tmp/negotiator-guest.log 2>&1; do sleep 0.2; done' % agent)
    # In a session of its own and without the run's marker (so that the runner leaves it alone
    # once the command ends, and the agent's stop does too), said by a file that the command waits for.
    launch = ('setsid env -u NEGOTIATOR_RUN /bin/sh -c "$0" restart "$PPID" </dev/null >/dev/null 2>&1 &'
              ' while [ ! -e /tmp/restarting ]; do sleep 0.1; done')
    with GuestChannel(guest.name, direct=True, timeout=60) as channel:
        result_or_error(channel.exec, ['/bin/sh', '-c', launch, restart])  # the agent may stop before it answers

    def switched_off():
        try:
            with GuestChannel(guest.name, direct=True, timeout=10) as channel:
                return 'exec' not in channel.hello()['capabilities']
        except Exception:
            return False

    assert wait_until(switched_off, timeout=120, interval=0.5)
    with GuestChannel(guest.name, direct=True, timeout=60) as channel:
        with pytest.raises(CommandNotAllowed) as caught:
            channel.exec(['true'])
    assert '--allow-exec' in caught.value.message
    status, _, err = cli('--direct', '--timeout', '60', '--exec', guest.name, '--', 'true')
    assert status == 77 and b'--allow-exec' in err
