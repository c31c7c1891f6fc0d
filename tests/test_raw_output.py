"""Raw output (docs/protocol.rst, "Raw output"): output bytes after a header line, copied, not escaped."""

import hashlib
import json
import os
import socket
import sys
import threading

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import InvalidParams, InvalidRequest, MessageTooLarge
from negotiator_common.protocol import (
    DecodeError, LineDecoder, Notification, Request, Response, decode_bytes, encode_message,
)
from negotiator_common.service import CAPABILITIES, AgentService
from negotiator_common.transport import Transport

from support import write_command

# Attachments full of what would break a line framing: line feeds, NUL, invalid UTF-8, and
# bytes that look like a message of their own.
TRICKY = b'\n\n\x00\xff\xfe' + encode_message(Request(666, 'ping')) + b'{"jsonrpc"'

MESSAGES = [
    Request(1, 'ping'),
    Notification('output', {'id': 7, 'stream': 'stdout'}, attachment=TRICKY),
    Response(1, result={'time': 1.5}),
    Notification('output', {'id': 7, 'stream': 'stderr'}, attachment=b'x'),
    Notification('output', {'id': 7, 'stream': 'stdout', 'data': 'text\n'}),
    Notification('output', {'id': 7, 'stream': 'stdout'}, attachment=bytes(range(256)) * 40),
    Notification('output', {'id': 7, 'stream': 'stdout'}, attachment=b'ends without a line feed'),
    Request(2, 'ping'),
]


def summary(event):
    if isinstance(event, DecodeError):
        return ('error', type(event.error).__name__)
    return (json.dumps(event.to_wire(), sort_keys=True), getattr(event, 'attachment', None))


def header(size, method='output'):
    return json.dumps({'jsonrpc': '2.0', 'method': method,
                       'params': {'id': 1, 'stream': 'stdout', 'size': size}}).encode() + b'\n'


def test_an_attachment_follows_its_header_line():
    wire = encode_message(Notification('output', {'id': 4, 'stream': 'stdout'}, attachment=b'hello Grace\n'))
    assert wire == b'{"jsonrpc":"2.0","method":"output","params":{"id":4,"stream":"stdout","size":12}}\nhello Grace\n'


def test_only_output_notifications_carry_non_empty_attachments():
    for message in (Notification('session', {}, attachment=b'x'), Notification('output', {}, attachment=b'')):
        with pytest.raises(ValueError):
            encode_message(message)


def test_decoder_fed_whole():
    events = LineDecoder().feed(b''.join(encode_message(m) for m in MESSAGES))
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]
    assert events[1].params == {'id': 7, 'stream': 'stdout'} and events[1].attachment == TRICKY


def test_decoder_fed_one_byte_at_a_time():
    decoder = LineDecoder()
    events = []
    for byte in b''.join(encode_message(m) for m in MESSAGES):
        events.extend(decoder.feed(bytes([byte])))
        assert decoder.buffered <= decoder.max_line_length
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]
    assert decoder.buffered == 0 and decoder.expecting == 0


@pytest.mark.parametrize('split', [1, 7, 100, 4096])
def test_decoder_fed_in_chunks_of_any_size(split):
    stream = b''.join(encode_message(m) for m in MESSAGES)
    decoder = LineDecoder()
    events = []
    for start in range(0, len(stream), split):
        events.extend(decoder.feed(stream[start:start + split]))
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]


def read_as_the_endpoint_reads(decoder, stream, split):
    """Feed ``stream`` in pieces of ``split`` bytes, each attachment's bytes into its room (as Endpoint.run does)."""
    events, position = [], 0
    while position < len(stream):
        room = decoder.attachment_room()
        if room is None:
            events.extend(decoder.feed(stream[position:position + split]))
            position += split
            continue
        piece = stream[position:position + min(split, len(room))]
        room[:len(piece)] = piece
        events.extend(decoder.attachment_filled(len(piece)))
        assert decoder.buffered <= decoder.max_line_length
        position += len(piece)
    return events


@pytest.mark.parametrize('split', [1, 7, 100, 4096, 1 << 20])
def test_attachments_read_straight_into_their_room_arrive_as_fed_ones_do(split):
    stream = b''.join(encode_message(m) for m in MESSAGES)
    events = read_as_the_endpoint_reads(LineDecoder(), stream, split)
    assert [summary(e) for e in events] == [summary(m) for m in MESSAGES]


def test_an_input_chunk_read_into_its_room_is_unescaped_and_a_feed_may_finish_it():
    data = b'line\nwith \x1b escapes\n' * 300
    wire = encode_message(Notification('input', {'id': 3}, attachment=data))
    decoder = LineDecoder()
    decoder.accept_input = True
    line_end = wire.index(b'\n') + 1
    assert decoder.feed(wire[:line_end + 10]) == []
    room = decoder.attachment_room()
    assert room is not None and len(room) == len(wire) - line_end - 10
    room[:100] = wire[line_end + 10:line_end + 110]
    assert decoder.attachment_filled(100) == []
    events = decoder.feed(wire[line_end + 110:])  # a plain read finishes what the room began
    assert len(events) == 1 and events[0].attachment == data and events[0].params == {'id': 3}
    assert decoder.attachment_room() is None and decoder.buffered == 0


