"""
The library's promise: importing and using it prints nothing, whatever it logs, until a program
configures logging (``negotiator_common/__init__.py``, :mod:`negotiator_common.lazylog`).
"""

import os
import re
import subprocess
import sys

# Run in a fresh interpreter, where nothing has imported or configured logging: each step logs
# a warning or more (a refused commands directory, a failed rescan, a bad line, refused
# commands) that logging's last resort would print to stderr.
USE_THE_LIBRARY = r'''
import os, socket, sys, tempfile

from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import CommandNotFound
from negotiator_common.runner import run_process
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport
from negotiator_guest.client import HostClient
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths

assert 'logging' not in sys.modules, 'importing the library imported logging'
directory = tempfile.mkdtemp()
os.chmod(directory, 0o777)  # world-writable: refused, with "Refusing ..." at WARNING
assert [c.name for c in CommandRegistry([directory], builtins=False).list()] == []
assert run_process(['/bin/sh', '-c', 'echo out; echo err >&2; exit 3']).exit_status == 3

service = AgentService('negotiator-guest', CommandRegistry([directory]), policy=lambda peer, name: False)
server_sock, client_sock = socket.socketpair()
server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='host').start()
client = Endpoint(Transport.from_socket(client_sock), name='guest').start()
agent = AgentClient(client, client.handshake(timeout=30))
agent.ping(timeout=10)
try:
    agent.execute('hostname', timeout=10)  # refused by the policy: a warning
except CommandNotFound:
    pass
else:
    raise AssertionError('the policy let hostname run')
client.close()
assert server.wait_closed(10)
server_sock, raw = socket.socketpair()
server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='host').start()
raw.sendall(b'{"not json\n')  # a bad line: the server warns about it, and answers
assert b'"error"' in raw.recv(65536)
raw.close()
assert server.wait_closed(10)

# The host and guest packages: a rescan without virsh warns; a guest client without a port raises.
daemon = HostDaemon(commands_dirs=[directory], watch=False, paths=LibvirtPaths(directory, directory))
daemon.rescan()
try:
    HostClient(character_device=os.path.join(directory, 'no-such-port'), timeout=2).ping()
except Exception:
    pass
assert 'logging' in sys.modules, 'nothing was logged: this test proves nothing'
'''


def test_using_the_library_prints_nothing(tmp_path):
    environment = dict(os.environ, PATH=str(tmp_path))  # no virsh on it
    finished = subprocess.run([sys.executable, '-c', USE_THE_LIBRARY], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environment, timeout=120)
    assert (finished.returncode, finished.stdout, finished.stderr) == (0, b'', b'')


def library_modules():
    """Every module of the three packages but the CLIs (which configure logging) and lazylog itself."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ('negotiator-common/negotiator_common', 'negotiator-host/negotiator_host',
                    'negotiator-guest/negotiator_guest'):
        directory = os.path.join(root, package)
        for name in sorted(os.listdir(directory)):
            if name.endswith('.py') and name not in ('cli.py', 'cli_support.py', 'lazylog.py'):
                yield os.path.join(package, name), os.path.join(directory, name)


def test_library_modules_take_their_loggers_from_lazylog():
    # The run above cannot catch every module with a logger of its own: once lazylog has made one
    # real logger of a package, the package has its NullHandler, and such a module prints nothing
    # in that run (though it would in a program that used it first). So the rule is checked too.
    offenders = []
    for name, path in library_modules():
        with open(path, encoding='utf-8') as handle:
            text = handle.read()
        if re.search(r'^\s*(import logging|from logging import)|logging\.getLogger\(', text, re.MULTILINE):
            offenders.append(name)
    assert offenders == []
