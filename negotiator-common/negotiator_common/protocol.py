"""
The wire protocol, with no I/O: bytes in, messages out; messages in, bytes out.

Framing and message shapes follow ``docs/protocol.rst`` (sections "Framing" and "Messages"):
each message is one JSON-RPC 2.0 object, encoded as UTF-8 JSON on a single line ending in
``\\n``. The one exception is raw output ("Raw output"): an ``output`` notification whose params
carry an integer ``size`` is followed by exactly that many raw bytes, its attachment; so is an
``input`` notification with ``size`` ("Streamed input"), the other way, whose bytes are escaped
so that they hold no line feed (:func:`escape_input`).
:class:`LineDecoder` is fed byte chunks of any size and returns events; it never raises on bad
input and never holds more than ``max_line_length`` bytes, whatever it is fed.
The caller owns the transport, as in h11: the same core serves sockets and character devices.
"""

import codecs
import json
import re
from typing import Any, Dict, List, Optional, Tuple, Union

from negotiator_common.errors import (
    InvalidRequest, MessageTooLarge, NegotiatorError, ParseError, ProtocolError, error_from_wire,
)

__all__ = (
    'PROTOCOL_VERSION', 'DEFAULT_MAX_LINE_LENGTH', 'Request', 'Response', 'Notification',
    'DecodeError', 'Message', 'Event', 'LineDecoder', 'encode_message', 'encode_message_parts', 'encode_bytes',
    'decode_bytes', 'valid_id', 'RAW_OUTPUT_METHOD', 'RAW_INPUT_METHOD', 'MAX_VALUES', 'escape_input',
    'unescape_input',
)

PROTOCOL_VERSION = 1
"""The version of the protocol that this code speaks (exchanged by ``hello``)."""

DEFAULT_MAX_LINE_LENGTH = 16 * 1024 * 1024
"""The longest line (without its newline) that a decoder accepts by default: 16 MiB."""

RAW_OUTPUT_METHOD = 'output'
"""The notification that may carry a raw attachment to a caller (a ``size`` in its params, the bytes after its line)."""

RAW_INPUT_METHOD = 'input'
"""The notification that may carry a raw attachment to a server: a chunk of a command's streamed input."""

_ATTACHMENT_METHODS = (RAW_OUTPUT_METHOD, RAW_INPUT_METHOD)


def escape_input(data: bytes) -> bytes:
    """
    The bytes of an ``input`` chunk as they travel: every backslash becomes two and every line
    feed a backslash and ``n``, so that the chunk holds no line feed.

    Why: an agent that restarts under a connected client reads the rest of a chunk in flight as
    lines (its new decoder never saw the chunk's header). With no line feed in any chunk, every
    such line is the rest of a chunk followed by the next header line, which no JSON parser
    accepts unless the rest is blank (a header is one whole object, so anything before it
    leaves a value unclosed or a second value): a line of the input can never be served as a
    request (``docs/protocol.rst``, "Streamed input"). The cost is two C-speed replacements
    here, and about one byte in 128 more for random data.
    """
    return data.replace(b'\\', b'\\\\').replace(b'\n', b'\\n')


def unescape_input(data: bytes) -> bytes:
    """
    The inverse of :func:`escape_input`, in one pass of C (``codecs.escape_decode``, the
    decoder of Python's bytes literals, whose escapes include these two).

    Why that decoder: the agent unescapes every byte of a push in a guest that often runs
    emulated, where the two replacements of pairs that an escape byte needed took about 30 %
    of the agent's time in a push (measured under TCG); this one is five times faster. A chunk
    that no conforming caller sends (a backslash before anything but a backslash or ``n``) may
    decode as Python would decode it, or, where Python refuses it, with those two pairs
    replaced and any other backslash kept: either way it never ends a line or frames a message.
    """
    if b'\\' not in data:
        return data
    try:
        return codecs.escape_decode(data)[0]
    except ValueError:
        return _BACKSLASH_PAIR.sub(lambda match: b'\n' if match.group(1) == b'n' else b'\\', data)


