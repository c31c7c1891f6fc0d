"""Property tests: whatever bytes arrive, the decoder and the server stay bounded and keep answering."""

import json
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from negotiator_common.dispatcher import CallContext, Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import NegotiatorError
from negotiator_common.protocol import (
    DecodeError, LineDecoder, Notification, Request, Response, encode_message,
)
from negotiator_common.transport import Transport

LIMIT = 512

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

# Lines that look almost like messages are the interesting ones: mix raw bytes with JSON objects
# built from the message keys.
message_like = st.dictionaries(
    st.sampled_from(['jsonrpc', 'id', 'method', 'params', 'result', 'error']) | st.text(max_size=5),
    json_values, max_size=6).map(lambda d: json.dumps(d).encode('utf-8'))
# JSON edge cases (docs/faults.rst, "Garbage on the channel" and "Bugs these tests found"), as
# fragments that land inside or between messages.
edge_cases = st.sampled_from([b'NaN', b'-Infinity', b'1e999', b'9' * 5000, b'[' * 200, b'{"id": 1, "id": 2}',
                              b'"\\ud800"', b'\xff', b'\x00', b'{"jsonrpc": "2.0", "id": 1, "result": 1}'])
# Raw output headers (docs/protocol.rst, "Raw output"): good sizes, sizes above the limit (skipped
# unstored) and sizes of every wrong type; the bytes that follow are whatever comes next.
raw_sizes = st.integers(min_value=-3, max_value=3 * LIMIT) | st.sampled_from([True, False, 1.5, '12', None, [4]])
raw_headers = st.builds(
    lambda size, stream, method: json.dumps({'jsonrpc': '2.0', 'method': method,
                                             'params': {'id': 1, 'stream': stream, 'size': size}}).encode() + b'\n',
    raw_sizes, st.sampled_from(['stdout', 'stderr', 7]), st.sampled_from(['output', 'output', 'session']))
chunks = st.lists(st.binary(max_size=700) | message_like | edge_cases | raw_headers | st.just(b'\n'), max_size=30)


def in_step(pieces):
    """The bytes to add after ``pieces`` so that a decoder is back to reading lines (the rest of an attachment)."""
    decoder = LineDecoder(max_line_length=LIMIT)
    decoder.feed(b''.join(pieces))
    return b'\0' * decoder.expecting


@settings(max_examples=300, deadline=None)
@given(chunks)
def test_any_bytes_yield_only_events_within_the_bound(pieces):
    decoder = LineDecoder(max_line_length=LIMIT)
    for piece in pieces:
        for event in decoder.feed(piece):
            assert isinstance(event, (Request, Notification, Response, DecodeError))
            if isinstance(event, DecodeError):
                assert isinstance(event.error, NegotiatorError)
            if isinstance(event, Notification) and event.attachment is not None:
                assert event.method == 'output' and 0 < len(event.attachment) <= LIMIT
        assert decoder.buffered <= LIMIT
    # Whatever came before, the rest of an attachment begun, a newline and then a valid request
    # decode to that request.
    assert decoder.expecting <= 3 * LIMIT
    events = decoder.feed(b'\0' * decoder.expecting + b'\n' + encode_message(Request(77, 'ping')))
    assert isinstance(events[-1], Request) and events[-1].id == 77


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.text(max_size=15))
def test_dispatcher_answers_any_params_with_a_response(params, method):
    dispatcher = Dispatcher()
    dispatcher.register('ping', lambda p, ctx: {'time': 0})
    response = dispatcher.dispatch(Request(1, method, params), CallContext(1))
    assert isinstance(response, Response) and response.id == 1
    assert (response.error is None) == (method == 'ping')


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks)
def test_server_keeps_answering_after_any_garbage(pieces):
    dispatcher = Dispatcher()
    dispatcher.register('ping', lambda p, ctx: 'pong', inline=True)
    server_sock, raw = socket.socketpair()
    server = Endpoint(Transport.from_socket(server_sock), dispatcher, name='fuzz', max_line_length=LIMIT).start()
    raw.settimeout(10)
    try:
        raw.sendall(b''.join(pieces) + in_step(pieces) + b'\n' + encode_message(Request('last', 'ping')))
        decoder = LineDecoder()
        while True:
            events = decoder.feed(raw.recv(65536))
            if any(isinstance(e, Response) and e.id == 'last' and e.result == 'pong' for e in events):
                break
    finally:
        server.close()
        raw.close()
