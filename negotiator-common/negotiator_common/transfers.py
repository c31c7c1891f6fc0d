"""
The calling side of ``push`` and ``pull`` (``docs/protocol.rst``, "Files"): what
:meth:`AgentClient.push <negotiator_common.client.AgentClient.push>` and
:meth:`~negotiator_common.client.AgentClient.pull` do.

A push streams its source as a call's input (:class:`~negotiator_common.callstreams.InputPump`,
within the room the agent grants) and ends it with the CRC-32 of the bytes sent; the agent
keeps nothing unless its own hash agrees. A pull takes the agent's raw output within the room
this side grants (:class:`~negotiator_common.callstreams.OutputReceiver`) into a temporary file
(or tree) beside the target, checks the CRC-32 of the reply against its own, and renames it
into place only then. A directory travels as a tar stream, made and read on a thread of its
own through a pipe, so that memory stays bounded by the windows whatever the size.
"""

import os
import posixpath
import stat
import threading
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional, Tuple, Union, cast

from negotiator_common.callbounds import OUTPUT_WINDOW
from negotiator_common.callstreams import InputPump, OutputReceiver, input_pieces
from negotiator_common.cancellation import Cancellation
from negotiator_common.checksum import CHECKSUM_FIELD, Checksum
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ChecksumMismatch, FileError, InvalidRequest, NegotiatorError
from negotiator_common.files import (
    AtomicFile, AtomicTree, extract_tree, file_error, open_directory, write_tree,
)

__all__ = ('push', 'pull', 'Progress', 'LocalFile')

Progress = Callable[[int, Optional[int]], None]
"""Called with the bytes moved so far and the total when it is known (None otherwise)."""

LocalFile = Union[str, BinaryIO]
"""The local side of a transfer: a path, or a binary file object."""


class _Tally(object):
    """The checksum and count of the bytes that pass, reported to a :data:`Progress`."""

    def __init__(self, progress: Optional[Progress], total: Optional[int]) -> None:
        self.digest = Checksum()
        self.size = 0
        self.progress = progress
        self.total = total

    def add(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        if self.progress is not None:
            self.progress(self.size, self.total)


class _Producer(object):
    """Runs ``produce(writer)`` on a thread, its bytes readable through a pipe; a failure is raised at the end."""

    def __init__(self, produce: Callable[[BinaryIO], None]) -> None:
        read_fd, write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, 'rb')
        self._writer = os.fdopen(write_fd, 'wb')
        self._produce = produce
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name='negotiator-tar')
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._writer:
                self._produce(self._writer)
        except BaseException as exc:  # raised to the caller by pieces()
            self.error = exc

    def pieces(self) -> Iterator[bytes]:
        try:
            for piece in input_pieces(self.reader):
                yield piece
        finally:
            self.reader.close()
            self._thread.join()
        if self.error is not None:
            raise self.error


def _push_source(source: LocalFile, recursive: bool) -> Tuple[Iterator[bytes], Optional[int], Optional[int], bool]:
    """The pieces to send, their total size, the source's mode, and whether it is a tree."""
    if not isinstance(source, str):
        return input_pieces(source), None, None, False
    try:
        status = os.stat(source)
        if stat.S_ISDIR(status.st_mode):
            if not recursive:
                raise FileError('%s: is a directory (copy it recursively)' % source,
                                {'path': source, 'reason': 'EISDIR'})
            fd = open_directory(source)
            producer = _Producer(lambda sink: _write_local_tree(fd, sink, source))
            return producer.pieces(), None, None, True
        stream = open(source, 'rb')
    except OSError as exc:
        raise file_error(source, exc) from None
    return _closing(input_pieces(stream), stream), status.st_size, stat.S_IMODE(status.st_mode), False


def _write_local_tree(fd: int, sink: BinaryIO, path: str) -> None:
    try:
        write_tree(fd, sink, path)
    finally:
        os.close(fd)


def _closing(pieces: Iterator[bytes], stream: BinaryIO) -> Iterator[bytes]:
    with stream:
        for piece in pieces:
            yield piece


def _tallied(pieces: Iterator[bytes], tally: _Tally) -> Iterator[bytes]:
    for piece in pieces:
        tally.add(piece)
        yield piece