_BACKSLASH_PAIR = re.compile(b'\\\\([\\\\n])')

MAX_NESTING = 64
"""JSON deeper than this is refused as invalid, before it can exhaust the parser's stack."""


class Request(object):
    """A call that expects a reply with the same ``id``."""

    __slots__ = ('id', 'method', 'params')

    def __init__(self, id: Any, method: str, params: Any = None) -> None:
        self.id = id
        self.method = method
        self.params = {} if params is None else params

    def to_wire(self) -> Dict[str, Any]:
        message: Dict[str, Any] = {'jsonrpc': '2.0', 'id': self.id, 'method': self.method}
        if self.params:
            message['params'] = self.params
        return message

    def __repr__(self) -> str:
        return 'Request(id=%r, method=%r)' % (self.id, self.method)


class Notification(object):
    """
    A one-way message (no ``id``, no reply): streamed command output and input, credit.

    ``attachment`` (bytes, or None) is the raw payload of an ``output`` or ``input``
    notification in the raw framing: encoded, the params gain ``"size"``, the length of
    :meth:`wire_attachment`, and those bytes follow the line.
    """

    __slots__ = ('method', 'params', 'attachment', '_wire')

    def __init__(self, method: str, params: Any = None, attachment: Optional[bytes] = None) -> None:
        self.method = method
        self.params = {} if params is None else params
        self.attachment = attachment
        self._wire: Optional[bytes] = None

    def wire_attachment(self) -> bytes:
        """The attachment as it travels: as it is for ``output``, escaped for ``input`` (:func:`escape_input`)."""
        if self.attachment is None:
            raise ValueError('this notification carries no attachment')
        if self._wire is None:
            self._wire = escape_input(self.attachment) if self.method == RAW_INPUT_METHOD else self.attachment
        return self._wire

    def to_wire(self) -> Dict[str, Any]:
        params = self.params
        if self.attachment is not None:
            if self.method not in _ATTACHMENT_METHODS or not isinstance(params, dict) or not self.attachment:
                raise ValueError('only an output or input notification with params carries an attachment, of at'
                                 ' least one byte')
            params = dict(params, size=len(self.wire_attachment()))
        return {'jsonrpc': '2.0', 'method': self.method, 'params': params}

    def __repr__(self) -> str:
        return 'Notification(method=%r)' % (self.method,)


class Response(object):
    """The reply to a request: a ``result``, or an ``error`` (a :class:`NegotiatorError`)."""

    __slots__ = ('id', 'result', 'error')

    def __init__(self, id: Any, result: Any = None, error: Optional[NegotiatorError] = None) -> None:
        self.id = id
        self.result = result
        self.error = error

    def to_wire(self) -> Dict[str, Any]:
        message: Dict[str, Any] = {'jsonrpc': '2.0', 'id': self.id}
        if self.error is not None:
            message['error'] = self.error.to_wire()
        else:
            message['result'] = self.result
        return message

    def __repr__(self) -> str:
        return 'Response(id=%r, %s)' % (self.id, 'error=%r' % self.error if self.error else 'ok')


class DecodeError(object):
    """
    An event that reports a bad line (the decoder carries on with the next line).

    ``error`` is the :class:`ProtocolError` to answer with; ``id`` is the request id when the
    line was a recognisable request with bad fields (so the reply can name it), else None.
    """

    __slots__ = ('error', 'id')

    def __init__(self, error: ProtocolError, id: Any = None) -> None:
        self.error = error
        self.id = id

    def __repr__(self) -> str:
        return 'DecodeError(%r, id=%r)' % (self.error, self.id)


Message = Union[Request, Notification, Response]
Event = Union[Request, Notification, Response, DecodeError]


def valid_id(value: Any) -> bool:
    """JSON-RPC ids this protocol accepts: strings, integers (not booleans) and null."""
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


