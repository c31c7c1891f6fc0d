"""
Usage: negotiator-host [OPTIONS] [GUEST...]
       negotiator-host --daemon [OPTIONS] [GUEST-PATTERN...]

Talk to the negotiator agents in the KVM/QEMU guests of this host through virtio-serial
channels (no network, no SSH), or answer the guests' own requests (--daemon).

Examples:

  negotiator-host --list-guests
  negotiator-host --ping web-1
  negotiator-host --list-commands web-1
  negotiator-host --execute 'df -h /' web-1
  echo hello | negotiator-host web-1 web-2 --stdin --execute cat
  negotiator-host --all --json --execute uptime

Supported options:

  -g, --list-guests

    List the running guests that have a negotiator channel: name, state, whether the
    agent answers (within 3 seconds, or --timeout if shorter), its version and the
    round-trip time (--json: a list of objects).

  -c, --list-commands

    List the commands that each GUEST offers.

  -e, --execute=COMMAND

    Run COMMAND (with its arguments, split as a shell would) on each GUEST. With one
    guest its standard output and error are passed on byte for byte and its exit status
    becomes ours; with several guests they run in parallel, each output line is prefixed
    with the guest's name, and the exit status is non-zero when any failed.

  -p, --ping

    Check each GUEST's agent and print the round-trip time.

  -i, --stdin

    Forward standard input to the command (without it the command gets empty input).

  -t, --timeout=SECONDS

    Bound on the whole call, fractional seconds (0 means no bound; default 10).

  -a, --all

    Every running guest that has the channel, in parallel.

  -j, --json

    Machine-readable output: one JSON object per guest (a list for --list-guests).

  --max-output=BYTES

    With --json, keep at most this much of each guest's standard output and of its
    standard error (default 16M; binary units: 16M is 16 MiB); the rest is dropped and
    stdout_truncated/stderr_truncated say so. Output passed through is never cut.

  --connect=URI

    The libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system).

  -d, --daemon

    Answer the guests' requests on their negotiator-guest-to-host.0 channels, following
    guests as they start and stop, until SIGTERM or SIGINT. With GUEST-PATTERN arguments
    (shell-style, like 'web-*'), serve only the guests whose names match one of them;
    without any, every guest.

  --commands-dir=DIR

    Where the host's commands live (repeatable; default /usr/lib/negotiator/commands).

  --policy=FILE

    Which guests may run which host commands (an INI file; see the documentation).
    Without it every guest may run every command of the commands directories, and
    no built-in; a built-in reaches a guest only where the policy names it.

  --max-commands=N

    With --daemon: how many commands run at once, for all guests together (default 8).
    Further requests wait their turn, round-robin by guest.

  --max-queued=N

    With --daemon: how many requests may wait for a free slot, for all guests together
    (default 32); beyond that a guest's request is refused at once.

  --max-timeout=SECONDS

    With --daemon: the longest a guest may ask a command to run (default 600). A
    command runs 60 seconds (or this, if less) when the guest does not say.

  -v, --verbose

    Log more (repeatable).

  -q, --quiet

    Log less (repeatable).

  -h, --help

    Show this message and exit.

Exit statuses: 0 success; with one guest and --execute, the command's own status (128+N
when signal N ended it); 64 usage error (also a request over the agent's limits); 69 guest,
channel or libvirt not available (unknown or stopped guest, no channel, channel busy, agent
gone); 70 internal or protocol error; 75 timeout; 77 command refused by the guest's policy
or not found; 130 interrupted (Ctrl-C; the calls are cancelled in the guests); 141 standard
output closed by its reader (| head). With several guests: the status of the first guest
(in the order given; --all: by name) that failed.
"""

import getopt
import sys
from typing import Any, Dict, List, Optional, Sequence

from negotiator_common.cli_support import (
    FullWriter, UsageError, apply_shared_option, exit_now, printable, read_stdin, setup_logging, silence_broken_pipe,
    split_command, write_stdout,
)
from negotiator_common.exit_status import (  # the one table of both CLIs
    EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_REFUSED as EX_NOPERM, EXIT_SOFTWARE as EX_SOFTWARE,
    EXIT_TIMEOUT as EX_TEMPFAIL, EXIT_UNAVAILABLE as EX_UNAVAILABLE, EXIT_USAGE as EX_USAGE,
)

