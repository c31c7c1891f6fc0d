"""
How a daemon stops serving its peers: one order for the host daemon and the guest daemon.

By the time :func:`stop_serving` is called the daemon takes no new work (its main loop has
stopped accepting connections or sessions). Then, in this order:

1. **Cancel**: every endpoint's requests are cancelled (:meth:`Endpoint.cancel_requests`), so
   the runner sends SIGTERM to their commands and a request waiting for a command slot leaves
   the queue; the channels stay open. A request that still arrives is cancelled at once.
2. **Wait, bounded**: at most ``grace`` seconds for the handlers to return. Whatever command is
   still running then is SIGKILLed with all its processes (``COMMANDS.kill_all`` of
   :mod:`negotiator_common.processes`), and the handlers get ``kill_wait``
   seconds more.
3. **Let the replies out**: a handler's reply is written after it returns, so the endpoints are
   given until that same deadline (and at least :data:`REPLY_MOMENT`) to send them.
4. **Close** the endpoints.

So a peer whose command the stop killed gets that command's reply (ended by signal 15, or 9 if
it had to be SIGKILLed) at once, instead of ``ConnectionClosed`` and no word of what happened
to its command. Closing first would cancel the commands too, but their replies would have no
channel left to go out on.
"""

import time
from typing import TYPE_CHECKING, Sequence

from negotiator_common.lazylog import get_logger
from negotiator_common.processes import COMMANDS

if TYPE_CHECKING:  # annotations only
    from negotiator_common.dispatcher import Dispatcher
    from negotiator_common.endpoint import Endpoint

__all__ = ('stop_serving', 'REPLY_MOMENT')

logger = get_logger(__name__)  # the library never prints through logging's last resort

REPLY_MOMENT = 0.2
"""Seconds the replies get to go out even when the handlers took all the time there was."""


def stop_serving(endpoints: Sequence['Endpoint'], dispatcher: 'Dispatcher', reason: str, grace: float,
                 kill_wait: float) -> bool:
    """
    Stop serving ``endpoints`` (whose requests ``dispatcher`` runs) in the order of this module's
    documentation; ``reason`` becomes their ``close_reason``. Returns within about
    ``grace + 2 * kill_wait`` seconds: True if every handler had returned and every reply had
    gone out by then.
    """
    deadline = time.monotonic() + grace
    for endpoint in endpoints:
        endpoint.cancel_requests()
    idle = _wait_for_handlers(dispatcher, grace)
    if not idle:
        COMMANDS.kill_all(give_up_after=kill_wait)
        idle = _wait_for_handlers(dispatcher, kill_wait)
    replies_until = max(deadline + kill_wait, time.monotonic() + REPLY_MOMENT)
    replied = all([endpoint.wait_replies(max(0.0, replies_until - time.monotonic())) for endpoint in endpoints])
    for endpoint in endpoints:
        endpoint.close(reason)
    if not (idle and replied):
        logger.warning("Some requests were still being served when the daemon stopped serving them")
    return idle and replied


def _wait_for_handlers(dispatcher: 'Dispatcher', timeout: float) -> bool:
    """Wait until no handler runs (the one place that asks the dispatcher); False if ``timeout`` passed first."""
    return dispatcher.wait_idle(timeout)
