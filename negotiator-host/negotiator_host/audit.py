"""
The host daemon's audit log: one line for every call a local caller made through its socket.

Each call, refused ones too, becomes one JSON object on one line, written with one ``write``
to a file opened for appending, so that a record is on disk (in the page cache) when the call
returns and records of concurrent calls never interleave::

    {"time": "2024-05-01T12:00:00.123Z", "uid": 1000, "user": "alice", "pid": 4242,
     "guest": "web-1", "method": "execute", "command": "deploy-status", "args": ["--all"],
     "exit_status": 0, "signal": null, "seconds": 0.112}

Fields: ``time`` (ISO 8601, UTC), ``uid``, ``user``, ``pid`` (the caller, from ``SO_PEERCRED``),
``guest``, ``method``; for ``execute``, ``command`` and ``args``; for ``push`` and ``pull``,
the guest's ``path`` and ``recursive``; the outcome: ``exit_status``
and ``signal`` when a command ran, or ``error`` (the error's type, e.g. ``CommandNotAllowed``
for a refused call) and ``error_code``; ``seconds`` (3 decimals).

The caller chose the guest name, the method, the command, its arguments and the path, and may be hostile:
each of them is written as it came only when it is short printable text, otherwise as a short
``repr`` (:func:`negotiator_common.peerlog.cut`), and a long argument list keeps its first
arguments and a count; so a record stays below :data:`RECORD_LIMIT` bytes whatever was sent.
JSON escapes every control character and (``ensure_ascii``) every non-ASCII one, so no value
can end a line, forge a record or put a terminal escape in the file.

The file is made mode 0640 and its directory, when missing, 0750. A rotated or removed file is
noticed at the next record (another file at the path) and a new one is opened, so logrotate
needs no signal. A failure to write never fails the call: it is logged at most once a minute,
with the number of records lost.
"""

import datetime
import errno
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from negotiator_common.errors import NegotiatorError
from negotiator_common.lazylog import get_logger
from negotiator_common.peerlog import cut

if TYPE_CHECKING:  # for annotations only
    from negotiator_host.access import Caller

__all__ = ('AuditLog', 'audit_line', 'DEFAULT_AUDIT_LOG', 'RECORD_LIMIT', 'COMPLAINT_INTERVAL')

DEFAULT_AUDIT_LOG = '/var/log/negotiator/audit.log'
"""Where the daemon writes its audit log unless told otherwise (``--audit-log``)."""

RECORD_LIMIT = 4096
"""Bytes a record (its line) stays below, whatever the caller sent."""

COMPLAINT_INTERVAL = 60.0
"""Seconds between two log lines about failures to write the audit log."""

FIELD_BYTES = 256
"""Bytes (JSON-encoded) of one field the caller chose: the guest, the command, one argument."""

ARGS_BYTES = 2048
"""Bytes (JSON-encoded) of every argument together; the arguments past them are only counted."""

LOG_MODE = 0o640
DIRECTORY_MODE = 0o750

logger = get_logger(__name__)

_INT_BOUND = 2 ** 31
"""An exit status or signal number from the guest is written as a number only below this bound."""


def _encoded_size(value: Any) -> int:
    return len(json.dumps(value))


def _fitted(value: Any, budget: int = FIELD_BYTES) -> str:
    """
    ``value`` as it came when it is printable text of at most ``budget`` bytes as JSON,
    else its short ``repr`` (:func:`~negotiator_common.peerlog.cut`), cut shorter until it fits.
    """
    if isinstance(value, str) and len(value) <= budget and value.isprintable() and _encoded_size(value) <= budget:
        return value
    limit = budget
    text = _shown(value, limit)
    while _encoded_size(text) > budget and limit > 1:
        limit //= 2
        text = _shown(value, limit)
    return text


def _shown(value: Any, limit: int) -> str:
    """:func:`~negotiator_common.peerlog.cut`, or a note for an integer too long for ``repr`` (Python 3.11+)."""
    try:
        return cut(value, limit)
    except ValueError:
        return '(a %s too large to show)' % type(value).__name__


def _arguments(args: Any) -> Any:
    """The arguments of an execute, each fitted, as many as fit in :data:`ARGS_BYTES`, then a count."""
    if not isinstance(args, list):
        return _fitted(args)
    kept: List[str] = []
    size = 0
    for argument in args:
        text = _fitted(argument)
        size += _encoded_size(text) + 2
        if size > ARGS_BYTES:
            kept.append('... (%d arguments)' % len(args))
            break
        kept.append(text)
    return kept


