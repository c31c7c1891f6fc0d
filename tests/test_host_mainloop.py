"""negotiator_host.mainloop: the host daemon's main loop and the jobs that plug into it."""

import os
import signal
import threading
import time

from negotiator_common.processes import adopt_orphans
from negotiator_host.mainloop import DelayedCall, Job, MainLoop

from waiting import wait_until


class RecordingJob(Job):
    """A job that writes down what the loop asks of it; due at ``due_at`` until it has run."""

    def __init__(self, name, log, due_at=None):
        self.name = name
        self.log = log
        self.due_at = due_at

    def start(self):
        self.log.append((self.name, 'start'))

    def due(self):
        return self.due_at

    def run_due(self, now):
        assert self.due_at is not None and now >= self.due_at
        self.due_at = None
        self.log.append((self.name, 'run'))

    def stop_taking_work(self):
        self.log.append((self.name, 'stop taking work'))

    def stop(self):
        self.log.append((self.name, 'stop'))


def _run_on_a_thread(loop):
    thread = threading.Thread(target=loop.run)
    thread.start()
    return thread


def test_due_jobs_run_and_every_job_stops_taking_work_before_any_stops():
    log = []
    loop = MainLoop([RecordingJob('connections', log, due_at=time.monotonic()), RecordingJob('watcher', log)])
    thread = _run_on_a_thread(loop)
    try:
        assert wait_until(lambda: ('connections', 'run') in log)
    finally:
        loop.stop('the test is over')
        thread.join(10)
    assert not thread.is_alive()
    assert log == [('connections', 'start'), ('watcher', 'start'), ('connections', 'run'),
                   ('connections', 'stop taking work'), ('watcher', 'stop taking work'),
                   ('connections', 'stop'), ('watcher', 'stop')]
    assert loop.stop_reason == 'the test is over' and loop.stopping


def test_a_job_that_becomes_due_later_runs_when_its_time_comes():
    # A job whose due time changes wakes the loop once (as DelayedCall does); the loop then
    # sleeps until that time and runs the job, with no other wake-up.
    log = []
    job = RecordingJob('later', log)
    loop = MainLoop([job])
    thread = _run_on_a_thread(loop)
    try:
        assert wait_until(lambda: ('later', 'start') in log)
        job.due_at = time.monotonic() + 0.2
        loop.wake()
        assert wait_until(lambda: ('later', 'run') in log)
    finally:
        loop.stop()
        thread.join(10)


def test_delayed_call_runs_once_for_a_burst_and_earlier_requests_win():
    calls = []
    wakes = []
    delayed = DelayedCall(lambda: calls.append(True), lambda: wakes.append(True))
    assert delayed.due() is None
    delayed.request(30)
    late = delayed.due()
    delayed.request(0.1)
    early = delayed.due()
    delayed.request(60)
    assert early < late and delayed.due() == early and len(wakes) == 3
    delayed.run_due(early - 1)  # not yet
    assert calls == []
    delayed.run_due(early)
    delayed.run_due(early + 1)  # done: nothing left to call
    assert calls == [True] and delayed.due() is None


def test_sigterm_stops_a_loop_on_the_main_thread_and_its_handlers_are_put_back():
    # A real signal to this process: the handler only queues it, the loop stops with the reason.
    previous = signal.getsignal(signal.SIGTERM)

    class SignalledJob(RecordingJob):
        def start(self):
            super().start()
            os.kill(os.getpid(), signal.SIGTERM)

    log = []
    loop = MainLoop([SignalledJob('job', log)])
    try:
        loop.run()
    finally:
        adopt_orphans(False)  # on the main thread the loop made this process adopt orphans, as a daemon does
    assert loop.stop_reason == 'signal %d' % signal.SIGTERM
    assert log == [('job', 'start'), ('job', 'stop taking work'), ('job', 'stop')]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_stop_before_run_and_wake_without_a_loop_are_harmless():
    loop = MainLoop()
    loop.wake()  # nothing sleeps yet
    loop.stop('early')
    loop.stop('later')  # the first reason stays
    loop.run()  # returns at once: asked to stop already
    assert loop.stop_reason == 'early'
