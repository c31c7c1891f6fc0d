"""
Who may call through the host daemon's socket: the caller as the kernel sees it (SO_PEERCRED),
and the ``--allow-group`` policy. The tests run as root: one forks a child that runs as ``nobody``,
one makes a throwaway user and group (removed at the end).
"""

import grp
import json
import os
import pwd
import socket
import subprocess
import uuid

import pytest

from negotiator_host.access import Caller, CallerPolicy

from support import short_tempdir

NOBODY = pwd.getpwnam('nobody')
NOBODY_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name

CLAIM = json.dumps({'uid': 0, 'user': 'root', 'pid': 1, 'groups': ['root']}).encode() + b'\n'
"""What a client running as nobody claims to be; it must count for nothing."""


FORK_WAIT = 30.0
"""
Seconds that each side of the forked test waits for the other at most. Without a bound, a
failure in the parent between the fork and its answer (an ``accept`` that fails under memory
pressure, say) left it waiting for the child while it still listened, and the child, queued on
that socket, waiting for the answer: both for ever.
"""


def nobody_caller() -> Caller:
    return Caller.from_ids(NOBODY.pw_uid, NOBODY.pw_gid, 4242)


@pytest.fixture
def member():
    """A throwaway user whose primary group is nobody's and whose supplementary group is a new one."""
    suffix = uuid.uuid4().hex[:8]
    group, user = 'ngt-g%s' % suffix, 'ngt-u%s' % suffix
    subprocess.check_call(['groupadd', group])
    try:
        subprocess.check_call(['useradd', '--no-create-home', '--no-user-group', '--gid', str(NOBODY.pw_gid),
                               '--groups', group, '--shell', '/usr/sbin/nologin', user])
        try:
            yield pwd.getpwnam(user), group
        finally:
            subprocess.check_call(['userdel', user])
    finally:
        subprocess.check_call(['groupdel', group])


