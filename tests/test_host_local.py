"""
The host daemon's local socket: many local callers share one connection to each guest (no VM).

A fake libvirt lists the guests; each runs a real agent (FakeGuestAgent, one client at a time as
QEMU's chardev socket); the daemon runs its main loop on a thread, and the test's clients connect
to its socket. A client names the uid it plays in its socket's abstract address (``caller_of``):
the kernel would say the test's own uid (root) for all of them; one test runs a client as
``nobody`` for the kernel's own word.
"""

import grp
import hashlib
import io
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import warnings

import pytest

from negotiator_common.channels import GUEST_TO_HOST_CHANNEL
from negotiator_common.client import AgentClient
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    ChannelNotFound, CommandNotAllowed, ConnectionClosed, InvalidParams, InvalidRequest, LimitExceeded,
    MessageTooLarge, ParseError,
)
from negotiator_common.protocol import LineDecoder, Notification, Request, Response, encode_message
from negotiator_common.service import Limits
from negotiator_common.transport import Transport
from negotiator_host import local, local_socket
from negotiator_host.access import Caller, CallerPolicy
from negotiator_host.audit import AuditLog
from negotiator_host.channel import GuestChannel
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths
from negotiator_host.local import LocalSocketError, open_local_socket
from negotiator_host.proxy import client_output

from fake_libvirt import FakeLibvirt
from support import (
    GUEST_COMMANDS, FakeGuestAgent, FakeGuestSide, StalledFile, make_commands_dir, result_or_error, short_tempdir,
)
from waiting import process_alive, wait_dead, wait_until

GUESTS = ('alpha', 'beta')

NOBODY = pwd.getpwnam('nobody')
ALLOWED_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
"""The group that the daemon's --allow-group lets use guest alpha: nobody's, and that of the uids the tests play."""


def caller_of(sock):
    """
    The caller a test client plays: the uid in its abstract address (1001 and 1002 in the allowed
    group, others in none), else what the kernel says (the test runs as root).
    """
    name = sock.getpeername()
    if isinstance(name, bytes) and name.startswith(b'\0nh-uid-'):
        uid = int(name.split(b'-')[2])
        return Caller(uid, uid, os.getpid(), 'user%d' % uid, [ALLOWED_GROUP] if uid in (1001, 1002) else [])
    return Caller.from_socket(sock)


class World(object):
    """The fake guests with their agents, and a host daemon serving them on a local socket."""

    def __init__(self, monkeypatch, limits=None):
        self.fake = FakeLibvirt().activate(monkeypatch)
        self.commands = make_commands_dir(self.fake.root, GUEST_COMMANDS)
        self.limits = limits
        self.agents = {}
        for number, name in enumerate(GUESTS, 1):
            self.fake.add_running(name, number)
            self.start_agent(name)
        top = short_tempdir()
        os.chmod(top, 0o755)  # so that nobody may reach the socket
        self.socket = os.path.join(top, 'run', 'host.sock')
        self.audit_path = os.path.join(self.fake.root, 'audit', 'audit.log')
        self.daemon = HostDaemon(commands_dirs=[self.commands], watch=False, socket_path=self.socket,
                                 paths=LibvirtPaths(self.fake.status_dir, self.fake.channel_dir),
                                 caller_policy=CallerPolicy.from_options(['%s=alpha' % ALLOWED_GROUP]),
                                 audit=AuditLog(self.audit_path), caller_of=caller_of)
        self.daemon.request_rescan(0)
        self.thread = threading.Thread(target=self.daemon.run)
        self.thread.start()
        assert wait_until(lambda: all(self.linked(name) for name in GUESTS), timeout=10)

    def start_agent(self, name):
        number = GUESTS.index(name) + 1
        path = self.fake.socket_path(name, number, 'negotiator-host-to-guest.0')
        self.agents[name] = FakeGuestAgent(path, self.commands, name=name, limits=self.limits)
        return self.agents[name]

    def linked(self, name):
        agent = self.daemon.agents.get(name)
        return agent is not None and agent.link is not None and not agent.link.endpoint.closed

    def audit(self):
        """The records of the audit log so far."""
        if not os.path.exists(self.audit_path):
            return []
        with open(self.audit_path) as handle:
            return [json.loads(line) for line in handle]

    def queue(self, name='alpha'):
        return self.daemon.agents[name].queue

    def connect(self, uid=0):
        """A client endpoint on the daemon's socket, playing ``uid``."""
        return Endpoint(Transport.from_socket(self.raw_socket(uid)), name='client').start()

    def raw_socket(self, uid=0):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if uid:
            sock.bind('\0nh-uid-%d-%s' % (uid, os.urandom(6).hex()))
        sock.connect(self.socket)
        return sock

    def attach(self, guest='alpha', uid=0):
        """An AgentClient attached to ``guest`` through the daemon."""
        endpoint = self.connect(uid)
        return AgentClient(endpoint, endpoint.call('hello', {'guest': guest}, timeout=10))

    def close(self):
        self.daemon.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()
        for agent in self.agents.values():
            agent.stop()
        self.fake.cleanup()