def push(endpoint: Endpoint, can_cancel: bool, source: LocalFile, target: str, recursive: bool = False,
         mode: Optional[int] = None, owner: Optional[str] = None,
         progress: Optional[Progress] = None) -> Dict[str, Any]:
    """See :meth:`negotiator_common.client.AgentClient.push`."""
    pieces, total, source_mode, tree = _push_source(source, recursive)
    params: Dict[str, Any] = {'path': target, 'recursive': tree}
    if isinstance(source, str):
        params['name'] = posixpath.basename(source.rstrip('/')) or None
    if mode is not None or source_mode is not None:
        params['mode'] = mode if mode is not None else source_mode
    if owner is not None:
        params['owner'] = owner
    tally = _Tally(progress, total)
    cancelled = Cancellation()
    pump = InputPump(endpoint.notify, _tallied(pieces, tally), cancelled,
                     end=lambda: {CHECKSUM_FIELD: tally.digest.hexdigest()})
    try:
        reply = endpoint.call('push', params, timeout=None, cancelled=cancelled if can_cancel else None,
                              on_credit=pump.on_credit)
    except NegotiatorError:
        if pump.error is not None:  # the source failed: the agent was told to drop what it had
            raise pump.error from None
        raise
    finally:
        pump.finish()
    if pump.error is not None:
        raise pump.error
    if not isinstance(reply, dict) or reply.get(CHECKSUM_FIELD) != tally.digest.hexdigest():
        raise ChecksumMismatch('%s: the guest wrote bytes whose CRC-32 is not that of the bytes sent' % target,
                               {'path': target})
    return reply


