"""The option handling, logging and output that negotiator-host and negotiator-guest share."""

import logging

import pytest

from negotiator_common.cli_support import (
    MAX_TIMEOUT_OPTION, UsageError, apply_shared_option, format_commands, error_object, json_failure, parse_timeout,
    setup_logging, split_command,
)
from negotiator_common.client import CommandDescription
from negotiator_common.errors import CommandTimedOut
from negotiator_common.exit_status import EXIT_USAGE, exit_status_for


class Options(object):
    def __init__(self):
        self.stdin = self.json = False
        self.timeout = 10.0
        self.commands_dirs = []
        self.verbosity = 0


def test_shared_options_have_one_meaning():
    options = Options()
    for option, value in [('-i', ''), ('--timeout', '2.5'), ('-j', ''), ('--commands-dir', '/a'),
                          ('--commands-dir', '/b'), ('-v', ''), ('-v', ''), ('-q', '')]:
        assert apply_shared_option(options, option, value)
    assert (options.stdin, options.timeout, options.json, options.commands_dirs, options.verbosity) == \
        (True, 2.5, True, ['/a', '/b'], 1)
    assert not apply_shared_option(options, '--daemon', '')


@pytest.mark.parametrize('value', ['x', '-1', 'nan', 'inf'])
def test_bad_timeouts_are_usage_errors(value):
    with pytest.raises(UsageError):
        parse_timeout(value)


def test_zero_timeout_means_no_bound():
    assert parse_timeout('0') is None


@pytest.mark.parametrize('value, seconds', [
    ('2.5', 2.5), ('.5', 0.5), ('1e3', 1000.0), ('90s', 90.0), ('2m', 120.0), ('1.5 minutes', 90.0), ('1h', 3600.0),
    ('365 days', MAX_TIMEOUT_OPTION),
])
def test_timeouts_are_seconds_or_timespans(value, seconds):
    assert parse_timeout(value) == seconds


def test_timespans_beyond_a_year_or_unreadable_are_refused_clearly():
    with pytest.raises(UsageError, match='up to 31536000 seconds'):
        parse_timeout('2 years')
    with pytest.raises(UsageError, match='a number of seconds or a timespan like 90s or 2m'):
        parse_timeout('2m30s')


def test_a_wrong_command_line_has_the_usage_status():
    assert exit_status_for(UsageError('x')) == EXIT_USAGE == 64


def test_the_json_shape_of_a_failure():
    error = CommandTimedOut('ran too long', {'signal': 15})
    assert json_failure(error, 75) == {'exit_status': 75, 'error': {
        'type': 'CommandTimedOut', 'code': CommandTimedOut.code, 'message': 'ran too long', 'data': {'signal': 15}}}
    assert error_object(ConnectionRefusedError()) == {'type': 'ConnectionRefusedError', 'code': None,
                                                      'message': 'ConnectionRefusedError', 'data': {}}


def test_the_commands_are_listed_in_columns_after_their_guest_when_asked():
    commands = [CommandDescription('uptime', True, 'how long it runs'), CommandDescription('greet', False, '')]
    assert format_commands(commands) == 'uptime  how long it runs\ngreet\n'
    assert format_commands(commands, ['web-1', 'db']) == 'web-1: uptime  how long it runs\ndb: greet\n'
    assert format_commands([]) == ''


@pytest.fixture
def root_logging():
    """setup_logging configures the root logger and executor's: put both back afterwards."""
    root, executor_logger = logging.getLogger(), logging.getLogger('executor')
    saved = root.handlers[:], root.level, executor_logger.level
    yield root
    root.handlers[:], root.level = saved[0], saved[1]
    executor_logger.setLevel(saved[2])


@pytest.mark.parametrize('verbosity, daemon, level', [
    (0, True, logging.INFO), (1, True, logging.DEBUG), (-1, True, logging.WARNING),
    (1, False, logging.INFO), (2, False, logging.DEBUG), (-1, False, logging.ERROR), (9, False, logging.DEBUG),
])
def test_each_v_or_q_is_one_standard_level(root_logging, verbosity, daemon, level):
    # executor defines verboselogs' levels (NOTICE, VERBOSE, ...): a -v must still reach the next level we log at.
    import executor  # noqa: F401
    assert logging.getLevelName(25) == 'NOTICE'
    setup_logging(verbosity, daemon=daemon)
    import coloredlogs
    assert coloredlogs.get_level() == level


def test_execute_is_split_as_a_shell_would_without_a_shell():
    assert split_command("greet 'a b' \"c;d\" $(id)") == ['greet', 'a b', 'c;d', '$(id)']
    for value in ['', '   ', "unterminated 'quote"]:
        with pytest.raises(UsageError):
            split_command(value)
