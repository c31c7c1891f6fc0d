"""
No message of any shape kills an endpoint's reader, and a reader that dies anyway closes its
connection (``docs/faults.rst``, "A message of an unexpected shape"); a null-id error fails the
one call waiting ("An error reply with ``id`` ``null``").
"""

import json
import socket
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from negotiator_common.client import AgentClient
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ConnectionClosed, InternalError, MessageTooLarge, NegotiatorError
from negotiator_common.protocol import LineDecoder, Notification, Request, Response, decode_bytes, encode_message
from negotiator_common.transport import Transport

from support import OUTPUT_WITH_AN_ARRAY_ID, result_or_error

LIMIT = 4096


class RawPeer(object):
    """The far end of a socket pair, driven by the test: bytes out, messages in."""

    def __init__(self, sock: socket.socket, accept_attachments: bool = False) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.decoder = LineDecoder()
        self.decoder.accept_attachments = accept_attachments
        self.events = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next_event(self, wanted):
        """The next event from the endpoint that ``wanted(event)`` accepts (raises socket.timeout if none)."""
        while True:
            while self.events:
                event = self.events.pop(0)
                if wanted(event):
                    return event
            data = self.sock.recv(65536)
            assert data, 'the endpoint closed the connection'
            self.events.extend(self.decoder.feed(data))

    def next_request(self) -> Request:
        return self.next_event(lambda e: isinstance(e, Request))

    def close(self) -> None:
        self.sock.close()


def serving_pair(dispatcher=None):
    """A serving endpoint (``ping`` answers ``pong``) and the raw peer that talks to it."""
    if dispatcher is None:
        dispatcher = Dispatcher()
        dispatcher.register('ping', lambda params, context: 'pong', inline=True)
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(Transport.from_socket(ours), dispatcher, name='served', max_line_length=LIMIT).start()
    return endpoint, RawPeer(theirs)


def calling_pair():
    """A calling endpoint (a pure client) and the raw peer that plays the agent."""
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(Transport.from_socket(ours), name='caller', max_line_length=LIMIT).start()
    return endpoint, RawPeer(theirs, accept_attachments=True)


class CallInThread(object):
    """``endpoint.call(...)`` on a thread of its own; ``outcome()`` is its result or the error it raised."""

    def __init__(self, endpoint: Endpoint, method: str, **kwargs) -> None:
        self._outcome = None
        self._thread = threading.Thread(target=self._run, args=(endpoint, method, kwargs))
        self._thread.daemon = True
        self._thread.start()

    def _run(self, endpoint, method, kwargs):
        self._outcome = result_or_error(endpoint.call, method, **kwargs)

    def outcome(self, timeout: float = 10):
        self._thread.join(timeout)
        assert not self._thread.is_alive(), 'the call did not end'
        return self._outcome


def served_ping_is_answered(endpoint: Endpoint, peer: RawPeer, request_id='ping-after-the-lines') -> bool:
    peer.send(b'\n' + encode_message(Request(request_id, 'ping')))
    reply = peer.next_event(lambda e: isinstance(e, Response) and e.id == request_id)
    return reply.result == 'pong' and not endpoint.closed


def called_ping_is_answered(endpoint: Endpoint, peer: RawPeer) -> bool:
    # First a request of the peer's, whose reply says that the endpoint has read every line
    # before it: a stale reply among them can then never be taken for the ping's.
    peer.send(b'\n' + encode_message(Request('sync-after-the-lines', 'anything')))
    peer.next_event(lambda e: isinstance(e, Response) and e.id == 'sync-after-the-lines')
    call = CallInThread(endpoint, 'ping', timeout=10)
    request = peer.next_event(lambda e: isinstance(e, Request) and e.method == 'ping')
    peer.send(b'\n' + encode_message(Response(request.id, result='pong')))
    return call.outcome() == 'pong' and not endpoint.closed


def test_an_output_notification_with_an_array_id_kills_no_reader():
    endpoint, peer = serving_pair()
    try:
        peer.send(OUTPUT_WITH_AN_ARRAY_ID)
        assert served_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()
    endpoint, peer = calling_pair()
    try:
        pending = CallInThread(endpoint, 'execute', timeout=10, on_notification=lambda params: None)
        request = peer.next_request()
        peer.send(OUTPUT_WITH_AN_ARRAY_ID + encode_message(Response(request.id, result='done')))
        assert pending.outcome() == 'done'
        assert called_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
# The call waiting during the test has id 1 (an endpoint's first call): small integers hit it.
ids = st.integers(min_value=0, max_value=3) | json_values
params = st.builds(
    lambda named, others: dict(others, **named),
    st.fixed_dictionaries({'id': ids}),
    st.dictionaries(st.sampled_from(['stream', 'data', 'data_b64', 'size', 'other']),
                    st.integers(min_value=0, max_value=3) | st.sampled_from(['stdout', 'stderr', 'eA==']) | json_values,
                    max_size=3)) | json_values
errors = st.fixed_dictionaries({'code': st.sampled_from([-32001, -32602, -32051, 7]) | json_values,
                                'message': json_values, 'data': json_values}) | json_values
FIELDS = {
    'jsonrpc': st.just('2.0') | json_values,
    'id': ids,
    'method': st.sampled_from(['output', 'session', 'ping', 'execute', 'unknown']) | json_values,
    'params': params,
    'result': json_values,
    'error': errors,
}


def shaped(*keys):
    """Messages with these fields (``jsonrpc`` mostly right), every field of any JSON type."""
    return st.fixed_dictionaries(dict({key: FIELDS[key] for key in keys}, jsonrpc=st.just('2.0')))


