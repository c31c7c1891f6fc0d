"""
The parts of scripts/benchmark that run without a VM: its workloads, its floor client, its
command line and exit statuses, its many-guests figure over daemons on ptys, and what the
single-file figures start from (the Pythons, the archive, the wrapper, the sampler's match).

The benchmark itself boots a guest and is run by hand (docs/benchmark.rst); these tests keep
what its figures rest on honest between runs: each guest command makes exactly the output
its figure says, and the "floor of any Python client" program gets the same listing from a
real agent as ``negotiator-host --list-commands`` does. Its figures are read, never asserted:
a run that measured exits 0 or 1 (a target missed), one that failed exits 2.
"""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import bench_guest
from negotiator_host import GuestChannel
from support import FakeGuestAgent, FakeHostDaemon, interpreter, short_tempdir

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'benchmark')


@pytest.fixture(scope='module')
def benchmark():
    loader = importlib.machinery.SourceFileLoader('negotiator_benchmark', SCRIPT)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def commands(benchmark):
    # Every workload but the two that act on the guest itself (qemu-ga, /proc of the daemon).
    directory = os.path.join(short_tempdir(), 'commands')
    os.mkdir(directory, 0o755)
    for name, text in benchmark.GUEST_COMMANDS.items():
        if not name.startswith('bench-'):
            with open(os.path.join(directory, name), 'w') as handle:
                handle.write(text)
            os.chmod(os.path.join(directory, name), 0o755)
    return directory


def run(commands, name, *args, input=None):
    return subprocess.run([os.path.join(commands, name)] + list(args), stdout=subprocess.PIPE, check=True,
                          input=input).stdout


def test_the_workloads_make_what_their_figures_say(benchmark, commands):
    assert run(commands, 'hello') == b'hello from the guest\n'
    assert run(commands, 'ddout', '2') == bytes(2 * benchmark.MIB)  # the raw reference's producer
    text = run(commands, 'bigout', '100000')
    assert len(text) == 100000 and text.startswith((benchmark.LINE + '\n').encode())
    assert run(commands, 'bigout-null', '100000') == b''
    assert run(commands, 'nap', '0') == b''  # the concurrent calls' command, here sleeping 0 s
    assert run(commands, 'nap-batch', '3', '0') == b''  # three of them at once, by the guest's shell
    # The slow reader of the pings-under-load figure reads all its input (slowly for 0 s here) and says how much.
    assert run(commands, 'slow-sink', '0', input=bytes(3 * benchmark.MIB + 5)) == b'%d\n' % (3 * benchmark.MIB + 5)


def test_the_floor_client_lists_what_the_agent_offers(benchmark, commands):
    path = os.path.join(short_tempdir(), 'channel')
    agent = FakeGuestAgent(path, commands)
    try:
        listed = subprocess.run([sys.executable, '-c', benchmark.MINIMAL_CLIENT, path],
                                stdout=subprocess.PIPE, check=True, timeout=30).stdout.decode().split()
        with GuestChannel(socket_path=path, timeout=10) as channel:
            expected = [command.name for command in channel.list_commands()]
    finally:
        agent.stop()
    assert listed == expected and 'ddout' in listed


def test_the_daemon_floor_client_runs_a_command_as_the_cli_does_through_the_daemon(benchmark, commands):
    root = short_tempdir()
    agent = FakeGuestAgent(os.path.join(root, 'agent.sock'), commands)
    daemon = FakeHostDaemon(os.path.join(root, 'host.sock'), {'alpha': agent.path})
    env = dict(os.environ, NEGOTIATOR_HOST_SOCKET=daemon.path)
    try:
        runs = [subprocess.run(argv, stdout=subprocess.PIPE, env=env, timeout=30) for argv in (
            [sys.executable, '-c', benchmark.DAEMON_FLOOR_CLIENT, daemon.path, 'alpha', 'hello'],
            [sys.executable, '-m', 'negotiator_host', '--execute=hello', 'alpha'],
            [sys.executable, '-c', benchmark.DAEMON_FLOOR_CLIENT, daemon.path, 'alpha', 'nap'])]  # sleep: no operand
    finally:
        daemon.stop()
        agent.stop()
    assert [(run.returncode, run.stdout) for run in runs] == [(0, b'hello from the guest\n')] * 2 + [(1, b'')]
    assert daemon.attached == ['alpha'] * 3  # each went through the daemon


