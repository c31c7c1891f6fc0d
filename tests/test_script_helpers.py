"""
The helpers that the demo, the benchmark and the end-to-end tests share (``scripts/``), checked
without a VM: stand-ins for ``virsh``, ``negotiator-host``, ``python`` and ``pip`` are small shell
scripts that log how they were called.

- ``negotiator_venv``: the virtual environment is reused while the sources are unchanged,
  reinstalled when they change, never placed under ``/tmp``.
- ``negotiator_vm``: ``Guest.wait_for_agent`` retries until the agent answers and gives up at
  once when the guest stopped; ``remove_stale_guests`` keeps kept guests and those of live owners.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

import negotiator_venv
import negotiator_vm


def write_script(path, text):
    with open(str(path), 'w') as handle:
        handle.write('#!/bin/sh\n' + text)
    os.chmod(str(path), 0o755)
    return str(path)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


# negotiator_venv

@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A repository with the three packages, one source file each."""
    repo = tmp_path / 'repo'
    for package in negotiator_venv.PACKAGES:
        (repo / package / 'pkg').mkdir(parents=True)
        (repo / package / 'pkg' / '__init__.py').write_text('# %s\n' % package)
    monkeypatch.setattr(negotiator_venv, 'REPO', str(repo))
    return repo


def test_a_venv_under_tmp_is_refused():
    for path in ('/tmp', '/tmp/venv', '/tmp/../tmp/x'):
        with pytest.raises(negotiator_venv.VenvError, match='under /tmp'):
            negotiator_venv.check_location(path)
    negotiator_venv.check_location('/var/tmp/venv')


def test_the_digest_follows_the_sources_and_the_interpreter_not_the_build_leftovers(sources):
    first = negotiator_venv.sources_digest('/usr/bin/python3')
    package = sources / 'negotiator-host'
    for leftover in ('pkg/__pycache__/x.pyc', 'build/lib/x.py', 'negotiator_host.egg-info/PKG-INFO', 'pkg/y.pyc'):
        (package / leftover).parent.mkdir(parents=True, exist_ok=True)
        (package / leftover).write_text('leftover')
    assert negotiator_venv.sources_digest('/usr/bin/python3') == first
    assert negotiator_venv.sources_digest('/bin/sh') != first
    (package / 'README.rst').write_text('new')
    second = negotiator_venv.sources_digest('/usr/bin/python3')
    assert second != first
    (package / 'pkg' / '__init__.py').write_text('# changed\n')
    assert negotiator_venv.sources_digest('/usr/bin/python3') not in (first, second)


@pytest.fixture
def var_tmp():
    """A directory outside /tmp (where tmp_path is): the environments may not live under /tmp."""
    path = tempfile.mkdtemp(prefix='negotiator-venv-test-', dir='/var/tmp')
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def venv(tmp_path, var_tmp):
    """A stand-in environment whose python logs every call (it imports anything: it exits 0)."""
    root = var_tmp / 'venv'
    (root / 'bin').mkdir(parents=True)
    write_script(root / 'bin' / 'python', 'echo "$*" >> %s\n' % (tmp_path / 'venv-python.log'))
    return root


def test_an_unchanged_venv_is_reused_without_pip(sources, venv, tmp_path):
    (venv / negotiator_venv.STAMP).write_text(negotiator_venv.sources_digest('/usr/bin/python3') + '\n')
    said = []
    assert negotiator_venv.ensure_venv(str(venv), '/usr/bin/python3', say=said.append) == str(venv / 'bin')
    assert said == ['reusing %s (the package sources have not changed)' % venv]
    assert not any('pip' in call for call in lines(tmp_path / 'venv-python.log'))


def test_changed_sources_are_reinstalled_packages_first_then_missing_dependencies(sources, venv, tmp_path):
    (venv / negotiator_venv.STAMP).write_text('an older digest\n')
    said = []
    negotiator_venv.ensure_venv(str(venv), '/usr/bin/python3', say=said.append)
    assert said[0] == 'the package sources changed: reinstalling into %s' % venv
    pip = [call for call in lines(tmp_path / 'venv-python.log') if call.startswith('-m pip install')]
    packages = ' '.join(str(sources / package) for package in negotiator_venv.PACKAGES)
    assert pip == ['-m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ' + packages,
                   '-m pip install --quiet --disable-pip-version-check ' + packages]
    assert (venv / negotiator_venv.STAMP).read_text() == negotiator_venv.sources_digest('/usr/bin/python3') + '\n'


def test_a_missing_venv_is_created_with_the_given_interpreter(sources, tmp_path, var_tmp):
    venv = var_tmp / 'new-venv'
    # A stand-in interpreter: `-m venv --clear DIR` makes DIR/bin/python, which logs its calls.
    python = write_script(tmp_path / 'python3', '\n'.join([
        'echo "$*" >> %s' % (tmp_path / 'base-python.log'),
        'if [ "$1" = -m ] && [ "$2" = venv ]; then',
        '  mkdir -p "$4/bin" && printf \'#!/bin/sh\\necho "$*" >> %s\\n\' > "$4/bin/python"'
        % (tmp_path / 'venv-python.log'),
        '  chmod 755 "$4/bin/python"',
        'fi', '']))
    said = []
    assert negotiator_venv.ensure_venv(str(venv), python, say=said.append) == str(venv / 'bin')
    assert said[0] == 'creating %s ()' % venv and said[1].startswith('pip install ./negotiator-common')
    assert lines(tmp_path / 'base-python.log') == ['--version', '-m venv --clear %s' % venv]
    assert len([call for call in lines(tmp_path / 'venv-python.log') if call.startswith('-m pip install')]) == 2
    assert (venv / negotiator_venv.STAMP).exists()


