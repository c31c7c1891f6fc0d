"""
The ``negotiator-host`` program's quick way for its most common call: ``--execute=COMMAND GUEST``
(``-t SECONDS`` allowed) through the host daemon, on one thread, importing socket and json.

Why a second driver of the protocol beside :class:`~negotiator_common.client.AgentClient`: a CLI
call lives for one request, and what it imports is most of its own cost. The full client (its
threads, the endpoint, :mod:`typing`) costs tens of milliseconds more than a dozen lines of
socket and json do (``docs/benchmark.rst``, "one CLI call through the daemon"), which a monitoring
check pays on every call. So :func:`main` takes the plainest form of the call and sends what
the full client sends (``hello`` naming the guest and ``execute`` with the same bounds,
:mod:`negotiator_common.callbounds`, but both at once: the agent's ``kill_grace`` is assumed to
be its default, and a COMMAND of at most :data:`MAX_COMMAND` bytes is within any agent's
limits), and hands everything else to :mod:`negotiator_host.cli` before anything runs in the
guest: any other option, a command that needs a shell's quoting to split, no daemon listening,
a daemon that does not serve the guest. The full path then says why in its own words. A
refusal of this user, and any failure once the command was sent, is written as the full CLI
writes it, by the full CLI's own functions, imported only then.

This module and those it imports at start import nothing else, not even :mod:`typing` (mypy
reads the names of its annotations under ``if MYPY:``).
"""

import json
import math
import socket
import sys
import time

from negotiator_common.callbounds import DEFAULT_KILL_GRACE, OUTPUT_WINDOW, command_timeout_for
from negotiator_host.local_socket import socket_path

MYPY = False
if MYPY:  # annotations only (mypy.ini: always_true = MYPY)
    from typing import Any, Dict, List, Optional, Tuple

__all__ = ('main', 'DEFAULT_TIMEOUT')

DEFAULT_TIMEOUT = 10.0
"""Seconds that a call may take when --timeout does not say (the full CLI's default too)."""

MAX_COMMAND = 4096
"""
The longest COMMAND (in bytes) that takes the quick way: the request is sent before the agent's
limits are known, so only one far within any agent's is; a longer one goes the full way, which
checks it against them first.
"""

MAX_LINE = 1024 * 1024
"""The longest line read from the daemon: its own replies and notifications are far shorter."""

_HELLO_ID, _EXECUTE_ID = 'hello', 1
_SHELL_QUOTING = frozenset('\'"\\')


class _Fallback(Exception):
    """Nothing ran in the guest: the full CLI takes the call over."""


class _OutputClosed(Exception):
    """Our standard output or error was closed by its reader (``| head``): the call ends as the full CLI's does."""


def _write_all(stream: 'Any', data: bytes) -> None:
    """All of ``data`` to a text stream's binary side, flushed (an unbuffered one may take part of a write)."""
    try:
        view = memoryview(data)
        while view:
            view = view[stream.buffer.write(view) or 0:]
        stream.buffer.flush()
    except BrokenPipeError as exc:
        raise _OutputClosed() from exc


def main() -> None:
    """The ``negotiator-host`` program: the quick way when the call allows it, else the full CLI."""
    arguments = sys.argv[1:]
    call = plain_call(arguments)
    if call is not None:
        try:
            sys.exit(_QuickCall(*call).run())
        except _Fallback:
            pass
    from negotiator_host.cli import main as full_main
    full_main(arguments)


