"""
Files on disk for ``push`` and ``pull`` (``docs/protocol.rst``, "Files"), shared by both sides.

The guest agent writes what the host pushes and reads what it pulls; the host writes what it
pulls. Both write the same way: into a temporary name in the target's directory, synced, then
renamed, so that a reader sees the old file or the whole new one and an interrupted transfer
leaves nothing behind (:class:`AtomicFile`, :class:`AtomicTree`). A directory travels as a tar
stream (the standard library's :mod:`tarfile`, streaming modes: never more than a record in
memory) that :func:`write_tree` writes and :func:`extract_tree` reads back, refusing whatever
could leave the tree (absolute names, ``..``, links that point out, hard links, devices) since
the other side may be hostile. Every failure of the disk is a :class:`FileError` that names the
path and the reason.
"""

import errno
import os
import posixpath
import secrets
import stat
import tarfile
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from negotiator_common.errors import FileError

__all__ = ('file_error', 'unsafe', 'AtomicFile', 'AtomicTree', 'write_tree', 'extract_tree', 'COPY_SIZE',
           'TREE_MODE_BITS', 'open_directory', 'fd_path', 'resolve_owner', 'file_kind')

COPY_SIZE = 1024 * 1024
"""The most bytes read or written at once: the memory a copy holds, whatever the size of the file."""

TREE_MODE_BITS = 0o1777
"""The mode bits a tree keeps: setuid and setgid are dropped, so that no side hands the other a privileged program."""

_TAR_BUFFER = 256 * 1024

MAX_TAR_HEADER = 64 * 1024
"""
The most bytes of one extended header (pax) or GNU long name that an extraction reads: tarfile
reads such a header whole, whatever size the archive declares, so a hostile peer's archive could
otherwise make this side hold gigabytes. A path or a link target is at most 4 KiB on Linux.
"""

MAX_CLOSED_DIRECTORIES = 100000
"""
The most directories of one extracted tree whose mode shuts their owner out (not all of read,
write and search for the owner: the extraction opens a directory to fill it). Those get their
mode only at the end, once they are filled, so each one is remembered until then. Every other
directory gets its mode at once and costs no memory, so that a hostile peer's stream of
millions of members cannot grow the extraction's memory.
"""

MAX_TAR_NESTING = 4
"""
The most extended headers before one member: tarfile reads each into memory and keeps it while
it reads the next (recursion), so a chain of them is bounded here, far below Python's recursion
limit. A member needs at most three (a long name, a long link target, pax attributes).
"""

_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)


def file_error(path: str, exc: OSError) -> FileError:
    """``exc`` as a :class:`FileError` that names ``path`` and the errno's name (``ENOENT``, ``ENOSPC``...)."""
    reason = errno.errorcode.get(exc.errno or 0, 'EIO')
    return FileError('%s: %s' % (path, exc.strerror or reason), {'path': path, 'reason': reason})


def unsafe(path: str, why: str) -> FileError:
    return FileError('%s: %s' % (path, why), {'path': path, 'reason': 'unsafe'})


