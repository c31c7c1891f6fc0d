"""
Who may call guests through the host daemon's local socket.

The daemon's socket is open to every local user (mode 0666), so the daemon itself decides who
may call, from what the kernel says about the process at the other end of the connection
(``SO_PEERCRED``: its pid, uid and gid when it connected), never from anything the caller
sends: a client cannot claim to be someone else. :class:`Caller` is that answer, with the user's
name and the names of its groups from the user database.

:class:`CallerPolicy` decides: root may use every guest; anybody else only through a group of
theirs that a ``--allow-group`` option of the daemon names, either for every guest (``GROUP``)
or for the guests whose names match one of its patterns (``GROUP=PATTERN[,PATTERN...]``,
shell-style, ``fnmatch``, case-sensitive, as in :mod:`negotiator_host.policy`). Without the
option nobody but root may call. A value that names no group of this host, or holds an empty
group or pattern, is an error when the daemon starts, so that a typo never silently opens (or
closes) a guest.
"""

import fnmatch
import grp
import os
import pwd
import socket
import struct
from typing import Dict, FrozenSet, Iterable, List, Sequence, Tuple

from negotiator_common.peerlog import cut

__all__ = ('Caller', 'CallerPolicy', 'ALLOW_GROUP_OPTION')

ALLOW_GROUP_OPTION = '--allow-group'
"""The daemon's option that names the groups whose members may call (named in refusals)."""

