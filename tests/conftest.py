"""
An exception that leaves a thread fails the test that was running, on every Python we support.

pytest.ini turns pytest's ``PytestUnhandledThreadExceptionWarning`` into an error. pytest emits
that warning from ``threading.excepthook``, which Python has only since 3.8: on 3.6 and 3.7
pytest never sees a thread's exception, so this module catches it as each thread ends and
emits the same warning at the end of the test's setup, call or teardown, as pytest does.
"""

import sys
import threading
import traceback
import warnings
from typing import Generator, List, Tuple

import pytest

if sys.version_info < (3, 8):
    _thread_errors: List[Tuple[str, str]] = []
    """(thread name, traceback) of each exception that left a thread and no test has reported yet."""

    _start = threading.Thread.start

    def _start_reporting(self: threading.Thread) -> None:
        """``Thread.start``, with the thread's ``run`` wrapped so that an exception leaving it is kept."""
        run = self.run

        def run_reporting() -> None:
            try:
                run()
            except SystemExit:
                pass
            except BaseException:
                text = traceback.format_exc()
                sys.stderr.write('Exception in thread %s:\n%s' % (self.name, text))  # as Python prints it
                _thread_errors.append((self.name, text))
        self.run = run_reporting
        _start(self)

    threading.Thread.start = _start_reporting

    def _report_thread_errors() -> Generator[None, None, None]:
        yield
        while _thread_errors:
            name, text = _thread_errors.pop(0)
            warnings.warn(pytest.PytestUnhandledThreadExceptionWarning('Exception in thread %s\n\n%s' % (name, text)),
                          stacklevel=1)

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_setup() -> Generator[None, None, None]:
        yield from _report_thread_errors()

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_call() -> Generator[None, None, None]:
        yield from _report_thread_errors()

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_teardown() -> Generator[None, None, None]:
        yield from _report_thread_errors()
