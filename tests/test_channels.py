"""
The channel names and their libvirt XML (``negotiator_common.channels``): written in one place,
read back by the host's discovery, shown by both sides when a channel is missing, and used by
the scripts that create test guests.
"""

import os
import subprocess
import sys

import pytest

from negotiator_common.channels import (
    GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNEL, HOST_TO_GUEST_CHANNELS, SEED_CHANNEL, channel_xml,
)
from negotiator_common.errors import ChannelNotFound
from negotiator_guest.port import find_port
from negotiator_host.discovery import missing_channel_message, parse_domain_xml

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')


def test_the_names_are_those_of_the_docs():
    assert HOST_TO_GUEST_CHANNELS == ('negotiator-host-to-guest.0', 'negotiator-channel.0')
    assert (HOST_TO_GUEST_CHANNEL, SEED_CHANNEL) == HOST_TO_GUEST_CHANNELS
    assert GUEST_TO_HOST_CHANNEL == 'negotiator-guest-to-host.0'


def test_the_xml_to_add_leaves_the_path_to_libvirt():
    assert channel_xml(HOST_TO_GUEST_CHANNEL) == (
        "<channel type='unix'><source mode='bind'/><target type='virtio' name='negotiator-host-to-guest.0'/>"
        "</channel>")


@pytest.mark.parametrize('name, path', [
    ('negotiator-host-to-guest.0', '/run/libvirt/qemu/channel/1-web/negotiator-host-to-guest.0'),
    ("it's <odd> & \"quoted\"", "/tmp/a path/with 'quotes' & <brackets>"),
])
def test_discovery_reads_back_what_channel_xml_writes(name, path):
    domain = "<domain type='kvm' id='3'><name>web</name><devices>%s</devices></domain>" % channel_xml(name, path)
    assert parse_domain_xml(domain.encode('utf-8')).channels == {name: path}


def test_both_sides_show_the_same_xml_for_a_missing_channel(tmp_path):
    with pytest.raises(ChannelNotFound) as guest_side:
        find_port((GUEST_TO_HOST_CHANNEL,), str(tmp_path))
    host_side = missing_channel_message('web', GUEST_TO_HOST_CHANNEL)
    assert channel_xml(GUEST_TO_HOST_CHANNEL) in str(guest_side.value)
    assert channel_xml(GUEST_TO_HOST_CHANNEL) in host_side


def test_the_test_guests_get_their_channels_from_common_even_when_it_is_not_installed():
    # The demo imports negotiator_vm with Debian's python3 before any virtual environment
    # exists; -S leaves out site-packages, so negotiator-common is not installed there either.
    program = ('import negotiator_vm, negotiator_common.channels as c; '
               'print(negotiator_vm.DEFAULT_CHANNELS == (c.HOST_TO_GUEST_CHANNEL, c.GUEST_TO_HOST_CHANNEL)); '
               'print(negotiator_vm._domain_xml("g", negotiator_vm.GuestImage("k", "i"), "", ("x.0",), 64, "/l"))')
    output = subprocess.run([sys.executable, '-S', '-c', program], cwd=SCRIPTS, stdout=subprocess.PIPE,
                            check=True, universal_newlines=True).stdout
    assert output.startswith('True\n')
    assert '    %s\n' % channel_xml('x.0') in output