# One encoder and one decoder for every message: json.dumps/json.loads with options build a new
# one per call, which costs more than encoding a small message (measured by scripts/benchmark).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(',', ':'), allow_nan=False)


def encode_message(message: Message) -> bytes:
    """
    One message as one line of bytes (the JSON encoder escapes every newline inside strings);
    a notification with an attachment is its line followed by the attachment's raw bytes.
    """
    return b''.join(encode_message_parts(message))


def encode_message_parts(message: Message) -> Tuple[bytes, ...]:
    """
    :func:`encode_message` as the line and the attachment apart (one part when there is none),
    so that a writer can send both with one vectored write instead of copying the attachment
    (up to 1 MiB) behind the line.
    """
    line = _ENCODER.encode(message.to_wire()).encode('utf-8', 'surrogateescape') + b'\n'
    if not isinstance(message, Notification) or message.attachment is None:
        return (line,)
    return (line, message.wire_attachment())


_ESCAPED_CONTROLS = bytes(b for b in range(32) if b not in (9, 10, 13)) + b'\x7f'
"""Bytes that JSON text carries as six-character escapes (tab, newline and return cost two)."""


def encode_bytes(data: bytes, name: str) -> Dict[str, str]:
    """
    Carry bytes as ``{name: text}`` when they are valid UTF-8 text, else as ``{name_b64: base64}``.

    Text that is mostly control characters (a stream of NUL bytes, say) would grow up to six
    times as JSON escapes; it travels as base64, which grows by a third, whenever that is smaller.
    """
    controls = len(data) - len(data.translate(None, _ESCAPED_CONTROLS))
    if controls * 5 <= len(data) // 3:
        try:
            return {name: data.decode('utf-8')}
        except UnicodeDecodeError:
            pass
    import base64  # here: a call that carries no binary data does not import it
    return {name + '_b64': base64.b64encode(data).decode('ascii')}


def decode_bytes(fields: Dict[str, Any], name: str, default: Optional[bytes] = b'') -> Optional[bytes]:
    """
    The inverse of :func:`encode_bytes`; raises :class:`ValueError` on a field of the wrong type.

    A ``name_raw`` field of bytes (the attachment of a raw ``output`` notification, which the
    endpoint hands to a call's notification callback under ``data_raw``) comes first.
    """
    raw = fields.get(name + '_raw')
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if name + '_b64' in fields:
        value = fields[name + '_b64']
        if not isinstance(value, str):
            raise ValueError('%s_b64 must be a string' % name)
        import base64
        return base64.b64decode(value.encode('ascii'), validate=True)
    if name in fields:
        value = fields[name]
        if not isinstance(value, str):
            raise ValueError('%s must be a string' % name)
        return value.encode('utf-8')
    return default


def _reject_constant(name: str) -> Any:
    raise ValueError('%s is not valid JSON' % name)


def _finite_float(text: str) -> float:
    # json reads 1e999 as float('inf'), which this side could never encode again (allow_nan=False):
    # a number out of the range of a double is invalid, like NaN and Infinity.
    value = float(text)
    if value in (float('inf'), float('-inf')):
        raise ValueError('number %s... is out of range' % text[:20])
    return value


