"""
Commands whose processes try to outlive them: pipes closed early, ``setsid`` children that hold
the output, cancellation, several commands at once, and the reaping of adopted orphans.

The test process adopts orphans for the length of each test (``adopting``), as the daemons do
for their whole life, so that a process that left its command's group stays findable.
"""

import os
import signal
import subprocess
import threading

import pytest

from negotiator_common import processes
from negotiator_common.runner import run_process

from support import result_or_error, write_command
from waiting import process_alive, process_reaped, read_pid, wait_until

# Each script waits on a FIFO until its child has left the process group (else the child could
# still be in the group when the command ends, and die with it).

# A child in a session of its own that ignores SIGTERM and holds stdout; the command itself sleeps.
ESCAPER = r'''#!/bin/sh
mkfifo "$1/left"
setsid sh -c 'trap "" TERM; echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" &
read left < "$1/left"
echo $$ > "$1/leader"
exec sleep 60
'''

# Exits once its child, in a session of its own, holds stdout.
LEAVER = r'''#!/bin/sh
mkfifo "$1/left"
setsid sh -c 'echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" &
read left < "$1/left"
echo done
'''

# A daemon's double fork: the middle process exits, so the child is an orphan before any timeout.
DOUBLE_FORKER = r'''#!/bin/sh
mkfifo "$1/left"
( setsid sh -c 'trap "" TERM; echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" & )
read left < "$1/left"
exec sleep 60
'''

# Leaves the group without the run's marker in its environment: out of the marker's reach.
HIDER = r'''#!/bin/sh
mkfifo "$1/left"
setsid env -u NEGOTIATOR_RUN sh -c 'echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" &
read left < "$1/left"
exec sleep 60
'''

# The same, but the child lets go of the output first.
QUIET_LEAVER = r'''#!/bin/sh
mkfifo "$1/left"
setsid sh -c 'echo $$ > "$1/escaped"; echo > "$1/left"; exec sleep 60' sh "$1" > /dev/null 2>&1 &
read left < "$1/left"
echo done
'''


