"""The sans-I/O protocol core: framing, parsing, and the bounds that hold whatever it is fed."""

import json

import pytest

from negotiator_common.errors import (
    CommandFailed, InvalidRequest, MessageTooLarge, MethodNotFound, NegotiatorError, ParseError,
    error_from_wire,
)
from negotiator_common.protocol import (
    DecodeError, LineDecoder, Notification, Request, Response, decode_bytes, encode_bytes,
    encode_message, parse_line,
)

MESSAGES = [
    Request(1, 'ping'),
    Request('abc', 'execute', {'command': 'hostname', 'args': ['a\nb', 'ü', '']}),
    Response(1, result={'time': 1.5}),
    Response('abc', error=MethodNotFound('method "x" not found')),
    Notification('output', {'id': 7, 'stream': 'stdout', 'data': 'line\n'}),
]


def stream_of(messages):
    return b''.join(encode_message(m) for m in messages)


def summary(event):
    """A comparable view of an event."""
    if isinstance(event, DecodeError):
        return ('error', type(event.error).__name__, event.id)
    wire = event.to_wire()
    return json.dumps(wire, sort_keys=True)


def test_encoded_message_is_one_line():
    for message in MESSAGES:
        line = encode_message(message)
        assert line.endswith(b'\n')
        assert line.count(b'\n') == 1


def test_decoder_fed_whole():
    events = LineDecoder().feed(stream_of(MESSAGES))
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]


def test_decoder_fed_one_byte_at_a_time():
    decoder = LineDecoder()
    events = []
    for byte in stream_of(MESSAGES):
        events.extend(decoder.feed(bytes([byte])))
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]


def test_error_response_round_trips_as_the_same_class():
    error = CommandFailed('x exited with status 3', {'exit_status': 3, 'stdout': 'out', 'stderr_b64': 'AP8='})
    event = LineDecoder().feed(encode_message(Response(5, error=error)))[0]
    assert isinstance(event, Response)
    assert type(event.error) is CommandFailed
    assert event.error.exit_status == 3
    assert event.error.stdout == b'out'
    assert event.error.stderr == b'\x00\xff'


def test_an_error_with_malformed_output_still_arrives_with_empty_output():
    # The peer's data is read with protocol.decode_bytes; what it cannot read is no output, not a crash.
    error = error_from_wire({'code': CommandFailed.code, 'message': 'x failed',
                             'data': {'exit_status': 1, 'stdout': 42, 'stderr_b64': '***'}})
    assert type(error) is CommandFailed and error.exit_status == 1
    assert error.stdout == b'' and error.stderr == b''
    assert CommandFailed('no output at all').stdout == b''


def test_unknown_error_code_keeps_its_code():
    exc = error_from_wire({'code': 12345, 'message': 'from the future'})
    assert isinstance(exc, NegotiatorError)
    assert exc.code == 12345 and exc.message == 'from the future'


@pytest.mark.parametrize('line, error_class', [
    (b'{"jsonrpc": "2.0", "id": 1, "method": ', ParseError),           # truncated
    (b'\xff\xfe{"jsonrpc": "2.0"}', ParseError),                     # not UTF-8
    (b'garbage', ParseError),
    (b'[1, 2, 3]', InvalidRequest),                                  # not an object
    (b'"just a string"', InvalidRequest),
    (b'{"id": 1, "method": "ping"}', InvalidRequest),                # no jsonrpc
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', InvalidRequest),   # method not a string
    (b'{"jsonrpc": "2.0", "id": 1, "method": "x", "params": 3}', InvalidRequest),
    (b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', InvalidRequest),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', InvalidRequest),
    (b'{"jsonrpc": "2.0", "id": 1}', InvalidRequest),                # neither result nor error
    (b'{"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}}', InvalidRequest),
    (b'{"jsonrpc": "2.0", "result": 1}', InvalidRequest),            # response without id
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "id": 2}', ParseError),  # duplicate key
    (b'{"jsonrpc": "2.0", "id": 1, "result": NaN}', ParseError),
    (b'{"jsonrpc": "2.0", "id": 1, "result": Infinity}', ParseError),
    (b'[' * 1000 + b']' * 1000, InvalidRequest),                     # deep nesting
    (b'[' * 100000 + b']' * 100000, MessageTooLarge),                # more values than MAX_VALUES
])
def test_bad_lines_become_error_events(line, error_class):
    decoder = LineDecoder()
    events = decoder.feed(line + b'\n' + encode_message(Request(9, 'ping')))
    assert len(events) == 2
    assert isinstance(events[0], DecodeError)
    assert type(events[0].error) is error_class
    # The decoder carries on: the next valid request is intact.
    assert isinstance(events[1], Request) and events[1].id == 9