# negotiator_vm

@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """A bin folder first on PATH for a stand-in virsh; ``domstate`` says what the file ``state`` holds."""
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    (tmp_path / 'state').write_text('running\n')
    (tmp_path / 'guests').write_text('')
    write_script(bindir / 'virsh', '\n'.join([
        'echo "$*" >> %s' % (tmp_path / 'virsh.log'),
        'shift 3  # -q -c URI',
        'case "$1" in',
        '  domstate) cat %s ;;' % (tmp_path / 'state'),
        '  list) cat %s ;;' % (tmp_path / 'guests'),
        '  destroy|undefine) grep -vx "$2" %s > %s.new; mv %s.new %s ;;'
        % ((tmp_path / 'guests',) * 4),
        'esac', '']))
    monkeypatch.setenv('PATH', '%s:%s' % (bindir, os.environ['PATH']))
    return tmp_path


def agent_cli(tmp_path, answers_from_try):
    """A stand-in negotiator-host that fails until try ``answers_from_try``, logging each call."""
    bindir = tmp_path / 'venv-bin'
    bindir.mkdir()
    write_script(bindir / 'negotiator-host', '\n'.join([
        'echo "$*" >> %s' % (tmp_path / 'cli.log'),
        'if [ "$(wc -l < %s)" -ge %d ]; then echo "$6: agent answered in 0.4 ms"; exit 0; fi'
        % (tmp_path / 'cli.log', answers_from_try),
        'echo "the agent in $6 did not answer" >&2; exit 75', '']))
    return str(bindir)


def test_waiting_for_the_agent_retries_until_the_cli_gets_an_answer(fake_tools):
    bindir = agent_cli(fake_tools, answers_from_try=3)
    guest = negotiator_vm.Guest('web-1', str(fake_tools))
    answer = guest.wait_for_agent(bindir, timeout=60, interval=0.01)
    assert answer == negotiator_vm.AgentAnswer('web-1: agent answered in 0.4 ms', 3)
    assert lines(fake_tools / 'cli.log') == ['--connect qemu:///system --ping --timeout 3 web-1'] * 3


def test_waiting_for_the_agent_of_a_stopped_guest_fails_at_once(fake_tools):
    bindir = agent_cli(fake_tools, answers_from_try=1000)
    (fake_tools / 'state').write_text('shut off\n')
    (fake_tools / 'console.log').write_text('Kernel panic\n')
    guest = negotiator_vm.Guest('web-1', str(fake_tools))
    with pytest.raises(negotiator_vm.VMError, match='stopped before its agent answered') as failure:
        guest.wait_for_agent(bindir, timeout=60, interval=0.01)
    assert 'Kernel panic' in str(failure.value)
    assert len(lines(fake_tools / 'cli.log')) == 1


def test_waiting_for_an_agent_that_never_answers_ends_at_the_timeout(fake_tools):
    bindir = agent_cli(fake_tools, answers_from_try=1000)
    guest = negotiator_vm.Guest('web-1', str(fake_tools))
    with pytest.raises(negotiator_vm.VMError, match='did not answer within 0 s .last: the agent in web-1 did not'):
        guest.wait_for_agent(bindir, timeout=0, interval=0.01)


def dead_pid():
    process = subprocess.Popen(['true'])
    process.wait()
    return process.pid


def test_stale_guests_are_removed_but_not_kept_ones_nor_those_of_live_owners(fake_tools, monkeypatch):
    work_root = fake_tools / 'work'
    monkeypatch.setattr(negotiator_vm, 'WORK_ROOT', str(work_root))
    owners = {'t-dead': dead_pid(), 't-kept': dead_pid(), 't-live': 1, 't-mine': os.getpid(),
              't-dead-dir': dead_pid(), 't-live-dir': 1}
    for name, pid in owners.items():
        (work_root / name).mkdir(parents=True)
        (work_root / name / 'owner.pid').write_text('%d\n' % pid)
    negotiator_vm.Guest('t-kept', str(work_root / 't-kept')).keep()
    # Defined guests; the two *-dir ones are work directories only (a crashed start, or one under way).
    (fake_tools / 'guests').write_text('t-dead\nt-kept\nt-live\nt-mine\nother-prefix\n')
    removed = negotiator_vm.remove_stale_guests(prefix='t-')
    assert removed == ['t-dead', 't-mine']  # this process's own guests are stale to it
    assert sorted(os.listdir(str(work_root))) == ['t-kept', 't-live', 't-live-dir']
    assert lines(fake_tools / 'guests') == ['t-kept', 't-live', 'other-prefix']
    assert negotiator_vm.remove_stale_guests(prefix='t-', all_owners=True) == ['t-kept', 't-live']
    assert os.listdir(str(work_root)) == []
