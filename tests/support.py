"""
What the tests share (no tests here). Waiting on conditions is in ``waiting.py``, the fake
libvirt in ``fake_libvirt.py``.

- :func:`short_tempdir`, :func:`listening_socket`: places for UNIX sockets.
- :func:`write_command`, :func:`make_commands_dir`, :data:`GUEST_COMMANDS`: commands for an
  agent to run.
- :class:`FakeGuestAgent`: a real agent (AgentService + Endpoint from negotiator-common)
  listening on a UNIX socket, one client at a time, like QEMU's chardev socket.
- :class:`OddAgent`: the same, answering some methods with canned replies out of the spec
  (a hostile guest).
- :class:`FakeGuestSide`: the guest end of a guest-to-host channel, for the host daemon.
- :class:`FakeHostDaemon`: a FAKE of the host daemon's local socket, for the tests of its clients.
- :data:`OUTPUT_WITH_AN_ARRAY_ID`: the line that once killed a reader.
- :func:`result_or_error`: a call's result or the exception it raised, for calls on threads.
- :func:`interpreter`, :data:`SUPPORTED_PYTHONS`, :data:`GUEST_PYTHONS`, :func:`build_zipapp`: the
  single-file guest agent (``scripts/build-guest-agent``) and the Pythons it must run on.
"""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import pytest

from negotiator_common import processes
from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ChannelNotFound, CommandNotAllowed
from negotiator_common.protocol import Response, encode_message
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport

from fake_libvirt import listening_socket
from switch_agent import find_python

if TYPE_CHECKING:
    from fake_libvirt import FakeLibvirt


def short_tempdir() -> str:
    """A temporary directory with a short path (UNIX socket paths are limited to 107 bytes), removed at exit."""
    path = tempfile.mkdtemp(prefix='nh-', dir='/tmp')
    atexit.register(shutil.rmtree, path, True)
    return path


def write_command(directory, name: str, script: str, mode: int = 0o755) -> str:
    """
    An executable ``directory/name`` (its path): ``script`` is the file's whole text if it
    starts with ``#!``, else the body of a shell script, which gets ``#!/bin/sh`` first.
    """
    path = os.path.join(str(directory), name)
    if not script.startswith('#!'):
        script = '#!/bin/sh\n' + script + '\n'
    with open(path, 'w') as handle:
        handle.write(script)
    os.chmod(path, mode)
    return path


WAITING_PROLOGUE = 'import sys\nsys.path.insert(0, %r)\nfrom waiting import wait_until\n' % os.path.dirname(
    os.path.abspath(__file__))
"""Put first in a command's script: its ``wait_until`` is the tests' own (tests/waiting.py)."""


def make_commands_dir(root: str, scripts: Dict[str, str]) -> str:
    """A commands directory with Python scripts (name -> body; a body may call ``wait_until``)."""
    directory = os.path.join(root, 'commands')
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    for name, body in scripts.items():
        write_command(directory, name, '#!%s\n%s%s' % (sys.executable, WAITING_PROLOGUE, textwrap.dedent(body)))
    return directory


