"""
The calling side of the four standard methods, with typed results.

:class:`AgentClient` wraps an :class:`~negotiator_common.endpoint.Endpoint` that has done its
handshake and turns replies into Python objects: a round-trip time for ``ping``, a list of
:class:`CommandDescription` for ``list_commands`` and an :class:`ExecuteResult` for
``execute``. The host's API (``negotiator_host``) and the guest's client mode both use it.
"""

import time
from typing import Any, BinaryIO, Dict, List, Optional, Sequence

from negotiator_common.endpoint import DEFAULT_TIMEOUT, Endpoint
from negotiator_common.errors import CommandFailed, InvalidParams, InvalidRequest
from negotiator_common.protocol import decode_bytes, encode_bytes

__all__ = ('AgentClient', 'CommandDescription', 'ExecuteResult', 'command_timeout_for')


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


def command_timeout_for(timeout: float) -> float:
    """
    The timeout to give the agent for a command, so that its own timeout reply (with the
    command's partial output) arrives before the caller's deadline does.
    """
    return max(timeout - 1.0, timeout * 0.5)


class AgentClient(object):
    """Typed calls to one agent over one endpoint (thread-safe: calls may overlap)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def ping(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> float:
        """Round-trip time of one ``ping``, in seconds."""
        started = time.monotonic()
        self.endpoint.call('ping', timeout=timeout)
        return time.monotonic() - started

    def list_commands(self, timeout: Optional[float] = DEFAULT_TIMEOUT) -> List[CommandDescription]:
        reply = self.endpoint.call('list_commands', timeout=timeout)
        try:
            return [CommandDescription(str(c['name']), bool(c.get('builtin')), str(c.get('description', '')))
                    for c in reply['commands']]
        except (TypeError, KeyError) as exc:
            raise InvalidRequest('malformed list_commands reply: %r' % (reply,)) from exc

    def execute(self, command: str, *args: str, input: Optional[bytes] = None,
                timeout: Optional[float] = DEFAULT_TIMEOUT, check: bool = False,
                stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None) -> ExecuteResult:
        """
        Run ``command`` with ``args`` on the agent's side.

        ``input`` is given to the command's standard input. Output streams over the channel
        (in the raw framing of ``docs/protocol.rst``, "Raw output"):
        with ``stdout``/``stderr`` file objects it is written there as it arrives (and the
        result's fields stay empty), else it is collected into the result. ``timeout`` bounds
        the whole call; the agent kills the command a little before it. With ``check``, a
        non-zero exit raises :class:`CommandFailed`.
        """
        # Raw output (every negotiator agent offers it, "raw-output" in hello): chunks arrive as
        # bytes after a header line, not escaped in JSON text; text chunks are still accepted.
        params = {'command': command, 'args': list(args), 'stream': 'raw'}  # type: Dict[str, Any]
        if input:
            params.update(encode_bytes(bytes(input), 'stdin'))
        if timeout is not None:
            params['timeout'] = command_timeout_for(timeout)
        collected = {'stdout': bytearray(), 'stderr': bytearray()}
        sinks = {'stdout': stdout, 'stderr': stderr}

        def on_output(params: Dict[str, Any]) -> None:
            stream = params.get('stream')
            if stream not in collected:
                return
            try:
                chunk = decode_bytes(params, 'data') or b''
            except ValueError:
                return
            sink = sinks[stream]
            if sink is not None:
                sink.write(chunk)
                sink.flush()
            else:
                collected[stream] += chunk

        try:
            reply = self.endpoint.call('execute', params, timeout=timeout, on_notification=on_output)
        except InvalidParams as exc:
            # An agent older than raw output refuses "stream": "raw" before it runs anything:
            # ask again for text notifications.
            if "'stream'" not in str(exc):
                raise
            params['stream'] = True
            reply = self.endpoint.call('execute', params, timeout=timeout, on_notification=on_output)
        if not isinstance(reply, dict):
            raise InvalidRequest('malformed execute reply: %r' % (reply,))
        result = ExecuteResult(command, args, reply.get('exit_status'), bytes(collected['stdout']),
                               bytes(collected['stderr']), float(reply.get('duration') or 0.0), reply.get('signal'),
                               bool(reply.get('stdout_truncated')), bool(reply.get('stderr_truncated')),
                               bool(reply.get('output_abandoned')))
        return result.check() if check else result