def open_directory(path: str, dir_fd: Optional[int] = None, follow: bool = True) -> int:
    """A descriptor of the directory ``path`` (``follow`` False: a symlink in its place is refused)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, 'O_CLOEXEC', 0) | (0 if follow else os.O_NOFOLLOW)
    return os.open(path, flags, dir_fd=dir_fd)


def fd_path(fd: int, fallback: str) -> str:
    """Where the kernel says ``fd`` is (``/proc/self/fd``): a check holds for what was opened; else ``fallback``."""
    try:
        return os.readlink('/proc/self/fd/%d' % fd)
    except OSError:
        return fallback


def _temporary_name(name: str) -> str:
    return '.%s.negotiator-%s' % (name[:200], secrets.token_hex(6))


class AtomicFile(object):
    """
    A file written in its directory (a descriptor, ``dir_fd``) without a name, and given the
    name ``name`` by :meth:`commit`, after an ``fsync``; :meth:`abort` drops it. ``path`` names
    the target in errors.

    Why without a name: a transfer may end by SIGKILL (an agent killed, a CLI killed midway), and
    a named temporary file would then stay behind with nobody to remove it. An ``O_TMPFILE``
    inode vanishes with its last descriptor; the commit links it under a temporary name and
    renames that over the target at once (through ``/proc/self/fd``: linking a descriptor
    directly needs a privilege), so only those two system calls could leave a name behind. A
    file system without ``O_TMPFILE`` (or a system without ``/proc``) gets the named temporary
    file instead.
    """

    def __init__(self, dir_fd: int, name: str, path: str) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.temporary = _temporary_name(name)
        try:
            self.fd = self._open_unnamed()
            self.named = self.fd < 0
            if self.named:
                self.fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | getattr(os, 'O_CLOEXEC', 0), 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise file_error(path, exc) from None
        self.size = 0

    def _open_unnamed(self) -> int:
        """A descriptor of a new inode without a name in the directory, or -1 where that cannot be."""
        if not hasattr(os, 'O_TMPFILE') or not os.path.isdir('/proc/self/fd'):
            return -1
        try:
            return os.open('.', os.O_TMPFILE | os.O_WRONLY | getattr(os, 'O_CLOEXEC', 0), 0o600, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                return -1  # the file system (or an old kernel) has no O_TMPFILE
            raise

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            raise file_error(self.path, exc) from None
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: every write goes to the file at once (a sink of :mod:`negotiator_common.callstreams`)."""

    def commit(self, mode: Optional[int], owner: Optional[Tuple[int, int]]) -> None:
        """Set the mode and owner, sync, give it the target's name (replacing the target), sync the directory."""
        try:
            if owner is not None:
                os.fchown(self.fd, owner[0], owner[1])
            if mode is not None:
                os.fchmod(self.fd, mode)
            os.fsync(self.fd)
            if not self.named:
                os.link('/proc/self/fd/%d' % self.fd, self.temporary, dst_dir_fd=self.dir_fd, follow_symlinks=True)
                self.named = True
            os.close(self.fd)
            self.fd = -1
            os.rename(self.temporary, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except OSError as exc:
            self.abort()
            raise file_error(self.path, exc) from None

    def abort(self) -> None:
        """Close the file and remove its temporary name if it has one (what was written is gone)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named:
            try:
                os.unlink(self.temporary, dir_fd=self.dir_fd)
            except OSError:
                pass


class AtomicTree(object):
    """
    A directory built under a temporary name in its parent (mode 0700 until it is done: no other
    user can reach into it meanwhile) and renamed to ``name`` by :meth:`commit`, which refuses
    to replace anything but an empty directory; :meth:`abort` removes it and all it holds.
    """

    def __init__(self, dir_fd: int, name: str, path: str) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.temporary = _temporary_name(name)
        try:
            os.mkdir(self.temporary, 0o700, dir_fd=dir_fd)
            self.fd = open_directory(self.temporary, dir_fd, follow=False)
        except OSError as exc:
            raise file_error(path, exc) from None
        self.root_mode = 0o755

    def commit(self) -> None:
        try:
            os.fchmod(self.fd, self.root_mode)
            os.fsync(self.fd)
            os.rename(self.temporary, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except OSError as exc:
            self.abort()
            raise file_error(self.path, exc) from None
        finally:
            self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self._close()
        _remove_tree(self.dir_fd, self.temporary)


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and everything under it, without following a symlink."""
    try:
        fd = open_directory(name, dir_fd, follow=False)
    except OSError:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        return
    try:
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):
            _remove_tree(fd, entry)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        pass


def _member_parts(name: str) -> List[str]:
    """The components of a member's name, or an error for a name that could leave the tree."""
    if name.startswith('/') or '\0' in name:
        raise unsafe(name, 'an absolute name in the archive')
    parts = [part for part in name.split('/') if part not in ('', '.')]
    if '..' in parts:
        raise unsafe(name, 'a name with ".." in the archive')
    return parts


def _link_stays_inside(parts: List[str], target: str) -> bool:
    """Whether a symlink at ``parts`` pointing to ``target`` points into the tree."""
    if not target or target.startswith('/') or '\0' in target:
        return False
    resolved = posixpath.normpath(posixpath.join(*(parts[:-1] or ['.']), target))
    return resolved != '..' and not resolved.startswith('../')


