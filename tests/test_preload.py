"""
Preloaded libraries (negotiator_common.preload, and the zygotes of libraries of .warm and
.zygote): a warm program whose call sends a zip archive and the modules to import from it runs
in a process forked from a zygote that imported them once; real processes of the Python running
the tests (each of 3.6 to 3.13 under tox), no VM. Ansible's modules on a real guest are in
tests/test_e2e_ansible.py.
"""

import logging
import os
import signal
import sys
import threading
import zipfile

import pytest

from negotiator_common import warm
from negotiator_common.preload import Preload
from negotiator_common.runner import run_process
from negotiator_common.warm import WarmPythons

from support import FORK_AND_ESCAPE, adopting  # noqa: F401 (adopting: a fixture)
from waiting import process_alive, wait_until

PYTHON = os.path.realpath(sys.executable)

PROBE = b"""import os, sys
import probe.lib
print(probe.lib.IMPORTED_IN != os.getpid(), 'probe.lib' in sys.modules, probe.lib.__file__.startswith('/tmp/'))
"""
"""Whether ``probe.lib`` was imported before the program ran (in another process), and from the agent's copy."""

UNTIL_STOPPED = b"import signal\nsignal.pause()\n"


@pytest.fixture
def pythons(monkeypatch):
    """Warm Pythons of this test alone, all ended after it."""
    pythons = WarmPythons()
    monkeypatch.setattr('negotiator_common.runner.WARM_PYTHONS', pythons)
    yield pythons
    pythons.close()


def archive_of(directory, modules, name='lib.zip'):
    """A zip archive of ``modules`` (dotted name: source) in ``directory``; its bytes."""
    path = os.path.join(str(directory), name)
    with zipfile.ZipFile(path, 'w') as archive:
        packages = set()
        for module, source in modules.items():
            parts = module.split('.')
            packages.update('.'.join(parts[:n]) for n in range(1, len(parts)))
            archive.writestr('/'.join(parts) + '.py', source)
        for package in packages:
            archive.writestr(package.replace('.', '/') + '/__init__.py', '')
    with open(path, 'rb') as handle:
        return handle.read()


def probe_library(directory, imports_log, extra=''):
    """A ``probe.lib`` that writes its pid in ``imports_log`` each time it is imported."""
    source = ("import os\nIMPORTED_IN = os.getpid()\nwith open(%r, 'a') as log:\n"
              "    log.write('%%d\\n' %% IMPORTED_IN)\n%s" % (str(imports_log), extra))
    return archive_of(directory, {'probe.lib': source})


def run(program, preload=None, **options):
    output = {'stdout': b'', 'stderr': b''}

    def collect(name, chunk):
        output[name] += chunk
    result = run_process([PYTHON], stdin=program, on_output=collect, warm=True, preload=preload,
                         timeout=options.pop('timeout', 60), **options)
    return result, output['stdout'], output['stderr']


def test_preloaded_modules_are_imported_once_before_the_programs_run(pythons, tmp_path):
    imports = tmp_path / 'imports'
    preload = Preload(probe_library(tmp_path, imports), ['probe.lib'])
    for _ in range(3):
        result, stdout, stderr = run(PROBE, preload)
        assert (result.exit_status, stdout) == (0, b'True True True\n'), stderr
    assert len(imports.read_text().split()) == 1  # one import, in the zygote of libraries
    # Without the preload the same program does not find the module: it came from the preload alone.
    result, _, stderr = run(PROBE)
    assert result.exit_status == 1 and b"No module named 'probe'" in stderr


