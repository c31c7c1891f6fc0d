"""
``exec`` (issue 15): any program by argv, only where the agent's owner switched it on; a real
agent (AgentService) and a client over a socket pair, real processes, no VM.
"""

import io
import os
import socket
import subprocess
import sys

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    CommandFailed, CommandNotAllowed, CommandNotFound, CommandTimedOut, InvalidParams, LimitExceeded,
    UnsendableRequest,
)
from negotiator_common.exit_status import EXIT_REFUSED, exit_status_for
from negotiator_common.service import EXEC_CAPABILITY, AgentService, Limits
from negotiator_common.transport import Transport


class Pair(object):
    """A client endpoint and an agent serving ``dispatcher`` over a socket pair."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        server_sock, client_sock = socket.socketpair()
        self.server = Endpoint(Transport.from_socket(server_sock), dispatcher, name='agent').start()
        self.endpoint = Endpoint(Transport.from_socket(client_sock), name='client').start()
        self.hello = self.endpoint.handshake(timeout=30)
        self.client = AgentClient(self.endpoint, self.hello)

    def close(self) -> None:
        self.endpoint.close()
        self.server.close()


def _service(allow_exec: bool) -> AgentService:
    return AgentService('negotiator-guest', CommandRegistry([], builtins=False), allow_exec=allow_exec,
                        limits=Limits(max_args=4096))


@pytest.fixture
def allowed():
    pair = Pair(_service(True).dispatcher())
    yield pair
    pair.close()


@pytest.fixture
def refused():
    pair = Pair(_service(False).dispatcher())
    yield pair
    pair.close()


def test_exec_is_announced_only_when_switched_on(allowed, refused):
    assert EXEC_CAPABILITY in allowed.hello['capabilities']
    assert EXEC_CAPABILITY not in refused.hello['capabilities']


def test_switched_off_exec_is_refused_with_77_naming_the_switch(refused):
    with pytest.raises(CommandNotAllowed) as caught:
        refused.client.exec(['/bin/true'])
    assert '--allow-exec' in caught.value.message
    assert exit_status_for(caught.value) == EXIT_REFUSED


def test_an_agent_older_than_exec_is_a_clean_refusal():
    service = _service(True)
    dispatcher = Dispatcher()  # the four methods of an agent of the release before exec
    for name in ('hello', 'ping', 'list_commands', 'execute'):
        dispatcher.register(name, getattr(service, name), inline=name != 'execute')
    pair = Pair(dispatcher)
    try:
        with pytest.raises(CommandNotAllowed) as caught:
            pair.client.exec(['/bin/true'])
    finally:
        pair.close()
    assert 'older than exec' in caught.value.message and '--allow-exec' in caught.value.message


def test_argv_runs_without_a_shell_of_ours(allowed):
    result = allowed.client.exec(['printf', '[%s]', 'a b', '$HOME', "'q'", ';id'])
    assert (result.exit_status, result.stdout) == (0, b"[a b][$HOME]['q'][;id]")
    assert (result.command, result.args) == ('printf', ['[%s]', 'a b', '$HOME', "'q'", ';id'])


def test_a_shell_the_caller_asks_for_with_pipes_quotes_and_its_status(allowed):
    script = "printf '%s\\n' \"it's\" 'a \"b\"' | tr a-z A-Z; echo err >&2; exit 3"
    result = allowed.client.exec(['/bin/sh', '-c', script])
    assert (result.exit_status, result.stdout, result.stderr) == (3, b'IT\'S\nA "B"\n', b'err\n')
    with pytest.raises(CommandFailed) as caught:
        allowed.client.exec(['/bin/sh', '-c', 'exit 4'], check=True)
    assert caught.value.exit_status == 4


def test_streamed_input_and_output_to_files(allowed):
    data = os.urandom(3 * 1024 * 1024 + 5)
    out, err = io.BytesIO(), io.BytesIO()
    result = allowed.client.exec(['/bin/sh', '-c', 'cat; echo done >&2'], input=io.BytesIO(data), stdout=out,
                                 stderr=err, timeout=60)
    assert (result.exit_status, out.getvalue() == data, err.getvalue()) == (0, True, b'done\n')


def test_cwd_and_env(allowed, tmp_path):
    result = allowed.client.exec(['/bin/sh', '-c', 'pwd; echo "$GREETING $PATH"'], cwd=str(tmp_path),
                                 env={'GREETING': 'hi there', 'PATH': '/usr/bin:/bin'})
    assert result.stdout == ('%s\nhi there /usr/bin:/bin\n' % tmp_path).encode()
    assert allowed.client.exec(['pwd']).stdout == b'/\n'


def test_the_agents_own_environment_does_not_leak(allowed, monkeypatch):
    monkeypatch.setenv('AGENT_SECRET', 'x')
    assert b'AGENT_SECRET' not in allowed.client.exec(['env']).stdout


def test_a_missing_program_or_directory_is_refused(allowed, tmp_path):
    with pytest.raises(CommandNotFound):
        allowed.client.exec(['/nonexistent/program'])
    with pytest.raises(CommandNotFound, match='cannot start pwd: its directory %s does not exist' % (
            tmp_path / 'missing')):
        allowed.client.exec(['pwd'], cwd=str(tmp_path / 'missing'))  # the directory named, not the program


def test_a_timeout_kills_the_program(allowed):
    with pytest.raises(CommandTimedOut):
        allowed.client.exec(['/bin/sh', '-c', 'echo started; exec sleep 30'], timeout=2.5)


@pytest.mark.parametrize('params, error', [
    ({'argv': []}, InvalidParams),
    ({'argv': 'ls'}, InvalidParams),
    ({'argv': ['ls', 5]}, InvalidParams),
    ({'argv': ['ls\0']}, InvalidParams),
    ({'argv': ['pwd'], 'cwd': 'relative'}, InvalidParams),
    ({'argv': ['pwd'], 'cwd': '/\0'}, InvalidParams),
    ({'argv': ['pwd'], 'env': {'A=B': 'x'}}, InvalidParams),
    ({'argv': ['pwd'], 'env': {'': 'x'}}, InvalidParams),
    ({'argv': ['pwd'], 'env': {'A': 5}}, InvalidParams),
    ({'argv': ['pwd'], 'env': {'A': 'x' * 5000}}, LimitExceeded),
    ({'argv': ['x' * 5000]}, LimitExceeded),
    # A preload (docs/protocol.rst, "Warm Python") is for a warm Python, and checked whole.
    ({'argv': ['/usr/bin/python3'], 'preload': {'archive': '', 'modules': []}}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': 'lib.zip'}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': {'archive': 'not base64!'}}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': {'archive': 'QUJD' * (3 << 20)}}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': {'archive': '', 'modules': 'os'}}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': {'archive': '', 'modules': ['os; rm']}}, InvalidParams),
    ({'argv': ['/usr/bin/python3'], 'warm': True, 'preload': {'archive': '', 'modules': ['a'] * 3000}},
     InvalidParams),
])
def test_the_agent_checks_every_parameter(allowed, params, error):
    with pytest.raises(error):
        allowed.endpoint.call('exec', params, timeout=10)


def test_the_client_refuses_what_cannot_be_sent(allowed):
    with pytest.raises(UnsendableRequest):
        allowed.client.exec([])
    with pytest.raises(UnsendableRequest):
        allowed.client.exec(['pwd'], env={'A': 'x\0'})
    with pytest.raises(UnsendableRequest):
        allowed.client.exec(['x' * 5000])


def test_the_guest_cli_takes_allow_exec_with_daemon_only():
    from negotiator_guest.cli import parse_options
    from negotiator_common.cli_support import UsageError
    assert parse_options(['--daemon', '--allow-exec']).allow_exec
    assert not parse_options(['--daemon']).allow_exec
    with pytest.raises(UsageError):
        parse_options(['--allow-exec', '--list-commands'])
    usage = subprocess.run([sys.executable, '-m', 'negotiator_guest', '--help'], stdout=subprocess.PIPE,
                           check=True).stdout
    assert b'--allow-exec' in usage