class _TreeWriter(object):
    """The state of one extraction: the root's descriptor, the modes of the directories to set at the end."""

    def __init__(self, root_fd: int, owner: Optional[Tuple[int, int]]) -> None:
        self.root_fd = root_fd
        self.owner = owner
        self.closed_directories: List[Tuple[str, int]] = []
        self.root_mode: Optional[int] = None

    def parent(self, parts: List[str]) -> int:
        """A descriptor of the directory that holds ``parts`` (each step a directory, never a symlink)."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts[:-1]:
                step = open_directory(part, fd, follow=False)
                os.close(fd)
                fd = step
        except OSError:
            os.close(fd)
            raise
        return fd

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = _member_parts(member.name)
        mode = member.mode & TREE_MODE_BITS
        if not parts:
            if not member.isdir():
                raise unsafe(member.name, 'the root of the tree is not a directory')
            self.root_mode = mode
            return
        if not (member.isdir() or member.isreg() or member.issym()):
            raise unsafe(member.name, 'not a directory, a regular file or a symlink (devices, fifos and hard'
                                      ' links are not copied)')
        if member.issym() and not _link_stays_inside(parts, member.linkname):
            raise unsafe(member.name, 'a symlink that points out of the tree (%s)' % member.linkname)
        fd = self.parent(parts)
        try:
            self._create(fd, parts, member, tar, mode)
        finally:
            os.close(fd)

    def _create(self, fd: int, parts: List[str], member: tarfile.TarInfo, tar: tarfile.TarFile, mode: int) -> None:
        name = parts[-1]
        if member.isdir():
            os.mkdir(name, 0o700, dir_fd=fd)
            if mode & 0o700 == 0o700:  # its owner can still open and fill it (the tree's root is 0700 until the end)
                os.chmod(name, mode, dir_fd=fd)
            elif len(self.closed_directories) < MAX_CLOSED_DIRECTORIES:
                self.closed_directories.append(('/'.join(parts), mode))
            else:
                raise unsafe(member.name, 'more than %d directories that shut their owner out' % MAX_CLOSED_DIRECTORIES)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=fd)
        else:
            source = tar.extractfile(member)
            assert source is not None
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, 'O_CLOEXEC', 0),
                          0o600, dir_fd=fd)
            try:
                for piece in iter(lambda: source.read(COPY_SIZE), b''):
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(out, view):]
                os.fchmod(out, mode)
                os.fsync(out)
            finally:
                os.close(out)
        if self.owner is not None:
            os.chown(name, self.owner[0], self.owner[1], dir_fd=fd, follow_symlinks=False)

    def finish(self) -> None:
        """Give the directories that shut their owner out their mode, deepest first (each is filled by now)."""
        for path, mode in reversed(self.closed_directories):
            parts = path.split('/')
            fd = self.parent(parts)
            try:
                os.chmod(parts[-1], mode, dir_fd=fd)
            finally:
                os.close(fd)


_TARFILES_OWN_STEP: Callable[..., Any] = vars(tarfile.TarInfo)['_proc_member']
"""tarfile's processing of a member's header (not in its type stubs: a subclass's hook)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """
    A member's header that refuses what would make tarfile hold unbounded memory: an extended
    header over :data:`MAX_TAR_HEADER` bytes, more than :data:`MAX_TAR_NESTING` of them in a row,
    and sparse members in any of GNU's formats (whose maps tarfile reads without a bound; negotiator
    never writes them). Hooked where tarfile's source says a subclass may: ``_proc_member``, the
    first step of every header, and the ``_proc_*`` methods it calls (the same in CPython 3.6 to
    3.13).
    """

    _nesting = threading.local()

    def _proc_member(self, tar: Any) -> Any:
        if self.type in _EXTENDED_HEADERS:
            if self.size > MAX_TAR_HEADER:
                raise unsafe(self.name, 'an extended header of %d bytes (at most %d)' % (self.size, MAX_TAR_HEADER))
            depth = getattr(self._nesting, 'depth', 0)
            if depth >= MAX_TAR_NESTING:
                raise unsafe(self.name, 'more than %d extended headers before a member' % MAX_TAR_NESTING)
            self._nesting.depth = depth + 1
            try:
                return _TARFILES_OWN_STEP(self, tar)
            finally:
                self._nesting.depth = depth
        if self.type == tarfile.GNUTYPE_SPARSE:
            self._refuse_sparse()
        return _TARFILES_OWN_STEP(self, tar)

    def _refuse_sparse(self, *ignored: Any) -> None:
        raise unsafe(self.name, 'a sparse file (negotiator never sends one)')

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


def extract_tree(source: Any, tree: AtomicTree, owner: Optional[Tuple[int, int]] = None) -> None:
    """
    Read the tar stream ``source`` (any object with a ``read`` of bytes) into ``tree`` (still
    under its temporary name). A member that could leave the tree is :class:`FileError` with
    the reason ``unsafe``, a failure of the disk one with its errno. Members are checked one by
    one as they come (see the module's documentation).
    """
    writer = _TreeWriter(tree.fd, owner)
    member_name = tree.path
    try:
        with tarfile.open(fileobj=source, mode='r|', bufsize=_TAR_BUFFER, tarinfo=_BoundedTarInfo) as tar:
            for member in iter(tar.next, None):
                member_name = posixpath.join(tree.path, member.name)
                writer.add(member, tar)
                # tarfile keeps every member it read (for random access, which a stream never
                # has): about 700 bytes of memory for each 512 bytes of a hostile stream.
                del cast(Any, tar).members[:]
        writer.finish()
    except OSError as exc:
        raise file_error(member_name, exc) from None
    except tarfile.TarError as exc:
        raise FileError('%s: not a valid tar stream (%s)' % (tree.path, exc),
                        {'path': tree.path, 'reason': 'EINVAL'}) from None
    if writer.root_mode is not None:
        tree.root_mode = writer.root_mode


def _tar_info(name: str, status: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = status.st_mode & TREE_MODE_BITS
    info.mtime = int(status.st_mtime)
    return info


def write_tree(dir_fd: int, sink: Any, path: str, skipped: Optional[Callable[[str], None]] = None) -> None:
    """
    Write the directory ``dir_fd`` as a tar stream to ``sink``: directories, regular files and
    symlinks (as symlinks: never followed), walked with descriptors so that a symlink swapped
    in meanwhile is never followed either. Anything else (a device, a fifo, a socket, even one
    swapped in for a file between its stat and its open) is left out and passed to ``skipped``.
    ``path`` names the tree in errors.
    """
    name = path
    try:
        with tarfile.open(fileobj=sink, mode='w|', bufsize=_TAR_BUFFER, format=tarfile.PAX_FORMAT) as tar:
            root = _tar_info('.', os.fstat(dir_fd))
            root.type = tarfile.DIRTYPE
            tar.addfile(root)
            for top, directories, files, top_fd in os.fwalk('.', dir_fd=dir_fd, follow_symlinks=False):
                for entry in sorted(directories + files):
                    name = posixpath.normpath(posixpath.join(top, entry))
                    _add_entry(tar, top_fd, entry, name, skipped)
                    del cast(Any, tar).members[:]  # tarfile keeps every header it wrote, never read again here
    except OSError as exc:
        raise file_error(posixpath.join(path, name), exc) from None


def _add_entry(tar: tarfile.TarFile, top_fd: int, entry: str, name: str,
               skipped: Optional[Callable[[str], None]]) -> None:
    status = os.stat(entry, dir_fd=top_fd, follow_symlinks=False)
    info = _tar_info(name, status)
    if stat.S_ISDIR(status.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISLNK(status.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(entry, dir_fd=top_fd)
        tar.addfile(info)
    elif stat.S_ISREG(status.st_mode):
        # Without waiting (O_NONBLOCK), and checked again once open: a fifo swapped in since the
        # stat would otherwise block the open until a writer came, and hold the agent's thread
        # for ever (a cancel cannot end an open).
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0), dir_fd=top_fd)
        with os.fdopen(fd, 'rb') as source:
            opened = os.fstat(source.fileno())
            if not stat.S_ISREG(opened.st_mode):
                if skipped is not None:
                    skipped(name)
                return
            info.size = opened.st_size
            info.mode = opened.st_mode & TREE_MODE_BITS
            tar.addfile(info, source)
    elif skipped is not None:
        skipped(name)


def resolve_owner(owner: Any) -> Optional[Tuple[int, int]]:
    """
    ``USER``, ``USER:GROUP``, ``UID`` or ``UID:GID`` as ids (a user alone: its own group); None
    for None. :class:`ValueError` for an owner that this system does not know.
    """
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner or owner.count(':') > 1:
        raise ValueError('an owner is "USER" or "USER:GROUP", not %r' % (owner,))
    import grp
    import pwd
    user, _, group = owner.partition(':')
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise ValueError('no user %r' % user) from None
        uid, gid = int(user), int(user)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError('no group %r' % group) from None
    return uid, gid


def file_kind(status: os.stat_result) -> Dict[str, Any]:
    """What a ``pull`` result says of its source: its type and mode."""
    kind = 'directory' if stat.S_ISDIR(status.st_mode) else 'file'
    return {'type': kind, 'mode': stat.S_IMODE(status.st_mode)}
