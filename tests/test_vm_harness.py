"""
The VM harness itself (scripts/negotiator_vm.py, tests/vmfixtures.py) on one real guest.

Why: every end-to-end test relies on this harness; when it breaks, this test says so first and
plainly. One guest boots (about 5 s under TCG), lists its virtio ports, runs the host's Python from
the shared root filesystem, and echoes a line sent by the host over the channel's UNIX socket.
It fails, never skips, when the guest cannot start.
"""

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import GUEST_PYTHON, python_guest_script, start_vm, vm_host  # noqa: E402,F401

CHANNEL = 'negotiator-host-to-guest.0'

# Runs in the guest: find the port by its name (no udev there), echo lines until "quit".
ECHO_PROGRAM = r'''
import glob, os, sys, time
channel = sys.argv[1]
device = None
for name_file in sorted(glob.glob('/sys/class/virtio-ports/*/name')):
    with open(name_file) as handle:
        if handle.read().strip() == channel:
            device = '/dev/' + os.path.basename(os.path.dirname(name_file))
print('echo: port %s is %s' % (channel, device), flush=True)
fd = os.open(device, os.O_RDWR)
print('echo: ready', flush=True)
buffered = b''
while True:
    data = os.read(fd, 4096)
    if not data:
        # No host connected: read() returns b'' at once, so wait a little instead of spinning.
        time.sleep(0.02)
        continue
    buffered += data
    while b'\n' in buffered:
        line, buffered = buffered.split(b'\n', 1)
        if line == b'quit':
            print('echo: quit', flush=True)
            sys.exit(0)
        view = memoryview(line + b'\n')
        while view:
            view = view[os.write(fd, view):]
'''

INIT_SCRIPT = r'''
for f in /sys/class/virtio-ports/*/name; do echo "port: $f $(cat "$f")"; done
for d in /dev/vport*; do echo "device: $d"; done
echo "python: $({python} -c 'print(6 * 7)')"
''' + python_guest_script('echo.py', CHANNEL)


@pytest.mark.vm
def test_echo_round_trip_over_a_real_channel(start_vm):  # noqa: F811 (the fixture)
    started = time.monotonic()
    guest = start_vm(INIT_SCRIPT.replace('{python}', GUEST_PYTHON), files={'echo.py': ECHO_PROGRAM},
                     channels=(CHANNEL, 'negotiator-guest-to-host.0'))
    guest.wait_for_console('negotiator-init: running', timeout=90)
    init_seconds = time.monotonic() - started
    console = guest.wait_for_console('echo: ready', timeout=60)
    ready_seconds = time.monotonic() - started

    assert 'port: /sys/class/virtio-ports/' in console
    assert ' %s\n' % CHANNEL in console.replace('\r', '')
    assert 'negotiator-guest-to-host.0' in console
    assert 'device: /dev/vport' in console
    assert 'python: 42' in console

    path = guest.channel_path(CHANNEL)
    assert os.path.exists(path)
    with guest.connect(CHANNEL, timeout=10) as sock:
        sock.settimeout(20)
        t0 = time.monotonic()
        sock.sendall(b'hello from the host\n')
        received = b''
        while not received.endswith(b'\n'):
            chunk = sock.recv(4096)
            assert chunk, 'the channel closed before the echo arrived'
            received += chunk
        round_trip = time.monotonic() - t0
        assert received == b'hello from the host\n'
        sock.sendall(b'quit\n')
        guest.wait_for_console('echo: quit', timeout=20)
    guest.wait_for_console('negotiator-init: powering off', timeout=20)
    print('guest boot: %.1f s to /init running the script, %.1f s to the echo loop ready; '
          'first echo round trip %.1f ms' % (init_seconds, ready_seconds, round_trip * 1000))
