"""
negotiator_host.oneshot: which command lines take the quick way through the host daemon (the
rest go to the full CLI before anything is sent). Its calls themselves are proven through a
daemon in tests/test_host_clients_daemon.py, and on real guests by tests/test_e2e_shared.py.
"""

import pytest

from negotiator_host.local_socket import DEFAULT_SOCKET
from negotiator_host.oneshot import DEFAULT_TIMEOUT, plain_call


@pytest.mark.parametrize('argv,expected', [
    (['--execute=uptime', 'web-1'], (['uptime'], 'web-1', DEFAULT_TIMEOUT, DEFAULT_SOCKET)),
    (['web-1', '-e', 'df  -h /'], (['df', '-h', '/'], 'web-1', DEFAULT_TIMEOUT, DEFAULT_SOCKET)),
    (['-edf', 'web-1', '-t', '2.5'], (['df'], 'web-1', 2.5, DEFAULT_SOCKET)),
    (['-t3', '--execute', 'x', '--socket=/s', 'web-1'], (['x'], 'web-1', 3.0, '/s')),
    (['--timeout=4', '--socket', '/s', '-e', 'x', 'web-1'], (['x'], 'web-1', 4.0, '/s')),
])
def test_the_plainest_calls_take_the_quick_way(argv, expected, monkeypatch):
    monkeypatch.delenv('NEGOTIATOR_HOST_SOCKET', raising=False)
    assert plain_call(argv) == expected


@pytest.mark.parametrize('argv', [
    ['--execute=uptime'],                              # no guest
    ['--execute=uptime', 'web-1', 'web-2'],            # two guests
    ['-e', 'uptime', '-e', 'date', 'web-1'],           # twice (the full CLI takes the last)
    ['--execute=echo "a b"', 'web-1'],                 # quoting: the full CLI splits it
    ["--execute=echo a\\ b", 'web-1'],                 # a backslash
    ['--execute=echo\ta', 'web-1'],                    # a tab
    ['--execute=  ', 'web-1'],                         # no command
    ['--execute=x', '-t', '0', 'web-1'],               # no bound: the full CLI
    ['--execute=x', '-t', '1m', 'web-1'],              # a timespan
    ['--execute=x', '-t', 'nan', 'web-1'],
    ['--execute=x', '--socket=', 'web-1'],             # --socket '' is a usage error there
    ['--execute=x', '--direct', 'web-1'],
    ['--execute=x', '-v', 'web-1'],
    ['--execute=x', '--stdin', 'web-1'],
    ['--execute=x', '--json', 'web-1'],
    ['--exec=x', 'web-1'],                             # an abbreviation
    ['--execute=x', '--', 'web-1'],
    ['--execute=x', '-', 'web-1'],
    ['--execute=x', 'web-\udcff'],                    # a name that is not UTF-8
    ['--execute=x' + ' y' * 2048, 'web-1'],            # over MAX_COMMAND: checked against the agent's limits
    ['-p', 'web-1'],
    [],
])
def test_every_other_command_line_goes_the_full_way(argv):
    assert plain_call(argv) is None
