"""
Streamed input and flow control on one connection (``docs/protocol.rst``, "Streams and flow
control"): a real agent (AgentService) and a client over a socket pair, no VM.

Each rule has its test: input of any size from bytes, a file or an iterable arrives intact with
no more than a window held on either side; a command that does not read its input, and a caller
whose file does not take its output, stop their own stream only (pings and other commands on the
same connection are answered meanwhile); more than the room granted is ``-32600``, either way,
and the connection lives on; an agent older than streamed input gets its input in the request,
within its bound, or the call is refused before anything is sent.
"""

import hashlib
import io
import os
import socket
import threading

import pytest

from negotiator_common import callstreams, flow
from negotiator_common.callbounds import OUTPUT_WINDOW
from negotiator_common.client import INLINE_INPUT, AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import InvalidRequest, UnsendableRequest
from negotiator_common.protocol import Notification, Request
from negotiator_common.service import AgentService, Limits
from negotiator_common.streams import INPUT_WINDOW
from negotiator_common.transport import Transport

from support import GUEST_COMMANDS, StalledFile, make_commands_dir, result_or_error
from waiting import wait_until

MIB = 1024 * 1024


class Connection(object):
    """A real agent and a client endpoint over a socket pair; ``agent`` is the client's AgentClient."""

    def __init__(self, tmp_path, service_wrapper=None, hello=None):
        self.service = AgentService('negotiator-guest', CommandRegistry([make_commands_dir(str(tmp_path),
                                                                                           GUEST_COMMANDS)]))
        dispatcher = self.service.dispatcher() if service_wrapper is None else service_wrapper(self.service)
        theirs, ours = socket.socketpair()
        self.server = Endpoint(Transport.from_socket(theirs), dispatcher, name='agent').start()
        self.endpoint = Endpoint(Transport.from_socket(ours), name='client').start()
        announced = self.endpoint.handshake(30)
        self.agent = AgentClient(self.endpoint, announced if hello is None else hello)

    def close(self):
        self.endpoint.close()
        self.server.close()


@pytest.fixture
def connection(tmp_path):
    connection = Connection(tmp_path)
    yield connection
    connection.close()


@pytest.fixture
def most_held(monkeypatch):
    """
    The most bytes held at once during the test by the agent's streamed inputs (``'input'``)
    and by the client's windows of output (``'output'``).
    """
    peaks = {}
    feed, receive = flow.InboundStream.feed, callstreams.OutputReceiver.__call__

    def record(key, held):
        peaks[key] = max(peaks.get(key, 0), held)

    def recording_feed(self, chunk):
        feed(self, chunk)
        record('input', self.held)

    def recording_receive(self, params):
        receive(self, params)
        record('output', self.window.held)

    monkeypatch.setattr(flow.InboundStream, 'feed', recording_feed)
    monkeypatch.setattr(callstreams.OutputReceiver, '__call__', recording_receive)
    return peaks


def digest_line(data):
    return ('%s %d\n' % (hashlib.sha256(data).hexdigest(), len(data))).encode()


class CountingSource(object):
    """An iterable of ``count`` chunks of ``size`` random bytes, counting how many were taken."""

    def __init__(self, count, size=MIB):
        self.chunks = [os.urandom(size) for _ in range(count)]
        self.taken = 0

    def __iter__(self):
        for chunk in self.chunks:
            self.taken += 1
            yield chunk

    @property
    def data(self):
        return b''.join(self.chunks)


