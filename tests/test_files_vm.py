"""
End to end, files pushed to and pulled from a real libvirt/QEMU guest (issue 14:
``negotiator-host --copy``, ``GuestChannel.push``/``pull``, the guest daemon's ``--allow-files``).

Why: only a real guest proves that a large file crosses a virtio-serial port intact in bounded
memory, that an interrupted transfer leaves no partial file on either side, that a full disk in
the guest is reported with its path, that the guest owner's switch holds, and that a slow reader
on either side stops its own transfer only while pings on the same channel are answered.

One guest serves the whole module: its agent runs with ``--allow-files=/srv``, where the guest's
init mounted a scratch disk (``negotiator_vm.start_guest(scratch_mib=...)``: the guest's other
writable places are memory) with a tmpfs of 8 MiB on ``/srv/full`` to fill up; ``/tmp`` stays
outside the allowed prefixes. A second agent in the same guest, without ``--allow-files``, serves
a third channel: the switch off. Latencies are printed, never asserted: a ping must only answer
within its usual timeout.
"""

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import VENV_BIN, negotiator_vm, vm_host, wait_for_agent  # noqa: E402,F401 (a fixture)
from e2e_support import HOST_CLI, host_cli, remove_guests  # noqa: E402
from measuring import peak_rss, start_measured  # noqa: E402
from pinging import Pinger  # noqa: E402
from support import StalledFile  # noqa: E402
from waiting import wait_until  # noqa: E402

from negotiator_common.errors import CommandNotAllowed, FileError, NegotiatorError  # noqa: E402
from negotiator_common.exit_status import EXIT_CANNOT_CREATE, EXIT_IO, EXIT_REFUSED  # noqa: E402
from negotiator_host import GuestChannel  # noqa: E402

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
GIB = 1024 * MIB
SCRATCH = negotiator_vm.SCRATCH_DIR
FULL = negotiator_vm.FULL_DIR
NO_FILES_CHANNEL = 'negotiator-test-nofiles.0'
"""The channel of the guest's second agent, which runs without --allow-files."""

COMMANDS = {
    'sha': '#!/bin/sh\nsha256sum -- "$1" | cut -d" " -f1\n',
    # Each entry under a directory: path, type, mode, size (files), link target (links).
    'tree': '#!/bin/sh\ncd -- "$1" && find . -printf "%p %y %m %s %l\\n" | sort\n',
    'entries': '#!/bin/sh\nls -A -- "$1"\n',
    'mkdir': '#!/bin/sh\nmkdir -p -- "$@"\n',
    'rm': '#!/bin/sh\nrm -rf -- "$@"\n',
    'zeros': '#!/bin/sh\nhead -c "$(($2 * 1048576))" /dev/zero > "$1"\n',
    'df': '#!/bin/sh\ndf -k -T -- "$@"\n',
    # The pid of the agent that allows files (the pattern's brackets keep pgrep from matching this shell).
    'agent-pid': '#!/bin/sh\npgrep -f "[-]-allow-files"\n',
    # Kills the agent that allows files (supervisord starts it again) a second after the reply, from a
    # process that has left the command's group and its marker (else the agent ends it with the
    # command) before the command ends (it says so through a FIFO); the pattern's brackets keep
    # pkill from matching that process's own shell.
    'kill-agent': '\n'.join([
        '#!/bin/sh', 'fifo=/tmp/kill-agent.$$', 'mkfifo "$fifo"',
        'setsid env -u NEGOTIATOR_RUN sh -c \'echo ready > "$1"; sleep 1; pkill -KILL -f "[-]-allow-files"\' '
        'sh "$fifo" </dev/null >/dev/null 2>&1 &',
        'read ready < "$fifo"', 'rm -f "$fifo"', 'echo killing', '']),
}

NO_FILES_AGENT = '''
for name in /sys/class/virtio-ports/*/name; do
    if [ "$(cat "$name")" = {channel} ]; then
        port=/dev/${{name%/name}}; port=/dev/${{port##*/}}
    fi
done
{agent} --daemon --character-device "$port" > /tmp/no-files-agent.log 2>&1 &
'''.format(channel=NO_FILES_CHANNEL, agent=os.path.join(VENV_BIN, 'negotiator-guest'))
"""The start of the guest's init script: the second agent, without --allow-files, on its own port."""


