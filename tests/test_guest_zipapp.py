"""
The single-file guest agent (``scripts/build-guest-agent``) outside a guest, on every CPython
from 3.6 to 3.13.

Why: the archive is how old guests without network get negotiator (docs/guest.rst), so it must
run with nothing else installed on every Python that negotiator supports, and build the same
bytes from the same sources. The daemon and the client mode run as a guest runs them, from the
archive, against a host played by this process on a pseudo-terminal: its master stands for the
host's end of the port, the agent opens the slave with ``--character-device``.

The interpreters run by path (pyenv's, on PATH: a missing one fails its tests), so the module
does the same work whichever Python runs pytest: it is marked ``interpreters``, and ``tox -e
guest-agent`` runs it once (tox.ini).
"""

import configparser
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import tty
import zipfile

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport
from negotiator_guest import __version__
from negotiator_guest.port import host_connected

from waiting import wait_until
from support import REPOSITORY, SUPPORTED_PYTHONS, build_zipapp, interpreter, write_command

pytestmark = pytest.mark.interpreters

#: Arguments that a shell would mangle and that must arrive byte for byte.
TRICKY_ARGS = ['with space', "single ' quote", '$(touch /tmp/pwned)', 'back\\slash', 'tab\there', 'ünïcödé ✓', '',
               'new\nline', '--option-like', '*']

#: Imports every module of the archive as ``python ARCHIVE`` would find them, then says where
#: ``pipes`` came from: the standard library before 3.13, the archive's folder for 3.13 after.
#: Run with ``-S``: no site-packages, so nothing that is installed beside can stand in for the archive.
PROBE = r'''
import importlib, json, runpy, sys, zipfile
archive = sys.argv[1]
sys.path.insert(0, archive)  # as `python ARCHIVE` does
runpy.run_path(archive, run_name='probe')  # the bootstrap, without the CLI
modules = []
for name in zipfile.ZipFile(archive).namelist():
    if name.endswith('.py') and not name.endswith('__main__.py'):  # entry points run, not import
        parts = name[:-3].split('/')
        parts = parts[1:] if parts[0].startswith('python-') else parts
        modules.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
for module in sorted(modules):
    importlib.import_module(module)
import pipes
print(json.dumps({'modules': len(modules), 'pipes': pipes.__file__}))
'''

PYTHONS = [pytest.param(version, id='python' + version) for version in SUPPORTED_PYTHONS]


def test_the_pythons_tested_are_the_unit_environments_ones():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPOSITORY, 'tox.ini'))
    unit = [name.strip() for name in parser.get('tox', 'envlist').split(',') if name.strip().startswith('py')]
    assert unit == ['py' + version.replace('.', '') for version in SUPPORTED_PYTHONS]


@pytest.fixture(scope='module')
def pyz(tmp_path_factory):
    path = tmp_path_factory.mktemp('zipapp') / 'negotiator-guest.pyz'
    print(build_zipapp(path))  # the size and the hash, for the record
    return str(path)


def members(pyz):
    with zipfile.ZipFile(pyz) as archive:
        return archive.infolist()


def test_the_build_is_byte_for_byte_the_same_from_a_copy_of_the_sources(pyz, tmp_path):
    # A copy elsewhere, with fresh dates and modes, and bytecode lying in the packages.
    checkout = tmp_path / 'elsewhere'
    for part in ('negotiator-common', 'negotiator-guest', 'scripts'):
        shutil.copytree(os.path.join(REPOSITORY, part), str(checkout / part), copy_function=shutil.copyfile)
    shutil.copyfile(os.path.join(REPOSITORY, 'LICENSE.txt'), str(checkout / 'LICENSE.txt'))
    cache = checkout / 'negotiator-guest' / 'negotiator_guest' / '__pycache__'
    cache.mkdir(exist_ok=True)
    (cache / 'cli.cpython-36.pyc').write_bytes(b'not from the sources')
    again = tmp_path / 'out' / 'negotiator-guest.pyz'
    build_zipapp(again, source_root=str(checkout))
    with open(pyz, 'rb') as first, open(str(again), 'rb') as second:
        assert hashlib.sha256(first.read()).hexdigest() == hashlib.sha256(second.read()).hexdigest()
    for name in ('negotiator-guest.service', 'supervisord.conf'):
        with open(os.path.join(os.path.dirname(pyz), name)) as first, open(str(again.parent / name)) as second:
            assert first.read() == second.read()


