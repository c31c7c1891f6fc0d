"""
The virtio-serial channels of negotiator: their names, and the libvirt XML that makes them.

Why one module: the host finds a guest's sockets by these names, the guest finds its ports by
them, the test guests and the benchmark are created with them, and both sides tell a user who
lacks a channel which XML to add. Written once here, they cannot drift apart
(``docs/protocol.rst`` has the table of who serves which channel).
"""

from typing import Optional

__all__ = ('HOST_TO_GUEST_CHANNEL', 'SEED_CHANNEL', 'HOST_TO_GUEST_CHANNELS', 'GUEST_TO_HOST_CHANNEL',
           'channel_xml')

HOST_TO_GUEST_CHANNEL = 'negotiator-host-to-guest.0'
"""The host's requests to the guest: ``negotiator-guest --daemon`` serves it, the host CLI and API call."""

SEED_CHANNEL = 'negotiator-channel.0'
"""The single channel of the original negotiator, still served for guests set up that way."""

HOST_TO_GUEST_CHANNELS = (HOST_TO_GUEST_CHANNEL, SEED_CHANNEL)
"""The channels that carry the host's requests, in order of preference."""

GUEST_TO_HOST_CHANNEL = 'negotiator-guest-to-host.0'
"""The guest's requests to the host: ``negotiator-host --daemon`` serves it, the guest CLI and API call."""


def channel_xml(name: str, path: Optional[str] = None) -> str:
    """
    The ``<channel>`` element of a libvirt domain that creates the virtio-serial port ``name``.

    Without ``path`` it is what a user adds to a guest's XML: libvirt then chooses the host
    socket's path itself (and writes it into the running guest's XML). With ``path``, the
    socket is named, as in the XML of a running guest.
    """
    source = "<source mode='bind'/>" if path is None else "<source mode='bind' path=%s/>" % _attribute(path)
    return "<channel type='unix'>%s<target type='virtio' name=%s/></channel>" % (source, _attribute(name))


def _attribute(value: str) -> str:
    """``value`` as an XML attribute value in single quotes."""
    escaped = value.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').replace("'", '&apos;')
    return "'%s'" % escaped