def on_thread(function, *args, **kwargs):
    """Run ``function`` on a thread; return the thread and a list that gets its result or exception."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(result_or_error(function, *args, **kwargs)))
    thread.daemon = True
    thread.start()
    return thread, outcome


def test_the_agent_announces_streamed_input_and_credit(connection):
    hello = connection.endpoint.handshake(30)
    assert {'escaped-input', 'credit'} <= set(hello['capabilities'])


@pytest.mark.parametrize('shape', ['bytes', 'file', 'chunks of odd sizes'])
def test_input_of_any_size_arrives_intact_within_the_window(connection, most_held, shape):
    data = os.urandom(24 * MIB + 12345)
    source = {'bytes': data, 'file': io.BytesIO(data),
              'chunks of odd sizes': (data[i:i + 777777] for i in range(0, len(data), 777777))}[shape]
    result = connection.agent.execute('sha-stdin', input=source, timeout=60)
    assert result.exit_status == 0 and result.stdout == digest_line(data)
    assert 0 < most_held['input'] <= INPUT_WINDOW


def test_small_input_travels_in_the_request(connection, most_held):
    data = b'\x00small\xff' * (INLINE_INPUT // 8)
    assert connection.agent.execute('sha-stdin', input=data).stdout == digest_line(data)
    assert 'input' not in most_held  # no stream was opened


def test_a_command_that_does_not_read_its_input_stalls_only_its_own_stream(connection, tmp_path, most_held):
    gate = str(tmp_path / 'gate')
    source = CountingSource(24)
    call, outcome = on_thread(connection.agent.execute, 'sha-stdin', gate, input=source, timeout=60)
    # The command's pipe (1 MiB) and then the agent's window fill, and the client stops taking from its source.
    assert wait_until(lambda: most_held.get('input', 0) > INPUT_WINDOW // 2, timeout=20)
    for _ in range(20):
        connection.agent.ping(timeout=5)
    assert connection.agent.execute('echo-args', 'meanwhile', timeout=10).stdout == b'meanwhile\n'
    assert not outcome and source.taken <= (MIB + INPUT_WINDOW) // MIB + 2  # the pipe, the window, a chunk
    open(gate, 'w').close()
    call.join(60)
    assert outcome[0].exit_status == 0 and outcome[0].stdout == digest_line(source.data)
    assert most_held['input'] <= INPUT_WINDOW


def test_a_caller_that_does_not_take_its_output_stalls_only_its_own_stream(connection, most_held):
    stalled = StalledFile()
    call, outcome = on_thread(connection.agent.execute, 'bytes', str(48 * MIB), stdout=stalled, timeout=60)
    assert stalled.waiting.wait(20)
    assert wait_until(lambda: most_held.get('output', 0) >= OUTPUT_WINDOW // 2, timeout=20)
    for _ in range(20):
        connection.agent.ping(timeout=5)
    assert connection.agent.execute('echo-args', 'meanwhile', timeout=10).stdout == b'meanwhile\n'
    assert not outcome and most_held['output'] <= OUTPUT_WINDOW
    stalled.go.set()
    call.join(60)
    assert outcome[0].exit_status == 0 and stalled.size == 48 * MIB
    assert most_held['output'] <= OUTPUT_WINDOW


def test_a_command_that_closes_its_input_early_ends_the_stream(connection):
    source = CountingSource(32)
    result = connection.agent.execute('close-stdin', input=source, timeout=30)
    assert result.exit_status == 0 and result.stdout == b'closed\n'
    assert source.taken < 32


def test_a_source_that_fails_cancels_the_command_and_its_error_is_raised(connection, tmp_path):
    gate = str(tmp_path / 'gate')

    def failing():
        yield os.urandom(MIB)
        raise IOError('the disk under the input failed')

    with pytest.raises(IOError, match='disk under the input'):
        connection.agent.execute('sha-stdin', gate, input=failing(), timeout=30)
    assert connection.agent.ping(timeout=5) >= 0


def streamed_call(endpoint, params):
    """Start an ``execute`` with streamed input on a thread; return it, its outcome, and the credits that came."""
    credits = []
    got_credit = threading.Event()

    def on_credit(params):
        credits.append(params)
        got_credit.set()

    call, outcome = on_thread(endpoint.call, 'execute', dict(params, stdin_stream=True), timeout=30,
                              on_credit=on_credit)
    assert got_credit.wait(10)
    return call, outcome, credits


def test_input_beyond_the_room_granted_is_invalid_request_and_the_connection_lives(connection, tmp_path):
    endpoint = connection.endpoint
    call, outcome, credits = streamed_call(endpoint, {'command': 'sha-stdin', 'args': [str(tmp_path / 'gate')]})
    room = credits[0]['bytes']
    assert room == INPUT_WINDOW
    endpoint.notify(Notification('input', {'id': credits[0]['id']}, attachment=b'x' * (room + 1)))
    call.join(30)
    assert isinstance(outcome[0], InvalidRequest) and outcome[0].code == -32600
    assert 'flow control' in outcome[0].message
    assert connection.agent.ping(timeout=5) >= 0
    assert connection.agent.execute('echo-args', 'after').stdout == b'after\n'


def test_input_and_credit_for_no_streaming_call_are_dropped(connection):
    endpoint = connection.endpoint
    endpoint.notify(Notification('input', {'id': 424242}, attachment=b'stray bytes\n{"jsonrpc"'))
    endpoint.notify(Notification('input', {'id': 424242, 'eof': True}))
    endpoint.notify(Notification('credit', {'id': 424242, 'bytes': 5}))
    assert connection.agent.execute('echo-args', 'fine').stdout == b'fine\n'


def test_a_bad_window_or_stdin_with_stdin_stream_is_invalid_params(connection):
    endpoint = connection.endpoint
    for params in ({'command': 'echo-args', 'stream': True, 'window': 10},
                   {'command': 'echo-args', 'stream': True, 'window': True},
                   {'command': 'echo-args', 'stdin': 'x', 'stdin_stream': True}):
        outcome = result_or_error(endpoint.call, 'execute', params, timeout=10)
        assert getattr(outcome, 'code', None) == -32602, params


def hostile_agent(service):
    """An agent that sends a byte of output more than the window its caller granted."""
    dispatcher = Dispatcher()
    dispatcher.register('hello', service.hello, inline=True)
    dispatcher.register('ping', service.ping, inline=True)

    def execute(params, context):
        context.notify(Notification('output', {'id': context.request_id, 'stream': 'stdout'},
                                    attachment=b'y' * (params['window'] + 1)))
        return {'exit_status': 0, 'signal': None, 'duration': 0.0, 'stdout_truncated': False,
                'stderr_truncated': False, 'output_abandoned': False, 'streamed': True}

    dispatcher.register('execute', execute)
    return dispatcher


def test_output_beyond_the_window_fails_the_call_with_invalid_request(tmp_path):
    connection = Connection(tmp_path, service_wrapper=hostile_agent)
    try:
        with pytest.raises(InvalidRequest) as caught:
            connection.agent.execute('anything', timeout=10)
        assert caught.value.code == -32600
        assert connection.agent.ping(timeout=5) >= 0
    finally:
        connection.close()


OLD_HELLO = {'protocol': 1, 'agent': 'negotiator-guest', 'version': '0.1.0',
             'capabilities': ['ping', 'list_commands', 'execute', 'stream', 'raw-output', 'cancel'],
             'limits': {'max_stdin': 3 * MIB}}
"""What an agent older than streamed input and credit says in ``hello``."""


def recording_agent(requests):
    def wrap(service):
        dispatcher = Dispatcher()
        standard = service.dispatcher()
        for method in ('hello', 'ping', 'execute'):
            dispatcher.register(method, relay(standard, method, requests), inline=method != 'execute')
        return dispatcher
    return wrap


def relay(standard, method, requests):
    def answer(params, context):
        requests.append((method, dict(params)))
        response = standard.dispatch(Request(context.request_id, method, params), context)
        if response.error is not None:
            raise response.error
        return response.result
    return answer


class CountingFile(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.bytes_read = 0

    def read1(self, size=-1):
        data = super().read1(size)
        self.bytes_read += len(data)
        return data


def test_an_older_agent_gets_its_input_in_the_request_within_its_bound(tmp_path):
    requests = []
    connection = Connection(tmp_path, service_wrapper=recording_agent(requests), hello=OLD_HELLO)
    try:
        data = os.urandom(2 * MIB)
        assert connection.agent.execute('sha-stdin', input=io.BytesIO(data)).stdout == digest_line(data)
        params = [p for method, p in requests if method == 'execute'][-1]
        assert 'stdin_b64' in params and 'stdin_stream' not in params and 'window' not in params
        source = CountingFile(os.urandom(5 * MIB))
        with pytest.raises(UnsendableRequest, match='more than 3145728 bytes'):
            connection.agent.execute('sha-stdin', input=source)
        assert source.bytes_read == 3 * MIB + 1
        assert [method for method, _ in requests].count('execute') == 1  # nothing was sent
    finally:
        connection.close()


def test_the_agents_memory_for_input_is_its_window_whatever_the_caller_sends(tmp_path, most_held):
    connection = Connection(tmp_path)
    try:
        data = os.urandom(16 * MIB)
        limits = Limits()
        assert connection.agent.execute('sha-stdin', input=data, timeout=60).stdout == digest_line(data)
        assert most_held['input'] <= INPUT_WINDOW < limits.max_stdin
    finally:
        connection.close()