@pytest.fixture(scope='module')
def guest(vm_host):  # noqa: F811 (the fixture)
    init_script, files = negotiator_vm.agent_guest_files(VENV_BIN, COMMANDS, daemon_args=['--allow-files=' + SCRATCH])
    started = negotiator_vm.start_guest(
        NO_FILES_AGENT + init_script, files=files, image=vm_host, scratch_mib=3 * 1024, full_size='8m',
        channels=negotiator_vm.DEFAULT_CHANNELS + (NO_FILES_CHANNEL,))
    try:
        # Two agents start at once in the guest (Python over 9p, under TCG): on a busy host that takes a while.
        started.wait_for_console(negotiator_vm.AGENT_READY, timeout=180)
        wait_for_agent(started, timeout=240)
    except BaseException:
        remove_guests([started])
        raise
    yield started
    remove_guests([started])


def run(guest, *argv):
    """A command of COMMANDS in the guest (through the CLI, a connection of its own); its standard output."""
    result = host_cli('--timeout', '300', '--execute', ' '.join(argv), guest.name, timeout=330)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def run_on(channel, *argv):
    """:func:`run` on an open channel (the channel's socket takes one client at a time: the CLI would wait)."""
    return channel.execute(*argv, timeout=300, check=True).stdout.decode()


def entries(guest, directory):
    return run(guest, 'entries', directory).split()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(MIB), b''):
            digest.update(block)
    return digest.hexdigest()


def copy_measured(tmp_path, *args):
    """``negotiator-host --copy ARGS...``: (exit status, standard error, peak RSS in MiB, seconds)."""
    report = tmp_path / 'peak'
    started = time.monotonic()
    process = start_measured([HOST_CLI, '--timeout', '900', '--copy'] + list(args), report,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=960)
    return process.returncode, err.decode(errors='replace'), peak_rss(report) / MIB, time.monotonic() - started


def test_the_guest_has_a_scratch_disk_and_a_small_tmpfs(guest):
    lines = {line.split()[-1]: line.split() for line in run(guest, 'df', SCRATCH, FULL).splitlines()[1:]}
    assert lines[SCRATCH][1] == 'ext4' and int(lines[SCRATCH][4]) > 2 * GIB // 1024
    assert lines[FULL][1] == 'tmpfs' and int(lines[FULL][2]) == 8 * 1024


@pytest.fixture(scope='module')
def big_file(tmp_path_factory):
    """One GiB of random bytes on the host, and its SHA-256."""
    path = str(tmp_path_factory.mktemp('big') / 'big.bin')
    digest = hashlib.sha256()
    with open(path, 'wb') as handle:
        for _ in range(1024):
            block = os.urandom(MIB)
            digest.update(block)
            handle.write(block)
    yield path, digest.hexdigest()
    os.unlink(path)


@pytest.fixture(scope='module')
def gib_in_guest(guest, big_file, tmp_path_factory):
    """The GiB pushed into the guest's scratch disk by the CLI: its path there and how the push went."""
    path, _ = big_file
    target = SCRATCH + '/big.bin'
    status, err, rss, seconds = copy_measured(tmp_path_factory.mktemp('push'), path, '%s:%s' % (guest.name, target))
    print('1 GiB pushed in %.1f s (%.0f MiB/s), CLI peak RSS %.1f MiB' % (seconds, 1024 / seconds, rss))
    return {'path': target, 'status': status, 'stderr': err, 'rss': rss}


def test_one_gib_pushed_with_the_cli_arrives_intact_in_bounded_memory(guest, big_file, gib_in_guest):
    assert gib_in_guest['status'] == 0, gib_in_guest['stderr']
    assert gib_in_guest['rss'] < 64
    assert run(guest, 'sha', gib_in_guest['path']).strip() == big_file[1]