def run_bounded(seconds, *args, **kwargs):
    """run_process on a thread: its result, or a failure if it has not returned within ``seconds``."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(result_or_error(run_process, *args, **kwargs)))
    thread.daemon = True
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), 'run_process did not return within %s s' % seconds
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


@pytest.fixture
def adopting():
    assert processes.adopt_orphans()
    yield
    processes.reap_orphans()
    processes.adopt_orphans(False)


@pytest.fixture
def piddir(tmp_path, adopting):
    """A directory for the pid files of the tests' processes; whatever is left of them is killed after."""
    directory = tmp_path / 'pids'
    directory.mkdir()
    yield directory
    for root, _, names in os.walk(str(directory)):
        for path in [os.path.join(root, name) for name in names]:
            if not os.path.isfile(path):
                continue  # a FIFO
            try:
                with open(path) as handle:
                    os.kill(int(handle.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone already


def test_a_command_that_closes_its_pipes_still_times_out(tmp_path, piddir):
    # The everyday logging idiom: once both pipes are closed, only the deadline can end the call.
    script = write_command(tmp_path, 'quiet', '#!/bin/sh\necho $$ > "$1/leader"\nexec >/dev/null 2>&1\nexec sleep 30\n')
    result = run_bounded(10, [script, str(piddir)], timeout=1.0, kill_grace=0.5)
    assert result.timed_out and result.signal == signal.SIGTERM
    assert not result.output_abandoned
    assert process_reaped(read_pid(piddir / 'leader'))


def test_a_setsid_child_holding_stdout_is_killed_at_the_timeout(tmp_path, piddir):
    script = write_command(tmp_path, 'escaper', ESCAPER)
    result = run_bounded(10, [script, str(piddir)], timeout=1.0, kill_grace=0.5)
    assert result.timed_out
    # Killed with the command (it ignored SIGTERM), and reaped: not even a zombie is left.
    assert process_reaped(read_pid(piddir / 'escaped'))
    assert process_reaped(read_pid(piddir / 'leader'))
    assert not result.output_abandoned  # every process that held the pipe was found and killed


def test_a_double_forked_orphan_is_adopted_and_killed_at_the_timeout(tmp_path, piddir):
    script = write_command(tmp_path, 'double-forker', DOUBLE_FORKER)
    result = run_bounded(10, [script, str(piddir)], timeout=1.0, kill_grace=0.5)
    assert result.timed_out and not result.output_abandoned
    assert process_reaped(read_pid(piddir / 'escaped'))


def test_a_process_out_of_reach_does_not_hold_the_reply(tmp_path, piddir):
    # The documented limit: a process that leaves the group and drops the marker survives, but
    # the reply comes after the kill grace all the same, and says that output was abandoned.
    script = write_command(tmp_path, 'hider', HIDER)
    result = run_bounded(10, [script, str(piddir)], timeout=1.0, kill_grace=0.5)
    assert result.timed_out and result.output_abandoned
    assert process_alive(read_pid(piddir / 'escaped'))


def test_cancellation_kills_a_setsid_child_too(tmp_path, piddir):
    script = write_command(tmp_path, 'escaper', ESCAPER)
    cancelled = threading.Event()
    watcher = threading.Thread(target=lambda: read_pid(piddir / 'escaped') and cancelled.set())
    watcher.start()
    result = run_bounded(10, [script, str(piddir)], cancelled=cancelled, kill_grace=0.5)
    watcher.join()
    assert result.cancelled and not result.timed_out
    assert process_reaped(read_pid(piddir / 'escaped'))


def test_a_normal_exit_is_answered_within_the_grace_while_a_setsid_child_holds_stdout(tmp_path, piddir):
    script = write_command(tmp_path, 'leaver', LEAVER)
    chunks = []
    result = run_bounded(10, [script, str(piddir)], timeout=30, kill_grace=0.5,
                         on_output=lambda stream, chunk: chunks.append(chunk))
    assert result.exit_status == 0 and not result.timed_out
    assert b''.join(chunks) == b'done\n'
    assert result.output_abandoned  # the reply says why the output may be incomplete
    # It left the group on purpose: it is left alone, and reaped once it ends.
    escaped = read_pid(piddir / 'escaped')
    assert process_alive(escaped)
    os.kill(escaped, signal.SIGKILL)
    assert wait_until(lambda: processes.reap_orphans() is not None and process_reaped(escaped))


def test_a_background_process_that_let_go_of_the_output_outlives_a_normal_exit(tmp_path, piddir):
    script = write_command(tmp_path, 'quiet-leaver', QUIET_LEAVER)
    result = run_bounded(10, [script, str(piddir)], timeout=30, kill_grace=0.5)
    assert result.exit_status == 0 and not result.output_abandoned
    escaped = read_pid(piddir / 'escaped')
    assert process_alive(escaped)
    os.kill(escaped, signal.SIGKILL)
    assert wait_until(lambda: processes.reap_orphans() is not None and process_reaped(escaped))


def test_killing_one_command_leaves_another_commands_processes_alone(tmp_path, piddir):
    script = write_command(tmp_path, 'escaper', ESCAPER)
    (piddir / 'a').mkdir()
    (piddir / 'b').mkdir()
    cancel_b = threading.Event()
    results = {}
    b = threading.Thread(target=lambda: results.update(b=run_process([script, str(piddir / 'b')],
                                                                       cancelled=cancel_b, kill_grace=0.5)))
    b.start()
    try:
        other = read_pid(piddir / 'b' / 'escaped')
        result = run_bounded(10, [script, str(piddir / 'a')], timeout=1.0, kill_grace=0.5)
        assert result.timed_out and process_reaped(read_pid(piddir / 'a' / 'escaped'))
        assert process_alive(other) and process_alive(read_pid(piddir / 'b' / 'leader'))
    finally:
        cancel_b.set()
        b.join(10)
    assert results['b'].cancelled and process_reaped(other)


def test_the_reaper_never_takes_the_exit_status_of_a_running_command(tmp_path, adopting):
    # Sweeping for orphans all the time while commands start and exit: each command's status
    # still reaches the runner (a stolen one would read as 0).
    script = write_command(tmp_path, 'three', '#!/bin/sh\nexit 3\n')
    stop = threading.Event()

    def sweep():
        while not stop.is_set():
            processes.reap_orphans()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    statuses = []

    def run_some():
        for _ in range(15):
            statuses.append(run_process([script]).exit_status)

    workers = [threading.Thread(target=run_some) for _ in range(3)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    finally:
        stop.set()
        sweeper.join(10)
    assert statuses == [3] * 45


def test_the_orphan_reaper_sweeps_only_when_due_and_only_if_a_child_exited(monkeypatch):
    swept = []
    monkeypatch.setattr(processes, 'reap_orphans', lambda: swept.append(True) or 1)
    reaper = processes.OrphanReaper(delay=0.0)
    assert reaper.sweep_if_due() == 0 and not swept  # no SIGCHLD: nothing to do
    monkeypatch.setattr(processes, '_has_zombie_child', lambda: False)
    reaper.child_exited()
    assert reaper.sweep_if_due() == 0 and not swept and reaper.due is None  # the runner took it already
    monkeypatch.setattr(processes, '_has_zombie_child', lambda: True)
    reaper.child_exited()
    assert reaper.sweep_if_due() == 1 and swept == [True]


def test_a_sweep_waits_while_a_command_is_starting(monkeypatch):
    monkeypatch.setattr(processes, '_has_zombie_child', lambda: True)
    monkeypatch.setattr(processes, '_adopting', True)
    reaper = processes.OrphanReaper(delay=0.0)
    with processes.COMMANDS.starting():
        reaper.child_exited()
        assert reaper.sweep_if_due() == 0
        assert reaper.due is not None  # looked again later rather than forgotten
    assert reaper.sweep_if_due() == 0 and reaper.due is None


def test_the_kernels_children_lists_find_the_descendants_a_full_scan_finds(tmp_path):
    # The fast walk (/proc/PID/task/TID/children) and the fallback (every process's PPid) agree.
    # Each shell marks itself ready with a redirection, not with touch: a touch that has made its
    # file may not have exited yet, and one walk would see it where the next does not.
    shells = [subprocess.Popen(['sh', '-c', 'sleep 60 & sleep 60 & : > "$0"; wait', str(tmp_path / str(n))])
              for n in range(3)]
    try:
        assert wait_until(lambda: all((tmp_path / str(n)).exists() for n in range(3)))
        walked = sorted(info.pid for info in processes._descendants(os.getpid()))
        scanned = sorted(info.pid for info in processes._descendants_by_scan(list(processes._all_processes()),
                                                                             os.getpid()))
        assert processes._children_from_proc(os.getpid()) is not None, 'this kernel lists no children'
        assert len(walked) >= 9 and walked == scanned
    finally:
        for shell in shells:
            for info in processes._descendants(shell.pid):
                os.kill(info.pid, signal.SIGKILL)
            shell.kill()
            shell.wait()
