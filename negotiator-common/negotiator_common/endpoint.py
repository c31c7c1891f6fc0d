"""
One side of a channel: it sends requests and serves requests at the same time.

An :class:`Endpoint` puts the protocol of :mod:`negotiator_common.protocol` on a
:class:`~negotiator_common.transport.Transport`. One reading thread decodes lines and routes
them: replies go to the caller waiting for that id (unknown ids, and values that cannot be
ids, are dropped with a log line that :mod:`negotiator_common.peerlog` keeps short and rare;
an error with a null id fails the one call waiting, when only one waits), requests go to the
:class:`~negotiator_common.dispatcher.Dispatcher`, cheap methods on the reading thread and the
others on threads of their own (:mod:`negotiator_common.workers`: reused while they are idle; at
most ``max_concurrent`` at once; more get a
:class:`~negotiator_common.errors.LimitExceeded` reply). The endpoint alone decides which
requests run inline and counts those in flight (:attr:`Endpoint.in_flight`), from acceptance
until the reply is out, which is what a stopping daemon waits for (:meth:`Endpoint.wait_replies`,
and :class:`EndpointGroup` for all of a daemon's connections). A handler's slot is given back
before its reply is written, so a peer that keeps within ``max_concurrent`` requests without a
reply is never refused. Every call has a timeout. No message of any shape ends the reader;
should it fail anyway, the connection closes with the reason in ``close_reason``, so that a
daemon connects again or serves the next session.

A request served on a thread may listen to the peer's notifications about it
(:meth:`~negotiator_common.dispatcher.CallContext.listen`): the chunks of a streamed input and
the credit for its output (``docs/protocol.rst``, "Streams and flow control"); a call of this
side gets the peer's ``credit`` about it through ``on_credit``. Every such callback runs on the
reading thread and must never wait: a stream's consumer is slow on a thread of its own.

The endpoint itself answers ``cancel`` (``docs/protocol.rst``, "Cancellation"): the request it
names gets its :class:`~negotiator_common.cancellation.Cancellation` set, as every request does
when the connection closes; :meth:`Endpoint.call` sends ``cancel`` in turn when the
cancellation it is given is set, and goes on waiting for the reply.

A client starts with :meth:`Endpoint.handshake`, the resynchronisation of ``docs/protocol.rst``
("Resynchronisation"): a virtio-serial port keeps bytes across clients, so a new client sends
a newline (ending any partial line left behind) and ``hello`` with a fresh random id, and
drops every line until the reply to that ``hello`` arrives.
"""

import itertools
import os
import threading
from typing import Any, Callable, Dict, List, Optional

from negotiator_common.cancellation import Cancellation
from negotiator_common.deadline import Deadline
from negotiator_common.dispatcher import CallContext, Dispatcher
from negotiator_common.errors import (
    CallTimeout, ConnectionClosed, InternalError, InvalidParams, LimitExceeded, MethodNotFound, NegotiatorError,
)
from negotiator_common.lazylog import get_logger
from negotiator_common.memory import release_free_memory
from negotiator_common.flow import CREDIT_METHOD
from negotiator_common.protocol import (
    DEFAULT_MAX_LINE_LENGTH, PROTOCOL_VERSION, RAW_INPUT_METHOD, DecodeError, LineDecoder, Message,
    Notification, Request, Response, encode_message, encode_message_parts, valid_id,
)
from negotiator_common.peerlog import Complaints, Cut, cut
from negotiator_common.transport import Transport
from negotiator_common.turns import Turns, Usage
from negotiator_common.workers import run_in_thread

__all__ = ('Endpoint', 'EndpointGroup', 'DEFAULT_TIMEOUT', 'DEFAULT_MAX_CONCURRENT', 'REPLY_WRITE_TIMEOUT',
           'SESSION_NOTIFICATION', 'CANCEL_METHOD', 'CANCEL_TIMEOUT')

DEFAULT_TIMEOUT = 10.0
"""Seconds that a call waits for its reply unless the caller says otherwise."""