MAX_INTEGER_DIGITS = 4300
"""Longer integers are refused on every Python (3.11 and later refuse them anyway): parsing one costs quadratic time."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip('-')) > MAX_INTEGER_DIGITS:
        raise ValueError('integer of %d digits is too long' % len(text))
    return int(text)


def _reject_duplicates(pairs: List[Any]) -> Dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError('duplicate keys in a JSON object')
    return result


MAX_VALUES = 65536
"""
The most JSON values that one line may hold, counted as ``{``, ``[`` and ``,`` outside strings;
a line with more is refused (:class:`MessageTooLarge`) before ``json`` parses it.

Why: a legal 4 MiB line of ``{},{},...`` made ``json`` build a million objects, about 100 MiB
and 1 s of CPU with the GIL held, for one line (``docs/faults.rst``, the row of costly lines).
65536 values cost at most about 13 MiB and 0.2 s to parse (``{"a":0}`` each, the costliest
shape measured), and are far more than any message of this protocol needs: every field but
``args`` is a string or a handful of values, and 65536 arguments is more than most commands are
ever given (strings count once, whatever they hold: stdin, output and long arguments cost
nothing here).
"""

_STRING_LITERAL = re.compile(b'"[^"]*"')
"""A string literal once its escaped backslashes and quotes are gone (see :func:`_structure`)."""

_BRACKETS = bytes.maketrans(b'{}', b'[]')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b'[]{}')

_LEADING_ID = re.compile(b'\\{"jsonrpc":"2\\.0","id":(-?[0-9]{1,18}|"[^"\\\\]{0,200}"|null),"method":"')
"""The start of a request as this protocol's encoders write it: a refused line's reply can name its id."""


def _structure(line: bytes) -> Optional[bytes]:
    """
    The line without its string literals, found at C speed: ``\\\\`` pairs go first, then
    escaped quotes, so that every quote left opens or closes a literal. None when the line holds
    more literals than a line of :data:`MAX_VALUES` values can (each value or key is at most one).
    """
    unescaped = line.replace(b'\\\\', b'').replace(b'\\"', b'')
    if unescaped.count(b'"') > 4 * MAX_VALUES + 2:
        return None
    return _STRING_LITERAL.sub(b'', unescaped)


def _values(structure: bytes) -> int:
    return structure.count(b'{') + structure.count(b'[') + structure.count(b',')


def _nested_deeper_than(structure: bytes, limit: int) -> bool:
    """
    Whether brackets nest deeper than ``limit``: each pass removes the innermost pairs, so a
    pass that still finds one after ``limit`` passes found a deeper level (C-speed passes over
    the brackets alone, instead of a Python loop over every byte).
    """
    brackets = structure.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(limit + 1):
        shorter = brackets.replace(b'[]', b'')
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return True


def _refusal(line: bytes) -> Optional[DecodeError]:
    """
    Refuse, before ``json`` builds anything, a line with more than :data:`MAX_VALUES` values or
    nested deeper than :data:`MAX_NESTING`; None for a line to parse. Short lines, and lines with
    few brackets and commas in all (inside strings too), are let through on ``bytes.count`` alone.
    """
    if len(line) <= MAX_NESTING:
        return None
    openers = line.count(b'{') + line.count(b'[')
    if openers <= MAX_NESTING and openers + line.count(b',') <= MAX_VALUES:
        return None
    structure = _structure(line)
    if structure is None or _values(structure) > MAX_VALUES:
        error: ProtocolError = MessageTooLarge('line holds more than %d JSON values' % MAX_VALUES)
    elif _nested_deeper_than(structure, MAX_NESTING):
        error = InvalidRequest('JSON nested deeper than %d levels' % MAX_NESTING)
    else:
        return None
    match = _LEADING_ID.match(line)
    return DecodeError(error, json.loads(match.group(1).decode('utf-8')) if match else None)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int,
                            object_pairs_hook=_reject_duplicates)
"""The one decoder of every line (see ``_ENCODER``); it keeps no state between calls."""


def parse_line(line: bytes) -> Event:
    """Parse one line (without its newline) into a message, or a :class:`DecodeError`."""
    refusal = _refusal(line)
    if refusal is not None:
        return refusal
    try:
        text = line.decode('utf-8')
    except UnicodeDecodeError as exc:
        return DecodeError(ParseError('line is not valid UTF-8: %s' % exc))
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        return DecodeError(ParseError('line is not valid JSON: %s' % exc))
    return _message_from_value(value)


def _message_from_value(value: Any) -> Event:
    if not isinstance(value, dict):
        return DecodeError(InvalidRequest('a message must be a JSON object, not %s' % type(value).__name__))
    has_id = 'id' in value
    msg_id = value.get('id')
    reply_id = msg_id if valid_id(msg_id) else None
    if value.get('jsonrpc') != '2.0':
        return DecodeError(InvalidRequest('"jsonrpc" must be "2.0"'), reply_id)
    if has_id and not valid_id(msg_id):
        return DecodeError(InvalidRequest('"id" must be a string, an integer or null'))
    if 'method' in value:
        method = value['method']
        params = value.get('params', {})
        if not isinstance(method, str):
            return DecodeError(InvalidRequest('"method" must be a string'), reply_id)
        if not isinstance(params, (dict, list)):
            return DecodeError(InvalidRequest('"params" must be an object or an array'), reply_id)
        if 'result' in value or 'error' in value:
            return DecodeError(InvalidRequest('a request cannot carry "result" or "error"'), reply_id)
        if not has_id:
            return Notification(method, params)
        return Request(msg_id, method, params)
    if not has_id:
        return DecodeError(InvalidRequest('a response must have an "id"'))
    if ('result' in value) == ('error' in value):
        return DecodeError(InvalidRequest('a response carries exactly one of "result" and "error"'))
    if 'error' in value:
        return Response(msg_id, error=error_from_wire(value['error']))
    return Response(msg_id, result=value['result'])


class LineDecoder(object):
    """
    Turn a byte stream into messages, one per line, within a fixed memory bound.

    Feed it chunks of any size with :meth:`feed`; it returns the events completed so far.
    A line longer than ``max_line_length`` is dropped up to its newline and reported once
    as a :class:`DecodeError` with :class:`MessageTooLarge`; blank lines are ignored.

    An ``output`` notification whose params carry ``size`` (raw output, ``docs/protocol.rst``)
    switches the decoder to collecting exactly ``size`` raw bytes: the notification is returned
    once they are all in, with them as its ``attachment``. A ``size`` that is not a positive
    integer is a :class:`DecodeError` (:class:`InvalidRequest`) and nothing is collected; one
    above ``max_line_length`` is a :class:`DecodeError` (:class:`MessageTooLarge`) and that many
    bytes are skipped without being stored, so that the stream stays in step.

    With ``accept_attachments`` False, such a line is an ordinary notification and no raw bytes
    are expected: a client that is resynchronising asked for no raw output yet, so a raw header
    among the stale lines it drops (an earlier client's output, whose bytes may be anything) must
    not make it swallow the reply it waits for. ``accept_input`` (False by default) does the same
    for ``input`` notifications, which only a server receives ("Streamed input").
    """

    def __init__(self, max_line_length: int = DEFAULT_MAX_LINE_LENGTH) -> None:
        if max_line_length < 1:
            raise ValueError('max_line_length must be positive')
        self.max_line_length = max_line_length
        self.accept_attachments = True
        self.accept_input = False
        self.reset()

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete line or attachment the decoder holds (never above the maximum)."""
        held = 0 if self._room is None else len(self._whole) - len(self._room)
        return len(self._buffer) + held

    @property
    def line_buffered(self) -> int:
        """How many bytes of an incomplete line the decoder holds (not counting an attachment's)."""
        return len(self._buffer)

    @property
    def expecting(self) -> int:
        """How many raw bytes of an attachment (or of a skipped one) are still to come before lines resume."""
        return self._remaining

    def reset(self) -> None:
        """Forget any partial line or attachment (the peer went away; the next bytes start afresh)."""
        self._buffer = bytearray()
        self._discarding = False
        self._whole = bytearray()  # the attachment being collected: all of it, filled up to the room
        self._room: Optional[memoryview] = None
        self._remaining = 0
        self._header: Optional[Notification] = None

    def attachment_room(self) -> Optional[memoryview]:
        """
        While an attachment is collected: a writable view of the place its next bytes go, for a
        reader that reads them straight there and then says how many came
        (:meth:`attachment_filled`); None otherwise (lines, or an attachment that is skipped).

        Why: a virtio-serial port hands over 4 KiB a read, and in an emulated guest the Python
        work around each read (a copy, a feed, its bookkeeping) cost several times the read
        itself; reading into the attachment's own buffer leaves one system call a buffer.
        """
        if self._header is None or not self._remaining:
            return None
        if self._room is None:
            self._whole = bytearray(self._remaining)  # the size was checked against the maximum
            self._room = memoryview(self._whole)
        return self._room

    def attachment_filled(self, count: int) -> List[Event]:
        """``count`` bytes were read into :meth:`attachment_room`: the events that completed (the attachment's)."""
        room = self._room
        if room is None or not 0 < count <= len(room):
            raise ValueError('%d bytes cannot have filled the room of the attachment' % count)
        self._remaining -= count
        self._room = room[count:]
        if self._remaining:
            return []
        whole, self._whole, self._room = bytes(self._whole), bytearray(), None
        return [self._finish_attachment(whole)]

    def _finish_attachment(self, attachment: bytes) -> Notification:
        """The header of a complete attachment, with its bytes (unescaped for ``input``)."""
        header = self._header
        assert header is not None
        self._header = None
        header.attachment = unescape_input(attachment) if header.method == RAW_INPUT_METHOD else attachment
        return header

    def _start_attachment(self, event: Notification) -> Optional[DecodeError]:
        """After an ``output`` or ``input`` line with ``size``: start collecting (or skipping); an error event if the
        size is bad."""
        size = event.params['size']
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            return DecodeError(InvalidRequest('"size" of raw %s must be a positive integer, not %s'
                                              % (event.method, json.dumps(size)[:40])))
        self._remaining = size
        if size > self.max_line_length:
            self._header = None
            return DecodeError(MessageTooLarge('raw %s of %d bytes (more than %d) skipped'
                                               % (event.method, size, self.max_line_length)))
        del event.params['size']
        self._header = event
        return None

    def _carries_attachment(self, event: Event) -> bool:
        """Whether ``event`` is a header whose raw bytes follow (of a method this decoder expects them for)."""
        if not isinstance(event, Notification) or not isinstance(event.params, dict) or 'size' not in event.params:
            return False
        return ((event.method == RAW_OUTPUT_METHOD and self.accept_attachments)
                or (event.method == RAW_INPUT_METHOD and self.accept_input))

    def feed(self, data: bytes) -> List[Event]:
        """Take a chunk of bytes; return every event that the chunk completed, in order."""
        events: List[Event] = []
        position, end = 0, len(data)
        while position < end:
            if self._remaining:
                # Raw bytes of an attachment: copied (or skipped), never searched for newlines.
                take = min(self._remaining, end - position)
                if self._header is None:  # skipped
                    self._remaining -= take
                elif self._room is None and take == self._remaining:  # all of it here: no buffer needed
                    self._remaining = 0
                    events.append(self._finish_attachment(bytes(data[position:position + take])))
                else:  # collected in the room that a reader may also read into
                    room = self.attachment_room()
                    assert room is not None
                    room[:take] = data[position:position + take]
                    events.extend(self.attachment_filled(take))
                position += take
                continue
            newline = data.find(b'\n', position)
            if self._discarding:
                if newline < 0:
                    break
                position, self._discarding = newline + 1, False
                continue
            stop = end if newline < 0 else newline
            if len(self._buffer) + stop - position > self.max_line_length:
                events.append(DecodeError(MessageTooLarge(
                    'line longer than %d bytes discarded' % self.max_line_length)))
                self._buffer = bytearray()
                if newline < 0:
                    self._discarding = True
                    break
                position = newline + 1
                continue
            self._buffer += data[position:stop]
            if newline < 0:
                break
            position = newline + 1
            line = bytes(self._buffer).strip()
            self._buffer = bytearray()
            if line:
                event = parse_line(line)
                if self._carries_attachment(event):
                    assert isinstance(event, Notification)
                    error = self._start_attachment(event)
                    if error is not None:
                        events.append(error)
                    continue
                events.append(event)
        return events
