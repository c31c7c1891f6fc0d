"""
The guest agent's ``push`` and ``pull`` (``docs/protocol.rst``, "Files"), a power that the
guest's owner switches on (``negotiator-guest --daemon --allow-files[=PREFIXES]``).

Both stream like ``execute``, through the same :class:`~negotiator_common.streams.CommandStreams`:
a push's bytes come as ``input`` chunks within the room the agent grants and end with an
``input`` that carries their CRC-32; a pull's go out as raw ``output`` chunks (stream
``stdout``) within the room the caller grants, and the reply carries their CRC-32. A
directory (``recursive``) travels as a tar stream (:mod:`negotiator_common.files`).

Paths are checked after they are resolved, on the descriptor that was opened (its place as the
kernel gives it), so a symlink never leads out of an allowed prefix, not even one swapped in
between the check and the use.
"""

import os
import posixpath
import select
from typing import Any, Dict, List, Optional, Sequence, Tuple

from negotiator_common.checksum import CHECKSUM_FIELD, Checksum
from negotiator_common.dispatcher import CallContext, Dispatcher, get_param
from negotiator_common.errors import CommandNotAllowed, ConnectionClosed, FileError, ChecksumMismatch, InvalidParams
from negotiator_common.files import (
    COPY_SIZE, AtomicFile, AtomicTree, extract_tree, fd_path, file_error, file_kind, open_directory, resolve_owner,
    write_tree,
)
from negotiator_common.flow import MAX_CREDIT, MIN_WINDOW
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import RAW_OUTPUT_METHOD, Notification
from negotiator_common.streams import INPUT_WINDOW, CommandStreams

__all__ = ('FileService', 'SWITCH')

logger = get_logger(__name__)

SWITCH = '--allow-files'
"""The guest daemon's switch, named in every refusal."""

_WAIT = 0.5
"""Seconds between looks at the call's cancellation while a stream waits for its peer."""


class _StreamWait(object):
    """Waits for something to arrive on a call's streams, or for the call to be cancelled."""

    def __init__(self, streams: CommandStreams, context: CallContext) -> None:
        self.streams = streams
        self.context = context

    def __call__(self) -> None:
        if self.streams.error is not None:
            raise self.streams.error
        if self.context.cancelled.is_set():
            raise ConnectionClosed('the transfer was cancelled')
        select.select([self.streams.wake_fd], [], [], _WAIT)
        self.streams.clear_wake()


class _PushedInput(object):
    """The pushed bytes as a binary file (``read``), hashed as they are read, granted again once taken."""

    def __init__(self, streams: CommandStreams, wait: _StreamWait) -> None:
        self.streams = streams
        self.wait = wait
        self.digest = Checksum()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        limit = COPY_SIZE if size is None or size < 0 else min(size, COPY_SIZE)
        while True:
            data = self.streams.read_input(limit)
            if data is not None:
                if data:
                    self.streams.input_written(len(data))
                    self.digest.update(data)
                    self.size += len(data)
                return data
            self.wait()


class _PulledOutput(object):
    """A binary file (``write``) whose bytes go to the caller as raw output, within the room it grants."""

    def __init__(self, streams: CommandStreams, context: CallContext, wait: _StreamWait) -> None:
        self.streams = streams
        self.context = context
        self.wait = wait
        self.digest = Checksum()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            allowed = self.streams.spend_output(min(len(view), COPY_SIZE))
            if not allowed:
                self.wait()
                continue
            chunk = data if allowed == len(data) and isinstance(data, bytes) else bytes(view[:allowed])
            self.digest.update(chunk)
            self.size += allowed
            self.context.notify(Notification(RAW_OUTPUT_METHOD, {'id': self.context.request_id, 'stream': 'stdout'},
                                             attachment=chunk))
            view = view[allowed:]
        return len(data)

    def flush(self) -> None:
        """Each write is sent at once."""


