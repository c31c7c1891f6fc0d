"""
What the ``negotiator-host`` and ``negotiator-guest`` programs share: option parsing, logging,
output (the ``--json`` shape of a failure, the list of commands) and the edges of a Unix
program (standard input, a closed pipe, Ctrl-C, text from a peer).

Both CLIs take ``--timeout`` and ``--max-output`` with the same meaning and ``-v``/``-q`` with
the same steps, so they live here once. Logging is configured only by the programs, never by the
library; a quick client call without ``-v`` skips coloredlogs altogether (it costs tens of
milliseconds of start-up, and such a call reports its own failures as one line each).
coloredlogs and humanfriendly are dependencies of negotiator-common (executor needs both
anyway), imported only when a program needs them.
"""

import os
import stat
import sys
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Set

if TYPE_CHECKING:
    from negotiator_common.client import CommandDescription

__all__ = ('UsageError', 'MAX_TIMEOUT_OPTION', 'apply_shared_option', 'parse_timeout', 'parse_size', 'printable',
           'stdin_source',
           'read_stdin', 'setup_logging', 'split_command', 'silence_broken_pipe', 'exit_now', 'FullWriter',
           'write_stdout', 'error_object', 'json_failure', 'format_commands', 'run_program',
           'open_closed_standard_streams')

_LOG_FORMAT = '%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s'

MAX_TIMEOUT_OPTION = 365 * 24 * 3600.0
"""
The largest ``--timeout`` (a year, in seconds): longer is a typo, and far beyond it a wait
overflows (``threading.TIMEOUT_MAX``, about 292 years on Linux, raises ``OverflowError``).
An ``--execute`` is also held to the agent's own ``max_timeout`` (24 hours by default).
"""


class UsageError(Exception):
    """A wrong command line (exit status 64)."""


def parse_timeout(value: str) -> Optional[float]:
    """
    ``--timeout`` as seconds: a number (fractional; ``.5`` and ``1e3`` too) or a timespan such as
    ``90s``, ``2m`` or ``1.5 hours`` (:func:`humanfriendly.parse_timespan`, as in executor's own
    CLI); 0 means no bound (None). A bare number is read without importing humanfriendly, so the
    usual ``-t 30`` costs a quick call no start-up time.
    """
    try:
        seconds = float(value)
    except ValueError:
        from humanfriendly import InvalidTimespan, parse_timespan
        try:
            seconds = parse_timespan(value)
        except InvalidTimespan:
            raise UsageError('--timeout needs a number of seconds or a timespan like 90s or 2m, not %r'
                             % value) from None
    if not 0 <= seconds <= MAX_TIMEOUT_OPTION:
        raise UsageError('--timeout needs 0 (no bound) or a time up to %d seconds (a year), not %r'
                         % (MAX_TIMEOUT_OPTION, value))
    return seconds or None


def parse_size(value: str, option: str = '--max-output') -> int:
    """``option``'s value as a number of bytes (``16M`` and ``1 GiB`` are binary units: 16 MiB, 1 GiB)."""
    from humanfriendly import InvalidSize, parse_size as parse_human_size
    try:
        size = parse_human_size(value, binary=True)
    except InvalidSize:
        raise UsageError('%s needs a number of bytes (like 1048576 or 16M), not %r' % (option, value)) from None
    if size < 0:
        raise UsageError('%s cannot be negative: %r' % (option, value))
    return int(size)


def read_stdin() -> bytes:
    """All of standard input, for ``--stdin``; a closed or unreadable standard input is a usage error."""
    _check_stdin_open()
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError) as exc:
        raise UsageError('--stdin was given but standard input cannot be read: %s' % exc) from None


def _check_stdin_open() -> None:
    """--stdin refuses a standard input that the program found closed (Python then starts with sys.stdin None)."""
    if sys.stdin is None or 0 in CLOSED_AT_START:
        raise UsageError('--stdin was given but standard input is closed')


def stdin_source() -> BinaryIO:
    """
    Standard input as a binary file, for ``--stdin`` to stream it (read as the agent takes it);
    a closed standard input, or one that is a directory, is a usage error at once.
    """
    _check_stdin_open()
    try:
        if stat.S_ISDIR(os.fstat(sys.stdin.fileno()).st_mode):
            raise UsageError('--stdin was given but standard input is a directory')
    except (OSError, ValueError) as exc:
        raise UsageError('--stdin was given but standard input cannot be read: %s' % exc) from None
    return sys.stdin.buffer


