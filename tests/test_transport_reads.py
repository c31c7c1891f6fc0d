"""
How :class:`negotiator_common.transport.Transport` reads: poll first after a message, read
first while a stream flows (a read that finds nothing raises, and in an emulated guest that
failed read doubled a ping's round trip; docs/benchmark.rst).
"""

import os

import pytest

from negotiator_common.deadline import Deadline
from negotiator_common.errors import CallTimeout
from negotiator_common.transport import STREAMING_READ, Transport


class CountingTransport(Transport):
    """A transport that counts its reads that found nothing (BlockingIOError)."""

    empty_reads = 0

    def _readv(self, view):
        try:
            return super()._readv(view)
        except BlockingIOError:
            self.empty_reads += 1
            raise


@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    reader = CountingTransport(read_end)
    yield reader, write_end
    reader.close()
    os.close(write_end)


def _empty_reads_of_a_read_that_finds_nothing(reader):
    before = reader.empty_reads
    with pytest.raises(CallTimeout):
        reader.read(deadline=Deadline(0.05))
    return reader.empty_reads - before


def test_after_a_short_message_a_read_waits_for_data_before_reading(pipe):
    reader, write_end = pipe
    message = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n'
    os.write(write_end, message)
    assert reader.read() == message
    assert _empty_reads_of_a_read_that_finds_nothing(reader) == 0


def test_while_a_stream_flows_a_read_reads_before_it_polls(pipe):
    reader, write_end = pipe
    os.write(write_end, b'x' * STREAMING_READ)
    assert reader.read() == b'x' * STREAMING_READ
    assert _empty_reads_of_a_read_that_finds_nothing(reader) == 1  # tried at once, then waited
    assert _empty_reads_of_a_read_that_finds_nothing(reader) == 0  # the stream has stopped


def test_a_read_into_a_view_takes_what_waits_until_the_view_is_full(pipe):
    reader, write_end = pipe
    room = memoryview(bytearray(10))
    os.write(write_end, b'abc')
    assert reader.read_into(room) == 3 and bytes(room[:3]) == b'abc'  # what waited, not a wait for more
    os.write(write_end, b'defghijklmnop')
    assert reader.read_into(room[3:]) == 7 and bytes(room) == b'abcdefghij'  # never beyond the view
    assert reader.read() == b'klmnop'  # the rest is the next read's


def test_a_read_into_says_0_at_the_end_of_the_stream():
    read_end, write_end = os.pipe()
    reader = Transport(read_end)
    os.close(write_end)
    try:
        assert reader.read_into(memoryview(bytearray(4))) == 0
    finally:
        reader.close()


def test_a_read_into_waits_for_the_first_bytes_within_its_deadline(pipe):
    reader, write_end = pipe
    with pytest.raises(CallTimeout):
        reader.read_into(memoryview(bytearray(8)), deadline=Deadline(0.05))


def test_a_transport_counts_every_byte_that_either_read_took(pipe):
    # The guest daemon tells an empty session (a host that connected and left) from a busy one by it.
    reader, write_end = pipe
    os.write(write_end, b'abc')
    assert reader.read() == b'abc'
    os.write(write_end, b'defg')
    assert reader.read_into(memoryview(bytearray(8))) == 4
    assert reader.bytes_read == 7
