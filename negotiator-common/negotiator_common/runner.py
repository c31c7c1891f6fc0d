"""
Run one external command safely: an argv list, no shell, bounded in time and output.

The command starts through :mod:`executor` with ``shell=False`` and an argv list, so no byte
of a peer's arguments ever reaches a shell. It starts in a session of its own (so that its pid
is its process group's id, and a timeout kills every process it started, not just the first)
with exactly a small clean environment (``PATH``, ``LANG``, ``HOME`` and ``NEGOTIATOR_*``: the
agent's own environment never leaks into a command). Both are set on the one ``fork``/``exec``
that executor makes (:class:`_IsolatedCommand`): wrapper programs such as ``setsid`` and
``env -i`` would cost two more ``exec`` calls per command, which is slow in an emulated guest.
Output is read as it comes and handed to a callback in chunks, so a 64 MiB output streams
through without being held in memory twice.
"""

import fcntl
import logging
import os
import selectors
import signal
import threading
import time
from typing import Callable, Dict, List, Optional

from negotiator_common.errors import CommandNotFound
from negotiator_common.transport import ReadBuffer

__all__ = ('ProcessResult', 'run_process', 'clean_environment', 'DEFAULT_PATH',
           'DEFAULT_KILL_GRACE', 'CHUNK_SIZE')

logger = logging.getLogger(__name__)

DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
"""The ``PATH`` a command sees (and where ``setsid`` and ``env`` are looked up)."""

DEFAULT_KILL_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL when a command is stopped."""

CHUNK_SIZE = 1024 * 1024
"""How much output is read (and streamed) at a time: large chunks mean few messages for big outputs."""

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in the fcntl module only since Python 3.10

OutputCallback = Callable[[str, bytes], None]


class ProcessResult(object):
    """How a command ended: ``exit_status`` (None if killed by a signal), ``signal``, flags and timing."""

    __slots__ = ('exit_status', 'signal', 'duration', 'timed_out', 'cancelled', 'stdout_bytes',
                 'stderr_bytes', 'stdout_truncated', 'stderr_truncated')

    def __init__(self) -> None:
        self.exit_status = None  # type: Optional[int]
        self.signal = None  # type: Optional[int]
        self.duration = 0.0
        self.timed_out = False
        self.cancelled = False
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.stdout_truncated = False
        self.stderr_truncated = False


def clean_environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The whole environment of a command: a fixed base plus the caller's ``NEGOTIATOR_*`` facts."""
    environment = {'PATH': DEFAULT_PATH, 'LANG': 'C.UTF-8', 'LC_ALL': 'C.UTF-8', 'HOME': '/'}
    for name, value in (extra or {}).items():
        if not name.startswith('NEGOTIATOR_') or '=' in name or '\0' in name + value:
            raise ValueError('only NEGOTIATOR_* variables may be added to a command environment: %r' % name)
        environment[name] = value
    return environment


