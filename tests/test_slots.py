"""The host's bound on commands across guests: CommandSlots, fair queueing, refusal, leaving the queue."""

import socket
import threading

import pytest

from negotiator_common.commands import CommandRegistry
from negotiator_common.deadline import NO_DEADLINE, Deadline
from negotiator_common.endpoint import Endpoint
from negotiator_common.errors import ConnectionClosed, LimitExceeded
from negotiator_common.service import AgentService
from negotiator_common.slots import CommandSlots
from negotiator_common.transport import Transport

from waiting import wait_until


def _queue_up(slots, peer, name, order, cancelled=None):
    """A thread that waits for a slot as ``peer``, records ``name`` when it gets one, and gives it back."""
    def take_turn():
        slots.acquire(peer, NO_DEADLINE, cancelled or threading.Event())
        order.append(name)
        slots.release()
    thread = threading.Thread(target=take_turn)
    thread.start()
    return thread


def test_a_free_slot_goes_to_the_peers_in_turn():
    slots = CommandSlots(limit=1, max_queued=3)
    slots.acquire('a', NO_DEADLINE, threading.Event())
    order = []
    threads = []
    for peer, name in (('a', 'a1'), ('a', 'a2'), ('b', 'b1')):
        threads.append(_queue_up(slots, peer, name, order))
        assert wait_until(lambda: slots.queued == len(threads))
    slots.release()
    for thread in threads:
        thread.join(5)
    # First come first served would run a2 before b1: b's only request would wait behind all of a's.
    assert order == ['a1', 'b1', 'a2']
    assert (slots.running, slots.queued) == (0, 0)


def test_beyond_the_queue_a_request_is_refused_at_once():
    slots = CommandSlots(limit=2, max_queued=1)
    for peer in ('a', 'b'):
        slots.acquire(peer, NO_DEADLINE, threading.Event())
    order = []
    waiting = _queue_up(slots, 'c', 'c1', order)
    assert wait_until(lambda: slots.queued == 1)
    with pytest.raises(LimitExceeded) as refused:
        slots.acquire('d', NO_DEADLINE, threading.Event())
    assert '2 commands run and 1 wait' in str(refused.value)
    slots.release()
    waiting.join(5)
    slots.release()
    assert order == ['c1'] and (slots.running, slots.queued) == (0, 0)


def test_a_waiter_leaves_the_queue_when_its_caller_goes_or_its_time_runs_out():
    slots = CommandSlots(limit=1, max_queued=1)
    slots.acquire('a', NO_DEADLINE, threading.Event())
    cancelled = threading.Event()
    outcome = []

    def wait_cancelled():
        try:
            slots.acquire('b', NO_DEADLINE, cancelled)
        except ConnectionClosed as exc:
            outcome.append(exc)
    thread = threading.Thread(target=wait_cancelled)
    thread.start()
    assert wait_until(lambda: slots.queued == 1)
    cancelled.set()
    thread.join(5)
    assert isinstance(outcome[0], ConnectionClosed) and slots.queued == 0
    # Its place is free again; a waiter whose deadline passes leaves too.
    with pytest.raises(LimitExceeded) as late:
        slots.acquire('c', Deadline(0.05), threading.Event())
    assert 'no command slot became free in time' in str(late.value) and slots.queued == 0
    # Nobody left holding a slot: the one slot is free once its holder gives it back.
    slots.release()
    assert slots.running == 0
    slots.acquire('d', NO_DEADLINE, threading.Event())
    assert slots.running == 1


def test_a_request_waits_for_a_slot_no_longer_than_its_own_timeout(tmp_path):
    slots = CommandSlots(limit=1, max_queued=1)
    service = AgentService('negotiator-test', CommandRegistry([str(tmp_path)]), slots=slots)
    server_sock, client_sock = socket.socketpair()
    server = Endpoint(Transport.from_socket(server_sock), service.dispatcher(), name='guest-1').start()
    client = Endpoint(Transport.from_socket(client_sock), name='client').start()
    try:
        slots.acquire('another guest', NO_DEADLINE, threading.Event())
        with pytest.raises(LimitExceeded) as late:
            client.call('execute', {'command': 'hostname', 'timeout': 0.3}, timeout=10)
        assert 'no command slot became free in time' in str(late.value)
        assert (slots.running, slots.queued) == (1, 0)
        slots.release()
        assert client.call('execute', {'command': 'hostname', 'timeout': 5}, timeout=10)['exit_status'] == 0
        assert (slots.running, slots.queued) == (0, 0)
    finally:
        client.close()
        server.close()