FAKE_LIBVIRT = {
    'libvirt.py': '''
class _Connection(object):
    def lookupByName(self, name):
        return name
def open(uri):
    return _Connection()
''',
    'libvirt_qemu.py': '''
import base64, json, os
_polls = {}
def qemuAgentCommand(domain, command, timeout, flags):
    request = json.loads(command)
    with open(os.environ['FAKE_LIBVIRT_LOG'], 'a') as log:
        log.write(json.dumps([domain, request['execute'], timeout, flags]) + '\\n')
    if request['execute'] == 'guest-exec':
        return json.dumps({'return': {'pid': 42}})
    _polls[domain] = _polls.get(domain, 0) + 1
    if _polls[domain] % 3:
        return json.dumps({'return': {'exited': False}})
    return json.dumps({'return': {'exited': True, 'exitcode': 0,
                                  'out-data': base64.b64encode(b'hello from the guest\\n').decode()}})
''',
}
"""libvirt-python as far as the guest-exec loop uses it: each command has exited at its third guest-exec-status."""


def test_the_guest_exec_loop_polls_as_the_ansible_plugin_does(benchmark, tmp_path):
    for name, text in FAKE_LIBVIRT.items():
        (tmp_path / name).write_text(text)
    log = tmp_path / 'calls'
    env = dict(os.environ, PYTHONPATH=str(tmp_path), FAKE_LIBVIRT_LOG=str(log))
    result = subprocess.run([sys.executable, '-c', benchmark.LIBVIRT_EXEC_LOOP, 'qemu:///system', 'web-1',
                             '/tmp/negotiator-commands/hello', 'hello from the guest\n', '2'],
                            stdout=subprocess.PIPE, env=env, universal_newlines=True, timeout=30, check=True)
    figures = json.loads(result.stdout)
    assert figures['polls'] == [3, 3] and len(figures['seconds']) == 2  # the first command warmed up, untimed
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # Per command: guest-exec, then guest-exec-status again at once until exited; 5 s and no flags each.
    each = [['web-1', 'guest-exec', 5, 0]] + [['web-1', 'guest-exec-status', 5, 0]] * 3
    assert calls == each * 3


FAKE_QGA_FILES = """
import base64, json, os
_files = {}
def qemuAgentCommand(domain, command, timeout, flags):
    request = json.loads(command)
    execute, arguments = request['execute'], request['arguments']
    with open(os.environ['FAKE_LIBVIRT_LOG'], 'a') as log:
        log.write(json.dumps([domain, execute, sorted(arguments), timeout, flags]) + '\\n')
    if execute == 'guest-file-open':
        _files[7] = {'mode': arguments['mode'], 'data': b'' if 'w' in arguments['mode'] else bytes(range(256)) * 400,
                     'at': 0}
        return json.dumps({'return': 7})
    handle = _files[arguments['handle']]
    if execute == 'guest-file-write':
        handle['data'] += base64.b64decode(arguments['buf-b64'])
        return json.dumps({'return': {'count': len(base64.b64decode(arguments['buf-b64'])), 'eof': False}})
    if execute == 'guest-file-read':
        piece = handle['data'][handle['at']:handle['at'] + arguments['count']]
        handle['at'] += len(piece)
        return json.dumps({'return': {'count': len(piece), 'buf-b64': base64.b64encode(piece).decode(),
                                      'eof': handle['at'] >= len(handle['data'])}})
    with open(os.environ['FAKE_LIBVIRT_LOG'] + '.written', 'wb') as written:
        written.write(handle['data'])
    return json.dumps({'return': {}})
"""
"""libvirt-python's qemu-ga file RPCs as far as the file loop uses them: one file, 102400 bytes to read."""