_PEERCRED = struct.Struct('iII')
"""``struct ucred``: a pid (signed) then a uid and a gid (unsigned), the size of ``struct.calcsize('3i')``."""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _group_ids(uid: int, gid: int) -> List[int]:
    """
    The uid's groups in the user database (its primary group and every group that lists it),
    and ``gid``, the group the process runs as. A uid without a user entry has only ``gid``.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return [gid]
    return [gid] + list(os.getgrouplist(entry.pw_name, entry.pw_gid))


class Caller(object):
    """
    A local process that called the daemon: who the kernel says it is.

    :ivar uid: its user id; ``user`` its name (or the number, as text, when the id has no name).
    :ivar gid: the group id it ran as when it connected.
    :ivar pid: its process id when it connected (0 when it is in another pid namespace).
    :ivar groups: the names of every group of its uid (an id without a name: the number, as
                  text); see :func:`_group_ids` for which.
    """

    __slots__ = ('uid', 'gid', 'pid', 'user', 'groups')

    def __init__(self, uid: int, gid: int, pid: int, user: str, groups: Iterable[str]) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.user = user
        self.groups: FrozenSet[str] = frozenset(groups)

    @classmethod
    def from_ids(cls, uid: int, gid: int, pid: int) -> 'Caller':
        """The caller with these ids, its user and group names looked up in the user database."""
        groups = frozenset(_group_name(number) for number in _group_ids(uid, gid))
        return cls(uid, gid, pid, _user_name(uid), groups)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> 'Caller':
        """
        The process at the other end of a connected UNIX socket, from ``SO_PEERCRED``.

        :raises ValueError: when ``sock`` is not a UNIX socket (other sockets have no peer
                            credentials: the kernel would answer with the overflow uid).
        """
        if sock.family != socket.AF_UNIX:
            raise ValueError('peer credentials need a UNIX socket, not %r' % (sock,))
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
        return cls.from_ids(uid, gid, pid)

    def describe(self) -> str:
        """The caller for a message or a log line: ``uid 1000 (alice)``, or ``uid 1000`` without a name."""
        if self.user == str(self.uid):
            return 'uid %d' % self.uid
        return 'uid %d (%s)' % (self.uid, self.user)

    def __repr__(self) -> str:
        return 'Caller(uid=%d, gid=%d, pid=%d, user=%r, groups=%r)' % (
            self.uid, self.gid, self.pid, self.user, sorted(self.groups))


def _parse_option(value: str) -> Tuple[str, List[str]]:
    """One ``--allow-group`` value: ``GROUP`` (every guest, ``*``) or ``GROUP=PATTERN[,PATTERN...]``."""
    group, equals, patterns = value.partition('=')
    return group, (patterns.split(',') if equals else ['*'])


def _check_rule(group: str, patterns: Sequence[str], value: str) -> None:
    """
    Refuse a rule that would not do what it says: an empty or unknown group, no pattern, an
    empty pattern or one with whitespace around it. ``value`` names the option in the error.
    """
    if not group.strip():
        raise ValueError('%s %r names no group' % (ALLOW_GROUP_OPTION, value))
    if group.isdigit():
        raise ValueError('%s %r: name the group, not its number (a number could not be told from a'
                         ' group that has no name)' % (ALLOW_GROUP_OPTION, value))
    try:
        grp.getgrnam(group)
    except KeyError:
        raise ValueError('%s %r: there is no group %r on this host' % (ALLOW_GROUP_OPTION, value, group)) from None
    if not patterns:
        raise ValueError('%s %r names no guest pattern' % (ALLOW_GROUP_OPTION, value))
    for pattern in patterns:
        if not pattern:
            raise ValueError('%s %r holds an empty guest pattern' % (ALLOW_GROUP_OPTION, value))
        if pattern != pattern.strip():
            raise ValueError('%s %r: the guest pattern %r has whitespace around it'
                             % (ALLOW_GROUP_OPTION, value, pattern))


class CallerPolicy(object):
    """
    Which callers may use which guests through the daemon: root every guest, a member of a
    named group the guests that match one of the group's patterns, nobody else.

    :param rules: ``(group name, [guest name patterns])``; a group may come more than once
                  (its patterns add up).
    :raises ValueError: for a rule that names no group, a group unknown on this host, or an
                        empty pattern.
    """

    def __init__(self, rules: Sequence[Tuple[str, Sequence[str]]] = ()) -> None:
        self.rules: Dict[str, List[str]] = {}
        for group, patterns in rules:
            _check_rule(group, patterns, '%s=%s' % (group, ','.join(patterns)))
            self.rules.setdefault(group, []).extend(patterns)

    @classmethod
    def from_options(cls, values: Sequence[str]) -> 'CallerPolicy':
        """
        The policy of the daemon's ``--allow-group`` values: each ``GROUP`` (every guest) or
        ``GROUP=PATTERN[,PATTERN...]``.

        :raises ValueError: naming the value, for the errors of :class:`CallerPolicy`.
        """
        rules = []
        for value in values:
            group, patterns = _parse_option(value)
            _check_rule(group, patterns, value)
            rules.append((group, patterns))
        return cls(rules)

    def allows(self, caller: Caller, guest: str) -> bool:
        """Whether ``caller`` may use ``guest``: root always, others through a named group of theirs."""
        if caller.uid == 0:
            return True
        return any(fnmatch.fnmatchcase(guest, pattern)
                   for group in caller.groups & set(self.rules)
                   for pattern in self.rules[group])

    def allows_any(self, caller: Caller) -> bool:
        """Whether ``caller`` may use some guest (root, or a member of a group that a rule names)."""
        return caller.uid == 0 or bool(caller.groups & set(self.rules))

    def refusal(self, caller: Caller, guest: str) -> str:
        """
        The message of the ``CommandNotAllowed`` that refuses ``caller`` the use of ``guest``:
        who, which guest and which option would allow it; never the rules of other groups.
        """
        return ('%s may not use guest %s through the host daemon: it lets root use every guest, and'
                ' anybody else only through a group of theirs that its %s option names'
                ' (GROUP for every guest, GROUP=PATTERN[,PATTERN...] for the guests whose names match)'
                % (caller.describe(), cut(guest), ALLOW_GROUP_OPTION))

    def __repr__(self) -> str:
        return 'CallerPolicy(%r)' % (sorted(self.rules.items()),)
