"""
Windows of credit, with no I/O (``negotiator_common.flow``; ``docs/protocol.rst``, "Flow control").

A sender and a receiver are wired together in memory and driven by hypothesis: whatever the
sizes of the chunks, of the windows and of the consumer's reads, a sender never sends more than
it was granted, the receiver never holds more than its window, and every byte arrives once, in
order.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negotiator_common.errors import InvalidRequest
from negotiator_common.flow import MAX_CREDIT, FlowError, InboundStream, ReceiveWindow, SendWindow, valid_grant


def test_a_sender_takes_only_what_it_was_granted():
    window = SendWindow()
    assert window.take(10) == 0
    window.grant(5)
    assert window.take(10) == 5 and window.credit == 0
    window.grant(8)
    assert window.take(3) == 3 and window.credit == 5


@pytest.mark.parametrize('grant', [0, -1, True, 1.5, '10', None, MAX_CREDIT + 1])
def test_a_grant_that_is_not_well_formed_is_refused(grant):
    window = SendWindow()
    with pytest.raises(FlowError):
        window.grant(grant)
    assert window.credit == 0 and not valid_grant(grant)


def test_room_held_at_once_is_bounded():
    window = SendWindow(MAX_CREDIT - 1)
    window.grant(1)
    with pytest.raises(FlowError):
        window.grant(1)


def test_more_than_the_room_granted_is_a_protocol_error_and_counts_nothing():
    window = ReceiveWindow(100)
    window.receive(60)
    with pytest.raises(FlowError) as caught:
        window.receive(41)
    assert isinstance(caught.value, InvalidRequest) and caught.value.code == -32600
    assert (window.outstanding, window.held) == (40, 60)


def test_room_is_granted_again_once_half_the_window_is_free():
    window = ReceiveWindow(100)
    window.receive(100)
    assert window.consume(30) == 0  # 30 free: less than half
    assert window.consume(20) == 50  # 50 free: granted at once
    assert (window.outstanding, window.held) == (50, 50)


def test_an_inbound_stream_gives_its_bytes_in_order_and_knows_its_end():
    stream = InboundStream(10)
    stream.feed(b'abcd')
    stream.feed(b'efgh')
    assert stream.read(3) == b'abc' and stream.held == 8
    assert stream.read(10) == b'd'
    assert stream.consumed(4) == 0
    stream.finish()
    assert not stream.ended
    assert stream.read(10) == b'efgh' and stream.ended
    assert stream.read(10) == b''
    with pytest.raises(FlowError):
        stream.feed(b'x')


def test_a_discarded_stream_drops_what_arrives_within_its_room_and_grants_no_more():
    stream = InboundStream(10)
    stream.feed(b'abcdef')
    stream.discard()
    stream.feed(b'ghij')
    assert stream.held == 0 and stream.read(10) == b'' and stream.consumed(0) == 0
    with pytest.raises(FlowError):
        stream.feed(b'k')


@st.composite
def transfers(draw):
    """A window, the chunks a producer offers, and a script of the consumer's reads and the sender's turns."""
    window = draw(st.integers(1, 64))
    chunks = draw(st.lists(st.binary(min_size=1, max_size=100), max_size=20))
    steps = draw(st.lists(st.tuples(st.sampled_from(['send', 'read']), st.integers(1, 80)), max_size=200))
    return window, chunks, steps


def run_transfer(window, chunks, steps):
    """
    Drive one sender and one receiver with ``steps``, then to the end; return the bytes the
    consumer read. Every rule is asserted on the way.
    """
    sender, receiver = SendWindow(window), InboundStream(window)
    pending = bytearray(b''.join(chunks))
    delivered = bytearray()

    def send(wanted):
        granted = sender.credit
        amount = sender.take(min(wanted, len(pending)))
        assert amount <= granted
        if amount:
            receiver.feed(bytes(pending[:amount]))  # never a FlowError: the sender kept to its room
            del pending[:amount]
        assert receiver.held <= window

    def read(limit):
        data = receiver.read(limit)
        delivered.extend(data)
        grant = receiver.consumed(len(data))
        if grant:
            sender.grant(grant)
        assert receiver.held <= window
        assert sender.credit + receiver.held <= window

    for action, amount in steps:
        (send if action == 'send' else read)(amount)
    for _ in range(10 * (len(pending) + window) + 10):  # to the end: the sender never stalls for good
        if not pending and not receiver.held:
            break
        send(window)
        read(window)
    assert not pending and not receiver.held
    return bytes(delivered)


@settings(max_examples=300, deadline=None)
@given(transfers())
def test_every_byte_arrives_once_in_order_and_no_sender_exceeds_its_room(transfer):
    window, chunks, steps = transfer
    assert run_transfer(window, chunks, steps) == b''.join(chunks)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(1, 200), max_size=30))
def test_a_sender_that_ignores_its_room_is_caught_before_anything_beyond_it_is_held(window, sizes):
    receiver = InboundStream(window)
    received = 0
    for size in sizes:
        if size > receiver.window.outstanding:
            with pytest.raises(FlowError):
                receiver.feed(b'x' * size)
        else:
            receiver.feed(b'x' * size)
            received += size
        assert receiver.held == received <= window
