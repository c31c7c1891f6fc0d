"""The protocol specification (docs/protocol.rst) and the code agree: its examples run for real."""

import json
import os
import re
import socket

import pytest

from negotiator_common import errors
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport

SPEC = os.path.join(os.path.dirname(__file__), '..', 'docs', 'protocol.rst')
VOLATILE = {'time', 'duration'}  # values that differ at every run: only their type is compared


def spec_text():
    with open(SPEC, encoding='utf-8') as handle:
        return handle.read()


def exchanges():
    """Each example block: the lines sent (-->) and the lines expected back (<--)."""
    blocks = []
    for block in re.findall(r'\.\. code-block:: text\n\n((?:     .*\n)+)', spec_text()):
        sent, received = [], []
        for line in block.splitlines():
            line = line.strip()
            (sent if line.startswith('-->') else received).append(json.loads(line[3:]))
        blocks.append((sent, received))
    return blocks


def normalise(value):
    if isinstance(value, dict):
        return {k: (type(v).__name__ if k in VOLATILE else normalise(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


@pytest.fixture
def raw_agent(tmp_path):
    commands = tmp_path / 'commands'
    commands.mkdir()
    greet = commands / 'greet'
    greet.write_text('#!/bin/sh\necho "hello $1"\nexec cat\n')
    os.chmod(str(greet), 0o755)
    os.chmod(str(commands), 0o755)
    service = AgentService('negotiator-guest', CommandRegistry([str(commands)]))
    server_sock, client_sock = socket.socketpair()
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='spec').start()
    client_sock.settimeout(10)
    yield client_sock
    server.close()
    client_sock.close()


def test_the_spec_has_examples_of_every_method():
    methods = {message['method'] for sent, _ in exchanges() for message in sent}
    assert methods == {'hello', 'ping', 'list_commands', 'execute', 'exec', 'cancel'}


@pytest.mark.parametrize('index', range(len(exchanges())))
def test_example_exchange_runs_as_documented(raw_agent, index):
    sent, expected = exchanges()[index]
    for message in sent:
        raw_agent.sendall(json.dumps(message).encode('utf-8') + b'\n')
    buffered = b''
    while buffered.count(b'\n') < len(expected):
        buffered += raw_agent.recv(65536)
    received = [json.loads(line) for line in buffered.splitlines()]
    assert normalise(received) == normalise(expected)


def test_error_table_matches_the_code():
    rows = re.findall(r'^(-32\d\d\d)\s+(\w+)\s', spec_text(), re.MULTILINE)
    documented = {int(code): name for code, name in rows}
    in_code = {code: cls.__name__ for code, cls in errors.ERROR_CLASSES.items()}
    assert documented == in_code
