"""
Run one external command safely: an argv list, no shell, bounded in time and output.

The command starts through :mod:`executor` with ``shell=False`` and an argv list, so no byte
of a peer's arguments ever reaches a shell. It starts in a session of its own (so that its pid
is its process group's id, and a timeout kills every process it started, not just the first)
with exactly a small clean environment (``PATH``, ``LANG``, ``HOME`` and ``NEGOTIATOR_*``: the
agent's own environment never leaks into a command). Both are set on the one ``fork``/``exec``
that executor makes (:class:`~negotiator_common.external.ExternalProgram` says how).
Output is read as it comes and handed to a callback in chunks, so a 64 MiB output streams
through without being held in memory twice.

A process can leave the command's group (``setsid``) and keep its pipes open; the timeout
and a cancellation still end the call on time and kill it too (:class:`_Supervisor`, and
:mod:`negotiator_common.processes` for how such processes are found).
"""

import array
import fcntl
import os
import selectors
import signal
import subprocess
import termios
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Set, Tuple, Union

from negotiator_common.callbounds import DEFAULT_KILL_GRACE
from negotiator_common.deadline import Deadline
from negotiator_common.lazylog import get_logger
from negotiator_common.errors import CommandNotFound
from negotiator_common.processes import (
    COMMANDS, MARKER_VARIABLE, command_processes, kill_command, new_marker, reap_orphans, signal_command,
)
from negotiator_common.transport import ReadBuffer
from negotiator_common.warm import WARM_PYTHONS, warmable

if TYPE_CHECKING:  # annotations only: executor is imported when a command starts
    from negotiator_common.external import ExternalProgram
    from negotiator_common.preload import Preload
    from negotiator_common.warm import WarmProgram, WarmProcess
    _Process = Union[subprocess.Popen, WarmProcess]
    from negotiator_common.streams import CommandStreams

__all__ = ('ProcessResult', 'run_process', 'clean_environment', 'DEFAULT_PATH',
           'CHUNK_SIZE')

logger = get_logger(__name__)  # the library never prints through logging's last resort

DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
"""The ``PATH`` a command sees, whatever the agent's own (:func:`clean_environment`)."""

CHUNK_SIZE = 1024 * 1024
"""How much output is read (and streamed) at a time: large chunks mean few messages for big outputs."""

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in the fcntl module only since Python 3.10

OutputCallback = Callable[[str, bytes], None]


class ProcessResult(object):
    """
    How a command ended: ``exit_status`` (None if killed by a signal), ``signal``, flags and timing.

    ``output_abandoned``: reading stopped while a process that had left the command's process
    group still held stdout or stderr open (output it wrote after that is lost).
    """

    __slots__ = ('exit_status', 'signal', 'duration', 'timed_out', 'cancelled', 'stdout_bytes',
                 'stderr_bytes', 'stdout_truncated', 'stderr_truncated', 'output_abandoned')

    def __init__(self) -> None:
        self.exit_status: Optional[int] = None
        self.signal: Optional[int] = None
        self.duration = 0.0
        self.timed_out = False
        self.cancelled = False
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.stdout_truncated = False
        self.stderr_truncated = False
        self.output_abandoned = False