def test_the_archive_holds_the_sources_and_the_pinned_wheels_and_nothing_of_the_build(pyz):
    with open(pyz, 'rb') as handle:
        assert handle.read(23) == b'#!/usr/bin/env python3\n'
    assert os.stat(pyz).st_mode & 0o777 == 0o755
    entries = members(pyz)
    names = [entry.filename for entry in entries]
    assert names == sorted(names)
    assert {(entry.date_time, entry.external_attr >> 16) for entry in entries} == {((1980, 1, 1, 0, 0, 0), 0o100644)}
    left_out = ('.pyc', 'tests.py', '.pth', 'RECORD')
    assert not [name for name in names if name.endswith(left_out) or '__pycache__' in name]
    with zipfile.ZipFile(pyz) as archive:
        for project, package in (('negotiator-common', 'negotiator_common'), ('negotiator-guest', 'negotiator_guest')):
            folder = os.path.join(REPOSITORY, project, package)
            sources = sorted(name for name in os.listdir(folder) if name.endswith('.py'))
            assert sorted(n.split('/', 1)[1] for n in names if n.startswith(package + '/')) == sources
            for name in sources:
                with open(os.path.join(folder, name), 'rb') as handle:
                    assert archive.read(package + '/' + name) == handle.read(), name
    assert [name for name in names if '/pipes/' in name or name.startswith('pipes/')] == [
        'python-3.13-and-later/pipes/__init__.py']
    dists = sorted(name.split('/')[-2].split('-')[0] for name in names if name.endswith('.dist-info/METADATA'))
    assert dists == ['coloredlogs', 'executor', 'fasteners', 'humanfriendly', 'property_manager', 'six',
                     'standard_pipes', 'verboselogs']
    size = os.path.getsize(pyz)
    print('negotiator-guest.pyz: %d bytes (%.0f KiB), %d files' % (size, size / 1024.0, len(names)))
    assert size < 1024 * 1024, 'the archive grew to %d bytes: what was bundled?' % size


