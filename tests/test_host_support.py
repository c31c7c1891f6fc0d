"""
Shared fixtures of the negotiator-host tests (no tests here).

- The fake libvirt tree (:class:`FakeLibvirt`) is ``scripts/fake_libvirt.py``, shared with the
  benchmark.
- :class:`FakeGuestAgent`: a real agent (AgentService + Endpoint from negotiator-common)
  listening on a UNIX socket, one client at a time, like QEMU's chardev socket.
- :class:`OddAgent`: the same, answering some methods with canned replies out of the spec
  (a hostile guest).
"""

import atexit
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
import threading
from typing import Dict, List

from negotiator_common.commands import CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport

from fake_libvirt import FakeLibvirt, listening_socket


def short_tempdir() -> str:
    """A temporary directory with a short path (UNIX socket paths are limited to 107 bytes), removed at exit."""
    path = tempfile.mkdtemp(prefix='nh-', dir='/tmp')
    atexit.register(shutil.rmtree, path, True)
    return path


def make_commands_dir(root: str, scripts: Dict[str, str]) -> str:
    """A commands directory with Python scripts (name -> body)."""
    directory = os.path.join(root, 'commands')
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    for name, body in scripts.items():
        path = os.path.join(directory, name)
        with open(path, 'w') as handle:
            handle.write('#!%s\n%s' % (sys.executable, textwrap.dedent(body)))
        os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return directory


GUEST_COMMANDS = {
    'echo-args': '''
        import sys
        sys.stdout.write(' '.join(sys.argv[1:]) + '\\n')
    ''',
    'cat-stdin': '''
        import sys
        sys.stdout.buffer.write(sys.stdin.buffer.read())
    ''',
    'binary': '''
        import sys
        sys.stdout.buffer.write(bytes(range(256)) * 4)
        sys.stderr.buffer.write(b'err\\xff\\n')
    ''',
    'fail': '''
        import sys
        sys.stdout.write('partial\\n')
        sys.stderr.write('it failed\\n')
        sys.exit(3)
    ''',
    'two-lines': '''
        import sys
        sys.stdout.write('one\\ntwo\\n')
        sys.stderr.write('warn\\n')
    ''',
    'sleep': '''
        import sys, time
        time.sleep(float(sys.argv[1]))
        sys.stdout.write('slept\\n')
    ''',
    'whoami-guest': '''
        import os, sys
        sys.stdout.write(os.environ.get('NEGOTIATOR_GUEST', '<unset>') + '\\n')
    ''',
    'bytes': '''
        import sys
        size, block = int(sys.argv[1]), b'x' * 1048576
        while size > 0:
            size -= sys.stdout.buffer.write(block[:size])
    ''',
    'sleep-pid': '''
        import os, sys, time
        open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()
        time.sleep(60)
    ''',
    'flood-pid': '''
        import os, sys
        open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()
        block = b'y' * 65535 + b'\\n'
        while True:
            sys.stdout.buffer.write(block)
    ''',
}


class FakeGuestAgent(object):
    """
    A real negotiator agent serving on a listening UNIX socket: one client at a time, as
    QEMU's chardev socket does. ``policy`` as in AgentService.
    """

    def __init__(self, path: str, commands_dir: str, name: str = 'guest', policy=None) -> None:
        self.path = path
        kwargs = {'policy': policy} if policy else {}
        self.service = AgentService('negotiator-guest', CommandRegistry([commands_dir]), **kwargs)
        self.sock = listening_socket(path)
        self.name = name
        self.connections = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._serve)
        self._thread.daemon = True
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.setblocking(True)
            endpoint = Endpoint(Transport.from_socket(conn), self.dispatcher(), name=self.name)
            endpoint.run()

    def dispatcher(self) -> Dispatcher:
        return self.service.dispatcher()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class OddAgent(FakeGuestAgent):
    """
    An agent that answers the methods named in ``replies`` with those canned results (or raises
    the exception given instead), and the others as a real agent does: a guest that breaks the
    spec (an exit status of 256, a duration of "soon", escape sequences in its names).
    """

    METHODS = ('hello', 'ping', 'list_commands', 'execute')

    def __init__(self, path: str, commands_dir: str, replies: Dict[str, object], name: str = 'odd') -> None:
        self.replies = replies
        super().__init__(path, commands_dir, name=name)

    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher()
        standard = self.service.dispatcher()
        for method in self.METHODS:
            dispatcher.register(method, self._answer(method, standard), inline=method != 'execute')
        return dispatcher

    def _answer(self, method: str, standard: Dispatcher):
        from negotiator_common.protocol import Request

        def answer(params, context):
            if method not in self.replies:
                response = standard.dispatch(Request(context.request_id, method, params), context)
                if response.error is not None:
                    raise response.error
                return response.result
            reply = self.replies[method]
            if isinstance(reply, Exception):
                raise reply
            return reply
        return answer


AGENT_GUESTS = ('alpha', 'béta-2', 'gamma.3')
"""Names of the guests that :func:`start_agents` runs: a plain one, a non-ASCII one, one with a dot."""


def start_odd_agent(fake: 'FakeLibvirt', name: str, number: int, replies: Dict[str, object]) -> OddAgent:
    """An :class:`OddAgent` on the channel socket of a running guest ``name`` (id ``number``) in ``fake``."""
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    agent = OddAgent(fake.socket_path(name, number, 'negotiator-host-to-guest.0'), commands, replies, name=name)
    fake.add_running(name, number)
    return agent


def start_agents(fake: 'FakeLibvirt') -> List['FakeGuestAgent']:
    """Real agents on the channel sockets of three running guests (ids 1 to 3) in ``fake``."""
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    agents = []
    for number, name in enumerate(AGENT_GUESTS, 1):
        path = fake.socket_path(name, number, 'negotiator-host-to-guest.0')
        agents.append(FakeGuestAgent(path, commands, name=name))
        fake.add_running(name, number)
    return agents
