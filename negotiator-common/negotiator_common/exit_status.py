"""
The exit statuses of the ``negotiator-host`` and ``negotiator-guest`` programs, in one place.

A command's own exit status passes through unchanged (128 + N when signal N ended it), so
negotiator's own failures use statuses from ``sysexits.h`` that a script can tell apart
from most commands' statuses. Both CLIs document the same table.
"""

from negotiator_common.errors import (
    CallTimeout, ChannelError, CommandFailed, CommandNotAllowed, CommandNotFound, CommandTimedOut,
)

__all__ = ('EXIT_USAGE', 'EXIT_UNAVAILABLE', 'EXIT_SOFTWARE', 'EXIT_TIMEOUT', 'EXIT_REFUSED',
           'exit_status_for', 'exit_status_of_result')

EXIT_USAGE = 64
"""Wrong options or arguments."""

EXIT_UNAVAILABLE = 69
"""No guest, channel, port or agent to talk to (or another process holds it)."""

EXIT_SOFTWARE = 70
"""An internal or protocol error."""

EXIT_TIMEOUT = 75
"""The call, or the command, ran out of time."""

EXIT_REFUSED = 77
"""The command is not offered, or the policy does not allow it."""


def exit_status_for(error: BaseException) -> int:
    """The documented exit status for one of negotiator's own failures."""
    if isinstance(error, (CallTimeout, CommandTimedOut)):
        return EXIT_TIMEOUT
    if isinstance(error, (CommandNotAllowed, CommandNotFound)):
        return EXIT_REFUSED
    if isinstance(error, CommandFailed):
        status = error.exit_status
        return status if isinstance(status, int) and 0 < status < 256 else 1
    if isinstance(error, ChannelError):
        return EXIT_UNAVAILABLE
    return EXIT_SOFTWARE


def exit_status_of_result(exit_status: object, signal: object) -> int:
    """A finished command's status as a shell reports it: its own, or 128 + the signal's number."""
    if isinstance(exit_status, int):
        return exit_status
    if isinstance(signal, int) and signal > 0:
        return 128 + signal
    return EXIT_SOFTWARE
