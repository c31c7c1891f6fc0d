"""
The host daemon's local socket: many local callers share one connection to each guest (no VM).

A fake libvirt lists the guests; each runs a real agent (FakeGuestAgent, one client at a time as
QEMU's chardev socket); the daemon runs its main loop on a thread, and the test's clients connect
to its socket. A client names the uid it plays in its socket's abstract address (``caller_of``):
the kernel would say the test's own uid for all of them.
"""

import io
import os
import socket
import stat
import threading

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import (
    ChannelNotFound, CommandNotAllowed, ConnectionClosed, InvalidParams, InvalidRequest, LimitExceeded,
    MessageTooLarge, ParseError,
)
from negotiator_common.protocol import LineDecoder, Notification, Request, Response, encode_message
from negotiator_common.service import Limits
from negotiator_common.transport import Transport
from negotiator_host import local
from negotiator_host.daemon import HostDaemon
from negotiator_host.discovery import LibvirtPaths
from negotiator_host.local import LocalSocketError, open_local_socket
from negotiator_host.proxy import client_output

from fake_libvirt import FakeLibvirt
from support import GUEST_COMMANDS, FakeGuestAgent, make_commands_dir, result_or_error, short_tempdir
from waiting import process_alive, wait_dead, wait_until

GUESTS = ('alpha', 'beta')


class Caller(object):
    """Stands in for negotiator_host.access.Caller (the access branch brings the real one)."""

    def __init__(self, uid):
        self.uid = self.gid = uid
        self.pid = os.getpid()
        self.user = 'root' if uid == 0 else 'user%d' % uid
        self.groups = frozenset()

    def describe(self):
        return 'uid %d (%s)' % (self.uid, self.user)


class Policy(object):
    """Stands in for negotiator_host.access.CallerPolicy: root, and the (uid, guest) pairs given."""

    def __init__(self, allowed=()):
        self.allowed = set(allowed)

    def allows(self, caller, guest):
        return caller.uid == 0 or (caller.uid, guest) in self.allowed

    def refusal(self, caller, guest):
        return '%s may not use guest %s' % (caller.describe(), guest)


class Audit(object):
    """Stands in for negotiator_host.audit.AuditLog: keeps the records."""

    def __init__(self):
        self.records = []

    def record(self, caller, guest, method, params, outcome, seconds):
        self.records.append((caller.uid, guest, method, dict(params), outcome))

    def close(self):
        pass


def caller_of(sock):
    """The caller a test client plays: the uid in its abstract address, else root."""
    name = sock.getpeername()
    if isinstance(name, bytes) and name.startswith(b'\0nh-uid-'):
        return Caller(int(name.split(b'-')[2]))
    return Caller(0)


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
        self.socket = os.path.join(short_tempdir(), 'run', 'host.sock')
        self.policy = Policy({(1001, 'alpha'), (1002, 'alpha')})
        self.audit = Audit()
        self.daemon = HostDaemon(commands_dirs=[self.commands], watch=False, socket_path=self.socket,
                                 paths=LibvirtPaths(self.fake.status_dir, self.fake.channel_dir),
                                 caller_policy=self.policy, audit=self.audit, caller_of=caller_of)
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
    assert [r[2] for r in world.audit.records].count('execute') == 8


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
    assert str(refused.value) == 'uid 1003 (user1003) may not use guest alpha'
    assert [(uid, guest, method, type(outcome)) for uid, guest, method, _, outcome in world.audit.records] == [
        (1003, 'alpha', 'hello', CommandNotAllowed)]
    # A refused caller may not reach a guest it does not name either (no hint that it exists).
    with pytest.raises(CommandNotAllowed):
        world.connect(uid=1003).call('hello', {'guest': 'gamma'}, timeout=10)
    # After all that, the connection attaches as usual.
    assert endpoint.call('hello', {'guest': 'beta'}, timeout=10)['via'] == 'negotiator-host-daemon'
    assert endpoint.call('ping', timeout=10)['time'] > 0


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
    assert wait_until(lambda: any(method == 'execute' and isinstance(out, dict) and out.get('signal')
                                  for _, _, method, _, out in world.audit.records))


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
                        caller_policy=Policy(), audit=Audit(), caller_of=caller_of)
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
