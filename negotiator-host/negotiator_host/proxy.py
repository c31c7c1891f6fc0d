"""
The proxy: what the host daemon serves to one local client, on its guest's shared connection.

A local client's connection (:mod:`negotiator_host.local`) starts unattached. Its ``hello``
either asks the daemon itself (no ``guest``: which guests this caller may use) or attaches the
connection to one guest (``{"guest": NAME}``), once the caller's policy allows it; the answer is
the guest agent's own ``hello``, as the daemon's link received it, with ``"via"``. After that,
``ping``, ``list_commands``, ``execute``, ``exec``, ``push`` and ``pull`` go to that guest over the
daemon's one connection to it (:mod:`negotiator_host.agents`), and ``cancel`` is the client endpoint's own:

- ids: the daemon's link allocates its own ids on the guest's side; a reply comes back to the
  handler that made the call, which answers under the client's id. Two clients may use the
  same ids.
- output: the guest's ``output`` notifications reach the call they name on the link, which
  passes them on under the client's id, raw bytes as raw bytes, to this client only, through
  an :class:`Outbox`, so the guest's reading thread, shared by every caller, never waits for one.
- cancellation: the client's ``cancel``, or its going away, sets the handler's cancellation,
  and the link sends ``cancel`` for its own id (to an agent that announces it).
- streams and credit (``docs/protocol.rst``, "Streams and flow control"), end to end: the
  client's ``window`` and ``stdin_stream`` go to the guest with the request; the guest's
  ``credit`` for the input comes to the client under its id, and the client's ``input`` and
  ``credit`` go to the guest under the link's id, which the guest's first notification about the
  call names (no client may send either before that). The daemon keeps no window of its own; it
  checks the client's input against the room the guest granted (:class:`_Relay`).
- the fair queue: an ``execute`` (or an ``exec``, a ``push``, a ``pull``) first takes one of the
  guest's slots (its announced ``max_in_flight``), waiting in turn with the other callers, by
  uid, within its own timeout.

Each forwarded call, and each refusal, is written to the audit log.
"""

import collections
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Optional, Tuple

from negotiator_common import __version__
from negotiator_common.checksum import CHECKSUM_FIELD
from negotiator_common.deadline import Deadline
from negotiator_common.dispatcher import CallContext, Dispatcher, get_param
from negotiator_common.endpoint import DEFAULT_TIMEOUT, REPLY_WRITE_TIMEOUT, Endpoint
from negotiator_common.errors import (
    ChannelNotFound, CommandNotAllowed, ConnectionClosed, InvalidParams, InvalidRequest,
)
from negotiator_common.lazylog import get_logger
from negotiator_common.flow import CREDIT_METHOD, FlowError, SendWindow, valid_grant
from negotiator_common.protocol import PROTOCOL_VERSION, RAW_INPUT_METHOD, RAW_OUTPUT_METHOD, Notification
from negotiator_common.workers import run_in_thread

from negotiator_host.agents import DAEMON_AGENT, AgentLink, GuestAgent, GuestAgents

if TYPE_CHECKING:  # annotations only: the daemon hands the proxy its policy and its audit log
    from negotiator_host.access import Caller, CallerPolicy
    from negotiator_host.audit import AuditLog

__all__ = ('ProxyService', 'Outbox', 'ATTACH_WAIT', 'MAX_OUTPUT_BEHIND', 'FORWARD_TIMEOUT', 'REPLY_MARGIN')

logger = get_logger(__name__)  # the library never prints through logging's last resort

ATTACH_WAIT = 5.0
"""Seconds an attach waits for a link that is being made (the daemon just started, the agent just restarted)."""

MAX_OUTPUT_BEHIND = 16 * 1024 * 1024
"""Bytes of output that one client may leave unread (it is held for it); a client that falls further behind is
disconnected, and its calls are cancelled in the guest."""

FORWARD_TIMEOUT = DEFAULT_TIMEOUT
"""Seconds that the guest gets to answer a forwarded ``ping`` or ``list_commands``."""

REPLY_MARGIN = 5.0
"""Seconds beyond a command's timeout and kill grace that the daemon waits for the guest's reply."""