@pytest.fixture
def world(monkeypatch):
    world = World(monkeypatch)
    yield world
    world.close()


class RawClient(object):
    """A client that writes lines and reads the replies and notifications as they come."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.settimeout(20)
        self.decoder = LineDecoder()
        self.decoder.accept_attachments = True
        self.events = []

    def send(self, request_id, method, params=None):
        self.sock.sendall(encode_message(Request(request_id, method, params)))

    def reply(self, request_id):
        """The reply to ``request_id`` (the events before it stay in :attr:`events`)."""
        while True:
            for event in self.events:
                if isinstance(event, Response) and event.id == request_id:
                    return event
            data = self.sock.recv(1 << 20)
            assert data, 'the daemon closed the connection'
            self.events.extend(self.decoder.feed(data))

    def output(self, request_id):
        return b''.join(e.attachment or e.params.get('data', '').encode() for e in self.events
                        if isinstance(e, Notification) and e.params.get('id') == request_id)


def _execute_on_a_thread(client, *args, **kwargs):
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(result_or_error(client.execute, *args, **kwargs)))
    thread.start()
    return thread, outcome


def _pid_in(directory):
    """The pid of the sleep-pid command that wrote its file in ``directory``."""
    assert wait_until(lambda: os.listdir(directory)), 'no command started'
    return int(os.listdir(directory)[0])


def test_eight_clients_run_at_once_in_the_guest_over_its_one_connection(world):
    meeting = os.path.join(world.fake.root, 'meeting')
    os.mkdir(meeting)
    clients = [world.attach() for _ in range(8)]
    calls = [_execute_on_a_thread(client, 'rendezvous', meeting, '8', timeout=30) for client in clients]
    for thread, _ in calls:
        thread.join(40)
    # Each command waited until all eight ran at once in the guest: none could have met alone.
    assert [outcome[0].stdout for _, outcome in calls] == [b'met\n'] * 8
    assert world.agents['alpha'].connections == 1 and len(os.listdir(meeting)) == 8
    executions = [r for r in world.audit() if r['method'] == 'execute']
    assert [(r['command'], r['exit_status'], r['uid']) for r in executions] == [('rendezvous', 0, 0)] * 8


def test_the_attach_answers_the_guests_hello_with_via_and_this_connections_bounds(world):
    endpoint = world.connect()
    hello = endpoint.call('hello', {'guest': 'alpha', 'protocol': 1}, timeout=10)
    assert hello['agent'] == 'negotiator-guest' and hello['via'] == 'negotiator-host-daemon'
    assert 'cancel' in hello['capabilities'] and 'raw-output' in hello['capabilities']
    assert hello['limits']['max_in_flight'] == local.CLIENT_MAX_IN_FLIGHT
    assert hello['limits']['max_stdin'] == Limits().max_stdin
    # The same guest again is the same attach; another is refused on this connection.
    assert endpoint.call('hello', {'guest': 'alpha'}, timeout=10)['via'] == 'negotiator-host-daemon'
    with pytest.raises(InvalidParams):
        endpoint.call('hello', {'guest': 'beta'}, timeout=10)
    endpoint.close()


def test_the_daemons_own_hello_lists_only_the_guests_the_caller_may_use(world):
    root = world.connect().call('hello', timeout=10)
    assert root['agent'] == 'negotiator-host-daemon'
    assert root['guests'] == [{'name': 'alpha', 'connected': True}, {'name': 'beta', 'connected': True}]
    assert world.connect(uid=1001).call('hello', {}, timeout=10)['guests'] == [{'name': 'alpha', 'connected': True}]
    assert world.connect(uid=1003).call('hello', timeout=10)['guests'] == []


def test_attach_errors_unknown_guest_refused_caller_and_calls_before_the_attach(world):
    endpoint = world.connect()
    with pytest.raises(InvalidRequest) as before:
        endpoint.call('ping', timeout=10)
    assert 'hello' in str(before.value)
    with pytest.raises(ChannelNotFound):
        endpoint.call('hello', {'guest': 'gamma'}, timeout=10)
    with pytest.raises(CommandNotAllowed) as refused:
        world.connect(uid=1003).call('hello', {'guest': 'alpha'}, timeout=10)
    assert str(refused.value).startswith("uid 1003 (user1003) may not use guest 'alpha' through the host daemon")
    assert [(r['uid'], r['guest'], r['method'], r['error']) for r in world.audit()] == [
        (1003, 'alpha', 'hello', 'CommandNotAllowed')]
    # A refused caller may not reach a guest it does not name either (no hint that it exists).
    with pytest.raises(CommandNotAllowed):
        world.connect(uid=1003).call('hello', {'guest': 'gamma'}, timeout=10)
    # After all that, the connection attaches as usual.
    assert endpoint.call('hello', {'guest': 'beta'}, timeout=10)['via'] == 'negotiator-host-daemon'
    assert endpoint.call('ping', timeout=10)['time'] > 0


def _hello_as_nobody(path, guest):
    """In a forked child running as nobody: the first line the daemon answers to a hello that names ``guest``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)  # the parent waits for this child: a daemon that never answers fails the test
        client.connect(path)
        client.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "hello", "params": {"guest": "%s", "uid": 0}}\n'
                       % guest.encode())
        return client.makefile('rb').readline()