def test_no_room_is_offered_for_lines_or_a_skipped_attachment_and_a_wrong_count_is_refused():
    decoder = LineDecoder(max_line_length=1000)
    assert decoder.attachment_room() is None
    assert decoder.feed(header(5000))[0].error.__class__ is MessageTooLarge
    assert decoder.expecting == 5000 and decoder.attachment_room() is None  # skipped, not stored
    decoder = LineDecoder()
    decoder.feed(header(10))
    room = decoder.attachment_room()
    assert len(room) == 10
    with pytest.raises(ValueError):
        decoder.attachment_filled(11)
    with pytest.raises(ValueError):
        decoder.attachment_filled(0)


@pytest.mark.parametrize('size', [0, -5, True, False, 1.5, '12', None, [3], {'n': 3}])
def test_a_bad_size_is_an_invalid_request_and_nothing_is_swallowed(size):
    decoder = LineDecoder()
    events = decoder.feed(header(size) + encode_message(Request(9, 'ping')))
    assert [summary(e) for e in events] == [('error', 'InvalidRequest'), summary(Request(9, 'ping'))]
    assert isinstance(events[0].error, InvalidRequest)


def test_size_on_another_notification_is_an_ordinary_param():
    events = LineDecoder().feed(header(3, method='session') + encode_message(Request(9, 'ping')))
    assert isinstance(events[0], Notification) and events[0].params['size'] == 3 and events[0].attachment is None
    assert isinstance(events[1], Request)


@pytest.mark.parametrize('chunk', [1, 999, 1 << 20])
def test_a_too_large_size_is_skipped_unstored_and_the_next_message_is_intact(chunk):
    limit, size = 1000, 250000
    decoder = LineDecoder(max_line_length=limit)
    stream = header(size) + b'\n{' * (size // 2) + encode_message(Request(9, 'ping'))
    events = []
    for start in range(0, len(stream), chunk):
        events.extend(decoder.feed(stream[start:start + chunk]))
        assert decoder.buffered <= limit
    assert [summary(e) for e in events] == [('error', 'MessageTooLarge'), summary(Request(9, 'ping'))]
    assert isinstance(events[0].error, MessageTooLarge)


def test_an_attachment_of_exactly_the_maximum_is_accepted():
    decoder = LineDecoder(max_line_length=100)
    events = decoder.feed(header(100) + b'\n' * 100 + header(101) + b'y' * 101 + header(1) + b'z')
    assert [e.attachment if isinstance(e, Notification) else type(e.error) for e in events] == \
        [b'\n' * 100, MessageTooLarge, b'z']


def test_reset_forgets_a_partial_attachment():
    decoder = LineDecoder()
    decoder.feed(header(50) + b'abc')
    assert decoder.buffered == 3 and decoder.expecting == 47
    decoder.reset()
    assert decoder.feed(encode_message(Request(2, 'ping')))[0].id == 2


def test_decode_bytes_prefers_the_raw_bytes():
    assert decode_bytes({'data_raw': b'\xff\n', 'data': 'ignored'}, 'data') == b'\xff\n'
    assert decode_bytes({'data_raw': 'text from the wire is not raw', 'data': 'ok'}, 'data') == b'ok'


def test_hello_announces_raw_output():
    assert 'raw-output' in CAPABILITIES


@pytest.fixture
def channel(tmp_path):
    """A client endpoint and the raw socket-pair behind a real AgentService."""
    directory = tmp_path / 'commands'
    directory.mkdir()
    os.chmod(str(directory), 0o755)
    # Several MiB of every byte value, from a seed, with line feeds and invalid UTF-8 throughout.
    write_command(directory, 'noise', '#!%s\nimport hashlib, sys\n'
                  'for i in range(int(sys.argv[1])):\n'
                  '    sys.stdout.buffer.write(hashlib.sha512(str(i).encode()).digest() * 512)\n'
                  'sys.stderr.buffer.write(b"\\xff err\\n")\n' % sys.executable)
    write_command(directory, 'greet', '#!/bin/sh\necho "hello $1"\n')
    service = AgentService('negotiator-test', CommandRegistry([str(directory)]))
    server_sock, client_sock = socket.socketpair()
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='agent').start()
    yield server, client_sock
    server.close()
    client_sock.close()


def expected_noise(count):
    return b''.join(hashlib.sha512(str(i).encode()).digest() * 512 for i in range(count))


