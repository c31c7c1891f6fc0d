"""The negotiator-guest command line: parsing, usage text and the exit status table."""

import json
import os
import subprocess
import sys

import pytest

from negotiator_common.errors import (
    CallTimeout, ChannelBusy, ChannelNotFound, CommandNotAllowed, CommandNotFound, CommandTimedOut,
    ConnectionClosed, InternalError, InvalidRequest,
)
from negotiator_common.exit_status import EXIT_REFUSED, EXIT_SOFTWARE, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from negotiator_guest import cli


def test_execute_is_split_with_shlex():
    options = cli.parse_options(['-e', "backup --name 'my host' \"a b\""])
    assert options.action == 'execute'
    assert options.command == ['backup', '--name', 'my host', 'a b']


def test_long_and_short_spellings():
    options = cli.parse_options(['--execute=uptime', '--stdin', '--timeout=2.5', '--json',
                                   '--character-device=/dev/vport1p2', '-v', '-v', '-q'])
    assert (options.command, options.stdin, options.timeout, options.json, options.character_device,
            options.verbosity) == (['uptime'], True, 2.5, True, '/dev/vport1p2', 1)
    options = cli.parse_options(['-d', '--commands-dir', '/a', '--commands-dir=/b', '--syslog'])
    assert options.action == 'daemon' and options.commands_dirs == ['/a', '/b'] and options.syslog
    assert cli.parse_options(['-l']).action == 'list-commands'


def test_timeout_default_zero_and_bad_values():
    assert cli.parse_options(['-l']).timeout == 10.0
    assert cli.parse_options(['-l', '-t', '0']).timeout is None
    for bad in ('-1', 'soon', 'nan', 'inf', '2 fortnights'):
        with pytest.raises(cli.UsageError):
            cli.parse_options(['-l', '-t', bad])


def test_timeout_takes_a_timespan():
    assert cli.parse_options(['-l', '-t', '90s']).timeout == 90.0
    assert cli.parse_options(['-l', '--timeout=2m']).timeout == 120.0


@pytest.mark.parametrize('arguments', [['-d', '-l'], ['-e', ''], ['-e', "'unclosed"], ['-l', 'stray'], ['--bogus']])
def test_usage_errors_exit_64(arguments, capsys):
    assert cli.run(arguments) == EXIT_USAGE == 64
    err = capsys.readouterr().err
    assert err.startswith('negotiator-guest: ') and '--help' in err and len(err.splitlines()) == 1


def test_help_is_the_module_docstring(capsys):
    assert cli.run(['--help']) == 0
    out = capsys.readouterr().out
    for spelling in ('--daemon', '--list-commands', '--execute=COMMAND', '--stdin', '--timeout=SECONDS', '--json',
                     '--character-device=PATH', '--commands-dir=DIR', '--verbose', '--quiet'):
        assert spelling in out
    for status in ('64', '69', '70', '75', '77'):
        assert '  %s  ' % status in out


@pytest.mark.parametrize('error, status', [
    (ChannelNotFound('x'), 69), (ChannelBusy('x'), 69), (ConnectionClosed('x'), 69),
    (CallTimeout('x'), 75), (CommandTimedOut('x'), 75),
    (CommandNotFound('x'), 77), (CommandNotAllowed('x'), 77),
    (InternalError('x'), 70), (InvalidRequest('x'), 70),
])
def test_exit_status_table(error, status):
    assert cli.exit_status_for(error) == status


def test_docs_list_the_same_exit_statuses():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, 'docs', 'guest.rst')) as handle:
        docs = handle.read()
    for status in (EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_SOFTWARE, EXIT_TIMEOUT, EXIT_REFUSED):
        assert '``%d``' % status in docs


def test_importing_the_cli_is_lazy():
    # The CLI module must not pull in coloredlogs, executor or the protocol before it needs them.
    code = ('import sys, negotiator_guest.cli; '
            'print(sorted(m for m in ("coloredlogs", "executor", "negotiator_common.endpoint") if m in sys.modules))')
    output = subprocess.check_output([sys.executable, '-c', code])
    assert output.strip() == b'[]'


def test_python_dash_m_runs_the_program(tmp_path):
    # The same entry as the negotiator-guest script, as `python -m negotiator_host` is for the host.
    process = subprocess.run([sys.executable, '-m', 'negotiator_guest', '--help'], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=60)
    assert process.returncode == 0 and b'Usage: negotiator-guest' in process.stdout, process.stderr
    process = subprocess.run([sys.executable, '-m', 'negotiator_guest', '-j', '-l', '-c', str(tmp_path / 'vport9p9')],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert process.returncode == 69 and json.loads(process.stdout.decode())['exit_status'] == 69


@pytest.mark.parametrize('closed', [0, 1, 2])
def test_a_closed_standard_stream_is_no_traceback(tmp_path, closed):
    # Each descriptor closed in turn: the program runs as with /dev/null there (its status stays 69).
    process = subprocess.run([sys.executable, '-m', 'negotiator_guest', '-j', '-l', '-c', str(tmp_path / 'vport9p9')],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(closed),
                             timeout=60)
    assert process.returncode == 69 and b'Traceback' not in process.stderr, process.stderr


def test_json_failure_shape(tmp_path, capsys):
    missing = str(tmp_path / 'vport9p9')
    assert cli.run(['--json', '-l', '-c', missing]) == 69
    failure = json.loads(capsys.readouterr().out)
    assert failure == {'exit_status': 69, 'error': {'type': 'ChannelNotFound', 'code': ChannelNotFound.code,
                                                    'message': failure['error']['message'], 'data': {'path': missing}}}
    assert failure['error']['message'].startswith(missing + ' does not exist')
