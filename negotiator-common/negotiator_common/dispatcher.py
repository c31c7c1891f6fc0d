"""
The explicit registry of the methods that a peer may call.

Only names registered here can be reached from the wire: there is no ``getattr`` on an object,
so adding a public method to a class never makes it remotely callable (the trap of earlier
guest agents). :meth:`Dispatcher.dispatch` turns every outcome into a reply: a result, or an
error object with a stable code (``docs/protocol.rst``, "Errors"); the server always lives on.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from negotiator_common.cancellation import Cancellation
from negotiator_common.errors import InternalError, InvalidParams, MethodNotFound, NegotiatorError
from negotiator_common.lazylog import get_logger
from negotiator_common.protocol import Notification, Request, Response

__all__ = ('CallContext', 'Dispatcher', 'Handler', 'get_param')

logger = get_logger(__name__)  # lazy: a quick CLI call never imports logging

_MISSING = object()


class CallContext(object):
    """
    What a handler knows about the call it serves.

    ``peer`` names the other side (a guest's name on the host), ``notify`` sends a
    notification on the same channel (streamed output), and ``cancelled`` is set when the
    caller cancels this request (``cancel``) or the channel closes, so that a long handler (a
    running command) can stop early. :meth:`listen` hands the peer's notifications about this
    request (streamed input, credit) to a callback until the handler returns.
    """

    def __init__(self, request_id: Any, peer: str = '', notify: Optional[Callable[[Notification], None]] = None,
                 cancelled: Optional[Cancellation] = None,
                 listen: Optional[Callable[[Any, Optional[Callable[[Notification], None]]], None]] = None) -> None:
        self.request_id = request_id
        self.peer = peer
        self.notify = notify or (lambda notification: None)
        self.cancelled = cancelled if cancelled is not None else Cancellation()
        self._listen = listen
        self.listening = False

    def listen(self, listener: Callable[[Notification], None]) -> None:
        """
        Receive the peer's ``input`` and ``credit`` notifications about this request, on the
        reading thread (the callback must not wait), until the handler returns. Without an
        endpoint (a test's context) nothing arrives.
        """
        if self._listen is not None:
            self._listen(self.request_id, listener)
            self.listening = True

    def stop_listening(self) -> None:
        if self._listen is not None and self.listening:
            self.listening = False
            self._listen(self.request_id, None)


Handler = Callable[[Dict[str, Any], CallContext], Any]


def get_param(params: Dict[str, Any], name: str, types: Tuple[type, ...], default: Any = _MISSING) -> Any:
    """
    Read one named parameter and check its JSON type; raise :class:`InvalidParams` if wrong.

    Booleans are not integers here (JSON keeps them apart, Python does not).
    """
    if name not in params:
        if default is _MISSING:
            raise InvalidParams('missing parameter %r' % name)
        return default
    value = params[name]
    if isinstance(value, bool) and bool not in types:
        raise InvalidParams('parameter %r must be %s, not a boolean' % (name, _type_names(types)))
    if not isinstance(value, types):
        raise InvalidParams('parameter %r must be %s, not %s' % (name, _type_names(types), type(value).__name__))
    return value


def _type_names(types: Sequence[type]) -> str:
    names = {str: 'a string', int: 'an integer', float: 'a number', bool: 'a boolean',
             list: 'an array', dict: 'an object', type(None): 'null'}
    return ' or '.join(names.get(t, t.__name__) for t in types)


class Dispatcher(object):
    """
    Methods by name, each with its ``inline`` flag: a pure registry, which runs one request
    when asked. Where a request runs is the endpoint's decision
    (:class:`~negotiator_common.endpoint.Endpoint`): ``inline`` methods are cheap and answered on
    the reading thread (``hello``, ``ping``), the others on threads of their own, so that a slow
    command never delays a ping; the endpoint also counts those that run.
    """

    def __init__(self) -> None:
        self._methods: Dict[str, Tuple[Handler, bool]] = {}

    def register(self, name: str, handler: Handler, inline: bool = False) -> None:
        """Make ``handler(params, context)`` callable from the wire as ``name``."""
        if name in self._methods:
            raise ValueError('method %r is registered already' % name)
        self._methods[name] = (handler, inline)

    def method(self, name: str, inline: bool = False) -> Callable[[Handler], Handler]:
        """The decorator form of :meth:`register`."""
        def decorate(handler: Handler) -> Handler:
            self.register(name, handler, inline)
            return handler
        return decorate

    @property
    def names(self) -> List[str]:
        return sorted(self._methods)

    def is_inline(self, name: str) -> bool:
        """True for registered cheap methods; unknown names are answered inline too (an error)."""
        entry = self._methods.get(name)
        return entry is None or entry[1]

    def dispatch(self, request: Request, context: CallContext) -> Response:
        """Run the request's handler and turn whatever happens into a :class:`Response`."""
        entry = self._methods.get(request.method)
        if entry is None:
            return Response(request.id, error=MethodNotFound('method %r not found' % request.method))
        handler = entry[0]
        if not isinstance(request.params, dict):
            return Response(request.id, error=InvalidParams('params must be an object (named parameters)'))
        try:
            return Response(request.id, result=handler(request.params, context))
        except NegotiatorError as exc:
            return Response(request.id, error=exc)
        except Exception as exc:
            logger.exception("Method %r failed unexpectedly", request.method)
            return Response(request.id, error=InternalError('%s failed: %s: %s' % (
                request.method, type(exc).__name__, exc)))
