"""
Starting a program through :mod:`executor`, from an argv list and never through a shell.

Every process that negotiator starts (a command for a peer, ``virsh``) starts here, and this is
the one module that knows executor's insides: the callers get a :class:`ExternalProgram` and the
standard library's :class:`subprocess.Popen` of the running program, with pipes for its output
(and its input, when asked for).

executor has no option for two things that the runner needs on the one ``fork``/``exec`` of a
command: a session of its own (so that its pid is its process group's id, and a stop reaches
every process it started) and exactly the environment it is given (executor copies the agent's
own environment and adds its ``environment`` option to it). Wrapper programs such as ``setsid``
and ``env -i`` would cost two more ``exec`` calls per command, which is slow in an emulated
guest. So :class:`_ArgvCommand`, the one subclass of executor's ``ExternalCommand``, sets both
on the keyword arguments that executor's ``start()`` prepares and hands to its internal
``start_once()``, which passes them on to :class:`subprocess.Popen`. That internal method and
its signature were checked against executor 23.2 (the newest release), which is why
``negotiator-common`` pins ``executor >=23.2,<24``.

executor is imported when this module is: it costs tens of milliseconds, so modules on a quick
call's path import this one only when they start a program.
"""

import errno
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from executor import ExternalCommand

from negotiator_common.lazylog import get_logger

if TYPE_CHECKING:  # annotations only
    import subprocess

__all__ = ('ExternalProgram',)


class _ArgvCommand(ExternalCommand):
    """
    executor's command, with the :class:`subprocess.Popen` keyword arguments ``popen_overrides``
    (``env``, ``start_new_session``) set on the way to Popen.

    Why a subclass: a new session and an environment that is exactly the one given are not
    options of executor, and setting them in ``start_once()`` (executor's internal second half
    of ``start()``, which receives Popen's keyword arguments) puts them on executor's one
    ``fork``/``exec``. Checked against executor 23.2 (see the module's documentation).
    """

    def __init__(self, argv: Sequence[str], popen_overrides: Dict[str, Any], **options: Any) -> None:
        super().__init__(*argv, **options)
        self.popen_overrides = popen_overrides

    def start_once(self, check: Optional[bool] = None, **kw: Any) -> None:
        kw.update(self.popen_overrides)
        super().start_once(check=check, **kw)


class ExternalProgram(object):
    """
    One program run from ``argv`` (``shell=False``): :meth:`start`, use :attr:`process`, :meth:`close`.

    :param argv: the program and its arguments.
    :param environment: the program's whole environment (None: the agent's own).
    :param new_session: start it in a session (and process group) of its own.
    :param stdin: give it a pipe for its standard input (False: ``/dev/null``).
    :param directory: its working directory (None: the agent's).
    :param connect: a descriptor (a socket) that is the program's standard input and output,
                    instead of pipes (its standard error stays a pipe): ssh's, to carry a channel.
    :param logger_name: the logger through which executor logs what it starts, at DEBUG (None:
                        executor's own logger).
    """

    def __init__(self, argv: Sequence[str], environment: Optional[Dict[str, str]] = None,
                 new_session: bool = False, stdin: bool = False, directory: Optional[str] = None,
                 logger_name: Optional[str] = None, connect: Optional[int] = None) -> None:
        overrides: Dict[str, Any] = {}
        if connect is not None:
            overrides.update(stdin=connect, stdout=connect)
        if environment is not None:
            overrides['env'] = dict(environment)
        if new_session:
            overrides['start_new_session'] = True
        options: Dict[str, Any] = {'input': True} if stdin else {}
        if directory is not None:
            options['directory'] = directory
        if logger_name is not None:
            options['logger'] = get_logger(logger_name)
        self.argv = list(argv)
        self.directory = directory
        self._command = _ArgvCommand(self.argv, overrides, shell=False, asynchronous=True, capture=True,
                                     capture_stderr=True, buffered=False, check=False, silent=True, **options)
        self._process: 'Optional[subprocess.Popen]' = None

    def start(self) -> 'subprocess.Popen':
        """
        Start the program; return its :class:`subprocess.Popen`, whose ``stdout`` and ``stderr``
        (and ``stdin``, if asked for) are pipes.

        :raises FileNotFoundError: the program, the interpreter its ``#!`` line names, or the
                                   directory it was to run in does not exist.
        :raises OSError: it could not be started for another reason (permissions...).
        """
        self._command.start()
        process = self._command.subprocess
        if process is None:  # executor turns ENOENT from Popen into its "command not found" status 127
            if self.directory is not None and not os.path.isdir(self.directory):  # Popen's ENOENT was the chdir's
                raise FileNotFoundError(errno.ENOENT, 'its directory %s does not exist' % self.directory,
                                        self.directory)
            raise FileNotFoundError(errno.ENOENT, 'it or its interpreter does not exist', self.argv[0])
        self._process = process
        return process

    @property
    def process(self) -> 'subprocess.Popen':
        """The running program (after :meth:`start`)."""
        if self._process is None:
            raise RuntimeError('%s was not started' % self.argv[0])
        return self._process

    def close(self) -> None:
        """
        Release the program's pipes and what executor holds for it (``/dev/null`` for its
        input, its exit status); one still running is killed first, so that this never waits for
        a program that may not end. Call it once the program has been waited for, or could not
        be started.
        """
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.kill()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        self._command.cleanup()
