"""
The calling side of the four standard methods, with typed results.

:class:`AgentClient` wraps an :class:`~negotiator_common.endpoint.Endpoint` that has done its
handshake and turns replies into Python objects: a round-trip time for ``ping``, a list of
:class:`CommandDescription` for ``list_commands`` and an :class:`ExecuteResult` for
``execute``. The host's API (``negotiator_host``) and the guest's client mode both use it.

The agent on the other side may be hostile (``docs/security.rst``): a reply that is not what
the spec says (an exit status of 256, a duration of ``"soon"``) is an
:class:`~negotiator_common.errors.InvalidRequest`, never a value passed on; output collected
into a result stops at ``max_output`` bytes per stream, whatever the agent sends. Requests that
the agent would refuse, by the ``limits`` it announced in ``hello``, are refused here before
they are sent (:class:`~negotiator_common.errors.UnsendableRequest`).
"""

import math
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

from negotiator_common.callbounds import OUTPUT_WINDOW, command_timeout_for
from negotiator_common.callstreams import InputPump, InputSource, OutputReceiver, read_bounded
from negotiator_common.cancellation import Cancellation
from negotiator_common.endpoint import CANCEL_METHOD, DEFAULT_TIMEOUT, Endpoint
from negotiator_common.errors import (
    CommandFailed, CommandNotAllowed, ConnectionClosed, InvalidRequest, MethodNotFound, UnsendableRequest,
)
from negotiator_common.protocol import Request, decode_bytes, encode_bytes, encode_message

if TYPE_CHECKING:
    from negotiator_common.preload import Preload
    from negotiator_common.transfers import LocalFile, Progress

__all__ = ('AgentClient', 'CommandDescription', 'ExecuteResult', 'announces',
           'DEFAULT_MAX_OUTPUT', 'RAW_OUTPUT', 'STREAM_INPUT', 'CREDIT', 'FILES_CAPABILITY', 'INLINE_INPUT',
           'OLD_MAX_STDIN')

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""
Bytes of each output stream that :meth:`AgentClient.execute` collects into a result (16 MiB):
beyond it the output is read and dropped, and the result says ``stdout_truncated`` (or
``stderr_truncated``). As much as one protocol line may carry, four times what an agent
collects when not streaming; a caller that wants more streams to a file (never capped).
"""

_ID_ROOM = 24
"""Bytes kept free in the line-length check for the request id, which the endpoint picks later."""

RAW_OUTPUT = 'raw-output'
"""The capability in ``hello`` of an agent that sends output in the raw framing when asked."""

STREAM_INPUT = 'escaped-input'
"""
The capability in ``hello`` of an agent whose ``execute`` takes its input as a stream
(``stdin_stream``) of escaped chunks (``docs/protocol.rst``, "Streamed input"). Named after the
escaping: an agent of the first, unescaped framing announced another name, so that neither side
streams to the other and the input goes inline instead of arriving changed.
"""

FILES_CAPABILITY = 'files'
"""The capability in ``hello`` of an agent that serves ``push`` and ``pull``: its owner turned file access on."""

WARM_PYTHON = 'warm-python'
"""
The capability in ``hello`` of an agent whose ``exec`` with ``warm`` runs a Python interpreter's
program (its input) in a process forked from a warm Python (``docs/protocol.rst``, "Warm Python").
"""

CREDIT = 'credit'
"""The capability in ``hello`` of an agent that sends output only within the ``window`` its caller grants."""

INLINE_INPUT = 64 * 1024
"""Input bytes up to this size travel in the request itself (one message); more, or a file, streams."""

OLD_MAX_STDIN = 8 * 1024 * 1024
"""The input an agent takes in the request when its ``hello`` does not say (the protocol's default ``max_stdin``)."""


class CommandDescription(object):
    """One command that an agent offers."""

    __slots__ = ('name', 'builtin', 'description')

    def __init__(self, name: str, builtin: bool = False, description: str = '') -> None:
        self.name = name
        self.builtin = builtin
        self.description = description

    def to_dict(self) -> Dict[str, Any]:
        return {'name': self.name, 'builtin': self.builtin, 'description': self.description}

    def __repr__(self) -> str:
        return 'CommandDescription(%r)' % self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CommandDescription) and self.to_dict() == other.to_dict()


