"""The dispatcher's bookkeeping of requests in flight, which daemons wait on when they stop."""

import threading

from negotiator_common.dispatcher import CallContext, Dispatcher
from negotiator_common.errors import MethodNotFound
from negotiator_common.protocol import Request


def test_in_flight_counts_running_handlers_and_wait_idle_waits_for_them():
    gate = threading.Event()
    dispatcher = Dispatcher()
    dispatcher.register('slow', lambda params, ctx: gate.wait(5))
    dispatcher.register('ping', lambda params, ctx: 'pong', inline=True)
    worker = threading.Thread(target=dispatcher.dispatch, args=(Request(1, 'slow'), CallContext(1)))
    worker.start()
    try:
        assert not dispatcher.wait_idle(0.3)
        assert dispatcher.in_flight == 1
        # An inline method is answered at once, whatever runs beside it.
        assert dispatcher.dispatch(Request(2, 'ping'), CallContext(2)).result == 'pong'
    finally:
        gate.set()
        worker.join(5)
    assert dispatcher.wait_idle(1) and dispatcher.in_flight == 0


def test_unknown_method_is_an_error_reply_not_an_exception():
    response = Dispatcher().dispatch(Request(3, 'nope'), CallContext(3))
    assert isinstance(response.error, MethodNotFound) and response.id == 3
