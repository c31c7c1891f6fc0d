"""
The processes a command starts: finding them, killing them, and reaping the ones this agent adopts.

A command runs in a process group of its own, and ``killpg`` of that group reaches every
process that stayed in it. A process can leave the group (``setsid``, a daemon's double
fork), keep the command's output pipes open and outlive it. Three mechanisms find those:

- **A marker.** Every run gets a random value in its environment (:data:`MARKER_VARIABLE`),
  which every process it starts inherits. The processes of a run are the descendants of this
  process that are in its group or whose ``/proc/PID/environ`` holds its marker.
- **Adoption.** An orphan normally becomes a child of init, where it is no longer anybody's
  descendant. :func:`adopt_orphans` makes this process a "child subreaper"
  (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+): orphans of its descendants become its
  children instead, so they stay findable. Without it (other systems, or a failed ``prctl``),
  a process that left the group and whose parent died is out of reach.
- **Reaping.** An adopted orphan that exits is a zombie of this process until someone waits for
  it. ``waitpid(-1)`` would also take the exit status of a command that
  :class:`subprocess.Popen` is waiting for, so :func:`reap_orphans` waits only for specific
  pids: zombies whose parent is this process, in a session other than this process's (every
  command starts a session of its own, and so does anything that ``setsid`` made) and that are
  not the first process of a running command (:data:`COMMANDS`). Anything else that this
  process starts must stay in its session (as executor and subprocess do by default).

Limits: a process that leaves the group *and* rewrites its environment (or runs a program
that replaces it, e.g. ``env -u``) is found only while it is a member of the group; one that
changes user (``su``, a setuid program) can be killed only by root.
"""

import binascii
import ctypes
import os
import signal
import threading
import time
from typing import Dict, Iterator, List, NamedTuple, Optional

from negotiator_common.deadline import Deadline
from negotiator_common.lazylog import get_logger

__all__ = ('MARKER_VARIABLE', 'COMMANDS', 'adopt_orphans', 'new_marker', 'command_processes',
           'signal_command', 'kill_command', 'reap_orphans', 'OrphanReaper', 'ProcessInfo')

logger = get_logger(__name__)

MARKER_VARIABLE = 'NEGOTIATOR_RUN'
"""The environment variable whose random value marks every process of one run."""

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

KILL_ROUND_PAUSE = 0.01
"""Seconds between the rounds of :func:`kill_command` (the killed need a moment to die)."""

ProcessInfo = NamedTuple('ProcessInfo', [('pid', int), ('state', str), ('ppid', int), ('pgrp', int),
                                         ('session', int)])

_adopting = False


def adopt_orphans(enabled: bool = True) -> bool:
    """
    Make this process the parent of its descendants' orphans (or stop: ``enabled=False``).

    Only a process that reaps them should adopt them: the daemons call :func:`reap_orphans`
    on SIGCHLD (through an :class:`OrphanReaper`). Returns whether the kernel agreed.
    """
    global _adopting
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter is linked with
        failed = libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0
        reason = os.strerror(ctypes.get_errno()) if failed else ''
    except (OSError, AttributeError) as exc:  # no libc or no prctl: not Linux
        failed, reason = True, str(exc)
    if failed and enabled:
        logger.warning("Cannot adopt the orphans of commands (%s): a process that leaves its command's "
                       "process group and outlives its parent may survive a timeout", reason)
        enabled = False
    _adopting = enabled
    return not failed


def new_marker() -> str:
    """A fresh random value for :data:`MARKER_VARIABLE`."""
    return binascii.hexlify(os.urandom(12)).decode('ascii')


def _read_stat(pid: int) -> Optional[ProcessInfo]:
    try:
        with open('/proc/%d/stat' % pid, 'rb') as handle:
            fields = handle.read().rsplit(b')', 1)[1].split()
        return ProcessInfo(pid, fields[0].decode('ascii'), int(fields[1]), int(fields[2]), int(fields[3]))
    except (OSError, IndexError, ValueError):
        return None  # gone, or not a process we can see


def _all_processes() -> Iterator[ProcessInfo]:
    for name in os.listdir('/proc'):
        if name.isdigit():
            info = _read_stat(int(name))
            if info is not None:
                yield info


def _children_from_proc(pid: int) -> Optional[List[int]]:
    """
    The children of ``pid`` as the kernel lists them per thread (``/proc/PID/task/TID/children``,
    Linux 3.5+ with ``CONFIG_PROC_CHILDREN``, as in Debian's and RHEL's kernels); None where
    those files do not exist. Reading a few files per descendant instead of the ``stat`` of
    every process matters in an emulated guest: a full scan there took about 0.2 s, several
    times per stopped command.
    """
    try:
        tasks = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return []  # gone
    children: List[int] = []
    for task in tasks:
        try:
            with open('/proc/%d/task/%s/children' % (pid, task), 'rb') as handle:
                children.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists('/proc/%d/task/%s' % (pid, task)):
                continue  # the thread ended
            return None
        except (OSError, ValueError):
            continue
    return children


def _descendants(ancestor: int) -> List[ProcessInfo]:
    """The processes below ``ancestor`` in the parent tree: from the kernel's children lists, else a full scan."""
    found: List[ProcessInfo] = []
    todo = [ancestor]
    while todo:
        children = _children_from_proc(todo.pop())
        if children is None:
            return _descendants_by_scan(list(_all_processes()), ancestor)
        for child in children:
            info = _read_stat(child)
            if info is not None:
                found.append(info)
                todo.append(child)
    return found


