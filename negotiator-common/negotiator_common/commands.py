"""
Which commands exist: executables in commands directories, plus the built-ins.

Only a listed command can run, and a name is looked up, never turned into a path by the peer:
names must match ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no ``/``, no ``..``, no hidden files). The
directories are read at every lookup, so installing or removing a command needs no restart.
A directory or file that others than its owner may write, or a link that leads out of its
directory, is refused with a logged reason: such a file could be replaced by someone other
than the owner who meant it to run.
"""

import logging
import os
import re
import stat
from typing import Dict, List, Optional, Sequence

from negotiator_common.builtin_commands import BUILTIN_COMMANDS, BuiltinCommand
from negotiator_common.errors import CommandNotFound

__all__ = ('COMMAND_NAME_PATTERN', 'DEFAULT_COMMANDS_DIR', 'MAX_NAME_LENGTH', 'CommandInfo',
           'CommandRegistry', 'valid_command_name')

logger = logging.getLogger(__name__)

COMMAND_NAME_PATTERN = re.compile(r'\A[A-Za-z0-9][A-Za-z0-9._-]*\Z')
"""A valid command name: no slash, no leading dot, nothing a shell or a path would treat specially."""

MAX_NAME_LENGTH = 255

DEFAULT_COMMANDS_DIR = '/usr/lib/negotiator/commands'


def valid_command_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and bool(COMMAND_NAME_PATTERN.match(name))


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
        self.builtins = dict(BUILTIN_COMMANDS) if builtins else {}  # type: Dict[str, BuiltinCommand]
        self._reported = set()  # type: set

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
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self._refuse(directory, 'the directory is writable by others than its owner (mode %o)'
                         % (info.st_mode & 0o7777))
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
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self._refuse(path, 'the file is writable by others than its owner (mode %o)' % (info.st_mode & 0o7777))
            return None
        return CommandInfo(name, path=path)

    def list(self) -> List[CommandInfo]:
        """Every command that can run now, sorted by name (a directory's file hides a built-in)."""
        found = {}  # type: Dict[str, CommandInfo]
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
        raise CommandNotFound('no command %r (list the commands to see what is offered)' % name)