def test_the_kernels_word_decides_who_a_caller_is_whatever_it_claims(world):
    # A real process of another user (nobody, in the allowed group) claims to be root: the
    # daemon goes by SO_PEERCRED, so it may attach to alpha and not to beta.
    with warnings.catch_warnings():
        # Python 3.12+ warns that the daemon's threads make fork() unsafe: the child only makes
        # system calls on objects of its own, then _exit()s.
        warnings.simplefilter('ignore', DeprecationWarning)
        child = os.fork()
    if child == 0:
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            alpha, beta = _hello_as_nobody(world.socket, 'alpha'), _hello_as_nobody(world.socket, 'beta')
            status = 0 if b'"via"' in alpha and b'-32011' in beta else 2
        finally:
            os._exit(status)
    assert os.waitpid(child, 0)[1] == 0
    assert [(r['uid'], r['user'], r['guest'], r['error']) for r in world.audit()] == [
        (NOBODY.pw_uid, 'nobody', 'beta', 'CommandNotAllowed')]


def test_output_streams_reach_only_the_client_that_asked_raw_and_text(world):
    raw = world.attach()
    text_endpoint = world.connect()
    hello = text_endpoint.call('hello', {'guest': 'alpha'}, timeout=10)
    hello['capabilities'] = [c for c in hello['capabilities'] if c != 'raw-output']
    text = AgentClient(text_endpoint, hello)
    assert raw.raw_output and not text.raw_output
    big, small = io.BytesIO(), io.BytesIO()
    raw_call = _execute_on_a_thread(raw, 'bytes', str(3 * 1024 * 1024 + 7), stdout=big, timeout=30)
    text_calls = [text.execute('echo-args', 'text', str(n), stdout=small, timeout=30) for n in range(20)]
    raw_call[0].join(30)
    assert raw_call[1][0].exit_status == 0 and big.getvalue() == b'x' * (3 * 1024 * 1024 + 7)
    assert all(result.exit_status == 0 for result in text_calls)
    assert small.getvalue() == b''.join(b'text %d\n' % n for n in range(20))


# Streams and credit through the daemon (docs/protocol.rst, "Streams and flow control"): end to end.

def test_streamed_input_reaches_the_guest_through_the_daemon(world):
    client = world.attach()
    data = os.urandom(12 * 1024 * 1024 + 5)
    result = client.execute('sha-stdin', input=io.BytesIO(data), timeout=60)
    assert result.stdout == ('%s %d\n' % (hashlib.sha256(data).hexdigest(), len(data))).encode()


