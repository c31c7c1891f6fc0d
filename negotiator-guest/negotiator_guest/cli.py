"""
Usage: negotiator-guest [OPTIONS]

Serve the host's requests inside a KVM/QEMU guest (--daemon), or ask the host's
negotiator daemon from inside the guest (--list-commands, --execute), over
virtio-serial ports: no networking needed.

Supported options:

  -d, --daemon

    Serve the host's requests on the port of the channel negotiator-host-to-guest.0
    (or the older negotiator-channel.0) until SIGTERM or SIGINT. Logs go to standard
    error. Meant to run under systemd or supervisord.

  --allow-exec

    With --daemon: let the host run any program in this guest, as the daemon's user
    (the wire method exec: an argv list, no shell added; the Ansible connection plugin
    needs it). Off by default: the host may then run only the commands of the commands
    directories, and exec is refused (exit status 77 on the host).

  --allow-files[=PREFIXES]

    With --daemon: let the host push files into this guest and pull files out of it
    (negotiator-host --copy), anywhere, or with PREFIXES (comma-separated absolute
    paths, like /srv,/tmp) only under those directories, checked after symlinks are
    resolved. Off by default: file access is a power over the guest that its owner grants.

  -l, --list-commands

    List the commands that the host offers this guest, with their descriptions.

  -e, --execute=COMMAND

    Run COMMAND (with its arguments, split as a shell would, with shlex; no shell runs
    it) on the host. Its standard output and error become ours, byte for byte, and its
    exit status becomes ours (128 + N when signal N killed it).

  -i, --stdin

    Forward standard input to the command (without it the command gets empty input).

  -t, --timeout=SECONDS

    Bound on the whole call, connecting included: seconds (fractional) or a timespan
    like 90s or 2m (0 means no bound; default 10).

  -j, --json

    Print a JSON object instead of text (for scripts): the command's exit status and
    output, the list of commands, or the error and the exit status it gives.

  --max-output=BYTES

    With --json, keep at most this much of the command's standard output and of its
    standard error (default 16M; binary units); the rest is dropped and
    stdout_truncated/stderr_truncated say so. Output passed through is never cut.

  -c, --character-device=PATH

    Use this port instead of finding it by channel name.

  --commands-dir=DIR

    Where this guest's commands live (repeatable; default /usr/lib/negotiator/commands).

  --syslog

    Also log to the system log (daemon mode).

  -v, --verbose

    Log more (repeatable).

  -q, --quiet

    Log less (repeatable).

  -h, --help

    Show this message and exit.

Exit statuses of negotiator's own failures (a command's own status passes through):

  64  usage error (a wrong option or argument, or a request over the host's limits)
  69  channel unavailable: no such port, port busy, or no host daemon connected
  70  internal or protocol error
  75  timeout: no reply in time, or the command ran too long and was killed
  77  command refused by the host's policy, or no such command
  130  interrupted (Ctrl-C): the call is cancelled on the host
  141  standard output closed by its reader (| head)
"""

import sys
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, cast

from negotiator_common.cli_support import (
    FullWriter, UsageError, apply_shared_option, format_commands, json_failure, printable, run_program,
    stdin_source, setup_logging, signal_note, silence_broken_pipe, split_command, write_stdout,
)
from negotiator_common.exit_status import (
    EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, exit_status_for, exit_status_of_result,
)

__all__ = ('main', 'run', 'Options', 'parse_options', 'exit_status_for')

PROGRAM = 'negotiator-guest'

DEFAULT_TIMEOUT = 10.0
"""Seconds that a call may take when --timeout does not say."""

_SHORT_OPTIONS = 'dle:it:jc:vqh'
_LONG_OPTIONS = ['daemon', 'list-commands', 'execute=', 'stdin', 'timeout=', 'json', 'max-output=',
                 'character-device=', 'commands-dir=', 'syslog', 'allow-exec', 'verbose', 'quiet', 'help']

_ACTIONS = {'-d': 'daemon', '--daemon': 'daemon', '-l': 'list-commands', '--list-commands': 'list-commands',
            '-e': 'execute', '--execute': 'execute', '-h': 'help', '--help': 'help'}
"""The options that choose what the program does (one of them; --help wins over the others)."""


class Options(object):
    """What the command line asked for."""

    def __init__(self) -> None:
        self.action: Optional[str] = None
        self.command: List[str] = []
        self.stdin = False
        self.timeout: Optional[float] = DEFAULT_TIMEOUT
        self.json = False
        self.max_output: Optional[int] = None  # None: the API's default
        self.character_device: Optional[str] = None
        self.commands_dirs: List[str] = []
        self.syslog = False
        self.allow_exec = False
        self.verbosity = 0
        self.allow_files: Optional[List[str]] = None  # None: off; ['/']: everywhere


def parse_options(arguments: Sequence[str]) -> Options:
    """Turn the command line into :class:`Options`; raise :class:`UsageError` if it is wrong."""
    import getopt
    arguments, allow_files = _allow_files(arguments)
    try:
        pairs, rest = getopt.gnu_getopt(list(arguments), _SHORT_OPTIONS, _LONG_OPTIONS)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    if rest:
        raise UsageError('unexpected argument %r (quote the whole command: -e "COMMAND ARG...")' % rest[0])
    options = Options()
    actions = set()
    for option, value in pairs:
        if option in _ACTIONS:
            actions.add(_ACTIONS[option])
            if option in ('-e', '--execute'):
                options.command = split_command(value)
        elif option in ('-c', '--character-device'):
            options.character_device = value
        elif option == '--syslog':
            options.syslog = True
        elif option == '--allow-exec':
            options.allow_exec = True
        else:
            apply_shared_option(options, option, value)
    options.allow_files = allow_files
    if allow_files is not None and actions != {'daemon'} and 'help' not in actions:
        raise UsageError('--allow-files goes with --daemon')
    if 'help' in actions:
        options.action = 'help'
    elif len(actions) > 1:
        raise UsageError('choose one of --daemon, --list-commands and --execute')
    elif actions:
        options.action = actions.pop()
    if options.allow_exec and options.action not in ('daemon', 'help'):
        raise UsageError('--allow-exec is an option of --daemon')
    return options