# Requests, notifications, results and errors with values of every type in every position, and
# objects with any subset of the fields.
messages = (shaped('id', 'method', 'params') | shaped('method', 'params') | shaped('id', 'result')
            | shaped('id', 'error') | st.lists(st.sampled_from(sorted(FIELDS)), unique=True).flatmap(
                lambda keys: st.fixed_dictionaries({key: FIELDS[key] for key in keys})))
lines = st.lists(messages.map(lambda message: json.dumps(message).encode('utf-8') + b'\n'), min_size=1, max_size=8)


def in_step(data: bytes, accept_attachments: bool) -> bytes:
    """The bytes that end any raw attachment that ``data`` began (an ``output`` header with a ``size``)."""
    decoder = LineDecoder(LIMIT)
    decoder.accept_attachments = accept_attachments
    decoder.feed(data)
    return b'\0' * decoder.expecting + b'\n'


def picky_callback(params):
    """A notification callback that raises on shapes it does not expect, as a caller's own code may."""
    {'stdout': 1, 'stderr': 2}[params.get('stream')]
    decode_bytes(params, 'data')


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_a_serving_reader_survives_messages_of_every_shape(sent):
    endpoint, peer = serving_pair()
    try:
        data = b''.join(sent)
        peer.send(data + in_step(data, accept_attachments=False))
        assert served_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines)
def test_a_calling_reader_survives_messages_of_every_shape(sent):
    endpoint, peer = calling_pair()
    try:
        pending = CallInThread(endpoint, 'execute', timeout=10, on_notification=picky_callback)
        request = peer.next_request()
        data = b''.join(sent)
        peer.send(data + in_step(data, accept_attachments=True) + encode_message(Response(request.id, result='done')))
        # Whatever came first ends the call (any result or error the peer made up, a new session),
        # and nothing but a NegotiatorError is ever raised to the caller.
        outcome = pending.outcome()
        assert isinstance(outcome, NegotiatorError) or not isinstance(outcome, Exception)
        assert called_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()


def test_a_notification_callback_that_raises_fails_only_its_call():
    endpoint, peer = calling_pair()
    try:
        pending = CallInThread(endpoint, 'execute', timeout=10, on_notification=picky_callback)
        request = peer.next_request()
        peer.send(encode_message(Notification('output', {'id': request.id, 'stream': ['stdout']})))
        outcome = pending.outcome()
        assert isinstance(outcome, InternalError) and 'TypeError' in str(outcome)
        assert isinstance(outcome.__cause__, TypeError)
        assert called_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()


def test_the_client_skips_output_of_a_stream_of_any_other_type():
    endpoint, peer = calling_pair()
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(done=AgentClient(endpoint).execute('cmd', timeout=10)))
        thread.start()
        request = peer.next_event(lambda e: isinstance(e, Request) and e.params.get('command') == 'cmd')
        peer.send(encode_message(Notification('output', {'id': request.id, 'stream': ['stdout'], 'data': 'x'}))
                  + encode_message(Notification('output', {'id': request.id, 'stream': 'stdout', 'data': 'ok'}))
                  + encode_message(Response(request.id, result={'exit_status': 0})))
        thread.join(10)
        assert result['done'].stdout == b'ok'
    finally:
        endpoint.close()
        peer.close()


class ExplodingDispatcher(Dispatcher):
    """A dispatcher with a bug that nobody foresaw: it raises on the reading thread."""

    def is_inline(self, name: str) -> bool:
        raise RuntimeError('a bug in the dispatcher')


def test_a_reader_that_dies_anyway_closes_its_connection_with_the_reason():
    ours, theirs = socket.socketpair()
    endpoint = Endpoint(Transport.from_socket(ours), ExplodingDispatcher(), name='doomed')
    peer = RawPeer(theirs)
    try:
        pending = CallInThread(endpoint, 'ping', timeout=10)
        peer.next_request()
        peer.send(encode_message(Request(5, 'ping')))
        endpoint.run()  # returns: the failure is not raised on the reading thread
        assert endpoint.closed
        assert 'reader failed: RuntimeError' in endpoint.close_reason
        assert isinstance(pending.outcome(), ConnectionClosed)
        assert peer.sock.recv(100) == b''  # the peer sees the channel end
    finally:
        endpoint.close()
        peer.close()


def answer_every_request_with_a_null_id_error(peer: RawPeer, count: int) -> None:
    for _ in range(count):
        peer.next_request()
        peer.send(encode_message(Response(None, error=MessageTooLarge('line longer than 4194304 bytes discarded'))))


def test_a_null_id_error_fails_the_one_waiting_call_at_once():
    endpoint, peer = calling_pair()
    try:
        call = CallInThread(endpoint, 'execute', timeout=None)  # without the fix: waits for ever
        answer_every_request_with_a_null_id_error(peer, 1)
        outcome = call.outcome()
        assert isinstance(outcome, MessageTooLarge) and '4194304' in str(outcome)
        assert called_ping_is_answered(endpoint, peer)
    finally:
        endpoint.close()
        peer.close()


def test_a_null_id_error_is_dropped_while_several_calls_wait():
    endpoint, peer = calling_pair()
    try:
        first = CallInThread(endpoint, 'first', timeout=10)
        second = CallInThread(endpoint, 'second', timeout=10)
        requests = [peer.next_request(), peer.next_request()]
        # Nobody can tell whose request the peer could not read: neither call takes the error.
        peer.send(encode_message(Response(None, error=MessageTooLarge('too long'))))
        peer.send(b''.join(encode_message(Response(r.id, result=r.method)) for r in requests))
        assert (first.outcome(), second.outcome()) == ('first', 'second')
    finally:
        endpoint.close()
        peer.close()
