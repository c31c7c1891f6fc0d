"""
Files pushed into an agent and pulled out of it (``docs/protocol.rst``, "Files"): a real agent
(AgentService with a FileService) and a client over a socket pair, no VM. The switch and its
prefixes, atomic writes with mode and checksum, no partial file after a failure, directory trees
with modes and symlinks, archives that try to leave their tree, errors that name the path and
the reason, and an agent without ``files`` answered cleanly.
"""

import io
import os
import socket
import stat
import tarfile
import threading
import zlib

import pytest

from negotiator_common.client import AgentClient
from negotiator_common.commands import CommandRegistry
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ChecksumMismatch, CommandNotAllowed, FileError
from negotiator_common.exit_status import exit_status_for
from negotiator_common.fileservice import FileService
from negotiator_common.files import AtomicTree, extract_tree, open_directory
from negotiator_common.protocol import RAW_INPUT_METHOD, Notification
from negotiator_common.service import AgentService
from negotiator_common.transport import Transport
from support import GUEST_COMMANDS, make_commands_dir

MIB = 1024 * 1024


class Connection(object):
    """An agent whose files are allowed under ``prefixes`` (None: off), and a client over a socket pair."""

    def __init__(self, tmp_path, prefixes):
        registry = CommandRegistry([make_commands_dir(str(tmp_path / 'commands'), GUEST_COMMANDS)])
        self.service = AgentService('negotiator-guest', registry, files=FileService(prefixes))
        theirs, ours = socket.socketpair()
        self.server = Endpoint(Transport.from_socket(theirs), self.service.dispatcher(), name='agent').start()
        self.endpoint = Endpoint(Transport.from_socket(ours), name='client').start()
        self.hello = self.endpoint.handshake(30)
        self.agent = AgentClient(self.endpoint, self.hello)

    def close(self):
        self.endpoint.close()
        self.server.close()


@pytest.fixture
def guest(tmp_path):
    (tmp_path / 'guest').mkdir()
    (tmp_path / 'host').mkdir()
    connection = Connection(tmp_path, [str(tmp_path / 'guest')])
    yield connection
    connection.close()


def leftovers(directory):
    return sorted(name for name in os.listdir(str(directory)) if '.negotiator-' in name)


def files_being_written(directory):
    """The files this process writes in ``directory`` without a name yet (``O_TMPFILE``: ``/proc`` shows ``#N``)."""
    prefix = os.path.join(str(directory), '#')
    found = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink('/proc/self/fd/' + fd)
        except OSError:
            continue
        if target.startswith(prefix):
            found.append(target)
    return found


def test_hello_lists_files_only_when_the_owner_switched_it_on(tmp_path):
    off = Connection(tmp_path, None)
    try:
        assert 'files' not in off.hello['capabilities']
        with pytest.raises(CommandNotAllowed, match='--allow-files'):
            off.agent.push(io.BytesIO(b'x'), str(tmp_path / 'x'))
        # Asked anyway (a client that ignores hello): the agent refuses, naming the switch.
        off.agent.files = True
        with pytest.raises(CommandNotAllowed, match='--allow-files'):
            off.agent.push(io.BytesIO(b'x'), str(tmp_path / 'x'))
        with pytest.raises(CommandNotAllowed, match='--allow-files'):
            off.agent.pull(str(tmp_path / 'x'), io.BytesIO())
        assert not (tmp_path / 'x').exists()
    finally:
        off.close()


def test_a_file_pushed_and_pulled_comes_back_byte_for_byte_with_its_mode(guest, tmp_path):
    data = os.urandom(3 * MIB + 17) + b'\n\x1b\x1bn\n'
    source = tmp_path / 'host' / 'app.bin'
    source.write_bytes(data)
    os.chmod(str(source), 0o640)
    reply = guest.agent.push(str(source), str(tmp_path / 'guest') + '/')
    pushed = tmp_path / 'guest' / 'app.bin'
    assert reply['path'] == str(pushed) and reply['size'] == len(data)
    assert reply['crc32'] == '%08x' % zlib.crc32(data)
    assert pushed.read_bytes() == data and stat.S_IMODE(pushed.stat().st_mode) == 0o640
    back = tmp_path / 'host' / 'back.bin'
    reply = guest.agent.pull(str(pushed), str(back))
    assert back.read_bytes() == data and reply['type'] == 'file' and stat.S_IMODE(back.stat().st_mode) == 0o640
    assert leftovers(tmp_path / 'guest') == [] and leftovers(tmp_path / 'host') == []


