"""
Which guests may run which host commands: the host daemon's policy.

Without a policy file every guest may run every command of the host's commands directories,
and no built-in: the policy is ``[*] allow = *``. That default is safe because the directories
are the policy: a command exists for guests only when the host's owner installed it there, no
other program of the host is reachable, and a command learns which guest asked from
``NEGOTIATOR_GUEST``. The built-ins (host name, uptime, OS release, every network interface and
mount of the host) were written for a guest's owner asking their own guest, so a guest gets one
only where the policy names it.

A policy file narrows this per guest. It is an INI file: each section names a guest name
pattern (shell-style, ``fnmatch``, case-sensitive), and its ``allow`` lists command name
patterns separated by whitespace (continued on indented lines if need be). A guest may run a
command of the commands directories when any section that matches the guest's name has a
pattern that matches the command's name; it may run a built-in only when such a section names
the built-in exactly (``*`` or ``host*`` does not offer ``hostname``). A guest that matches no
section may run nothing::

    # /etc/negotiator/host-policy.ini
    [web-*]
    allow = deploy-status reload-*

    ; every guest
    [*]
    allow = hostname uptime

A comment is a whole line that starts with ``#`` or ``;``: there are no comments at the end of
a line. A command pattern may hold only what a command name can (letters, digits, ``.``, ``_``,
``-``) and the shell-pattern characters ``*``, ``?``, ``[``, ``]`` and ``!``, so a comment left at
the end of an ``allow`` line (``# reload-* stays off``) is an error rather than more patterns.
A guest pattern may hold any character (libvirt allows almost any guest name, and ``[0-9]``
is a pattern): whatever does not belong there only makes the section match fewer guests, and a
header with anything after its closing ``]`` is an error. Any other key or line, a key outside a
section, a section or key given twice, or a missing file is refused when the daemon starts, with
the file's name and the line, so that a typo never silently opens (or closes) the host.
"""

import fnmatch
import re
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ('Policy', 'PolicyError')

COMMAND_PATTERN = re.compile(r'\A[A-Za-z0-9._*?\[\]!-]+\Z')
"""A command pattern: command-name characters and shell-pattern characters, nothing else."""

SECTION = re.compile(r'\A\[(.+)\]\Z')
"""A section header: the guest name pattern between brackets, alone on its line."""


class PolicyError(ValueError):
    """A policy file that cannot be read or does not follow the format."""


class _Parser(object):
    """Reads a policy file line by line, so that every error names its line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.rules: List[Tuple[str, List[str]]] = []
        self.section_lines: Dict[str, int] = {}
        self.allow_line: Optional[int] = None
        self.continuing = False

    def error(self, number: int, message: str) -> PolicyError:
        return PolicyError('%s, line %d: %s' % (self.source, number, message))

    def parse(self, text: str) -> List[Tuple[str, List[str]]]:
        for number, line in enumerate(text.split('\n'), 1):
            self.read_line(number, line)
        return self.rules

    def read_line(self, number: int, line: str) -> None:
        stripped = line.strip()
        if not stripped or stripped[0] in '#;':
            return
        if self.continuing and line[0].isspace():
            self.add_patterns(number, stripped)
            return
        self.continuing = False
        header = SECTION.match(stripped)
        if header:
            self.start_section(number, header.group(1))
        elif '=' in stripped:
            key, _, value = stripped.partition('=')
            self.read_key(number, key.strip(), value.strip())
        else:
            raise self.error(number, 'expected a [section], "allow = ..." or a comment, found %r' % stripped)

    def start_section(self, number: int, pattern: str) -> None:
        if pattern in self.section_lines:
            raise self.error(number, 'section [%s] is already on line %d' % (pattern, self.section_lines[pattern]))
        self.section_lines[pattern] = number
        self.rules.append((pattern, []))
        self.allow_line = None

    def read_key(self, number: int, key: str, value: str) -> None:
        if not self.rules:
            raise self.error(number, '%r is outside any [section]' % key)
        if key != 'allow':
            raise self.error(number, 'unknown key %r in section [%s] (only "allow" is known)'
                             % (key, self.rules[-1][0]))
        if self.allow_line is not None:
            raise self.error(number, 'section [%s] has "allow" already on line %d'
                             % (self.rules[-1][0], self.allow_line))
        self.allow_line = number
        self.continuing = True
        self.add_patterns(number, value)

    def add_patterns(self, number: int, text: str) -> None:
        for pattern in text.split():
            if not COMMAND_PATTERN.match(pattern):
                raise self.error(number, '%r is not a command pattern (letters, digits, ".", "_", "-" and'
                                 ' the wildcards "*?[]!"; a comment must be a line of its own)' % pattern)
            self.rules[-1][1].append(pattern)


class Policy(object):
    """
    Rules ``(guest pattern, [command patterns])``: :meth:`allows` answers for the commands of the
    commands directories, :meth:`names` for the built-ins.
    """

    def __init__(self, rules: Sequence[Tuple[str, Sequence[str]]], source: str = '') -> None:
        self.rules = [(pattern, list(commands)) for pattern, commands in rules]
        self.source = source

    @classmethod
    def default(cls) -> 'Policy':
        """The policy without a policy file: every command of the commands directories, no built-in."""
        return cls([('*', ['*'])], 'the default policy')

    @classmethod
    def parse(cls, text: str, source: str = '<policy>') -> 'Policy':
        """Read a policy from ``text``; :class:`PolicyError`, naming ``source`` and the line, when malformed."""
        return cls(_Parser(source).parse(text), source)

    @classmethod
    def load(cls, path: str) -> 'Policy':
        """Read a policy file; :class:`PolicyError` when it is missing or malformed."""
        try:
            with open(path, encoding='utf-8') as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError('cannot read the policy file %s: %s' % (path, exc)) from exc
        return cls.parse(text, path)

    def allowed_patterns(self, guest: str) -> List[str]:
        """Every command pattern that applies to ``guest``."""
        found: List[str] = []
        for pattern, commands in self.rules:
            if fnmatch.fnmatchcase(guest, pattern):
                found.extend(commands)
        return found

    def allows(self, guest: str, command: str) -> bool:
        """Whether ``guest`` may run ``command`` of the commands directories (a pattern matches it)."""
        return any(fnmatch.fnmatchcase(command, pattern) for pattern in self.allowed_patterns(guest))

    def names(self, guest: str, command: str) -> bool:
        """Whether ``guest`` may run the built-in ``command`` (a pattern is exactly its name)."""
        return command in self.allowed_patterns(guest)

    __call__ = allows

    def __repr__(self) -> str:
        return 'Policy(%r)' % (self.rules,)
