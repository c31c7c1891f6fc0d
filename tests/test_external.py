"""negotiator_common.external: starting programs through executor, argv only, never a shell."""

import os
import sys

import pytest

from negotiator_common.external import ExternalProgram

from waiting import process_alive

# (LC_CTYPE left out: Python's own locale coercion may add it, in the child.)
REPORT = 'import os, sys; print(os.getsid(0) == os.getpid(), ' \
         'sorted(kv for kv in os.environ.items() if kv[0] != "LC_CTYPE"), sys.argv[1:]); print(sys.stdin.read())'


def _run(program, stdin=b''):
    process = program.start()
    try:
        return process.communicate(stdin, timeout=30)
    finally:
        program.close()


def test_exactly_the_environment_given_in_a_session_of_its_own_with_input():
    program = ExternalProgram([sys.executable, '-c', REPORT, '$HOME', '; echo no shell'],
                              environment={'PATH': '/bin', 'NEGOTIATOR_X': 'y'}, new_session=True, stdin=True)
    stdout, stderr = _run(program, b'the input')
    assert stdout.decode().splitlines() == [
        "True [('NEGOTIATOR_X', 'y'), ('PATH', '/bin')] ['$HOME', '; echo no shell']", 'the input']


def test_by_default_the_agents_own_environment_and_session_and_no_input(monkeypatch):
    monkeypatch.setenv('NEGOTIATOR_TEST_MARK', 'inherited')
    stdout, _ = _run(ExternalProgram([sys.executable, '-c', REPORT]))
    first, second = stdout.decode().splitlines()
    assert first.startswith('False ') and "('NEGOTIATOR_TEST_MARK', 'inherited')" in first
    assert second == ''  # standard input is /dev/null


def test_a_missing_program_or_interpreter_is_file_not_found(tmp_path):
    script = tmp_path / 'script'
    script.write_text('#!/nonexistent/interpreter\n')
    script.chmod(0o755)
    for argv in ([str(tmp_path / 'missing')], [str(script)]):
        program = ExternalProgram(argv)
        with pytest.raises(FileNotFoundError, match='it or its interpreter does not exist'):
            program.start()
        program.close()


def test_close_kills_a_program_still_running():
    program = ExternalProgram(['sleep', '60'])
    process = program.start()
    assert process_alive(process.pid)
    program.close()
    assert process.returncode is not None and not process_alive(process.pid)
    with pytest.raises(RuntimeError, match='was not started'):
        assert ExternalProgram(['true']).process is None  # never started: it raises instead


def test_the_environment_given_is_copied():
    environment = {'PATH': '/bin'}
    program = ExternalProgram([sys.executable, '-c', 'import os; print(os.environ.get("LATE"))'],
                              environment=environment)
    environment['LATE'] = 'added after'
    stdout, _ = _run(program)
    assert stdout == b'None\n'
    assert os.environ.get('LATE') is None
