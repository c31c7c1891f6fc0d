"""
The one exception tree of negotiator, and the stable error codes that carry it over the wire.

Every error that negotiator raises derives from :class:`NegotiatorError`. Each class has a
numeric ``code`` that never changes between releases, so that an error raised by a handler on
one side of a channel travels as a JSON-RPC error object and is raised again, as the same
class, on the other side (:func:`error_from_wire`). The hierarchy::

    NegotiatorError                  -32000  anything negotiator raises
    ├── ProtocolError                          the wire itself went wrong
    │   ├── ParseError               -32700  a line that is not JSON (or not UTF-8)
    │   ├── InvalidRequest           -32600  JSON that is not a valid message
    │   ├── MessageTooLarge          -32001  a line longer than the maximum line length
    │   └── MethodNotFound           -32601  a method that is not registered
    ├── InvalidParams                -32602  parameters of the wrong shape or type
    ├── InternalError                -32603  a handler failed unexpectedly
    ├── LimitExceeded                -32002  a resource bound was hit (concurrency, stdin, ...)
    ├── UnsendableRequest            -32003  (client side) refused before sending: over the
    │                                          agent's declared limits, or not encodable
    ├── CommandError                           about user-defined commands
    │   ├── CommandNotFound          -32010  no such command (or a name that is not valid)
    │   ├── CommandNotAllowed        -32011  the owner's policy refuses this command
    │   ├── CommandFailed            -32012  the command exited with a non-zero status
    │   └── CommandTimedOut          -32013  the command ran past its timeout and was killed
    ├── TransferError                          about files pushed and pulled
    │   ├── FileError                -32020  a file could not be read or written (the path and
    │   │                                      the reason, an errno name, are in ``data``)
    │   └── ChecksumMismatch         -32021  the bytes that arrived are not the bytes sent
    └── ChannelError                           local failures of a channel
        ├── CallTimeout              -32050  no reply within the caller's timeout
        ├── ConnectionClosed         -32051  the peer went away before replying
        ├── ChannelNotFound          -32052  no channel (socket or port) to talk over
        ├── ChannelBusy              -32053  another process holds the channel (EBUSY)
        └── GuestNotFound            -32054  no running guest by that name

Codes -32700 and -32600 to -32603 are JSON-RPC 2.0's own; -32000 to -32099 is the range that
JSON-RPC leaves to implementations. The protocol specification (``docs/protocol.rst``) lists
the same table; a test checks that the two agree.
"""

from typing import Any, Dict, Optional, Type

__all__ = (
    'NegotiatorError', 'ProtocolError', 'ParseError', 'InvalidRequest', 'MessageTooLarge',
    'MethodNotFound', 'InvalidParams', 'InternalError', 'LimitExceeded', 'UnsendableRequest', 'CommandError',
    'CommandNotFound', 'CommandNotAllowed', 'CommandFailed', 'CommandTimedOut', 'TransferError', 'FileError',
    'ChecksumMismatch',
    'ChannelError', 'CallTimeout', 'ConnectionClosed', 'ChannelNotFound', 'ChannelBusy',
    'GuestNotFound', 'ERROR_CLASSES', 'error_from_wire',
)