def test_a_client_whose_consumer_stalls_slows_no_other_client_of_the_guest(world):
    slow, other = world.attach(), world.attach()
    stalled = StalledFile()
    size = 40 * 1024 * 1024  # beyond the 16 MiB a client may leave unread: credit keeps it within its window
    thread, outcome = _execute_on_a_thread(slow, 'bytes', str(size), stdout=stalled, timeout=60)
    assert stalled.waiting.wait(20)
    for _ in range(10):
        other.ping(timeout=5)
        slow.ping(timeout=5)
    assert other.execute('echo-args', 'meanwhile', timeout=10).stdout == b'meanwhile\n'
    assert not outcome
    stalled.go.set()
    thread.join(60)
    assert outcome[0].exit_status == 0 and stalled.size == size


def test_a_command_that_does_not_read_its_input_slows_no_other_client_of_the_guest(world, tmp_path):
    streaming, other = world.attach(), world.attach()
    gate = str(tmp_path / 'gate')
    data = os.urandom(16 * 1024 * 1024)
    thread, outcome = _execute_on_a_thread(streaming, 'sha-stdin', gate, input=io.BytesIO(data), timeout=60)
    for _ in range(10):
        other.ping(timeout=5)
        streaming.ping(timeout=5)
    assert other.execute('echo-args', 'meanwhile', timeout=10).stdout == b'meanwhile\n'
    assert not outcome
    open(gate, 'w').close()
    thread.join(60)
    assert outcome[0].stdout == ('%s %d\n' % (hashlib.sha256(data).hexdigest(), len(data))).encode()


def test_input_beyond_the_guests_room_is_refused_by_the_daemon(world, tmp_path):
    client = world.attach()
    credits, got_credit = [], threading.Event()

    def on_credit(params):
        credits.append(params)
        got_credit.set()

    gate = str(tmp_path / 'never')
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(result_or_error(
        client.endpoint.call, 'execute', {'command': 'sha-stdin', 'args': [gate], 'stdin_stream': True},
        timeout=30, on_credit=on_credit)))
    thread.start()
    assert got_credit.wait(10)
    client.endpoint.notify(Notification('input', {'id': credits[0]['id']},
                                        attachment=b'x' * (credits[0]['bytes'] + 1)))
    thread.join(30)
    assert isinstance(outcome[0], InvalidRequest) and outcome[0].code == -32600
    assert client.ping(timeout=5) >= 0
    assert ('execute', 'FlowError') in [(r['method'], r.get('error')) for r in world.audit()]


def test_two_clients_using_the_same_ids_get_their_own_replies_and_output(world):
    clients = [RawClient(world.raw_socket()) for _ in range(2)]
    for client in clients:
        client.send('h', 'hello', {'guest': 'alpha'})
    for client in clients:
        assert client.reply('h').result['via'] == 'negotiator-host-daemon'
    for tag, client in zip('XY', clients):
        for request_id, stream in ((7, 'raw'), ('seven', True)):
            client.send(request_id, 'execute', {'command': 'echo-args', 'args': [tag, str(request_id)],
                                                'stream': stream})
    for tag, client in zip('XY', clients):
        for request_id in (7, 'seven'):
            assert client.reply(request_id).result['exit_status'] == 0
            assert client.output(request_id) == ('%s %s\n' % (tag, request_id)).encode()


def test_a_cancel_names_the_clients_own_id_and_reaches_only_its_call(world):
    pids = os.path.join(world.fake.root, 'pids')
    os.mkdir(pids)
    owner, other = RawClient(world.raw_socket()), RawClient(world.raw_socket())
    for client in (owner, other):
        client.send('h', 'hello', {'guest': 'alpha'})
        assert 'result' in client.reply('h').to_wire()
    owner.send('job', 'execute', {'command': 'sleep-pid', 'args': [pids, '60'], 'stream': True})
    pid = _pid_in(pids)
    # Another client's cancel of the same id is about its own requests: there are none.
    other.send('c1', 'cancel', {'id': 'job'})
    assert other.reply('c1').result == {'cancelled': False} and process_alive(pid)
    owner.send('c2', 'cancel', {'id': 'job'})
    assert owner.reply('c2').result == {'cancelled': True}
    result = owner.reply('job').result
    assert result['exit_status'] is None and result['signal'] == 15  # SIGTERM: stopped, not killed
    assert wait_dead(pid)


