"""
The streams of one command on the serving side: its streamed input and the room for its output.

:class:`CommandStreams` joins the two threads of an ``execute`` (``docs/protocol.rst``,
"Streams and flow control"): the endpoint's reading thread hands it the caller's ``input``
chunks and ``credit`` (:meth:`CommandStreams.receive`, which never waits), and the thread that
runs the command takes the input as the command's pipe accepts it and reads output only as far
as the caller's room goes (:mod:`negotiator_common.runner`). A byte on :attr:`wake_fd` tells
the command's thread that something arrived, so that it waits on its pipes and on the caller at
once, with one ``select``. The counting is :mod:`negotiator_common.flow`'s.
"""

import os
import threading
from typing import Any, Callable, Dict, Optional

from negotiator_common.errors import NegotiatorError
from negotiator_common.flow import CREDIT_METHOD, FlowError, InboundStream, SendWindow
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import RAW_INPUT_METHOD, Notification

__all__ = ('CommandStreams', 'INPUT_WINDOW')

logger = get_logger(__name__)

INPUT_WINDOW = 256 * 1024
"""
The room an agent grants for a command's streamed input: the most of it that waits in memory,
and the most that a ping from the same caller can find ahead of it in the channel. The port
hands the agent 4 KiB a read, and every chunk is unescaped, so every byte ahead of a ping costs
it time. Measured on the TCG test guest, where the agent takes about 150 ms of CPU per MiB of
input: with 256 KiB, a ping waits tens of milliseconds behind a command that reads slowly
(2 MiB let it wait up to 0.7 s); with 64 KiB (chunks of 32 KiB), a push ran at half the speed,
each chunk costing the guest about 1.8 ms of its own (a header to parse, a wake-up, a grant).
"""


class CommandStreams(object):
    """
    The flow of one command's streams (thread-safe).

    :param notify: sends a notification to the caller (the endpoint's).
    :param request_id: the ``execute``'s id, which every ``credit`` names.
    :param input_window: the room for streamed input (None: the input is not streamed).
    :param output_window: the room the caller granted for output (None: no flow control).
    :param stop: called once when the caller breaks the rules (more input than granted):
                 the command is stopped, and :attr:`error` is what the call answers.
    """

    def __init__(self, notify: Callable[[Notification], None], request_id: Any, input_window: Optional[int],
                 output_window: Optional[int], stop: Callable[[], None]) -> None:
        self._notify = notify
        self.request_id = request_id
        self.input = InboundStream(input_window) if input_window else None
        self.output = SendWindow(output_window) if output_window else None
        self.error: Optional[NegotiatorError] = None
        self.input_end: Dict[str, Any] = {}
        """The params of the ``input`` that ended the input (a push's ``crc32`` is there)."""
        self._stop = stop
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._closed = False

    @property
    def wake_fd(self) -> int:
        """Readable when input, its end or credit arrived (:meth:`clear_wake` empties it)."""
        return self._wake_read

    # The reading thread's side.

    def receive(self, notification: Notification) -> None:
        """The caller's ``input`` or ``credit`` about this command (never waits; a bad grant is dropped)."""
        params = notification.params if isinstance(notification.params, dict) else {}
        with self._lock:
            if notification.method == RAW_INPUT_METHOD:
                self._receive_input(notification.attachment, params.get('eof') is True)
                if params.get('eof') is True and notification.attachment is None:
                    self.input_end = params
            elif notification.method == CREDIT_METHOD and self.output is not None:
                try:
                    self.output.grant(params.get('bytes'))
                except FlowError as exc:
                    logger.debug("Dropping credit for %s: %s", self.request_id, exc)
            self._wake()

    def _receive_input(self, chunk: Optional[bytes], eof: bool) -> None:
        if self.input is None or self.error is not None:
            return
        try:
            if chunk is not None:
                self.input.feed(chunk)
            elif eof:
                self.input.finish()
        except FlowError as exc:
            self.error = FlowError('the caller broke the flow control of the input: %s' % exc)
            self.input.discard()
            self._stop()

    def _wake(self) -> None:
        """Write the wake-up byte (under the lock, which :meth:`close` takes before the pipe's numbers go)."""
        if self._closed:
            return
        try:
            os.write(self._wake_write, b'x')
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or the streams are closed)

    # The command's side.

    def clear_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def start_input(self) -> None:
        """The command runs: grant the first room for its input."""
        if self.input is not None:
            self._grant(self.input.window.size)

    def read_input(self, limit: int) -> Optional[bytes]:
        """Up to ``limit`` bytes of input; ``b''`` at its end, None when none waits now."""
        assert self.input is not None
        with self._lock:
            data = self.input.read(limit)
            if data or (self.input.ended and self.error is None):
                return data
            return None

    def input_written(self, amount: int) -> None:
        """The command took ``amount`` bytes of input: grant room again when enough is free."""
        assert self.input is not None
        with self._lock:
            grant = self.input.consumed(amount)
        if grant:
            self._grant(grant)

    def drop_input(self) -> None:
        """The command reads no more (it closed its input, or ended): what arrives is dropped."""
        if self.input is not None:
            with self._lock:
                self.input.discard()

    def output_room(self) -> Optional[int]:
        """How many bytes of output may be sent now (None: as many as come)."""
        if self.output is None:
            return None
        with self._lock:
            return self.output.credit

    def spend_output(self, amount: int) -> int:
        """Use room for ``amount`` bytes of output; return how many of them may be sent."""
        if self.output is None:
            return amount
        with self._lock:
            return self.output.take(amount)

    def _grant(self, amount: int) -> None:
        self._notify(Notification(CREDIT_METHOD, {'id': self.request_id, 'bytes': amount}))

    def close(self) -> None:
        """The call is over: drop what is held, release the wake-up pipe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.input is not None:
                self.input.discard()
            os.close(self._wake_read)
            os.close(self._wake_write)
