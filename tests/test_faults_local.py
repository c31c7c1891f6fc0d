"""
The rows of the fault matrix (``docs/faults.rst``) that honest in-process fakes can prove.

Real sockets and real processes throughout: an agent (AgentService + Endpoint) served over a
socket pair, the host daemon serving fake guests' listening sockets (the shape of QEMU's
chardev socket), commands that are real executables whose process ids are checked in /proc.
The faults that need a real virtio-serial port are in ``test_faults_vm.py``.
"""

import os
import socket
import threading
import time

import pytest

from negotiator_common import endpoint as endpoint_module
from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.deadline import Deadline
from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    CallTimeout, ConnectionClosed, InternalError, InvalidRequest, LimitExceeded, ParseError,
)
from negotiator_common.protocol import LineDecoder, Request, Response, encode_message, parse_line
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport
from negotiator_host.daemon import DEFAULT_GUEST_CONCURRENCY, HostDaemon
from negotiator_host.discovery import LibvirtPaths

from support import GUEST_COMMANDS, FakeGuestSide, make_commands_dir, result_or_error, short_tempdir, write_command
from waiting import process_alive, read_pid, wait_dead, wait_until


@pytest.fixture
def commands(tmp_path):
    directory = tmp_path / 'commands'
    directory.mkdir(mode=0o755)
    # The shell and its child both record their pids, then wait: the test can see both die.
    write_command(directory, 'long', 'sleep 60 & echo $$ $! > "$1"; wait')
    # Endless output, after recording its pid.
    write_command(directory, 'flood', 'echo $$ > "$1"; exec cat /dev/zero')
    return directory


@pytest.fixture
def served(commands):
    """(server endpoint, client socket) with a real AgentService on the server side."""
    server_sock, client_sock = socket.socketpair()
    service = AgentService('negotiator-test', CommandRegistry([str(commands)], builtins=False))
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='peer').start()
    yield server, client_sock
    server.close()
    client_sock.close()


def test_client_disconnect_mid_command_cancels_it(served, tmp_path):
    server, client_sock = served
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    client.handshake(timeout=30)
    pidfile = str(tmp_path / 'long.pid')
    outcome = []

    def call():
        try:
            AgentClient(client).execute('long', pidfile, timeout=60)
        except ConnectionClosed as exc:
            outcome.append(exc)
    caller = threading.Thread(target=call)
    caller.start()
    assert wait_until(lambda: os.path.exists(pidfile) and len(open(pidfile).read().split()) == 2)
    shell, child = [int(p) for p in open(pidfile).read().split()]
    assert process_alive(shell) and process_alive(child)
    started = time.monotonic()
    client.close()  # the client vanishes mid-request
    caller.join(5)
    assert outcome, 'the waiting call did not fail when its own side closed'
    # The server notices end of stream, cancels the handler, and the runner kills the group.
    assert wait_dead(shell, child, timeout=5), 'the command outlived its client'
    assert server.wait_closed(2)
    print('command killed %.2f s after the client disconnected' % (time.monotonic() - started))


def test_reader_that_does_not_read_is_dropped_and_its_command_killed(served, tmp_path, monkeypatch):
    """A full pipe: the peer asks for endless streamed output and never reads a byte."""
    monkeypatch.setattr(endpoint_module, 'REPLY_WRITE_TIMEOUT', 1.0)
    server, client_sock = served
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pidfile = str(tmp_path / 'flood.pid')
    client_sock.sendall(encode_message(Request(1, 'execute', {'command': 'flood', 'args': [pidfile],
                                                               'stream': True, 'timeout': 600})))
    pid = read_pid(pidfile)
    # Dropped at the 1 s reply-write timeout set above: 30 s rules out the default 60 s one, and
    # the command's 600 s timeout (the output waiting in the server's memory, not in the pipe
    # and the socket buffers).
    assert server.wait_closed(30), 'the server kept waiting for a reader that does not read'
    assert 'stopped reading' in server.close_reason
    assert wait_dead(pid, timeout=5), 'the command outlived the dropped connection'