@pytest.mark.parametrize('verb', ['write', 'read'])
def test_the_qemu_ga_file_loop_moves_the_file_in_chunks_as_its_users_do(benchmark, tmp_path, verb):
    (tmp_path / 'libvirt.py').write_text(FAKE_LIBVIRT['libvirt.py'])
    (tmp_path / 'libvirt_qemu.py').write_text(FAKE_QGA_FILES)
    log = tmp_path / 'calls'
    local = tmp_path / 'local'
    if verb == 'write':
        local.write_bytes(os.urandom(100000))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), FAKE_LIBVIRT_LOG=str(log))
    result = subprocess.run([sys.executable, '-c', benchmark.QGA_FILE_LOOP, 'qemu:///system', 'web-1', verb,
                             '/srv/file', str(local), '40000'],
                            stdout=subprocess.PIPE, env=env, universal_newlines=True, timeout=30, check=True)
    assert json.loads(result.stdout)['calls'] == 3
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    middle = [['web-1', 'guest-file-%s' % verb, ['buf-b64', 'handle'] if verb == 'write' else ['count', 'handle'],
               30, 0]] * 3
    assert calls == ([['web-1', 'guest-file-open', ['mode', 'path'], 30, 0]] + middle
                     + [['web-1', 'guest-file-close', ['handle'], 30, 0]])
    expected = local.read_bytes() if verb == 'write' else bytes(range(256)) * 400
    assert (tmp_path / 'calls.written').read_bytes() == local.read_bytes() == expected


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)


def test_the_usage_shows_the_options_it_takes_and_the_exit_statuses():
    result = run_script('--help')
    assert result.returncode == 0, result.stderr
    for option in ('--quick', '--json-out FILE', '--venv PATH', '--real-guests N', '--fleet N', '--fleet-only',
                   '--daemon-only', '--files-only'):
        assert option in result.stdout, option
    assert ' -v' not in result.stdout
    assert ('Exit status: 0 when every target passed, 1 when one missed, 2 when the run itself failed'
            in result.stdout)


def test_an_option_it_does_not_take_is_a_usage_error():
    result = run_script('-v')
    assert result.returncode == 2
    assert 'unrecognized arguments: -v' in result.stderr


@pytest.mark.parametrize('options', [('--fleet-only', '--daemon-only'), ('--daemon-only', '--files-only'),
                                     ('--files-only', '--ansible-only')])
def test_each_only_option_excludes_the_others(options):
    result = run_script(*options)
    assert result.returncode == 2
    assert '%s and %s exclude each other' % options in result.stderr


def test_the_ansible_figures_run_one_guest_under_both_plugins_with_a_10_task_playbook(benchmark, tmp_path):
    assert benchmark.parse_arguments(['--ansible-only']).real_guests == 1

    class Guest(object):
        name = 'negotiator-bench-x'
    benchmark.write_ansible_files(str(tmp_path), Guest())
    inventory = (tmp_path / 'inventory.ini').read_text()
    for name, plugin in benchmark.ANSIBLE_PLUGINS:
        assert '%s ansible_host=negotiator-bench-x ansible_connection=%s\n' % (name, plugin) in inventory
    assert (tmp_path / 'big.bin').stat().st_size == 10 * benchmark.MIB
    tasks = [line for line in (tmp_path / 'play.yml').read_text().splitlines() if line.startswith('    - ')]
    assert len(tasks) == 10
    assert [key for key, _, _ in benchmark.ansible_figures()] == ['ping', 'command', 'shell', 'copy', 'fetch', 'setup']
    assert benchmark.ANSIBLE_PLUGINS == (('negotiator', 'negotiator.guest.negotiator'),
                                         ('libvirt_qemu', 'community.libvirt.libvirt_qemu'))
    assert benchmark.AGENT_SWITCHES == ('--allow-exec', '--allow-files')


def test_a_run_that_fails_exits_2_and_writes_no_figures(benchmark, monkeypatch, tmp_path, capsys):
    class FailingFleet(object):
        def __init__(self, python, count, real_guests=()):
            raise RuntimeError('no pseudo-terminal left')

    monkeypatch.setattr(benchmark, 'FakeFleet', FailingFleet)
    out = tmp_path / 'figures.json'
    # --venv is this environment: the benchmark runs here, without re-executing itself.
    status = benchmark.main(['--fleet-only', '--fleet', '2', '--quick', '--venv', sys.prefix, '--json-out', str(out)])
    assert status == benchmark.EXIT_FAILED == 2
    assert 'benchmark: failed: no pseudo-terminal left' in capsys.readouterr().err
    assert not out.exists()


def test_the_many_guests_figure_runs_without_a_vm(tmp_path):
    out = tmp_path / 'figures.json'
    result = run_script('--fleet-only', '--fleet', '2', '--quick', '--venv', sys.prefix, '--json-out', str(out))
    assert result.returncode in (0, 1), result.stderr  # 1: the target was missed (figures are not asserted)
    document = json.loads(out.read_text())
    assert document['fleet_only'] is True
    assert [figure['key'] for figure in document['figures']] == ['many_guests']
    assert document['figures'][0]['negotiator'] > 0
    assert '| --all --list-commands, 2 daemons + 0 real guests |' in result.stdout