def test_one_gib_pulled_with_the_cli_arrives_intact_in_bounded_memory(guest, big_file, gib_in_guest, tmp_path):
    back = str(tmp_path / 'back.bin')
    status, err, rss, seconds = copy_measured(tmp_path, '%s:%s' % (guest.name, gib_in_guest['path']), back)
    assert status == 0, err
    print('1 GiB pulled in %.1f s (%.0f MiB/s), CLI peak RSS %.1f MiB' % (seconds, 1024 / seconds, rss))
    assert rss < 64
    assert sha256_of(back) == big_file[1]
    os.unlink(back)


def test_a_pull_beyond_max_size_stops_with_74_and_keeps_nothing(guest, gib_in_guest, tmp_path):
    # A guest that sends without end cannot fill the host's disk: the bound stops the GiB early.
    capped = tmp_path / 'capped'
    status, err, _, seconds = copy_measured(tmp_path, '--max-size', '16M', '%s:%s' % (guest.name, gib_in_guest['path']),
                                            str(capped))
    assert status == EXIT_IO and 'more than the 16777216 bytes allowed' in err, err
    assert sorted(os.listdir(str(tmp_path))) == ['peak']  # no file, no temporary file
    print('a pull capped at 16 MiB stopped in %.1f s' % seconds)
    assert host_cli('--ping', guest.name).returncode == 0  # the agent stopped sending: the channel serves on


def test_binary_and_empty_files_go_both_ways_byte_for_byte(guest, tmp_path):
    every_byte = bytes(range(256)) * 4096 + b'\r\n\x00\n\x1b\n'
    empty = tmp_path / 'empty'
    empty.write_bytes(b'')
    with GuestChannel(guest.name, timeout=120) as channel:
        channel.push(io.BytesIO(every_byte), SCRATCH + '/binary.bin')
        channel.push(str(empty), SCRATCH + '/empty')
        assert run_on(channel, 'sha', SCRATCH + '/binary.bin').strip() == hashlib.sha256(every_byte).hexdigest()
        assert run_on(channel, 'tree', SCRATCH).count('./empty f 644 0 \n') == 1
        pulled = io.BytesIO()
        channel.pull(SCRATCH + '/binary.bin', pulled)
        channel.pull(SCRATCH + '/empty', str(tmp_path / 'empty-back'))
    assert pulled.getvalue() == every_byte
    assert (tmp_path / 'empty-back').read_bytes() == b''
    status, err, _, _ = copy_measured(tmp_path, str(empty), '%s:%s/empty-by-cli' % (guest.name, SCRATCH))
    assert status == 0, err
    run(guest, 'rm', SCRATCH + '/binary.bin', SCRATCH + '/empty', SCRATCH + '/empty-by-cli')


def make_tree(root):
    """A small tree with modes of its own, an empty directory and a relative link inside it."""
    os.makedirs(os.path.join(root, 'conf'))
    os.makedirs(os.path.join(root, 'bin'))
    os.makedirs(os.path.join(root, 'private', 'empty'))
    with open(os.path.join(root, 'conf', 'app.conf'), 'w') as handle:
        handle.write('answer = 42\n')
    with open(os.path.join(root, 'bin', 'run'), 'w') as handle:
        handle.write('#!/bin/sh\necho run\n')
    os.chmod(os.path.join(root, 'bin', 'run'), 0o755)
    os.chmod(os.path.join(root, 'conf', 'app.conf'), 0o640)
    os.chmod(os.path.join(root, 'conf'), 0o750)
    os.chmod(os.path.join(root, 'private'), 0o700)
    os.symlink('../conf/app.conf', os.path.join(root, 'bin', 'app.conf'))


def describe_tree(root):
    """The entries of the host's tree as the guest's ``tree`` command prints them."""
    lines = []
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            kind = 'l' if os.path.islink(path) else 'd' if os.path.isdir(path) else 'f'
            target = os.readlink(path) if kind == 'l' else ''
            lines.append('./%s %s %o %d %s' % (os.path.relpath(path, root), kind, info.st_mode & 0o7777,
                                               info.st_size, target))
    return sorted(lines)