def test_several_mib_of_binary_output_arrive_intact(channel):
    server, client_sock = channel
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        client.handshake(timeout=30)
        count = 200  # 200 * 32 KiB: 6.25 MiB
        result = AgentClient(client).execute('noise', str(count), timeout=60)
        assert result.exit_status == 0
        assert len(result.stdout) == count * 32768
        assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(expected_noise(count)).hexdigest()
        assert result.stderr == b'\xff err\n'
    finally:
        client.close()


def test_raw_output_streams_to_a_sink_while_pings_interleave(channel, tmp_path):
    server, client_sock = channel
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        client.handshake(timeout=30)
        stop = threading.Event()
        pings = []

        def ping_loop():
            while not stop.is_set():
                pings.append(client.call('ping', timeout=10))
        thread = threading.Thread(target=ping_loop)
        thread.start()
        target = tmp_path / 'out'
        with open(str(target), 'wb') as sink:
            result = AgentClient(client).execute('noise', '100', timeout=60, stdout=sink)
        stop.set()
        thread.join(10)
        assert result.stdout == b'' and result.exit_status == 0
        assert target.read_bytes() == expected_noise(100)
        assert pings and all('time' in p for p in pings)
    finally:
        client.close()


def test_the_wire_carries_raw_bytes_only_when_asked(channel):
    server, client_sock = channel
    client_sock.settimeout(10)

    def exchange(stream):
        request = {'jsonrpc': '2.0', 'id': 4, 'method': 'execute',
                   'params': {'command': 'greet', 'args': ['Grace'], 'stream': stream}}
        client_sock.sendall(json.dumps(request).encode() + b'\n')
        received = b''
        while b'"result"' not in received:
            received += client_sock.recv(65536)
        return received

    raw = exchange('raw')
    head, _, rest = raw.partition(b'\n')
    assert json.loads(head.decode()) == {'jsonrpc': '2.0', 'method': 'output',
                                         'params': {'id': 4, 'stream': 'stdout', 'size': 12}}
    assert rest.startswith(b'hello Grace\n{')
    assert json.loads(rest[12:].decode())['result']['streamed'] is True
    # Text streaming is unchanged: every byte is in lines of JSON.
    text = exchange(True)
    assert [json.loads(line.decode()) for line in text.splitlines()][0]['params'] == \
        {'id': 4, 'stream': 'stdout', 'data': 'hello Grace\n'}


def test_an_unknown_stream_mode_is_refused(channel):
    server, client_sock = channel
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        client.handshake(timeout=30)
        with pytest.raises(InvalidParams):
            client.call('execute', {'command': 'greet', 'stream': 'binary'}, timeout=5)
    finally:
        client.close()


def old_agent(capabilities):
    """An agent from before raw output: its hello announces ``capabilities``, its execute takes only booleans."""
    from negotiator_common.dispatcher import Dispatcher, get_param

    asked = []

    def old_execute(params, context):
        asked.append(params.get('stream'))
        get_param(params, 'stream', (bool,), False)  # what an agent before raw output checks
        context.notify(Notification('output', {'id': context.request_id, 'stream': 'stdout', 'data': 'old\n'}))
        return {'exit_status': 0, 'signal': None, 'duration': 0.0, 'stdout_truncated': False,
                'stderr_truncated': False, 'streamed': True}
    dispatcher = Dispatcher()
    dispatcher.register('hello', lambda params, context: {'protocol': 1, 'agent': 'negotiator-guest',
                                                          'capabilities': capabilities, 'limits': {}}, inline=True)
    dispatcher.register('execute', old_execute)
    server_sock, client_sock = socket.socketpair()
    server = Endpoint(Transport.from_socket(server_sock), dispatcher, name='old').start()
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    return server, client, asked


@pytest.mark.parametrize('capabilities', [['ping', 'list_commands', 'execute', 'stream'], 'raw-output', None])
def test_the_client_asks_an_agent_whose_hello_lacks_raw_output_for_text(capabilities):
    # Decided from what the agent declared, before anything is sent: one request, never a retry
    # (a capability is only a string in a list: a bare string is no list of capabilities).
    server, client, asked = old_agent(capabilities)
    try:
        agent = AgentClient(client, client.handshake(timeout=30))
        assert not agent.raw_output
        assert agent.execute('anything', timeout=5).stdout == b'old\n'
        assert asked == [True]
    finally:
        client.close()
        server.close()


def test_the_client_asks_for_raw_output_where_hello_lists_it_or_nothing_is_known():
    for hello in ({'capabilities': ['stream', 'raw-output']}, None):
        server, client, asked = old_agent([])
        try:
            agent = AgentClient(client, hello)
            assert agent.raw_output
            with pytest.raises(InvalidParams):  # this agent lied: it refuses "raw"
                agent.execute('anything', timeout=5)
            assert asked == ['raw']
        finally:
            client.close()
            server.close()