def test_bad_request_fields_keep_the_id_for_the_reply():
    event = parse_line(b'{"jsonrpc": "2.0", "id": 42, "method": 5}')
    assert isinstance(event, DecodeError) and event.id == 42


def test_ids_of_every_valid_type():
    for request_id in (0, -1, 2 ** 70, 'x', '', None):
        event = parse_line(json.dumps({'jsonrpc': '2.0', 'id': request_id, 'method': 'ping'}).encode())
        assert isinstance(event, Request) and event.id == request_id


def test_huge_number_is_parsed_or_refused_not_fatal():
    event = parse_line(b'{"jsonrpc": "2.0", "id": 1, "result": ' + b'9' * 5000 + b'}')
    assert isinstance(event, (Response, DecodeError))


def test_overlong_line_is_discarded_and_reported_once():
    decoder = LineDecoder(max_line_length=1000)
    events = decoder.feed(b'x' * 5000)
    assert [type(e.error) for e in events] == [MessageTooLarge]
    assert decoder.buffered == 0
    events = decoder.feed(b'y' * 5000 + b'\n' + encode_message(Request(3, 'ping')))
    assert len(events) == 1 and isinstance(events[0], Request) and events[0].id == 3


def test_overlong_line_fed_byte_by_byte_stays_bounded():
    decoder = LineDecoder(max_line_length=100)
    errors = []
    for _ in range(1000):
        errors.extend(decoder.feed(b'z'))
        assert decoder.buffered <= 100
    assert len(errors) == 1
    assert isinstance(decoder.feed(b'\n' + encode_message(Request(1, 'ping')))[0], Request)


def test_line_of_exactly_the_maximum_is_accepted():
    line = encode_message(Request(1, 'ping', {'pad': ''}))
    limit = len(line) - 1
    decoder = LineDecoder(max_line_length=limit)
    assert isinstance(decoder.feed(line)[0], Request)
    assert isinstance(LineDecoder(max_line_length=limit - 1).feed(line)[0], DecodeError)


def test_blank_lines_and_crlf_are_tolerated():
    events = LineDecoder().feed(b'\n\n  \r\n' + encode_message(Request(1, 'ping')).replace(b'\n', b'\r\n'))
    assert len(events) == 1 and isinstance(events[0], Request)


def test_reset_forgets_a_partial_line():
    decoder = LineDecoder()
    decoder.feed(b'{"jsonrpc": "2.0", "id": 1, "met')
    decoder.reset()
    events = decoder.feed(encode_message(Request(2, 'ping')))
    assert len(events) == 1 and events[0].id == 2


def test_bytes_travel_as_text_or_base64():
    assert encode_bytes(b'hello\n', 'stdout') == {'stdout': 'hello\n'}
    binary = bytes(range(256))
    fields = encode_bytes(binary, 'stdout')
    assert list(fields) == ['stdout_b64']
    assert decode_bytes(fields, 'stdout') == binary
    assert decode_bytes({}, 'stdout') == b''
    # Valid UTF-8 that is mostly control characters would grow sixfold as JSON escapes.
    assert list(encode_bytes(b'\0' * 1000, 'stdout')) == ['stdout_b64']
    assert list(encode_bytes(b'\x1b[1mbold\x1b[0m and a line of ordinary text\n', 'stdout')) == ['stdout']
    with pytest.raises(ValueError):
        decode_bytes({'stdout': 5}, 'stdout')
    with pytest.raises(ValueError):
        decode_bytes({'stdout_b64': '***'}, 'stdout')