GUEST_COMMANDS = {
    'sha-stdin': '''
        import hashlib, os, sys
        gate = sys.argv[1] if len(sys.argv) > 1 else None
        wait_until(lambda: not gate or os.path.exists(gate), timeout=60, interval=0.01)
        digest, size = hashlib.sha256(), 0
        for chunk in iter(lambda: sys.stdin.buffer.read1(1048576), b''):
            digest.update(chunk)
            size += len(chunk)
        sys.stdout.write('%s %d\\n' % (digest.hexdigest(), size))
    ''',
    'close-stdin': '''
        import os, sys
        os.close(0)
        sys.stdout.write('closed\\n')
    ''',
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
        time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
    ''',
    'rendezvous': '''
        import os, sys
        directory, count = sys.argv[1], int(sys.argv[2])
        open(os.path.join(directory, str(os.getpid())), 'w').close()
        if not wait_until(lambda: len(os.listdir(directory)) >= count, timeout=20, interval=0.01):
            sys.exit('only %d of %d met' % (len(os.listdir(directory)), count))
        sys.stdout.write('met\\n')
    ''',
    'log-run': '''
        import os, sys
        log, tag = sys.argv[1], sys.argv[2]
        with open(log, 'a') as handle:
            handle.write(tag + '\\n')
        gate = sys.argv[3] if len(sys.argv) > 3 else None
        wait_until(lambda: not gate or os.path.exists(gate), timeout=20, interval=0.01)
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
    QEMU's chardev socket does. ``policy``, ``limits`` and ``allow_exec`` as in AgentService (its
    ``max_in_flight`` bounds each connection), ``files`` the prefixes of ``--allow-files``
    (None: no file service at all). ``endpoint`` is the connection served now;
    :meth:`stop` closes it too (the agent dies), and the socket file goes.
    """

    def __init__(self, path: str, commands_dir: str, name: str = 'guest', policy=None, limits=None,
                 files=None, allow_exec: bool = False) -> None:
        self.path = path
        kwargs = {'policy': policy} if policy else {}
        if files is not None:  # the prefixes of --allow-files
            from negotiator_common.fileservice import FileService
            kwargs['files'] = FileService(files)
        self.service = AgentService('negotiator-guest', CommandRegistry([commands_dir]), limits=limits,
                                    allow_exec=allow_exec, **kwargs)
        self.sock = listening_socket(path)
        self.name = name
        self.connections = 0
        self.endpoint: Optional[Endpoint] = None
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
            self.endpoint = Endpoint(Transport.from_socket(conn), self.dispatcher(), name=self.name,
                                     max_concurrent=self.service.limits.max_in_flight)
            self.endpoint.run()

    def dispatcher(self) -> Dispatcher:
        return self.service.dispatcher()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.endpoint is not None:
            self.endpoint.close('the agent stopped')
        if os.path.exists(self.path):
            os.unlink(self.path)


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


class FakeGuestSide(object):
    """The guest end of a guest-to-host channel: a listening socket that the daemon connects to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = listening_socket(path)
        self.sock.settimeout(10)
        self.endpoint: Optional[Endpoint] = None

    def accept(self, timeout: float = 10) -> AgentClient:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.setblocking(True)
        self.endpoint = Endpoint(Transport.from_socket(conn), name='host').start()
        self.endpoint.handshake(30, agent='negotiator-guest')
        return AgentClient(self.endpoint)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.sock.close()


class FakeHostDaemon(object):
    """
    A FAKE of ``negotiator-host --daemon``'s local socket, for the tests of its clients (the CLI
    and GuestChannel), not a model of the daemon: ``hello`` without ``guest`` lists the guests of
    ``agents`` (name -> the agent's socket) but those ``refused``; ``hello`` naming a refused
    guest gets CommandNotAllowed, one not in ``agents`` ChannelNotFound, and one in it attaches:
    that hello goes to the agent's socket, its answer comes back with ``via`` added, and then the
    bytes flow both ways unchanged. One agent connection per client: no sharing, no id mapping.
    ``attached`` lists the guest of each attach, ``refusals`` counts the refused hellos.
    """

    def __init__(self, path: str, agents: Dict[str, str], refused: Sequence[str] = ()) -> None:
        self.path = path
        self.agents = agents
        self.refused = set(refused)
        self.attached: List[str] = []
        self.refusals = 0
        self.sock = listening_socket(path)
        self._sockets: List[socket.socket] = []
        thread = threading.Thread(target=self._accept, name='fake-host-daemon')
        thread.daemon = True
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setblocking(True)
            self._sockets.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name='fake-host-daemon-client')
            thread.daemon = True
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """Answer hellos until one attaches (then pass bytes) or the client goes."""
        buffered = b''
        try:
            while True:
                line, buffered = _read_line(conn, buffered)
                if line is None:
                    return
                if not line.strip():
                    continue
                request = json.loads(line.decode('utf-8'))
                guest = (request.get('params') or {}).get('guest')
                if guest is not None and guest not in self.refused and guest in self.agents:
                    self._attach(conn, guest, line, buffered)
                    return
                conn.sendall(encode_message(self._answer(request['id'], guest)))
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def _answer(self, request_id: object, guest: Optional[str]) -> Response:
        if guest is None:
            listed = [{'name': name, 'connected': True} for name in self.agents if name not in self.refused]
            return Response(request_id, result={'agent': 'negotiator-host-daemon', 'version': 'fake',
                                                'guests': listed})
        if guest in self.refused:
            self.refusals += 1
            return Response(request_id, error=CommandNotAllowed('this user may not use %s' % guest))
        return Response(request_id, error=ChannelNotFound('the daemon does not serve %s' % guest))

    def _attach(self, conn: socket.socket, guest: str, hello: bytes, buffered: bytes) -> None:
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sockets.append(agent)
        try:
            agent.connect(self.agents[guest])
            self.attached.append(guest)
            agent.sendall(hello + buffered)
            answer, rest = _read_line(agent, b'')
            if answer is None:
                return
            reply = json.loads(answer.decode('utf-8'))
            reply['result']['via'] = 'negotiator-host-daemon'
            conn.sendall(json.dumps(reply).encode('utf-8') + b'\n' + rest)
            back = threading.Thread(target=_pass_bytes, args=(agent, conn), name='fake-host-daemon-back')
            back.daemon = True
            back.start()
            _pass_bytes(conn, agent)
            back.join()
        finally:
            agent.close()

    def stop(self) -> None:
        """Stop listening and end every connection (the client's and the agent's)."""
        for sock in [self.sock] + self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()