def test_empty_files_and_file_objects_and_explicit_modes(guest, tmp_path):
    target = tmp_path / 'guest' / 'empty'
    guest.agent.push(io.BytesIO(b''), str(target), mode=0o600)
    assert target.read_bytes() == b'' and stat.S_IMODE(target.stat().st_mode) == 0o600
    sink = io.BytesIO()
    assert guest.agent.pull(str(target), sink)['size'] == 0 and sink.getvalue() == b''


def test_progress_is_reported_as_the_bytes_go(guest, tmp_path):
    seen = []
    guest.agent.push(io.BytesIO(b'a' * MIB), str(tmp_path / 'guest' / 'f'),
                     progress=lambda done, total: seen.append(done))
    assert seen and seen[-1] == MIB and seen == sorted(seen)


def test_paths_outside_the_prefixes_are_refused_after_resolving_symlinks(guest, tmp_path):
    os.symlink(str(tmp_path / 'host'), str(tmp_path / 'guest' / 'out'))
    for target in (str(tmp_path / 'host' / 'f'), str(tmp_path / 'guest' / 'out' / 'f'),
                   str(tmp_path / 'guest' / '..' / 'host' / 'f')):
        with pytest.raises(CommandNotAllowed, match='outside'):
            guest.agent.push(io.BytesIO(b'x'), target)
    (tmp_path / 'host' / 'secret').write_bytes(b'secret')
    with pytest.raises(CommandNotAllowed):
        guest.agent.pull(str(tmp_path / 'guest' / 'out' / 'secret'), io.BytesIO())
    assert not (tmp_path / 'host' / 'f').exists()


def test_errors_name_the_path_and_the_reason(guest, tmp_path):
    missing = str(tmp_path / 'guest' / 'missing')
    with pytest.raises(FileError) as error:
        guest.agent.pull(missing, io.BytesIO())
    assert error.value.reason == 'ENOENT' and error.value.data['path'] == missing and missing in str(error.value)
    with pytest.raises(FileError) as error:
        guest.agent.push(io.BytesIO(b'x'), str(tmp_path / 'guest' / 'no' / 'dir' / 'f'))
    assert error.value.reason == 'ENOENT'
    (tmp_path / 'guest' / 'd').mkdir()
    with pytest.raises(FileError) as error:
        guest.agent.pull(str(tmp_path / 'guest' / 'd'), io.BytesIO())
    assert error.value.reason == 'EISDIR'


def test_a_checksum_that_does_not_match_leaves_no_file(guest, tmp_path):
    # A sender whose end of input names another CRC-32 than its bytes': the agent keeps nothing.
    from negotiator_common import transfers
    original = transfers._Tally.add

    def corrupting(self, data):
        original(self, data + b'!')
    transfers._Tally.add = corrupting
    try:
        with pytest.raises(ChecksumMismatch):
            guest.agent.push(io.BytesIO(b'payload'), str(tmp_path / 'guest' / 'f'))
    finally:
        transfers._Tally.add = original
    assert os.listdir(str(tmp_path / 'guest')) == []


def test_a_failed_source_mid_transfer_leaves_no_partial_file_and_the_connection_serves_on(guest, tmp_path):
    def failing():
        yield b'x' * MIB
        raise OSError(5, 'the disk under the source failed')
    with pytest.raises(OSError, match='disk under the source'):
        guest.agent.push(failing(), str(tmp_path / 'guest' / 'f'))
    assert os.listdir(str(tmp_path / 'guest')) == []
    assert guest.agent.ping(5) >= 0


def test_a_pushed_file_replaces_the_old_one_whole(guest, tmp_path):
    target = tmp_path / 'guest' / 'conf'
    target.write_bytes(b'old')
    os.chmod(str(target), 0o600)
    guest.agent.push(io.BytesIO(b'new contents'), str(target))
    assert target.read_bytes() == b'new contents' and stat.S_IMODE(target.stat().st_mode) == 0o600


