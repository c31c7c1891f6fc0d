"""
A thin byte transport over one file descriptor: a UNIX socket or a virtio-serial port.

Both ends of a negotiator channel are plain file descriptors, so one small class serves both:
non-blocking I/O driven by ``poll()``, so that every wait has a deadline and another thread
can wake a blocked reader (:meth:`Transport.close`) without closing the descriptor under it.
It knows nothing of messages; :mod:`negotiator_common.endpoint` puts the protocol on top.

Two facts of virtio-serial ports shape it (``docs/protocol.rst``, "Transports"): with no host
connected, ``read()`` returns 0 bytes at once and ``poll()`` reports POLLHUP at once, so EOF
is reported to the caller instead of being retried here; and a ``write()`` may be partial, so
:meth:`Transport.write_all` loops.
"""

import errno
import os
import select
import socket
import threading
from typing import Any, Dict, Optional, Sequence, Union

from negotiator_common.deadline import NO_DEADLINE, Deadline
from negotiator_common.errors import CallTimeout, ConnectionClosed

__all__ = ('Transport', 'ReadBuffer', 'READ_SIZE')

READ_SIZE = 256 * 1024
"""How much one read asks for: large enough to move 64 MiB outputs in few system calls."""


STREAMING_READ = 4096
"""A read at least this long (a virtio-serial port's whole buffer) says a stream flows: read again before polling."""


class ReadBuffer(object):
    """
    One reused buffer for the reads of one descriptor: each read returns a copy of what came.

    ``os.read(fd, 256 KiB)`` allocates a fresh 256 KiB object for every read, which glibc serves
    with ``mmap``, then ``mremap`` to the size read and ``munmap``: three system calls and a page
    fault for a 50-byte message (measured with ``strace -c``), and very costly in an emulated
    guest, where unmapping flushes the emulator's TLB. The buffer starts at 64 KiB (a new
    connection or command zero-fills only that) and grows to ``limit`` the first time a read
    fills it, so that large outputs still move in few system calls.
    """

    INITIAL_SIZE = 64 * 1024

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._view = memoryview(bytearray(min(limit, self.INITIAL_SIZE)))

    def room(self, size: Optional[int] = None) -> memoryview:
        """Where the next read goes: at most ``size`` bytes (default: the buffer's size)."""
        return self._view if size is None else self._view[:size]

    def take(self, count: int) -> bytes:
        """The ``count`` bytes that a read put in :meth:`room`, copied out (the buffer grows if they filled it)."""
        data = self._view[:count].tobytes()
        if count == len(self._view) < self.limit:
            self._view = memoryview(bytearray(self.limit))
        return data

    def read(self, fd: int, size: Optional[int] = None) -> bytes:
        """One ``readv`` of at most ``size`` bytes (default: the buffer's size); ``b''`` at end of file."""
        return self.take(os.readv(fd, [self.room(size)]))


_EOF_ERRNOS = (errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)