__all__ = ('main', 'run', 'exit_status_for', 'EX_USAGE', 'EX_UNAVAILABLE', 'EX_SOFTWARE', 'EX_TEMPFAIL',
           'EX_NOPERM')

PROGRAM = 'negotiator-host'

LIST_PROBE_TIMEOUT = 3.0
"""Seconds that --list-guests waits for each agent (at most; a smaller --timeout wins)."""

MAX_PENDING_LINE = 64 * 1024
"""
Bytes of a line without its newline that the prefixer of several guests' output holds: a longer
line is written in pieces of this size, each prefixed, so a guest's output without newlines
costs no memory and no time beyond this.
"""


def exit_status_for(error: BaseException) -> int:
    """The CLI's exit status for one of negotiator's own failures (the table it shares with negotiator-guest)."""
    from negotiator_common.exit_status import exit_status_for as common_exit_status_for
    from negotiator_host.discovery import LibvirtUnavailable

    if isinstance(error, UsageError):
        return EX_USAGE
    if isinstance(error, LibvirtUnavailable):
        return EX_UNAVAILABLE
    return common_exit_status_for(error)


def _result_status(result: Any) -> int:
    from negotiator_common.exit_status import exit_status_of_result
    return exit_status_of_result(result.exit_status, result.signal)


def _error_line(guest: str, error: BaseException) -> str:
    """One line on standard error; the message may come from the guest, so its control characters are escaped."""
    message = printable(' '.join(str(error).split()) or type(error).__name__)
    return '%s: %s%s' % (PROGRAM, '%s: ' % printable(guest) if guest else '', message)


def _error_object(error: BaseException) -> Dict[str, Any]:
    return {'type': type(error).__name__, 'code': getattr(error, 'code', None),
            'message': ' '.join(str(error).split()), 'exit_status': exit_status_for(error)}


class _Options(object):
    def __init__(self) -> None:
        self.action: Optional[str] = None
        self.command = ''
        self.stdin = False
        self.timeout: Optional[float] = 10.0
        self.max_output: Optional[int] = None  # None: the API's default
        self.all = False
        self.json = False
        self.uri: Optional[str] = None
        self.commands_dirs: List[str] = []
        self.policy: Optional[str] = None
        self.daemon_limits: Dict[str, Any] = {}
        self.verbosity = 0
        self.guests: List[str] = []


def parse_options(argv: Sequence[str]) -> _Options:
    """Parse the command line (options may come before and after guest names)."""
    try:
        options, arguments = getopt.gnu_getopt(list(argv), 'gce:pit:ajdvqh', [
            'list-guests', 'list-commands', 'execute=', 'ping', 'stdin', 'timeout=', 'all', 'json', 'max-output=',
            'connect=', 'daemon', 'commands-dir=', 'policy=', 'max-commands=', 'max-queued=', 'max-timeout=',
            'verbose', 'quiet', 'help'])
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    parsed = _Options()

    def set_action(action: str) -> None:
        if parsed.action not in (None, action):
            raise UsageError('choose one of --list-guests, --list-commands, --execute, --ping and --daemon')
        parsed.action = action

    for option, value in options:
        if option in ('-g', '--list-guests'):
            set_action('list-guests')
        elif option in ('-c', '--list-commands'):
            set_action('list-commands')
        elif option in ('-e', '--execute'):
            set_action('execute')
            parsed.command = value
        elif option in ('-p', '--ping'):
            set_action('ping')
        elif option in ('-d', '--daemon'):
            set_action('daemon')
        elif option in ('-a', '--all'):
            parsed.all = True
        elif option == '--connect':
            parsed.uri = value
        elif option == '--policy':
            parsed.policy = value
        elif option in _DAEMON_LIMITS:
            parsed.daemon_limits[option] = _parse_daemon_limit(option, value)
        elif apply_shared_option(parsed, option, value):
            pass
        elif option in ('-h', '--help'):
            set_action('help')
    parsed.guests = arguments
    for name in arguments:
        _check_utf8(name, 'GUEST-PATTERN' if parsed.action == 'daemon' else 'GUEST')
    if parsed.action is None:
        raise UsageError('nothing to do: give --list-guests, --ping, --list-commands, --execute or --daemon')
    if parsed.action in ('ping', 'list-commands', 'execute') and not parsed.guests and not parsed.all:
        raise UsageError('name at least one GUEST (or give --all)')
    if parsed.action == 'daemon' and parsed.all:
        raise UsageError('--daemon serves every guest unless given GUEST-PATTERNs; --all makes no sense with it')
    if parsed.daemon_limits and parsed.action != 'daemon':
        raise UsageError('%s is an option of --daemon' % sorted(parsed.daemon_limits)[0])
    if parsed.action == 'execute':
        parsed.argv = split_command(parsed.command)  # type: ignore
    return parsed


