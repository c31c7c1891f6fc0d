"""
negotiator_host.events: the libvirt event watcher, running small stand-in programs instead of
``virsh event``, with a back-off on a clock the test moves.
"""

import logging
import sys

import pytest

from negotiator_host.backoff import Backoff
from negotiator_host.events import FIRST_RESTART_DELAY, STABLE_RUN, EventWatcher, virsh_event_argv

from waiting import wait_until

# Two events (and a blank line, which is none), then it ends as virsh does when libvirtd goes away.
EVENTS_THEN_END = [sys.executable, '-c', r'''
import sys
print("event 'lifecycle' for domain 'a': Started Booted")
print("")
print("event 'lifecycle' for domain 'a': Stopped Destroyed")
sys.stdout.flush()
sys.stderr.write("error: Disconnected from qemu:///system\n")
sys.exit(3)
''']


def runs_until(path):
    """A watcher that prints nothing and ends when ``path`` exists."""
    return [sys.executable, '-c', 'import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)',
            str(path)]


class Clock(object):
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class Recorder(object):
    """The daemon's side: what the watcher told it."""

    def __init__(self):
        self.events = 0
        self.missed = 0

    def event(self):
        self.events += 1

    def events_missed(self):
        self.missed += 1


@pytest.fixture
def watched():
    """(watcher, recorder, clock) with the watcher not started; stopped at the end."""
    clock = Clock()
    recorder = Recorder()
    watcher = EventWatcher('qemu:///system', recorder.event, recorder.events_missed, backoff=Backoff(clock=clock),
                           argv=EVENTS_THEN_END)
    yield watcher, recorder, clock
    watcher.stop_taking_work()
    watcher.stop()


def test_the_default_program_is_virsh_event_for_the_uri():
    watcher = EventWatcher('qemu:///session', lambda: None, lambda: None)
    assert watcher.argv == virsh_event_argv('qemu:///session')
    assert watcher.argv == ['virsh', '-q', '-c', 'qemu:///session', 'event', '--all', '--loop', '--timestamp']


def test_each_line_is_an_event_and_an_ended_watcher_is_due_again_after_its_backoff(watched, caplog):
    watcher, recorder, clock = watched
    caplog.set_level(logging.INFO, logger='negotiator_host.events')
    assert watcher.due() is None
    watcher.start()
    assert wait_until(lambda: watcher.due() is not None), 'the watcher did not end'
    assert recorder.events == 2
    assert recorder.missed == 2  # a full rescan when it started, and one when it ended
    assert watcher.due() == clock.now + FIRST_RESTART_DELAY
    assert "virsh event ended (status 3): error: Disconnected from qemu:///system" in caplog.text


def test_restarts_back_off_1_2_4_then_from_1_again_after_a_long_run(watched, tmp_path):
    watcher, recorder, clock = watched
    delays = []
    watcher.start()
    for _ in range(3):
        assert wait_until(lambda: watcher.due() is not None)
        delays.append(watcher.due() - clock.now)
        watcher.run_due(watcher.due())
        assert watcher.due() is None  # running again
    assert delays == [1, 2, 4]
    assert wait_until(lambda: recorder.missed == 8)  # that fourth run (started and ended)
    # A run that lasts longer than STABLE_RUN starts the back-off from its first delay again.
    watcher.argv = runs_until(tmp_path / 'end')
    watcher.run_due(watcher.due())
    assert wait_until(lambda: recorder.missed == 9)  # it started
    clock.now += STABLE_RUN + 1
    (tmp_path / 'end').touch()
    assert wait_until(lambda: watcher.due() is not None)
    assert watcher.due() - clock.now == FIRST_RESTART_DELAY


def test_a_watcher_that_cannot_start_is_tried_again(watched, tmp_path, caplog):
    watcher, recorder, clock = watched
    watcher.argv = [str(tmp_path / 'no-such-virsh')]
    watcher.start()
    assert wait_until(lambda: watcher.due() is not None)
    assert watcher.due() == clock.now + FIRST_RESTART_DELAY
    assert (recorder.events, recorder.missed) == (0, 1)
    assert 'Cannot run virsh event' in caplog.text


def test_stopping_ends_the_program_which_is_not_started_again(watched, tmp_path, caplog):
    watcher, recorder, clock = watched
    watcher.argv = runs_until(tmp_path / 'never')
    watcher.start()
    assert wait_until(lambda: recorder.missed == 1)  # it runs
    watcher.stop_taking_work()
    watcher.stop()
    assert wait_until(lambda: recorder.missed == 2)  # it ended
    assert watcher.due() is None
    assert 'ended' not in caplog.text  # a watcher stopped on purpose is no warning