def test_peer_that_never_reads_times_out_a_request():
    """The other side of a full pipe: a request that cannot be written fails at its timeout."""
    client_sock, silent = socket.socketpair()
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        started = time.monotonic()
        with pytest.raises(CallTimeout):
            client.call('echo', {'pad': 'x' * (8 * 1024 * 1024)}, timeout=1.0)
        # At the call's 1 s timeout: not a write that waits on for the peer (the replies' 60 s).
        assert time.monotonic() - started < 30
    finally:
        client.close()
        silent.close()


def test_response_to_a_request_never_sent_is_dropped_and_the_next_is_answered(served):
    server, client_sock = served
    client_sock.settimeout(5)
    client_sock.sendall(encode_message(Response(999, result='unasked')) +
                        encode_message(Response('x', error=InternalError('unasked too'))) +
                        encode_message(Request('next', 'ping')))
    decoder, events = LineDecoder(), []
    while not events:
        events = decoder.feed(client_sock.recv(65536))
    assert [(type(e), e.id) for e in events] == [(Response, 'next')]
    assert not server.closed


@pytest.mark.parametrize('bad_id', [1.5, True, {'a': 1}, [1]])
def test_ids_of_invalid_types_get_invalid_request_with_a_null_id(served, bad_id):
    import json
    server, client_sock = served
    client_sock.settimeout(5)
    client_sock.sendall(json.dumps({'jsonrpc': '2.0', 'id': bad_id, 'method': 'ping'}).encode() + b'\n')
    decoder, events = LineDecoder(), []
    while not events:
        events = decoder.feed(client_sock.recv(65536))
    assert events[0].id is None and type(events[0].error) is InvalidRequest


@pytest.mark.parametrize("number", [b"1e999", b"-1e400", b"1" + b"0" * 5000, b"-" + b"9" * 4301])
def test_numbers_out_of_range_are_parse_errors(number):
    event = parse_line(b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"n": ' + number + b'}}')
    assert type(event.error) is ParseError


def test_a_reply_that_cannot_be_encoded_becomes_an_internal_error():
    """A buggy handler (bytes, NaN) gets its caller an error; the reading thread lives on."""
    left_sock, right_sock = socket.socketpair()
    dispatcher = Dispatcher()
    dispatcher.register('bytes', lambda params, ctx: b'raw', inline=True)
    dispatcher.register('nan', lambda params, ctx: float('nan'))
    dispatcher.register('ok', lambda params, ctx: 'fine', inline=True)
    server = Endpoint(Transport.from_socket(left_sock), dispatcher, name='server').start()
    client = Endpoint(Transport.from_socket(right_sock), name='client').start()
    try:
        with pytest.raises(InternalError, match='could not be encoded'):
            client.call('bytes', timeout=5)
        with pytest.raises(InternalError, match='could not be encoded'):
            client.call('nan', timeout=5)
        assert client.call('ok', timeout=5) == 'fine'
    finally:
        client.close()
        server.close()


# The host daemon, serving fake guests.

@pytest.fixture
def host_commands():
    extra = dict(GUEST_COMMANDS)
    extra['nap'] = '''
        import sys, time
        time.sleep(float(sys.argv[1]))
    '''
    # Runs until the file named by its argument exists (the test releases it).
    extra['gated'] = '''
        import os, sys
        sys.exit(0 if wait_until(lambda: os.path.exists(sys.argv[1]), timeout=60, interval=0.01) else 'not released')
    '''
    return make_commands_dir(short_tempdir(), extra)


def serve_fake_guests(daemon, names):
    guests = {}
    for name in names:
        guests[name] = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
        daemon.serve_socket(name, guests[name].path)
    return guests, {name: guest.accept() for name, guest in guests.items()}


def close_all(daemon, guests):
    daemon.stop()
    connections = list(daemon.connections.values())
    for connection in connections:
        connection.endpoint.close()
    # Until their handlers have returned (their commands killed): a handler left starting a
    # command in the next test would fork with that test's descriptors open.
    for connection in connections:
        connection.endpoint.wait_replies(30)
    for guest in guests.values():
        guest.close()


