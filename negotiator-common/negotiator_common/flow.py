"""
Windows of credit for chunked streams, with no I/O (``docs/protocol.rst``, "Flow control").

A stream's receiver grants room in bytes; its sender sends no more than it was granted and has
not used; the receiver grants more as its consumer takes the bytes. Two small classes keep the
count on each side, so that every stream (a command's input, its output, on either side of the
host daemon) follows the same rules:

- :class:`SendWindow`, the sender's side: :meth:`~SendWindow.grant` when a ``credit`` arrives,
  :meth:`~SendWindow.take` before sending a chunk.
- :class:`ReceiveWindow`, the receiver's side: :meth:`~ReceiveWindow.receive` when a chunk
  arrives (more than was granted is :class:`FlowError`), :meth:`~ReceiveWindow.consume` when the
  consumer took bytes (it returns the room to grant now, if any).

:class:`InboundStream` is a receiver's whole stream: its window and the bytes that wait for the
consumer, in order, never more than the window.
"""

import collections
from typing import Deque

from negotiator_common.errors import InvalidRequest

__all__ = ('SendWindow', 'ReceiveWindow', 'InboundStream', 'FlowError', 'valid_grant', 'MAX_CREDIT', 'MIN_WINDOW',
           'CREDIT_METHOD')

MAX_CREDIT = 2 ** 40
"""The most room a sender may hold at once: grants beyond it are refused (a peer cannot grow an integer forever)."""

CREDIT_METHOD = 'credit'
"""The notification that grants room: ``{"id": ID, "bytes": N}``, either way (``docs/protocol.rst``, "Flow control")."""

MIN_WINDOW = 64 * 1024
"""The smallest window a caller may ask for the output of a call: room for the output of any built-in command."""


class FlowError(InvalidRequest):
    """The peer sent more than the room it was granted, or granted room that is not well formed (``-32600``)."""


def valid_grant(value: object) -> bool:
    """Whether ``value`` may be the ``bytes`` of a ``credit``: an integer from 1 to :data:`MAX_CREDIT`."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CREDIT


class SendWindow(object):
    """The sender's count: :attr:`credit` is the room granted and not yet used."""

    def __init__(self, credit: int = 0) -> None:
        self.credit = credit

    def grant(self, amount: object) -> None:
        """The receiver granted ``amount`` bytes more; :class:`FlowError` if that is not a valid grant."""
        if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= MAX_CREDIT - self.credit:
            raise FlowError('a grant of credit must be an integer from 1 to %d in all, not %r' % (
                MAX_CREDIT, amount))
        self.credit += amount

    def take(self, wanted: int) -> int:
        """Use up to ``wanted`` bytes of the room; return how many may be sent now (0: wait for a grant)."""
        amount = max(0, min(wanted, self.credit))
        self.credit -= amount
        return amount


class ReceiveWindow(object):
    """
    The receiver's count for a window of ``size`` bytes, granted at once on creation.

    :attr:`outstanding` is what the sender may still send; :attr:`held` is what arrived and the
    consumer has not taken. Their sum never exceeds ``size``: that is the memory bound. Room is
    granted again once at least ``size // 2`` of it is free (as SSH does), so that grants are
    few and large.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError('a window must hold at least one byte')
        self.size = size
        self.outstanding = size
        self.held = 0

    def receive(self, amount: int) -> None:
        """``amount`` bytes arrived; :class:`FlowError` when that is more than the room granted (nothing counted)."""
        if amount > self.outstanding:
            raise FlowError('%d bytes arrived with room for %d only' % (amount, self.outstanding))
        self.outstanding -= amount
        self.held += amount

    def consume(self, amount: int) -> int:
        """The consumer took ``amount`` of the held bytes; return the room to grant now (0: not yet)."""
        if not 0 <= amount <= self.held:
            raise ValueError('cannot consume %d of %d bytes held' % (amount, self.held))
        self.held -= amount
        free = self.size - self.outstanding - self.held
        if free < max(1, self.size // 2):
            return 0
        self.outstanding += free
        return free


class InboundStream(object):
    """
    A received stream: chunks in, bytes out in order, at most a window's worth held.

    :meth:`feed` takes a chunk (:class:`FlowError` beyond the room granted; the chunk is then
    dropped), :meth:`finish` marks the end, :meth:`read` gives the consumer up to a number of
    bytes, which still count as held until :meth:`consumed` says they are gone (it returns the
    room to grant back), and :meth:`discard` drops what is held when the consumer is gone (the
    room it frees is never granted again).
    """

    def __init__(self, window: int) -> None:
        self.window = ReceiveWindow(window)
        self._chunks: Deque[bytes] = collections.deque()
        self.finished = False
        self.discarding = False

    @property
    def held(self) -> int:
        """Bytes received and not yet consumed (those read and not yet :meth:`consumed` too)."""
        return self.window.held

    @property
    def ended(self) -> bool:
        """Whether the consumer has read everything: the end came and nothing waits."""
        return self.finished and not self._chunks

    def feed(self, chunk: bytes) -> None:
        if self.finished:
            raise FlowError('data arrived after the end of the stream')
        self.window.receive(len(chunk))
        if self.discarding:
            self.window.held -= len(chunk)
        elif chunk:
            self._chunks.append(chunk)

    def finish(self) -> None:
        self.finished = True

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` of the bytes that wait, in order (``b''`` when none does)."""
        if not self._chunks or limit < 1:
            return b''
        chunk = self._chunks.popleft()
        if len(chunk) > limit:
            self._chunks.appendleft(chunk[limit:])
            chunk = chunk[:limit]
        return chunk

    def consumed(self, amount: int) -> int:
        """The consumer is done with ``amount`` bytes it read; return the room to grant now (0: not yet)."""
        if self.discarding:
            return 0
        return self.window.consume(amount)

    def discard(self) -> None:
        """The consumer is gone: drop what is held, and what arrives from now on (within the room granted)."""
        self.discarding = True
        self._chunks.clear()
        self.window.held = 0
