"""
Warm Pythons: a Python program from standard input, run in a process forked from an interpreter
that has already imported the standard library, instead of in a new interpreter.

Ansible runs each task as one Python program piped into ``python3`` (its "pipelining"). In an
emulated guest most of such a task is the interpreter importing its standard library, over and
over: ``AnsiballZ_ping.py`` took 7.4 s cold and 1.4 s warm in the test guest (docs/benchmark.rst).
So an ``exec`` that asks for it (``warm``, ``docs/protocol.rst``) and names an interpreter alone,
with no arguments, runs in a process forked from that interpreter's *zygote*
(:mod:`negotiator_common.zygote`): one per interpreter path, started at its first use with the
clean environment of commands, kept while the agent runs.

To the runner a warm program is what :func:`~negotiator_common.external.ExternalProgram.start`
gives: a process with three pipes, a pid that is its process group's id, an exit status. It is
the zygote's child, not the agent's: the zygote reports its exit. If the zygote dies, the
processes it forked are killed (their status is then SIGKILL's) and the next call starts a new
one. An interpreter whose zygote does not start (not a Python 3.6 or later, or not within
:data:`START_TIMEOUT`) is run cold from then on, and the log says why once.

A call may also name libraries to preload (:class:`~negotiator_common.preload.Preload`: a zip
archive, and the modules to import from it). Its program then runs in a process forked from a
*zygote of those libraries*: a process forked from the interpreter's zygote, which imported
them from the agent's copy of the archive (in the zygote's own directory) and then serves as a
zygote itself. There is one per (interpreter, archive, modules), at most :data:`MAX_PRELOADED` in
all: to start another, the one used least recently and running nothing ends; when all run
something, the program runs in the interpreter's zygote without the libraries. A module that
fails to import is left out (the program imports it itself). Libraries whose import starts a
thread (a process forked from a threaded one may inherit a held lock), or whose zygote does not
start, are not preloaded again until the agent restarts.
"""

import array
import collections
import errno
import json
import os
import pkgutil
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from negotiator_common.deadline import Deadline
from negotiator_common.lazylog import get_logger

if TYPE_CHECKING:  # annotations only: executor is imported when a zygote starts
    from negotiator_common.external import ExternalProgram
    from negotiator_common.preload import Preload

__all__ = ('WARM_PYTHONS', 'WarmPythons', 'WarmProcess', 'warmable', 'MAX_PRELOADED', 'START_TIMEOUT')

logger = get_logger(__name__)

START_TIMEOUT = 60.0
"""Seconds a zygote may take to import what it preloads (about 2 s in the emulated test guest)."""

MAX_PRELOADED = 6
"""
How many zygotes of libraries an agent keeps at most: one per Ansible module that a play uses
is what they are for, each about 10 MiB beside the interpreter's zygote it shares its memory with.
"""

_INTERPRETER = re.compile(r'/(?:[^/\0]+/)*(?:[^/\0]+-)?python(?:\d+(?:\.\d+)?)?$')
_STARTUP_VARIABLES = re.compile(r'^(PYTHON|LC_)|^LANG$')
_MAX_MESSAGE = 64 * 1024

_BOOTSTRAP = 'import socket; exec(socket.fromfd(0, socket.AF_UNIX, socket.SOCK_SEQPACKET).recv(1 << 20))'
"""The zygote's ``-c`` program: its real program (:mod:`negotiator_common.zygote`) is the socket's first message."""

_NAME = 'negotiator-warm-python'
"""The zygote's one argument: what ``ps`` shows of it, and of the processes it forks."""


def warmable(argv: List[str], variables: Optional[Dict[str, str]]) -> bool:
    """
    Whether a warm process can stand for ``argv`` started cold: an interpreter named by its
    absolute path (``.../python``, ``python3``, ``python3.11``, RHEL's ``platform-python3.6``) with no arguments, and no
    variable that an interpreter reads as it starts (``PYTHON*``, ``LANG``, ``LC_*``: the
    zygote started with those of the clean environment).
    """
    return (len(argv) == 1 and bool(_INTERPRETER.match(argv[0]))
            and not any(_STARTUP_VARIABLES.match(name) for name in (variables or {})))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class WarmUnavailable(Exception):
    """The zygote could not start, or died: run the program cold."""


