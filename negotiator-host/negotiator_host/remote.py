"""
Guests on another hypervisor: the protocol over ``ssh HYPERVISOR negotiator-host --bridge GUEST``.

:class:`SshBridge` starts ssh from an argv list (through :mod:`negotiator_common.external`,
never a shell on this side) with one end of a socket pair as its standard input and output, so
that the caller's endpoint reads and writes a socket as it does for a local channel. On the
hypervisor, ``negotiator-host --bridge`` (:mod:`negotiator_host.bridge`) joins the guest's
channel, through the host daemon there when it serves the guest.

The hypervisor and the guest's name are checked before ssh runs: neither may begin with ``-``
(ssh, or negotiator-host on the other side, would read it as an option) nor hold control
characters, and the hypervisor is one word (``[USER@]HOST``). ssh joins the remote command's
words and hands them to the remote user's shell, so the guest's name is quoted for that shell
(``shlex.quote``) and given after ``--``.

When the connection ends before the agent's ``hello`` (ssh could not connect, negotiator-host
is missing there, the guest is unknown there, its daemon refuses this user), ssh's exit status
and the last lines of its standard error say why: :meth:`SshBridge.failure` turns them into the
error that a local call would raise (``docs/host.rst``, "Guests on other hypervisors").
"""

import re
import shlex
import socket
import threading
from typing import TYPE_CHECKING, List, Optional, Sequence

from negotiator_common.errors import (
    CallTimeout, ChannelNotFound, CommandNotAllowed, ConnectionClosed, NegotiatorError,
)
from negotiator_common.exit_status import EXIT_REFUSED, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_USAGE
from negotiator_common.lazylog import get_logger

if TYPE_CHECKING:  # annotations only: executor is imported when ssh starts
    from negotiator_common.external import ExternalProgram

__all__ = ('SshBridge', 'DEFAULT_SSH', 'REMOTE_PROGRAM', 'check_hypervisor', 'check_guest_name', 'EXIT_WAIT')

logger = get_logger(__name__)

DEFAULT_SSH = ('ssh',)
"""The ssh command (with its options) unless the caller gives one: ``('ssh', '-p', '2222')`` and such."""

REMOTE_PROGRAM = 'negotiator-host'
"""What ssh runs on the hypervisor (found in the ``PATH`` of ssh's commands there)."""

EXIT_WAIT = 5.0
"""Seconds that a failed connection waits for ssh to exit, to learn its status."""

SSH_FAILED = 255
"""ssh's own exit status when it could not connect (or log in)."""

NOT_FOUND = 127
"""A shell's exit status for a command that does not exist (negotiator-host missing on the hypervisor)."""

_STDERR_TAIL = 4096
"""Bytes of ssh's standard error kept for the error message (the last ones)."""

_HYPERVISOR = re.compile(r'^[A-Za-z0-9_.%:+][A-Za-z0-9_.%:+@-]*$')


def check_hypervisor(hypervisor: str) -> str:
    """``[USER@]HOST`` as ssh takes it, one word that cannot be an option; ValueError otherwise."""
    if not _HYPERVISOR.match(hypervisor or ''):
        raise ValueError('a hypervisor is [USER@]HOST (letters, digits and ._%%:+@-, not beginning with -), not %r'
                         % (hypervisor,))
    return hypervisor


def check_guest_name(name: str) -> str:
    """A guest's name that can travel to a hypervisor: not empty, no leading ``-``, no control characters."""
    if not name or name.startswith('-') or not name.isprintable():
        raise ValueError('a guest reached over ssh needs a name without control characters that does not begin'
                         ' with -, not %r' % (name,))
    return name


