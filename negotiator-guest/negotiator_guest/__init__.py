"""
negotiator-guest: the guest half of negotiator, a generic KVM/QEMU guest agent.

- :mod:`~negotiator_guest.port`: find and open the virtio-serial ports by channel name.
- :mod:`~negotiator_guest.daemon`: serve the host's requests, one host session after another.
- :mod:`~negotiator_guest.client`: :class:`HostClient`, the Python API for asking the host.
- :mod:`~negotiator_guest.cli`: the ``negotiator-guest`` command.

Importing this package is cheap: it imports neither :mod:`logging` nor the modules above (a
quick CLI call pays for what it uses). The library never configures logging (the CLI does), and
its loggers (:func:`negotiator_common.lazylog.get_logger`) never print through logging's last
resort.
"""

__version__ = '0.1.0'

__all__ = ('HostClient', '__version__')


def __getattr__(name: str) -> object:
    # PEP 562 (Python 3.7+): HostClient is imported on first use, so `import negotiator_guest`
    # stays fast for the CLI. Python 3.6 users import it from negotiator_guest.client.
    if name == 'HostClient':
        from negotiator_guest.client import HostClient
        return HostClient
    raise AttributeError('module %r has no attribute %r' % (__name__, name))