def _check_utf8(name: str, what: str) -> None:
    """libvirt names are UTF-8 text: a name that is not (bytes from another locale) names no guest."""
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        raise UsageError('%s %s is not valid UTF-8, so it names no guest' % (what, printable(ascii(name)))) from None


_DAEMON_LIMITS = {'--max-commands': (int, 1), '--max-queued': (int, 0), '--max-timeout': (float, 0.001)}
"""The daemon's bounds across guests: each option's type and least value."""


def _parse_daemon_limit(option: str, value: str) -> Any:
    kind, least = _DAEMON_LIMITS[option]
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not least <= number < float('inf'):
        raise UsageError('%s needs %s of at least %s, not %r' % (
            option, 'a whole number' if kind is int else 'a number of seconds', least, value))
    return number


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``negotiator-host`` program: run and exit with its status."""
    status = run(sys.argv[1:] if argv is None else argv)
    if status == EXIT_INTERRUPTED:
        exit_now(status)  # worker threads may still be connecting: do not wait for them
    sys.exit(status)


def run(argv: Sequence[str]) -> int:
    """Run the CLI with ``argv`` (without the program name) and return the exit status."""
    try:
        options = parse_options(argv)
    except UsageError as exc:
        sys.stderr.write('%s: error: %s (see %s --help)\n' % (PROGRAM, exc, PROGRAM))
        return EX_USAGE
    if options.action == 'help':
        from humanfriendly.terminal import usage
        usage(__doc__)
        return 0
    setup_logging(options.verbosity, daemon=options.action == 'daemon')
    try:
        if options.action == 'daemon':
            return _run_daemon(options)
        if options.action == 'list-guests':
            return _list_guests(options)
        return _run_on_guests(options)
    except KeyboardInterrupt:
        sys.stderr.write('%s: interrupted\n' % PROGRAM)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_broken_pipe()
        return EXIT_BROKEN_PIPE
    except UsageError as exc:
        sys.stderr.write('%s: error: %s\n' % (PROGRAM, exc))
        return EX_USAGE
    except Exception as exc:
        from negotiator_common.errors import NegotiatorError
        from negotiator_host.policy import PolicyError
        if not isinstance(exc, (NegotiatorError, PolicyError)):
            raise
        sys.stderr.write(_error_line('', exc) + '\n')
        return EX_USAGE if isinstance(exc, PolicyError) else exit_status_for(exc)


def _run_daemon(options: _Options) -> int:
    from negotiator_common.commands import DEFAULT_COMMANDS_DIR
    from negotiator_common.slots import DEFAULT_MAX_COMMANDS, DEFAULT_MAX_QUEUED
    from negotiator_host.daemon import DEFAULT_MAX_TIMEOUT, HostDaemon, default_limits
    from negotiator_host.policy import Policy

    policy = Policy.load(options.policy) if options.policy else Policy.default()
    limits = options.daemon_limits
    daemon = HostDaemon(uri=options.uri, commands_dirs=options.commands_dirs or [DEFAULT_COMMANDS_DIR], policy=policy,
                        guest_patterns=options.guests,
                        limits=default_limits(limits.get('--max-timeout', DEFAULT_MAX_TIMEOUT)),
                        max_commands=limits.get('--max-commands', DEFAULT_MAX_COMMANDS),
                        max_queued=limits.get('--max-queued', DEFAULT_MAX_QUEUED))
    return daemon.run()


def _targets(options: _Options) -> List[Any]:
    """The guests to talk to: names as given, or every running guest with the channel (--all)."""
    from negotiator_host.discovery import list_guests

    targets: List[Any] = list(options.guests)
    if options.all:
        named = set(options.guests)
        found = [g for g in list_guests(options.uri) if g.socket_for() is not None and g.name not in named]
        targets.extend(found)
    return targets


def _write_json(value: Any) -> None:
    import json
    write_stdout(json.dumps(value, sort_keys=True) + '\n')


class _LinePrefixer(object):
    """
    A binary sink that writes whole lines, each prefixed with a guest's name, under a shared lock.

    Linear in the output: each write copies the data once, and what waits for its newline is at
    most :data:`MAX_PENDING_LINE` bytes (a longer line goes out in prefixed pieces). Measured without
    a newline: 64 MiB in 0.17 s and 128 MiB in 0.32 s, 17 MiB peak, where joining the pending
    part to every new chunk took 9.0 s and 206 MiB, then 29.5 s and 398 MiB.
    """

    def __init__(self, prefix: bytes, target: Any, lock: Any) -> None:
        self.prefix = prefix
        self.target = target
        self.lock = lock
        self.partial = b''

    def write(self, data: bytes) -> int:
        buffered = self.partial + data  # the pending part is short: one copy of data
        end = buffered.rfind(b'\n') + 1
        lines = buffered[:end].split(b'\n')[:-1]
        rest = buffered[end:]
        whole = len(rest) - len(rest) % MAX_PENDING_LINE
        lines.extend(rest[start:start + MAX_PENDING_LINE] for start in range(0, whole, MAX_PENDING_LINE))
        self.partial = rest[whole:]
        if lines:
            with self.lock:
                self.target.write(b''.join(self.prefix + line + b'\n' for line in lines))
                self.target.flush()
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.partial:
            with self.lock:
                self.target.write(self.prefix + self.partial + b'\n')
                self.target.flush()
            self.partial = b''


def _run_on_guests(options: _Options) -> int:
    from negotiator_host.channel import GuestChannel, map_guests

    targets = _targets(options)
    if not targets:
        sys.stderr.write('%s: no running guest has a negotiator channel (see --list-guests)\n' % PROGRAM)
        return EX_UNAVAILABLE
    stdin = read_stdin() if options.stdin and options.action == 'execute' else None
    argv = getattr(options, 'argv', [])
    if len(targets) == 1 and not options.all and not options.json:
        return _one_guest(options, GuestChannel(targets[0], uri=options.uri, timeout=options.timeout), argv, stdin)

    import threading
    lock = threading.Lock()
    stdout = FullWriter(sys.stdout.buffer)
    stderr = FullWriter(sys.stderr.buffer)
    single = len(targets) == 1

    from negotiator_common.client import DEFAULT_MAX_OUTPUT
    max_output = DEFAULT_MAX_OUTPUT if options.max_output is None else options.max_output

    def work(channel: GuestChannel) -> Any:
        if options.action == 'ping':
            info = channel.hello()
            return {'rtt': channel.ping(), 'agent': info.get('agent'), 'version': info.get('version')}
        if options.action == 'list-commands':
            return channel.list_commands()
        if options.json:
            return channel.execute(argv[0], *argv[1:], input=stdin, max_output=max_output)
        prefix = channel.name.encode('utf-8', 'surrogateescape') + b': '
        out, err = _LinePrefixer(prefix, stdout, lock), _LinePrefixer(prefix, stderr, lock)
        try:
            return channel.execute(argv[0], *argv[1:], input=stdin, stdout=out, stderr=err)
        finally:
            out.close()
            err.close()

    outcomes = map_guests(work, targets, uri=options.uri, timeout=options.timeout)
    status = 0
    for outcome in outcomes:
        guest_status = 0
        if isinstance(outcome.error, BrokenPipeError):
            raise outcome.error
        if not outcome.ok:
            guest_status = exit_status_for(outcome.error)
            if options.json:
                _write_json({'guest': outcome.guest, 'ok': False, 'error': _error_object(outcome.error)})
            else:
                sys.stderr.write(_error_line(outcome.guest, outcome.error) + '\n')
        elif options.action == 'ping':
            if options.json:
                data = dict(outcome.result, guest=outcome.guest, ok=True)
                _write_json(data)
            else:
                sys.stdout.write(_ping_line(outcome.guest, outcome.result, outcome.result['rtt']))
        elif options.action == 'list-commands':
            if options.json:
                _write_json({'guest': outcome.guest, 'ok': True, 'commands': [c.to_dict() for c in outcome.result]})
            else:
                for command in outcome.result:
                    line = printable(command.name) if single else '%s: %s' % (outcome.guest, printable(command.name))
                    sys.stdout.write(line + '\n')
        else:
            guest_status = _result_status(outcome.result)
            if options.json:
                data = outcome.result.to_dict()
                data.update(guest=outcome.guest, ok=guest_status == 0)
                _write_json(data)
        if guest_status and not status:
            status = guest_status
    sys.stdout.flush()
    return status


def _ping_line(guest: str, info: Dict[str, Any], rtt: float) -> str:
    """What --ping prints for one guest; the agent's name and version are the guest's text, escaped."""
    return '%s: agent %s %s answered in %.2f ms\n' % (
        guest, printable(info.get('agent')), printable(info.get('version')), rtt * 1000)


def _one_guest(options: _Options, channel: Any, argv: List[str], stdin: Optional[bytes]) -> int:
    """One guest, plain output: the command's bytes and status pass straight through."""
    with channel:
        if options.action == 'ping':
            info = channel.hello()
            sys.stdout.write(_ping_line(channel.name, info, channel.ping()))
            return 0
        if options.action == 'list-commands':
            for command in channel.list_commands():
                sys.stdout.write(printable(command.name) + '\n')
            return 0
        stdout = FullWriter(sys.stdout.buffer)
        stderr = FullWriter(sys.stderr.buffer)
        sys.stdout.flush()
        result = channel.execute(argv[0], *argv[1:], input=stdin, stdout=stdout, stderr=stderr)
        stdout.flush()
        return _result_status(result)


