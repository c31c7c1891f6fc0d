"""
negotiator-host: the host side of negotiator, a generic KVM/QEMU guest agent.

Talk to the agent in a guest (by libvirt name: through the host daemon when it serves the
guest, else directly; or by socket path)::

    from negotiator_host import GuestChannel

    with GuestChannel('web-1', timeout=5) as guest:
        print('%.2f ms' % (guest.ping() * 1000))
        for command in guest.list_commands():
            print(command.name)
        result = guest.execute('df', '-h', '/')
        print(result.exit_status, result.stdout.decode())

Ask many guests at once::

    from negotiator_host import list_guests, map_guests

    running = [g for g in list_guests() if g.socket_for()]
    for outcome in map_guests(lambda g: g.execute('uptime').stdout, running):
        print(outcome.guest, outcome.result if outcome.ok else outcome.error)

Every error is a :class:`~negotiator_common.errors.NegotiatorError` (re-exported here):
:class:`GuestNotFound`, :class:`ChannelNotFound`, :class:`ChannelBusy`,
:class:`CallTimeout`, :class:`CommandNotAllowed`, ... The host daemon lives in
:mod:`negotiator_host.daemon` and its policy in :mod:`negotiator_host.policy`; they are not
imported here, and the names above are imported at their first use, so that ``import
negotiator_host`` stays quick.
"""

import sys
import types

from negotiator_common import __version__  # the one version of the three packages

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import List

    from negotiator_common.channels import GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNELS
    from negotiator_common.client import CommandDescription, ExecuteResult
    from negotiator_common.errors import (
        CallTimeout, ChannelBusy, ChannelNotFound, CommandFailed, CommandNotAllowed, CommandNotFound,
        CommandTimedOut, ConnectionClosed, GuestNotFound, NegotiatorError, UnsendableRequest,
    )
    from negotiator_host.channel import (
        DEFAULT_TIMEOUT, GuestChannel, GuestOutcome, connect_socket, daemon_guests, map_guests,
    )
    from negotiator_host.discovery import (
        Guest, LibvirtPaths, LibvirtUnavailable, default_uri, find_guest, list_guests,
    )

__all__ = (
    'GuestChannel', 'GuestOutcome', 'map_guests', 'daemon_guests', 'connect_socket', 'DEFAULT_TIMEOUT',
    'Guest', 'LibvirtPaths', 'LibvirtUnavailable', 'list_guests', 'find_guest', 'default_uri',
    'HOST_TO_GUEST_CHANNELS', 'GUEST_TO_HOST_CHANNEL', 'ExecuteResult', 'CommandDescription',
    'NegotiatorError', 'GuestNotFound', 'ChannelNotFound', 'ChannelBusy', 'CallTimeout', 'ConnectionClosed',
    'CommandNotAllowed', 'CommandNotFound', 'CommandFailed', 'CommandTimedOut', 'UnsendableRequest', '__version__',
)

_HOMES = dict(
    [(name, 'negotiator_common.channels') for name in ('HOST_TO_GUEST_CHANNELS', 'GUEST_TO_HOST_CHANNEL')]
    + [(name, 'negotiator_common.client') for name in ('ExecuteResult', 'CommandDescription')]
    + [(name, 'negotiator_common.errors') for name in (
        'NegotiatorError', 'GuestNotFound', 'ChannelNotFound', 'ChannelBusy', 'CallTimeout', 'ConnectionClosed',
        'CommandNotAllowed', 'CommandNotFound', 'CommandFailed', 'CommandTimedOut', 'UnsendableRequest')]
    + [(name, 'negotiator_host.channel') for name in (
        'GuestChannel', 'GuestOutcome', 'map_guests', 'daemon_guests', 'connect_socket', 'DEFAULT_TIMEOUT')]
    + [(name, 'negotiator_host.discovery') for name in (
        'Guest', 'LibvirtPaths', 'LibvirtUnavailable', 'list_guests', 'find_guest', 'default_uri')])
"""The module that defines each name of :data:`__all__` (but ``__version__``), imported at its first use."""


class _Package(types.ModuleType):
    """
    This package, whose public names are imported when first used: ``negotiator-host``'s console
    script imports :mod:`negotiator_host.cli` through this package, and a call through the host
    daemon needs neither the discovery nor the whole API (docs/benchmark.rst, "one CLI call
    through the daemon"). A class of its own rather than a module ``__getattr__`` (PEP 562), which
    Python 3.6 does not have.
    """

    def __getattr__(self, name: str) -> object:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError('module %r has no attribute %r' % (self.__name__, name))
        value = getattr(__import__(home, fromlist=[name]), name)
        setattr(self, name, value)
        return value

    def __dir__(self) -> 'List[str]':
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
