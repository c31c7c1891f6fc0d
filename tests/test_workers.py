"""
The threads that serve requests (negotiator_common.workers): a thread that has finished its job
takes the next one, jobs that overlap each get a thread, and an idle thread ends.
"""

import threading

from negotiator_common import workers

from waiting import wait_until


def _record(threads, done, name):
    threads.append((threading.get_ident(), threading.current_thread().name == name))
    done.set()


def test_a_thread_that_finished_its_job_takes_the_next():
    threads = []
    assert wait_until(lambda: workers.idle_threads() == 0, timeout=10)  # those of other tests have ended
    for name in ('negotiator-ping-1', 'negotiator-ping-2'):
        done = threading.Event()
        workers.run_in_thread(name, _record, threads, done, name)
        assert done.wait(10)
        assert wait_until(lambda: workers.idle_threads() >= 1, timeout=10)
    assert len(threads) == 2 and threads[0][0] == threads[1][0]  # one thread, named after each job
    assert all(named for _, named in threads)


def test_jobs_that_overlap_each_get_a_thread():
    count = 6
    barrier = threading.Barrier(count + 1, timeout=20)  # passes only when all run at once
    for number in range(count):
        workers.run_in_thread('negotiator-execute-%d' % number, barrier.wait)
    barrier.wait()


def test_an_idle_thread_ends(monkeypatch):
    monkeypatch.setattr(workers, 'IDLE_SECONDS', 0.05)
    threads = []
    done = threading.Event()
    workers.run_in_thread('negotiator-ping-3', lambda: threads.append(threading.current_thread()) or done.set())
    assert done.wait(10)
    assert wait_until(lambda: not threads[0].is_alive(), timeout=10)
    assert wait_until(lambda: workers.idle_threads() == 0, timeout=10)  # those of other tests too



def test_after_a_burst_at_most_max_idle_threads_wait(monkeypatch):
    monkeypatch.setattr(workers, 'IDLE_SECONDS', 5.0)  # the idle ones outlive the check; the others end at once
    count = workers.MAX_IDLE + 6
    barrier = threading.Barrier(count + 1, timeout=20)  # every job runs at once: one thread each
    for number in range(count):
        workers.run_in_thread('negotiator-burst-%d' % number, barrier.wait)
    barrier.wait()

    def burst_threads():
        return [t for t in threading.enumerate() if t.name.startswith('negotiator-burst-')]

    assert wait_until(lambda: len(burst_threads()) == workers.MAX_IDLE, timeout=4)
    assert workers.idle_threads() <= workers.MAX_IDLE
    assert wait_until(lambda: not burst_threads(), timeout=20)  # and those end when idle long enough
