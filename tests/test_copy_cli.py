"""
``negotiator-host --copy`` as a subprocess (real exit statuses and byte streams), against real
agents in a fake libvirt: scp's way of writing a guest's path, ``-`` for standard input and
output, ``-r``, the statuses of each failure, and the progress bar (only on a terminal, only
for a transfer that lasts).
"""

import io
import os
import subprocess
import sys

import pytest

from fake_libvirt import FakeLibvirt
from negotiator_common.cli_support import UsageError
from negotiator_host.copying import ProgressBar, plan_copy, split_guest_path
from support import FakeGuestAgent, GUEST_COMMANDS, make_commands_dir


@pytest.fixture
def world(monkeypatch, tmp_path):
    """Guest alpha allows files under tmp_path/guest; guest beta has file access off."""
    fake = FakeLibvirt().activate(monkeypatch)
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    (tmp_path / 'guest').mkdir()
    (tmp_path / 'host').mkdir()
    agents = []
    for number, (name, files) in enumerate((('alpha', [str(tmp_path / 'guest')]), ('beta', None)), 1):
        fake.add_running(name, number)
        agents.append(FakeGuestAgent(fake.socket_path(name, number, 'negotiator-host-to-guest.0'), commands,
                                     name=name, files=files if files is not None else []))
    agents[1].service.files.prefixes = None  # the switch off: refused, not missing
    yield fake
    for agent in agents:
        agent.stop()
    fake.cleanup()


def run_cli(fake, *args, stdin=b''):
    process = subprocess.run([sys.executable, '-m', 'negotiator_host', '--direct'] + list(args), input=stdin,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fake.environ, timeout=60)
    return process.returncode, process.stdout, process.stderr


def test_push_and_pull_as_scp_writes_them(world, tmp_path):
    source = tmp_path / 'host' / 'app.conf'
    source.write_bytes(b'key = value\n')
    status, out, err = run_cli(world, '--copy', str(source), 'alpha:%s/' % (tmp_path / 'guest'))
    assert (status, out, err) == (0, b'', b'')
    assert (tmp_path / 'guest' / 'app.conf').read_bytes() == b'key = value\n'
    status, _, err = run_cli(world, '--copy', 'alpha:%s' % (tmp_path / 'guest' / 'app.conf'),
                             str(tmp_path / 'host' / 'copy.conf'))
    assert status == 0, err
    assert (tmp_path / 'host' / 'copy.conf').read_bytes() == b'key = value\n'


def test_standard_input_and_output(world, tmp_path):
    data = os.urandom(300000)
    status, _, err = run_cli(world, '--copy', '-', 'alpha:%s' % (tmp_path / 'guest' / 'blob'), stdin=data)
    assert status == 0, err
    status, out, err = run_cli(world, '--copy', 'alpha:%s' % (tmp_path / 'guest' / 'blob'), '-')
    assert (status, out) == (0, data)


def test_recursive_copies_trees_both_ways(world, tmp_path):
    tree = tmp_path / 'host' / 'tree'
    (tree / 'sub').mkdir(parents=True)
    (tree / 'sub' / 'f').write_bytes(b'f')
    os.symlink('sub/f', str(tree / 'link'))
    status, _, err = run_cli(world, '--copy', '-r', str(tree), 'alpha:%s' % (tmp_path / 'guest'))
    assert status == 0, err
    assert os.readlink(str(tmp_path / 'guest' / 'tree' / 'link')) == 'sub/f'
    (tmp_path / 'back').mkdir()
    status, _, err = run_cli(world, '--copy', '--recursive', 'alpha:%s' % (tmp_path / 'guest' / 'tree'),
                             str(tmp_path / 'back'))
    assert status == 0, err
    assert (tmp_path / 'back' / 'tree' / 'sub' / 'f').read_bytes() == b'f'


@pytest.mark.parametrize('case, status', [
    ('missing', 66), ('off', 77), ('outside', 77), ('directory-without-r', 73), ('usage', 64)])
