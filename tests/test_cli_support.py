"""The option handling that negotiator-host and negotiator-guest share."""

import pytest

from negotiator_common.cli_support import UsageError, apply_shared_option, parse_timeout, split_command


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


def test_execute_is_split_as_a_shell_would_without_a_shell():
    assert split_command("greet 'a b' \"c;d\" $(id)") == ['greet', 'a b', 'c;d', '$(id)']
    for value in ['', '   ', "unterminated 'quote"]:
        with pytest.raises(UsageError):
            split_command(value)
