"""
The streams of one call on the calling side: the input it sends, the output it receives.

Both follow the windows of ``docs/protocol.rst`` ("Streams and flow control"), counted by
:mod:`negotiator_common.flow`, and neither ever makes the endpoint's reading thread wait:

- :class:`InputPump` sends a command's standard input (bytes, a binary file object or an
  iterable of byte chunks) in ``input`` chunks as the agent grants room, on a thread of its own
  that starts at the agent's first ``credit`` (which names the call's id) and stops at the reply.
- :class:`OutputReceiver` takes the output of a call that granted a window: collected into the
  result at once, or queued (at most the window) for a thread that writes it to the caller's
  file and grants the room back as the file takes it, so that a slow consumer slows its own
  call only.
"""

import collections
import threading
from typing import Any, BinaryIO, Callable, Deque, Dict, Iterable, Iterator, Optional, Tuple, Union

from negotiator_common.cancellation import Cancellation
from negotiator_common.errors import ConnectionClosed, UnsendableRequest
from negotiator_common.flow import CREDIT_METHOD, FlowError, ReceiveWindow, SendWindow
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import RAW_INPUT_METHOD, Notification, decode_bytes

__all__ = ('InputPump', 'OutputReceiver', 'InputSource', 'read_bounded', 'INPUT_CHUNK_SIZE')

logger = get_logger(__name__)

INPUT_CHUNK_SIZE = 128 * 1024
"""
The largest chunk of input sent at once (and read from the source at once): half the window an
agent of this release grants (:data:`~negotiator_common.streams.INPUT_WINDOW`). A chunk is
written whole, under the channel's write lock, so a ping waits for the chunk in progress; the
cost per chunk (a header line to parse) stays small beside its bytes.
"""

InputSource = Union[bytes, bytearray, memoryview, BinaryIO, Iterable[bytes]]
"""A command's standard input: bytes, a binary file object (read until its end) or an iterable of byte chunks."""


def input_pieces(source: InputSource, size: int = INPUT_CHUNK_SIZE) -> Iterator[bytes]:
    """``source`` in pieces of at most ``size`` bytes, none empty, read as they are needed."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])
        return
    read = getattr(source, 'read1', None) or getattr(source, 'read', None)
    if read is not None:
        while True:
            piece = read(size)
            if not piece:
                return
            yield bytes(piece)
    else:
        for chunk in source:  # an iterable of chunks, which may be of any size
            view = memoryview(chunk)
            for start in range(0, len(view), size):
                yield bytes(view[start:start + size])


def read_bounded(source: InputSource, limit: int) -> bytes:
    """
    All of ``source`` as bytes, for an agent that takes input only in the request; a file is
    read one byte past ``limit`` at most, and input longer than ``limit`` is :class:`UnsendableRequest`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        parts = []
        total = 0
        read = getattr(source, 'read1', None) or getattr(source, 'read', None)
        pieces = iter(lambda: read(min(INPUT_CHUNK_SIZE, limit + 1 - total)), b'') if read is not None \
            else input_pieces(source)
        for piece in pieces:
            parts.append(bytes(piece))
            total += len(piece)
            if total > limit:
                break
        data = b''.join(parts)
    if len(data) > limit:
        raise UnsendableRequest('the input is more than %d bytes, which the agent (older, without streamed input)'
                                ' takes at most' % limit)
    return data


