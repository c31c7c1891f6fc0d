"""
Which commands exist: executables in commands directories, plus the built-ins.

Only a listed command can run, and a name is looked up, never turned into a path by the peer:
names must match ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no ``/``, no ``..``, no hidden files). The
directories are read at every lookup, so installing or removing a command needs no restart.

A command runs with the agent's privileges (root, usually), so only root or the agent's own
user may be able to change what runs. As sshd's StrictModes and sudo do, a command file and
its directory must be owned by one of those two and writable by nobody else, and so must
every directory above, up to ``/``: else someone else could rewrite the file, add a command,
or rename a directory on the path and put their own in its place. One exception: a shared
directory with the sticky bit (``/tmp``) may be writable by all, when the entry on the path
that it holds is owned by root or the agent's user, because in a sticky directory only an
entry's owner (or the directory's) can rename or remove it. A link must lead to a file in
its own directory. Whatever breaks these rules is refused, its reason logged once.
"""

import os
import re
import stat
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from negotiator_common.builtin_commands import BUILTIN_COMMANDS, BuiltinCommand
from negotiator_common.errors import CommandNotFound
from negotiator_common.lazylog import get_logger

__all__ = ('COMMAND_NAME_PATTERN', 'DEFAULT_COMMANDS_DIR', 'MAX_NAME_LENGTH', 'CommandInfo',
           'CommandRegistry', 'missing_command_message', 'valid_command_name')

logger = get_logger(__name__)  # lazy: listing commands must not import logging

COMMAND_NAME_PATTERN = re.compile(r'\A[A-Za-z0-9][A-Za-z0-9._-]*\Z')
"""A valid command name: no slash, no leading dot, nothing a shell or a path would treat specially."""

MAX_NAME_LENGTH = 255

DEFAULT_COMMANDS_DIR = '/usr/lib/negotiator/commands'


def valid_command_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and bool(COMMAND_NAME_PATTERN.match(name))


def missing_command_message(name: str) -> str:
    """What a caller hears of a command that is not offered to it, whether it is missing or refused."""
    return 'no command %r (list the commands to see what is offered)' % name


def _trusted_owner(uid: int) -> bool:
    """Whether ``uid`` may own what the agent runs: root, or the agent's own user."""
    return uid == 0 or uid == os.geteuid()


def _writable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def _ownership_problem(what: str, info: os.stat_result) -> Optional[str]:
    """Why ``what`` (a command, or a directory on its path) could be changed by someone else, or None."""
    if not _trusted_owner(info.st_uid):
        return '%s is owned by uid %d, neither root nor the agent\'s user' % (what, info.st_uid)
    if _writable_by_others(info.st_mode):
        return '%s is writable by others than its owner (mode %o)' % (what, info.st_mode & 0o7777)
    return None


def _parents(directory: str) -> Iterator[Tuple[str, str]]:
    """``(parent, entry)`` for every directory above ``directory`` up to ``/``, nearest first."""
    entry = directory
    parent = os.path.dirname(entry)
    while entry != parent:
        yield parent, entry
        entry, parent = parent, os.path.dirname(parent)


def _parent_problem(parent: str, entry: str) -> Optional[str]:
    """Why someone else could replace ``entry`` through its directory ``parent``, or None."""
    info = os.stat(parent)
    shared_sticky = (_trusted_owner(info.st_uid) and _writable_by_others(info.st_mode)
                     and info.st_mode & stat.S_ISVTX)
    if not shared_sticky:
        return _ownership_problem('the directory %s above it' % parent, info)
    # In a sticky directory (/tmp) only an entry's owner, or the directory's, may rename or remove it.
    entry_owner = os.lstat(entry).st_uid
    if not _trusted_owner(entry_owner):
        return '%s, in the shared directory %s, is owned by uid %d, neither root nor the agent\'s user' % (
            entry, parent, entry_owner)
    return None