def _read_line(sock: socket.socket, buffered: bytes) -> Tuple[Optional[bytes], bytes]:
    """One line (with its newline) from ``sock`` after ``buffered``, and the bytes after it; None at the end."""
    while b'\n' not in buffered:
        data = sock.recv(65536)
        if not data:
            return None, b''
        buffered += data
    end = buffered.index(b'\n') + 1
    return buffered[:end], buffered[end:]


def _pass_bytes(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes from ``source`` to ``target`` until ``source`` ends; then end ``target``'s writing."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


OUTPUT_WITH_AN_ARRAY_ID = b'{"jsonrpc":"2.0","method":"output","params":{"id":[1]}}\n'
"""A notification whose ``params.id`` is an array: it raised ``TypeError`` in the reader (docs/faults.rst, "A
message of an unexpected shape")."""


def result_or_error(function, *args, **kwargs):
    """
    ``function(*args, **kwargs)``'s result, or the exception it raised: for a call on a thread
    that may fail (an exception that leaves a thread fails the test, see pytest.ini), and for a
    clean-up that may find nothing left to clean.
    """
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        return exc


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUPPORTED_PYTHONS = ('3.6', '3.7', '3.8', '3.9', '3.10', '3.11', '3.12', '3.13')
"""Every CPython that negotiator supports (tox.ini's py36 ... py313): the single-file agent runs on each."""

GUEST_PYTHONS = (SUPPORTED_PYTHONS[0], SUPPORTED_PYTHONS[-1])
"""The oldest (RHEL 8's) and the newest: the single-file agent runs on both in a real guest."""

_interpreters: Dict[str, str] = {}


def interpreter(version: str) -> str:
    """
    The real path of CPython ``version`` (``'3.6'``) on PATH (``switch_agent.find_python``); the
    test fails (it is never skipped) when there is none: ``scripts/test`` puts every pyenv
    interpreter on PATH.
    """
    if version not in _interpreters:
        found = find_python(version)
        if found is None:
            pytest.fail('no working python%s on PATH: the single-file agent must be tested on it; put '
                        "pyenv's versions/%s.*/bin on PATH, as scripts/test does" % (version, version), pytrace=False)
        _interpreters[version] = found
    return _interpreters[version]


def build_zipapp(output: str, source_root: str = REPOSITORY) -> str:
    """Run ``scripts/build-guest-agent --output OUTPUT`` (of ``source_root``); return its line about the archive."""
    result = subprocess.run([sys.executable, os.path.join(source_root, 'scripts', 'build-guest-agent'),
                             '--output', str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=600)
    if result.returncode != 0:
        pytest.fail('build-guest-agent failed (%d):\n%s%s' % (result.returncode, result.stdout, result.stderr),
                    pytrace=False)
    return result.stdout.strip()


class StalledFile(object):
    """
    A binary file that takes nothing until :attr:`go` is set: a consumer that stopped reading.
    :attr:`waiting` is set at the first write; :attr:`size` counts what it took.
    """

    def __init__(self) -> None:
        self.go = threading.Event()
        self.waiting = threading.Event()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.waiting.set()
        assert self.go.wait(120), 'the stalled file was never released'
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


@pytest.fixture
def adopting():
    """Adopt orphans as the daemons do, so that a process that left its group stays findable."""
    processes.adopt_orphans(True)
    yield
    processes.adopt_orphans(False)


FORK_AND_ESCAPE = b"""import os, signal
pid = os.fork()
if pid == 0:
    os.setsid()
    signal.pause()
    os._exit(0)
print(pid, flush=True)
signal.pause()
"""
"""A Python program whose child leaves the process group without ``exec``: found by the run's marker alone."""


def interruptible() -> None:
    """
    A ``preexec_fn`` for a CLI that a test interrupts with SIGINT: Ctrl-C's default action, as
    at a terminal. A shell without job control starts a background command with SIGINT ignored,
    and its children inherit that (Python then raises no ``KeyboardInterrupt``): the suite
    started that way must not make the CLI deaf to the test's Ctrl-C.
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
