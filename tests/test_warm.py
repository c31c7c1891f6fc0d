"""
Warm Pythons (negotiator_common.warm, .zygote): a Python program from standard input runs in a
process forked from an interpreter that has already imported the standard library, and behaves
as the same program under a new interpreter does; real processes of the Python running the
tests (each of 3.6 to 3.13 under tox), no VM. The real guest's are in tests/test_e2e_exec.py.
"""

import logging
import os
import signal
import sys
import threading

import pytest

from negotiator_common.runner import run_process
from negotiator_common.warm import WARM_PYTHONS, WarmPythons, warmable

from support import FORK_AND_ESCAPE, adopting, write_command  # noqa: F401 (adopting: a fixture)
from waiting import process_alive, wait_until

PYTHON = os.path.realpath(sys.executable)
"""An absolute path named ``python...``, as an interpreter must be to be warm (a venv's is a link)."""

IS_WARM = b"import sys\nprint('warm' if 'json' in sys.modules else 'cold')\n"
"""A program that tells a warm process from a new interpreter: no Python imports json as it starts."""

PORTRAIT = b"""import os, sys
print(sys.argv, __name__, __file__, __doc__, __package__, __spec__, sys.path[0] == '', os.getcwd())
print(os.environ.get('CHOSEN'), os.environ.get('NEGOTIATOR_RUN') is not None, os.getpgid(0) == os.getpid())
print(sorted(globals()), __loader__, sys.stdin.read() == '')
sys.stdout.flush()
sys.exit(3)
"""


UNTIL_STOPPED = b"import signal\nsignal.pause()\n"
"""A program that runs until a signal stops it."""


@pytest.fixture(autouse=True, scope='module')
def no_zygote_left():
    """The zygotes these tests start end with the module, so that no later test finds their processes."""
    yield
    WARM_PYTHONS.close()


def run(program, warm=True, argv=(PYTHON,), **options):
    """Run ``program`` as the input of ``argv``: its result, and its output by stream."""
    output = {'stdout': b'', 'stderr': b''}

    def collect(name, chunk):
        output[name] += chunk
    result = run_process(list(argv), stdin=program, on_output=collect, warm=warm, timeout=options.pop('timeout', 60),
                         **options)
    return result, output['stdout'], output['stderr']


def test_the_interpreter_is_named_python_alone_and_reads_no_startup_variables():
    assert warmable(['/usr/bin/python3'], None) and warmable(['/usr/libexec/platform-python3.6'], {'A': 'b'})
    assert warmable(['/opt/py/bin/python'], {})
    assert not warmable(['python3'], None)  # looked up in PATH: not this one for sure
    assert not warmable(['/usr/bin/python3', '-'], None)
    assert not warmable(['/bin/sh'], None) and not warmable(['/usr/bin/python3-config'], None)
    for name in ('PYTHONPATH', 'PYTHONIOENCODING', 'LANG', 'LC_ALL', 'LC_CTYPE'):
        assert not warmable(['/usr/bin/python3'], {name: 'x'})


def test_a_warm_program_runs_as_it_runs_under_a_new_interpreter(tmp_path):
    results = {}
    for warm in (False, True):
        result, stdout, stderr = run(PORTRAIT, warm=warm, directory=str(tmp_path), variables={'CHOSEN': 'yes'})
        results[warm] = (result.exit_status, result.signal, stdout, stderr)
    assert results[True] == results[False]
    portrait = b"[''] __main__ <stdin> None None None True %s" % str(tmp_path).encode()
    assert results[True][0] == 3 and portrait in results[True][2]
    assert run(IS_WARM, warm=False)[1] == b'cold\n'
    assert run(IS_WARM)[1] == b'warm\n'


@pytest.mark.parametrize('program', [
    b"def f():\n    raise ValueError('boom')\nf()\n",
    b"import sys\nsys.exit('a message of its own')\n",
    b"import sys\nsys.exit(None)\n",
    b"import sys\nsys.exit(260)\n",
    b"this is not python\n",
    b"import atexit, sys\natexit.register(lambda: print('at exit', flush=True))\nprint('body')\n",
    b"import threading\nthreading.Thread(target=lambda: (threading.main_thread().join(), print('thread'))).start()\n",
    b"raise KeyboardInterrupt\n",
    b"import sys\nsys.stdout.write('unflushed')\nsys.stderr.write('unflushed too')\n",
])
def test_a_warm_program_ends_as_the_interpreter_ends(program):
    cold, warm = run(program, warm=False), run(program)
    assert (warm[0].exit_status, warm[0].signal) == (cold[0].exit_status, cold[0].signal)
    assert warm[1:] == cold[1:]
    assert run(IS_WARM)[1] == b'warm\n'


def test_each_warm_program_gets_fresh_random_numbers():
    program = b"import random\nprint(random.random())\n"
    assert run(program)[1] != run(program)[1]


