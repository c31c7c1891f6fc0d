"""Discovery of guests and channel sockets, against a fake libvirt tree and a stand-in virsh."""

import os
import time

import pytest

from negotiator_common.channels import HOST_TO_GUEST_CHANNELS
from negotiator_common.errors import ChannelNotFound, GuestNotFound
from negotiator_host.discovery import (
    run_virsh, LibvirtPaths, LibvirtUnavailable, find_guest, list_guests, parse_domain_xml,
    parse_virsh_list,
)

from fake_libvirt import FakeLibvirt, status_xml

ODD_NAMES = ['web-1', 'db.prod.example', 'gäste-ß-ünïcode', 'a', 'x-y.z_w']


@pytest.fixture
def fake(monkeypatch):
    libvirt = FakeLibvirt().activate(monkeypatch)
    yield libvirt
    libvirt.cleanup()


def paths_of(fake):
    return LibvirtPaths(fake.status_dir, fake.channel_dir)


def test_parse_virsh_list_names_with_spaces_unicode_and_states():
    output = (" Id   Name                 State\n"
              "--------------------------------------\n"
              " 1    web-1                running\n"
              " 12   gäste-ß              paused\n"
              " 3    name with spaces     in shutdown\n"
              " 4    esc\\xc3\\xa9          running\n"
              " -    off                  shut off\n\n").encode('utf-8')
    guests = parse_virsh_list(output)
    assert [(g.id, g.name, g.state) for g in guests] == [
        (1, 'web-1', 'running'), (12, 'gäste-ß', 'paused'), (3, 'name with spaces', 'in shutdown'),
        (4, 'esc\u00e9', 'running'), (None, 'off', 'shut off')]


def test_parse_status_xml_reads_id_state_and_channels():
    text = status_xml('web-1', 7, {'negotiator-host-to-guest.0': '/s/a', 'org.qemu.guest_agent.0': '/s/b'}, 'paused')
    guest = parse_domain_xml(text.encode('utf-8'))
    assert (guest.name, guest.id, guest.state) == ('web-1', 7, 'paused')
    assert guest.channels == {'negotiator-host-to-guest.0': '/s/a', 'org.qemu.guest_agent.0': '/s/b'}


@pytest.mark.parametrize('name', ODD_NAMES)
@pytest.mark.parametrize('layout,status', [('directory', True), ('directory', False), ('flat', False)])
def test_find_guest_without_any_process(fake, name, layout, status):
    paths = fake.add_guest(name, 5, layout=layout, status=status)
    guest = find_guest(name, paths=paths_of(fake))
    assert guest.socket_for() == paths['negotiator-host-to-guest.0']
    # The files said everything: not one virsh process ran.
    assert fake.invocations() == []


def test_find_guest_prefers_new_channel_name_and_accepts_the_seeds(fake):
    fake.add_guest('seed', 2, channels=('negotiator-channel.0',))
    assert find_guest('seed', paths=paths_of(fake)).socket_for().endswith('/negotiator-channel.0')
    fake.add_guest('both', 3, channels=HOST_TO_GUEST_CHANNELS)
    assert find_guest('both', paths=paths_of(fake)).socket_for().endswith('/negotiator-host-to-guest.0')


def test_long_names_are_matched_by_id_not_by_their_cut_prefix(fake):
    # Two guests share their first 20 characters: libvirt's directories differ only by id.
    first = 'webserver-production-0001'
    second = 'webserver-production-0002'
    paths_1 = fake.add_guest(first, 11, status=False)
    paths_2 = fake.add_guest(second, 12, status=False)
    guests = {g.name: g for g in list_guests(paths=paths_of(fake))}
    assert guests[first].socket_for() == paths_1['negotiator-host-to-guest.0']
    assert guests[second].socket_for() == paths_2['negotiator-host-to-guest.0']
    # Without an id a cut name is ambiguous: find_guest asks virsh dumpxml (one process).
    assert find_guest(second, paths=paths_of(fake)).socket_for() == paths_2['negotiator-host-to-guest.0']
    assert len([i for i in fake.invocations() if 'dumpxml' in i]) == 1


def test_listing_100_guests_costs_one_process(fake):
    expected = {}
    for number in range(100):
        name = 'guest-%03d.ä-%d' % (number, number)
        layout = 'flat' if number % 3 == 0 else 'directory'
        paths = fake.add_guest(name, number + 1, layout=layout, status=number % 2 == 0)
        expected[name] = paths['negotiator-host-to-guest.0']
    fake.add_running('no-channel', 500)
    guests = list_guests(paths=paths_of(fake))
    assert len(guests) == 101
    assert {g.name: g.socket_for() for g in guests if g.socket_for()} == expected
    assert len(fake.invocations()) == 1


