"""
An exception that leaves a thread fails the test that started the thread: the repository's
``pytest.ini`` and ``tests/conftest.py``, run by a pytest of their own on two throwaway tests.
"""

import os
import shutil
import subprocess
import sys

THREAD_TESTS = '''
import threading


def test_a_thread_that_raises():
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()


def test_a_thread_that_ends_well():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
'''


def test_an_exception_in_a_thread_fails_its_test(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(os.path.dirname(here), 'pytest.ini'), str(tmp_path))
    (tmp_path / 'tests').mkdir()
    shutil.copy(os.path.join(here, 'conftest.py'), str(tmp_path / 'tests'))
    (tmp_path / 'tests' / 'test_threads.py').write_text(THREAD_TESTS)
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider'], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = result.stdout.decode('utf-8', 'replace')
    assert result.returncode == 1, output
    assert 'FAILED tests/test_threads.py::test_a_thread_that_raises' in output
    assert 'PytestUnhandledThreadExceptionWarning' in output and 'ZeroDivisionError' in output
    assert '1 failed, 1 passed' in output