class FileService(object):
    """
    ``push`` and ``pull`` for the paths under ``prefixes`` (resolved now); None: the power is
    off, and both methods are refused with :class:`CommandNotAllowed` (exit status 77 on the
    CLIs) naming the switch.
    """

    def __init__(self, prefixes: Optional[Sequence[str]] = None) -> None:
        self.prefixes: Optional[List[str]] = None
        if prefixes is not None:
            self.prefixes = [os.path.realpath(prefix) for prefix in prefixes]

    @property
    def enabled(self) -> bool:
        return self.prefixes is not None

    def register(self, dispatcher: Dispatcher) -> None:
        dispatcher.register('push', self.push)
        dispatcher.register('pull', self.pull)

    def _check_enabled(self) -> None:
        if self.prefixes is None:
            raise CommandNotAllowed('file access is off in this guest: its owner turns it on with negotiator-guest'
                                    ' --daemon %s' % SWITCH)

    def _check_allowed(self, where: str, path: str) -> None:
        assert self.prefixes is not None
        for prefix in self.prefixes:
            if where == prefix or where.startswith(prefix.rstrip('/') + '/'):
                return
        raise CommandNotAllowed('%s is outside the paths this guest allows (%s=%s)' % (
            path, SWITCH, ','.join(self.prefixes)), {'path': path})

    def _push_target(self, path: str, name: Optional[str]) -> Tuple[int, str, str]:
        """The directory (a descriptor), the name in it and the full path that a push writes."""
        real = os.path.realpath(path)
        if name is not None and os.path.isdir(real):
            parent, base = real, name
        elif path.endswith('/'):
            raise FileError('%s: not a directory' % path, {'path': path, 'reason': 'ENOTDIR' if os.path.lexists(
                real) else 'ENOENT'})
        else:
            parent, base = posixpath.split(real)
        if not base:
            raise FileError('%s: is a directory' % path, {'path': path, 'reason': 'EISDIR'})
        try:
            dir_fd = open_directory(parent)
        except OSError as exc:
            raise file_error(parent, exc) from None
        where = posixpath.join(fd_path(dir_fd, parent), base)
        try:
            self._check_allowed(where, path)
        except CommandNotAllowed:
            os.close(dir_fd)
            raise
        return dir_fd, base, where

    def push(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        """Write the streamed bytes to ``path`` (a file, or with ``recursive`` a tree from a tar stream), atomically."""
        self._check_enabled()
        path = _absolute(get_param(params, 'path', (str,)))
        name = get_param(params, 'name', (str, type(None)), None)
        if name is not None and (not name or '/' in name or name in ('.', '..') or '\0' in name):
            raise InvalidParams('name must be a file name without "/", not %r' % name)
        recursive = get_param(params, 'recursive', (bool,), False)
        mode = get_param(params, 'mode', (int, type(None)), None)
        if mode is not None and not 0 <= mode <= 0o7777:
            raise InvalidParams('mode must be from 0 to 0o7777')
        try:
            owner = resolve_owner(get_param(params, 'owner', (str, type(None)), None))
        except ValueError as exc:
            raise InvalidParams(str(exc)) from None
        dir_fd, base, where = self._push_target(path, name)
        streams = CommandStreams(context.notify, context.request_id, INPUT_WINDOW, None, context.cancelled.set)
        try:
            context.listen(streams.receive)
            source = _PushedInput(streams, _StreamWait(streams, context))
            streams.start_input()
            if recursive:
                self._push_tree(dir_fd, base, where, source, streams, owner)
            else:
                self._push_file(dir_fd, base, where, source, streams, mode, owner)
        finally:
            context.stop_listening()
            streams.close()
            os.close(dir_fd)
        logger.info("Wrote %s (%d bytes pushed)", where, source.size)
        return {'path': where, 'size': source.size, CHECKSUM_FIELD: source.digest.hexdigest()}

    def _push_file(self, dir_fd: int, base: str, where: str, source: _PushedInput, streams: CommandStreams,
                   mode: Optional[int], owner: Optional[Tuple[int, int]]) -> None:
        mode, owner = _kept_attributes(dir_fd, base, mode, owner)
        target = AtomicFile(dir_fd, base, where)
        try:
            for piece in iter(lambda: source.read(COPY_SIZE), b''):
                target.write(piece)
            _check_digest(streams, source, where)
        except BaseException:
            target.abort()
            raise
        target.commit(mode, owner)

    def _push_tree(self, dir_fd: int, base: str, where: str, source: _PushedInput, streams: CommandStreams,
                   owner: Optional[Tuple[int, int]]) -> None:
        tree = AtomicTree(dir_fd, base, where)
        try:
            extract_tree(source, tree, owner)
            for _ in iter(lambda: source.read(COPY_SIZE), b''):
                pass  # the tar stream's padding after its end
            _check_digest(streams, source, where)
            if owner is not None:
                os.fchown(tree.fd, owner[0], owner[1])
        except BaseException:
            tree.abort()
            raise
        tree.commit()

    def pull(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        """Send the bytes of ``path`` (with ``recursive``, a directory as a tar stream) as raw output under credit."""
        self._check_enabled()
        path = _absolute(get_param(params, 'path', (str,)))
        recursive = get_param(params, 'recursive', (bool,), False)
        window = get_param(params, 'window', (int,))
        if not MIN_WINDOW <= window <= MAX_CREDIT:
            raise InvalidParams('window must be from %d to %d bytes' % (MIN_WINDOW, MAX_CREDIT))
        real = os.path.realpath(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
        except OSError as exc:
            raise file_error(path, exc) from None
        streams = CommandStreams(context.notify, context.request_id, None, window, context.cancelled.set)
        try:
            where = fd_path(fd, real)
            self._check_allowed(where, path)
            status = os.fstat(fd)
            context.listen(streams.receive)
            sink = _PulledOutput(streams, context, _StreamWait(streams, context))
            _send(fd, status, where, recursive, sink)
        finally:
            context.stop_listening()
            streams.close()
            os.close(fd)
        result = {'path': where, 'size': sink.size, CHECKSUM_FIELD: sink.digest.hexdigest()}
        result.update(file_kind(status))
        return result


def _send(fd: int, status: os.stat_result, where: str, recursive: bool, sink: _PulledOutput) -> None:
    import stat
    if stat.S_ISDIR(status.st_mode):
        if not recursive:
            raise FileError('%s: is a directory (pull it recursively)' % where, {'path': where, 'reason': 'EISDIR'})
        write_tree(fd, sink, where, lambda name: logger.info("Left out %s/%s: not a file, directory or symlink",
                                                             where, name))
        return
    if recursive:
        # Before a byte is sent: the caller, which expected a tar stream, asks again for the file.
        raise FileError('%s: not a directory (pull it without recursive)' % where, {'path': where, 'reason': 'ENOTDIR'})
    if not stat.S_ISREG(status.st_mode):
        raise FileError('%s: not a regular file or a directory' % where, {'path': where, 'reason': 'EINVAL'})
    try:
        for piece in iter(lambda: os.read(fd, COPY_SIZE), b''):
            sink.write(piece)
    except OSError as exc:
        raise file_error(where, exc) from None


def _absolute(path: str) -> str:
    if not path.startswith('/') or '\0' in path:
        raise InvalidParams('path must be absolute, without NUL: %r' % path)
    return path


def _kept_attributes(dir_fd: int, base: str, mode: Optional[int],
                     owner: Optional[Tuple[int, int]]) -> Tuple[int, Optional[Tuple[int, int]]]:
    """The mode and owner of a pushed file: those asked, else those of the file it replaces, else 0644 and ours."""
    try:
        status = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return (0o644 if mode is None else mode), owner
    if mode is None:
        mode = status.st_mode & 0o7777
    if owner is None and os.geteuid() == 0:
        owner = (status.st_uid, status.st_gid)
    return mode, owner


def _check_digest(streams: CommandStreams, source: _PushedInput, where: str) -> None:
    """The checksum that ended the input must be that of the bytes read: else nothing is kept."""
    expected = streams.input_end.get(CHECKSUM_FIELD)
    actual = source.digest.hexdigest()
    if expected != actual:
        raise ChecksumMismatch('%s: the pushed bytes have CRC-32 %s, the sender said %s: nothing was written'
                               % (where, actual, expected), {'path': where})