def plain_call(arguments: 'List[str]') -> 'Optional[Tuple[List[str], str, float, str]]':
    """
    The command's argv, the guest, the timeout and the daemon's socket of ``--execute=COMMAND
    GUEST`` (also ``-e COMMAND``, ``-eCOMMAND``, ``-t``/``--timeout`` with a number of seconds and
    ``--socket=PATH``, in any order);
    None for any other command line, and for a COMMAND that a shell's quoting rules would split
    otherwise than on spaces (the full CLI splits those).
    """
    command: 'Optional[str]' = None
    guests: 'List[str]' = []
    timeout = DEFAULT_TIMEOUT
    daemon_socket: 'Optional[str]' = None
    rest = list(arguments)
    while rest:
        item = rest.pop(0)
        if item in ('-e', '--execute', '-t', '--timeout', '--socket') and rest:
            name, value = item, rest.pop(0)
        elif item.startswith('--') and '=' in item:
            name, _, value = item.partition('=')
        elif item[:2] in ('-e', '-t') and len(item) > 2:
            name, value = item[:2], item[2:]
        elif item.startswith('-') or not item:
            return None
        else:
            guests.append(item)
            continue
        if name in ('-e', '--execute') and command is None:
            command = value
        elif name in ('-t', '--timeout'):
            timeout = _seconds(value)
        elif name == '--socket' and value:
            daemon_socket = value
        else:
            return None
    if command is None or len(guests) != 1 or not timeout or not _plain_words(command) \
            or len(command.encode('utf-8')) > MAX_COMMAND:
        return None
    if not _is_utf8(guests[0]):
        return None
    return command.split(), guests[0], timeout, socket_path(daemon_socket)


def _seconds(value: str) -> float:
    """A plain number of seconds (0 for anything else: the full CLI reads timespans and 0)."""
    try:
        seconds = float(value)
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and 0 < seconds <= 86400 else 0.0


def _plain_words(command: str) -> bool:
    """True when splitting on spaces is what a shell's rules would do: printable, no quote, no backslash."""
    return bool(command.split()) and command.isprintable() and not _SHELL_QUOTING.intersection(command)


def _is_utf8(name: str) -> bool:
    try:
        name.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