def test_each_content_has_its_own_zygote_and_the_least_recently_used_idle_one_makes_room(pythons, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(warm, 'MAX_PRELOADED', 2)
    preloads = []
    for number in range(3):
        directory = tmp_path / str(number)
        directory.mkdir()
        preloads.append(Preload(probe_library(directory, directory / 'imports'), ['probe.lib']))
    zygotes = []
    for preload in preloads:
        assert run(PROBE, preload)[1] == b'True True True\n'
        zygotes.append(pythons._preloaded[(PYTHON, preload.key)])
    assert len(set(zygotes)) == 3 and len(pythons._preloaded) == 2
    assert zygotes[0].dead and not process_alive(zygotes[0].pid)  # the first, used least recently, ended
    assert not os.path.exists(zygotes[0].archive) and os.path.exists(zygotes[2].archive)  # and its archive with it
    assert not zygotes[1].dead and not zygotes[2].dead
    assert run(PROBE, preloads[2])[1] == b'True True True\n'
    assert pythons._preloaded[(PYTHON, preloads[2].key)] is zygotes[2]  # kept, not made again


def test_when_every_zygote_of_libraries_is_busy_a_new_preload_runs_warm_without_it(pythons, tmp_path, monkeypatch):
    monkeypatch.setattr(warm, 'MAX_PRELOADED', 1)
    first, second = tmp_path / 'first', tmp_path / 'second'
    first.mkdir()
    second.mkdir()
    busy = Preload(probe_library(first, first / 'imports'), ['probe.lib'])
    other = Preload(probe_library(second, second / 'imports'), ['probe.lib'])
    cancelled = threading.Event()
    outcome = []
    runner = threading.Thread(target=lambda: outcome.append(run(UNTIL_STOPPED, busy, cancelled=cancelled)))
    runner.start()
    try:
        assert wait_until(lambda: (PYTHON, busy.key) in pythons._preloaded
                          and pythons._preloaded[(PYTHON, busy.key)].running)
        result, _, stderr = run(PROBE, other)
        assert result.exit_status == 1 and b"No module named 'probe'" in stderr  # warm, not preloaded
    finally:
        cancelled.set()
        runner.join(30)
    assert outcome and outcome[0][0].cancelled


def test_a_module_that_fails_to_import_is_left_out_and_fails_in_the_program_as_it_would_cold(pythons, tmp_path):
    imports = tmp_path / 'imports'
    library = archive_of(tmp_path, {'probe.lib': "import os\nIMPORTED_IN = os.getpid()\n",
                                    'probe.broken': "raise ValueError('broken on import')\n"})
    preload = Preload(library, ['probe.broken', 'probe.lib'])
    result, stdout, stderr = run(PROBE, preload)
    assert (result.exit_status, stdout) == (0, b'True True True\n'), stderr
    result, _, stderr = run(b'import probe.broken\n', preload)
    assert result.exit_status == 1 and b'ValueError: broken on import' in stderr
    assert not imports.exists()


def test_libraries_that_start_a_thread_are_not_preloaded_and_the_program_runs_warm(pythons, tmp_path, caplog):
    imports = tmp_path / 'imports'
    preload = Preload(probe_library(tmp_path, imports, extra='import threading, time\n'
                                    'threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n'),
                      ['probe.lib'])
    with caplog.at_level(logging.INFO, logger='negotiator_common.warm'):
        for _ in range(2):
            result, stdout, stderr = run(b"import sys\nprint('json' in sys.modules, 'probe' in sys.modules)\n", preload)
            assert (result.exit_status, stdout) == (0, b'True False\n'), stderr
    assert caplog.text.count('Not preloading 1 modules') == 1 and 'started a thread' in caplog.text
    assert not pythons._preloaded


def test_a_timeout_kills_a_preloaded_program_and_what_it_forked_out_of_its_group(pythons, tmp_path,
                                                                              adopting):  # noqa: F811 (the fixture)
    preload = Preload(probe_library(tmp_path, tmp_path / 'imports'), ['probe.lib'])
    result, stdout, _ = run(FORK_AND_ESCAPE, preload, timeout=3, kill_grace=1)
    assert result.timed_out and result.signal == signal.SIGTERM
    escaped = int(stdout.split()[0])
    assert wait_until(lambda: not process_alive(escaped)), 'the forked child outlived the timeout'
    assert run(PROBE, preload)[1] == b'True True True\n'


def test_a_zygote_of_libraries_that_dies_takes_its_programs_and_the_next_call_makes_another(pythons, tmp_path):
    preload = Preload(probe_library(tmp_path, tmp_path / 'imports'), ['probe.lib'])
    run(PROBE, preload)
    zygote = pythons._preloaded[(PYTHON, preload.key)]
    threading.Timer(1.0, os.kill, (zygote.pid, signal.SIGKILL)).start()
    result, _, _ = run(UNTIL_STOPPED, preload)
    assert result.signal == signal.SIGKILL
    assert run(PROBE, preload)[1] == b'True True True\n'
    again = pythons._preloaded[(PYTHON, preload.key)]
    assert again is not zygote and again.archive != zygote.archive
    assert not os.path.exists(zygote.archive) and os.path.exists(again.archive)
    assert len((tmp_path / 'imports').read_text().split()) == 2


def test_closing_ends_every_zygote_and_their_directory(tmp_path, monkeypatch):
    pythons = WarmPythons()
    monkeypatch.setattr('negotiator_common.runner.WARM_PYTHONS', pythons)
    preload = Preload(probe_library(tmp_path, tmp_path / 'imports'), ['probe.lib'])
    run(PROBE, preload)
    base, preloaded = pythons._zygotes[PYTHON], pythons._preloaded[(PYTHON, preload.key)]
    assert os.path.dirname(preloaded.archive) == base.cache and os.path.exists(preloaded.archive)
    pythons.close()
    assert base.dead and preloaded.dead
    assert not process_alive(base.pid) and not process_alive(preloaded.pid)
    assert not os.path.exists(base.cache)


def test_the_key_is_the_content_and_the_wire_form_round_trips():
    preload = Preload(b'PK archive', ['a.b', 'c'])
    again = Preload.from_wire(preload.to_wire())
    assert (again.archive, again.modules, again.key) == (preload.archive, preload.modules, preload.key)
    assert Preload(b'PK archive', ['a.b']).key != preload.key
    assert Preload(b'PK other', ['a.b', 'c']).key != preload.key