def _path_problem(directory: str) -> Optional[str]:
    """
    Why someone other than root or the agent's user could replace ``directory`` through a
    directory above it, or None. Both the path as given and the path it resolves to are
    walked up to ``/``: a link on the given path is covered by the first walk (its
    directory), the place it leads to by the second.
    """
    for path in sorted({os.path.abspath(directory), os.path.realpath(directory)}):
        for parent, entry in _parents(path):
            problem = _parent_problem(parent, entry)
            if problem is not None:
                return problem
    return None


class CommandInfo(object):
    """A command that can run: an executable ``path``, or a ``builtin``."""

    __slots__ = ('name', 'path', 'builtin', 'description')

    def __init__(self, name: str, path: Optional[str] = None, builtin: Optional[BuiltinCommand] = None,
                 description: str = '') -> None:
        self.name = name
        self.path = path
        self.builtin = builtin
        self.description = description

    def to_wire(self) -> Dict[str, object]:
        return {'name': self.name, 'builtin': self.builtin is not None, 'description': self.description}

    def __repr__(self) -> str:
        return 'CommandInfo(%r, %s)' % (self.name, 'builtin' if self.builtin else self.path)


class CommandRegistry(object):
    """The commands that one agent offers: ``directories`` (searched in order) and the built-ins."""

    def __init__(self, directories: Sequence[str] = (DEFAULT_COMMANDS_DIR,), builtins: bool = True) -> None:
        self.directories = [os.path.abspath(d) for d in directories]
        self.builtins: Dict[str, BuiltinCommand] = dict(BUILTIN_COMMANDS) if builtins else {}
        self._reported: set = set()

    def _refuse(self, path: str, reason: str) -> None:
        # Log each refusal once per process, not at every listing.
        if (path, reason) not in self._reported:
            self._reported.add((path, reason))
            logger.warning("Refusing %s: %s", path, reason)

    def _usable_directory(self, directory: str) -> bool:
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._refuse(directory, 'cannot read it: %s' % exc)
            return False
        if not stat.S_ISDIR(info.st_mode):
            self._refuse(directory, 'not a directory')
            return False
        try:
            problem = _ownership_problem('the directory', info) or _path_problem(directory)
        except OSError as exc:
            problem = 'cannot check the directories above it: %s' % exc
        if problem is not None:
            self._refuse(directory, problem)
            return False
        return True

    def _command_in(self, directory: str, name: str) -> Optional[CommandInfo]:
        path = os.path.join(directory, name)
        try:
            link_info = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(link_info.st_mode):
            target = os.path.realpath(path)
            if os.path.dirname(target) != os.path.realpath(directory):
                self._refuse(path, 'a link that leads out of its directory (to %s)' % target)
                return None
        try:
            info = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or not info.st_mode & stat.S_IXUSR:
            return None
        problem = _ownership_problem('the file', info)
        if problem is not None:
            self._refuse(path, problem)
            return None
        return CommandInfo(name, path=path)

    def list(self) -> List[CommandInfo]:
        """Every command that can run now, sorted by name (a directory's file hides a built-in)."""
        found: Dict[str, CommandInfo] = {}
        for directory in self.directories:
            if not self._usable_directory(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if name not in found and valid_command_name(name):
                    command = self._command_in(directory, name)
                    if command is not None:
                        found[name] = command
        for name, builtin in self.builtins.items():
            found.setdefault(name, CommandInfo(name, builtin=builtin, description=builtin.description))
        return [found[name] for name in sorted(found)]

    def resolve(self, name: object) -> CommandInfo:
        """The command called ``name``; :class:`CommandNotFound` for unknown or invalid names."""
        if not valid_command_name(name):
            raise CommandNotFound('%r is not a valid command name (letters, digits, ".", "_", "-";'
                                  ' not starting with "." or "-")' % (name,))
        assert isinstance(name, str)
        for directory in self.directories:
            if self._usable_directory(directory):
                command = self._command_in(directory, name)
                if command is not None:
                    return command
        if name in self.builtins:
            builtin = self.builtins[name]
            return CommandInfo(name, builtin=builtin, description=builtin.description)
        raise CommandNotFound(missing_command_message(name))
