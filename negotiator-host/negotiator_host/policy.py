"""
Which guests may run which host commands: the host daemon's policy.

Without a policy file every guest may run every command of the host's commands directories
(and the built-ins). That default is safe because the directories are the policy: a command
exists for guests only when the host's owner installed it there, no other program of the
host is reachable, and a command learns which guest asked from ``NEGOTIATOR_GUEST``.

A policy file narrows this per guest. It is an INI file: each section names a guest name
pattern (shell-style, ``fnmatch``, case-sensitive), and its ``allow`` lists command name
patterns separated by whitespace. A guest may run a command when any section that matches
the guest's name allows it; a guest that matches no section may run nothing::

    # /etc/negotiator/host-policy.ini
    [web-*]
    allow = deploy-status reload-*

    [*]
    allow = hostname uptime

Any other key, a missing file or a syntax error is refused when the daemon starts, so that a
typo never silently opens (or closes) the host.
"""

import configparser
import fnmatch
from typing import List, Sequence, Tuple

__all__ = ('Policy', 'PolicyError', 'allow_everything')


class PolicyError(ValueError):
    """A policy file that cannot be read or does not follow the format."""


def allow_everything(guest: str, command: str) -> bool:
    """The default policy: every command of the commands directories, for every guest."""
    return True


class Policy(object):
    """
    Rules ``(guest pattern, [command patterns])``; call ``policy(guest, command)`` to ask.
    """

    def __init__(self, rules: Sequence[Tuple[str, Sequence[str]]], source: str = '') -> None:
        self.rules = [(pattern, list(commands)) for pattern, commands in rules]
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str = '<policy>') -> 'Policy':
        # No interpolation (a '%' is just a character), no DEFAULT section (a guest may be
        # called DEFAULT), '=' only (guest patterns may contain ':').
        parser = configparser.ConfigParser(interpolation=None, delimiters=('=',), comment_prefixes=('#', ';'),
                                           inline_comment_prefixes=None, default_section='\0none', strict=True)
        parser.optionxform = str  # type: ignore
        try:
            parser.read_string(text, source)
        except configparser.Error as exc:
            raise PolicyError('%s: %s' % (source, ' '.join(str(exc).split()))) from exc
        rules = []  # type: List[Tuple[str, List[str]]]
        for section in parser.sections():
            unknown = [key for key in parser[section] if key != 'allow']
            if unknown:
                raise PolicyError('%s: section [%s] has unknown keys %s (only "allow" is known)'
                                  % (source, section, ', '.join(sorted(unknown))))
            rules.append((section, parser[section].get('allow', '').split()))
        return cls(rules, source)

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
        found = []  # type: List[str]
        for pattern, commands in self.rules:
            if fnmatch.fnmatchcase(guest, pattern):
                found.extend(commands)
        return found

    def allows(self, guest: str, command: str) -> bool:
        return any(fnmatch.fnmatchcase(command, pattern) for pattern in self.allowed_patterns(guest))

    __call__ = allows

    def __repr__(self) -> str:
        return 'Policy(%r)' % (self.rules,)