def guest_tree(guest, root):
    """The guest's ``tree`` of ``root`` without its first line ('.') and directory sizes (file systems differ)."""
    lines = []
    for line in run(guest, 'tree', root).splitlines():
        path, kind, mode, size, target = (line.split(' ', 4) + [''])[:5]
        if path != '.':
            lines.append('%s %s %s %s %s' % (path, kind, mode, '-' if kind == 'd' else size, target.strip()))
    return sorted(lines)


def comparable(lines):
    return sorted('%s %s %s %s %s' % (path, kind, mode, '-' if kind == 'd' else size, target.strip())
                  for path, kind, mode, size, target in ((line.split(' ', 4) + [''])[:5] for line in lines))


def test_a_directory_tree_keeps_its_modes_and_its_links_both_ways(guest, tmp_path):
    source = str(tmp_path / 'tree')
    make_tree(source)
    status, err, _, _ = copy_measured(tmp_path, '-r', source, '%s:%s/tree' % (guest.name, SCRATCH))
    assert status == 0, err
    assert guest_tree(guest, SCRATCH + '/tree') == comparable(describe_tree(source))
    back = str(tmp_path / 'back')
    status, err, _, _ = copy_measured(tmp_path, '-r', '%s:%s/tree' % (guest.name, SCRATCH), back)
    assert status == 0, err
    assert describe_tree(back) == describe_tree(source)
    assert os.readlink(os.path.join(back, 'bin', 'app.conf')) == '../conf/app.conf'
    run(guest, 'rm', SCRATCH + '/tree')


def test_a_tree_with_a_link_out_of_it_is_refused_and_leaves_nothing(guest, tmp_path):
    source = str(tmp_path / 'tree')
    make_tree(source)
    os.symlink('/etc/passwd', os.path.join(source, 'passwd'))
    status, err, _, _ = copy_measured(tmp_path, '-r', source, '%s:%s/linked-out' % (guest.name, SCRATCH))
    assert status == EXIT_CANNOT_CREATE and 'passwd' in err, err
    assert not any(entry.startswith(('linked-out', '.linked-out')) for entry in entries(guest, SCRATCH))


class BlockingSource(object):
    """A binary source that gives ``size`` bytes, then blocks in ``read`` until :attr:`go` is set, then ends."""

    def __init__(self, size):
        self.left = size
        self.spent = threading.Event()
        self.go = threading.Event()

    def read(self, amount=-1):
        if self.left > 0:
            piece = min(self.left, MIB if amount is None or amount < 0 else amount)
            self.left -= piece
            return b'\xa5' * piece
        self.spent.set()
        self.go.wait(120)
        return b''


