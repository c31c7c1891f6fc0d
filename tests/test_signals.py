"""negotiator_common.signals: the signal queue of both daemons, with real signals sent to this process."""

import os
import signal
import threading

import pytest

from negotiator_common.signals import SignalQueue


@pytest.fixture
def queue():
    """A queue of SIGUSR1 and SIGUSR2, installed (pytest runs tests on the main thread)."""
    signals = SignalQueue([signal.SIGUSR1, signal.SIGUSR2])
    signals.install()
    yield signals
    signals.close()


def _wait_on_a_thread(signals):
    """Start ``signals.wait(None)`` on a thread; return the thread and the list its result goes to."""
    results = []
    waiter = threading.Thread(target=lambda: results.append(signals.wait(None)))
    waiter.daemon = True  # a wait that never wakes must not hold pytest at exit
    waiter.start()
    return waiter, results


def test_a_signal_is_queued_by_its_handler_and_returned_by_the_next_wait(queue):
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert queue.wait(0) == [signal.SIGUSR2, signal.SIGUSR1]
    assert queue.wait(0) == []  # each signal is returned once


def test_a_signal_wakes_a_wait_that_has_no_timeout(queue):
    # The wait sleeps in poll() with no timeout: only the wake-up pipe that the interpreter
    # writes to when the signal arrives can end it. The handler runs on the main thread, so the
    # signal is in the waiter's result or still queued, never lost.
    waiter, results = _wait_on_a_thread(queue)
    os.kill(os.getpid(), signal.SIGUSR1)
    waiter.join(10)
    assert not waiter.is_alive(), 'the signal did not wake the wait'
    assert results[0] + queue.wait(0) == [signal.SIGUSR1]


def test_wake_ends_a_wait_from_another_thread_without_a_signal(queue):
    waiter, results = _wait_on_a_thread(queue)
    queue.wake()
    waiter.join(10)
    assert not waiter.is_alive(), 'wake() did not wake the wait'
    assert results == [[]]


def test_a_queue_that_is_not_installed_still_sleeps_and_wakes():
    # A daemon run off the main thread (tests) cannot install handlers; its loop still works.
    signals = SignalQueue([signal.SIGUSR1])
    try:
        assert not signals.installed
        assert signals.wait(0) == []
        waiter, results = _wait_on_a_thread(signals)
        signals.wake()
        waiter.join(10)
        assert not waiter.is_alive() and results == [[]]
    finally:
        signals.close()


def test_close_puts_back_the_previous_handlers_and_wakeup_descriptor():
    previous_handler = signal.getsignal(signal.SIGUSR1)
    previous_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous_fd)
    signals = SignalQueue([signal.SIGUSR1])
    signals.install()
    assert signals.installed and signal.getsignal(signal.SIGUSR1) != previous_handler
    signals.close()
    assert not signals.installed
    assert signal.getsignal(signal.SIGUSR1) == previous_handler
    assert signal.set_wakeup_fd(previous_fd) == previous_fd
    signals.close()  # a second close does nothing


def test_wake_after_close_writes_nowhere():
    # The pipe's descriptor numbers may belong to another file after close(): a late wake-up
    # (a session thread ending after its daemon) must not write into it.
    signals = SignalQueue([])
    signals.close()
    read_end, write_end = os.pipe()  # likely reuses the closed numbers
    try:
        signals.wake()
        os.set_blocking(read_end, False)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 1)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_install_off_the_main_thread_is_refused():
    signals = SignalQueue([signal.SIGUSR1])
    errors = []

    def install():
        try:
            signals.install()
        except ValueError as exc:
            errors.append(exc)
    thread = threading.Thread(target=install)
    thread.start()
    thread.join(10)
    try:
        assert len(errors) == 1 and not signals.installed
    finally:
        signals.close()