class ExecuteResult(object):
    """
    What a command did: ``exit_status`` (None when a signal, ``signal``, ended it),
    ``stdout`` and ``stderr`` (bytes; empty when they were streamed to a file instead),
    ``duration`` in seconds, whether either output was truncated by the agent's cap, and
    ``output_abandoned``: the agent stopped reading while a process that had left the command's
    process group still held its output open (see the protocol's "Commands").
    """

    __slots__ = ('command', 'args', 'exit_status', 'signal', 'stdout', 'stderr', 'duration',
                 'stdout_truncated', 'stderr_truncated', 'output_abandoned')

    def __init__(self, command: str, args: Sequence[str], exit_status: Optional[int], stdout: bytes = b'',
                 stderr: bytes = b'', duration: float = 0.0, signal: Optional[int] = None,
                 stdout_truncated: bool = False, stderr_truncated: bool = False,
                 output_abandoned: bool = False) -> None:
        self.command = command
        self.args = list(args)
        self.exit_status = exit_status
        self.signal = signal
        self.stdout = stdout
        self.stderr = stderr
        self.duration = duration
        self.stdout_truncated = stdout_truncated
        self.stderr_truncated = stderr_truncated
        self.output_abandoned = output_abandoned

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> 'ExecuteResult':
        """Raise :class:`CommandFailed` (with the status and output) unless the command succeeded."""
        if not self.ok:
            data = self.to_dict()
            raise CommandFailed('%s exited with status %s' % (self.command, self.exit_status), data)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready summary (output as text when valid UTF-8, else base64)."""
        data = {'command': self.command, 'args': self.args, 'exit_status': self.exit_status,
                'signal': self.signal, 'duration': self.duration,
                'stdout_truncated': self.stdout_truncated, 'stderr_truncated': self.stderr_truncated,
                'output_abandoned': self.output_abandoned}
        data.update(encode_bytes(self.stdout, 'stdout'))
        data.update(encode_bytes(self.stderr, 'stderr'))
        return data

    def __repr__(self) -> str:
        return 'ExecuteResult(%r, exit_status=%r, %d bytes of stdout)' % (
            self.command, self.exit_status, len(self.stdout))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def announces(hello: Dict[str, Any], capability: str) -> bool:
    """Whether ``hello`` lists ``capability`` (only a list of strings lists anything)."""
    capabilities = hello.get('capabilities')
    return isinstance(capabilities, list) and capability in capabilities


def _limit(limits: Dict[str, Any], name: str) -> Optional[float]:
    """One of the agent's announced limits, or None when it announced none that makes sense."""
    value: Any = limits.get(name)
    return value if _is_number(value) and value > 0 else None