def test_host_daemon_bounds_concurrent_requests_per_guest(host_commands, tmp_path):
    daemon = HostDaemon(commands_dirs=[host_commands], watch=False, paths=LibvirtPaths(None, None))
    guests, clients = serve_fake_guests(daemon, ['greedy', 'other'])
    release = str(tmp_path / 'release')
    try:
        greedy, other = clients['greedy'], clients['other']
        outcomes = []

        def call():
            try:
                outcomes.append(greedy.execute('gated', release, timeout=20).exit_status)
            except LimitExceeded as exc:
                outcomes.append(exc)
        threads = [threading.Thread(target=call) for _ in range(DEFAULT_GUEST_CONCURRENCY + 3)]
        for thread in threads:
            thread.start()
        # Every slot is taken once the requests beyond the bound are refused (each command runs until released).
        assert wait_until(lambda: sum(isinstance(o, LimitExceeded) for o in outcomes) == 3), outcomes
        # Meanwhile: the greedy guest's ping, and the other guest's commands (its own slots).
        rtt = greedy.ping(timeout=5)
        assert isinstance(rtt, float) and rtt > 0
        assert other.execute('echo-args', 'still', 'served', timeout=10).stdout == b'still served\n'
        assert outcomes.count(0) == 0, 'a command ended before the ping: this test proved nothing'
        open(release, 'w').close()
        for thread in threads:
            thread.join(20)
        assert outcomes.count(0) == DEFAULT_GUEST_CONCURRENCY
        assert sum(isinstance(o, LimitExceeded) for o in outcomes) == 3
        # Slots are given back: the next request runs.
        assert greedy.execute('echo-args', 'again', timeout=10).stdout == b'again\n'
    finally:
        open(release, 'w').close()
        close_all(daemon, guests)


def test_a_flooding_guest_cannot_starve_another(host_commands):
    """
    One guest sends requests as fast as the socket takes them (pings, listings and commands,
    far beyond its concurrency bound); another guest's calls still complete (a starved one
    would fail at its 30 s timeout). The latencies are printed (``pytest -s``) for
    docs/faults.rst, not asserted.
    """
    daemon = HostDaemon(commands_dirs=[host_commands], watch=False, paths=LibvirtPaths(None, None))
    guests, clients = serve_fake_guests(daemon, ['victim'])
    guests['flooder'] = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
    daemon.serve_socket('flooder', guests['flooder'].path)
    raw, _ = guests['flooder'].sock.accept()  # the flooder speaks raw bytes: nothing on its side waits
    victim = clients['victim']
    stop = threading.Event()
    counts = {'sent': 0, 'refused': 0, 'answered': 0}
    try:
        def baseline(n):
            latencies = []
            for i in range(n):
                started = time.monotonic()
                assert victim.execute('echo-args', str(i), timeout=30).stdout == b'%d\n' % i
                latencies.append(time.monotonic() - started)
            return latencies
        quiet = baseline(10)
        flood_sock = Transport.from_socket(raw)
        decoder = LineDecoder()

        def reader():
            while not stop.is_set():
                try:
                    data = flood_sock.read(deadline=Deadline(0.2))
                except CallTimeout:
                    continue
                except (ConnectionClosed, OSError):
                    return
                for event in decoder.feed(data):
                    if isinstance(event, Response):
                        counts['answered'] += 1
                        if isinstance(event.error, LimitExceeded):
                            counts['refused'] += 1
        methods = [('ping', {}), ('list_commands', {}), ('execute', {'command': 'echo-args', 'args': ['f']}),
                   ('execute', {'command': 'nap', 'args': ['0.2']})]

        def writer():
            number = 0
            while not stop.is_set():
                batch = b''.join(encode_message(Request('f-%d' % (number + i), *methods[(number + i) % 4]))
                                 for i in range(50))
                number += 50
                try:
                    flood_sock.write_all(batch, Deadline(5))
                except (CallTimeout, ConnectionClosed, OSError):
                    return
                counts['sent'] += 50
        flood_threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
        for thread in flood_threads:
            thread.start()
        assert wait_until(lambda: counts['refused'] > 0), 'the flood never hit the per-guest bound: %r' % counts
        flooded = baseline(20)
        pings = []
        for _ in range(10):
            pings.append(victim.ping(timeout=30))
        stop.set()
        for thread in flood_threads:
            thread.join(10)
        assert counts['refused'] > 0, 'the flood never hit the per-guest bound: %r' % counts
        print('\nquiet execute: median %.1f ms, max %.1f ms' % (1000 * sorted(quiet)[5], 1000 * max(quiet)))
        print('flooded execute: median %.1f ms, max %.1f ms' % (1000 * sorted(flooded)[10], 1000 * max(flooded)))
        print('flooded ping: median %.1f ms, max %.1f ms' % (1000 * sorted(pings)[5], 1000 * max(pings)))
        print('flooder: %(sent)d requests sent, %(answered)d answered, %(refused)d refused' % counts)
    finally:
        stop.set()
        raw.close()
        close_all(daemon, guests)