def _allow_files(arguments: Sequence[str]) -> Tuple[List[str], Optional[List[str]]]:
    """
    The arguments without ``--allow-files[=PREFIXES]`` (getopt has no optional values), and the
    prefixes it allows: None without it, ``['/']`` for everywhere.
    """
    rest: List[str] = []
    prefixes: Optional[List[str]] = None
    for argument in arguments:
        if argument == '--allow-files':
            prefixes = ['/']
        elif argument.startswith('--allow-files='):
            prefixes = [prefix for prefix in argument.split('=', 1)[1].split(',') if prefix]
            if not prefixes or not all(prefix.startswith('/') for prefix in prefixes):
                raise UsageError('--allow-files takes absolute paths separated by commas, not %r' % argument)
        else:
            rest.append(argument)
    return rest, prefixes


def _advice(error: BaseException) -> str:
    from negotiator_common.errors import CallTimeout, CommandNotFound, CommandTimedOut
    if isinstance(error, CommandTimedOut):
        return ' (raise --timeout if the command needs longer)'
    if isinstance(error, CallTimeout):
        return ' (is negotiator-host --daemon running on the host? raise --timeout for slow commands)'
    if isinstance(error, CommandNotFound):
        return ' (see negotiator-guest --list-commands)'
    return ''


def _print_json(data: Dict[str, object]) -> None:
    import json
    write_stdout(json.dumps(data, indent=2, sort_keys=True) + '\n')


def _run_daemon(options: Options) -> int:
    from negotiator_common.commands import DEFAULT_COMMANDS_DIR, CommandRegistry
    from negotiator_common.service import AgentService
    from negotiator_guest import __version__
    from negotiator_guest.daemon import GuestDaemon
    registry = CommandRegistry(options.commands_dirs or [DEFAULT_COMMANDS_DIR])
    from negotiator_common.fileservice import FileService
    service = AgentService('negotiator-guest', registry, version=__version__, allow_exec=options.allow_exec,
                           files=FileService(options.allow_files))
    return GuestDaemon(service, path=options.character_device).run()


def _run_client(options: Options) -> int:
    from negotiator_guest.client import HostClient
    client = HostClient(options.character_device, timeout=options.timeout)
    if options.action == 'list-commands':
        commands = client.list_commands()
        if options.json:
            _print_json({'commands': [c.to_dict() for c in commands]})
        else:
            sys.stdout.write(format_commands(commands))
        return 0
    stdin = stdin_source() if options.stdin else None
    if options.json:
        from negotiator_common.client import DEFAULT_MAX_OUTPUT
        max_output = DEFAULT_MAX_OUTPUT if options.max_output is None else options.max_output
        result = client.execute(options.command[0], *options.command[1:], input=stdin, max_output=max_output)
        _print_json(result.to_dict())
    else:
        # execute writes to binary file objects, and calls only their write and flush.
        result = client.execute(options.command[0], *options.command[1:], input=stdin,
                                stdout=cast(BinaryIO, FullWriter(sys.stdout.buffer)),
                                stderr=cast(BinaryIO, FullWriter(sys.stderr.buffer)))
        sys.stderr.write(signal_note(PROGRAM, options.command[0], 'on the host', result.signal))
    return exit_status_of_result(result.exit_status, result.signal)


def main(arguments: Optional[Sequence[str]] = None) -> None:
    """The ``negotiator-guest`` program (:func:`~negotiator_common.cli_support.run_program`)."""
    run_program(run, arguments)


def run(arguments: Sequence[str]) -> int:
    """Run the CLI with ``arguments`` (without the program name) and return the exit status."""
    try:
        options = parse_options(arguments)
    except UsageError as exc:
        sys.stderr.write('%s: %s (see %s --help)\n' % (PROGRAM, exc, PROGRAM))
        return EXIT_USAGE
    if options.action in (None, 'help'):
        from humanfriendly.terminal import usage
        usage(__doc__.strip())
        return 0 if options.action == 'help' else EXIT_USAGE
    setup_logging(options.verbosity, daemon=options.action == 'daemon', syslog=options.syslog)
    from negotiator_common.errors import CommandFailed, NegotiatorError
    try:
        if options.action == 'daemon':
            return _run_daemon(options)
        return _run_client(options)
    except NegotiatorError as exc:
        if isinstance(exc, CommandFailed) and exc.exit_status is not None:
            return exit_status_for(exc)
        status = exit_status_for(exc)
        if options.json:
            _print_json(json_failure(exc, status))
        sys.stderr.write('%s: %s%s\n' % (PROGRAM, printable(exc.message), _advice(exc)))
        return status
    except UsageError as exc:
        sys.stderr.write('%s: %s\n' % (PROGRAM, exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write('%s: interrupted\n' % PROGRAM)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_broken_pipe()
        return EXIT_BROKEN_PIPE