def _status(value: Any) -> Any:
    """An exit status or a signal that the guest reported: a number as it is, anything else fitted."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and -_INT_BOUND < value < _INT_BOUND):
        return value
    return _fitted(value, 64)


def _outcome_fields(outcome: Any) -> Dict[str, Any]:
    """``exit_status``/``signal`` when a command ran, ``error``/``error_code`` when the call raised."""
    fields: Dict[str, Any] = {}
    if isinstance(outcome, BaseException):
        fields['error'] = type(outcome).__name__
        if isinstance(outcome, NegotiatorError):
            fields['error_code'] = _status(outcome.code)
        ran = outcome.data if isinstance(outcome, NegotiatorError) else {}
    else:
        ran = outcome if isinstance(outcome, dict) else {}
    for key in ('exit_status', 'signal'):
        if key in ran:
            fields[key] = _status(ran[key])
    return fields


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'


def audit_line(caller: 'Caller', guest: str, method: str, params: Dict[str, Any], outcome: Any,
               seconds: float) -> bytes:
    """One record, as the line written to the audit log (see the module's documentation)."""
    record: Dict[str, Any] = {'time': _utc_now(), 'uid': caller.uid, 'user': _fitted(caller.user),
                              'pid': caller.pid, 'guest': _fitted(guest), 'method': _fitted(method, 128)}
    given = params if isinstance(params, dict) else {}
    if method == 'execute':
        record['command'] = _fitted(given.get('command'))
        record['args'] = _arguments(given.get('args', []))
    elif method in ('push', 'pull'):
        record['path'] = _fitted(given.get('path'))
        record['recursive'] = given.get('recursive') is True
    record.update(_outcome_fields(outcome))
    record['seconds'] = round(seconds, 3)
    return (json.dumps(record, ensure_ascii=True, allow_nan=False) + '\n').encode('ascii')


class AuditLog(object):
    """
    The audit log at ``path`` (``None``: none, every record is dropped); see the module's
    documentation. Safe to use from many threads; never raises from :meth:`record`.

    :param clock: the monotonic clock that spaces the warnings about failed writes (tests).
    """

    def __init__(self, path: Optional[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._identity: Optional[Tuple[int, int]] = None
        self._torn = False
        self._closed = False
        self._lost = 0
        self._warned_at: Optional[float] = None
        if path is not None:
            with self._lock:
                try:
                    self._open(path)
                except OSError as exc:
                    self._failed(exc, lost=0)

    def record(self, caller: 'Caller', guest: str, method: str, params: Dict[str, Any], outcome: Any,
               seconds: float) -> None:
        """
        Write the record of one call: ``outcome`` is the call's result (a dict) or the exception
        it raised, ``seconds`` how long it took. A failure is logged (at most once a minute), never raised.
        """
        if self.path is None:
            return
        with self._lock:
            try:
                self._write(self.path, audit_line(caller, guest, method, params, outcome, seconds))
            except (OSError, ValueError) as exc:
                self._failed(exc, lost=1)

    def close(self) -> None:
        """Close the file; a record after this is lost (and logged as such)."""
        with self._lock:
            self._closed = True
            if self._lost:
                logger.warning("%d records of the audit log %s were lost", self._lost, self.path)
            self._close_file()

    def _open(self, path: str) -> int:
        """Open (make) the file and its directory; the file descriptor."""
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, DIRECTORY_MODE)
                os.chmod(directory, DIRECTORY_MODE)
            except FileExistsError:
                pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, LOG_MODE)
            os.fchmod(fd, LOG_MODE)
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        status = os.fstat(fd)
        self._fd, self._identity, self._torn = fd, (status.st_dev, status.st_ino), False
        return fd

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity = self._fd, None, None
            os.close(fd)

    def _current_fd(self, path: str) -> int:
        """The open file, reopened when another file took its path (logrotate) or it could not be opened."""
        if self._closed:
            raise OSError(errno.EBADF, 'the audit log is closed')
        try:
            status: Optional[os.stat_result] = os.stat(path)
        except FileNotFoundError:
            status = None
        if self._fd is not None and status is not None and (status.st_dev, status.st_ino) == self._identity:
            return self._fd
        self._close_file()
        return self._open(path)

    def _write(self, path: str, line: bytes) -> None:
        """
        Append ``line`` with as few ``write`` calls as the kernel allows (one, as a rule). A line
        that a failed write cut short is ended by a newline before the next record.
        """
        fd = self._current_fd(path)
        data = b'\n' + line if self._torn else line
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            self._torn = self._torn or written > 0
            raise
        self._torn = False

    def _failed(self, exc: Exception, lost: int) -> None:
        """Count the lost record; log the failure unless one was logged in the last minute."""
        self._lost += lost
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < COMPLAINT_INTERVAL:
            return
        self._warned_at = now
        logger.warning("Cannot write the audit log %s (%d records lost since the last warning): %s",
                       self.path, self._lost, exc)
        self._lost = 0

    def __repr__(self) -> str:
        return 'AuditLog(%r)' % (self.path,)