def test_host_daemon_restart_the_guest_is_served_again(host_commands):
    guest = FakeGuestSide(os.path.join(short_tempdir(), 'g2h'))
    try:
        for generation in range(2):
            daemon = HostDaemon(commands_dirs=[host_commands], watch=False, paths=LibvirtPaths(None, None))
            thread = threading.Thread(target=daemon.run)
            thread.start()
            daemon.serve_socket('web-1', guest.path)
            client = guest.accept()
            assert client.execute('whoami-guest', timeout=10).stdout == b'web-1\n'
            pending = []
            piddir = short_tempdir()
            caller = threading.Thread(target=lambda pending=pending, client=client, piddir=piddir: pending.append(
                result_or_error(client.execute, 'sleep-pid', piddir, '30', timeout=60)))
            caller.start()
            assert wait_until(lambda daemon=daemon: daemon.slots.running == 1)  # the command runs
            daemon.stop('restart %d' % generation)  # the daemon stops with a call in flight
            thread.join(10)
            assert not thread.is_alive()
            caller.join(10)
            # The guest's caller gets the reply of its stopped command at once (no 60 s wait),
            # then the connection closes.
            assert pending and getattr(pending[0], 'signal', None) == 15, pending
            assert client.endpoint.wait_closed(5)
    finally:
        guest.close()


def test_a_write_after_close_never_reaches_a_reused_descriptor():
    """Found by the flood test: a reply written after close went to os.write on a closed fd (EBADF)."""
    left, right = socket.socketpair()
    transport = Transport.from_socket(left)
    number = transport.fd
    transport.close()
    read_end, write_end = os.pipe()  # likely reuses the closed descriptor's number
    try:
        with pytest.raises(ConnectionClosed):
            transport.write_all(b'must not arrive\n')
        if number in (read_end, write_end):
            os.set_blocking(read_end, False)
            with pytest.raises(BlockingIOError):
                os.read(read_end, 100)
    finally:
        os.close(read_end)
        os.close(write_end)
        right.close()


def test_a_stopping_agent_replies_for_the_commands_it_kills(served, tmp_path):
    """The guest daemon's stop path: cancel, wait for the replies to go out, then close."""
    server, client_sock = served
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        client.handshake(timeout=30)
        pidfile = str(tmp_path / 'long.pid')
        outcome = []
        caller = threading.Thread(target=lambda: outcome.append(AgentClient(client).execute('long', pidfile,
                                                                                            timeout=60)))
        caller.start()
        assert wait_until(lambda: os.path.exists(pidfile) and len(open(pidfile).read().split()) == 2)
        server.cancel_requests()
        assert server.wait_replies(5)
        server.close('stopping')
        caller.join(5)
        assert outcome and outcome[0].signal == 15, outcome
    finally:
        # The client's own close, not the fixture's close of its socket: a reader thread not yet
        # past the server's end of file would poll that descriptor's number once the next test's
        # socket pair took it, and take its bytes (CI pre-check: test_files.py's first pull hung).
        client.close()
