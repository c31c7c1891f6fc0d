"""
negotiator_common.stopping: the one stop order of both daemons, on a socket pair.

The server side serves a dispatcher whose handlers stand for commands; the client side is the
peer that must learn what happened to its calls when the daemon stops.
"""

import socket
import threading

import pytest

from negotiator_common.dispatcher import Dispatcher
from negotiator_common.endpoint import Endpoint, EndpointGroup
from negotiator_common.errors import ConnectionClosed
from negotiator_common.runner import run_process
from negotiator_common.stopping import stop_serving
from negotiator_common.transport import Transport

from waiting import wait_until


@pytest.fixture
def pair():
    """(dispatcher, server endpoint, its daemon's endpoint group, client endpoint, handlers started)."""
    dispatcher = Dispatcher()
    started = []
    left, right = socket.socketpair()
    group = EndpointGroup()
    server = group.add(Endpoint(Transport.from_socket(left), dispatcher, name='peer').start())
    client = Endpoint(Transport.from_socket(right), name='daemon').start()
    yield dispatcher, server, group, client, started
    client.close()
    server.close()


def _call_on_a_thread(client, method):
    """Call ``method`` on a thread; return the thread and the list that gets the result or the exception."""
    outcome = []

    def call():
        try:
            outcome.append(client.call(method, timeout=60))
        except Exception as exc:
            outcome.append(exc)
    caller = threading.Thread(target=call)
    caller.start()
    return caller, outcome


def test_the_peer_gets_the_reply_of_a_request_the_stop_cancelled(pair):
    # Cancel, wait for the handler and its reply, then close: closing first (the host daemon's
    # old order, docs/faults.rst "Host daemon restarted") left the caller with ConnectionClosed.
    dispatcher, server, group, client, started = pair

    def command(params, context):
        started.append(True)
        context.cancelled.wait()
        return 'stopped'
    dispatcher.register('command', command)
    caller, outcome = _call_on_a_thread(client, 'command')
    assert wait_until(lambda: started)
    assert stop_serving([server], group, 'the daemon stops', grace=10, kill_wait=1)
    caller.join(10)
    assert outcome == ['stopped']
    assert server.closed and server.close_reason == 'the daemon stops'
    assert client.wait_closed(5)


def test_a_command_that_ignores_sigterm_is_killed_and_its_reply_still_goes_out(pair):
    dispatcher, server, group, client, started = pair

    def command(params, context):
        started.append(True)
        # The runner's own SIGKILL would come only after 60 s: the stop's comes after its grace.
        result = run_process(['/bin/sh', '-c', "trap '' TERM; echo ready; exec sleep 60"],
                             on_output=lambda stream, chunk: started.append(chunk),
                             cancelled=context.cancelled, kill_grace=60)
        return result.signal
    dispatcher.register('command', command)
    caller, outcome = _call_on_a_thread(client, 'command')
    assert wait_until(lambda: b'ready\n' in started)  # the trap is set
    assert stop_serving([server], group, 'the daemon stops', grace=0.3, kill_wait=5)
    caller.join(10)
    assert outcome == [9]


def test_a_handler_that_never_returns_bounds_the_stop_and_the_peer_learns_it(pair):
    dispatcher, server, group, client, started = pair
    release = threading.Event()

    def stuck(params, context):
        started.append(True)
        release.wait(60)  # deaf to the cancellation
        return 'too late'
    dispatcher.register('stuck', stuck)
    caller, outcome = _call_on_a_thread(client, 'stuck')
    try:
        assert wait_until(lambda: started)
        assert not stop_serving([server], group, 'the daemon stops', grace=0.2, kill_wait=0.2)
        assert server.closed
        caller.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)
    finally:
        release.set()


def test_handlers_of_a_connection_already_gone_are_waited_for_too(pair):
    # The guest daemon may stop between sessions: no endpoint is left to cancel or close, but a
    # handler of the session that ended may still run, and the stop must not claim it is over.
    dispatcher, server, group, client, started = pair
    release = threading.Event()

    def stuck(params, context):
        started.append(True)
        release.wait(60)
        return 'too late'
    dispatcher.register('stuck', stuck)
    caller, outcome = _call_on_a_thread(client, 'stuck')
    try:
        assert wait_until(lambda: started)
        server.close('the session ended')
        assert not stop_serving([], group, 'the daemon stops', grace=0.2, kill_wait=0.2)
        release.set()
        assert stop_serving([], group, 'the daemon stops', grace=10, kill_wait=1)
    finally:
        release.set()
        caller.join(10)
