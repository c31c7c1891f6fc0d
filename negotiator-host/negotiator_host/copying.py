"""
``negotiator-host --copy SOURCE... TARGET``: files between the host and a guest, as scp writes them.

A guest's path is written ``GUEST:PATH`` (a colon before any slash, as scp reads it: a local
name with a colon is written ``./a:b``); ``-`` is standard input as a SOURCE and standard output
as a TARGET. Either every SOURCE is local and the TARGET is in a guest (a push), or every SOURCE
is in one guest and the TARGET is local (a pull). With several sources the target is a
directory. Each copy goes through :meth:`GuestChannel.push <negotiator_host.channel.GuestChannel.push>`
or :meth:`~negotiator_host.channel.GuestChannel.pull`; on a terminal, a transfer that lasts
more than a moment shows a progress bar on standard error.
"""

import os
import sys
import time
from typing import Any, List, Optional, Tuple

from negotiator_common.cli_support import UsageError, printable

__all__ = ('CopyPlan', 'plan_copy', 'run_copy', 'ProgressBar', 'PROGRESS_DELAY')

PROGRESS_DELAY = 1.0
"""Seconds a transfer runs before its progress bar appears: a quick copy draws nothing."""

_REDRAW = 0.1
"""Seconds between two drawings of the progress bar."""

STDIO = '-'


def split_guest_path(operand: str) -> Tuple[Optional[str], str]:
    """``GUEST:PATH`` as (guest, path); a local operand as (None, operand): a colon after a slash is a local name's."""
    colon = operand.find(':')
    slash = operand.find('/')
    if operand == STDIO or colon <= 0 or (0 <= slash < colon):
        return None, operand
    return operand[:colon], operand[colon + 1:]


class CopyPlan(object):
    """What a ``--copy`` command line asks: the guest, the direction, the sources and the target."""

    def __init__(self, guest: str, pushing: bool, sources: List[str], target: str, recursive: bool,
                 max_size: Optional[int] = None) -> None:
        self.guest = guest
        self.pushing = pushing
        self.sources = sources
        self.target = target
        self.recursive = recursive
        self.max_size = max_size


def plan_copy(operands: List[str], recursive: bool = False, max_size: Optional[int] = None) -> CopyPlan:
    """Read SOURCE... TARGET; :class:`UsageError` for a copy that is not between the host and one guest."""
    if len(operands) < 2:
        raise UsageError('--copy takes SOURCE... TARGET (a guest\'s path written GUEST:PATH)')
    split = [split_guest_path(operand) for operand in operands]
    guests = {guest for guest, _ in split if guest is not None}
    if len(guests) != 1:
        raise UsageError('--copy copies between the host and one guest: write the guest\'s paths GUEST:PATH'
                         if not guests else '--copy copies between the host and one guest at a time')
    guest = guests.pop()
    *sources, (target_guest, target) = split
    pushing = target_guest is not None
    if any((source_guest is not None) == pushing for source_guest, _ in sources):
        raise UsageError('--copy goes one way: every SOURCE local and the TARGET in the guest, or every SOURCE in'
                         ' the guest and the TARGET local')
    if pushing and max_size is not None:
        raise UsageError('--max-size bounds a copy from a guest (what a guest may send), not to one')
    paths = [path for _, path in sources]
    remote = [target] if pushing else paths
    if any(not path.startswith('/') for path in remote):
        raise UsageError('a guest\'s path must be absolute (GUEST:/PATH)')
    if paths.count(STDIO) > (0 if not pushing else 1) or (STDIO in paths and len(paths) > 1):
        raise UsageError('- (standard input) is one SOURCE alone')
    if len(paths) > 1:
        if target == STDIO:
            raise UsageError('several sources go to a directory, not to standard output')
        if pushing and not target.endswith('/'):
            target += '/'
        if not pushing and not os.path.isdir(target):
            raise UsageError('several sources go to a directory: %s is none' % printable(target))
    return CopyPlan(guest, pushing, paths, target, recursive, max_size)


class ProgressBar(object):
    """
    A one-line progress bar on standard error (only on a terminal), drawn once a transfer has
    run for :data:`PROGRESS_DELAY` seconds, at most every :data:`_REDRAW` seconds.
    """

    def __init__(self, label: str, stream: Any = None, clock: Any = time.monotonic) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = clock()
        self.drawn = 0.0
        self.visible = False
        self.enabled = bool(getattr(self.stream, 'isatty', lambda: False)())

    def __call__(self, done: int, total: Optional[int]) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.started < PROGRESS_DELAY or now - self.drawn < _REDRAW:
            return
        self.drawn = now
        self.visible = True
        self.stream.write('\r\x1b[K' + self.line(done, total, now - self.started))
        self.stream.flush()

    def line(self, done: int, total: Optional[int], elapsed: float) -> str:
        from humanfriendly import format_size
        rate = '%s/s' % format_size(done / elapsed if elapsed > 0 else 0, binary=True)
        if total:
            share = min(done, total) / total
            width = 20
            bar = '#' * int(share * width) + '-' * (width - int(share * width))
            return '%s [%s] %3d%% %s of %s, %s' % (printable(self.label), bar, share * 100,
                                                  format_size(done, binary=True), format_size(total, binary=True),
                                                  rate)
        return '%s %s, %s' % (printable(self.label), format_size(done, binary=True), rate)

    def close(self) -> None:
        """Erase the bar, so that what follows starts on a clean line."""
        if self.visible:
            self.stream.write('\r\x1b[K')
            self.stream.flush()


def run_copy(plan: CopyPlan, channel: Any) -> List[Tuple[str, Optional[BaseException]]]:
    """Copy each source in turn (a failure does not stop the others); each source with its error, if any."""
    outcomes: List[Tuple[str, Optional[BaseException]]] = []
    for source in plan.sources:
        bar = ProgressBar(source)
        try:
            _copy_one(plan, channel, source, bar)
            outcomes.append((source, None))
        except Exception as exc:
            from negotiator_common.errors import NegotiatorError
            if not isinstance(exc, (NegotiatorError, OSError)):
                raise
            outcomes.append((source, exc))
        finally:
            bar.close()
    return outcomes


def _copy_one(plan: CopyPlan, channel: Any, source: str, bar: ProgressBar) -> None:
    if plan.pushing:
        local: Any = sys.stdin.buffer if source == STDIO else source
        channel.push(local, plan.target, recursive=plan.recursive, progress=bar)
    else:
        local = sys.stdout.buffer if plan.target == STDIO else plan.target
        channel.pull(source, local, recursive=plan.recursive, progress=bar, max_size=plan.max_size)