DEFAULT_MAX_CONCURRENT = 16
"""Requests that one connection may have running at once; more are refused, not queued."""

REPLY_WRITE_TIMEOUT = 60.0
"""Seconds a reply may wait for a peer that does not read, before the connection is dropped."""

SESSION_NOTIFICATION = 'session'
"""The notification a serving side sends when a new session begins (``docs/protocol.rst``, "Sessions")."""

CANCEL_METHOD = 'cancel'
"""The request that cancels one request in flight by its id (``docs/protocol.rst``, "Cancellation")."""

CANCEL_TIMEOUT = 5.0
"""Seconds that :meth:`Endpoint.call` waits for the answer to the ``cancel`` it sends (then waits on for its reply)."""

LARGE_FEED = 64 * 1024
"""
Bytes (of a partial line and a read) from which a feed may complete a costly line: such feeds
take turns across all the endpoints of a process (``_LARGE_FEEDS``), so that 16 guests' 4 MiB
lines are parsed one after the other, not all at once; smaller ones (a ping) never wait, nor
do reads in which no line ends (nothing is parsed then). The endpoint that parsed least of late
goes first (:mod:`negotiator_common.turns`), so a guest's occasional large request waits for
about one parse in progress, not behind every guest that keeps the parser busy.
"""

_LARGE_FEEDS = Turns()

_log = get_logger(__name__)  # lazy: a quick CLI call never imports logging


