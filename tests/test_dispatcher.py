"""The dispatcher: a pure registry of the methods a peer may call, each with its inline flag."""

import threading

import pytest

from negotiator_common.dispatcher import CallContext, Dispatcher
from negotiator_common.errors import MethodNotFound
from negotiator_common.protocol import Request


def test_dispatch_runs_one_request_on_the_calling_thread_whatever_its_flag():
    # Where a request runs (inline or on a thread of its own) is the endpoint's decision:
    # the dispatcher only records the flag and runs what it is handed.
    dispatcher = Dispatcher()
    threads = []
    dispatcher.register('slow', lambda params, ctx: threads.append(threading.current_thread()) or 'done')
    dispatcher.register('ping', lambda params, ctx: threads.append(threading.current_thread()) or 'pong',
                        inline=True)
    assert dispatcher.dispatch(Request(1, 'slow'), CallContext(1)).result == 'done'
    assert dispatcher.dispatch(Request(2, 'ping'), CallContext(2)).result == 'pong'
    assert threads == [threading.current_thread()] * 2
    assert not dispatcher.is_inline('slow') and dispatcher.is_inline('ping')
    assert dispatcher.is_inline('unknown')  # answered at once: an error reply
    assert dispatcher.names == ['ping', 'slow']
    with pytest.raises(ValueError):
        dispatcher.register('ping', lambda params, ctx: None)


def test_unknown_method_is_an_error_reply_not_an_exception():
    response = Dispatcher().dispatch(Request(3, 'nope'), CallContext(3))
    assert isinstance(response.error, MethodNotFound) and response.id == 3
