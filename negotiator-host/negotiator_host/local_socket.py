"""
Where the host daemon's local socket is: one answer for the daemon and for its clients.

``negotiator-host --daemon`` serves local callers on a UNIX socket and holds each guest's
channel for them; the CLI and :class:`~negotiator_host.channel.GuestChannel` look for it there
before they connect to a guest directly. Both ask :func:`socket_path`, so that they meet at the
same place: the path given (``--socket``, ``socket=``), else ``$NEGOTIATOR_HOST_SOCKET``, else
:data:`DEFAULT_SOCKET`. Only :mod:`os` is imported (not even :mod:`typing`: see
:mod:`negotiator_host.oneshot`): a quick CLI call pays nothing for it.
"""

import os

MYPY = False
if MYPY:  # annotations only (mypy.ini: always_true = MYPY)
    from typing import Optional

__all__ = ('DEFAULT_SOCKET', 'socket_path')

DEFAULT_SOCKET = '/run/negotiator/host.sock'
"""The host daemon's local socket unless an option or the environment names another."""


def socket_path(explicit: 'Optional[str]' = None) -> str:
    """The host daemon's socket: ``explicit`` if given, else ``$NEGOTIATOR_HOST_SOCKET``, else the default."""
    return explicit or os.environ.get('NEGOTIATOR_HOST_SOCKET') or DEFAULT_SOCKET
