"""
The parts of scripts/benchmark that run without a VM: its workloads and its floor client.

The benchmark itself boots a guest and is run by hand (docs/benchmark.rst); these tests keep
what its figures rest on honest between runs: each guest command makes exactly the output
its figure says, and the "floor of any Python client" program gets the same listing from a
real agent as ``negotiator-host --list-commands`` does.
"""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys

import pytest

from negotiator_host import GuestChannel
from support import FakeGuestAgent, short_tempdir

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


def run(commands, name, *args):
    return subprocess.run([os.path.join(commands, name)] + list(args), stdout=subprocess.PIPE, check=True).stdout


def test_the_workloads_make_what_their_figures_say(benchmark, commands):
    assert run(commands, 'hello') == b'hello from the guest\n'
    assert run(commands, 'ddout', '2') == bytes(2 * benchmark.MIB)  # the raw reference's producer
    text = run(commands, 'bigout', '100000')
    assert len(text) == 100000 and text.startswith((benchmark.LINE + '\n').encode())
    assert run(commands, 'bigout-null', '100000') == b''


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