def test_a_socketpair_peer_is_this_process():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        caller = Caller.from_socket(ours)
    assert (caller.uid, caller.gid, caller.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert caller.user == pwd.getpwuid(os.getuid()).pw_name
    assert grp.getgrgid(os.getgid()).gr_name in caller.groups
    assert caller.describe() == 'uid %d (%s)' % (caller.uid, caller.user)


def test_a_connection_accepted_on_a_listening_socket_is_seen_as_its_client():
    path = os.path.join(short_tempdir(), 'host.sock')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with server, client:
        server.bind(path)
        server.listen(1)
        client.connect(path)
        connection, _ = server.accept()
        with connection:
            caller = Caller.from_socket(connection)
    assert (caller.uid, caller.pid) == (os.getuid(), os.getpid())


def test_a_client_running_as_another_user_is_that_user_whatever_it_claims():
    directory = short_tempdir()
    os.chmod(directory, 0o755)
    path = os.path.join(directory, 'host.sock')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.settimeout(FORK_WAIT)
        server.bind(path)
        os.chmod(path, 0o666)
        server.listen(1)
        child = os.fork()
        if child == 0:
            server.close()  # the child's copy: once the parent closes its own, nobody listens
            claim_as_nobody(path)
        try:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(FORK_WAIT)
                claim = json.loads(connection.makefile('rb').readline().decode())
                caller = Caller.from_socket(connection)
                connection.sendall(b'.')
        finally:
            # Closed before the wait: whatever failed here, the child's connection is refused or
            # reset, so the child exits instead of waiting for an answer that will never come.
            server.close()
            status = os.waitpid(child, 0)[1]
    assert status == 0
    assert claim['uid'] == 0 and claim['user'] == 'root'
    assert (caller.uid, caller.gid, caller.pid, caller.user) == (NOBODY.pw_uid, NOBODY.pw_gid, child, 'nobody')
    assert NOBODY_GROUP in caller.groups and 'root' not in caller.groups
    assert not CallerPolicy().allows(caller, 'web-1')


def claim_as_nobody(path: str) -> None:
    """In a forked child: become nobody, connect, claim to be root, wait for the answer, exit (1 on any error)."""
    status = 1
    try:
        os.setgroups([])
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(FORK_WAIT)
            client.connect(path)
            client.sendall(CLAIM)
            status = 0 if client.recv(1) == b'.' else 1
    finally:
        os._exit(status)


def test_peer_credentials_need_a_unix_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(ValueError, match='UNIX socket'):
            Caller.from_socket(sock)


def test_ids_without_names_are_kept_as_numbers():
    uid, gid = unused_id(pwd.getpwuid), unused_id(grp.getgrgid)
    caller = Caller.from_ids(uid, gid, 7)
    assert caller.user == str(uid) and caller.groups == frozenset([str(gid)])
    assert caller.describe() == 'uid %d' % uid


def unused_id(lookup) -> int:
    for number in range(54321, 60000):
        try:
            lookup(number)
        except KeyError:
            return number
    raise AssertionError('no unused id between 54321 and 60000')


def test_the_groups_are_every_group_of_the_user(member):
    entry, group = member
    caller = Caller.from_ids(entry.pw_uid, entry.pw_gid, 7)
    assert caller.user == entry.pw_name
    assert caller.groups == frozenset([NOBODY_GROUP, group])


def test_root_may_use_every_guest_and_nobody_else_by_default():
    policy = CallerPolicy.from_options([])
    assert policy.allows(Caller.from_ids(0, 0, 1), 'web-1')
    assert policy.allows(Caller.from_ids(0, NOBODY.pw_gid, 1), 'anything')
    assert not policy.allows(nobody_caller(), 'web-1')


def test_a_member_of_a_named_group_may_use_the_guests_of_its_patterns(member):
    entry, group = member
    caller = Caller.from_ids(entry.pw_uid, entry.pw_gid, 7)
    policy = CallerPolicy.from_options(['%s=web-*,db-[0-9]' % group])
    assert policy.allows(caller, 'web-1') and policy.allows(caller, 'db-7')
    assert not policy.allows(caller, 'WEB-1')  # case-sensitive, as the guest policy
    assert not policy.allows(caller, 'db-10') and not policy.allows(caller, 'mail')
    # nobody shares the primary group but not the named one
    assert not policy.allows(nobody_caller(), 'web-1')


def test_a_group_named_alone_allows_every_guest_and_repeated_groups_add_up():
    caller = nobody_caller()
    assert CallerPolicy.from_options([NOBODY_GROUP]).allows(caller, 'any guest at all')
    policy = CallerPolicy.from_options(['%s=web-*' % NOBODY_GROUP, '%s=db' % NOBODY_GROUP])
    assert policy.allows(caller, 'web-2') and policy.allows(caller, 'db') and not policy.allows(caller, 'mail')
    assert CallerPolicy([(NOBODY_GROUP, ['mail'])]).allows(caller, 'mail')


def test_another_groups_rules_do_not_apply():
    policy = CallerPolicy.from_options(['root=*', '%s=web-*' % NOBODY_GROUP])
    assert not policy.allows(nobody_caller(), 'db-1')


def test_a_refusal_says_who_which_guest_and_which_option_and_nothing_of_other_rules():
    policy = CallerPolicy.from_options(['root=secret-*', '%s=web-*' % NOBODY_GROUP])
    message = policy.refusal(nobody_caller(), 'db-1')
    assert 'uid %d (nobody)' % NOBODY.pw_uid in message and "'db-1'" in message
    assert '--allow-group' in message and 'GROUP=PATTERN' in message
    assert 'secret' not in message and 'web-' not in message and NOBODY_GROUP not in message


def test_a_refusal_of_a_hostile_guest_name_stays_one_short_line():
    message = CallerPolicy().refusal(nobody_caller(), 'x\n' * 100000 + '\x1b[31m')
    assert '\n' not in message and '\x1b' not in message and len(message) < 600


@pytest.mark.parametrize('value', [
    '', '=web-*', ' =web-*', 'GROUP_MISSING_ngt', 'GROUP_MISSING_ngt=web-*', '65534',
    'NOBODY=', 'NOBODY=web-*,', 'NOBODY=,web-*', 'NOBODY=web-*,,db', 'NOBODY= web-*', 'NOBODY=web-* ',
])
def test_a_bad_allow_group_value_is_an_error_that_names_it(value):
    value = value.replace('NOBODY', NOBODY_GROUP)
    with pytest.raises(ValueError) as raised:
        CallerPolicy.from_options(['root', value])
    assert repr(value) in str(raised.value)


def test_rules_given_directly_are_checked_too():
    with pytest.raises(ValueError, match='no group'):
        CallerPolicy([('GROUP_MISSING_ngt', ['*'])])
    with pytest.raises(ValueError, match='no guest pattern'):
        CallerPolicy([(NOBODY_GROUP, [])])