class Transport(object):
    """
    Non-blocking reads and writes on one descriptor, each bounded by an optional deadline.

    ``owner`` keeps the object that owns the descriptor (a :class:`socket.socket`) alive.
    With ``close_fd=False`` the descriptor outlives the transport: a guest daemon reuses its
    port for one host session after another.
    """

    def __init__(self, fd: int, close_fd: bool = True, owner: object = None) -> None:
        self.fd = fd
        self._close_fd = close_fd
        self._owner = owner
        self._closed = False
        self._lock = threading.Lock()  # held while writing
        self._read_lock = threading.Lock()  # held while reading
        os.set_blocking(fd, False)
        self._wake_read, self._wake_write = os.pipe()
        self._pollers: Dict[int, Any] = {}
        self._read_buffer = ReadBuffer(READ_SIZE)
        self._streaming = False  # the last read was a full port buffer or more: more is likely waiting
        self.bytes_read = 0
        """Every byte read so far (a guest daemon tells an empty session from one that did something)."""

    @classmethod
    def from_socket(cls, sock: socket.socket) -> 'Transport':
        """Wrap a connected socket; the transport closes it when closed."""
        return cls(sock.fileno(), close_fd=False, owner=sock)

    @property
    def closed(self) -> bool:
        return self._closed

    def _wait(self, events: int, deadline: Deadline) -> int:
        """Wait until the descriptor is ready for ``events``; return the poll flags seen."""
        # One poller per direction, made once: reads and writes each hold their own lock.
        poller = self._pollers.get(events)
        if poller is None:
            poller = select.poll()
            poller.register(self.fd, events)
            poller.register(self._wake_read, select.POLLIN)
            self._pollers[events] = poller
        while True:
            if self._closed:
                raise ConnectionClosed('channel closed locally')
            if deadline.expired:
                raise CallTimeout('channel not ready within the timeout')
            remaining = deadline.remaining()
            timeout_ms = None if remaining is None else max(1, int(remaining * 1000))
            for fd, flags in poller.poll(timeout_ms):
                if fd == self.fd:
                    return flags
            # Only the wake-up pipe fired (or the poll timed out): loop to re-check.

    def read(self, size: int = READ_SIZE, deadline: Deadline = NO_DEADLINE) -> bytes:
        """
        Read up to ``size`` bytes; ``b''`` means end of stream (for a port: no host connected).

        Raises :class:`ConnectionClosed` when :meth:`close` is called while waiting, and
        :class:`CallTimeout` when ``deadline`` passes.
        """
        with self._read_lock:
            return self._read_buffer.take(self._read(self._read_buffer.room(size), deadline, fill=False))

    def read_into(self, view: memoryview, deadline: Deadline = NO_DEADLINE) -> int:
        """
        Read into ``view`` until it is full or nothing more waits now; how many bytes came
        (0 means end of stream, as with :meth:`read`).

        The bytes of an attachment go straight to their place (:meth:`LineDecoder.attachment_room
        <negotiator_common.protocol.LineDecoder.attachment_room>`), one ``readv`` a port buffer
        with nothing else in between: in an emulated guest, the Python work around each 4 KiB
        read of :meth:`read` cost more than the read.
        """
        with self._read_lock:
            return self._read(view, deadline, fill=True)

    def _read(self, view: memoryview, deadline: Deadline, fill: bool) -> int:
        """
        The one read loop (the caller holds the read lock): how many bytes came into ``view``,
        after one read that found some (``fill`` False) or once the view is full or nothing more
        waits (``fill`` True); 0 at the end of the stream.

        While a stream flows, it reads first and polls only when nothing waits: a virtio-serial
        port hands over at most one 4 KiB buffer per read, so a stream costs one system call a
        buffer, not two. After a short read (a message, not a stream), it polls first: a read
        that finds nothing raises, and in an emulated guest that failed read doubled a ping's
        round trip.
        """
        filled = 0
        wait_first = not self._streaming
        while True:
            if self._closed:  # checked under the lock that close() takes before releasing the descriptor
                raise ConnectionClosed('channel closed locally')
            if wait_first:
                self._wait(select.POLLIN, deadline)
            try:
                count = self._readv(view[filled:])
            except BlockingIOError:  # the stream has paused: wait, now and after
                self._streaming = False
                if filled:
                    return filled
                wait_first = True
                continue
            except OSError as exc:
                if exc.errno in _EOF_ERRNOS:
                    return filled
                raise
            filled += count
            self.bytes_read += count
            if not count or not fill or filled == len(view):
                self._streaming = count >= STREAMING_READ or (count > 0 and filled == len(view))
                return filled
            wait_first = False

    def _readv(self, view: memoryview) -> int:
        """One non-blocking read into ``view`` (BlockingIOError when nothing waits)."""
        return os.readv(self.fd, [view])

    def write_all(self, data: Union[bytes, Sequence[bytes]], deadline: Deadline = NO_DEADLINE) -> None:
        """
        Write every byte, looping over partial writes (a port may take 32 KiB of 1 MiB).

        ``data`` is bytes, or a sequence of bytes-like parts written in order with vectored
        writes (``writev``): a raw output chunk goes out behind its header line without being
        copied there first.
        """
        parts = [memoryview(part) for part in ((data,) if isinstance(data, (bytes, bytearray, memoryview)) else data)
                 if len(part)]
        with self._lock:
            while parts:
                if self._closed:
                    # Checked under the lock that close() takes before releasing the descriptor:
                    # its number may already belong to another channel.
                    raise ConnectionClosed('channel closed locally')
                try:
                    written = os.write(self.fd, parts[0]) if len(parts) == 1 else os.writev(self.fd, parts)
                except BlockingIOError:
                    flags = self._wait(select.POLLOUT, deadline)
                    if flags & (select.POLLERR | select.POLLNVAL | select.POLLHUP) and not flags & select.POLLOUT:
                        # A port with no host connected reports POLLHUP at once: waiting would spin.
                        raise ConnectionClosed('peer is not connected (hang-up while writing)') from None
                    continue
                except OSError as exc:
                    if exc.errno in _EOF_ERRNOS or exc.errno == errno.ENODEV:
                        raise ConnectionClosed('peer closed the channel: %s' % exc) from exc
                    raise
                while written and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if written:
                    parts[0] = parts[0][written:]

    def close(self) -> None:
        """Wake any thread blocked in :meth:`read` or :meth:`write_all`, then release the descriptor."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_write, b'x')
        # Wait until no reader or writer is between poll() and its system call: the descriptor
        # number may be reused at once by another channel, whose bytes must never be read here.
        with self._read_lock, self._lock:
            if self._close_fd:
                os.close(self.fd)
            if isinstance(self._owner, socket.socket):
                self._owner.close()
            os.close(self._wake_write)
            os.close(self._wake_read)
