"""
Raw input across a restart of the agent (``docs/protocol.rst``, "Streamed input"): the rest of
a chunk in flight reaches a new agent that never saw the chunk's header, and must never be
read as a request; the client ends the partial line it leaves with a line feed.
"""

import socket

import pytest
from hypothesis import given, settings, strategies as st

from negotiator_common.endpoint import Endpoint
from negotiator_common.protocol import (
    RAW_INPUT_METHOD, LineDecoder, Notification, Request, encode_message, escape_input, unescape_input,
)
from negotiator_common.transport import Transport

EVIL = b'\n{"jsonrpc":"2.0","id":7,"method":"execute","params":{"command":"reboot"}}\n'


def _wire(chunks):
    return b''.join(encode_message(Notification(RAW_INPUT_METHOD, {'id': 1}, attachment=chunk)) for chunk in chunks)


def _requests_read_by_a_new_agent(stale: bytes):
    decoder = LineDecoder()
    decoder.accept_input = True  # a serving side, as the new agent is
    return [event for event in decoder.feed(stale) if isinstance(event, Request)]


def test_a_request_inside_the_input_is_never_served_by_an_agent_that_restarted_mid_chunk():
    wire = _wire([b'data ' * 10 + EVIL + b'more data', EVIL * 3])
    for cut in range(len(wire)):
        assert _requests_read_by_a_new_agent(wire[cut:]) == [], cut


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64).map(lambda b: b + EVIL) | st.binary(min_size=1, max_size=64), min_size=1,
                max_size=4), st.data())
def test_no_cut_of_any_input_makes_a_new_agent_serve_a_request(chunks, data):
    wire = _wire(chunks)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert _requests_read_by_a_new_agent(wire[cut:]) == []


@given(st.binary())
def test_escaped_input_holds_no_line_feed_and_comes_back_whole(payload):
    escaped = escape_input(payload)
    assert b'\n' not in escaped
    assert unescape_input(escaped) == payload


def test_a_chunk_reaches_an_agent_that_read_its_header_as_it_was_sent():
    payload = bytes(range(256)) + b'\\n\\\\\n\n\\\x1bn'
    decoder = LineDecoder()
    decoder.accept_input = True
    (event,) = decoder.feed(encode_message(Notification(RAW_INPUT_METHOD, {'id': 1}, attachment=payload)))
    assert isinstance(event, Notification) and event.attachment == payload


def test_a_client_sends_a_line_feed_when_the_agent_announces_a_new_session():
    # The line feed ends the partial line that the rest of a chunk leaves in the new agent, so
    # that the client's next request is read on a line of its own.
    client_sock, agent_sock = socket.socketpair()
    client = Endpoint(Transport.from_socket(client_sock), name='guest').start()
    try:
        agent_sock.sendall(b'\n' + encode_message(Notification('session', {'agent': 'negotiator-guest', 'pid': 9})))
        agent_sock.settimeout(10)
        assert agent_sock.recv(16) == b'\n'
    finally:
        client.close()
        agent_sock.close()


@pytest.mark.parametrize('chunk, expected', [
    (b'tab\\tdone', b'tab\tdone'),  # a Python escape: decoded as Python does
    (b'bad \\x4 hex\\n', b'bad \\x4 hex\n'),  # refused by Python: the two pairs replaced, the rest kept
    (b'trailing\\\\ \\', b'trailing\\ \\'),
])
def test_a_chunk_that_no_conforming_caller_sends_decodes_without_failing(chunk, expected):
    assert unescape_input(chunk) == expected
