"""
The bounds a caller puts into an ``execute`` request: how long the agent may let the command
run within the caller's own timeout, and how much output may be on its way unread.

Both drivers of a call read them here: :class:`~negotiator_common.client.AgentClient` (threads,
any call) and :mod:`negotiator_host.oneshot` (the CLI's plainest call through the host daemon,
which imports nothing it can do without). So this module imports nothing, not even
:mod:`typing`, which costs a short-lived CLI more than the rest of its own code.
"""

__all__ = ('OUTPUT_WINDOW', 'DEFAULT_KILL_GRACE', 'command_timeout_for')

OUTPUT_WINDOW = 2 * 1024 * 1024
"""
The room a caller grants for each command's output (``window`` of ``execute``): what the agent
may send before the caller has taken it, so that output waiting for a slow file costs at most
this much memory here and never holds up the other calls on the channel.
"""

DEFAULT_KILL_GRACE = 2.0
"""
Seconds between SIGTERM and SIGKILL when a command is stopped, and how long processes that left
the group of a command that exited may hold its output open: the agent's default (its
``kill_grace`` in ``hello``), which a caller that sends its request before it reads ``hello``
assumes.
"""


def command_timeout_for(timeout: float, kill_grace: float = 0.0) -> float:
    """
    The timeout to give the agent for a command, so that its own timeout reply (with the
    command's partial output) arrives before the caller's deadline does: the agent stops a
    command with SIGTERM, then SIGKILL ``kill_grace`` seconds later (its ``limits`` in
    ``hello``), and only then replies, so both the grace and a second for the reply's way back
    come off the caller's timeout (never more than half of it).
    """
    return max(timeout - kill_grace - 1.0, timeout * 0.5)