def make_tree(root):
    (root / 'sub' / 'deeper').mkdir(parents=True)
    (root / 'sub' / 'script.sh').write_bytes(b'#!/bin/sh\necho hi\n')
    os.chmod(str(root / 'sub' / 'script.sh'), 0o750)
    (root / 'data.bin').write_bytes(os.urandom(200000))
    (root / 'empty').write_bytes(b'')
    os.symlink('sub/script.sh', str(root / 'link'))
    os.chmod(str(root / 'sub' / 'deeper'), 0o700)


def describe(root):
    found = {}
    for top, directories, files in os.walk(str(root)):
        for name in directories + files:
            path = os.path.join(top, name)
            status = os.lstat(path)
            relative = os.path.relpath(path, str(root))
            if stat.S_ISLNK(status.st_mode):
                found[relative] = ('link', os.readlink(path))
            elif stat.S_ISDIR(status.st_mode):
                found[relative] = ('dir', stat.S_IMODE(status.st_mode))
            else:
                found[relative] = ('file', stat.S_IMODE(status.st_mode), open(path, 'rb').read())
    return found


def test_a_tree_pushed_and_pulled_keeps_its_files_modes_and_symlinks(guest, tmp_path):
    tree = tmp_path / 'host' / 'app'
    tree.mkdir()
    make_tree(tree)
    guest.agent.push(str(tree), str(tmp_path / 'guest') + '/', recursive=True)
    assert describe(tmp_path / 'guest' / 'app') == describe(tree)
    back = tmp_path / 'host' / 'back'
    reply = guest.agent.pull(str(tmp_path / 'guest' / 'app'), str(back), recursive=True)
    assert reply['type'] == 'directory' and describe(back) == describe(tree)
    assert leftovers(tmp_path / 'guest') == [] and leftovers(tmp_path / 'host') == []


def test_a_directory_needs_recursive_and_a_recursive_pull_of_a_file_copies_the_file(guest, tmp_path):
    with pytest.raises(FileError, match='recursively'):
        guest.agent.push(str(tmp_path / 'host'), str(tmp_path / 'guest' / 'x'))
    (tmp_path / 'guest' / 'f').write_bytes(b'file')
    guest.agent.pull(str(tmp_path / 'guest' / 'f'), str(tmp_path / 'host' / 'f'), recursive=True)
    assert (tmp_path / 'host' / 'f').read_bytes() == b'file'


def test_a_pushed_tree_never_replaces_a_directory_that_holds_something(guest, tmp_path):
    tree = tmp_path / 'host' / 'app'
    tree.mkdir()
    (tree / 'new').write_bytes(b'new')
    (tmp_path / 'guest' / 'app').mkdir()
    (tmp_path / 'guest' / 'app' / 'old').write_bytes(b'old')
    with pytest.raises(FileError) as error:
        guest.agent.push(str(tree), str(tmp_path / 'guest'), recursive=True)  # into guest/, as guest/app
    assert error.value.reason in ('ENOTEMPTY', 'EEXIST')
    assert os.listdir(str(tmp_path / 'guest')) == ['app'] and os.listdir(str(tmp_path / 'guest' / 'app')) == ['old']