def execute_fields(reply: object) -> Dict[str, Any]:
    """
    The fields of an ``execute`` result, checked against the spec: an exit status from 0 to
    255, or none and a signal from 1 to 127 (so that 128 + it is a status); a finite duration
    of at least 0; booleans for the truncation flags and ``output_abandoned``. Anything else is
    :class:`InvalidRequest`.
    """
    if not isinstance(reply, dict):
        raise InvalidRequest('malformed execute reply: %r' % (reply,))
    # Whatever the peer sent, checked below before it is used as a number.
    exit_status: Any = reply.get('exit_status')
    signal: Any = reply.get('signal')
    duration: Any = reply.get('duration', 0.0)
    if exit_status is None:
        if not (_is_int(signal) and 0 < signal < 128):
            raise InvalidRequest('execute reply has neither an exit status nor a signal from 1 to 127: %r'
                                 % ((exit_status, signal),))
    elif not (_is_int(exit_status) and 0 <= exit_status <= 255) or not (signal is None or signal == 0):
        raise InvalidRequest('execute reply has an exit status that is not from 0 to 255 (or a signal besides'
                             ' it): %r' % ((exit_status, signal),))
    if not (_is_number(duration) and duration >= 0):
        raise InvalidRequest('execute reply has a duration that is not a number of seconds: %r' % (duration,))
    flags = {name: reply.get(name, False) for name in ('stdout_truncated', 'stderr_truncated', 'output_abandoned')}
    if not all(isinstance(flag, bool) for flag in flags.values()):
        raise InvalidRequest('execute reply has flags that are not booleans: %r' % (flags,))
    fields = {'exit_status': exit_status, 'signal': None if exit_status is not None else signal,
              'duration': float(duration)}
    fields.update(flags)
    return fields


def _command_description(entry: object) -> CommandDescription:
    """One entry of a ``list_commands`` reply, checked: a name, a boolean and a description as text."""
    if not isinstance(entry, dict):
        raise InvalidRequest('malformed list_commands entry: %r' % (entry,))
    name, builtin, description = entry.get('name'), entry.get('builtin', False), entry.get('description', '')
    if not (isinstance(name, str) and name and isinstance(builtin, bool) and isinstance(description, str)):
        raise InvalidRequest('malformed list_commands entry: %r' % (entry,))
    return CommandDescription(name, builtin, description)


class _OutputCollector(object):
    """
    The ``output`` notifications of one call: written to the caller's sinks as they arrive, or
    collected up to ``max_output`` bytes per stream (the rest dropped, the stream marked
    truncated). A sink that fails (a closed pipe) closes the connection, which makes the agent
    cancel the command, and its error is what the call raises.
    """

    def __init__(self, sinks: Dict[str, Optional[BinaryIO]], max_output: Optional[int], endpoint: Endpoint) -> None:
        self.sinks = sinks
        self.max_output = max_output
        self.endpoint = endpoint
        self.collected = {'stdout': bytearray(), 'stderr': bytearray()}
        self.truncated = {'stdout': False, 'stderr': False}
        self.sink_error: Optional[Exception] = None

    def __call__(self, params: Dict[str, Any]) -> None:
        stream = params.get('stream')
        if not isinstance(stream, str) or stream not in self.collected or self.sink_error is not None:
            return  # not output this call can take (a stream of any other JSON type is no key)
        try:
            chunk = decode_bytes(params, 'data') or b''
        except ValueError:
            return
        sink = self.sinks[stream]
        if sink is None:
            self._collect(stream, chunk)
            return
        try:
            sink.write(chunk)
            sink.flush()
        except Exception as exc:  # any failure of the caller's sink ends the call, with that error
            self.sink_error = exc
            self.endpoint.close('writing the %s of a command failed: %s' % (stream, exc))

    def _collect(self, stream: str, chunk: bytes) -> None:
        buffer = self.collected[stream]
        room = len(chunk) if self.max_output is None else max(0, self.max_output - len(buffer))
        if len(chunk) > room:
            self.truncated[stream] = True
        buffer += chunk[:room]


_Output = Union[_OutputCollector, OutputReceiver]


