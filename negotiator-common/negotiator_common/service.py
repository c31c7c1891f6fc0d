"""
The methods that every negotiator agent serves: ``hello``, ``ping``, ``list_commands``, ``execute``
(and ``exec``, which runs any program, only where the agent's owner switches it on).

The guest daemon and the host daemon serve the same four methods (``docs/protocol.rst``,
"Methods"); they differ only in which commands they offer, who may run them (``policy``) and
which ``NEGOTIATOR_*`` variables a command sees. :class:`AgentService` holds those choices and
registers the methods on a :class:`~negotiator_common.dispatcher.Dispatcher`.
"""

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from negotiator_common import __version__
from negotiator_common.callbounds import DEFAULT_KILL_GRACE
from negotiator_common.commands import CommandInfo, CommandRegistry, missing_command_message
from negotiator_common.deadline import Deadline
from negotiator_common.dispatcher import CallContext, Dispatcher, get_param
from negotiator_common.peerlog import Complaints, Cut
from negotiator_common.errors import (
    CommandFailed, CommandNotAllowed, CommandNotFound, CommandTimedOut, InvalidParams, LimitExceeded,
)
from negotiator_common.flow import MAX_CREDIT, MIN_WINDOW
from negotiator_common.lazylog import get_logger
from negotiator_common.preload import Preload
from negotiator_common.protocol import (
    DEFAULT_MAX_LINE_LENGTH, PROTOCOL_VERSION, Notification, decode_bytes, encode_bytes,
)
from negotiator_common.runner import run_process
from negotiator_common.slots import CommandSlots
from negotiator_common.streams import INPUT_WINDOW, CommandStreams

if TYPE_CHECKING:
    from negotiator_common.fileservice import FileService

__all__ = ('AgentService', 'Limits', 'CommandFilter', 'CAPABILITIES', 'EXEC_CAPABILITY', 'EXEC_REFUSAL',
           'RAW_CHUNK_SIZE', 'AGENT_MAX_IN_FLIGHT')

logger = get_logger(__name__)

CAPABILITIES = ('ping', 'list_commands', 'execute', 'stream', 'raw-output', 'cancel', 'escaped-input', 'credit')
"""
What ``hello`` announces: ``stream`` means ``execute`` can send its output as notifications,
``raw-output`` that it sends them in the raw framing when asked with ``"stream": "raw"``,
``cancel`` that a request in flight can be cancelled by its id (the endpoint answers it),
``escaped-input`` that ``execute`` takes ``"stdin_stream": true`` and ``credit`` that it honours
a ``window`` for the output (``docs/protocol.rst``, "Streams and flow control"). An agent that
serves ``push`` and ``pull`` adds ``files``
(:data:`~negotiator_common.client.FILES_CAPABILITY`).
"""

EXEC_CAPABILITY = 'exec'
"""What ``hello`` adds to :data:`CAPABILITIES` when the agent runs any program by argv (``exec``, by choice)."""

EXEC_REFUSAL = ('%s refuses exec: running any program is switched off; the owner of a guest switches it on with'
                ' negotiator-guest --daemon --allow-exec')
"""The message of an ``exec`` refused by an agent that does not allow it (``%s``: the agent's name)."""

RAW_CHUNK_SIZE = 1024 * 1024
"""The largest attachment this side sends: any receiver with the default line length (16 MiB) takes it."""

AGENT_MAX_IN_FLIGHT = 64
"""
Requests that an agent runs at once on its connection (``limits.max_in_flight`` in its
``hello``), unless its :class:`Limits` say otherwise: the guest agent's bound.

Why 64, and not the protocol's 16 (:data:`~negotiator_common.endpoint.DEFAULT_MAX_CONCURRENT`,
what a client assumes of an agent that announces nothing): the host daemon carries every
caller on the host over one connection per guest, so this bound is the whole host's. With 16,
32 concurrent calls (a monitoring batch beside a cron job and an operator) ran in two rounds,
each waiting in the daemon's queue for the first round to finish; with 64 they run in one
(docs/benchmark.rst, "concurrent calls"), and a caller waits only beyond 64.

What it protects in the guest: each request in flight is a thread of the agent (created for
the request, gone with its reply: nothing at rest), a process of the command with three pipes,
and the request's standard input (``max_stdin``) and, for a caller that does not stream, the
output collected so far (``max_collected_output`` per stream) held until the reply. The agent
has no other bound on the commands it runs (the guest's ``negotiator-guest`` has no
``--max-commands``: the host daemon's own commands are bounded by its ``--max-commands``). The
CLI and the API stream their output, so what a request holds in the agent is its thread, its
pipes and its input. Measured on the benchmark's guest (docs/benchmark.rst): with 32 commands
at once the agent's peak resident memory was 19.7-20.2 MiB, against 18.9-19.3 MiB at rest.
"""