def test_a_push_whose_cli_is_killed_midway_leaves_no_file_and_the_channel_serves_on(guest):
    directory = SCRATCH + '/killed-push'
    run(guest, 'mkdir', directory)
    process = subprocess.Popen([HOST_CLI, '--timeout', '300', '--copy', '-', '%s:%s/file' % (guest.name, directory)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Once 16 MiB have gone into the pipe, the CLI has read (and sent) all but the pipe's last 64 KiB.
    process.stdin.write(b'\x5a' * (16 * MIB))
    process.stdin.flush()
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    # The agent drops the transfer when the connection goes; nothing stays behind.
    assert wait_until(lambda: entries(guest, directory) == [], timeout=60), entries(guest, directory)
    assert host_cli('--ping', guest.name).returncode == 0


def bytes_read(pid):
    """How many bytes process ``pid`` has read so far (``rchar`` of /proc/PID/io: from its socket too)."""
    with open('/proc/%d/io' % pid) as handle:
        return int(next(line for line in handle if line.startswith('rchar:')).split()[1])


def test_a_pull_whose_cli_is_killed_midway_leaves_no_file_and_the_channel_serves_on(guest, gib_in_guest, tmp_path):
    directory = tmp_path / 'killed-pull'
    directory.mkdir()
    process = subprocess.Popen([HOST_CLI, '--timeout', '300', '--copy', '%s:%s' % (guest.name, gib_in_guest['path']),
                                str(directory / 'file')], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    arrived = wait_until(lambda: process.poll() is not None or bytes_read(process.pid) > 64 * MIB, timeout=120,
                         interval=0.02)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=30)
    assert arrived and process.returncode == -signal.SIGKILL, err
    assert list(directory.iterdir()) == []
    assert host_cli('--ping', guest.name).returncode == 0


def kill_the_agent(channel):
    """
    Kill the guest's agent that allows files (it answers first), and return its pid once it no
    longer answers on ``channel`` (or another agent does: supervisord starts one at once); the
    calls that the killed agent had taken never end: the caller closes the channel.
    """
    killed = channel.execute('agent-pid').stdout.strip()
    assert channel.execute('kill-agent').stdout.strip() == b'killing'

    def gone():
        try:
            return channel.execute('agent-pid', timeout=10).stdout.strip() not in (b'', killed)
        except NegotiatorError:
            return True
    assert wait_until(gone, timeout=120, interval=0.5), 'the agent still runs'
    return killed


def restarted(guest, killed):
    """Once the agent answers a new connection: whether it is another than the one killed."""
    wait_for_agent(guest, timeout=240)
    return run(guest, 'agent-pid').strip() not in ('', killed.decode())


def failed_call(call):
    """Run ``call`` in a thread; return (thread, outcome) where outcome['error'] is what it raised."""
    outcome = {}

    def target():
        try:
            outcome['result'] = call()
        except NegotiatorError as error:
            outcome['error'] = error
    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_push_whose_agent_is_killed_midway_leaves_no_file(guest):
    directory = SCRATCH + '/agent-killed-push'
    run(guest, 'mkdir', directory)
    source = BlockingSource(8 * MIB)
    channel = GuestChannel(guest.name, timeout=300).connect()
    try:
        thread, outcome = failed_call(lambda: channel.push(source, directory + '/file'))
        assert source.spent.wait(60)
        killed = kill_the_agent(channel)
    finally:
        channel.close()
        source.go.set()
    thread.join(60)
    assert isinstance(outcome.get('error'), NegotiatorError), outcome
    assert restarted(guest, killed)
    assert entries(guest, directory) == []


def test_a_pull_whose_agent_is_killed_midway_fails_and_leaves_no_file(guest, gib_in_guest, tmp_path):
    directory = tmp_path / 'pulled'
    directory.mkdir()
    target = str(directory / 'file')
    channel = GuestChannel(guest.name, timeout=300).connect()
    try:
        # The GiB takes many seconds to cross: the agent dies on the way, once 64 MiB have come.
        before = bytes_read(os.getpid())
        thread, outcome = failed_call(lambda: channel.pull(gib_in_guest['path'], target))
        assert wait_until(lambda: bytes_read(os.getpid()) > before + 64 * MIB, timeout=120, interval=0.02)
        killed = kill_the_agent(channel)
    finally:
        channel.close()
    thread.join(60)
    assert isinstance(outcome.get('error'), NegotiatorError), outcome
    assert list(directory.iterdir()) == []
    assert restarted(guest, killed)
    # A pull into a path that fails at once leaves nothing there either.
    with GuestChannel(guest.name, timeout=120) as channel:
        with pytest.raises(FileError):
            channel.pull(SCRATCH + '/no-such-file', target)
    assert list(directory.iterdir()) == []


def test_a_full_disk_in_the_guest_is_an_error_that_names_the_path(guest, tmp_path):
    source = tmp_path / 'sixteen'
    source.write_bytes(b'\x01' * (16 * MIB))
    target = FULL + '/too-big.bin'
    status, err, _, _ = copy_measured(tmp_path, str(source), '%s:%s' % (guest.name, target))
    assert status == EXIT_IO, err
    assert target in err and ('No space left' in err or 'ENOSPC' in err), err
    assert entries(guest, FULL) == []
    with GuestChannel(guest.name, timeout=120) as channel:
        with pytest.raises(FileError) as raised:
            channel.push(str(source), target)
        assert raised.value.reason == 'ENOSPC' and raised.value.data.get('path') == target
        assert run_on(channel, 'entries', FULL).split() == []
        channel.push(io.BytesIO(b'fits\n'), FULL + '/small.txt')
    assert entries(guest, FULL) == ['small.txt']
    run(guest, 'rm', FULL + '/small.txt')


def test_paths_outside_the_allowed_prefixes_are_refused_with_77(guest, tmp_path):
    source = tmp_path / 'outside'
    source.write_bytes(b'outside\n')
    pushed = host_cli('--copy', str(source), '%s:/tmp/outside' % guest.name)
    assert pushed.returncode == EXIT_REFUSED and b'--allow-files' in pushed.stderr, pushed.stderr
    pulled = host_cli('--copy', '%s:/etc/hostname' % guest.name, str(tmp_path / 'hostname'))
    assert pulled.returncode == EXIT_REFUSED and b'--allow-files' in pulled.stderr, pulled.stderr
    assert not (tmp_path / 'hostname').exists()


def test_an_agent_without_allow_files_refuses_pushes_and_pulls(guest, tmp_path):
    socket_path = guest.channel_path(NO_FILES_CHANNEL)
    with GuestChannel(socket_path=socket_path, timeout=30) as channel:
        assert 'files' not in channel.hello()['capabilities']
        with pytest.raises(CommandNotAllowed) as refused:
            channel.push(io.BytesIO(b'no\n'), SCRATCH + '/refused')
        assert '--allow-files' in str(refused.value)
        with pytest.raises(CommandNotAllowed):
            channel.pull('/etc/hostname', str(tmp_path / 'hostname'))
    with GuestChannel(guest.name, timeout=30) as channel:
        assert 'files' in channel.hello()['capabilities']
    assert 'refused' not in entries(guest, SCRATCH)
    assert not (tmp_path / 'hostname').exists()


def test_pings_answer_while_the_host_reads_a_pull_slowly(guest):
    run(guest, 'zeros', SCRATCH + '/slow-pull.bin', '64')
    stalled = StalledFile()
    outcome = {}
    with GuestChannel(guest.name, timeout=300) as channel:
        call = threading.Thread(target=lambda: outcome.update(done=channel.pull(SCRATCH + '/slow-pull.bin', stalled)))
        call.start()
        with Pinger(channel) as pinger:
            # The pull fills its window and waits for credit, while pings go on.
            assert wait_until(lambda: len(pinger.times) >= 100 or pinger.error, timeout=120)
            stalled.go.set()
            call.join(300)
        assert pinger.error is None, pinger.error
        pinger.report('while the host read a 64 MiB pull slowly')
    assert 'done' in outcome and stalled.size == 64 * MIB
    run(guest, 'rm', SCRATCH + '/slow-pull.bin')


def throttle_scratch_disk(guest, bytes_per_second):
    """Bound the guest's writes to its scratch disk (QEMU's throttling; 0: no bound)."""
    subprocess.run(['virsh', '-q', '-c', guest.uri, 'blkdeviotune', guest.name, 'vda',
                    '--write-bytes-sec', str(bytes_per_second), '--live'], check=True, timeout=60)


def test_pings_answer_while_the_guest_writes_a_push_slowly(guest):
    data = os.urandom(MIB) * 128
    throttle_scratch_disk(guest, 16 * MIB)
    try:
        with GuestChannel(guest.name, timeout=300) as channel:
            with Pinger(channel) as pinger:
                channel.push(io.BytesIO(data), SCRATCH + '/slow-push.bin')
            assert pinger.error is None, pinger.error
            pinger.report('while the guest wrote a 128 MiB push to a disk of 16 MiB/s')
            assert len(pinger.times) > 10
    finally:
        throttle_scratch_disk(guest, 0)
    assert run(guest, 'sha', SCRATCH + '/slow-push.bin').strip() == hashlib.sha256(data).hexdigest()
    run(guest, 'rm', SCRATCH + '/slow-push.bin')