def test_a_client_that_goes_away_has_its_command_killed_in_the_guest_and_the_others_go_on(world):
    pids = os.path.join(world.fake.root, 'pids')
    os.mkdir(pids)
    leaving, staying = world.attach(), world.attach()
    thread, outcome = _execute_on_a_thread(leaving, 'sleep-pid', pids, '60', timeout=60)
    pid = _pid_in(pids)
    leaving.endpoint.close()
    assert wait_dead(pid)
    thread.join(10)
    assert isinstance(outcome[0], ConnectionClosed)
    assert staying.ping(timeout=10) >= 0 and staying.execute('echo-args', 'still', timeout=10).stdout == b'still\n'
    # The guest answered the cancelled command, and the audit log has its outcome.
    assert wait_until(lambda: ('sleep-pid', 15) in [(r['command'], r.get('signal')) for r in world.audit()
                                                    if r['method'] == 'execute'])


def test_beyond_the_guests_limit_calls_wait_in_a_queue_served_in_turn_by_caller(monkeypatch):
    world = World(monkeypatch, limits=Limits(max_in_flight=1))
    try:
        log, gate = os.path.join(world.fake.root, 'log'), os.path.join(world.fake.root, 'gate')
        clients = {uid: world.attach(uid=uid) for uid in (1001, 1002)}
        calls = [_execute_on_a_thread(clients[1001], 'log-run', log, 'A1', gate, timeout=60)]
        assert wait_until(lambda: os.path.exists(log))
        for queued, (uid, tag) in enumerate(((1001, 'A2'), (1001, 'A3'), (1002, 'B1'), (1002, 'B2'), (1002, 'B3')), 1):
            calls.append(_execute_on_a_thread(clients[uid], 'log-run', log, tag, gate, timeout=60))
            assert wait_until(lambda count=queued: world.queue().queued == count)
        open(gate, 'w').close()
        for thread, _ in calls:
            thread.join(60)
        assert [outcome[0].exit_status for _, outcome in calls] == [0] * 6
        with open(log) as handle:
            assert handle.read().split() == ['A1', 'A2', 'B1', 'A3', 'B2', 'B3']
        assert world.agents['alpha'].connections == 1
    finally:
        world.close()


@pytest.mark.parametrize('how', ['the agent process restarts', 'a session notification'])
def test_an_agent_that_restarts_is_linked_again_and_the_same_clients_calls_work_again(world, how):
    pids = os.path.join(world.fake.root, 'pids')
    os.mkdir(pids)
    client = world.attach()
    old_link = world.daemon.agents['alpha'].link
    thread, outcome = _execute_on_a_thread(client, 'sleep-pid', pids, '60', timeout=60)
    assert wait_until(lambda: os.listdir(pids))
    if how == 'the agent process restarts':
        world.agents['alpha'].stop()
        assert wait_until(lambda: not world.linked('alpha'))
        # Served, but its agent is not there now: a new attach says so (69), not "unknown guest".
        with pytest.raises(ConnectionClosed):
            world.connect().call('hello', {'guest': 'alpha'}, timeout=10)
        world.start_agent('alpha')
    else:
        world.agents['alpha'].endpoint.announce_session({'agent': 'negotiator-guest', 'pid': 4242})
    thread.join(10)
    assert isinstance(outcome[0], ConnectionClosed)
    assert wait_until(lambda: world.linked('alpha'), timeout=10)
    # A new link, with the new agent's hello (the old connection closed, a new one was made).
    assert world.daemon.agents['alpha'].link is not old_link and old_link.endpoint.closed
    assert world.agents['alpha'].connections == (2 if how == 'a session notification' else 1)
    assert client.execute('echo-args', 'again', timeout=10).stdout == b'again\n'
    assert world.attach().ping(timeout=10) >= 0


def test_a_hostile_client_gets_errors_and_never_disturbs_another(world):
    calm = world.attach()
    hostile = RawClient(world.raw_socket())
    hostile.sock.sendall(b'not json at all\n')
    hostile.send('early', 'execute', {'command': 'echo-args'})
    hostile.sock.sendall(b'{"jsonrpc": "2.0", "id": "huge", "method": "hello", "params": {"x": "'
                         + b'y' * local.CLIENT_MAX_LINE_LENGTH + b'"}}\n')
    hostile.send('last', 'ping')
    assert isinstance(hostile.reply('last').error, InvalidRequest)
    errors = [type(e.error) for e in hostile.events if isinstance(e, Response)]
    assert errors == [ParseError, InvalidRequest, MessageTooLarge, InvalidRequest]
    big = io.BytesIO()
    assert calm.execute('bytes', str(2 * 1024 * 1024), stdout=big, timeout=30).exit_status == 0
    assert big.getvalue() == b'x' * (2 * 1024 * 1024)
    hostile.send('h', 'hello', {'guest': 'alpha'})
    assert hostile.reply('h').result['via'] == 'negotiator-host-daemon'


