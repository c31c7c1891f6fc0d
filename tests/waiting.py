"""Waiting for something to become true, and whether a process still lives: shared by the tests."""

import os
import time

__all__ = ('process_alive', 'process_reaped', 'read_pid', 'wait_dead', 'wait_until')


def wait_until(predicate, timeout=30.0, interval=0.02):
    """
    Call ``predicate`` until it returns something true or ``timeout`` passes; return its last value.

    Every caller waits for something that must happen, so the default is generous: a passing
    test returns at once, and a loaded CI machine (2 cores, other work) gets time to get there.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def process_alive(pid):
    """True while ``pid`` is a process that has not exited (a zombie counts as dead)."""
    try:
        with open('/proc/%d/stat' % pid) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except OSError:
        return False


def process_reaped(pid):
    """True once nothing is left of ``pid``, not even a zombie (its parent has waited for it)."""
    return not os.path.exists('/proc/%d' % pid)


def wait_dead(*pids, timeout=5.0):
    """Wait until none of ``pids`` is alive (see :func:`process_alive`); False if one still is at ``timeout``."""
    return wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout)


def read_pid(path, timeout=5.0):
    """The first process id in the file ``path``, once a process has written it there (an assertion fails if not)."""
    def written():
        try:
            with open(str(path)) as handle:
                return handle.read().split()
        except FileNotFoundError:
            return []
    words = wait_until(written, timeout)
    assert words, 'no pid in %s' % path
    return int(words[0])