def clean_environment(extra: Optional[Dict[str, str]] = None,
                      variables: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """
    The whole environment of a command: a fixed base, then ``variables`` (what the caller of an
    ``exec`` chose, any names: they may replace the base's), then the caller's ``NEGOTIATOR_*`` facts.
    """
    environment = {'PATH': DEFAULT_PATH, 'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8', 'HOME': '/'}
    for name, value in (variables or {}).items():
        if not name or '=' in name or '\0' in name + value:
            raise ValueError('not an environment variable: %r' % name)
        environment[name] = value
    for name, value in (extra or {}).items():
        if not name.startswith('NEGOTIATOR_') or '=' in name or '\0' in name + value:
            raise ValueError('only NEGOTIATOR_* variables may be added to a command environment: %r' % name)
        environment[name] = value
    return environment


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (best effort), so that output and input move in few, large reads and writes."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK_SIZE)
    except OSError:
        pass


class _Pipes(object):
    """
    The command's pipes: its input written as the pipe takes it, its output read in chunks and handed on.

    With ``streams`` (:class:`~negotiator_common.streams.CommandStreams`) the input comes from
    the caller as it arrives, and output is read only as far as the caller's room goes: out of
    room, the output pipes are not read, so the command blocks in its writes, and the caller's
    next ``credit`` (a byte on the streams' wake-up pipe) resumes them. Which descriptors are
    watched is decided anew before each wait (:meth:`_watch`).
    """

    def __init__(self, process: '_Process', stdin: bytes, max_output: Optional[int],
                 on_output: Optional[OutputCallback], streams: Optional['CommandStreams'] = None) -> None:
        # Started with its three pipes (capture, capture_stderr, input): none of them is None.
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self.stdin_pipe = process.stdin
        self.max_output = max_output
        self.on_output = on_output
        self.streams = streams
        self.selector = selectors.DefaultSelector()
        self.names = {process.stdout.fileno(): 'stdout', process.stderr.fileno(): 'stderr'}
        self.open_outputs = set(self.names)
        for fd in self.names:
            _grow_pipe(fd)
            os.set_blocking(fd, False)
        self.watched: Set[int] = set()
        self.streamed_input = streams is not None and streams.input is not None
        self.pending_input = memoryview(stdin)
        self.stdin_fd = self.stdin_pipe.fileno()
        self.input_open = True
        if streams is not None:
            self.selector.register(streams.wake_fd, selectors.EVENT_READ)
        if self.streamed_input or self.pending_input:
            _grow_pipe(self.stdin_fd)
            os.set_blocking(self.stdin_fd, False)
        else:
            self._close_input()
        self.emitted = {'stdout': 0, 'stderr': 0}
        self.truncated = {'stdout': False, 'stderr': False}
        self.buffer = ReadBuffer(CHUNK_SIZE)  # reused by every read of both pipes
        if self.streamed_input:
            assert streams is not None
            streams.start_input()

    @property
    def output_open(self) -> bool:
        """Whether some process still holds the write end of stdout or stderr."""
        return bool(self.open_outputs)

    @property
    def active(self) -> bool:
        """Whether a pipe is still to be read or written."""
        return bool(self.open_outputs) or self.input_open

    @property
    def out_of_room(self) -> bool:
        """Whether output waits only for the caller's room (credit)."""
        return bool(self.open_outputs) and self._room() == 0

    def _room(self) -> Optional[int]:
        return None if self.streams is None else self.streams.output_room()

    def pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a pipe (or the caller) to be ready, then move what is ready."""
        self._watch()
        for key, _ in self.selector.select(max(0.0, timeout)):
            if self.streams is not None and key.fd == self.streams.wake_fd:
                self.streams.clear_wake()
            elif key.fd == self.stdin_fd:
                self._write_input()
            elif key.fd in self.open_outputs:
                self._read_output(key.fd)

    def _watch(self) -> None:
        """Watch the input pipe while there is input for it, the output pipes while there is room for their output."""
        wanted = set()
        if self.input_open and (self.pending_input or self._refill()):
            wanted.add(self.stdin_fd)
        if self._room() != 0:
            wanted.update(self.open_outputs)
        for fd in self.watched - wanted:
            self.selector.unregister(fd)
        for fd in wanted - self.watched:
            self.selector.register(fd, selectors.EVENT_WRITE if fd == self.stdin_fd else selectors.EVENT_READ)
        self.watched = wanted

    def _refill(self) -> bool:
        """Take the next input that waits (streamed input only); True if there is some to write now."""
        if not self.streamed_input:
            self._close_input()
            return False
        assert self.streams is not None
        data = self.streams.read_input(CHUNK_SIZE)
        if data is None:
            return False
        if not data:
            self._close_input()
            return False
        self.pending_input = memoryview(data)
        return True

    def drain(self) -> None:
        """Read what the output pipes hold now, without waiting: the last reads before giving up on them."""
        for fd in list(self.open_outputs):
            # One read takes a whole pipe (at most CHUNK_SIZE); the next sees the end of file, if it came.
            for _ in range(2):
                if self._room() == 0:
                    self._give_up_output(fd)
                    break
                if fd not in self.open_outputs or not self._read_output(fd):
                    break

    def _give_up_output(self, fd: int) -> None:
        """Stop reading ``fd`` for want of room: output that waits in it is dropped, and the result says so."""
        if _bytes_waiting(fd):
            self.truncated[self.names[fd]] = True
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        self.open_outputs.discard(fd)
        if fd in self.watched:
            self.watched.discard(fd)
            self.selector.unregister(fd)

    def _write_input(self) -> None:
        try:
            written = os.write(self.stdin_fd, self.pending_input[:CHUNK_SIZE])
        except BrokenPipeError:
            self._close_input()
            return
        self.pending_input = self.pending_input[written:]
        if self.streamed_input:
            assert self.streams is not None
            self.streams.input_written(written)
        elif not self.pending_input:
            self._close_input()

    def _close_input(self) -> None:
        """No more input for the command (all written, the end came, or it closed its end): it reads end of file."""
        if self.stdin_fd in self.watched:
            self.watched.discard(self.stdin_fd)
            self.selector.unregister(self.stdin_fd)
        self.pending_input = memoryview(b'')
        self.input_open = False
        if self.streamed_input:
            assert self.streams is not None
            self.streams.drop_input()
        if not self.stdin_pipe.closed:
            try:
                self.stdin_pipe.close()
            except BrokenPipeError:
                pass

    def _read_output(self, fd: int) -> bool:
        """Read one chunk from ``fd`` (as much as the room allows) and hand it on; False when there was nothing."""
        room = self._room()
        if room == 0:
            return False  # the caller's room ran out since the wait (a read of 0 bytes would look like the end)
        try:
            chunk = self.buffer.read(fd, CHUNK_SIZE if room is None else min(CHUNK_SIZE, room))
        except BlockingIOError:
            return False
        if not chunk:
            self._forget(fd)
            return False
        name = self.names[fd]
        keep = len(chunk) if self.max_output is None else max(0, min(len(chunk), self.max_output - self.emitted[name]))
        if keep < len(chunk):
            self.truncated[name] = True
        if keep and self.on_output is not None:
            self.on_output(name, chunk[:keep])
        self.emitted[name] += keep
        return True

    def close(self) -> None:
        self.selector.close()
        if self.streamed_input:
            assert self.streams is not None
            self.streams.drop_input()
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


def _bytes_waiting(fd: int) -> int:
    """How many bytes a pipe holds unread (``FIONREAD``); 0 when that cannot be told."""
    count = array.array('i', [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


class _Supervisor(object):
    """
    One command from its start to its reply: the deadline, the stop, and when reading ends.

    The call ends on time whatever the command's pipes do:

    - **Timeout or cancellation**: the process group and the run's processes outside it get
      SIGTERM; those still alive ``kill_grace`` seconds later get SIGKILL (round after round
      until none is left), whether or not the pipes are still open. Then what the pipes hold
      is read, and reading stops.
    - **Normal exit**: whatever the command left in its process group is killed at once (as
      always); processes that left the group are left alone, but they hold the reply for at
      most ``kill_grace`` seconds: reading stops then, and ``output_abandoned`` says so.
    """

    POLL_INTERVAL = 0.1
    """Seconds between looks at the cancellation event and the command's exit (neither can be selected on)."""

    def __init__(self, process: '_Process', pipes: _Pipes, marker: str, name: str,
                 timeout: Optional[float], cancelled: Optional[threading.Event], kill_grace: float,
                 result: 'ProcessResult') -> None:
        self.process = process
        self.pipes = pipes
        self.marker = marker
        self.name = name
        self.deadline = Deadline(timeout)
        self.cancelled = cancelled
        self.kill_grace = kill_grace
        self.result = result
        self.exited = False
        self.stopping = False
        self.kill_at: Optional[float] = None
        self.killed = False
        self.read_until: Optional[float] = None

    def supervise(self) -> None:
        """Run the command's loop until it is over (see the class's documentation)."""
        while True:
            now = time.monotonic()
            self._notice_exit(now)
            self._notice_stop(now)
            if self._finished():
                return
            if self.read_until is not None and now >= self.read_until and not self._waiting_for_room():
                self._stop_reading()
                return
            self._wait(self._next_event(now) - now)

    def finish(self, completed: bool) -> None:
        """After the loop (or an error in it): leave nothing of a stopped command, nothing in the group."""
        if self.stopping or not completed:
            if not self.killed:
                kill_command(self.process.pid, self.marker, self.kill_grace)
            reap_orphans()
        else:
            _signal_group(self.process.pid, signal.SIGKILL)

    @property
    def _is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()

    def _notice_exit(self, now: float) -> None:
        if self.exited or self.process.poll() is None:
            return
        self.exited = True
        if not self.stopping:
            _signal_group(self.process.pid, signal.SIGKILL)  # what it left in its group goes with it
            self.read_until = now + self.kill_grace

    def _notice_stop(self, now: float) -> None:
        if self.exited and not self.stopping:
            if self._is_cancelled:  # the command is over: only the reading is left to stop
                self.read_until = now
        elif not self.stopping and (self._is_cancelled or self.deadline.expired):
            self.stopping = True
            self.result.cancelled = self._is_cancelled
            self.result.timed_out = not self.result.cancelled
            logger.info("Stopping %s (%s)", self.name, 'cancelled' if self.result.cancelled else 'timeout')
            signal_command(self.process.pid, self.marker, signal.SIGTERM)
            self.kill_at = now + self.kill_grace
        elif self.stopping and not self.killed and self.kill_at is not None and now >= self.kill_at:
            kill_command(self.process.pid, self.marker, self.kill_grace)
            self.killed = True
            self.read_until = time.monotonic()

    def _finished(self) -> bool:
        if self.pipes.output_open or not self.exited:
            return False
        # A stopped command is over when none of its processes is left (they had SIGTERM).
        return not self.stopping or self.killed or not command_processes(self.process.pid, self.marker)

    def _waiting_for_room(self) -> bool:
        """
        Whether a command that ended normally has output that waits only for the caller's room:
        the caller is slow, not the command, so reading goes on, until the command's timeout
        or a cancellation.
        """
        return (self.pipes.out_of_room and self.exited and not self.stopping and not self._is_cancelled
                and not self.deadline.expired)

    def _next_event(self, now: float) -> float:
        read_until = None if self._waiting_for_room() else self.read_until
        events = [now + self.POLL_INTERVAL, read_until, None if self.killed else self.kill_at,
                  None if self.stopping or self.exited else self.deadline.at]
        return min(t for t in events if t is not None)

    def _wait(self, timeout: float) -> None:
        if self.pipes.active:
            self.pipes.pump(timeout)
        elif not self.exited:
            try:
                self.process.wait(max(0.0, timeout))
            except subprocess.TimeoutExpired:
                pass
        else:  # stopped, and some process of it has not died of SIGTERM yet
            time.sleep(max(0.0, timeout))

    def _stop_reading(self) -> None:
        self.pipes.drain()
        if self.pipes.output_open:
            self.result.output_abandoned = True
            logger.warning("Stopped reading the output of %s: a process that left its process group "
                           "still holds it", self.name)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _cannot_start(program: str, exc: OSError) -> CommandNotFound:
    return CommandNotFound('cannot start %s: %s' % (program, exc.strerror or exc))


def _start(argv: List[str], environment: Optional[Dict[str, str]], variables: Optional[Dict[str, str]],
           directory: str, marker: str, warm: bool,
           preload: 'Optional[Preload]') -> Tuple['Union[ExternalProgram, WarmProgram]', '_Process']:
    """
    Start the command (``warm``: forked by a warm Python, which has imported ``preload`` too, when
    :func:`~negotiator_common.warm.warmable` says it may be and its zygote runs) and register it
    with :data:`~negotiator_common.processes.COMMANDS`.
    """
    command_environment = clean_environment(environment, variables)
    command_environment[MARKER_VARIABLE] = marker
    # A missing interpreter or directory is the cold start's clear refusal, not a zygote's failure.
    if warm and warmable(argv, variables) and os.access(argv[0], os.X_OK) and os.path.isdir(directory):
        # The zygote starts with a marker of the same length, which each process it forks overwrites.
        zygote_environment = dict(clean_environment(), **{MARKER_VARIABLE: '0' * len(marker)})
        try:
            warm_started = WARM_PYTHONS.start(argv[0], directory, command_environment, zygote_environment,
                                              mark=MARKER_VARIABLE, preload=preload)
        except OSError as exc:  # the zygote could not fork
            raise _cannot_start(argv[0], exc) from exc
        if warm_started is not None:  # the zygote's child, never this process's: the reaper cannot take it
            COMMANDS.add(warm_started[1].pid, marker)
            return warm_started
    from negotiator_common.external import ExternalProgram  # imported lazily: executor costs tens of milliseconds

    program = ExternalProgram(argv, environment=command_environment, new_session=True, stdin=True,
                              directory=directory, logger_name=__name__)
    with COMMANDS.starting():
        try:
            process = program.start()
        except OSError as exc:
            raise _cannot_start(argv[0], exc) from exc
        COMMANDS.add(process.pid, marker)
    return program, process


def run_process(argv: List[str], stdin: bytes = b'', timeout: Optional[float] = None,
                max_output: Optional[int] = None, on_output: Optional[OutputCallback] = None,
                environment: Optional[Dict[str, str]] = None, cancelled: Optional[threading.Event] = None,
                kill_grace: float = DEFAULT_KILL_GRACE, directory: str = '/',
                streams: Optional['CommandStreams'] = None,
                variables: Optional[Dict[str, str]] = None, warm: bool = False,
                preload: 'Optional[Preload]' = None) -> ProcessResult:
    """
    Run ``argv`` (a list; ``argv[0]`` an absolute path, or a name looked up in the command's
    ``PATH``) in ``directory`` and stream its output to ``on_output``. ``environment`` adds
    ``NEGOTIATOR_*`` facts to the command's clean environment, ``variables`` any variables
    (an ``exec`` caller's choice; see :func:`clean_environment`).

    ``on_output(stream, chunk)`` gets ``'stdout'`` or ``'stderr'`` and bytes, in order; past
    ``max_output`` bytes per stream the rest is read and dropped, and the stream's truncation
    flag is set. When ``timeout`` passes or ``cancelled`` is set, every process of the command
    (its process group, and those outside it that carry its marker) gets SIGTERM, then SIGKILL
    after ``kill_grace`` seconds, and the call returns. When the command ends, any process it
    left behind in its group is killed too; one that left the group may keep running, but holds
    the reply for at most ``kill_grace`` seconds (see :class:`_Supervisor`).

    With ``streams`` (:class:`~negotiator_common.streams.CommandStreams`), the command's input
    is the caller's streamed input when the streams carry one (``stdin`` is then ignored), and
    its output is read only as far as the caller's room goes (see :class:`_Pipes`).

    With ``warm``, a Python interpreter alone (``argv`` of one absolute path, whose program is
    its input) runs in a process forked from a warm Python (:mod:`negotiator_common.warm`),
    else as any command; with ``preload`` too, from a warm Python that has also imported its
    modules (:mod:`negotiator_common.preload`).
    """
    result = ProcessResult()
    started = time.monotonic()
    marker = new_marker()
    program, process = _start(argv, environment, variables, directory, marker, warm, preload)
    pipes = _Pipes(process, stdin, max_output, on_output, streams)
    supervisor = _Supervisor(process, pipes, marker, argv[0], timeout, cancelled, kill_grace, result)
    completed = False
    try:
        supervisor.supervise()
        completed = True
    finally:
        # Whatever happened (even an exception in a callback): no process of the group survives.
        supervisor.finish(completed)
        pipes.close()
        returncode = process.wait()
        COMMANDS.remove(process.pid)
        program.close()
    result.duration = time.monotonic() - started
    result.stdout_bytes, result.stderr_bytes = pipes.emitted['stdout'], pipes.emitted['stderr']
    result.stdout_truncated, result.stderr_truncated = pipes.truncated['stdout'], pipes.truncated['stderr']
    if returncode < 0:
        result.signal = -returncode
    else:
        result.exit_status = returncode
    return result