def test_a_client_that_does_not_read_its_output_is_dropped_and_its_command_cancelled(world):
    calm = world.attach()
    sleeper = RawClient(world.raw_socket())
    sleeper.send('h', 'hello', {'guest': 'alpha'})
    assert 'result' in sleeper.reply('h').to_wire()
    sleeper.send('flood', 'execute', {'command': 'bytes', 'args': [str(200 * 1024 * 1024)], 'stream': 'raw',
                                      'timeout': 60})
    assert wait_until(lambda: len(world.daemon.local.clients) == 1, timeout=20)
    assert wait_until(lambda: world.agents['alpha'].endpoint.in_flight == 0, timeout=20)
    assert calm.execute('echo-args', 'fine', timeout=10).stdout == b'fine\n'


def test_connections_beyond_a_uids_bound_are_refused_and_others_still_connect(world, monkeypatch):
    monkeypatch.setattr(local, 'MAX_CLIENTS_PER_UID', 3)
    held = [world.connect(uid=1001) for _ in range(3)]
    assert wait_until(lambda: len(world.daemon.local.clients) == 3)
    extra = RawClient(world.raw_socket(uid=1001))
    refusal = extra.reply(None)
    assert isinstance(refusal.error, LimitExceeded) and 'uid 1001' in str(refusal.error)
    assert extra.sock.recv(10) == b''
    assert world.attach(uid=1002).ping(timeout=10) >= 0
    assert held[0].call('hello', {'guest': 'alpha'}, timeout=10)['via'] == 'negotiator-host-daemon'
    roots = [world.connect() for _ in range(4)]  # root is bounded by MAX_CLIENTS alone
    assert all(root.call('hello', {'guest': 'alpha'}, timeout=10)['via'] == 'negotiator-host-daemon'
               for root in roots)


def test_a_client_refused_for_its_uids_bound_is_told_what_may_be_why(world, monkeypatch):
    monkeypatch.setattr(local, 'MAX_CLIENTS_PER_UID', 1)
    held = world.attach(uid=1001)
    monkeypatch.setattr(Caller, 'from_socket', classmethod(lambda cls, sock: Caller(1001, 1001, 1, 'user1001', [])))
    with pytest.raises(ConnectionClosed, match='refuses a user connections beyond its bound per user'):
        GuestChannel('alpha', socket=world.socket).ping(timeout=10)
    assert held.ping(timeout=10) >= 0


def test_a_caller_the_policy_lets_use_no_guest_gets_small_bounds_and_only_refusals(world):
    line = b'{"jsonrpc": "2.0", "id": "long", "method": "hello", "params": {"x": "%s"}}\n' % (
        b'y' * (local.OUTSIDER_MAX_LINE_LENGTH + 1))
    outsider = RawClient(world.raw_socket(uid=1003))
    outsider.sock.sendall(line)
    outsider.send('daemon', 'hello')
    outsider.send('attach', 'hello', {'guest': 'alpha'})
    assert isinstance(outsider.reply('attach').error, CommandNotAllowed)
    assert outsider.reply('daemon').result['guests'] == []
    assert [type(e.error) for e in outsider.events if isinstance(e, Response) and e.error] == [
        MessageTooLarge, CommandNotAllowed]
    member = RawClient(world.raw_socket(uid=1001))
    member.sock.sendall(line.replace(b'"long"', b'"member"'))
    assert member.reply('member').result['agent'] == 'negotiator-host-daemon'


def test_stopping_cancels_the_local_calls_in_the_guests_answers_them_and_removes_the_socket(monkeypatch):
    world = World(monkeypatch)
    pids = os.path.join(world.fake.root, 'pids')
    os.mkdir(pids)
    client = world.attach()
    try:
        thread, outcome = _execute_on_a_thread(client, 'sleep-pid', pids, '60', timeout=60)
        pid = _pid_in(pids)
    finally:
        world.close()
    thread.join(10)
    # SIGTERM from the guest's cancel (the SIGKILL of a late stop would say 9), and the reply reached the client.
    assert outcome[0].signal == 15 and not process_alive(pid)
    assert not os.path.exists(world.socket)


