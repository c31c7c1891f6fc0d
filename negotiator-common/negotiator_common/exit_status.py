"""
The exit statuses of the ``negotiator-host`` and ``negotiator-guest`` programs, in one place.

A command's own exit status passes through unchanged (128 + N when signal N ended it), so
negotiator's own failures use statuses from ``sysexits.h`` that a script can tell apart
from most commands' statuses. Both CLIs document the same table.
"""

from negotiator_common.cli_support import UsageError
from negotiator_common.errors import (
    CallTimeout, ChannelError, ChecksumMismatch, CommandFailed, CommandNotAllowed, CommandNotFound, CommandTimedOut,
    FileError, UnsendableRequest,
)

__all__ = ('EXIT_USAGE', 'EXIT_UNAVAILABLE', 'EXIT_SOFTWARE', 'EXIT_TIMEOUT', 'EXIT_REFUSED', 'EXIT_INTERRUPTED',
           'EXIT_BROKEN_PIPE', 'EXIT_DATA', 'EXIT_NO_INPUT', 'EXIT_CANNOT_CREATE', 'EXIT_IO', 'exit_status_for',
           'exit_status_of_result')

EXIT_DATA = 65
"""A transfer's bytes are not those sent (their CRC-32 differs): nothing was kept."""

EXIT_NO_INPUT = 66
"""A file or directory to copy (or the directory to copy into) does not exist."""

EXIT_CANNOT_CREATE = 73
"""A copy's target cannot be made (a directory holds something there, an archive would leave its tree...)."""

EXIT_IO = 74
"""The disk is full, or reading or writing a file failed."""

_FILE_REASONS = {'ENOENT': EXIT_NO_INPUT, 'ENOTDIR': EXIT_NO_INPUT, 'EACCES': 77, 'EPERM': 77, 'EROFS': 77,
                 'ENOSPC': EXIT_IO, 'EDQUOT': EXIT_IO, 'EIO': EXIT_IO, 'EFBIG': EXIT_IO}
"""The status of a :class:`FileError` by its reason; any other reason is :data:`EXIT_CANNOT_CREATE`."""

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

EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): the calls were cancelled in the guests (128 + SIGINT, as a shell reports it)."""

EXIT_BROKEN_PIPE = 141
"""Standard output was closed by its reader (``| head``): 128 + SIGPIPE, what a shell reports for a filter."""


def exit_status_for(error: BaseException) -> int:
    """The documented exit status for one of negotiator's own failures (a wrong command line included)."""
    if isinstance(error, (UsageError, UnsendableRequest)):
        return EXIT_USAGE
    if isinstance(error, (CallTimeout, CommandTimedOut)):
        return EXIT_TIMEOUT
    if isinstance(error, (CommandNotAllowed, CommandNotFound)):
        return EXIT_REFUSED
    if isinstance(error, CommandFailed):
        # The peer's word: a "failure" with status 0, or a status out of range, is a protocol error.
        return exit_status_of_result(error.exit_status, error.data.get('signal')) or EXIT_SOFTWARE
    if isinstance(error, ChannelError):
        return EXIT_UNAVAILABLE
    if isinstance(error, FileError):
        return _FILE_REASONS.get(error.reason, EXIT_CANNOT_CREATE)
    if isinstance(error, ChecksumMismatch):
        return EXIT_DATA
    if isinstance(error, OSError):  # a local file of a copy (standard input, say)
        return EXIT_IO
    return EXIT_SOFTWARE


def exit_status_of_result(exit_status: object, signal: object) -> int:
    """
    A finished command's status as a shell reports it: its own, or 128 + the signal's number;
    anything out of a status's range (which :class:`~negotiator_common.client.AgentClient`
    already refuses as a protocol error) is an internal error, never a success.
    """
    if isinstance(exit_status, int) and not isinstance(exit_status, bool) and 0 <= exit_status <= 255:
        return exit_status
    if exit_status is None and isinstance(signal, int) and 0 < signal < 128:
        return 128 + signal
    return EXIT_SOFTWARE
