"""
What the ``negotiator-host`` and ``negotiator-guest`` programs share: option parsing and logging.

Both CLIs take ``--timeout`` with the same meaning and ``-v``/``-q`` with the same steps, so the
two live here once. Logging is configured only by the programs, never by the library; a quick
client call without ``-v`` skips coloredlogs altogether (it costs tens of milliseconds of
start-up, and such a call reports its own failures as one line each).
"""

import sys
from typing import Any, List, Optional

__all__ = ('UsageError', 'apply_shared_option', 'parse_timeout', 'setup_logging', 'split_command')

_LOG_FORMAT = '%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s'


class UsageError(Exception):
    """A wrong command line (exit status 64)."""


def parse_timeout(value: str) -> Optional[float]:
    """``--timeout`` as seconds (fractional); 0 means no bound (None)."""
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError('--timeout needs a number of seconds, not %r' % value) from None
    if not seconds >= 0 or seconds == float('inf'):
        raise UsageError('--timeout needs 0 (no bound) or a positive number of seconds, not %r' % value)
    return seconds or None


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
    ``--commands-dir``, ``-v``, ``-q``) to ``options``; False when ``option`` is not one of them.
    """
    if option in ('-i', '--stdin'):
        options.stdin = True
    elif option in ('-t', '--timeout'):
        options.timeout = parse_timeout(value)
    elif option in ('-j', '--json'):
        options.json = True
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
    one level more per ``-v`` (``verbosity`` > 0) and one less per ``-q``.
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