def archive(*members):
    """A tar stream of (TarInfo, bytes or None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name, kind=tarfile.REGTYPE, linkname='', mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info


def _extract(data, tmp_path):
    """Extract ``data`` into a tree under ``tmp_path/parent``: it must fail and leave nothing; its error is returned."""
    parent = tmp_path / 'parent'
    parent.mkdir()
    fd = open_directory(str(parent))
    try:
        tree = AtomicTree(fd, 'tree', str(parent / 'tree'))
        with pytest.raises(FileError) as error:
            extract_tree(io.BytesIO(data), tree)
        tree.abort()
    finally:
        os.close(fd)
    assert os.listdir(str(parent)) == []
    return error.value


@pytest.mark.parametrize('members', [
    [(member('/etc/evil'), b'x')],
    [(member('../evil'), b'x')],
    [(member('a/../../evil'), b'x')],
    [(member('up', tarfile.SYMTYPE, '../..'), None)],
    [(member('abs', tarfile.SYMTYPE, '/etc'), None)],
    [(member('link', tarfile.SYMTYPE, '.'), None), (member('link/../../evil'), b'x')],
    [(member('d', tarfile.DIRTYPE), None), (member('d/l', tarfile.SYMTYPE, '../..'), None)],
    [(member('dev', tarfile.CHRTYPE), None)],
    [(member('fifo', tarfile.FIFOTYPE), None)],
    [(member('hard', tarfile.LNKTYPE, 'etc/passwd'), None)],
], ids=['absolute', 'dotdot', 'inner-dotdot', 'link-up', 'link-absolute', 'through-link', 'nested-link-up',
        'device', 'fifo', 'hardlink'])
def test_an_archive_that_would_leave_its_tree_is_refused_and_leaves_nothing(tmp_path, members):
    error = _extract(archive(*members), tmp_path)
    assert error.reason in ('unsafe', 'ENOTDIR', 'ELOOP')
    assert os.listdir(str(tmp_path)) == ['parent']


def test_a_symlink_inside_an_archive_cannot_carry_a_later_member_through_it(tmp_path):
    # A symlink that stays inside the tree, then a member written "through" it: refused, since
    # every step of a member's path must be a directory of the tree itself.
    parent = tmp_path / 'parent'
    parent.mkdir()
    fd = open_directory(str(parent))
    try:
        tree = AtomicTree(fd, 'tree', str(parent / 'tree'))
        stream = archive((member('d', tarfile.DIRTYPE), None), (member('l', tarfile.SYMTYPE, 'd'), None),
                         (member('l/f'), b'x'))
        with pytest.raises(FileError):
            extract_tree(io.BytesIO(stream), tree)
        tree.abort()
    finally:
        os.close(fd)
    assert os.listdir(str(parent)) == []


def test_a_client_ignoring_the_switch_gets_no_partial_file_when_it_breaks_the_window(guest, tmp_path):
    # More input than the room granted: -32600, and nothing is written.
    from negotiator_common.errors import InvalidRequest
    results = []

    def flood(params):
        for _ in range(3):
            guest.endpoint.notify(Notification(RAW_INPUT_METHOD, {'id': params['id']}, attachment=b'x' * 200000))
    with pytest.raises(InvalidRequest):
        results.append(guest.endpoint.call('push', {'path': str(tmp_path / 'guest' / 'f')}, timeout=10,
                                           on_credit=flood))
    assert os.listdir(str(tmp_path / 'guest')) == []


def test_push_and_pull_go_through_the_host_daemon_end_to_end_and_are_audited(monkeypatch, tmp_path):
    from support import FakeGuestAgent
    from test_host_local import World
    from waiting import wait_until
    world = World(monkeypatch)
    try:
        shared = tmp_path / 'guest'
        shared.mkdir()
        world.agents['alpha'].stop()
        path = world.fake.socket_path('alpha', 1, 'negotiator-host-to-guest.0')
        world.agents['alpha'] = FakeGuestAgent(path, world.commands, name='alpha', files=[str(shared)])
        assert wait_until(lambda: world.linked('alpha') and world.daemon.agents['alpha'].link.can_cancel
                          and 'files' in world.daemon.agents['alpha'].link.hello['capabilities'], timeout=20)
        client = world.attach()
        data = os.urandom(5 * MIB + 3)
        client.push(io.BytesIO(data), str(shared / 'big'))
        assert (shared / 'big').read_bytes() == data
        sink = io.BytesIO()
        client.pull(str(shared / 'big'), sink)
        assert sink.getvalue() == data
        tree = tmp_path / 'tree'
        tree.mkdir()
        make_tree(tree)
        client.push(str(tree), str(shared), recursive=True)
        client.pull(str(shared / 'tree'), str(tmp_path / 'back'), recursive=True)
        assert describe(tmp_path / 'back') == describe(tree)
        records = [record for record in world.audit() if record['method'] in ('push', 'pull')]
        assert [(record['method'], record['path']) for record in records][:2] == [
            ('push', str(shared / 'big')), ('pull', str(shared / 'big'))]
        with pytest.raises(CommandNotAllowed):
            client.push(io.BytesIO(b'x'), str(tmp_path / 'elsewhere'))
    finally:
        world.close()


def test_a_full_disk_is_reported_with_its_reason_and_leaves_no_file(guest, tmp_path, monkeypatch):
    import errno
    from negotiator_common import files

    def full(self, data):
        raise files.file_error(self.path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(files.AtomicFile, 'write', full)
    with pytest.raises(FileError) as error:
        guest.agent.push(io.BytesIO(b'x' * MIB), str(tmp_path / 'guest' / 'f'))
    assert error.value.reason == 'ENOSPC' and 'No space left' in str(error.value)
    assert os.listdir(str(tmp_path / 'guest')) == []
    assert guest.agent.ping(5) >= 0


def test_a_push_cut_off_midway_leaves_no_partial_file(guest, tmp_path):
    from waiting import wait_until
    sent = threading.Event()
    release = threading.Event()

    def stalling():
        yield b'x' * MIB
        sent.set()
        release.wait(30)
        yield b'y'
    from negotiator_common.errors import ConnectionClosed
    from support import result_or_error
    outcome = []
    caller = threading.Thread(target=lambda: outcome.append(result_or_error(
        guest.agent.push, stalling(), str(tmp_path / 'guest' / 'f'))))
    caller.start()
    assert sent.wait(10)
    # The file is being written, without a name (so that even a SIGKILL of the agent leaves none).
    assert wait_until(lambda: files_being_written(tmp_path / 'guest') != [], timeout=10)
    assert os.listdir(str(tmp_path / 'guest')) == []
    guest.endpoint.close('the host went away')
    release.set()
    caller.join(10)
    assert isinstance(outcome[0], ConnectionClosed)
    assert wait_until(lambda: files_being_written(tmp_path / 'guest') == [], timeout=10)
    assert os.listdir(str(tmp_path / 'guest')) == []


def test_a_file_system_without_unnamed_files_gets_a_named_temporary_file_removed_on_failure(tmp_path, monkeypatch):
    from negotiator_common import files
    monkeypatch.delattr(files.os, 'O_TMPFILE')
    fd = open_directory(str(tmp_path))
    try:
        atomic = files.AtomicFile(fd, 'f', str(tmp_path / 'f'))
        atomic.write(b'partial')
        assert leftovers(tmp_path) != []
        atomic.abort()
        assert os.listdir(str(tmp_path)) == []
        atomic = files.AtomicFile(fd, 'f', str(tmp_path / 'f'))
        atomic.write(b'whole')
        atomic.commit(0o640, None)
    finally:
        os.close(fd)
    assert os.listdir(str(tmp_path)) == ['f'] and (tmp_path / 'f').read_bytes() == b'whole'
    assert stat.S_IMODE((tmp_path / 'f').stat().st_mode) == 0o640


def test_a_pull_whose_local_file_fails_leaves_no_partial_file_and_the_connection_serves_on(guest, tmp_path):
    (tmp_path / 'guest' / 'big').write_bytes(os.urandom(5 * MIB))

    class Failing(object):
        def __init__(self):
            self.written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > MIB:
                raise OSError(28, 'No space left on device')
            return len(data)

        def flush(self):
            pass
    with pytest.raises(OSError, match='No space'):
        guest.agent.pull(str(tmp_path / 'guest' / 'big'), Failing())
    assert guest.agent.ping(5) >= 0
    assert guest.agent.pull(str(tmp_path / 'guest' / 'big'), str(tmp_path / 'host' / 'big'))['size'] == 5 * MIB
    assert leftovers(tmp_path / 'host') == []


def test_a_pull_beyond_its_bound_stops_keeps_nothing_and_the_connection_serves_on(guest, tmp_path):
    # A hostile guest could send without end and fill the host's disk: max_size stops it.
    (tmp_path / 'guest' / 'big').write_bytes(os.urandom(5 * MIB))
    (tmp_path / 'guest' / 'tree').mkdir()
    (tmp_path / 'guest' / 'tree' / 'big').write_bytes(os.urandom(2 * MIB))
    with pytest.raises(FileError, match='more than the 1048576 bytes allowed') as caught:
        guest.agent.pull(str(tmp_path / 'guest' / 'big'), str(tmp_path / 'host' / 'big'), max_size=MIB)
    assert caught.value.reason == 'EFBIG' and exit_status_for(caught.value) == 74
    with pytest.raises(FileError, match='bytes allowed'):
        guest.agent.pull(str(tmp_path / 'guest' / 'tree'), str(tmp_path / 'host' / 'tree'), recursive=True,
                         max_size=MIB)
    sink = io.BytesIO()
    with pytest.raises(FileError, match='bytes allowed'):
        guest.agent.pull(str(tmp_path / 'guest' / 'big'), sink, max_size=MIB)
    assert len(sink.getvalue()) <= MIB  # never a byte beyond the bound
    assert os.listdir(str(tmp_path / 'host')) == [] and files_being_written(tmp_path / 'host') == []
    assert guest.agent.ping(5) >= 0
    exact = guest.agent.pull(str(tmp_path / 'guest' / 'big'), str(tmp_path / 'host' / 'big'), max_size=5 * MIB)
    assert exact['size'] == 5 * MIB  # a file of just the bound's size comes whole


def test_the_owner_is_set_when_asked_and_an_unknown_one_is_refused(guest, tmp_path):
    from negotiator_common.errors import InvalidParams
    target = tmp_path / 'guest' / 'owned'
    guest.agent.push(io.BytesIO(b'x'), str(target), owner='%d:%d' % (os.getuid(), os.getgid()))
    assert (target.stat().st_uid, target.stat().st_gid) == (os.getuid(), os.getgid())
    with pytest.raises(InvalidParams, match='no user'):
        guest.agent.push(io.BytesIO(b'x'), str(tmp_path / 'guest' / 'other'), owner='no-such-user-here')
    assert sorted(os.listdir(str(tmp_path / 'guest'))) == ['owned']


@pytest.mark.parametrize('arguments, expected', [
    (['--daemon'], None), (['--daemon', '--allow-files'], ['/']),
    (['-d', '--allow-files=/srv,/tmp'], ['/srv', '/tmp'])])
def test_the_guest_daemons_switch_is_off_by_default(arguments, expected):
    from negotiator_guest.cli import parse_options
    assert parse_options(arguments).allow_files == expected


@pytest.mark.parametrize('arguments', [['-l', '--allow-files'], ['--daemon', '--allow-files=srv'],
                                       ['--daemon', '--allow-files=']])
def test_the_guest_daemons_switch_is_checked(arguments):
    from negotiator_common.cli_support import UsageError
    from negotiator_guest.cli import parse_options
    with pytest.raises(UsageError):
        parse_options(arguments)


def test_an_agent_older_than_files_is_answered_cleanly_not_waited_for(tmp_path):
    from negotiator_common.errors import MethodNotFound
    older = Connection(tmp_path, None)
    older.service.files = None  # an agent without push and pull at all
    try:
        theirs, ours = socket.socketpair()
        server = Endpoint(Transport.from_socket(theirs), older.service.dispatcher(), name='old').start()
        endpoint = Endpoint(Transport.from_socket(ours), name='client').start()
        client = AgentClient(endpoint, endpoint.handshake(30))
        assert not client.files
        with pytest.raises(CommandNotAllowed, match='older agents'):
            client.pull('/etc/hostname', io.BytesIO())
        client.files = True  # a client that asks anyway gets the agent's own answer, at once
        with pytest.raises(MethodNotFound):
            client.push(io.BytesIO(b'x' * MIB), str(tmp_path / 'x'))
        endpoint.close()
        server.close()
    finally:
        older.close()


def _pull_a_tree_with_a_link_out(guest, tmp_path, monkeypatch, pad_size):
    """A recursive pull from an agent whose tree has a symlink to /etc: refused, nothing kept on the host."""
    from negotiator_common import fileservice

    def hostile_tree(dir_fd, sink, path, skipped=None):
        sink.write(archive((member('.', tarfile.DIRTYPE), None), (member('x', tarfile.SYMTYPE, '/etc'), None),
                           (member('pad'), os.urandom(pad_size))))
    monkeypatch.setattr(fileservice, 'write_tree', hostile_tree)
    (tmp_path / 'guest' / 'd').mkdir()
    with pytest.raises(FileError) as error:
        guest.agent.pull(str(tmp_path / 'guest' / 'd'), str(tmp_path / 'host' / 'd'), recursive=True)
    assert error.value.reason == 'unsafe' and 'points out of the tree' in str(error.value)
    assert os.listdir(str(tmp_path / 'host')) == []


def test_a_hostile_guest_cannot_plant_a_link_out_of_the_tree_on_the_host(guest, tmp_path, monkeypatch):
    _pull_a_tree_with_a_link_out(guest, tmp_path, monkeypatch, 3 * MIB)
    assert guest.agent.ping(5) >= 0


def test_a_refused_archive_is_the_error_even_when_the_guest_replied_before_the_refusal(guest, tmp_path, monkeypatch):
    # The order that a loaded machine made once: the whole archive and the reply arrived before
    # the extraction refused it; the closed pipe then failed a write (BrokenPipeError), and that
    # echo was raised instead of the refusal. Here the extraction starts only after the reply,
    # and the archive fits in the window (no credit is waited for).
    from negotiator_common import transfers
    replied = threading.Event()
    real_call, real_extract = guest.endpoint.call, transfers.extract_tree

    def call_then_say_so(*args, **kwargs):
        try:
            return real_call(*args, **kwargs)
        finally:
            replied.set()

    def extract_after_the_reply(source, tree, owner=None):
        assert replied.wait(30)
        return real_extract(source, tree, owner)
    monkeypatch.setattr(guest.endpoint, 'call', call_then_say_so)
    monkeypatch.setattr(transfers, 'extract_tree', extract_after_the_reply)
    _pull_a_tree_with_a_link_out(guest, tmp_path, monkeypatch, MIB)


def _extended(kind, size, declared=None):
    """A raw header of an extended ``kind`` declaring ``declared`` bytes (``size`` follow, padded)."""
    info = tarfile.TarInfo('././@LongLink' if kind != tarfile.XHDTYPE else './PaxHeaders/x')
    info.type, info.size = kind, size if declared is None else declared
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    body = b'%d path=%s\n' % (size, b'a' * (size - 8)) if kind == tarfile.XHDTYPE else b'n' * size
    return header + body[:size] + b'\0' * (-size % 512)


@pytest.mark.parametrize('kind', [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_an_extended_header_declaring_gigabytes_is_refused_before_it_is_read(tmp_path, kind):
    # tarfile reads an extended header whole: 4 GiB declared, 4 KiB sent; refused at its header.
    root = archive((member('.', tarfile.DIRTYPE), None))[:512]
    error = _extract(root + _extended(kind, 4096, declared=4 << 30), tmp_path)
    assert error.reason == 'unsafe' and 'extended header of 4294967296 bytes' in str(error)


def test_a_chain_of_extended_headers_is_refused(tmp_path):
    # Each is held while tarfile reads the next: a chain stops at MAX_TAR_NESTING.
    root = archive((member('.', tarfile.DIRTYPE), None))[:512]
    error = _extract(root + b''.join(_extended(tarfile.GNUTYPE_LONGNAME, 1024) for _ in range(50)), tmp_path)
    assert error.reason == 'unsafe' and 'extended headers before a member' in str(error)


def test_a_sparse_member_is_refused(tmp_path):
    sparse = member('holes')
    sparse.type = tarfile.GNUTYPE_SPARSE
    error = _extract(archive((member('.', tarfile.DIRTYPE), None))[:512] + sparse.tobuf(format=tarfile.GNU_FORMAT),
                     tmp_path)
    assert error.reason == 'unsafe' and 'sparse' in str(error)


def _extract_whole(data, parent):
    """Extract ``data`` into ``parent/tree`` and commit it."""
    fd = open_directory(str(parent))
    try:
        tree = AtomicTree(fd, 'tree', str(parent / 'tree'))
        extract_tree(io.BytesIO(data), tree)
        tree.commit()
    finally:
        os.close(fd)


def test_names_as_long_as_linux_allows_still_travel(tmp_path):
    # The bounds leave room for what a real tree has: a 4000-byte path and link target.
    deep = '/'.join(['d' * 200] * 19) + '/' + 'f' * 100
    source = tmp_path / 'source'
    data = archive((member('.', tarfile.DIRTYPE), None),
                   *[(member('/'.join(['d' * 200] * depth), tarfile.DIRTYPE), None) for depth in range(1, 20)],
                   (member(deep), b'content'), (member('link', tarfile.SYMTYPE, deep), None))
    source.mkdir()
    _extract_whole(data, source)
    assert (source / 'tree' / deep).read_bytes() == b'content'


def test_a_fifo_swapped_in_for_a_file_is_left_out_of_a_pulled_tree_not_waited_on(tmp_path, monkeypatch):
    # The race of a tree that changes while it is pulled: ``wanted`` was a regular file when the
    # walk looked (the stat is replayed here), and is a fifo with no writer when it is opened.
    # A blocking open would hold the agent's thread until a writer came, which may be never.
    from negotiator_common import files
    tree = tmp_path / 'tree'
    tree.mkdir()
    (tree / 'kept').write_bytes(b'kept bytes')
    (tree / 'wanted').write_bytes(b'was a file')
    as_a_file = os.stat(str(tree / 'wanted'))
    (tree / 'wanted').unlink()
    os.mkfifo(str(tree / 'wanted'))
    real_stat = os.stat

    def stat_before_the_swap(path, *args, **kwargs):
        return as_a_file if path == 'wanted' else real_stat(path, *args, **kwargs)
    monkeypatch.setattr(files.os, 'stat', stat_before_the_swap)
    sink, skipped, errors = io.BytesIO(), [], []

    def pull():
        fd = open_directory(str(tree))
        try:
            files.write_tree(fd, sink, str(tree), skipped.append)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            os.close(fd)
    walker = threading.Thread(target=pull, daemon=True)
    walker.start()
    walker.join(10)
    assert not walker.is_alive(), 'the walk waited on the fifo for a writer'
    assert errors == [] and skipped == ['wanted']
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue())) as tar:
        assert sorted(tar.getnames()) == ['.', 'kept']
        assert tar.extractfile('kept').read() == b'kept bytes'


def test_a_stream_of_many_members_costs_no_memory_for_each(tmp_path):
    # tarfile keeps every member it reads: about 700 bytes each, for 512 bytes of a hostile
    # peer's stream, unless the extraction drops them as it goes.
    import tracemalloc
    count = 10000
    data = archive((member('.', tarfile.DIRTYPE, mode=0o755), None),
                   *[(member('d%d' % number, tarfile.DIRTYPE, mode=0o755), None) for number in range(count)])
    tracemalloc.start()
    try:
        _extract_whole(data, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(os.listdir(str(tmp_path / 'tree'))) == count
    assert peak < 2 * 1024 * 1024, 'the extraction of %d members peaked at %d bytes' % (count, peak)


def test_directories_that_shut_their_owner_out_get_their_mode_last_and_are_bounded(tmp_path, monkeypatch):
    from negotiator_common import files
    data = archive((member('.', tarfile.DIRTYPE, mode=0o755), None),
                   (member('closed', tarfile.DIRTYPE, mode=0o555), None),
                   (member('closed/inner', tarfile.DIRTYPE, mode=0o500), None),
                   (member('closed/inner/file'), b'filled before it closed'),
                   (member('open', tarfile.DIRTYPE, mode=0o751), None))
    _extract_whole(data, tmp_path)
    tree = tmp_path / 'tree'
    assert (tree / 'closed' / 'inner' / 'file').read_bytes() == b'filled before it closed'
    assert [stat.S_IMODE(os.stat(str(tree / name)).st_mode) for name in ('closed', 'closed/inner', 'open')] == [
        0o555, 0o500, 0o751]
    # Each such directory is remembered until the end: beyond the bound, the stream is refused.
    monkeypatch.setattr(files, 'MAX_CLOSED_DIRECTORIES', 3)
    error = _extract(archive((member('.', tarfile.DIRTYPE, mode=0o755), None),
                             *[(member('c%d' % number, tarfile.DIRTYPE, mode=0o555), None) for number in range(4)],
                             (member('open', tarfile.DIRTYPE, mode=0o755), None)), tmp_path)
    assert error.reason == 'unsafe' and 'more than 3 directories' in str(error)


def test_sending_a_tree_of_many_entries_costs_no_memory_for_each(tmp_path):
    # tarfile keeps every header it writes too: a pull of a tree of a million files would have
    # cost the agent about 700 MB.
    import tracemalloc
    from negotiator_common.files import write_tree
    count = 10000
    tree = tmp_path / 'tree'
    tree.mkdir()
    for number in range(count):
        os.mkdir(str(tree / ('d%d' % number)))

    class Counting(object):
        size = 0

        def write(self, data):
            self.size += len(data)
    sink = Counting()
    fd = open_directory(str(tree))
    tracemalloc.start()
    try:
        write_tree(fd, sink, str(tree))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert sink.size >= (count + 1) * 512
    # The names of one directory's entries are listed at once (os.fwalk): about 1 MB here.
    assert peak < 3 * 1024 * 1024, 'sending %d entries peaked at %d bytes' % (count, peak)