CommandFilter = Callable[[str, str], bool]
"""
``policy(peer, command_name)``: may this peer run this command? The host daemon passes the
methods of its :class:`negotiator_host.policy.Policy`; the guest allows every command.
"""


class Limits(object):
    """
    The resource bounds of one agent (each a number of bytes, seconds or requests; see the
    spec's "Limits"). ``max_in_flight`` is what the agent's endpoint takes as its
    ``max_concurrent``: a caller that shares one connection between many (the host daemon)
    sends no more at once.
    """

    def __init__(self, max_line_length: int = DEFAULT_MAX_LINE_LENGTH, max_stdin: int = 8 * 1024 * 1024,
                 max_args: int = 1024 * 1024, max_collected_output: int = 4 * 1024 * 1024,
                 max_streamed_output: int = 1024 * 1024 * 1024, default_timeout: float = 60.0,
                 max_timeout: float = 24 * 3600.0, kill_grace: float = DEFAULT_KILL_GRACE,
                 max_in_flight: int = AGENT_MAX_IN_FLIGHT) -> None:
        self.max_line_length = max_line_length
        self.max_stdin = max_stdin
        self.max_args = max_args
        self.max_collected_output = max_collected_output
        self.max_streamed_output = max_streamed_output
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout
        self.kill_grace = kill_grace
        self.max_in_flight = max_in_flight

    def to_wire(self) -> Dict[str, Any]:
        return dict(vars(self))


def _allow_everything(peer: str, command: str) -> bool:
    """The policy of an agent that offers every command it has to its one peer (the guest daemon's)."""
    return True


def _strict_utf8(text: str) -> bool:
    """
    Whether ``text`` is Unicode that UTF-8 can carry. JSON's ``"\\ud800"`` escapes decode to
    lone surrogates, which a command could only receive mangled: os.fsencode turns
    ``"\\udcff"`` into a raw 0xff byte and fails on ``"\\ud800"``.
    """
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        return False
    return True