def test_unknown_guest_is_guest_not_found(fake):
    with pytest.raises(GuestNotFound) as info:
        find_guest('nosuch', paths=paths_of(fake))
    assert 'nosuch' in str(info.value)


def test_guest_without_channel_says_which_xml_to_add(fake):
    fake.add_guest('plain', 4, channels=('org.qemu.guest_agent.0',))
    guest = find_guest('plain', paths=paths_of(fake))
    with pytest.raises(ChannelNotFound) as info:
        guest.require_socket()
    message = str(info.value)
    assert "<target type='virtio' name='negotiator-host-to-guest.0'/>" in message
    assert 'shut the guest down and start it' in message


def test_libvirtd_down_is_a_clear_error(fake):
    fake.set_down()
    with pytest.raises(LibvirtUnavailable) as info:
        list_guests(paths=paths_of(fake))
    assert 'libvirtd' in str(info.value) and 'Failed to connect socket' in str(info.value)
    with pytest.raises(LibvirtUnavailable):
        find_guest('web-1', paths=paths_of(fake))


def test_paths_follow_the_uri_and_environment(monkeypatch):
    monkeypatch.delenv('NEGOTIATOR_LIBVIRT_STATUS_DIR', raising=False)
    monkeypatch.delenv('NEGOTIATOR_LIBVIRT_CHANNEL_DIR', raising=False)
    system = LibvirtPaths.for_uri('qemu:///system')
    assert system.channel_dir == '/var/lib/libvirt/qemu/channel/target'
    assert system.status_dir == '/var/run/libvirt/qemu'
    assert LibvirtPaths.for_uri('qemu+ssh://elsewhere/system').channel_dir is None
    monkeypatch.setenv('NEGOTIATOR_LIBVIRT_CHANNEL_DIR', '/x')
    assert LibvirtPaths.for_uri('qemu:///system').channel_dir == '/x'


def test_virsh_missing_is_a_clear_error(fake, monkeypatch):
    monkeypatch.setenv('PATH', fake.root)
    with pytest.raises(LibvirtUnavailable) as info:
        list_guests(paths=paths_of(fake))
    assert 'virsh is not installed' in str(info.value)


def test_xml_parser_ignores_names_and_channels_outside_the_domain_devices():
    text = ("<domstatus state='running'><domain type='kvm' id='3'><name>real</name>"
            "<metadata><x:name xmlns:x='urn:x'>decoy</x:name><name>decoy</name></metadata>"
            "<devices><channel type='pty'><target type='virtio' name='no-path.0'/></channel>"
            "<channel type='unix'><source mode='bind' path='/s/ok'/><target type='virtio' name='ok.0'/></channel>"
            "</devices></domain></domstatus>")
    guest = parse_domain_xml(text.encode())
    assert (guest.name, guest.id, guest.channels) == ('real', 3, {'ok.0': '/s/ok'})
    with pytest.raises(ValueError):
        parse_domain_xml(b'<domain><unclosed></domain>')


def test_a_hung_virsh_is_killed_at_the_timeout(fake):
    open(os.path.join(fake.root, 'hang'), 'w').close()
    started = time.monotonic()
    with pytest.raises(LibvirtUnavailable) as info:
        run_virsh('qemu:///system', 'list', timeout=0.5)
    # Killed at its 0.5 s timeout: not at the default 15 s one, nor after the fake virsh's 60 s sleep.
    assert time.monotonic() - started < 8
    assert 'did not finish within 0.5 seconds' in str(info.value)


def test_long_non_ascii_name_as_libvirt_9_cuts_it(fake):
    # Seen on libvirt 9.0: 'nh-probe.gäste-very-long-name-1' got 'domain-1-nh-probe.gäste-very-'.
    name = 'nh-probe.gäste-very-long-name-1'
    paths = fake.add_guest(name, 1, status=False)
    assert '/domain-1-nh-probe.gäste-very-/' in paths['negotiator-host-to-guest.0']
    guests = list_guests(paths=paths_of(fake))
    assert guests[0].socket_for() == paths['negotiator-host-to-guest.0']
    assert len(fake.invocations()) == 1