def test_each_failure_has_its_status_and_names_the_path(world, tmp_path, case, status):
    guest = tmp_path / 'guest'
    args = {'missing': ['alpha:%s/nothing' % guest, str(tmp_path / 'host')],
            'off': ['-', 'beta:%s/f' % guest],
            'outside': ['-', 'alpha:%s/f' % (tmp_path / 'host')],
            'directory-without-r': [str(tmp_path / 'host'), 'alpha:%s/' % guest],
            'usage': ['alpha:/a', 'beta:/b']}[case]
    got, _, err = run_cli(world, '--copy', *args)
    assert got == status, err
    if case == 'missing':
        assert b'nothing' in err and b'No such file' in err
    if case == 'off':
        assert b'--allow-files' in err
    assert os.listdir(str(guest)) == []


def test_max_size_stops_a_pull_with_status_74_and_leaves_nothing(world, tmp_path):
    (tmp_path / 'guest' / 'big').write_bytes(os.urandom(3 * 1024 * 1024))
    status, _, err = run_cli(world, '--copy', '--max-size', '1M', 'alpha:%s' % (tmp_path / 'guest' / 'big'),
                             str(tmp_path / 'host'))
    assert status == 74, err
    assert err.startswith(b'negotiator-host: ') and b'more than the 1048576 bytes allowed' in err
    assert os.listdir(str(tmp_path / 'host')) == []
    status, _, err = run_cli(world, '--copy', '--max-size', '3M', 'alpha:%s' % (tmp_path / 'guest' / 'big'),
                             str(tmp_path / 'host'))
    assert status == 0, err
    assert (tmp_path / 'host' / 'big').read_bytes() == (tmp_path / 'guest' / 'big').read_bytes()


@pytest.mark.parametrize('args, message', [
    (['--copy', '--max-size', '1M', '-', 'alpha:/srv/f'], b'--max-size bounds a copy from a guest'),
    (['--max-size', '1M', '--ping', 'alpha'], b'--max-size is an option of --copy'),
    (['--copy', '--max-size', 'lots', 'alpha:/f', '.'], b'--max-size needs a number of bytes')])
def test_max_size_is_refused_where_it_means_nothing(world, args, message):
    status, _, err = run_cli(world, *args)
    assert status == 64 and message in err, err


@pytest.mark.parametrize('operand, expected', [
    ('web-1:/etc/hosts', ('web-1', '/etc/hosts')), ('./a:b', (None, './a:b')), ('/x/a:b', (None, '/x/a:b')),
    ('-', (None, '-')), ('plain', (None, 'plain')), (':x', (None, ':x'))])
def test_a_guests_path_is_read_as_scp_reads_it(operand, expected):
    assert split_guest_path(operand) == expected


@pytest.mark.parametrize('operands', [['a'], ['a', 'b'], ['g:/a', 'h:/b'], ['g:/a', 'x', 'g:/b'], ['x', 'g:rel'],
                                      ['-', '-', 'g:/t'], ['g:/a', 'g:/b', '-']])
def test_copies_that_are_not_between_the_host_and_one_guest_are_usage_errors(operands):
    with pytest.raises(UsageError):
        plan_copy(operands)


def test_several_sources_go_into_a_directory_of_the_guest():
    plan = plan_copy(['a', 'b', 'g:/srv'])
    assert (plan.guest, plan.pushing, plan.sources, plan.target) == ('g', True, ['a', 'b'], '/srv/')


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_shows_on_a_terminal_only_after_a_moment():
    now = [0.0]
    terminal = Terminal()
    bar = ProgressBar('big.iso', terminal, clock=lambda: now[0])
    bar(1000, 10000)
    assert terminal.getvalue() == ''  # a quick transfer draws nothing
    now[0] = 2.0
    bar(5000, 10000)
    assert 'big.iso' in terminal.getvalue() and '50%' in terminal.getvalue()
    bar.close()
    assert terminal.getvalue().endswith('\r\x1b[K')
    piped = io.StringIO()
    bar = ProgressBar('big.iso', piped, clock=lambda: now[0])
    now[0] = 10.0
    bar(5000, None)
    bar.close()
    assert piped.getvalue() == ''
