"""
Threads for requests served off the reading thread, started once and used again.

An :class:`~negotiator_common.endpoint.Endpoint` serves each request that may block (``execute``,
and every request the host daemon forwards to a guest) on a thread of its own. Starting a
thread for each one made every forwarded ``ping`` through the host daemon pay for a new thread
(``clone3``, a stack mapped and unmapped, ``strace -f -c``: 13 futex calls a ping): about a third
of what the daemon added to a ping natively (0.93 ms against 0.60 ms with the ping answered on the
reading thread; docs/benchmark.rst, "ping through the daemon"). :func:`run_in_thread` hands the
job to a thread that has finished its last one and waits for another, and starts a new thread
only when none is idle; a thread idle for :data:`IDLE_SECONDS` ends, so that a daemon at rest
holds no more threads than it did before.

Nothing bounds the number of busy threads here: the endpoint's ``max_concurrent`` does, as
before. At most :data:`MAX_IDLE` threads wait for a job: after a burst (a host daemon refusing
the requests of fifty guests at once), the others end at once instead of lingering.
A job that raises ends its thread with the exception (reported as any thread's is), as a
thread of its own would have.
"""

import collections
import threading
from typing import Any, Callable, Deque, Tuple

__all__ = ('run_in_thread', 'idle_threads', 'IDLE_SECONDS', 'MAX_IDLE')

IDLE_SECONDS = 2.0
"""How long a thread with nothing to do waits for a new job before it ends."""

MAX_IDLE = 8
"""How many threads may wait for a job at once; one more that finishes its job ends."""

_Job = Tuple[str, Callable[..., Any], Tuple[Any, ...]]

_lock = threading.Condition()
_jobs: Deque[_Job] = collections.deque()
_idle = 0  # threads waiting for a job, not yet given one


def run_in_thread(name: str, function: Callable[..., Any], *args: Any) -> None:
    """
    Call ``function(*args)`` on a thread named ``name`` (for the logs and debuggers): an idle one
    if there is one, else a new (daemon) thread.
    """
    with _lock:
        if _idle > len(_jobs):
            _jobs.append((name, function, args))
            _lock.notify()
            return
    thread = threading.Thread(target=_work, args=((name, function, args),), name=name)
    thread.daemon = True
    thread.start()


def idle_threads() -> int:
    """How many threads wait for a job now (for diagnostics and tests)."""
    with _lock:
        return _idle


def _work(job: _Job) -> None:
    """Run ``job``, then each job handed over, until none comes within :data:`IDLE_SECONDS`."""
    global _idle
    while True:
        name, function, args = job
        threading.current_thread().name = name
        function(*args)
        del function, args, job  # hold nothing of the last job while idle
        with _lock:
            if _idle >= MAX_IDLE and not _jobs:
                return
            _idle += 1
            try:
                if not _jobs:
                    _lock.wait(IDLE_SECONDS)
                if not _jobs:
                    return
                job = _jobs.popleft()
            finally:
                _idle -= 1