class _QuickCall(object):
    """One ``execute`` through the daemon's socket: output passed through under credit, the status returned."""

    def __init__(self, argv: 'List[str]', guest: str, timeout: float, path: str) -> None:
        self.argv, self.guest, self.timeout, self.path = argv, guest, timeout, path
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = b''
        self.ungranted = 0

    def run(self) -> int:
        try:
            refusal = self._attach()
            return self._execute() if refusal is None else self._failure(refusal)
        except KeyboardInterrupt:
            sys.stderr.write('negotiator-host: interrupted\n')
            return 130
        except _OutputClosed:
            from negotiator_common.cli_support import silence_broken_pipe
            silence_broken_pipe()
            return 141
        finally:
            self.sock.close()  # a command still running is cancelled by the daemon

    def _attach(self) -> 'Optional[BaseException]':
        """
        Connect, send ``hello`` naming the guest and the ``execute`` at once (as the floor does:
        one trip fewer through the daemon's threads), and read the answer to ``hello``: None when
        attached (the command is on its way), or the daemon's refusal of this user.
        :class:`_Fallback` when nothing ran: the daemon answers ``hello`` before it reads the
        next request (an inline method) and runs nothing on a connection without a guest, so a
        failed ``hello``, or a connection closed before its answer, ran nothing.
        """
        hello = {'guest': self.guest, 'protocol': 1, 'agent': 'negotiator-host'}
        execute = {'command': self.argv[0], 'args': self.argv[1:], 'stream': 'raw', 'window': OUTPUT_WINDOW,
                   'timeout': command_timeout_for(self.timeout, DEFAULT_KILL_GRACE)}
        try:
            self.sock.settimeout(self._remaining())
            self.sock.connect(self.path)
        except OSError:
            raise _Fallback() from None
        try:
            self._write(b'\n', _request(_HELLO_ID, 'hello', hello) + _request(_EXECUTE_ID, 'execute', execute))
            reply = self._reply(_HELLO_ID)
        except socket.timeout:
            from negotiator_common.errors import CallTimeout
            return CallTimeout('the host daemon at %s did not answer about %s within %s seconds'
                               % (self.path, self.guest, self.timeout))
        except (OSError, EOFError):
            raise _Fallback() from None
        if 'error' in reply:
            return self._refusal(reply['error'])
        return None

    @staticmethod
    def _refusal(error: 'Any') -> BaseException:
        """
        A refusal of this user (77) is final and written here, as the daemon audited it once;
        any other failure to attach (not served: a direct connection is the way) is the full
        path's to handle.
        """
        from negotiator_common.errors import CommandNotAllowed, error_from_wire
        refusal = error_from_wire(error)
        if isinstance(refusal, CommandNotAllowed):
            return refusal
        raise _Fallback()

    def _execute(self) -> int:
        try:
            reply = self._reply(_EXECUTE_ID, on_output=self._output)
        except socket.timeout:
            from negotiator_common.errors import CallTimeout
            return self._failure(CallTimeout('%s did not reply to execute within %s seconds'
                                             % (self.guest, self.timeout)))
        except (OSError, EOFError, ValueError) as exc:
            from negotiator_common.errors import ConnectionClosed
            return self._failure(ConnectionClosed('connection to %s closed before the reply to execute arrived (%s)'
                                                  % (self.guest, exc or 'closed by the host daemon')))
        if 'error' in reply:
            from negotiator_common.errors import error_from_wire
            return self._failure(error_from_wire(reply['error']))
        return self._status(reply.get('result'))

    def _status(self, result: 'Any') -> int:
        """The command's status as a shell gives it; a result out of the spec fails as the full client fails it."""
        exit_status = result.get('exit_status') if isinstance(result, dict) else None
        if type(exit_status) is int and 0 <= exit_status <= 255 and not result.get('signal'):
            return exit_status
        from negotiator_common.client import execute_fields
        from negotiator_common.cli_support import signal_note
        try:
            signal = execute_fields(result)['signal']
        except Exception as exc:
            return self._failure(exc)
        sys.stderr.write(signal_note('negotiator-host', self.argv[0], 'in ' + self.guest, signal))
        return 128 + signal

    def _failure(self, error: BaseException) -> int:
        from negotiator_host.cli import report_failure
        return report_failure(error)

    def _output(self, params: 'Dict[str, Any]') -> None:
        """One ``output`` frame of this call: its bytes to our stdout or stderr, then credit for them."""
        size, stream = params.get('size'), params.get('stream')
        if stream not in ('stdout', 'stderr'):
            raise ValueError('an output frame out of the spec: %r' % (params,))
        if 'size' not in params:  # an agent without raw output sends its chunks in JSON
            from negotiator_common.protocol import decode_bytes
            data = decode_bytes(params, 'data') or b''
            size = len(data)
        elif type(size) is int and 0 <= size <= OUTPUT_WINDOW:
            data = self._read(size)
        else:
            raise ValueError('an output frame out of the spec: %r' % (params,))
        _write_all(sys.stdout if stream == 'stdout' else sys.stderr, data)
        self.ungranted += size
        if self.ungranted >= OUTPUT_WINDOW // 2:
            self._notify('credit', {'id': _EXECUTE_ID, 'bytes': self.ungranted})
            self.ungranted = 0

    def _reply(self, request_id: object, on_output: 'Any' = None) -> 'Dict[str, Any]':
        """Read until the reply to ``request_id``; this call's output frames go to ``on_output``."""
        while True:
            line = self._line()
            message = json.loads(line.decode('utf-8')) if line.strip() else {}
            if not isinstance(message, dict):
                raise ValueError('a message that is not an object')
            params = message.get('params')
            if message.get('method') == 'output' and isinstance(params, dict):
                if on_output is None or params.get('id') != request_id:
                    raise ValueError('output that no call of this connection asked for')
                on_output(params)
            elif 'method' not in message and message.get('id') == request_id:
                return message

    def _line(self) -> bytes:
        while b'\n' not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ValueError('a line of over %d bytes from the host daemon' % MAX_LINE)
            self._receive()
        line, self.buffer = self.buffer.split(b'\n', 1)
        return line

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._receive()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _receive(self) -> None:
        self.sock.settimeout(self._remaining())
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError('closed by the host daemon')
        self.buffer += chunk

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout('timed out')
        return remaining

    def _notify(self, method: str, params: 'Dict[str, Any]') -> None:
        self._write(b'', _line({'jsonrpc': '2.0', 'method': method, 'params': params}))

    def _write(self, prefix: bytes, lines: bytes) -> None:
        self.sock.settimeout(self._remaining())
        self.sock.sendall(prefix + lines)


def _request(request_id: object, method: str, params: 'Dict[str, Any]') -> bytes:
    return _line({'jsonrpc': '2.0', 'id': request_id, 'method': method, 'params': params})


def _line(message: 'Dict[str, Any]') -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(',', ':')).encode('utf-8') + b'\n'