def _list_guests(options: _Options) -> int:
    from negotiator_host.channel import map_guests
    from negotiator_host.discovery import list_guests

    guests = [g for g in list_guests(options.uri) if g.socket_for() is not None]
    if options.guests:
        named = set(options.guests)
        guests = [g for g in guests if g.name in named]

    def probe(channel: Any) -> Dict[str, Any]:
        info = channel.hello()
        return {'agent': info.get('agent'), 'version': info.get('version'), 'rtt': channel.ping()}

    # A listing is a glance: an agent that does not answer within a few seconds is "not reachable"
    # (a channel held by another client would otherwise stall the whole table for --timeout).
    probe_timeout = LIST_PROBE_TIMEOUT if options.timeout is None else min(options.timeout, LIST_PROBE_TIMEOUT)
    outcomes = map_guests(probe, guests, uri=options.uri, timeout=probe_timeout)
    rows = []
    for guest, outcome in zip(guests, outcomes):
        row = {'name': guest.name, 'id': guest.id, 'state': guest.state, 'channel': guest.socket_for(),
               'reachable': outcome.ok, 'agent': None, 'version': None, 'rtt': None, 'error': None}
        if outcome.ok:
            row.update(outcome.result)
        else:
            row['error'] = _error_object(outcome.error)
        rows.append(row)
    if options.json:
        _write_json(rows)
        return 0
    if not rows:
        sys.stderr.write('%s: no running guest has a negotiator channel\n' % PROGRAM)
        return 0
    from humanfriendly.tables import format_pretty_table
    table = [[r['name'], r['state'], 'yes' if r['reachable'] else 'no: %s' % r['error']['type'],
              printable(r['version'] or '-'), '%.2f ms' % (r['rtt'] * 1000) if r['rtt'] is not None else '-']
             for r in rows]
    sys.stdout.write(format_pretty_table(table, ['Guest', 'State', 'Agent reachable', 'Agent version', 'Round trip']))
    sys.stdout.write('\n')
    return 0