def _returncode(status: int) -> int:
    """A wait status as :class:`subprocess.Popen` gives it: the exit status, or minus the signal."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _is_exit(message: Dict[str, Any]) -> bool:
    return isinstance(message.get('exited'), int) and isinstance(message.get('status'), int)


def _is_reply(message: Dict[str, Any]) -> bool:
    return isinstance(message.get('id'), int) and (isinstance(message.get('pid'), int) or 'error' in message)


class WarmProcess(object):
    """
    A program forked by a zygote, with what the runner uses of :class:`subprocess.Popen`: ``pid``,
    the three pipes, :meth:`poll`, :meth:`wait`, :meth:`kill` and ``returncode``.
    """

    def __init__(self, zygote: '_Zygote', pid: int, pipes: Tuple[int, int, int]) -> None:
        self.zygote = zygote
        self.pid = pid
        self.args = [zygote.interpreter]
        self.stdin = open(pipes[0], 'wb', buffering=0)
        self.stdout = open(pipes[1], 'rb', buffering=0)
        self.stderr = open(pipes[2], 'rb', buffering=0)
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        try:
            return self.wait(0.0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            status = self.zygote.wait_for(self.pid, timeout)
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.returncode = _returncode(status)
        return self.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class WarmProgram(object):
    """What the runner keeps of a warm program, as of an :class:`ExternalProgram`: its process, and :meth:`close`."""

    def __init__(self, process: WarmProcess) -> None:
        self.process = process

    def close(self) -> None:
        """Release the pipes; a program still running is killed first (as ExternalProgram does)."""
        process = self.process
        if process.poll() is None:
            process.kill()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


class _Zygote(object):
    """
    One warm interpreter: asked to fork, and told apart from its children's exits by a reader
    thread. :meth:`start` starts an interpreter's zygote; :meth:`spawn` makes, from one, a
    zygote of libraries (its ``parent``), which is the parent's child, not the agent's.
    """

    def __init__(self, interpreter: str, channel: socket.socket, pid: int,
                 started: 'Optional[Tuple[ExternalProgram, subprocess.Popen]]' = None,
                 parent: 'Optional[_Zygote]' = None, archive: Optional[str] = None) -> None:
        self.interpreter = interpreter
        self.archive = archive
        self.socket = channel
        self.pid = pid
        self.started = started
        self.parent = parent
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.next_id = 0
        self.replies: Dict[int, Dict[str, Any]] = {}
        self.exits: Dict[int, int] = {}
        self.running: List[int] = []
        self.dead = False
        self.closing = False
        self.cache: Optional[str] = None
        self.version = self._wait_until_ready()
        self.reader = threading.Thread(target=self._read, name='zygote %s' % interpreter, daemon=True)
        self.reader.start()

    @classmethod
    def start(cls, interpreter: str, environment: Dict[str, str]) -> '_Zygote':
        """Start ``interpreter``'s zygote with ``environment``, and wait until it is ready."""
        from negotiator_common.external import ExternalProgram  # imported lazily, as the runner does
        source = pkgutil.get_data('negotiator_common', 'zygote.py')
        if source is None:
            raise WarmUnavailable('the zygote program is not installed')
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        program = ExternalProgram([interpreter, '-c', _BOOTSTRAP, _NAME], environment=environment, directory='/',
                                  connect=theirs.fileno(), logger_name=__name__)
        try:
            process = program.start()
        except OSError as exc:
            ours.close()
            raise WarmUnavailable('cannot start %s: %s' % (interpreter, exc.strerror or exc)) from exc
        finally:
            theirs.close()
        try:
            ours.send(source)
        except OSError:
            pass  # it ended already: waiting for it to be ready says why
        return cls(interpreter, ours, process.pid, started=(program, process))

    def spawn(self, preload: 'Preload', key: str) -> '_Zygote':
        """A zygote of libraries: a process of this zygote that has imported ``preload``'s modules."""
        if self.cache is None:
            raise WarmUnavailable('the warm %s has no directory for archives' % self.interpreter)
        try:  # a file of its own, removed when it ends: another of the same content may be starting
            with tempfile.NamedTemporaryFile(dir=self.cache, prefix='preload-%s-' % key[:16], suffix='.zip',
                                             delete=False) as handle:
                archive = handle.name
                handle.write(preload.archive)
        except OSError as exc:
            raise WarmUnavailable('cannot keep the archive in %s: %s' % (self.cache, exc)) from exc
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            reply = self._ask({'preload': {'archive': archive, 'modules': list(preload.modules)}}, [theirs.fileno()])
        except BaseException:
            ours.close()
            _remove(archive)
            raise
        finally:
            theirs.close()
        return _Zygote(self.interpreter, ours, reply['pid'], parent=self, archive=archive)

    def _wait_until_ready(self) -> str:
        self.socket.settimeout(START_TIMEOUT)
        try:
            data = self.socket.recv(_MAX_MESSAGE)
        except OSError as exc:  # socket.timeout included
            data, reason = b'', 'no answer within %s s (%s)' % (START_TIMEOUT, exc)
        else:
            reason = 'it ended'
        self.socket.settimeout(None)
        try:
            ready = json.loads(data.decode('utf-8')) if data else {'ready': None}
        except ValueError:
            ready = None
        if not isinstance(ready, dict) or 'ready' not in ready:
            ready, reason = {'ready': None}, 'it said %r' % data[:200]
        version, cache = ready['ready'], ready.get('cache')
        if self.parent is None and isinstance(cache, str) and os.path.basename(cache).startswith(_NAME):
            self.cache = cache  # the interpreter's zygote's: its zygotes of libraries use it, and never remove it
        if not (isinstance(version, list) and len(version) == 2):
            error = ready.get('error')
            if isinstance(error, str):
                reason = error[:500]
            raise WarmUnavailable('%s cannot be a warm Python: %s%s' % (self.interpreter, reason, self._bury()))
        return '%s.%s' % tuple(version)

    def _bury(self) -> str:
        """Close, kill if need be and wait for the zygote; the end of what it wrote on its standard error."""
        self.socket.close()
        if self.parent is not None:  # its parent waits for it; it writes nothing where the agent reads
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.parent.wait_for(self.pid, START_TIMEOUT)
            if self.archive is not None:  # what it imported: the warm Python's directory holds no archive for long
                _remove(self.archive)
            return ''
        assert self.started is not None
        program, process = self.started
        if process.poll() is None:
            process.kill()
        process.wait()
        if self.cache is not None:  # the zygote removes it as it ends, but not if it was killed
            shutil.rmtree(self.cache, ignore_errors=True)
        stderr = process.stderr
        try:
            text = stderr.read().decode('utf-8', 'replace').strip() if stderr is not None else ''
        except (OSError, ValueError):
            text = ''
        program.close()
        return '; it said: %s' % text[-500:] if text else ''

    def fork(self, directory: str, environment: Dict[str, str], mark: Optional[str]) -> WarmProcess:
        """
        A new process of this zygote, in ``directory`` with ``environment``, reading its program
        from its input; ``mark`` names the variable whose value it also writes over the one the
        zygote started with (see :mod:`negotiator_common.zygote`).
        """
        stdin, stdout, stderr = os.pipe(), os.pipe(), os.pipe()
        theirs, ours = (stdin[0], stdout[1], stderr[1]), (stdin[1], stdout[0], stderr[0])
        try:
            reply = self._ask({'cwd': directory, 'env': environment, 'mark': mark}, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return WarmProcess(self, reply['pid'], ours)

    def _ask(self, request: Dict[str, Any], fds: Sequence[int]) -> Dict[str, Any]:
        """Send ``request`` with ``fds`` and wait for the zygote's reply: the pid of the process it forked."""
        with self.lock:
            if self.dead:
                raise WarmUnavailable('the warm %s ended' % self.interpreter)
            self.next_id += 1
            request_id = self.next_id
            message = json.dumps(dict(request, id=request_id)).encode('utf-8')
            try:
                self.socket.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))])
            except OSError as exc:
                raise WarmUnavailable('the warm %s is gone: %s' % (self.interpreter, exc)) from exc
            deadline = Deadline(START_TIMEOUT)
            while request_id not in self.replies and not self.dead and not deadline.expired:
                self.changed.wait(deadline.remaining())
            reply = self.replies.pop(request_id, None)
            if reply is None:  # a process it forks later reads an input that has ended, and exits
                raise WarmUnavailable('the warm %s %s' % (self.interpreter, 'ended' if self.dead else
                                                          'did not fork within %s s' % START_TIMEOUT))
            if 'pid' not in reply:
                raise OSError(errno.EAGAIN, 'the warm %s could not fork: %s' % (self.interpreter, reply.get('error')))
            self.running.append(reply['pid'])
            return reply

    def close(self) -> None:
        """End the zygote (its reader says so), and with it the programs it is running."""
        self.closing = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # ended already
        self.reader.join()

    def wait_for(self, pid: int, timeout: Optional[float]) -> Optional[int]:
        """The wait status of ``pid`` once it has ended, else None after ``timeout`` seconds (None: no limit)."""
        deadline = Deadline(timeout)
        with self.lock:
            while pid not in self.exits:
                if deadline.expired:
                    return None
                self.changed.wait(deadline.remaining())
            self.running.remove(pid)
            return self.exits.pop(pid)

    def _read(self) -> None:
        """The zygote's messages, until its socket ends: replies to :meth:`fork`, and its children's exits."""
        while True:
            try:
                data = self.socket.recv(_MAX_MESSAGE)
                message = json.loads(data.decode('utf-8')) if data else None
            except (OSError, ValueError):
                message = None
            with self.lock:
                if not isinstance(message, dict):  # the end, or not a zygote's message
                    break
                if _is_exit(message):
                    self.exits[message['exited']] = message['status']
                elif _is_reply(message):
                    self.replies[message['id']] = message
                else:  # the end, or not what a zygote says: it cannot be trusted with more programs
                    break
                self.changed.notify_all()
        self._died()

    def _died(self) -> None:
        """The zygote ended: nobody reports its children's exits now, so they are killed and said to be."""
        with self.lock:
            self.dead = True
            for pid in self.running:
                if pid not in self.exits:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    self.exits[pid] = signal.SIGKILL  # the wait status of a process killed by SIGKILL
            self.changed.notify_all()
        said = self._bury()
        what = 'warm %s' % self.interpreter if self.parent is None else 'zygote of libraries of %s' % self.interpreter
        if self.closing:
            logger.info("Closed the %s%s", what, said)
        else:
            logger.warning("The %s ended%s", what, said)