def signal_note(program: str, command: str, where: str, signal_number: Optional[int]) -> str:
    """
    The line a CLI writes to standard error when a command it ran on the other side was ended
    by a signal (its exit status, 128 + N, would otherwise be all the user sees: a command
    killed because a daemon stopped looks like one that failed in silence); '' otherwise.
    """
    if not signal_number:
        return ''
    import signal

    try:
        name = ' (%s)' % signal.Signals(signal_number).name
    except ValueError:
        name = ''
    return '%s: %s %s was ended by signal %d%s\n' % (program, printable(command), where, signal_number, name)


def printable(text: object) -> str:
    """
    ``text`` with every control and format character escaped (``\\x1b``, ``\\u202e``), for
    showing on a terminal text that came from a peer (command names, versions, error messages):
    a hostile guest must not move the cursor, retitle the window or reverse the text. Command
    output is not text of this kind: it passes through byte for byte.
    """
    import unicodedata
    escaped = []
    for char in str(text):
        if unicodedata.category(char) in ('Cc', 'Cf', 'Cs', 'Zl', 'Zp'):
            code = ord(char)
            escaped.append('\\x%02x' % code if code < 0x100 else '\\u%04x' % code if code < 0x10000
                           else '\\U%08x' % code)
        else:
            escaped.append(char)
    return ''.join(escaped)


class FullWriter(object):
    """
    A binary sink that writes all of every chunk, or raises.

    An unbuffered standard output (``python -u``, ``PYTHONUNBUFFERED=1``) is a raw file whose
    ``write`` may take part of a chunk when a signal arrives or the reader goes away: the rest
    was lost without a word, and ``| head`` "succeeded" with status 0. Writing the rest shows
    the closed pipe (``BrokenPipeError``) like any other write to it.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = self.stream.write(view)
            view = view[written or 0:]
        return len(data)

    def flush(self) -> None:
        self.stream.flush()


def write_stdout(text: str) -> None:
    """Write ``text`` (ASCII or UTF-8: JSON, or lines of ours) to standard output in full, and flush."""
    sys.stdout.flush()
    out = FullWriter(sys.stdout.buffer)
    out.write(text.encode('utf-8', 'surrogateescape'))
    out.flush()


def silence_broken_pipe() -> None:
    """
    After standard output (or error) was closed by its reader, point both at ``/dev/null``:
    the program then ends quietly, as a filter killed by SIGPIPE does, instead of failing
    again when Python flushes them at exit.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def run_program(run: Callable[[Sequence[str]], int], arguments: Optional[Sequence[str]] = None) -> None:
    """
    A CLI's ``main``: ``run(arguments)`` (default: the command line's) and exit with its status;
    after Ctrl-C at once (:func:`exit_now`). Closed standard streams are opened first
    (:func:`open_closed_standard_streams`).
    """
    from negotiator_common.exit_status import EXIT_INTERRUPTED

    open_closed_standard_streams()
    status = run(sys.argv[1:] if arguments is None else arguments)
    if status == EXIT_INTERRUPTED:
        exit_now(status)
    sys.exit(status)


CLOSED_AT_START: Set[int] = set()
"""The standard descriptors that the program found closed (--stdin refuses a closed standard input)."""


def open_closed_standard_streams() -> None:
    """
    Open ``/dev/null`` on each standard descriptor (0, 1, 2) that the caller left closed, and
    give :mod:`sys` a stream on it: a closed standard input reads as empty (but ``--stdin``
    refuses it, :func:`stdin_source`), and output to a closed standard output or error goes
    nowhere, as with ``/dev/null``.

    Why: Python leaves ``sys.stdin`` None when descriptor 0 is closed (``--bridge <&-`` failed
    with a traceback), and the next file opened would take the free number, so that a channel's
    socket could become "standard output" and receive what was meant for the terminal.
    """
    for fd, name, mode in ((0, 'stdin', 'r'), (1, 'stdout', 'w'), (2, 'stderr', 'w')):
        try:
            os.fstat(fd)
            continue
        except OSError:
            CLOSED_AT_START.add(fd)
        # The kernel gives the lowest free number: this one, as those below are open by now.
        opened = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
        assert opened == fd, (opened, fd)
        setattr(sys, name, open(fd, mode, closefd=False))


def exit_now(status: int) -> None:
    """
    Flush what can be flushed and end the process at once, without waiting for threads.

    After Ctrl-C, calls may still be connecting on worker threads (with ``-t 0``, forever);
    ending the process closes every connection, and an agent that sees its client go cancels
    the client's commands (``docs/faults.rst``, "Client disconnects mid-request").
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def split_command(value: str) -> List[str]:
    """``--execute``'s COMMAND split into arguments as a shell would split it (no shell runs it)."""
    import shlex
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise UsageError('cannot split --execute=%r: %s' % (value, exc)) from None
    if not argv:
        raise UsageError('--execute needs a command')
    return argv