class _Hashing(object):
    """A sink that counts and hashes what it passes on to ``sink``; more than ``limit`` bytes of ``source`` fail."""

    def __init__(self, sink: Any, tally: _Tally, source: str, limit: Optional[int] = None) -> None:
        self.sink = sink
        self.tally = tally
        self.source = source
        self.limit = limit
        self.exceeded: Optional[FileError] = None

    def write(self, data: bytes) -> int:
        if self.limit is not None and self.tally.size + len(data) > self.limit:
            self.exceeded = FileError('%s: more than the %d bytes allowed came: the copy was stopped'
                                      % (self.source, self.limit), {'path': self.source, 'reason': 'EFBIG'})
            raise self.exceeded
        self.sink.write(data)
        self.tally.add(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()


class _LocalTarget(object):
    """Where a pull lands: a file object as it is, or a path written atomically (a file, or a tree)."""

    def __init__(self, target: LocalFile, source: str, tree: bool) -> None:
        self.file: Optional[Any] = None
        self.atomic: Optional[AtomicFile] = None
        self.tree: Optional[AtomicTree] = None
        self.extractor: Optional[threading.Thread] = None
        self.extract_error: Optional[BaseException] = None
        if not isinstance(target, str):
            if tree:
                raise FileError('a directory cannot be pulled into a file object', {'path': source,
                                                                                   'reason': 'EISDIR'})
            self.file = target
            return
        self.dir_fd, base, path = _local_place(target, source)
        try:
            if tree:
                self.tree = AtomicTree(self.dir_fd, base, path)
                self._start_extraction()
            else:
                self.atomic = AtomicFile(self.dir_fd, base, path)
                self.file = self.atomic
        except BaseException:
            os.close(self.dir_fd)
            raise

    def _start_extraction(self) -> None:
        read_fd, write_fd = os.pipe()
        self.file = os.fdopen(write_fd, 'wb')
        reader = os.fdopen(read_fd, 'rb')
        tree = self.tree
        assert tree is not None

        def extract() -> None:
            try:
                with reader:
                    extract_tree(reader, tree)
                    for _ in iter(lambda: reader.read(65536), b''):
                        pass  # the padding after the archive's end
            except BaseException as exc:  # raised to the caller by finish()
                self.extract_error = exc

        self.extractor = threading.Thread(target=extract, name='negotiator-untar')
        self.extractor.daemon = True
        self.extractor.start()

    def extraction_failure(self) -> Optional[BaseException]:
        """Once the stream is over (or cut): why the extraction failed, if it did (a hostile archive, say)."""
        if self.tree is None:
            return None
        assert self.file is not None and self.extractor is not None
        try:
            self.file.close()
        except OSError:
            pass  # the extraction stopped reading: its error says why
        self.extractor.join()
        return self.extract_error

    def finish(self, ok: bool, mode: Optional[int]) -> None:
        """
        Keep what arrived (``ok``) or drop it; a failure of the extraction is raised here (unless
        the call failed already: its error says why, and the extraction then only saw the stream cut).
        """
        try:
            failure = self.extraction_failure()
            if failure is not None and ok:
                ok = False
                raise failure
            if not ok:
                return
            if self.atomic is not None:
                self.atomic.commit(None if mode is None else mode & 0o777, None)
            elif self.tree is not None:
                self.tree.commit()
        finally:
            if not ok:
                if self.atomic is not None:
                    self.atomic.abort()
                if self.tree is not None:
                    self.tree.abort()
            if self.atomic is not None or self.tree is not None:
                os.close(self.dir_fd)


def _local_place(target: str, source: str) -> Tuple[int, str, str]:
    """The directory (a descriptor), the name in it and the path a pull writes (inside ``target``, a directory)."""
    if os.path.isdir(target):
        parent, base = target, posixpath.basename(source.rstrip('/'))
    else:
        parent, base = os.path.split(target)
        if not base:
            raise FileError('%s: no such directory' % target, {'path': target, 'reason': 'ENOENT'})
    try:
        return open_directory(parent or '.'), base, os.path.join(parent, base)
    except OSError as exc:
        raise file_error(parent, exc) from None


def pull(endpoint: Endpoint, can_cancel: bool, source: str, target: LocalFile, recursive: bool = False,
         progress: Optional[Progress] = None, max_size: Optional[int] = None) -> Dict[str, Any]:
    """See :meth:`negotiator_common.client.AgentClient.pull`."""
    if recursive:
        try:
            return _pull(endpoint, can_cancel, source, target, True, progress, max_size)
        except FileError as exc:
            if exc.reason != 'ENOTDIR':
                raise
    return _pull(endpoint, can_cancel, source, target, False, progress, max_size)


def _pull(endpoint: Endpoint, can_cancel: bool, source: str, target: LocalFile, tree: bool,
          progress: Optional[Progress], max_size: Optional[int]) -> Dict[str, Any]:
    local = _LocalTarget(target, source, tree)
    tally = _Tally(progress, None)
    cancelled = Cancellation()

    def sink_failed(error: BaseException) -> None:
        cancelled.set()  # the agent stops sending; the call raises the sink's error

    hashing = _Hashing(local.file, tally, source, max_size)
    sinks = {'stdout': cast(BinaryIO, hashing), 'stderr': None}
    receiver = OutputReceiver(endpoint.notify, sinks, 0, OUTPUT_WINDOW, sink_failed)

    def why_the_sink_failed() -> BaseException:
        # The cause, not its echo: a refused archive stops the extraction, whose closed pipe
        # then fails the next write (BrokenPipeError), whether or not the reply came first.
        assert receiver.sink_error is not None
        return hashing.exceeded or local.extraction_failure() or receiver.sink_error

    ok = False
    reply: Any = None
    try:
        try:
            reply = endpoint.call('pull', {'path': source, 'recursive': tree, 'window': OUTPUT_WINDOW}, timeout=None,
                                  on_notification=receiver, cancelled=cancelled if can_cancel else None)
        finally:
            receiver.finish(wait=not cancelled.is_set())
        if receiver.sink_error is not None:
            raise why_the_sink_failed()
        if not isinstance(reply, dict) or reply.get(CHECKSUM_FIELD) != tally.digest.hexdigest():
            raise ChecksumMismatch('%s: the bytes that arrived are not those the guest sent (CRC-32)' % source,
                                   {'path': source})
        ok = True
    except NegotiatorError:
        if receiver.sink_error is not None:  # this side cancelled the call: why (the bound, a refused archive)
            raise why_the_sink_failed() from None
        raise
    finally:
        local.finish(ok, _mode(reply) if ok else None)
    return reply


def _mode(reply: Dict[str, Any]) -> Optional[int]:
    mode = reply.get('mode')
    if mode is None:
        return None
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
        raise InvalidRequest('a pull reply with a mode that is not one: %r' % (mode,))
    return mode