class InputPump(object):
    """
    Sends one call's standard input within the room the agent grants.

    Give :meth:`on_credit` to the call as its ``on_credit``; call :meth:`finish` when the call
    is over. ``end``, when given, makes the params that the end of the input carries besides its
    ``id`` and ``eof`` (a push's ``crc32``), once the source is spent. A source that fails
    sets :attr:`error` and ``cancelled`` (the call is cancelled in
    the agent), and the call raises that error.
    """

    def __init__(self, notify: Callable[[Notification], None], source: InputSource, cancelled: Cancellation,
                 end: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        self._notify = notify
        self._end = end
        self._pieces = input_pieces(source)
        self.cancelled = cancelled
        self.window = SendWindow()
        self.request_id: Any = None
        self.error: Optional[BaseException] = None
        self._done = False
        self._thread: Optional[threading.Thread] = None
        self._changed = threading.Condition()

    def on_credit(self, params: Dict[str, Any]) -> None:
        """A ``credit`` from the agent (on the reading thread): more room; the first starts the sending."""
        with self._changed:
            if self._done:
                return
            try:
                self.window.grant(params.get('bytes'))
            except FlowError as exc:
                logger.debug("Dropping credit for the input of %s: %s", self.request_id, exc)
                return
            if self._thread is None:
                self.request_id = params.get('id')
                self._thread = threading.Thread(target=self._send_all, name='negotiator-input-%s' % self.request_id)
                self._thread.daemon = True
                self._thread.start()
            self._changed.notify_all()

    def finish(self) -> None:
        """The call is over: send no more (a thread blocked in the source's read ends with it)."""
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def _room(self, wanted: int) -> int:
        """Wait for room; take up to ``wanted`` bytes of it; 0 once the call is over."""
        with self._changed:
            self._changed.wait_for(lambda: self._done or self.window.credit > 0)
            return 0 if self._done else self.window.take(wanted)

    def _send_all(self) -> None:
        try:
            for piece in self._pieces:
                view = memoryview(piece)
                while view:
                    amount = self._room(len(view))
                    if not amount:
                        return
                    self._send({'id': self.request_id}, bytes(view[:amount]))
                    view = view[amount:]
            if not self._done:
                params = dict(self._end() if self._end is not None else {}, id=self.request_id, eof=True)
                self._send(params, None)
        except ConnectionClosed:
            pass  # the call fails with it too
        except Exception as exc:  # the source failed: the call is cancelled and raises this
            self.error = exc
            self.cancelled.set()

    def _send(self, params: Dict[str, Any], attachment: Optional[bytes]) -> None:
        self._notify(Notification(RAW_INPUT_METHOD, params, attachment=attachment))


class OutputReceiver(object):
    """
    The output of one call that granted ``window`` bytes of room (see the module's documentation).

    Called with the params of each ``output`` notification, on the reading thread.
    ``sinks[stream]`` is a binary file (written on a thread of this call's own) or None (the
    output is collected, up to ``max_output`` bytes a stream). Output beyond the room granted
    is :class:`~negotiator_common.flow.FlowError` (the endpoint fails the call with it).
    """

    def __init__(self, notify: Callable[[Notification], None], sinks: Dict[str, Optional[BinaryIO]],
                 max_output: Optional[int], window: int, on_sink_error: Callable[[BaseException], None]) -> None:
        self._notify = notify
        self.sinks = sinks
        self.max_output = max_output
        self.window = ReceiveWindow(window)
        self.on_sink_error = on_sink_error
        self.collected = {'stdout': bytearray(), 'stderr': bytearray()}
        self.truncated = {'stdout': False, 'stderr': False}
        self.sink_error: Optional[BaseException] = None
        self._queue: Deque[Tuple[str, bytes]] = collections.deque()
        self._request_id: Any = None
        self._writer: Optional[threading.Thread] = None
        self._changed = threading.Condition()
        self._closed = False

    def __call__(self, params: Dict[str, Any]) -> None:
        stream = params.get('stream')
        if not isinstance(stream, str) or stream not in self.collected:
            return
        try:
            chunk = decode_bytes(params, 'data') or b''
        except ValueError:
            return
        with self._changed:
            self.window.receive(len(chunk))  # FlowError: the agent sent more than it was granted
            self._request_id = params.get('id')
            if self.sinks[stream] is None or self.sink_error is not None:
                self._collect(stream, chunk)
                grant = self.window.consume(len(chunk))
            else:
                self._queue.append((stream, chunk))
                self._start_writer()
                self._changed.notify_all()
                grant = 0
        self._grant(grant)

    def _collect(self, stream: str, chunk: bytes) -> None:
        if self.sinks[stream] is not None:
            return  # its sink failed: the rest is dropped
        buffer = self.collected[stream]
        room = len(chunk) if self.max_output is None else max(0, self.max_output - len(buffer))
        if len(chunk) > room:
            self.truncated[stream] = True
        buffer += chunk[:room]

    def _grant(self, amount: int) -> None:
        if amount:
            self._notify(Notification(CREDIT_METHOD, {'id': self._request_id, 'bytes': amount}))

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name='negotiator-output-%s' % self._request_id)
            self._writer.daemon = True
            self._writer.start()

    def _write(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return
                stream, chunk = self._queue[0]
            sink = self.sinks[stream]
            assert sink is not None
            try:
                sink.write(chunk)
                sink.flush()
            except Exception as exc:  # any failure of the caller's file ends the call, with that error
                with self._changed:
                    self.sink_error = exc
                    self._queue.clear()
                    self._changed.notify_all()
                self.on_sink_error(exc)
                return
            with self._changed:
                self._queue.popleft()
                grant = self.window.consume(len(chunk))
                self._changed.notify_all()
            self._grant(grant)

    def finish(self, wait: bool = True) -> None:
        """
        The call is over: wait until the queued output is written (or its file failed), then
        end the writer; without ``wait`` (the call failed), what is queued is dropped.
        """
        with self._changed:
            if not wait:
                self._queue.clear()
            self._changed.wait_for(lambda: not self._queue)
            self._closed = True
            self._changed.notify_all()