def apply_shared_option(options: Any, option: str, value: str) -> bool:
    """
    Apply one of the options that both CLIs take with the same meaning (``-i``, ``-t``, ``-j``,
    ``--max-output``, ``--commands-dir``, ``-v``, ``-q``) to ``options``; False when ``option``
    is not one of them.
    """
    if option in ('-i', '--stdin'):
        options.stdin = True
    elif option in ('-t', '--timeout'):
        options.timeout = parse_timeout(value)
    elif option in ('-j', '--json'):
        options.json = True
    elif option == '--max-output':
        options.max_output = parse_size(value)
    elif option == '--commands-dir':
        options.commands_dirs.append(value)
    elif option in ('-v', '--verbose'):
        options.verbosity += 1
    elif option in ('-q', '--quiet'):
        options.verbosity -= 1
    else:
        return False
    return True


def setup_logging(verbosity: int, daemon: bool, syslog: bool = False) -> None:
    """
    Log to standard error through coloredlogs: INFO for a daemon, WARNING for a client call,
    one level more per ``-v`` (``verbosity`` > 0) and one less per ``-q``, over logging's five
    standard levels (the ones negotiator logs at).

    Not ``coloredlogs.increase_verbosity()``: it steps through every level defined at the time,
    and importing executor defines verboselogs' SPAM, VERBOSE, NOTICE and SUCCESS, so one ``-v``
    of a client call would mean NOTICE, at which nothing is logged, or INFO, depending on what
    was imported first.
    """
    if verbosity == 0 and not daemon and not syslog:
        return
    import logging
    import coloredlogs
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    default = levels.index(logging.INFO if daemon else logging.WARNING)
    level = levels[max(0, min(len(levels) - 1, default - verbosity))]
    # executor logs every process it starts at DEBUG: only from two -v on.
    logging.getLogger('executor').setLevel(logging.DEBUG if verbosity >= 2 else max(level, logging.INFO))
    coloredlogs.install(level=level, stream=sys.stderr, syslog=syslog, fmt=_LOG_FORMAT)


def error_object(error: BaseException) -> Dict[str, Any]:
    """
    A failure as ``--json`` shows it, in both CLIs: ``type`` (the exception's class),
    ``code`` (its wire code; None for an error that is not negotiator's), ``message`` and
    ``data`` (the details the error carries, ``{}`` when none).
    """
    return {'type': type(error).__name__, 'code': getattr(error, 'code', None),
            'message': str(error) or type(error).__name__, 'data': dict(getattr(error, 'data', None) or {})}


def json_failure(error: BaseException, exit_status: int) -> Dict[str, Any]:
    """
    The ``--json`` object of a failed call, in both CLIs: ``{"error": {...}, "exit_status": N}``
    (:func:`error_object`, and the exit status that the failure gives). ``negotiator-host`` adds
    ``guest`` and ``ok`` to it; a command's own result has ``exit_status`` and no ``error``.
    """
    return {'error': error_object(error), 'exit_status': exit_status}


def format_commands(commands: Sequence['CommandDescription'], guests: Optional[Sequence[str]] = None) -> str:
    """
    What ``--list-commands`` prints in both CLIs: a line per command, its name and description
    in aligned columns, after ``GUEST:`` when ``guests`` (one name per command) is given, as
    ``negotiator-host`` prefixes every line of several guests' output. Names and descriptions
    are the peer's text, shown :func:`printable`.

    Not :mod:`humanfriendly.tables` (which ``--list-guests`` uses, where each probe takes
    milliseconds anyway): importing it costs more than the rest of this quick call. Measured
    on ``negotiator-host --list-commands GUEST`` against a local agent, alternating 25 runs
    each: 342 ms median without it, 594 ms with it (on a loaded machine; the benchmark's "one
    CLI call" figure times this call). And a line that starts with the command's name is read
    as easily by ``awk`` as by a person.
    """
    prefixes = ['%s: ' % printable(guest) for guest in guests] if guests is not None else [''] * len(commands)
    names = [prefix + printable(command.name) for prefix, command in zip(prefixes, commands)]
    width = max([len(name) for name in names] + [0])
    return ''.join((name.ljust(width) + '  ' + printable(command.description)).rstrip() + '\n'
                   for name, command in zip(names, commands))