def test_calls_at_once_each_get_their_own_process_and_output():
    outputs = {}

    def call(number):
        outputs[number] = run(b"import sys\nprint(sys.stdin.read() or %d)\n" % number)[1]
    threads = [threading.Thread(target=call, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outputs == {number: b'%d\n' % number for number in range(8)}


def test_a_timeout_kills_the_warm_program_and_what_it_forked_out_of_its_group(adopting):  # noqa: F811 (the fixture)
    result, stdout, _ = run(FORK_AND_ESCAPE, timeout=3, kill_grace=1)
    assert result.timed_out and result.signal == signal.SIGTERM
    escaped = int(stdout.split()[0])
    assert wait_until(lambda: not process_alive(escaped), timeout=10), 'the forked child outlived the timeout'
    assert run(IS_WARM)[1] == b'warm\n'


def test_a_cancelled_warm_program_is_killed_and_the_next_one_runs():
    cancelled = threading.Event()
    threading.Timer(1.0, cancelled.set).start()
    result, _, _ = run(UNTIL_STOPPED, cancelled=cancelled)
    assert result.cancelled and result.signal == signal.SIGTERM
    assert run(IS_WARM)[1] == b'warm\n'


def test_a_zygote_that_dies_takes_its_programs_and_the_next_call_starts_another(caplog):
    run(IS_WARM)
    zygote = WARM_PYTHONS._zygotes[PYTHON]
    threading.Timer(1.0, os.kill, (zygote.pid, signal.SIGKILL)).start()
    with caplog.at_level(logging.WARNING, logger='negotiator_common.warm'):
        result, _, _ = run(UNTIL_STOPPED)
        assert wait_until(lambda: 'The warm %s ended' % PYTHON in caplog.text)  # logged by its reader thread
    assert result.signal == signal.SIGKILL
    assert run(IS_WARM)[1] == b'warm\n'
    assert WARM_PYTHONS._zygotes[PYTHON] is not zygote


def test_an_interpreter_that_is_no_python_runs_cold_and_says_why_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr('negotiator_common.runner.WARM_PYTHONS', WarmPythons())
    impostor = write_command(str(tmp_path), 'python3', '#!/bin/sh\nexec cat\n')
    with caplog.at_level(logging.WARNING, logger='negotiator_common.warm'):
        for _ in range(2):
            result, stdout, _ = run(b'as it came', argv=[impostor])
            assert (result.exit_status, stdout) == (0, b'as it came')
    assert caplog.text.count('Running %s cold from now on' % impostor) == 1
    assert 'cannot be a warm Python' in caplog.text


def test_without_warm_or_with_arguments_a_python_starts_cold():
    assert run(IS_WARM, warm=False)[1] == b'cold\n'
    assert run(IS_WARM, argv=[PYTHON, '-'])[1] == b'cold\n'
    assert run(IS_WARM, variables={'PYTHONDONTWRITEBYTECODE': '1'})[1] == b'cold\n'


def test_an_interpreter_that_says_ready_then_nonsense_is_buried_and_the_program_runs_cold(tmp_path, monkeypatch,
                                                                                          caplog):
    monkeypatch.setattr('negotiator_common.runner.WARM_PYTHONS', WarmPythons())
    impostor = write_command(str(tmp_path), 'python3', '#!/bin/sh\nprintf \'{"ready": [3, 6]}\'\nprintf nonsense\n'
                                                       'exec cat >/dev/null\n')
    with caplog.at_level(logging.WARNING, logger='negotiator_common.warm'):
        result, stdout, _ = run(b'program', argv=[impostor])
    assert (result.exit_status, stdout) == (0, b'{"ready": [3, 6]}nonsense')
    assert 'Running %s cold this time' % impostor in caplog.text


def _zip_with_a_failing_module(directory):
    import zipfile
    os.makedirs(directory)
    path = os.path.join(directory, 'lib.zip')
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('zipped_probe/__init__.py', '')
        archive.writestr('zipped_probe/failing.py', "def fail():\n    raise ValueError('from the zip')\n")
    return path


def test_code_compiled_from_a_zip_is_kept_and_named_after_the_zip_of_each_run(tmp_path):
    run(IS_WARM)
    cache = WARM_PYTHONS._zygotes[PYTHON].cache
    assert cache is not None and os.stat(cache).st_mode & 0o777 == 0o700
    program = b"import sys\nsys.path.insert(0, %s)\nimport zipped_probe.failing\nzipped_probe.failing.fail()\n"
    first, second = (_zip_with_a_failing_module(str(tmp_path / name)) for name in ('a', 'b'))
    tracebacks, entries = [], []
    for archive in (first, second):
        result, _, stderr = run(program % repr(archive).encode())
        assert result.exit_status == 1 and b'ValueError: from the zip' in stderr
        tracebacks.append(stderr)
        entries.append({name: os.stat(os.path.join(cache, name)).st_ino for name in os.listdir(cache)})
    for archive, stderr in zip((first, second), tracebacks):  # each run's own path, not the first's
        assert ('File "%s"' % os.path.join(archive, 'zipped_probe', 'failing.py')).encode() in stderr
    if sys.version_info >= (3, 8):  # zipimport in Python: its compiled code is kept, and read back
        assert len(entries[0]) == 2 and entries[1] == entries[0]
    else:  # zipimport in C: nothing to keep
        assert entries == [{}, {}]


def test_a_missing_directory_or_interpreter_is_refused_as_for_any_command(tmp_path):
    from negotiator_common.errors import CommandNotFound
    with pytest.raises(CommandNotFound, match='does not exist'):
        run(IS_WARM, directory=str(tmp_path / 'absent'))
    with pytest.raises(CommandNotFound):
        run(IS_WARM, argv=[str(tmp_path / 'python3')])
    assert run(IS_WARM)[1] == b'warm\n'