def test_the_socket_is_0666_in_a_0755_directory_and_a_stale_one_is_replaced_a_live_one_refused(tmp_path):
    path = os.path.join(short_tempdir(), 'made', 'host.sock')
    sock = open_local_socket(path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    with pytest.raises(LocalSocketError) as live:
        open_local_socket(path)
    assert 'another negotiator-host daemon' in str(live.value)
    sock.close()  # the file stays behind, as when a daemon dies
    open_local_socket(path).close()
    not_a_socket = str(tmp_path / 'file')
    open(not_a_socket, 'w').close()
    with pytest.raises(LocalSocketError):
        open_local_socket(not_a_socket)
    assert os.path.isfile(not_a_socket)


def test_a_daemon_whose_socket_is_taken_stops_at_start_with_the_reason():
    path = os.path.join(short_tempdir(), 'host.sock')
    taken = open_local_socket(path)
    daemon = HostDaemon(commands_dirs=[], watch=False, socket_path=path, paths=LibvirtPaths(None, None),
                        caller_policy=CallerPolicy(), audit=AuditLog(None), caller_of=caller_of)
    with pytest.raises(LocalSocketError):
        daemon.run()
    taken.close()


def test_only_the_spec_fields_of_a_guests_output_reach_a_client():
    assert client_output({'stream': 'stdout', 'data': 'hi', 'id': 3, 'evil': 'x'}, 'mine')[0].params == {
        'id': 'mine', 'stream': 'stdout', 'data': 'hi'}
    raw, size = client_output({'stream': 'stderr', 'size': 2, 'data_raw': b'\0\n', 'id': 3}, 7)
    assert (raw.params, raw.attachment, size) == ({'id': 7, 'stream': 'stderr'}, b'\0\n', 2)
    for junk in ({'stream': 1, 'data': 'x'}, {'stream': 'stdout'}, {'stream': 'stdout', 'data': 5},
                 {'stream': 'stdout', 'data': 'a', 'data_b64': 'YQ=='}):
        assert client_output(junk, 1) is None


def test_the_daemons_options_of_the_socket_the_callers_and_the_audit_log():
    from negotiator_host.cli import UsageError, parse_options

    options = parse_options(['--daemon', '--socket', '/tmp/x.sock', '--allow-group', 'ops', '--allow-group',
                             'dev=web-*,db-?', '--audit-log', ''])
    assert (options.socket, options.allow_groups, options.audit_log) == ('/tmp/x.sock', ['ops', 'dev=web-*,db-?'], '')
    assert parse_options(['--daemon']).audit_log is None
    assert parse_options(['--daemon', '--socket', '', '--audit-log', '']).socket == ''
    for wrong, message in (
            (['--ping', 'web-1', '--allow-group', 'ops'], '--allow-group is an option of --daemon'),
            (['--ping', 'web-1', '--audit-log', '/tmp/a'], '--audit-log is an option of --daemon'),
            (['--ping', 'web-1', '--socket', ''], "--socket '' is for --daemon"),
            (['--daemon', '--socket', '', '--allow-group', 'ops'], "--allow-group is an option of the daemon's socket"),
            (['--daemon', '--socket', '', '--audit-log', '/tmp/a'], "--audit-log is an option of the daemon's socket")):
        with pytest.raises(UsageError, match=re.escape(message)):
            parse_options(wrong)


def test_a_daemon_without_a_socket_opens_no_audit_log(monkeypatch):
    # --socket '' (a daemon beside the one that serves callers): no socket, and not the default
    # audit log either, which would make /var/log/negotiator for nothing.
    from negotiator_host import cli, daemon

    made = []

    class Recorder(object):
        def __init__(self, **kwargs):
            made.append(kwargs)

        def run(self):
            return 0

    monkeypatch.setattr(daemon, 'HostDaemon', Recorder)
    assert cli.run(['--daemon', '--socket', '', '-q']) == 0
    assert made[0]['socket_path'] is None and made[0]['audit'].path is None
    monkeypatch.setenv('NEGOTIATOR_HOST_SOCKET', '/run/elsewhere.sock')
    assert cli.run(['--daemon', '--audit-log', '', '-q']) == 0
    assert made[1]['socket_path'] == '/run/elsewhere.sock'


def test_a_daemon_without_a_socket_serves_the_guests_requests_and_leaves_their_agents_alone(monkeypatch):
    fake = FakeLibvirt().activate(monkeypatch)
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    fake.add_running('alpha', 1)
    agent = FakeGuestAgent(fake.socket_path('alpha', 1, 'negotiator-host-to-guest.0'), commands, name='alpha')
    guest = FakeGuestSide(fake.socket_path('alpha', 1, GUEST_TO_HOST_CHANNEL))
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--socket', '', '--commands-dir',
                                commands], env=fake.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert guest.accept(timeout=20).execute('whoami-guest').stdout == b'alpha\n'
        # No socket where the environment points, and the guest's agent is a direct caller's.
        assert not os.path.exists(fake.daemon_socket) and agent.connections == 0
        with GuestChannel('alpha', timeout=10) as channel:
            assert channel.ping() >= 0 and channel.via == 'direct'
        assert agent.connections == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert b'local clients' not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        guest.close()
        agent.stop()
        fake.cleanup()