def test_the_sampler_finds_the_daemon_however_it_runs():
    needle = bench_guest.NEEDLES['negotiator']
    for daemon in (b'/venv/bin/python /venv/bin/negotiator-guest --daemon --commands-dir /tmp/commands',
                   b'/usr/bin/python3.6 /var/tmp/x/negotiator-guest.pyz --daemon --commands-dir /tmp/commands'):
        assert needle.search(daemon), daemon
    for other in (b'/venv/bin/python /venv/bin/negotiator-guest --list-commands',
                  b'/usr/bin/python3.6 /var/tmp/x/negotiator-guest.pyz --execute host-facts',
                  b'/bin/sh /tmp/negotiator-commands/restart-agent /usr/bin/python3.6 /var/tmp/x/negotiator-guest.pyz'):
        assert not needle.search(other), other


def test_a_run_on_guests_without_the_single_files_pythons_fails_before_any_guest_boots(
        benchmark, monkeypatch, tmp_path, capsys):
    def boot_guests(bench, guests):
        raise AssertionError('a guest was booted')

    made = []
    mkdtemp = benchmark.tempfile.mkdtemp

    def recorded_mkdtemp(prefix, dir):
        made.append(mkdtemp(prefix=prefix, dir=str(tmp_path)))
        return made[-1]

    monkeypatch.setattr(benchmark, 'boot_guests', boot_guests)
    monkeypatch.setattr(benchmark.tempfile, 'mkdtemp', recorded_mkdtemp)
    monkeypatch.setenv('PATH', str(tmp_path))  # no python3.6 there, nor anything else
    out = tmp_path / 'figures.json'
    status = benchmark.main(['--quick', '--venv', sys.prefix, '--json-out', str(out)])
    assert status == benchmark.EXIT_FAILED
    this = '%d.%d' % sys.version_info[:2]  # found without PATH: this one runs the benchmark
    missing = ' or '.join('python' + version for version in benchmark.SINGLE_FILE_PYTHONS if version != this)
    assert 'benchmark: failed: no working %s on PATH for the single-file figures' % missing in capsys.readouterr().err
    assert len(made) == 1 and not os.path.exists(made[0]) and not out.exists()


def test_a_run_on_guests_without_libvirt_python_fails_before_any_guest_boots(benchmark, monkeypatch, tmp_path, capsys):
    def boot_guests(bench, guests):
        raise AssertionError('a guest was booted')

    monkeypatch.setattr(benchmark, 'prepare_agents', lambda bench, directory: None)
    monkeypatch.setattr(benchmark, 'boot_guests', boot_guests)
    monkeypatch.setattr(benchmark, 'LIBVIRT_PYTHON', sys.executable)  # this environment has no libvirt-python
    out = tmp_path / 'figures.json'
    status = benchmark.main(['--daemon-only', '--quick', '--venv', sys.prefix, '--json-out', str(out)])
    assert status == benchmark.EXIT_FAILED
    assert ('benchmark: failed: %s cannot import libvirt for the guest-exec reference: apt-get install python3-libvirt'
            % sys.executable) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.interpreters
def test_the_guest_starts_the_installed_package_through_a_wrapper_and_the_single_file_is_built(benchmark, tmp_path):
    args = benchmark.parse_arguments(['--quick'])
    bench = benchmark.Bench(args, sys.executable)
    benchmark.prepare_agents(bench, str(tmp_path))
    this = '%d.%d' % sys.version_info[:2]
    assert bench.pythons == [(this, os.path.realpath(sys.executable))] + [
        (version, interpreter(version)) for version in benchmark.SINGLE_FILE_PYTHONS if version != this]
    wrapper = os.path.join(bench.agent_bindir, 'negotiator-guest')
    with open(wrapper) as handle:
        assert 'set -- %s "$@"' % os.path.join(bench.bindir, 'negotiator-guest') in handle.read()  # its default
    installed = subprocess.run([wrapper, '--help'], stdout=subprocess.PIPE, check=True).stdout
    assert installed.startswith(b'Usage: negotiator-guest [OPTIONS]')
    for _, python in bench.pythons:
        single_file = subprocess.run([python, bench.archive, '--help'], stdout=subprocess.PIPE, check=True).stdout
        assert single_file == installed