class SshBridge(object):
    """
    One ``ssh HYPERVISOR negotiator-host --bridge -- GUEST``: :meth:`start` returns the socket that
    carries the guest's channel; :meth:`failure` explains a connection that ended early;
    :meth:`close` ends ssh.
    """

    def __init__(self, hypervisor: str, guest: str, ssh: Sequence[str] = DEFAULT_SSH) -> None:
        self.hypervisor = check_hypervisor(hypervisor)
        self.guest = check_guest_name(guest)
        self.ssh = list(ssh) or list(DEFAULT_SSH)
        self._program: 'Optional[ExternalProgram]' = None
        self._stderr = bytearray()
        self._stderr_done = threading.Event()

    @property
    def argv(self) -> List[str]:
        """ssh's argv: its options, ``--``, the hypervisor, and the remote command as one quoted string."""
        remote = '%s --bridge -- %s' % (REMOTE_PROGRAM, shlex.quote(self.guest))
        return self.ssh + ['-T', '-o', 'BatchMode=yes', '--', self.hypervisor, remote]

    def start(self) -> socket.socket:
        """Start ssh; our end of its standard input and output."""
        from negotiator_common.external import ExternalProgram
        ours, theirs = socket.socketpair()
        try:
            self._program = ExternalProgram(self.argv, connect=theirs.fileno(), logger_name=__name__)
            try:
                process = self._program.start()
            except OSError as exc:
                raise ChannelNotFound('cannot run %s to reach %s: %s' % (self.ssh[0], self.hypervisor,
                                                                        exc.strerror or exc)) from exc
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        logger.info("Reaching %s on %s through %s (pid %d)", self.guest, self.hypervisor, self.ssh[0], process.pid)
        reader = threading.Thread(target=self._read_stderr, name='negotiator-ssh-stderr')
        reader.daemon = True
        reader.start()
        return ours

    def _read_stderr(self) -> None:
        """Keep the last bytes of ssh's standard error (read to its end, so that ssh never waits on it)."""
        assert self._program is not None
        pipe = self._program.process.stderr
        assert pipe is not None  # executor captures ssh's standard error
        try:
            for line in iter(pipe.readline, b''):
                logger.debug("ssh to %s: %s", self.hypervisor, line.rstrip())
                self._stderr += line
                del self._stderr[:-_STDERR_TAIL]
        except (OSError, ValueError):
            pass
        finally:
            self._stderr_done.set()

    def failure(self, error: NegotiatorError) -> NegotiatorError:
        """
        The error to raise for ``error`` (the connection closed before the agent's ``hello``):
        what ssh's exit status and standard error say (within :data:`EXIT_WAIT`), else ``error``.
        """
        if self._program is None or not isinstance(error, ConnectionClosed):
            return error
        try:
            status = self._program.process.wait(EXIT_WAIT)
        except Exception:  # still running (subprocess.TimeoutExpired): nothing more to learn
            return error
        self._stderr_done.wait(EXIT_WAIT)
        said = ' '.join(bytes(self._stderr).decode('utf-8', 'replace').split())
        return _error_for(status, said, self.hypervisor, self.ssh[0]) or error

    def close(self) -> None:
        """End ssh (it ends by itself once its standard input closes; this is for one that does not)."""
        program, self._program = self._program, None
        if program is None:
            return
        try:
            program.process.wait(EXIT_WAIT)
        except Exception:  # subprocess.TimeoutExpired: close() kills it
            pass
        program.close()


def _error_for(status: int, said: str, hypervisor: str, ssh: str) -> Optional[NegotiatorError]:
    """The error for ssh's exit ``status`` and what its standard error ``said``; None for a status that says nothing."""
    where = 'on %s' % hypervisor
    if status == SSH_FAILED:
        return ChannelNotFound('%s could not reach %s: %s' % (ssh, hypervisor, said or 'no reason given'))
    if status == NOT_FOUND:
        return ChannelNotFound('%s is not installed %s (or not in the PATH of commands run by ssh): %s'
                               % (REMOTE_PROGRAM, where, said or 'command not found'))
    if status == EXIT_USAGE:
        return ChannelNotFound('%s %s cannot bridge (a release older than --bridge?): %s' % (REMOTE_PROGRAM, where,
                                                                                            said))
    if status == EXIT_REFUSED:
        return CommandNotAllowed('%s: %s' % (where, said))
    if status == EXIT_TIMEOUT:
        return CallTimeout('%s: %s' % (where, said))
    if status == EXIT_UNAVAILABLE:
        return ChannelNotFound('%s: %s' % (where, said))
    if said:
        return ConnectionClosed('%s ended with status %d %s: %s' % (ssh, status, where, said))
    return None