class AgentService(object):
    """
    The standard methods, bound to one command registry and policy.

    :param agent: names this side in ``hello`` (``negotiator-guest`` or ``negotiator-host``).
    :param environment: ``NEGOTIATOR_*`` variables for a command, from the caller's name
                        (the host daemon sets ``NEGOTIATOR_GUEST``).
    :param policy: who may run the commands of the commands directories.
    :param builtin_policy: who may run the built-ins (default: ``policy``; the host daemon
                           offers a built-in only where its policy names it).
    :param slots: bounds the commands that run at once across every connection that shares
                  this service (the host daemon's guests); None: only each connection's bound.
    :param allow_exec: serve ``exec`` (any program, by argv: the whole power of the agent's
                       user); off, ``exec`` is refused with :class:`CommandNotAllowed`.
    :param files: serves ``push`` and ``pull`` (the guest agent's; refused while its switch is
                  off, and listed as the capability ``files`` only when on); None: no such
                  methods (the host daemon's: a guest reaches the host's files only through
                  the host's commands and policy).

    A command that the policy refuses is answered exactly as one that does not exist, so a
    peer cannot learn what it may not run; the log says which it was.
    """

    def __init__(self, agent: str, registry: CommandRegistry, version: str = __version__,
                 policy: CommandFilter = _allow_everything, limits: Optional[Limits] = None,
                 environment: Optional[Callable[[str], Dict[str, str]]] = None,
                 builtin_policy: Optional[CommandFilter] = None, slots: Optional[CommandSlots] = None,
                 files: Optional['FileService'] = None, allow_exec: bool = False) -> None:
        self.agent = agent
        self.version = version
        self.registry = registry
        self.policy = policy
        self.builtin_policy = builtin_policy or policy
        self.limits = limits or Limits()
        self.environment = environment or (lambda peer: {})
        self._complaints: Dict[str, Complaints] = {}
        self.slots = slots
        self.allow_exec = allow_exec
        """Whether ``exec`` runs any program the caller names (``negotiator-guest --daemon --allow-exec``)."""
        self.files = files

    def register(self, dispatcher: Dispatcher) -> Dispatcher:
        # Everything but execute answers on the reading thread: listing a directory costs less
        # than starting a thread (about 1 ms each in an emulated guest), and is never refused
        # for want of a free handler slot while commands run.
        dispatcher.register('hello', self.hello, inline=True)
        dispatcher.register('ping', self.ping, inline=True)
        dispatcher.register('list_commands', self.list_commands, inline=True)
        dispatcher.register('execute', self.execute)
        dispatcher.register('exec', self.exec_program)
        if self.files is not None:
            self.files.register(dispatcher)
        return dispatcher

    def dispatcher(self) -> Dispatcher:
        """A new dispatcher with the four methods registered."""
        return self.register(Dispatcher())

    def hello(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        from negotiator_common.client import FILES_CAPABILITY, WARM_PYTHON
        capabilities = list(CAPABILITIES) + ([EXEC_CAPABILITY, WARM_PYTHON] if self.allow_exec else [])
        if self.files is not None and self.files.enabled:
            capabilities.append(FILES_CAPABILITY)
        return {'protocol': PROTOCOL_VERSION, 'agent': self.agent, 'version': self.version,
                'capabilities': capabilities, 'limits': self.limits.to_wire()}

    def ping(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        return {'time': time.time()}

    def list_commands(self, params: Dict[str, Any], context: CallContext) -> Dict[str, List[Dict[str, Any]]]:
        commands = [c for c in self.registry.list() if self._permits(context.peer, c)]
        return {'commands': [c.to_wire() for c in commands]}

    def _permits(self, peer: str, command: CommandInfo) -> bool:
        policy = self.policy if command.builtin is None else self.builtin_policy
        return policy(peer, command.name)

    def _resolve(self, name: object, peer: str) -> CommandInfo:
        complaints = self._complaints_about(peer)
        try:
            command = self.registry.resolve(name)
        except CommandNotFound:
            # A peer may ask again and again: the log says so a few times per interval, then counts.
            complaints.complain('info', 'missing commands', "Refused %s for %s: no such command",
                                Cut(name), peer or 'the peer')
            raise
        if not self._permits(peer, command):
            complaints.complain('warning', 'refused commands', "Refused %s for %s: not allowed by the policy",
                                command.name, peer or 'the peer')
            raise CommandNotFound(missing_command_message(command.name))
        return command

    def _complaints_about(self, peer: str) -> Complaints:
        """The rate limiter of complaints about ``peer`` (one per peer: a guest's refusals never hide another's)."""
        complaints = self._complaints.get(peer)
        if complaints is None:
            complaints = self._complaints.setdefault(peer, Complaints(logger, peer or 'the peer'))
        return complaints

    def _parse_execute(self, params: Dict[str, Any]) -> Dict[str, Any]:
        args = get_param(params, 'args', (list,), [])
        if not all(isinstance(a, str) for a in args):
            raise InvalidParams('every argument must be a string')
        if any('\0' in a for a in args):
            raise InvalidParams('arguments cannot contain NUL characters')
        if not all(_strict_utf8(a) for a in args):
            raise InvalidParams('arguments must be valid Unicode (no lone surrogates such as "\\ud800")')
        if sum(len(a.encode('utf-8')) + 1 for a in args) > self.limits.max_args:
            raise LimitExceeded('arguments exceed %d bytes' % self.limits.max_args)
        try:
            stdin = decode_bytes(params, 'stdin')
        except ValueError as exc:
            raise InvalidParams('bad stdin: %s' % exc) from exc
        if len(stdin or b'') > self.limits.max_stdin:
            raise LimitExceeded('stdin exceeds %d bytes' % self.limits.max_stdin)
        # Only the bytes are used from here on: dropping their text form from the request (base64,
        # 4/3 of their size) saves that much for every request waiting for a command slot.
        params.pop('stdin', None)
        params.pop('stdin_b64', None)
        timeout = get_param(params, 'timeout', (int, float, type(None)), None)
        if timeout is not None and not 0 < timeout <= self.limits.max_timeout:
            raise InvalidParams('timeout must be above 0 and at most %s seconds' % self.limits.max_timeout)
        stream = get_param(params, 'stream', (bool, str), False)
        if isinstance(stream, str) and stream != 'raw':
            raise InvalidParams('stream must be true, false or "raw"')
        stdin_stream = get_param(params, 'stdin_stream', (bool,), False)
        if stdin_stream and stdin:
            raise InvalidParams('stdin_stream cannot come with stdin in the request')
        window = get_param(params, 'window', (int, type(None)), None)
        if window is not None and not MIN_WINDOW <= window <= MAX_CREDIT:
            raise InvalidParams('window must be from %d to %d bytes' % (MIN_WINDOW, MAX_CREDIT))
        return {'args': args, 'stdin': stdin or b'', 'stream': stream, 'stdin_stream': stdin_stream,
                'window': window if stream else None,
                'check': get_param(params, 'check', (bool,), False),
                'timeout': self.limits.default_timeout if timeout is None else float(timeout)}

    def execute(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        command = self._resolve(get_param(params, 'command', (str,)), context.peer)
        options = self._parse_execute(params)
        return self._serve(options, context, lambda output: self._run(command, options, context, output))

    def exec_program(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        """
        ``exec``: run the caller's argv list (no shell is added: ``["/bin/sh", "-c", ...]`` is
        the caller's choice), with an optional ``cwd`` and ``env``, exactly as ``execute`` runs
        a command (the same runner, streams, limits and result). Only where the agent's owner
        switched it on (:attr:`allow_exec`); else :class:`CommandNotAllowed`, naming the switch.
        """
        if not self.allow_exec:
            self._complaints_about(context.peer).complain('warning', 'refused exec', "Refused exec for %s: %s",
                                                         context.peer or 'the peer', 'switched off')
            raise CommandNotAllowed(EXEC_REFUSAL % self.agent)
        argv = get_param(params, 'argv', (list,))
        if not argv:
            raise InvalidParams('argv must name a program')
        params['args'] = argv
        options = self._parse_execute(params)
        options.update(self._parse_place(params))
        options['warm'] = get_param(params, 'warm', (bool,), False)
        if params.get('preload') is not None:
            if not options['warm']:
                raise InvalidParams('preload is for a warm Python: it needs warm')
            options['preload'] = Preload.from_wire(params['preload'])
        return self._serve(options, context, lambda output: self._run_program(
            options['args'], argv[0], {}, options, context, output))

    def _parse_place(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """An ``exec``'s ``cwd`` (an absolute path; default ``/``) and ``env`` (names and values as text)."""
        cwd = get_param(params, 'cwd', (str, type(None)), None) or '/'
        if not cwd.startswith('/') or '\0' in cwd or not _strict_utf8(cwd):
            raise InvalidParams('cwd must be an absolute path')
        env = get_param(params, 'env', (dict, type(None)), None) or {}
        for name, value in env.items():
            if not (isinstance(value, str) and name and '=' not in name and '\0' not in name + value
                    and _strict_utf8(name + value)):
                raise InvalidParams('env must map names (without "=" or NUL) to text without NUL')
        if sum(len(n.encode('utf-8')) + len(v.encode('utf-8')) + 2 for n, v in env.items()) > self.limits.max_args:
            raise LimitExceeded('env exceeds %d bytes' % self.limits.max_args)
        return {'cwd': cwd, 'env': env}

    def _serve(self, options: Dict[str, Any], context: CallContext,
               run: Callable[['_CallOutput'], Dict[str, Any]]) -> Dict[str, Any]:
        """``run`` with the call's streams open and, on an agent that shares slots, one of them held."""
        streams = CommandStreams(context.notify, context.request_id, INPUT_WINDOW if options['stdin_stream'] else None,
                                 options['window'], context.cancelled.set)
        output = _CallOutput(options['stream'], context, streams)
        try:
            context.listen(streams.receive)
            if self.slots is None:
                return run(output)
            self._wait_for_slot(options, context)
            try:
                return run(output)
            finally:
                self.slots.release()
        finally:
            context.stop_listening()
            streams.close()

    def _wait_for_slot(self, options: Dict[str, Any], context: CallContext) -> None:
        """Wait for one of the shared command slots; the time spent waiting comes off the command's timeout."""
        assert self.slots is not None
        deadline = Deadline(options['timeout'])
        self.slots.acquire(context.peer, deadline, context.cancelled)
        options['timeout'] = deadline.remaining()

    def _run(self, command: CommandInfo, options: Dict[str, Any], context: CallContext,
             output: '_CallOutput') -> Dict[str, Any]:
        """Run the command (a built-in, or a process through :meth:`_run_program`) and build its result."""
        if command.builtin is None:
            assert command.path is not None
            environment = {'NEGOTIATOR_COMMAND': command.name}
            environment.update(self.environment(context.peer))
            return self._run_program([command.path] + options['args'], command.name, environment, options, context,
                                     output)
        started = time.monotonic()
        exit_status, stdout, stderr = command.builtin(options['args'])
        output('stdout', stdout)
        output('stderr', stderr)
        result = {'exit_status': exit_status, 'signal': None, 'duration': time.monotonic() - started,
                  'stdout_truncated': output.dropped['stdout'], 'stderr_truncated': output.dropped['stderr'],
                  'output_abandoned': False}
        return self._finish(command.name, result, options, output)

    def _run_program(self, argv: List[str], name: str, environment: Dict[str, str], options: Dict[str, Any],
                     context: CallContext, output: '_CallOutput') -> Dict[str, Any]:
        """Run ``argv`` through :func:`run_process` (``name`` in the log and the errors) and build its result."""
        max_output = self.limits.max_streamed_output if options['stream'] else self.limits.max_collected_output
        logger.info("Running %s for %s", name, context.peer or 'the peer')
        process = run_process(argv, stdin=options['stdin'], timeout=options['timeout'], max_output=max_output,
                              on_output=output, environment=environment, cancelled=context.cancelled,
                              kill_grace=self.limits.kill_grace, streams=output.streams,
                              directory=options.get('cwd', '/'), variables=options.get('env'),
                              warm=options.get('warm', False), preload=options.get('preload'))
        if output.streams.error is not None:
            raise output.streams.error
        result = {'exit_status': process.exit_status, 'signal': process.signal, 'duration': process.duration,
                  'stdout_truncated': process.stdout_truncated, 'stderr_truncated': process.stderr_truncated,
                  'output_abandoned': process.output_abandoned}
        if process.timed_out:
            result.update(self._output_fields(output.collected, bool(options['stream'])))
            raise CommandTimedOut('%s ran longer than %s seconds and was killed' % (name, options['timeout']), result)
        return self._finish(name, result, options, output)

    def _finish(self, name: str, result: Dict[str, Any], options: Dict[str, Any],
                output: '_CallOutput') -> Dict[str, Any]:
        """The result with its collected output; :class:`CommandFailed` instead, for ``check`` and a failure."""
        result.update(self._output_fields(output.collected, bool(options['stream'])))
        if options['check'] and result['exit_status'] != 0:
            raise CommandFailed('%s exited with status %s' % (name, result['exit_status']), result)
        return result

    @staticmethod
    def _output_fields(collected: Dict[str, bytearray], streamed: bool) -> Dict[str, Any]:
        if streamed:
            return {'streamed': True}
        fields: Dict[str, Any] = {'streamed': False}
        for name, data in collected.items():
            fields.update(encode_bytes(bytes(data), name))
        return fields


class _CallOutput(object):
    """
    The output of one ``execute`` or ``exec``, as the runner (or a built-in) hands it over:
    streamed to the caller within its room (raw or as text), or collected for the reply. Only a
    built-in's output comes unasked, so only it can find no room: what has none is dropped.
    """

    def __init__(self, stream: Any, context: CallContext, streams: CommandStreams) -> None:
        self.stream = stream
        self.context = context
        self.streams = streams
        self.collected = {'stdout': bytearray(), 'stderr': bytearray()}
        self.dropped = {'stdout': False, 'stderr': False}

    def __call__(self, stream: str, chunk: bytes) -> None:
        allowed = self.streams.spend_output(len(chunk))
        if allowed < len(chunk):
            self.dropped[stream] = True
            chunk = chunk[:allowed]
            if not chunk:
                return
        request_id = self.context.request_id
        if self.stream == 'raw':
            # Raw output: each chunk is copied after a short header line, never escaped.
            for start in range(0, len(chunk), RAW_CHUNK_SIZE):
                self.context.notify(Notification('output', {'id': request_id, 'stream': stream},
                                                 attachment=chunk[start:start + RAW_CHUNK_SIZE]))
        elif self.stream:
            data = {'id': request_id, 'stream': stream}
            data.update(encode_bytes(chunk, 'data'))
            self.context.notify(Notification('output', data))
        else:
            self.collected[stream] += chunk