class AgentClient(object):
    """
    Typed calls to one agent over one endpoint (thread-safe: calls may overlap).

    :param hello: what the agent answered to ``hello`` (the result of
                  :meth:`~negotiator_common.endpoint.Endpoint.handshake`). Requests over the
                  ``limits`` it announced are refused before they are sent, and its
                  ``capabilities`` decide how ``execute`` asks for output: in the raw framing
                  when they list ``raw-output``, else as text notifications (an agent older than
                  raw output refuses ``"stream": "raw"``), whether input streams (``escaped-input``)
                  and whether output flows within a window (``credit``). None: nothing is known;
                  no limits are checked here (the agent checks), and raw output, streamed input and
                  credit are used, as every agent of this release announces them.
    """

    def __init__(self, endpoint: Endpoint, hello: Optional[Dict[str, Any]] = None) -> None:
        self.endpoint = endpoint
        limits = hello.get('limits') if isinstance(hello, dict) else None
        self.limits = dict(limits) if isinstance(limits, dict) else {}
        def offers(capability: str) -> bool:
            return announces(hello, capability) if isinstance(hello, dict) else True

        self.raw_output = offers(RAW_OUTPUT)
        """Whether ``execute`` asks for raw output (``docs/protocol.rst``, "Raw output")."""
        self.stream_input = offers(STREAM_INPUT)
        """Whether ``execute`` may stream its input (``docs/protocol.rst``, "Streamed input")."""
        self.credit = offers(CREDIT)
        """Whether ``execute`` grants a window for its output (``docs/protocol.rst``, "Flow control")."""
        self.can_cancel = offers(CANCEL_METHOD)
        self.files = offers(FILES_CAPABILITY)
        """Whether the agent serves ``push`` and ``pull`` (``docs/protocol.rst``, "Files")."""
        self.warm_python = announces(hello, WARM_PYTHON) if isinstance(hello, dict) else False
        """Whether ``exec`` may ask for a warm Python (``docs/protocol.rst``, "Warm Python")."""

    def ping(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> float:
        """Round-trip time of one ``ping``, in seconds."""
        started = time.monotonic()
        self.endpoint.call('ping', timeout=timeout)
        return time.monotonic() - started

    def list_commands(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> List[CommandDescription]:
        reply = self.endpoint.call('list_commands', timeout=timeout)
        commands = reply.get('commands') if isinstance(reply, dict) else None
        if not isinstance(commands, list):
            raise InvalidRequest('malformed list_commands reply: %r' % (reply,))
        return [_command_description(entry) for entry in commands]

    def execute(self, command: str, *args: str, input: Optional[InputSource] = None,
                timeout: Optional[float] = DEFAULT_TIMEOUT, check: bool = False,
                stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None,
                max_output: Optional[int] = DEFAULT_MAX_OUTPUT) -> ExecuteResult:
        """
        Run ``command`` with ``args`` on the agent's side.

        ``input`` is given to the command's standard input: bytes, a binary file object (read
        until its end) or an iterable of byte chunks. Up to :data:`INLINE_INPUT` bytes travel in
        the request; more, and any file or iterable, stream within the room the agent grants
        (``docs/protocol.rst``, "Streamed input"), of any length, with bounded memory on both
        sides. To an agent without streamed input (no ``escaped-input`` in its ``hello``) the
        input travels in the request, at most its ``max_stdin``: beyond it, the call raises
        :class:`UnsendableRequest` before anything is sent, having read one byte past the bound.
        If reading ``input`` fails, the command is cancelled and the call raises that error.

        Output streams over the channel (in the raw framing of ``docs/protocol.rst``, "Raw
        output"): with ``stdout``/``stderr`` file objects it is written there as it arrives (and
        the result's fields stay empty), else it is collected into the result, at most
        ``max_output`` bytes per stream (:data:`DEFAULT_MAX_OUTPUT`; None: no bound, at the
        caller's risk): the rest is dropped and ``stdout_truncated``/``stderr_truncated`` say so.
        To an agent that announces ``credit``, the output flows within a window of
        :data:`~negotiator_common.callbounds.OUTPUT_WINDOW` bytes: a slow file slows this
        call's command, never the channel's other calls. If writing to ``stdout``/``stderr``
        fails, the connection is closed (the agent cancels the command) and the call raises
        that error. ``timeout`` bounds the whole call; the agent kills the command a little
        before it. With ``check``, a non-zero exit raises :class:`CommandFailed`. A request
        over the agent's announced limits raises :class:`UnsendableRequest` before anything is
        sent.
        """
        params: Dict[str, Any] = {'command': command, 'args': list(args)}
        return self._run('execute', params, [command] + list(args), input, timeout, check, stdout, stderr, max_output)

    def exec(self, argv: Sequence[str], input: Optional[InputSource] = None,
             timeout: Optional[float] = DEFAULT_TIMEOUT, check: bool = False,
             stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None, cwd: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, max_output: Optional[int] = DEFAULT_MAX_OUTPUT,
             warm: bool = False, preload: 'Optional[Preload]' = None) -> ExecuteResult:
        """
        Run the program ``argv`` (a list: ``argv[0]`` an absolute path, or a name looked up in
        the ``PATH`` of the agent's clean environment; no shell is added) on the agent's side,
        in the directory ``cwd`` (default ``/``), with ``env`` added to that environment. Input,
        output, ``timeout``, ``check`` and the result are those of :meth:`execute`.

        Only an agent whose owner switched ``exec`` on runs it (``negotiator-guest --daemon
        --allow-exec``); any other refuses it with :class:`CommandNotAllowed`, which names the
        switch; so does this method for an agent older than ``exec`` (it does not know the method).

        With ``warm``, ``argv`` is a Python interpreter alone (its absolute path) and ``input``
        its program, as Ansible pipelines a module: an agent that offers it runs the program in
        a process forked from that interpreter with its standard library already imported, and
        seconds sooner in an emulated guest (``docs/protocol.rst``, "Warm Python"); any other
        agent, or a program that cannot be warm there, starts the interpreter as usual.
        ``preload`` (a :class:`~negotiator_common.preload.Preload`: a zip archive and the modules
        to import from it) asks for a warm Python that has imported those too, for programs that
        import them at every run (an Ansible module's ``module_utils``).
        """
        argv = list(argv)
        if not argv:
            raise UnsendableRequest('exec needs a program to run: argv is empty')
        params: Dict[str, Any] = {'argv': argv}
        if cwd is not None:
            params['cwd'] = cwd
        if env:
            params['env'] = dict(env)
            _check_encodable([part for pair in env.items() for part in pair])
        if warm and self.warm_python:
            params['warm'] = True
            if preload is not None:
                params['preload'] = preload.to_wire()
        try:
            return self._run('exec', params, argv, input, timeout, check, stdout, stderr, max_output)
        except MethodNotFound as exc:
            raise CommandNotAllowed('the agent does not know exec (%s): it is older than exec, so upgrade it and'
                                    ' start it with negotiator-guest --daemon --allow-exec' % exc.message) from None

    def _run(self, method: str, params: Dict[str, Any], argv: List[str], input: Optional[InputSource],
             timeout: Optional[float], check: bool, stdout: Optional[BinaryIO], stderr: Optional[BinaryIO],
             max_output: Optional[int]) -> ExecuteResult:
        """
        One ``execute`` or ``exec`` (``params`` name what to run, ``argv`` is it as a list) with
        its streams, as :meth:`execute` says; its :class:`ExecuteResult`.
        """
        # Raw output, from an agent that announced it: chunks arrive as bytes after a header
        # line, not escaped in JSON text; text chunks are accepted either way.
        params['stream'] = 'raw' if self.raw_output else True
        inline, streamed = self._input(input)
        if inline:
            params.update(encode_bytes(inline, 'stdin'))
        if streamed is not None:
            params['stdin_stream'] = True
        if self.credit:
            params['window'] = OUTPUT_WINDOW
        if timeout is not None:
            params['timeout'] = command_timeout_for(timeout, _limit(self.limits, 'kill_grace') or 0.0)
        self._check_request(method, params, argv, len(inline), timeout)
        cancelled = Cancellation()
        pump = None if streamed is None else InputPump(self.endpoint.notify, streamed, cancelled)
        on_output = self._output(stdout, stderr, max_output)
        reply = self._call_execute(method, params, timeout, on_output, pump, cancelled)
        fields = execute_fields(reply)
        fields['stdout_truncated'] |= on_output.truncated['stdout']
        fields['stderr_truncated'] |= on_output.truncated['stderr']
        result = ExecuteResult(argv[0], argv[1:], stdout=bytes(on_output.collected['stdout']),
                               stderr=bytes(on_output.collected['stderr']), **fields)
        return result.check() if check else result

    def push(self, source: 'LocalFile', target: str, recursive: bool = False, mode: Optional[int] = None,
             owner: Optional[str] = None, progress: Optional['Progress'] = None) -> Dict[str, Any]:
        """
        Copy ``source`` (a local path, or a binary file object) to ``target`` on the agent's side,
        atomically (``docs/protocol.rst``, "Files"): the file appears whole or not at all, and
        only if the CRC-32 of what arrived is that of what was sent. A ``target`` that is an
        existing directory receives the file under the source's name, as ``cp`` and ``scp``
        do. A directory needs ``recursive``: its tree, modes and symlinks are copied (setuid
        and setgid bits dropped), and it must not exist yet in the guest. ``mode`` defaults to
        the source file's (for a file object: that of the file replaced, else 0644); ``owner``
        (``USER`` or ``USER:GROUP``) sets the owner. ``progress(done, total)`` is called as the
        bytes go. Returns the agent's reply: ``path`` written, ``size`` and ``crc32``.

        Raises :class:`~negotiator_common.errors.FileError` (with the path and the reason:
        ``ENOENT``, ``EACCES``, ``ENOSPC``...), :class:`~negotiator_common.errors.ChecksumMismatch`,
        or :class:`~negotiator_common.errors.CommandNotAllowed` when the agent does not offer file
        access (its owner did not switch it on, or the path is outside its allowed prefixes).
        """
        from negotiator_common import transfers
        self._check_files()
        return transfers.push(self.endpoint, self.can_cancel, source, target, recursive, mode, owner, progress)

    def pull(self, source: str, target: 'LocalFile', recursive: bool = False,
             progress: Optional['Progress'] = None, max_size: Optional[int] = None) -> Dict[str, Any]:
        """
        Copy ``source`` on the agent's side to ``target`` (a local path, written atomically and
        kept only if its CRC-32 is the agent's, or a binary file object), as :meth:`push` does
        the other way; with ``recursive`` a directory comes with its tree (a file is copied as a
        file). Returns the agent's reply: ``path``, ``size``, ``crc32``, ``type`` and ``mode``.

        ``max_size`` bounds what the agent may send (for a directory, its tar stream): once more
        has come, the transfer stops and :class:`~negotiator_common.errors.FileError` (reason
        ``EFBIG``) is raised, and a local path keeps nothing, so that a hostile guest cannot fill
        this side's disk. None: no bound (a file object has had what came before the bound).
        """
        from negotiator_common import transfers
        self._check_files()
        return transfers.pull(self.endpoint, self.can_cancel, source, target, recursive, progress, max_size)

    def _check_files(self) -> None:
        if not self.files:
            raise CommandNotAllowed('the agent does not offer file access (its owner turns it on with'
                                    ' negotiator-guest --daemon --allow-files; older agents have none)')

    def _input(self, source: Optional[InputSource]) -> Tuple[bytes, Optional[InputSource]]:
        """The input to send in the request, and the source to stream (None: nothing streams)."""
        if source is None:
            return b'', None
        if isinstance(source, (bytes, bytearray, memoryview)) and len(source) <= INLINE_INPUT:
            return bytes(source), None
        if self.stream_input:
            return b'', source
        return read_bounded(source, int(_limit(self.limits, 'max_stdin') or OLD_MAX_STDIN)), None

    def _output(self, stdout: Optional[BinaryIO], stderr: Optional[BinaryIO],
                max_output: Optional[int]) -> '_Output':
        """What takes the call's output: within a window when the agent honours one, else as it comes."""
        sinks = {'stdout': stdout, 'stderr': stderr}
        if not self.credit:
            return _OutputCollector(sinks, max_output, self.endpoint)
        return OutputReceiver(self.endpoint.notify, sinks, max_output, OUTPUT_WINDOW, self._sink_failed)

    def _sink_failed(self, error: BaseException) -> None:
        """A caller's file for the output failed: the connection closes, and with it the command in the agent."""
        self.endpoint.close('writing the output of a command failed: %s' % error)

    def _call_execute(self, method: str, params: Dict[str, Any], timeout: Optional[float], on_output: '_Output',
                      pump: Optional[InputPump], cancelled: Cancellation) -> Any:
        """The ``execute`` (or ``exec``) call with its streams; a failure of the caller's input or output is raised."""
        reply: Any = None
        finished = False
        try:
            reply = self.endpoint.call(method, params, timeout=timeout, on_notification=on_output,
                                       cancelled=cancelled if pump is not None and self.can_cancel else None,
                                       on_credit=None if pump is None else pump.on_credit)
            finished = True
        except ConnectionClosed:
            if on_output.sink_error is None:
                raise
        finally:
            if pump is not None:
                pump.finish()
            if isinstance(on_output, OutputReceiver):
                on_output.finish(wait=finished)
        if on_output.sink_error is not None:  # even when the reply came just before the close
            raise on_output.sink_error
        if pump is not None and pump.error is not None:
            raise pump.error
        return reply

    def _check_request(self, method: str, params: Dict[str, Any], argv: List[str], stdin_size: int,
                       timeout: Optional[float]) -> None:
        """Refuse, before sending, a call that cannot be encoded or that the agent's limits refuse."""
        _check_encodable(argv)
        arguments = argv[1:] if method == 'execute' else argv  # the agent counts an exec's whole argv
        args_size = sum(len(a.encode('utf-8')) + 1 for a in arguments)
        max_args = _limit(self.limits, 'max_args')
        if max_args is not None and args_size > max_args:
            raise UnsendableRequest('the arguments take %d bytes; the agent takes at most %d' % (args_size, max_args))
        max_stdin = _limit(self.limits, 'max_stdin')
        if max_stdin is not None and stdin_size > max_stdin:
            raise UnsendableRequest('the input is %d bytes; the agent takes at most %d' % (stdin_size, max_stdin))
        max_timeout = _limit(self.limits, 'max_timeout')
        if max_timeout is not None and timeout is not None and params['timeout'] > max_timeout:
            raise UnsendableRequest('a timeout of %g seconds gives the command %g, over the agent\'s maximum of %g'
                                    ' seconds' % (timeout, params['timeout'], max_timeout))
        max_line = _limit(self.limits, 'max_line_length')
        # Encoded, input grows by a third at most (base64) and arguments six times at most (JSON
        # escapes): only a request that might come near the bound is encoded to be measured.
        if max_line is not None and stdin_size * 2 + args_size * 6 + _ID_ROOM * 100 > max_line:
            size = len(encode_message(Request(0, method, params))) + _ID_ROOM
            if size > max_line:
                raise UnsendableRequest('the request takes %d bytes, more than the %d of one line that the agent'
                                        ' reads' % (size, max_line))


def _check_encodable(strings: Sequence[object]) -> None:
    """Every string of a request must be valid UTF-8 without NUL: the agent could not read it otherwise."""
    for value in strings:
        if not isinstance(value, str):
            raise UnsendableRequest('the command and its arguments must be strings, not %r' % (value,))
        try:
            value.encode('utf-8')
        except UnicodeEncodeError:
            raise UnsendableRequest('%r is not valid UTF-8 text (an argument from a file name or a locale'
                                    ' that is not UTF-8?): it cannot be sent' % (value,)) from None
        if '\0' in value:
            raise UnsendableRequest('%r contains a NUL character, which no argument can carry' % (value,))
