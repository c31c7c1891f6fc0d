"""
End to end, streams with credit (``docs/protocol.rst``, "Streams and flow control") on a real
libvirt/QEMU guest running ``negotiator-guest --daemon``.

Why: only a real virtio-serial port proves that streamed input of any size reaches a command
intact through the installed CLI in bounded memory, and that a command which reads its input
slowly (or a caller that reads its output slowly) stops its own stream only: pings on the same
channel keep being answered. The latency of those pings is measured and printed, not asserted.
One guest boots for the whole module.
"""

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vmfixtures import GUEST_PYTHON, vm_host  # noqa: E402,F401 (a fixture)
from e2e_support import HOST_CLI, remove_guests, start_agents  # noqa: E402
from measuring import peak_rss, start_measured  # noqa: E402
from pinging import Pinger  # noqa: E402
from support import StalledFile  # noqa: E402
from waiting import wait_until  # noqa: E402

from negotiator_host import GuestChannel  # noqa: E402

pytestmark = pytest.mark.vm

MIB = 1024 * 1024

COMMANDS = {
    'sha': '#!/bin/sh\nsha256sum | cut -d" " -f1\n',
    # Reads its input 64 KiB at a time, with a pause after each piece, and prints how much it read
    # (one process: the guest's one CPU stays for the agent, not for forks).
    'slow-reader': ('#!%s\nimport sys, time\ntotal = 0\n'
                    'for piece in iter(lambda: sys.stdin.buffer.read1(65536), b""):\n'
                    '    total += len(piece)\n    time.sleep(0.02)\n'
                    'print(total)\n' % GUEST_PYTHON),
    # Writes SIZE MiB of zeros to its standard output, as fast as it may.
    'zeros': '#!/bin/sh\nexec head -c "$(($1 * 1048576))" /dev/zero\n',
}


@pytest.fixture(scope='module')
def guest(vm_host):  # noqa: F811 (the fixture)
    started = time.monotonic()
    guests = start_agents(vm_host, [COMMANDS])
    print('the agent guest answered %.1f s after the start' % (time.monotonic() - started))
    yield guests[0]
    remove_guests(guests)


def test_256_mib_streamed_through_the_cli_arrive_intact_in_bounded_memory(guest, tmp_path):
    path = str(tmp_path / 'input.bin')
    expected = hashlib.sha256()
    with open(path, 'wb') as handle:
        for _ in range(256):
            chunk = os.urandom(MIB)
            expected.update(chunk)
            handle.write(chunk)
    report = tmp_path / 'peak'
    started = time.monotonic()
    with open(path, 'rb') as source:
        process = start_measured([HOST_CLI, '--timeout', '900', '--stdin', '--execute', 'sha', guest.name], report,
                                 stdin=source, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = process.communicate(timeout=960)
    seconds = time.monotonic() - started
    os.unlink(path)
    assert process.returncode == 0, err
    assert out.strip().decode() == expected.hexdigest()
    max_rss_mib = peak_rss(report) / MIB
    print('256 MiB of input in %.1f s (%.1f MiB/s), CLI peak RSS %.1f MiB' % (seconds, 256 / seconds, max_rss_mib))
    assert max_rss_mib < 64


def idle_pings(channel, count=100):
    """The latency of ``count`` pings on an idle channel, printed beside the figures under load."""
    pinger = Pinger(channel, timeout=10)
    for _ in range(count):
        pinger.times.append(channel.ping(timeout=10))
    pinger.report('idle channel')


def test_pings_are_answered_while_a_command_reads_its_input_slowly(guest):
    data = os.urandom(16 * MIB)
    with GuestChannel(guest.name, timeout=300) as channel:
        idle_pings(channel)
        with Pinger(channel, timeout=10) as pinger:
            result = channel.execute('slow-reader', input=iter([data[i:i + MIB] for i in range(0, len(data), MIB)]))
        assert pinger.error is None, pinger.error
        assert result.exit_status == 0 and result.stdout.strip() == str(len(data)).encode()
        assert len(pinger.times) > 10
        pinger.report('while a command read 16 MiB of input slowly')


def test_pings_are_answered_while_a_caller_reads_its_output_slowly(guest):
    with GuestChannel(guest.name, timeout=300) as channel:
        channel.ping()
        stalled = StalledFile()
        outcome = {}
        call = threading.Thread(target=lambda: outcome.update(result=channel.execute('zeros', '64', stdout=stalled)))
        call.start()
        with Pinger(channel, timeout=10) as pinger:
            # The output fills its window and the command blocks in its writes, while pings go on.
            assert wait_until(lambda: len(pinger.times) >= 100 or pinger.error, timeout=120)
            answered, taken = len(pinger.times), stalled.size
            stalled.go.set()
            call.join(300)
        assert pinger.error is None, pinger.error
        assert answered >= 100 and taken == 0
        assert outcome['result'].exit_status == 0 and stalled.size == 64 * MIB
        pinger.report('while a caller read 64 MiB of output slowly')