def _daemon_cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'negotiator_host', '--daemon'] + list(args), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)


def test_the_daemon_refuses_an_unknown_group_and_a_socket_taken_by_another_daemon(tmp_path):
    process = _daemon_cli('--allow-group', 'no-such-group-ngt=web-*', '--audit-log', '')
    assert process.returncode == 64 and b"'no-such-group-ngt=web-*'" in process.stderr
    path = os.path.join(short_tempdir(), 'host.sock')
    taken = open_local_socket(path)
    try:
        process = _daemon_cli('--socket', path, '--audit-log', '', '--connect', 'qemu:///nowhere')
    finally:
        taken.close()
    assert process.returncode == 69 and b'another negotiator-host daemon listens on' in process.stderr


def test_the_daemon_program_serves_its_socket_audits_the_calls_and_stops_on_sigterm(monkeypatch):
    fake = FakeLibvirt().activate(monkeypatch)
    commands = make_commands_dir(fake.root, GUEST_COMMANDS)
    fake.add_running('alpha', 1)
    agent = FakeGuestAgent(fake.socket_path('alpha', 1, 'negotiator-host-to-guest.0'), commands, name='alpha')
    audit = os.path.join(fake.root, 'audit', 'audit.log')
    process = subprocess.Popen([sys.executable, '-m', 'negotiator_host', '--daemon', '--commands-dir', commands,
                                '--audit-log', audit], env=fake.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # The socket is where the environment says (the clients look there too), open to all.
        assert wait_until(lambda: os.path.exists(fake.daemon_socket), timeout=20)
        assert stat.S_IMODE(os.stat(fake.daemon_socket).st_mode) == 0o666
        endpoint = Endpoint(Transport.from_socket(_connected(fake.daemon_socket)), name='client').start()
        linked = [{'name': 'alpha', 'connected': True}]
        assert wait_until(lambda: endpoint.call('hello', timeout=10)['guests'] == linked, timeout=20)
        client = AgentClient(endpoint, endpoint.call('hello', {'guest': 'alpha'}, timeout=10))
        assert client.execute('echo-args', 'via', 'the', 'daemon', timeout=10).stdout == b'via the daemon\n'
        endpoint.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
        assert not os.path.exists(fake.daemon_socket)
        with open(audit) as handle:
            record = json.loads(handle.readline())
        assert (record['uid'], record['guest'], record['command'], record['args'], record['exit_status']) == (
            os.getuid(), 'alpha', 'echo-args', ['via', 'the', 'daemon'], 0)
        assert stat.S_IMODE(os.stat(audit).st_mode) == 0o640
    finally:
        if process.poll() is None:
            process.kill()
        agent.stop()
        fake.cleanup()


def _connected(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def test_the_systemd_unit_makes_the_sockets_directory_and_outwaits_the_daemons_stop():
    from negotiator_common.stopping import REPLY_MOMENT
    from negotiator_host import connections

    unit = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'negotiator-host', 'contrib',
                        'negotiator-host.service')
    with open(unit) as handle:
        lines = dict(line.strip().split('=', 1) for line in handle if '=' in line and not line.startswith('#'))
    assert os.path.dirname(local_socket.DEFAULT_SOCKET) == '/run/' + lines['RuntimeDirectory']
    assert lines['RuntimeDirectoryMode'] == '0755' and lines['LogsDirectoryMode'] == '0750'
    # Each side's stop is bounded (grace, then SIGKILL and its wait, then a moment for the replies).
    stops = [(connections.STOP_GRACE, connections.STOP_KILL_WAIT), (local.STOP_GRACE, local.STOP_KILL_WAIT)]
    assert float(lines['TimeoutStopSec']) > sum(grace + 2 * kill_wait + REPLY_MOMENT for grace, kill_wait in stops)