def _descendants_by_scan(processes: List[ProcessInfo], ancestor: int) -> List[ProcessInfo]:
    """The processes below ``ancestor`` found from every process's PPid (where there are no children lists)."""
    children: Dict[int, List[ProcessInfo]] = {}
    for info in processes:
        children.setdefault(info.ppid, []).append(info)
    found, todo = [], [ancestor]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child.pid)
    return found


def _has_marker(pid: int, marker: str) -> bool:
    try:
        with open('/proc/%d/environ' % pid, 'rb') as handle:
            environment = handle.read()
    except OSError:
        return False
    return ('%s=%s' % (MARKER_VARIABLE, marker)).encode('ascii') in environment.split(b'\0')


def command_processes(group: int, marker: str) -> List[int]:
    """The live processes of one run: descendants of this process in ``group`` or with ``marker``."""
    found = []
    for info in _descendants(os.getpid()):
        if info.state not in ('Z', 'X') and (info.pgrp == group or _has_marker(info.pid, marker)):
            found.append(info.pid)
    return found


def _signal(pid: int, signum: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def signal_command(group: int, marker: str, signum: int) -> List[int]:
    """Send ``signum`` to the run's process group, then to its processes outside it; return those."""
    _signal(group, signum, group=True)
    outside = command_processes(group, marker)
    for pid in outside:
        _signal(pid, signum)
    return outside


def kill_command(group: int, marker: str, give_up_after: float) -> bool:
    """
    SIGKILL every process of a run, round after round, until none is left alive.

    A process may fork while its siblings are being killed; the next round finds the child.
    Returns False (and logs) if processes were still alive after ``give_up_after`` seconds.
    """
    deadline = Deadline(give_up_after)
    while True:
        left = signal_command(group, marker, signal.SIGKILL)
        if not left:
            return True
        if deadline.expired:
            logger.warning("Processes %s of a stopped command survived SIGKILL for %s s", left, give_up_after)
            return False
        time.sleep(KILL_ROUND_PAUSE)


class _Commands(object):
    """
    The first process of every running command (the child that :class:`subprocess.Popen` waits for).

    The reaper must never wait for one of those. A command that exits before the runner has
    registered it would look like an orphan, so the reaper does nothing while one is starting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starting = 0
        self._running: Dict[int, str] = {}

    def starting(self) -> '_Starting':
        """A context for starting a command: register its pid with :meth:`add` inside it."""
        return _Starting(self)

    def add(self, pid: int, marker: str) -> None:
        with self._lock:
            self._running[pid] = marker

    def remove(self, pid: int) -> None:
        """Forget ``pid``, once the runner has waited for it."""
        with self._lock:
            self._running.pop(pid, None)

    def kill_all(self, give_up_after: float) -> int:
        """SIGKILL every process of every running command (a daemon that must stop now); return how many commands."""
        with self._lock:
            running = dict(self._running)
        for pid, marker in running.items():
            logger.warning("Killing command %d and its processes: it did not stop in time", pid)
            kill_command(pid, marker, give_up_after)
        return len(running)

    def _begin(self, delta: int) -> None:
        with self._lock:
            self._starting += delta

    def reap(self, candidates: List[int]) -> Optional[int]:
        """
        Wait for each candidate that is still an adopted zombie; return how many were reaped, or
        None when nothing could be decided because a command was starting.
        """
        reaped = 0
        with self._lock:
            if self._starting:
                return None
            for pid in candidates:
                info = _read_stat(pid)
                if pid not in self._running and info is not None and _is_adopted_zombie(info):
                    try:
                        os.waitpid(pid, os.WNOHANG)
                        reaped += 1
                    except ChildProcessError:
                        pass
        return reaped


class _Starting(object):
    def __init__(self, commands: _Commands) -> None:
        self.commands = commands

    def __enter__(self) -> None:
        self.commands._begin(1)

    def __exit__(self, *exc_info: object) -> None:
        self.commands._begin(-1)


COMMANDS = _Commands()
"""The commands this process is running (:mod:`negotiator_common.runner` registers them)."""


def _is_adopted_zombie(info: ProcessInfo) -> bool:
    return info.state == 'Z' and info.ppid == os.getpid() and info.session != os.getsid(0)


def reap_orphans() -> Optional[int]:
    """
    Wait for the adopted orphans that have exited (see the module's documentation); return how
    many, or None if a command was starting (try again later).
    """
    if not _adopting:
        return 0
    children = _children_from_proc(os.getpid())
    infos = _all_processes() if children is None else (_read_stat(pid) for pid in children)
    return COMMANDS.reap([info.pid for info in infos if info is not None and _is_adopted_zombie(info)])


def _has_zombie_child() -> bool:
    """Whether any child of this process has exited and not been waited for (nothing is reaped)."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


class OrphanReaper(object):
    """
    When a daemon sweeps for adopted orphans: a little after a SIGCHLD, and only if a child exited.

    Every command's own exit raises SIGCHLD too, and a sweep reads all of ``/proc`` (5 ms for 90
    processes here, ten times more in an emulated guest), so a sweep waits :attr:`delay` seconds
    (by then the runner has waited for its command) and happens only if some child is still a
    zombie (``waitid`` with ``WNOWAIT``, which reaps nothing).
    """

    def __init__(self, delay: float = 0.5) -> None:
        self.delay = delay
        self.due: Optional[float] = None

    def child_exited(self) -> None:
        """Note a SIGCHLD: sweep :attr:`delay` seconds from now."""
        if self.due is None:
            self.due = time.monotonic() + self.delay

    def sweep_if_due(self) -> int:
        """Sweep if the time has come; return how many orphans were reaped."""
        if self.due is None or time.monotonic() < self.due:
            return 0
        self.due = None
        reaped = reap_orphans() if _has_zombie_child() else 0
        if reaped is None:  # a command was starting: look again a little later
            self.child_exited()
            return 0
        return reaped