class _PendingCall(object):
    """
    A call waiting for its reply: ``done`` once the reply (or a failure) is in ``response``;
    ``wake`` also when the caller's cancellation is set, so that one wait sees both.
    """

    __slots__ = ('method', 'done', 'wake', 'response', 'on_notification', 'on_credit')

    def __init__(self, method: str, on_notification: Optional[Callable[[Dict[str, Any]], None]],
                 on_credit: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self.method = method
        self.done = threading.Event()
        self.wake = threading.Event()
        self.response: Optional[Response] = None
        self.on_notification = on_notification
        self.on_credit = on_credit

    def finish(self, response: Response) -> None:
        self.response = response
        self.done.set()
        self.wake.set()


class Endpoint(object):
    """
    Requests out, requests in, over one transport.

    :param transport: the channel's :class:`Transport`.
    :param dispatcher: the methods this side serves (None: a pure client).
    :param name: names the peer in logs (a guest's name on the host); handlers see it as
                 ``context.peer``.
    :param on_session: called with the params of each ``session`` notification (the peer's
                       agent restarted), on the reading thread, before the calls waiting for
                       replies fail: a caller that closes the endpoint here has it closed by the
                       time those calls learn of the new session, so none retries on it.
    """

    def __init__(self, transport: Transport, dispatcher: Optional[Dispatcher] = None, name: str = 'peer',
                 max_line_length: int = DEFAULT_MAX_LINE_LENGTH,
                 max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                 on_session: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self.transport = transport
        self.dispatcher = dispatcher
        self.name = name
        self.log = _log.getChild(name.replace('.', '_') or 'peer')
        self.complaints = Complaints(self.log, name)
        self._decoder = LineDecoder(max_line_length)
        self._feeding = Usage()  # this connection's recent turns at parsing large lines
        # Raw output attachments are only ever sent to a caller that asked for them: none are
        # expected before this side's first call (a server never calls; a client first
        # resynchronises), so stale bytes of an earlier client can never start one.
        self._decoder.accept_attachments = False
        # A server takes the raw chunks of streamed input from the start: only it is sent them.
        self._decoder.accept_input = dispatcher is not None
        self._pending: Dict[Any, _PendingCall] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.max_concurrent = max_concurrent
        self.on_session = on_session
        self._running = 0  # requests whose handler runs on a thread of its own (at most max_concurrent)
        self._in_flight = 0  # those, and those whose reply is not yet sent (or dropped)
        self._in_flight_changed = threading.Condition()
        self._sync_id: Any = None
        self._closed = threading.Event()
        self._cancelled = Cancellation()  # every request, now and to come (an inline request's own)
        self._served: Dict[Any, List[Cancellation]] = {}  # the cancellations of requests on threads, by id
        self._served_lock = threading.Lock()
        self._listeners: Dict[Any, Callable[[Notification], None]] = {}  # served requests that listen, by id
        self._reader: Optional[threading.Thread] = None
        self.close_reason = ''

    # Lifecycle.

    def start(self) -> 'Endpoint':
        """Start the reading thread (a daemon thread); return self."""
        self._reader = threading.Thread(target=self.run, name='negotiator-reader-%s' % self.name)
        self._reader.daemon = True
        self._reader.start()
        return self

    def run(self) -> None:
        """Read and route messages on the calling thread until end of stream or :meth:`close`."""
        reason = 'peer closed the channel'
        try:
            while not self._closed.is_set():
                room = self._decoder.attachment_room()
                if room is not None:  # the bytes of an attachment: read straight to their place
                    count = self.transport.read_into(room)
                    if not count:
                        break
                    for event in self._decoder.attachment_filled(count):
                        self._handle(event)
                    continue
                data = self.transport.read()
                if not data:
                    break
                if self._line_bytes(data) < LARGE_FEED or b'\n' not in data:
                    # Small, or no line ends in it: nothing costly is parsed, the bytes are only kept.
                    for event in self._decoder.feed(data):
                        self._handle(event)
                elif self._feed_large(data):
                    release_free_memory()
        except ConnectionClosed:
            reason = 'closed locally'
        except OSError as exc:
            reason = 'read failed: %s' % exc
            self.log.warning("Reading from %s failed: %s", self.name, exc)
        except Exception as exc:
            # Nothing the peer sends should get here; if something does, this connection ends
            # (and its daemon connects again) instead of the reading thread dying with it open.
            reason = 'reader failed: %s: %s' % (type(exc).__name__, cut(str(exc)))
            self.log.error("Reading from %s failed unexpectedly (%s); closing the connection", self.name, reason)
            self.log.debug("The reader's failure", exc_info=True)
        finally:
            self.close(reason)

    def _line_bytes(self, data: bytes) -> int:
        """
        At most how many bytes of lines a feed of ``data`` may parse: the raw bytes of an
        attachment (streamed input or output, read 4 KiB at a time from a virtio-serial port)
        are only copied, and never take a turn at the parser.
        """
        return self._decoder.line_buffered + max(0, len(data) - self._decoder.expecting)

    def _feed_large(self, data: bytes) -> bool:
        """
        Feed bytes that may complete a large line, one such feed at a time in this process (what
        parsing costs is bounded per line by ``MAX_VALUES``, and so across all connections),
        then handle the events outside the lock; True if any came, so that their memory, freed
        on return, is given back.
        """
        with _LARGE_FEEDS.hold(self._feeding):
            events = self._decoder.feed(data)
        for event in events:
            self._handle(event)
        return bool(events)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until the endpoint is closed; return False if ``timeout`` passed first."""
        return self._closed.wait(timeout)

    def close(self, reason: str = 'closed locally') -> None:
        """Close the channel: waiting calls fail with :class:`ConnectionClosed`, handlers are cancelled."""
        if self._closed.is_set():
            return
        self.close_reason = reason
        self._closed.set()
        self._cancel_all()
        self.complaints.flush()
        self.log.debug("Connection to %s closed: %s", self.name, reason)
        self.transport.close()
        self._fail_pending('connection to %s closed before the reply to %%s arrived (%s)' % (self.name, reason))

    def _fail_pending(self, message: str) -> None:
        """Fail every call waiting for a reply with ConnectionClosed (``message`` has ``%s`` for the method)."""
        self._fail(self._take_pending(), message)

    def _take_pending(self) -> List[_PendingCall]:
        """The calls waiting for a reply, which no reply will reach from now on."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        return list(pending.values())

    @staticmethod
    def _fail(calls: List[_PendingCall], message: str) -> None:
        for call in calls:
            call.finish(Response(None, error=ConnectionClosed(message % call.method)))

    def cancel_requests(self) -> None:
        """
        Tell the handlers of the peer's requests to stop (running commands are killed), but
        keep the channel open so that their replies still reach the peer; :meth:`close` follows.
        A daemon that is stopping does this first, so its callers learn at once what happened.
        """
        self._cancel_all()

    def _cancel_all(self) -> None:
        """Cancel every request in flight, and every one that arrives from now on."""
        with self._served_lock:
            self._cancelled.set()
            cancellations = [c for group in self._served.values() for c in group]
        for cancellation in cancellations:
            cancellation.set()

    def cancel_request(self, request_id: Any) -> bool:
        """Cancel the peer's requests in flight with this id (what ``cancel`` does); False if none is."""
        with self._served_lock:
            cancellations = list(self._served.get(request_id, ()))
        for cancellation in cancellations:
            cancellation.set()
        return bool(cancellations)

    @property
    def in_flight(self) -> int:
        """
        The peer's requests that run on threads of their own now, from the moment they are
        accepted until their reply is sent, or dropped because the channel closed. At most
        ``max_concurrent`` handlers run; a few more replies may be on their way out. Inline
        methods are answered on the reading thread and never count.
        """
        return self._in_flight

    def wait_replies(self, timeout: Optional[float]) -> bool:
        """
        Wait until :attr:`in_flight` is 0: every request this side accepted has had its reply
        sent (or dropped, once closed); False if ``timeout`` seconds passed first (None: no bound).
        A stopping daemon cancels, waits here, then closes, so its callers get the replies of
        the commands it killed.
        """
        with self._in_flight_changed:
            return self._in_flight_changed.wait_for(lambda: self._in_flight == 0, timeout)

    def __enter__(self) -> 'Endpoint':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # Calling the peer.

    def handshake(self, timeout: Optional[float] = DEFAULT_TIMEOUT, agent: str = '',
                  params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """
        Resynchronise with the peer and exchange ``hello``; return the peer's hello result.

        Every line that arrives before the reply to this ``hello`` is dropped: it belongs to an
        earlier client of the same port. ``params`` go into the ``hello`` beside ``protocol``
        and ``agent``: the ``guest`` that a client of the host daemon's socket attaches to.
        """
        sync_id = 'hello-' + os.urandom(16).hex()  # secrets.token_hex, without importing hashlib
        self._sync_id = sync_id
        self.transport.write_all(b'\n', Deadline(timeout))
        hello = dict(params or {}, protocol=PROTOCOL_VERSION, agent=agent)
        result = self._call(Request(sync_id, 'hello', hello), timeout, None)
        return result if isinstance(result, dict) else {}

    def call(self, method: str, params: Optional[Dict[str, Any]] = None, timeout: Optional[float] = DEFAULT_TIMEOUT,
             on_notification: Optional[Callable[[Dict[str, Any]], None]] = None,
             cancelled: Optional[Cancellation] = None,
             on_credit: Optional[Callable[[Dict[str, Any]], None]] = None) -> Any:
        """
        Call ``method`` and return its result, or raise the error the peer replied with.

        ``timeout`` bounds the whole call in seconds (None: no bound). ``on_notification``
        receives the params of every notification the peer sends about this call (streamed
        command output), on the reading thread, in order; the raw bytes of an ``output``
        notification in the raw framing come as bytes under ``data_raw``. When ``cancelled``
        is set during the call, the peer is sent ``cancel`` naming it (give it only to a peer
        whose ``hello`` lists the ``cancel`` capability) and the call goes on waiting for the
        reply, which says what became of the request. ``on_credit`` receives the params of every
        ``credit`` notification about this call (room for its streamed input), on the reading
        thread; it must not wait.
        """
        if self._sync_id is None:
            self._decoder.accept_attachments = True
        return self._call(Request(next(self._ids), method, params), timeout, on_notification, cancelled, on_credit)

    def _call(self, request: Request, timeout: Optional[float],
              on_notification: Optional[Callable[[Dict[str, Any]], None]],
              cancelled: Optional[Cancellation] = None,
              on_credit: Optional[Callable[[Dict[str, Any]], None]] = None) -> Any:
        deadline = Deadline(timeout)
        call = _PendingCall(request.method, on_notification, on_credit)
        with self._pending_lock:
            if self._closed.is_set():
                raise ConnectionClosed('connection to %s is closed (%s)' % (self.name, self.close_reason))
            self._pending[request.id] = call
        try:
            self._send(request, deadline)
            self._wait_reply(call, request, deadline, cancelled)
        finally:
            with self._pending_lock:
                self._pending.pop(request.id, None)
        response = call.response
        if response is None:  # pragma: no cover (done is only set with a response)
            raise ConnectionClosed('no reply from %s' % self.name)
        if response.error is not None:
            raise response.error
        return response.result

    def _wait_reply(self, call: _PendingCall, request: Request, deadline: Deadline,
                    cancelled: Optional[Cancellation]) -> None:
        """Wait until ``call`` is done; once ``cancelled`` is set, ask the peer to cancel it (once)."""
        if cancelled is not None:
            cancelled.watch(call.wake)
        try:
            asked = False
            while True:
                call.wake.clear()
                if call.done.is_set():
                    return
                if cancelled is not None and cancelled.is_set() and not asked:
                    asked = True
                    self._ask_cancel(request, deadline)
                    continue
                if not call.wake.wait(deadline.remaining()):
                    raise CallTimeout('%s did not reply to %s within %s seconds' % (
                        self.name, request.method, deadline.timeout))
        finally:
            if cancelled is not None:
                cancelled.unwatch(call.wake)

    def _ask_cancel(self, request: Request, deadline: Deadline) -> None:
        """Send ``cancel`` for ``request``; a failure is only logged (the request's own reply still comes, or not)."""
        remaining = deadline.remaining()
        timeout = CANCEL_TIMEOUT if remaining is None else min(CANCEL_TIMEOUT, remaining)
        try:
            self._call(Request(next(self._ids), CANCEL_METHOD, {'id': request.id}), timeout, None)
        except NegotiatorError as exc:
            self.log.debug("Cancelling %s on %s failed: %s", Cut(request), self.name, exc)

    def announce_session(self, params: Optional[Dict[str, Any]] = None, timeout: float = 5.0) -> None:
        """
        Tell the peer that a new session begins on this side (a line feed, then the ``session``
        notification): a caller still waiting for replies from an earlier session (an agent
        that died and was restarted) learns at once that they are lost, instead of waiting
        for its timeout. A failure to write is only logged: the session goes on.
        """
        try:
            self.transport.write_all(b'\n' + encode_message(Notification(SESSION_NOTIFICATION, params or {})),
                                     Deadline(timeout))
        except NegotiatorError as exc:
            self.log.debug("Could not announce the session to %s: %s", self.name, exc)

    def _resynchronise(self) -> None:
        """
        After a peer's ``session``: a line feed, which ends the partial line that the rest of an
        ``input`` chunk in flight leaves in the new agent's decoder (``docs/protocol.rst``,
        "Streamed input"), so that the next request is read on a line of its own. The calls
        that were streaming input have failed already, so their pumps send nothing more.
        """
        try:
            self.transport.write_all(b'\n', Deadline(REPLY_WRITE_TIMEOUT))
        except NegotiatorError as exc:
            self.log.debug("Could not resynchronise with %s after its new session: %s", self.name, exc)

    def notify(self, notification: Notification) -> None:
        """
        Send a notification (no reply expected); dropped silently once the channel is closed.

        A notification with an ``attachment`` (raw output) goes out as its line and its bytes in
        one locked write, so that no other message can come between them.
        """
        self._send(notification, Deadline(REPLY_WRITE_TIMEOUT))

    # Internals.

    def _send(self, message: Message, deadline: Deadline, log_traffic: bool = True) -> None:
        """Write one message; ``log_traffic`` False when a complaint already logged why (a bad line's error)."""
        if self._closed.is_set():
            if isinstance(message, Request):
                raise ConnectionClosed('connection to %s is closed (%s)' % (self.name, self.close_reason))
            return
        if log_traffic:
            self.log.debug("Sending %s to %s", Cut(message), self.name)
        try:
            data = encode_message_parts(message)
        except (TypeError, ValueError) as exc:
            # A handler returned something JSON cannot carry (bytes, NaN): the peer still gets a
            # reply, and the reading thread lives on.
            if not isinstance(message, Response):
                raise
            self.log.error("Reply to %s cannot be encoded: %s", Cut(message.id), exc)
            data = encode_message_parts(Response(message.id, error=InternalError(
                'the reply could not be encoded as JSON: %s' % exc)))
        try:
            self.transport.write_all(data, deadline)
        except CallTimeout:
            if isinstance(message, Request):
                raise
            self.close('peer stopped reading: a reply could not be written in time')
        except ConnectionClosed as exc:
            self.close(str(exc))
            if isinstance(message, Request):
                raise

    def _handle(self, event: Any) -> None:
        """
        Route one event from the decoder. Whatever the peer sent, this returns: values that
        cannot be ids route nowhere, and every complaint about the peer is cut short and
        rate-limited (``docs/security.rst``, "Logs").
        """
        if self._sync_id is not None:
            if isinstance(event, Response) and event.id == self._sync_id:
                self._sync_id = None
                self._decoder.accept_attachments = True
            else:
                self.complaints.complain('debug', 'stale lines', "Dropping %s from %s while resynchronising",
                                         Cut(event), self.name)
                return
        if isinstance(event, Response):
            self._route_response(event)
        elif isinstance(event, Request):
            self._serve(event)
        elif isinstance(event, Notification):
            self._route_notification(event)
        elif isinstance(event, DecodeError):
            answer = self.dispatcher is not None
            self.complaints.complain('warning', 'bad lines', "Bad line from %s%s: %s", self.name,
                                     ' (answered with an error)' if answer else '', Cut(event.error.message))
            if answer:
                self._send(Response(event.id, error=event.error), Deadline(REPLY_WRITE_TIMEOUT),
                           log_traffic=False)

    def _route_response(self, response: Response) -> None:
        if response.id is None and response.error is not None:
            self._route_unattributed_error(response)
            return
        # Taken out of the pending calls at once: a close that follows before the caller wakes
        # (the peer replied, then hung up) must not replace this reply with ConnectionClosed.
        call = None
        if valid_id(response.id):
            with self._pending_lock:
                call = self._pending.pop(response.id, None)
        if call is None:
            self.complaints.complain('debug', 'replies to unknown ids',
                                     "Dropping reply from %s to unknown request id %s", self.name, Cut(response.id))
            return
        call.finish(response)

    def _route_unattributed_error(self, response: Response) -> None:
        """
        An error with a null id: the peer could not read a request well enough to name it (a
        line over its limit, bytes that are not UTF-8). With exactly one call of this side
        waiting, that call is the one it could not read, and it fails now instead of at its
        timeout; with none or several, nobody can tell whose it was, and it is dropped.
        """
        with self._pending_lock:
            call = self._pending.popitem()[1] if len(self._pending) == 1 else None
            waiting = len(self._pending)
        if call is None:
            self.complaints.complain('warning', 'errors that name no request',
                                     "Dropping an error from %s that names no request (%d calls wait): %s",
                                     self.name, waiting, Cut(response.error))
            return
        call.finish(response)

    def _route_notification(self, notification: Notification) -> None:
        params = notification.params if isinstance(notification.params, dict) else {}
        if notification.method == SESSION_NOTIFICATION:
            # The calls are taken first (no reply of the old session can reach them), and fail
            # after the hook: a hook that closes this endpoint has closed it by then, and they
            # still say why they failed.
            lost = self._take_pending()
            if self.on_session is not None:
                self.on_session(params)
            self._fail(lost, '%s began a new session (its agent restarted?): the reply to %%s is lost' % self.name)
            if not self.closed:
                self._resynchronise()
            return
        call_id = params.get('id')
        if notification.method in (RAW_INPUT_METHOD, CREDIT_METHOD) and self._to_listener(call_id, notification):
            return
        call = None
        if valid_id(call_id) and notification.method != RAW_INPUT_METHOD:
            with self._pending_lock:
                call = self._pending.get(call_id)
        if call is not None and notification.method == CREDIT_METHOD:
            self._pass_credit(call, call_id, params)
            return
        if call is None or call.on_notification is None:
            self.complaints.complain('debug', 'notifications no call waits for',
                                     "Dropping %s from %s: no call waits for it", Cut(notification), self.name)
            return
        if notification.attachment is not None:
            # Raw output: the callback gets the bytes that followed the line as ``data_raw``.
            params = dict(params, data_raw=notification.attachment)
        try:
            call.on_notification(params)
        except Exception as exc:
            # The caller's own callback failed (its output could not be written, say): that call
            # fails with the reason, and the channel and every other call live on.
            # A NegotiatorError is the callback's verdict on the peer (more output than it was granted).
            error = exc if isinstance(exc, NegotiatorError) else InternalError(
                'handling a notification from %s about %s failed: %s: %s' % (
                    self.name, call.method, type(exc).__name__, exc))
            self._fail_call(call_id, error, exc)

    def _to_listener(self, request_id: Any, notification: Notification) -> bool:
        """Hand ``notification`` to the served request ``request_id`` that listens; False if none does."""
        listener = self._listeners.get(request_id) if valid_id(request_id) else None
        if listener is None:
            return False
        try:
            listener(notification)
        except Exception as exc:  # the handler's own failure: logged, the reader lives on
            self.log.error("Handling %s from %s failed: %s: %s", Cut(notification), self.name, type(exc).__name__,
                           exc)
        return True

    def _pass_credit(self, call: _PendingCall, call_id: Any, params: Dict[str, Any]) -> None:
        """A ``credit`` about a call of this side: to its ``on_credit``, else dropped."""
        if call.on_credit is None:
            self.complaints.complain('debug', 'notifications no call waits for',
                                     "Dropping credit from %s: call %s streams nothing", self.name, Cut(call_id))
            return
        try:
            call.on_credit(params)
        except Exception as exc:
            self._fail_call(call_id, InternalError('handling credit from %s about %s failed: %s: %s' % (
                self.name, call.method, type(exc).__name__, exc)), exc)

    def listen(self, request_id: Any, listener: Optional[Callable[[Notification], None]]) -> None:
        """
        Hand the peer's ``input`` and ``credit`` notifications about the served request
        ``request_id`` to ``listener`` (None: no more). One listener per id: a second while the
        first listens is :class:`InvalidParams` (the peer reused the id of a streaming request).
        """
        with self._served_lock:
            if listener is None:
                self._listeners.pop(request_id, None)
                return
            if request_id in self._listeners:
                raise InvalidParams('a request with id %s streams already on this connection' % cut(request_id, 40))
            self._listeners[request_id] = listener

    def _fail_call(self, call_id: Any, error: NegotiatorError, cause: BaseException) -> None:
        """Fail the waiting call ``call_id`` with ``error`` (raised from ``cause``), if it still waits."""
        with self._pending_lock:
            call = self._pending.pop(call_id, None)
        if call is not None:
            if error is not cause:
                error.__cause__ = cause
            call.finish(Response(call_id, error=error))

    def _serve(self, request: Request) -> None:
        if self.dispatcher is None:
            self._reply(Response(request.id, error=MethodNotFound('%s serves no methods' % self.name)))
            return
        if request.method == CANCEL_METHOD:
            self._reply(self._answer_cancel(request))
            return
        if self.dispatcher.is_inline(request.method):
            # Cheap methods answer at once on this thread: no thread to start, nothing to count,
            # never refused for want of a slot (the ping path that scripts/benchmark measures).
            # Their cancellation is the endpoint's own (set when it closes): no event of their
            # own to make, which in an emulated guest is a measurable part of a ping.
            self._reply(self.dispatcher.dispatch(request, CallContext(
                request.id, peer=self.name, notify=self.notify, cancelled=self._cancelled, listen=self.listen)))
            return
        cancelled = Cancellation()
        context = CallContext(request.id, peer=self.name, notify=self.notify, cancelled=cancelled,
                              listen=self.listen)
        if not self._accept():
            self._reply(Response(request.id, error=LimitExceeded(
                'too many requests in flight on this connection; try again when one has finished')))
            return
        self._track(request.id, cancelled)
        run_in_thread('negotiator-%s-%s' % (request.method, cut(request.id, 40)), self._serve_in_thread,
                      self.dispatcher, request, context)

    def _answer_cancel(self, request: Request) -> Response:
        """``cancel``: set the cancellation of the peer's requests in flight with the id it names."""
        params = request.params
        if not isinstance(params, dict) or 'id' not in params or not valid_id(params['id']):
            return Response(request.id, error=InvalidParams('cancel needs the id of a request (a string, an integer'
                                                            ' or null) as its parameter "id"'))
        return Response(request.id, result={'cancelled': self.cancel_request(params['id'])})

    def _track(self, request_id: Any, cancelled: Cancellation) -> None:
        """Keep the cancellation of a request served on a thread (set at once if every request is cancelled)."""
        with self._served_lock:
            self._served.setdefault(request_id, []).append(cancelled)
            if self._cancelled.is_set():
                cancelled.set()

    def _untrack(self, request_id: Any, cancelled: Cancellation) -> None:
        with self._served_lock:
            group = self._served.get(request_id, [])
            if cancelled in group:
                group.remove(cancelled)
            if not group:
                self._served.pop(request_id, None)

    def _accept(self) -> bool:
        """Count one more request in flight, unless ``max_concurrent`` run already (False: refuse it)."""
        with self._in_flight_changed:
            if self._running >= self.max_concurrent:
                return False
            self._running += 1
            self._in_flight += 1
            return True

    def _serve_in_thread(self, dispatcher: Dispatcher, request: Request, context: CallContext) -> None:
        try:
            try:
                response = dispatcher.dispatch(request, context)
            finally:
                # The slot is free before the reply is out: a peer that has its reply may send
                # another request at once (the host daemon keeps a guest at its limit so).
                self._untrack(request.id, context.cancelled)
                context.stop_listening()
                with self._in_flight_changed:
                    self._running -= 1
            self._reply(response)
        except NegotiatorError as exc:
            self.log.debug("Reply to %s not sent: %s", Cut(request), exc)
        finally:
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify_all()

    def _reply(self, response: Response) -> None:
        self._send(response, Deadline(REPLY_WRITE_TIMEOUT))


class EndpointGroup(object):
    """
    The endpoints that a daemon serves, each kept until it is closed and its last reply is out.

    A connection that ended may still have requests in flight (commands being killed after
    their cancellation); a daemon that stops waits for those as well as for its open
    connections' (:meth:`wait_replies`).
    """

    def __init__(self) -> None:
        self._endpoints: List[Endpoint] = []
        self._lock = threading.Lock()

    def add(self, endpoint: Endpoint) -> Endpoint:
        """Keep ``endpoint`` (and forget those that are closed with nothing in flight); return it."""
        with self._lock:
            self._endpoints = [e for e in self._endpoints if not (e.closed and e.in_flight == 0)]
            self._endpoints.append(endpoint)
        return endpoint

    @property
    def in_flight(self) -> int:
        """Requests in flight on all the endpoints together."""
        with self._lock:
            endpoints = list(self._endpoints)
        return sum(endpoint.in_flight for endpoint in endpoints)

    def wait_replies(self, timeout: Optional[float]) -> bool:
        """:meth:`Endpoint.wait_replies` for every endpoint, within one ``timeout`` for all; False if it passed."""
        deadline = Deadline(timeout)
        with self._lock:
            endpoints = list(self._endpoints)
        return all(endpoint.wait_replies(deadline.remaining()) for endpoint in endpoints)
