"""Waiting for something to become true, and whether a process still lives: shared by the tests."""

import time

__all__ = ('process_alive', 'wait_until')


def wait_until(predicate, timeout=5.0, interval=0.02):
    """Call ``predicate`` until it returns something true or ``timeout`` passes; return its last value."""
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