def _isolated_command(argv: List[str], environment: Dict[str, str], directory: str) -> object:
    """An executor command for ``argv`` that starts in a new session with exactly ``environment``."""
    from executor import ExternalCommand  # imported lazily: it costs tens of milliseconds

    class _IsolatedCommand(ExternalCommand):
        # executor merges the agent's own environment into the command's and has no option for
        # a new session: both are set on the arguments it hands to subprocess.Popen.
        def start_once(self, check: Optional[bool] = None, **kw: object) -> None:
            kw['env'] = dict(environment)
            kw['start_new_session'] = True
            super().start_once(check=check, **kw)

    return _IsolatedCommand(*argv, shell=False, asynchronous=True, capture=True, capture_stderr=True,
                            buffered=False, input=True, check=False, directory=directory,
                            silent=True, logger=logger)


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer (best effort), so that output arrives in few, large reads."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, CHUNK_SIZE)
    except OSError:
        pass


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run_process(argv: List[str], stdin: bytes = b'', timeout: Optional[float] = None,
                max_output: Optional[int] = None, on_output: Optional[OutputCallback] = None,
                environment: Optional[Dict[str, str]] = None, cancelled: Optional[threading.Event] = None,
                kill_grace: float = DEFAULT_KILL_GRACE, directory: str = '/') -> ProcessResult:
    """
    Run ``argv`` (a list; ``argv[0]`` an absolute path) and stream its output to ``on_output``.

    ``on_output(stream, chunk)`` gets ``'stdout'`` or ``'stderr'`` and bytes, in order; past
    ``max_output`` bytes per stream the rest is read and dropped, and the stream's truncation
    flag is set. When ``timeout`` passes or ``cancelled`` is set, the whole process group gets
    SIGTERM, then SIGKILL after ``kill_grace`` seconds. When the command ends, any process it
    left behind in its group is killed too: a command leaves no orphan.
    """
    result = ProcessResult()
    started = time.monotonic()
    command = _isolated_command(argv, clean_environment(environment), directory)
    try:
        command.start()
    except OSError as exc:
        raise CommandNotFound('cannot start %s: %s' % (argv[0], exc.strerror or exc)) from exc
    process = command.subprocess
    if process is None:  # executor turns ENOENT (e.g. a missing "#!" interpreter) into status 127
        raise CommandNotFound('cannot start %s: it or its interpreter does not exist' % argv[0])
    pid = process.pid
    selector = selectors.DefaultSelector()
    streams = {process.stdout.fileno(): 'stdout', process.stderr.fileno(): 'stderr'}
    for fd in streams:
        _grow_pipe(fd)
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pending_input = memoryview(stdin)
    stdin_fd = process.stdin.fileno()
    if pending_input:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        process.stdin.close()
    deadline = None if timeout is None else started + timeout
    kill_at = None  # type: Optional[float]
    emitted = {'stdout': 0, 'stderr': 0}
    buffer = ReadBuffer(CHUNK_SIZE)  # reused by every read of both pipes
    try:
        while selector.get_map():
            now = time.monotonic()
            if kill_at is None and ((deadline is not None and now >= deadline) or (cancelled and cancelled.is_set())):
                result.timed_out = not (cancelled and cancelled.is_set())
                result.cancelled = not result.timed_out
                logger.info("Stopping %s (%s)", argv[0], 'timeout' if result.timed_out else 'cancelled')
                _signal_group(pid, signal.SIGTERM)
                kill_at = now + kill_grace
            elif kill_at is None and process.poll() is not None:
                # The command has exited but something it left behind still holds a pipe open.
                _signal_group(pid, signal.SIGKILL)
            elif kill_at is not None and now >= kill_at:
                _signal_group(pid, signal.SIGKILL)
                kill_at = float('inf')
            # Wake at least every 0.1 s to notice cancellation (an Event cannot be selected on).
            wake_at = min(t for t in (deadline if kill_at is None else kill_at, now + 0.1) if t is not None)
            for key, _ in selector.select(max(0.0, wake_at - now)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending_input = pending_input[os.write(fd, pending_input[:CHUNK_SIZE]):]
                    except BrokenPipeError:
                        pending_input = memoryview(b'')
                    if not pending_input:
                        selector.unregister(fd)
                        process.stdin.close()
                    continue
                try:
                    chunk = buffer.read(fd)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    continue
                name = streams[fd]
                keep = len(chunk) if max_output is None else max(0, min(len(chunk), max_output - emitted[name]))
                if keep < len(chunk):
                    setattr(result, name + '_truncated', True)
                if keep and on_output is not None:
                    on_output(name, chunk[:keep])
                emitted[name] += keep
        returncode = process.wait()
    finally:
        # Whatever happened (even an exception in a callback): no process of the group survives.
        _signal_group(pid, signal.SIGKILL)
        selector.close()
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if process.returncode is None:
            process.wait()
        command.cleanup()
    result.duration = time.monotonic() - started
    result.stdout_bytes, result.stderr_bytes = emitted['stdout'], emitted['stderr']
    if returncode < 0:
        result.signal = -returncode
    else:
        result.exit_status = returncode
    return result