class NegotiatorError(Exception):
    """The root of every error that negotiator raises (code -32000)."""

    code = -32000

    def __init__(self, message: str = '', data: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        self.data = dict(data or {})

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-RPC error object for this error."""
        error: Dict[str, Any] = {'code': self.code, 'message': self.message}
        if self.data:
            error['data'] = self.data
        return error


class ProtocolError(NegotiatorError):
    """The bytes on the wire were not a valid message (an abstract parent)."""


class ParseError(ProtocolError):
    """A line that is not valid UTF-8 or not valid JSON."""

    code = -32700


class InvalidRequest(ProtocolError):
    """A JSON value that is not a valid JSON-RPC 2.0 request or response."""

    code = -32600


class MessageTooLarge(ProtocolError):
    """A line longer than the maximum line length; it was discarded up to its newline."""

    code = -32001


class MethodNotFound(ProtocolError):
    """A request named a method that the peer has not registered."""

    code = -32601


class InvalidParams(NegotiatorError):
    """A request's parameters have the wrong shape, a missing field or a wrong type."""

    code = -32602


class InternalError(NegotiatorError):
    """A handler raised something unexpected; the server logged it and lives on."""

    code = -32603


class LimitExceeded(NegotiatorError):
    """A request went over a resource bound (concurrent requests, stdin size, arguments)."""

    code = -32002


class UnsendableRequest(NegotiatorError):
    """
    A request that the client refused to send, because the agent would refuse it or could not
    read it: over a limit that the agent declared in ``hello`` (stdin, arguments, timeout, line
    length), or an argument that is not valid UTF-8. Raised before anything is sent, so the
    caller learns at once what is wrong instead of waiting for a reply that cannot come.
    """

    code = -32003


class CommandError(NegotiatorError):
    """Something about a user-defined command (an abstract parent)."""


class CommandNotFound(CommandError):
    """No command by that name is listed (or the name is not a valid command name)."""

    code = -32010


class CommandNotAllowed(CommandError):
    """The owner's policy does not allow this peer to run this command."""

    code = -32011


class _CommandOutcome(CommandError):
    """A command that ran: carries what it printed, so that a caller can show it."""

    @property
    def exit_status(self) -> Optional[int]:
        """The command's exit status (None when it was killed by a signal)."""
        return self.data.get('exit_status')

    @property
    def stdout(self) -> bytes:
        """What the command wrote to its standard output (bytes)."""
        return self._output('stdout')

    @property
    def stderr(self) -> bytes:
        """What the command wrote to its standard error (bytes)."""
        return self._output('stderr')

    def _output(self, name: str) -> bytes:
        """One output of the error's data, as the agent sent it (text or base64); empty if unreadable."""
        from negotiator_common.protocol import decode_bytes  # here: protocol imports this module
        try:
            return decode_bytes(self.data, name) or b''
        except ValueError:  # the peer's data, malformed: the error itself is what matters
            return b''


class CommandFailed(_CommandOutcome):
    """A command exited with a non-zero status: ``exit_status``, ``stdout`` and ``stderr`` say how."""

    code = -32012


class CommandTimedOut(_CommandOutcome):
    """A command ran past its timeout; its whole process group was killed."""

    code = -32013


class TransferError(NegotiatorError):
    """A file transfer (``push``, ``pull``) failed (an abstract parent)."""


class FileError(TransferError):
    """
    A file could not be read or written: ``data`` names the ``path`` and the ``reason``, the
    name of the errno (``ENOENT``, ``EACCES``, ``ENOSPC``...) or ``unsafe`` for an archive
    member that would leave its tree.
    """

    code = -32020

    @property
    def reason(self) -> str:
        reason = self.data.get('reason')
        return reason if isinstance(reason, str) else ''


class ChecksumMismatch(TransferError):
    """The CRC-32 of what arrived is not the sender's: nothing was kept."""

    code = -32021


class ChannelError(NegotiatorError):
    """A channel could not be used (an abstract parent of local failures)."""


class CallTimeout(ChannelError):
    """No reply arrived within the caller's timeout."""

    code = -32050


class ConnectionClosed(ChannelError):
    """The peer closed the channel (or its daemon died) before replying."""

    code = -32051


class ChannelNotFound(ChannelError):
    """There is no channel to talk over: no socket on the host, or no port in the guest."""

    code = -32052


class ChannelBusy(ChannelError):
    """Another process holds the channel (a virtio-serial port opens once: EBUSY)."""

    code = -32053


class GuestNotFound(ChannelError):
    """No running guest has that name."""

    code = -32054


def _all_subclasses(cls: Type[NegotiatorError]) -> list:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


ERROR_CLASSES: Dict[int, Type[NegotiatorError]] = {}
"""Every concrete error class by its wire code (abstract parents share their parent's code)."""

for _cls in _all_subclasses(NegotiatorError):
    if not _cls.__name__.startswith('_'):
        ERROR_CLASSES.setdefault(_cls.code, _cls)


def error_from_wire(error: Any) -> NegotiatorError:
    """
    Turn a JSON-RPC error object received from a peer into the matching exception.

    An unknown code (from a newer peer, or another implementation) becomes a plain
    :class:`NegotiatorError` that keeps the code, so nothing the peer said is lost.
    """
    if not isinstance(error, dict):
        return InvalidRequest('peer sent a malformed error object: %r' % (error,))
    code = error.get('code')
    message = str(error.get('message', ''))
    data = error.get('data')
    data = data if isinstance(data, dict) else ({'data': data} if data is not None else None)
    cls = ERROR_CLASSES.get(code) if isinstance(code, int) and not isinstance(code, bool) else None
    if cls is None:
        exc = NegotiatorError(message, data)
        exc.code = code if isinstance(code, int) else NegotiatorError.code
        return exc
    return cls(message, data)