class WarmPythons(object):
    """The zygotes of an agent: one per interpreter path, each started at its first use, and those of libraries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygotes: Dict[str, _Zygote] = {}
        self._refused: Dict[str, str] = {}
        self._preloaded: 'collections.OrderedDict[Tuple[str, str], _Zygote]' = collections.OrderedDict()
        self._refused_preloads: Dict[Tuple[str, str], str] = {}

    def start(self, interpreter: str, directory: str, environment: Dict[str, str],
              zygote_environment: Dict[str, str], mark: Optional[str] = None,
              preload: 'Optional[Preload]' = None) -> Optional[Tuple[WarmProgram, WarmProcess]]:
        """
        Fork a process of ``interpreter``'s zygote (started now with ``zygote_environment`` if
        it is not running), or of its zygote of ``preload``'s libraries (made now if need be and
        possible); None if that interpreter cannot be warm, and the program must start cold.
        ``mark``: the variable of ``environment`` that the process also writes over its
        inherited one (``zygote_environment`` holds it with a value of the same length).
        """
        with self._lock:
            zygote = self._zygotes.get(interpreter)
            if zygote is None or zygote.dead:
                if interpreter in self._refused:
                    return None
                try:
                    zygote = _Zygote.start(interpreter, zygote_environment)
                except WarmUnavailable as exc:
                    logger.warning("Running %s cold from now on: %s", interpreter, exc)
                    self._refused[interpreter] = str(exc)
                    return None
                logger.info("Started a warm Python %s (%s)", zygote.version, interpreter)
                self._zygotes[interpreter] = zygote
            if preload is not None:
                zygote = self._with_libraries(zygote, preload)
        try:
            process = zygote.fork(directory, environment, mark)
        except WarmUnavailable as exc:
            logger.warning("Running %s cold this time: %s", interpreter, exc)
            return None
        return WarmProgram(process), process

    def _with_libraries(self, zygote: _Zygote, preload: 'Preload') -> _Zygote:
        """The zygote of ``preload``'s libraries made from ``zygote``, or ``zygote`` itself when there cannot be one."""
        key = (zygote.interpreter, preload.key)
        preloaded = self._preloaded.get(key)
        if preloaded is not None and not preloaded.dead and preloaded.parent is zygote:
            self._preloaded.move_to_end(key)
            return preloaded
        self._preloaded.pop(key, None)
        if key in self._refused_preloads or not self._room_for_one_more():
            return zygote
        try:
            preloaded = zygote.spawn(preload, key[1])
        except WarmUnavailable as exc:
            logger.warning("Not preloading %d modules for %s from now on: %s", len(preload.modules),
                           zygote.interpreter, exc)
            self._refused_preloads[key] = str(exc)
            return zygote
        logger.info("Preloaded %d modules in a warm %s", len(preload.modules), zygote.interpreter)
        self._preloaded[key] = preloaded
        return preloaded

    def _room_for_one_more(self) -> bool:
        """Whether another zygote of libraries may start: fewer than the most run, or one that runs nothing ends."""
        for key, preloaded in list(self._preloaded.items()):
            if preloaded.dead:
                del self._preloaded[key]
        if len(self._preloaded) < MAX_PRELOADED:
            return True
        for key, preloaded in self._preloaded.items():  # the least recently used first
            if not preloaded.running:
                del self._preloaded[key]
                preloaded.close()
                return True
        return False

    def close(self) -> None:
        """End every zygote, and with them the programs they are running (as when one dies)."""
        with self._lock:
            zygotes = list(self._preloaded.values()) + list(self._zygotes.values())
            self._preloaded.clear()
            self._zygotes = {}
        for zygote in zygotes:
            zygote.close()


WARM_PYTHONS = WarmPythons()
"""The zygotes of this process (the runner's warm programs start here)."""