@pytest.mark.parametrize('version', PYTHONS)
def test_every_bundled_module_imports_and_pipes_comes_from_the_right_place(pyz, version):
    python = interpreter(version)
    result = subprocess.run([python, '-S', '-c', PROBE, pyz], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['modules'] > 50
    if tuple(int(part) for part in version.split('.')) >= (3, 13):  # interpreter() checked the version
        assert report['pipes'] == os.path.join(pyz, 'python-3.13-and-later', 'pipes', '__init__.py')
    else:
        assert not report['pipes'].startswith(pyz), 'the bundled pipes hides the standard library\'s'


@pytest.mark.parametrize('version', PYTHONS)
def test_help_and_usage_errors(pyz, version):
    python = interpreter(version)
    shown = subprocess.run([python, pyz, '--help'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(b'Usage: negotiator-guest [OPTIONS]') and b'--daemon' in shown.stdout
    for wrong in ([], ['--no-such-option']):
        refused = subprocess.run([python, pyz] + wrong, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert refused.returncode == 64, (wrong, refused.stderr)


@pytest.mark.parametrize('version', PYTHONS)
def test_a_symbolic_link_to_the_archive_is_the_negotiator_guest_command(pyz, version, tmp_path):
    # docs/guest.rst: its #! line runs the python3 on PATH (this version's, here).
    os.symlink(pyz, str(tmp_path / 'negotiator-guest'))
    path = os.pathsep.join([str(tmp_path), os.path.dirname(interpreter(version)), os.environ.get('PATH', '')])
    shown = subprocess.run(['negotiator-guest', '--help'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=dict(os.environ, PATH=path), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(b'Usage: negotiator-guest [OPTIONS]')


@pytest.fixture
def pty_port():
    """A pseudo-terminal in raw mode: yields (master, slave path); the test plays the host on the master."""
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    os.close(master)


@pytest.mark.parametrize('version', PYTHONS)
def test_the_daemon_from_the_archive_serves_a_host(pyz, version, pty_port, tmp_path):
    master, path = pty_port
    commands = tmp_path / 'commands'
    commands.mkdir(mode=0o755)
    write_command(commands, 'argv', 'printf "%s\\0" "$@"')
    write_command(commands, 'echo-input', 'cat; printf "\\376err" >&2; exit 3')
    daemon = subprocess.Popen([interpreter(version), pyz, '--daemon', '--character-device', path,
                               '--commands-dir', str(commands), '--allow-exec'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Reading the master before the daemon opened the slave would be an end of stream.
        opened = wait_until(lambda: host_connected(master) or daemon.poll() is not None, timeout=60, interval=0.01)
        assert opened and daemon.poll() is None, daemon.communicate(timeout=10)[1].decode(errors='replace')
        with Endpoint(Transport(master, close_fd=False), name='agent').start() as endpoint:
            hello = endpoint.handshake(timeout=30)
            assert (hello['agent'], hello['version']) == ('negotiator-guest', __version__)
            client = AgentClient(endpoint, hello)
            assert client.ping(timeout=10) < 5
            names = [command.name for command in client.list_commands(timeout=10)]
            assert {'argv', 'echo-input', 'os-release', 'hostname'} <= set(names)
            result = client.execute('argv', *TRICKY_ARGS, timeout=30)
            assert (result.exit_status, result.stdout) == (0, b''.join(a.encode() + b'\0' for a in TRICKY_ARGS))
            data = b'\xff\x00 binary input\n' * 1000
            result = client.execute('echo-input', input=data, timeout=30)
            assert (result.exit_status, result.stdout, result.stderr) == (3, data, b'\xfeerr')
            # The warm Python's program comes out of the archive too (pkgutil.get_data).
            warm = client.exec([os.path.realpath(interpreter(version))], warm=True, timeout=60,
                               input=b"import sys\nprint('warm' if 'json' in sys.modules else 'cold')\n")
            assert (warm.exit_status, warm.stdout) == (0, b'warm\n')
        daemon.send_signal(signal.SIGTERM)
        _, log = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, log.decode(errors='replace')
    assert b'Serving host requests on ' + path.encode() in log and b'Traceback' not in log, log


@pytest.mark.parametrize('version', PYTHONS)
def test_the_client_mode_of_the_archive_asks_a_host(pyz, version, pty_port, tmp_path):
    master, path = pty_port
    commands = tmp_path / 'host-commands'
    commands.mkdir(mode=0o755)
    write_command(commands, 'greet', 'printf "hello %s from %s\\n" "$*" "$NEGOTIATOR_GUEST"; cat; '
                  'printf "\\376err" >&2; exit 3')
    service = AgentService('negotiator-host', CommandRegistry([str(commands)], builtins=False),
                           environment=lambda peer: {'NEGOTIATOR_GUEST': peer})
    served = []

    def serve_one_session():
        if wait_until(lambda: host_connected(master), timeout=120, interval=0.01):
            Endpoint(Transport(master, close_fd=False), service.dispatcher(), name='zipapp-guest').run()
            served.append(True)
    host = threading.Thread(target=serve_one_session)
    host.start()
    try:
        result = subprocess.run([interpreter(version), pyz, '--character-device', path, '--timeout', '60', '--stdin',
                                 '--execute', "greet 'two words' ünï"], input=b'\xff\x00in',
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    finally:
        host.join(30)
    assert served, 'the client never opened its port'
    assert (result.returncode, result.stdout, result.stderr) == (
        3, 'hello two words ünï from zipapp-guest\n'.encode() + b'\xff\x00in', b'\xfeerr')


def test_the_service_files_beside_the_archive_start_it(pyz):
    expected = {'negotiator-guest.service': 'ExecStart=/usr/bin/python3 /usr/local/lib/negotiator/'
                                            'negotiator-guest.pyz --daemon',
                'supervisord.conf': 'command=/usr/bin/python3 /usr/local/lib/negotiator/negotiator-guest.pyz --daemon'}
    for name, start_line in expected.items():
        with open(os.path.join(REPOSITORY, 'negotiator-guest', 'contrib', name)) as handle:
            shipped = handle.read().splitlines()
        with open(os.path.join(os.path.dirname(pyz), name)) as handle:
            adapted = handle.read().splitlines()
        changed = [(old, new) for old, new in zip(shipped, adapted) if old != new]
        assert len(shipped) == len(adapted) and len(changed) == 2, changed
        assert changed[1] == (start_line.replace('/usr/bin/python3 /usr/local/lib/negotiator/negotiator-guest.pyz',
                                                 '/usr/local/bin/negotiator-guest'), start_line)
        assert 'platform-python' in changed[0][1]
