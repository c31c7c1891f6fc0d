"""
Port discovery and opening (negotiator_guest.port), on a fake /dev and /sys tree.

The fake tree stands in for a guest's; the device files in it are plain files, which is
enough for discovery (it only checks that paths exist). Opening and connection state are
tested on a real pseudo-terminal, whose master reports POLLHUP while no process has the slave
open: the same signal a virtio-serial port gives while no host is connected.
"""

import errno
import os
import stat

import pytest

from negotiator_common.channels import GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNELS
from negotiator_common.errors import ChannelBusy, ChannelNotFound
from negotiator_guest import port
from negotiator_guest.port import FALLBACK_DEVICE, candidate_paths, find_port, host_connected, open_port


def make_tree(root, udev=(), sysfs=(), devices=()):
    """udev: channel names with /dev/virtio-ports links; sysfs: (vportNpM, name) pairs; devices: extra /dev files."""
    dev = root / 'dev'
    (dev / 'virtio-ports').mkdir(parents=True, exist_ok=True)
    (root / 'sys' / 'class' / 'virtio-ports').mkdir(parents=True, exist_ok=True)
    for vport, name in sysfs:
        (dev / vport).write_bytes(b'')
        entry = root / 'sys' / 'class' / 'virtio-ports' / vport
        entry.mkdir()
        (entry / 'name').write_text(name + '\n')
    for name in udev:
        target = dev / ('vport9p%d' % (len(os.listdir(str(dev))) + 1))
        target.write_bytes(b'')
        os.symlink(str(target), str(dev / 'virtio-ports' / name))
    for device in devices:
        (root / device.lstrip('/')).write_bytes(b'')
    return str(root)


def test_udev_link_is_preferred(tmp_path):
    root = make_tree(tmp_path, udev=['negotiator-host-to-guest.0'], sysfs=[('vport1p1', 'negotiator-host-to-guest.0')])
    assert find_port(HOST_TO_GUEST_CHANNELS, root) == os.path.join(root, 'dev/virtio-ports/negotiator-host-to-guest.0')


def test_sysfs_name_without_udev(tmp_path):
    # As measured on the test guest: the port was vport1p1, not vport0p1, and no udev links.
    root = make_tree(tmp_path, devices=['/dev/vport0p1'],
                     sysfs=[('vport1p1', 'negotiator-host-to-guest.0'), ('vport1p2', 'org.qemu.guest_agent.0')])
    assert find_port(HOST_TO_GUEST_CHANNELS, root, fallback=FALLBACK_DEVICE) == os.path.join(root, 'dev/vport1p1')


def test_our_channel_name_wins_over_the_seeds(tmp_path):
    root = make_tree(tmp_path, sysfs=[('vport1p1', 'negotiator-channel.0'), ('vport1p2', 'negotiator-host-to-guest.0')])
    assert find_port(HOST_TO_GUEST_CHANNELS, root) == os.path.join(root, 'dev/vport1p2')


def test_the_seeds_channel_name_is_accepted(tmp_path):
    root = make_tree(tmp_path, sysfs=[('vport2p1', 'negotiator-channel.0')])
    assert find_port(HOST_TO_GUEST_CHANNELS, root) == os.path.join(root, 'dev/vport2p1')


def test_fallback_device_comes_last(tmp_path):
    root = make_tree(tmp_path, sysfs=[('vport1p2', 'something.else')], devices=['/dev/vport0p1'])
    found = candidate_paths(HOST_TO_GUEST_CHANNELS, root, fallback=FALLBACK_DEVICE)
    assert found == [os.path.join(root, 'dev/vport0p1')]
    # The client never falls back: vport0p1 would be somebody else's port.
    with pytest.raises(ChannelNotFound):
        find_port((GUEST_TO_HOST_CHANNEL,), root)


def test_sysfs_entry_without_device_node_is_skipped(tmp_path):
    root = make_tree(tmp_path, sysfs=[('vport1p1', 'negotiator-host-to-guest.0')])
    os.unlink(os.path.join(root, 'dev/vport1p1'))
    assert candidate_paths(HOST_TO_GUEST_CHANNELS, root) == []


def test_missing_port_names_the_libvirt_xml(tmp_path):
    root = make_tree(tmp_path)
    with pytest.raises(ChannelNotFound) as info:
        find_port(HOST_TO_GUEST_CHANNELS, root, fallback=FALLBACK_DEVICE)
    message = str(info.value)
    assert "<target type='virtio' name='negotiator-host-to-guest.0'/>" in message
    assert "<source mode='bind'/>" in message
    assert 'shut' in message and 'reboot' in message


def test_empty_root_without_sys_or_dev(tmp_path):
    with pytest.raises(ChannelNotFound):
        find_port((GUEST_TO_HOST_CHANNEL,), str(tmp_path))


def test_open_port_flags_on_a_pty():
    master, slave = os.openpty()
    try:
        fd = open_port(os.ttyname(slave))
        try:
            flags = os.get_blocking(fd), os.get_inheritable(fd)
            assert flags == (False, False)  # non-blocking, close-on-exec
        finally:
            os.close(fd)
    finally:
        os.close(master)
        os.close(slave)


def test_open_port_missing_device(tmp_path):
    with pytest.raises(ChannelNotFound):
        open_port(str(tmp_path / 'vport7p7'))


def test_open_port_busy_is_channel_busy(monkeypatch):
    # Simulated: as root, nothing on this machine refuses a second open() with EBUSY the way
    # a virtio-serial port does, so os.open is replaced for this path.
    def fake_open(path, flags, mode=0o777):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
    monkeypatch.setattr(port.os, 'open', fake_open)
    with pytest.raises(ChannelBusy) as info:
        open_port('/dev/vport1p1')
    assert info.value.code == -32053 and '/dev/vport1p1' in str(info.value)


def test_host_connected_follows_the_other_end():
    master, slave = os.openpty()
    name = os.ttyname(slave)
    try:
        assert host_connected(master)
        os.close(slave)
        assert not host_connected(master)  # POLLHUP: nobody on the other end
        slave = os.open(name, os.O_RDWR | os.O_NOCTTY)
        assert host_connected(master)
    finally:
        os.close(master)
        os.close(slave)


def test_contrib_files_are_shipped():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unit = os.path.join(here, 'negotiator-guest', 'contrib', 'negotiator-guest.service')
    supervisor = os.path.join(here, 'negotiator-guest', 'contrib', 'supervisord.conf')
    with open(unit) as handle:
        text = handle.read()
    assert 'ExecStart=/usr/local/bin/negotiator-guest --daemon' in text and 'KillSignal=SIGTERM' in text
    with open(supervisor) as handle:
        text = handle.read()
    assert '[program:negotiator-guest]' in text and 'negotiator-guest --daemon' in text
    assert stat.S_ISREG(os.stat(unit).st_mode)