DEFAULT_COMMAND_TIMEOUT = 60.0
"""A command's timeout when neither the caller nor the guest's ``hello`` says (the protocol's default)."""


def _number(value: Any) -> Optional[float]:
    """``value`` if it is a number (not a boolean) above 0, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def _limit(link: Optional[AgentLink], name: str, default: float) -> float:
    limits = link.hello.get('limits') if link is not None else None
    value = _number(limits.get(name)) if isinstance(limits, dict) else None
    return default if value is None else value


def client_output(params: Dict[str, Any], request_id: Any) -> Optional[Tuple[Notification, int]]:
    """
    The guest's ``output`` notification (its ``params`` as the link passed them on) as the client
    gets it, under the client's ``request_id``, with its size in bytes; None for one that carries
    nothing a client could take. Only the fields of the spec go through.
    """
    stream = params.get('stream')
    if not isinstance(stream, str):
        return None
    raw = params.get('data_raw')
    if isinstance(raw, bytes) and raw:
        return Notification(RAW_OUTPUT_METHOD, {'id': request_id, 'stream': stream}, attachment=raw), len(raw)
    fields = {name: params[name] for name in ('data', 'data_b64') if isinstance(params.get(name), str)}
    if len(fields) != 1:
        return None
    fields.update(id=request_id, stream=stream)
    return Notification(RAW_OUTPUT_METHOD, fields), sum(len(value) for value in fields.values()
                                                        if isinstance(value, str))


class Outbox(object):
    """
    The notifications on their way to one client, written by a thread of their own (from the
    first until the client is gone), so that whoever queues them (the guest's reading thread) never waits for the
    client. A client that leaves more than ``max_bytes`` unread is disconnected: the guest's
    output cannot be slowed down for one of its callers alone.
    """

    def __init__(self, endpoint: Endpoint, max_bytes: int = MAX_OUTPUT_BEHIND) -> None:
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self._queue: Deque[Tuple[Notification, int]] = collections.deque()
        self._bytes = 0
        self._pushed = 0
        self._written = 0
        self._closed = False
        self._writing = False
        self._changed = threading.Condition()

    def push(self, notification: Notification, size: int) -> int:
        """Queue ``notification`` (``size`` bytes); return its number, for :meth:`flush`."""
        with self._changed:
            if self._closed:
                return self._pushed
            behind = self._bytes + size > self.max_bytes
            if not behind:
                self._queue.append((notification, size))
                self._bytes += size
                self._pushed += 1
                self._start_writer()
                self._changed.notify_all()
            number = self._pushed
        if behind:
            self.endpoint.close('the client left more than %d bytes of output unread' % self.max_bytes)
            self.close()
        return number

    def _start_writer(self) -> None:
        if not self._writing:  # on a thread of negotiator_common.workers: a CLI call starts none of its own
            self._writing = True
            run_in_thread('negotiator-outbox-%s' % self.endpoint.name, self._write)

    def flush(self, number: int, timeout: float = REPLY_WRITE_TIMEOUT) -> None:
        """Wait until the notification ``number`` and those before it are written (or the client is gone)."""
        with self._changed:
            self._changed.wait_for(lambda: self._written >= number or self._closed, timeout)

    def close(self) -> None:
        """The client is gone: drop what is queued, end the writer."""
        with self._changed:
            self._closed = True
            self._queue.clear()
            self._changed.notify_all()

    def _write(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._closed)
                if self._closed:
                    return
                notification, size = self._queue.popleft()
            self.endpoint.notify(notification)  # drops it once the client is gone
            with self._changed:
                self._bytes -= size
                self._written += 1
                self._changed.notify_all()


class _Relay(object):
    """
    The streams of one forwarded call, both ways, each under the id its receiver knows.

    From the guest (on the link's reading thread): output, and ``credit`` for the input, go to
    the client's outbox under the client's id. From the client (on its connection's reading
    thread): ``input`` and ``credit`` go to the guest under the link's id, learnt from the
    guest's first notification about the call. Input beyond the room that the guest granted
    (and this relay passed on) is :attr:`violation`: it goes no further, and the call is
    cancelled in the guest and answered with it.
    """

    CREDIT_SIZE = 64
    """What a ``credit`` notification counts for in the client's outbox (its line's length, about)."""

    def __init__(self, outbox: Outbox, request_id: Any, link: AgentLink, cancelled: threading.Event) -> None:
        self.outbox = outbox
        self.request_id = request_id
        self.link = link
        self.cancelled = cancelled
        self.last = 0
        self.link_id: Any = None
        self.input_room = SendWindow()
        self.violation: Optional[FlowError] = None
        self._lock = threading.Lock()

    def _learn(self, params: Dict[str, Any]) -> None:
        if self.link_id is None:
            self.link_id = params.get('id')

    def __call__(self, params: Dict[str, Any]) -> None:
        """The guest's output about the call."""
        self._learn(params)
        output = client_output(params, self.request_id)
        if output is not None:
            self.last = self.outbox.push(*output)

    def guest_credit(self, params: Dict[str, Any]) -> None:
        """The guest's room for the input: counted, and passed on to the client."""
        self._learn(params)
        amount = params.get('bytes')
        with self._lock:
            try:
                self.input_room.grant(amount)
            except FlowError:
                return
        self.last = self.outbox.push(Notification(CREDIT_METHOD, {'id': self.request_id, 'bytes': amount}),
                                     self.CREDIT_SIZE)

    def from_client(self, notification: Notification) -> None:
        """The client's ``input`` or ``credit`` about the call: passed on to the guest, if within the rules."""
        params = notification.params if isinstance(notification.params, dict) else {}
        forward: Optional[Notification] = None
        with self._lock:
            if self.link_id is None or self.violation is not None:
                return
            if notification.method == RAW_INPUT_METHOD:
                forward = self._input(notification.attachment, params)
            elif notification.method == CREDIT_METHOD and valid_grant(params.get('bytes')):
                forward = Notification(CREDIT_METHOD, {'id': self.link_id, 'bytes': params['bytes']})
        if forward is not None:
            self.link.endpoint.notify(forward)
        elif self.violation is not None:
            self.cancelled.set()

    def _input(self, chunk: Optional[bytes], params: Dict[str, Any]) -> Optional[Notification]:
        """A chunk (or the end) of the client's input, for the guest; None (and a violation) beyond the room."""
        if chunk is None:
            if params.get('eof') is not True:
                return None
            end = {'id': self.link_id, 'eof': True}
            if isinstance(params.get(CHECKSUM_FIELD), str):  # a push's checksum, which the guest checks
                end[CHECKSUM_FIELD] = params[CHECKSUM_FIELD][:128]
            return Notification(RAW_INPUT_METHOD, end)
        if len(chunk) > self.input_room.credit:
            self.violation = FlowError('the client sent %d bytes of input with room for %d only'
                                       % (len(chunk), self.input_room.credit))
            return None
        self.input_room.take(len(chunk))
        return Notification(RAW_INPUT_METHOD, {'id': self.link_id}, attachment=chunk)

    def flush(self) -> None:
        """Wait until this call's output is written to the client: its reply must not overtake it."""
        if self.last:
            self.outbox.flush(self.last)


class ProxyService(object):
    """
    The methods of one local client's connection (see the module's documentation).

    :param caller: who the client is (from ``SO_PEERCRED``).
    :param agents: the guests the daemon serves.
    :param policy: which callers may use which guests.
    :param audit: where every call and refusal is written.
    :param stopping: set when the daemon stops: calls that arrive then are refused.
    :param max_in_flight: the client's own bound of requests in flight (its hello's ``limits`` say so).
    :param max_line_length: the longest line the daemon reads from the client.
    """

    def __init__(self, caller: 'Caller', agents: GuestAgents, policy: 'CallerPolicy', audit: 'AuditLog',
                 stopping: threading.Event, max_in_flight: int, max_line_length: int) -> None:
        self.caller = caller
        self.agents = agents
        self.policy = policy
        self.audit = audit
        self.stopping = stopping
        self.max_in_flight = max_in_flight
        self.max_line_length = max_line_length
        self.guest: Optional[str] = None
        self.outbox: Optional[Outbox] = None

    def dispatcher(self) -> Dispatcher:
        """A dispatcher with the client's methods. ``hello`` answers at once; the others wait for the guest."""
        dispatcher = Dispatcher()
        dispatcher.register('hello', self.hello, inline=True)
        dispatcher.register('ping', self.ping)
        dispatcher.register('list_commands', self.list_commands)
        dispatcher.register('execute', self.execute)
        dispatcher.register('exec', self.exec)
        dispatcher.register('push', self.push)
        dispatcher.register('pull', self.pull)
        return dispatcher

    def bind(self, endpoint: Endpoint) -> None:
        """The client's endpoint (made with :meth:`dispatcher`): where its output goes."""
        self.outbox = Outbox(endpoint)

    def close(self) -> None:
        """The client is gone."""
        if self.outbox is not None:
            self.outbox.close()

    # Attaching.

    def hello(self, params: Dict[str, Any], context: CallContext) -> Dict[str, Any]:
        guest = get_param(params, 'guest', (str,), None)
        if guest is None:
            return self._daemon_hello()
        if self.guest is not None and guest != self.guest:
            raise InvalidParams('this connection is attached to guest %s: connect again to use guest %s'
                                % (self.guest, guest))
        self._check_allowed(guest, params)
        agent = self.agents.get(guest)
        if agent is None:
            raise ChannelNotFound('the host daemon does not serve guest %s (unknown, not running, or without a'
                                  ' negotiator-host-to-guest.0 channel)' % guest)
        link = agent.wait_link(ATTACH_WAIT)
        if link is None:
            raise ConnectionClosed('the agent in guest %s is not connected to the host daemon now (is'
                                   ' negotiator-guest --daemon running in the guest?)' % guest)
        self.guest = guest
        return self._guest_hello(link)

    def _check_allowed(self, guest: str, params: Dict[str, Any]) -> None:
        """Refuse (and audit) a caller that the policy does not let use ``guest``."""
        if self.policy.allows(self.caller, guest):
            return
        refusal = CommandNotAllowed(self.policy.refusal(self.caller, guest))
        self.audit.record(self.caller, guest, 'hello', params, refusal, 0.0)
        raise refusal

    def _daemon_hello(self) -> Dict[str, Any]:
        guests = [{'name': name, 'connected': agent.link is not None}
                  for name, agent in sorted(self.agents.snapshot().items())
                  if self.policy.allows(self.caller, name)]
        return {'protocol': PROTOCOL_VERSION, 'agent': DAEMON_AGENT, 'version': __version__, 'guests': guests}

    def _guest_hello(self, link: AgentLink) -> Dict[str, Any]:
        """The agent's hello, with the bounds of this connection where they are narrower than the guest's."""
        hello = dict(link.hello)
        limits = dict(hello['limits']) if isinstance(hello.get('limits'), dict) else {}
        limits['max_in_flight'] = self.max_in_flight
        limits['max_line_length'] = int(min(_limit(link, 'max_line_length', self.max_line_length),
                                            self.max_line_length))
        hello.update(limits=limits, via=DAEMON_AGENT)
        return hello

    # Forwarding.

    def _agent(self) -> GuestAgent:
        """The attached guest, while the daemon serves it."""
        if self.guest is None:
            raise InvalidRequest('this connection is attached to no guest: its first request must be hello with'
                                 ' {"guest": NAME}')
        if self.stopping.is_set():
            raise ConnectionClosed('the host daemon is stopping')
        agent = self.agents.get(self.guest)
        if agent is None:
            raise ConnectionClosed('the host daemon no longer serves guest %s (it stopped?)' % self.guest)
        return agent

    @staticmethod
    def _link(agent: GuestAgent) -> AgentLink:
        link = agent.link
        if link is None:
            raise ConnectionClosed('the agent in guest %s is not connected to the host daemon now' % agent.name)
        return link

    def _audited(self, method: str, params: Dict[str, Any], call: Callable[[], Any]) -> Any:
        """``call()``'s result, with the call written to the audit log whatever its outcome."""
        started = time.monotonic()
        recorded = dict(params)
        outcome: Any = None
        try:
            outcome = call()
            return outcome
        except Exception as exc:
            outcome = exc
            raise
        finally:
            self.audit.record(self.caller, self.guest or '', method, recorded, outcome, time.monotonic() - started)

    def ping(self, params: Dict[str, Any], context: CallContext) -> Any:
        agent = self._agent()
        return self._audited('ping', params, lambda: self._link(agent).endpoint.call(
            'ping', params, timeout=FORWARD_TIMEOUT))

    def list_commands(self, params: Dict[str, Any], context: CallContext) -> Any:
        agent = self._agent()
        return self._audited('list_commands', params, lambda: self._link(agent).endpoint.call(
            'list_commands', params, timeout=FORWARD_TIMEOUT))

    def execute(self, params: Dict[str, Any], context: CallContext) -> Any:
        return self._streaming_call('execute', params, context)

    def exec(self, params: Dict[str, Any], context: CallContext) -> Any:
        """``exec``: forwarded as ``execute`` is (the guest decides whether it runs any program)."""
        return self._streaming_call('exec', params, context)

    def push(self, params: Dict[str, Any], context: CallContext) -> Any:
        agent = self._agent()
        return self._audited('push', params, lambda: self._transfer(agent, 'push', params, context))

    def pull(self, params: Dict[str, Any], context: CallContext) -> Any:
        agent = self._agent()
        return self._audited('pull', params, lambda: self._transfer(agent, 'pull', params, context))

    def _transfer(self, agent: GuestAgent, method: str, params: Dict[str, Any], context: CallContext) -> Any:
        """
        A file transfer: one of the guest's slots, in turn like a command, then the call with its
        streams (no timeout: a transfer lasts as long as its bytes take; the client's ``cancel``
        or its going away ends it).
        """
        agent.queue.acquire(str(self.caller.uid), Deadline(None), context.cancelled)
        try:
            return self._call_guest(self._link(agent), method, params, None, context)
        finally:
            agent.queue.release()

    def _streaming_call(self, method: str, params: Dict[str, Any], context: CallContext) -> Any:
        """A call that runs something in the guest, with its streams: queued, forwarded and audited."""
        agent = self._agent()
        return self._audited(method, params, lambda: self._run_in_guest(method, agent, params, context))

    def _run_in_guest(self, method: str, agent: GuestAgent, params: Dict[str, Any], context: CallContext) -> Any:
        """Wait for one of the guest's slots, in turn with the other callers, then make the call there."""
        asked = _number(get_param(params, 'timeout', (int, float, type(None)), None))
        if params.get('timeout') is not None and asked is None:
            raise InvalidParams('timeout must be above 0 seconds')
        deadline = Deadline(asked or _limit(agent.link, 'default_timeout', DEFAULT_COMMAND_TIMEOUT))
        agent.queue.acquire(str(self.caller.uid), deadline, context.cancelled)
        try:
            link = self._link(agent)
            if asked is not None:  # the time spent in the queue comes off the command's
                params['timeout'] = deadline.remaining()
            wait = (deadline.remaining() or 0.0) + _limit(link, 'kill_grace', 0.0) + REPLY_MARGIN
            return self._call_guest(link, method, params, wait, context)
        finally:
            agent.queue.release()

    def _call_guest(self, link: AgentLink, method: str, params: Dict[str, Any], wait: Optional[float],
                    context: CallContext) -> Any:
        """
        The one path of every streaming call to the guest (``execute``, ``exec``, ``push``, ``pull``):
        its output, input and credit relayed end to end, its cancellation passed on, its reply
        sent only after the output it follows.
        """
        assert self.outbox is not None
        relay = _Relay(self.outbox, context.request_id, link, context.cancelled)
        context.listen(relay.from_client)
        try:
            result = link.endpoint.call(method, params, timeout=wait, on_notification=relay,
                                        cancelled=context.cancelled if link.can_cancel else None,
                                        on_credit=relay.guest_credit)
        finally:
            context.stop_listening()
            relay.flush()
        if relay.violation is not None:
            raise relay.violation
        return result
