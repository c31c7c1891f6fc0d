"""
How a daemon stops serving its peers: one order for the host daemon and the guest daemon.

By the time :func:`stop_serving` is called the daemon takes no new work (its main loop has
stopped accepting connections or sessions). Then, in this order:

1. **Cancel**: every open endpoint's requests are cancelled
   (:meth:`~negotiator_common.endpoint.Endpoint.cancel_requests`), so the runner sends SIGTERM
   to their commands and a request waiting for a command slot leaves the queue; the channels
   stay open. A request that still arrives is cancelled at once.
2. **Wait, bounded**: at most ``grace`` seconds until every request's reply has gone out
   (:meth:`~negotiator_common.endpoint.EndpointGroup.wait_replies`: the requests of a
   connection that ended already count too, their commands may still be dying). Whatever
   command is still running then is SIGKILLed with all its processes (``COMMANDS.kill_all`` of
   :mod:`negotiator_common.processes`), and the replies get ``kill_wait`` seconds more (plus
   :data:`REPLY_MOMENT`).
3. **Close** the endpoints.

So a peer whose command the stop killed gets that command's reply (ended by signal 15, or 9 if
it had to be SIGKILLed) at once, instead of ``ConnectionClosed`` and no word of what happened
to its command. Closing first would cancel the commands too, but their replies would have no
channel left to go out on.
"""

from typing import TYPE_CHECKING, Sequence

from negotiator_common.lazylog import get_logger
from negotiator_common.processes import COMMANDS

if TYPE_CHECKING:  # annotations only
    from negotiator_common.endpoint import Endpoint, EndpointGroup

__all__ = ('stop_serving', 'REPLY_MOMENT')

logger = get_logger(__name__)  # the library never prints through logging's last resort

REPLY_MOMENT = 0.2
"""Seconds the replies of SIGKILLed commands get to go out, beyond ``kill_wait``."""


def stop_serving(endpoints: Sequence['Endpoint'], group: 'EndpointGroup', reason: str, grace: float,
                 kill_wait: float) -> bool:
    """
    Stop serving ``endpoints`` (the open ones of ``group``, which holds every endpoint whose
    replies are not all out) in the order of this module's documentation; ``reason`` becomes
    their ``close_reason``. Returns within about ``grace + 2 * kill_wait`` seconds: True if every
    reply had gone out by then.
    """
    for endpoint in endpoints:
        endpoint.cancel_requests()
    replied = group.wait_replies(grace)
    if not replied:
        COMMANDS.kill_all(give_up_after=kill_wait)
        replied = group.wait_replies(kill_wait + REPLY_MOMENT)
    for endpoint in endpoints:
        endpoint.close(reason)
    if not replied:
        logger.warning("Some requests were still being served when the daemon stopped serving them")
    return replied
