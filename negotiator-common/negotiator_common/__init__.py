"""
negotiator-common: what the host and guest sides of negotiator share.

- :mod:`~negotiator_common.protocol`: the wire protocol, with no I/O (line-delimited JSON-RPC 2.0).
- :mod:`~negotiator_common.errors`: the one exception tree, with stable wire codes.
- :mod:`~negotiator_common.deadline`: the one type that bounds every wait by a caller's timeout.
- :mod:`~negotiator_common.channels`: the channel names, and the libvirt XML that makes them.
- :mod:`~negotiator_common.transport`: bytes over one file descriptor (socket or port).
- :mod:`~negotiator_common.endpoint`: requests out and in over a transport, routed by id.
- :mod:`~negotiator_common.dispatcher`: the explicit registry of callable methods.
- :mod:`~negotiator_common.commands` and :mod:`~negotiator_common.runner`: which commands
  exist, and how one runs (argv list, no shell, bounded in time and output), started through
  :mod:`~negotiator_common.external`, the one module that knows executor's insides.
- :mod:`~negotiator_common.signals` and :mod:`~negotiator_common.stopping`: what both daemons
  share, their signal queue and the order in which they stop serving.
- :mod:`~negotiator_common.service` and :mod:`~negotiator_common.client`: the four standard
  methods, served and called.

The library never configures logging and never prints through logging's last resort: every
module takes its logger from :mod:`~negotiator_common.lazylog`, which installs a
:class:`logging.NullHandler` when logging is first used (and spares quick CLI calls the import);
the CLIs configure logging.
"""

__version__ = '0.1.0'
"""
The version of negotiator-common, negotiator-host and negotiator-guest, which are released
together: the build reads it here, the other two packages import it, and their pyproject.toml
pins this version of negotiator-common (``tests/test_packaging.py`` keeps them equal).
"""
