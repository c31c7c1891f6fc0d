"""
Lines that are cheap to send and costly to parse (``docs/faults.rst``): refused before ``json``
builds them, parsed one at a time across a process, and their memory given back.
"""

import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import InvalidRequest, MessageTooLarge
from negotiator_common.protocol import MAX_NESTING, MAX_VALUES, DecodeError, Request, parse_line
from negotiator_common.transport import Transport
from negotiator_common.turns import Turns, Usage

from fake_libvirt import FakeLibvirt
from measuring import status_kib
from support import listening_socket
from waiting import wait_until

MIB = 1024 * 1024
ENVELOPE = b'{"jsonrpc":"2.0","id":"bad","method":"ping","params":{"x":%s}}'


def array_of(unit: bytes, size: int = 4 * MIB - 100) -> bytes:
    """A request line of about ``size`` bytes whose params hold an array of ``unit`` repeated."""
    return ENVELOPE % (b'[' + b','.join([unit] * ((size - len(ENVELOPE)) // (len(unit) + 1))) + b']')


def string_of(text: bytes, size: int = 4 * MIB - 100) -> bytes:
    """A request line of about ``size`` bytes whose params hold one string of ``text`` repeated."""
    return ENVELOPE % (b'"' + text * ((size - len(ENVELOPE)) // len(text)) + b'"')


@pytest.mark.parametrize('line', [
    array_of(b'{}'),
    array_of(b'[]'),
    array_of(b'[' * (MAX_NESTING - 3) + b']' * (MAX_NESTING - 3)),  # at the depth limit (3 levels around)
    array_of(b'0'),
    array_of(b'1000'),
    array_of(b'""'),
    array_of(b'"a\\"\\\\"'),  # escapes in strings hide no quote from the count
    ENVELOPE % (b'[' + b','.join([b'0'] * MAX_VALUES) + b']'),  # just over the bound (the envelope has values too)
], ids=['objects', 'arrays', 'nested', 'zeros', 'numbers', 'empty-strings', 'escaped-quotes', 'just-over'])
def test_lines_with_too_many_values_are_refused_naming_their_id(line):
    event = parse_line(line)
    assert isinstance(event, DecodeError), event
    assert type(event.error) is MessageTooLarge
    assert event.id == 'bad'


@pytest.mark.parametrize('line', [
    string_of(b'\\u0000'),
    string_of(b','),
    string_of(b'[{,'),
    string_of(b'\\",[{'),  # an escaped quote does not end the string
    string_of(b'a\\\\'),  # an escaped backslash just before the closing quote
    string_of('\U0001F600'.encode('utf-8')),
    ENVELOPE % (b'[' + b','.join([b'0'] * (MAX_VALUES - 10)) + b']'),  # just under the bound
], ids=['escapes', 'commas', 'brackets', 'escaped-quote', 'escaped-backslash', 'astral', 'just-under'])
def test_values_inside_strings_do_not_count(line):
    assert isinstance(parse_line(line), Request)


def test_nesting_deeper_than_the_limit_is_refused_among_few_values():
    deepest = b'[' * (MAX_NESTING - 2) + b']' * (MAX_NESTING - 2)  # two levels around: at the limit
    assert isinstance(parse_line(ENVELOPE % deepest), Request)
    event = parse_line(ENVELOPE % (b'["[[[[",' + deepest + b']'))  # one level more, brackets in a string
    assert isinstance(event, DecodeError) and type(event.error) is InvalidRequest and event.id == 'bad'


def read_reply(conn: socket.socket, wanted: bytes) -> bytes:
    """The first line from ``conn`` that contains ``wanted``."""
    buffer = b''
    while True:
        while b'\n' not in buffer:
            data = conn.recv(65536)
            assert data, 'the daemon closed the connection'
            buffer += data
        line, _, buffer = buffer.partition(b'\n')
        if wanted in line:
            return line


def test_host_daemon_memory_stays_bounded_under_costly_lines():
    """16 guests each send 4 MiB of ``{},{},...`` at once; a 17th keeps pinging."""
    fake = FakeLibvirt()
    sides = []
    for number in range(17):
        path = fake.socket_path('guest-%d' % number, number + 1, GUEST_TO_HOST_CHANNEL)
        sides.append(listening_socket(path))
        fake.add_running('guest-%d' % number, number + 1)
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', fake.root],
                               env=fake.environ, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for side in sides:
            side.settimeout(20)
        conns = [side.accept()[0] for side in sides]
        for conn in conns:
            conn.settimeout(120)
        good = Endpoint(Transport.from_socket(conns.pop()), name='host').start()
        good.handshake(30, agent='negotiator-guest')
        line = array_of(b'{}') + b'\n'
        replies = []
        attackers = [threading.Thread(target=lambda conn=conn: (conn.sendall(line),
                                                                replies.append(read_reply(conn, b'"bad"'))))
                     for conn in conns]
        for attacker in attackers:
            attacker.start()
        pings = 0
        while any(attacker.is_alive() for attacker in attackers):
            assert 'time' in good.call('ping', timeout=60)
            pings += 1
        assert len(replies) == 16 and pings
        assert status_kib(process.pid, 'VmHWM') < 400 * 1024
        assert wait_until(lambda: status_kib(process.pid, 'VmRSS') < 150 * 1024, timeout=20, interval=0.2)
        assert 'time' in good.call('ping', timeout=10)
    finally:
        process.terminate()
        process.wait(10)
        for side in sides:
            side.close()
        fake.cleanup()
        log.seek(0)
        sys.stderr.write(log.read().decode('utf-8', 'replace')[-2000:])


def test_the_next_parsing_turn_goes_to_the_connection_that_parsed_least_of_late():
    # A guest that sends a large line now and then must not queue behind guests that keep the
    # parser busy: among the waiters, the least recent user goes first, whatever the order of arrival.
    turns = Turns()
    busy, quiet, holder = Usage(), Usage(), Usage()
    busy.add(10.0, time.monotonic())
    release, order = threading.Event(), []

    def hold_until_released():
        with turns.hold(holder):
            release.wait(10)

    def take(name, usage):
        with turns.hold(usage):
            order.append(name)
    threads = [threading.Thread(target=hold_until_released)]
    threads[0].start()
    assert wait_until(lambda: turns._busy)
    for number in range(3):
        threads.append(threading.Thread(target=take, args=('busy-%d' % number, busy)))
        threads[-1].start()
        assert wait_until(lambda expected=number + 1: len(turns._waiting) == expected)
    threads.append(threading.Thread(target=take, args=('quiet', quiet)))
    threads[-1].start()
    assert wait_until(lambda: len(turns._waiting) == 4)
    release.set()
    for thread in threads:
        thread.join(10)
    assert order == ['quiet', 'busy-0', 'busy-1', 'busy-2']
    assert quiet.current(time.monotonic()) < busy.current(time.monotonic())
