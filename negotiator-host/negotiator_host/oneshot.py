"""
The ``negotiator-host`` program's quick way for its most common call: ``--execute=COMMAND GUEST``
(``-t SECONDS`` allowed) through the host daemon, on one thread, importing socket and json.

Why a second driver of the protocol beside :class:`~negotiator_common.client.AgentClient`: a CLI
call lives for one request, and what it imports is most of its own cost. The full client (its
threads, the endpoint, :mod:`typing`) costs tens of milliseconds more than a dozen lines of
socket and json do (``docs/benchmark.rst``, "one CLI call through the daemon"), which a monitoring
check pays on every call. So :func:`main` takes the plainest form of the call and sends exactly
what the full client sends (``hello`` naming the guest, then ``execute`` with the same bounds,
:mod:`negotiator_common.callbounds`), and hands everything else to :mod:`negotiator_host.cli`
before anything runs in the guest: any other option, a command that needs a shell's quoting to
split, no daemon listening, a daemon that does not serve the guest or refuses this user, a guest
agent without raw output and credit, a request over the agent's limits. The full path then says
why in its own words. Once the command was sent, a failure is written as the full CLI writes it,
by the full CLI's own functions, imported only then.

This module and those it imports at start import nothing else, not even :mod:`typing` (mypy
reads the names of its annotations under ``if MYPY:``).
"""

import json
import math
import socket
import sys
import time

from negotiator_common.callbounds import OUTPUT_WINDOW, command_timeout_for
from negotiator_host.local_socket import socket_path

MYPY = False
if MYPY:  # annotations only (mypy.ini: always_true = MYPY)
    from typing import Any, Dict, List, Optional, Tuple

__all__ = ('main', 'DEFAULT_TIMEOUT')

DEFAULT_TIMEOUT = 10.0
"""Seconds that a call may take when --timeout does not say (the full CLI's default too)."""

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
    if command is None or len(guests) != 1 or not timeout or not _plain_words(command):
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
        self.params: 'Dict[str, Any]' = {}

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
        Connect and say hello naming the guest: None when attached, or the daemon's refusal of
        this user; :class:`_Fallback` when the quick way cannot serve the call.
        """
        try:
            self.sock.settimeout(self._remaining())
            self.sock.connect(self.path)
            self._send(_HELLO_ID, 'hello', {'guest': self.guest, 'protocol': 1, 'agent': 'negotiator-host'},
                       prefix=b'\n')
            reply = self._reply(_HELLO_ID)
        except (OSError, ValueError, EOFError):
            raise _Fallback() from None
        if 'error' in reply:
            return self._refusal(reply['error'])
        hello = reply.get('result')
        if not isinstance(hello, dict) or not isinstance(hello.get('capabilities'), list) \
                or not {'raw-output', 'credit'}.issubset(hello['capabilities']):
            raise _Fallback()
        limits: 'Dict[str, Any]' = hello['limits'] if isinstance(hello.get('limits'), dict) else {}
        grace = _limit(limits, 'kill_grace')
        self.params = {'command': self.argv[0], 'args': self.argv[1:], 'stream': 'raw', 'window': OUTPUT_WINDOW,
                       'timeout': command_timeout_for(self.timeout, grace if math.isfinite(grace) else 0.0)}
        if not _within(limits, self.params, self.argv[1:]):
            raise _Fallback()
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
            self._send(_EXECUTE_ID, 'execute', self.params)
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
        if type(size) is not int or not 0 <= size <= OUTPUT_WINDOW or stream not in ('stdout', 'stderr'):
            raise ValueError('an output frame out of the spec: %r' % (params,))
        _write_all(sys.stdout if stream == 'stdout' else sys.stderr, self._read(size))
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

    def _send(self, request_id: object, method: str, params: 'Dict[str, Any]', prefix: bytes = b'') -> None:
        self._write(prefix, {'jsonrpc': '2.0', 'id': request_id, 'method': method, 'params': params})

    def _notify(self, method: str, params: 'Dict[str, Any]') -> None:
        self._write(b'', {'jsonrpc': '2.0', 'method': method, 'params': params})

    def _write(self, prefix: bytes, message: 'Dict[str, Any]') -> None:
        self.sock.settimeout(self._remaining())
        line = json.dumps(message, ensure_ascii=False, separators=(',', ':')).encode('utf-8')
        self.sock.sendall(prefix + line + b'\n')


def _limit(limits: 'Dict[str, Any]', name: str) -> float:
    """One of the agent's limits: a positive number, or infinity when it announces none (or nonsense)."""
    value = limits.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return value
    return math.inf


def _within(limits: 'Dict[str, Any]', params: 'Dict[str, Any]', args: 'List[str]') -> bool:
    """True when the agent's announced limits take the request (else the full client says which one does not)."""
    args_size = sum(len(arg.encode('utf-8')) + 1 for arg in args)
    line_size = len(json.dumps(params, ensure_ascii=False).encode('utf-8')) + 100
    return args_size <= _limit(limits, 'max_args') and params['timeout'] <= _limit(limits, 'max_timeout') \
        and line_size <= _limit(limits, 'max_line_length')
