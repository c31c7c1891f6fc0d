"""
The guest half of ``scripts/benchmark`` (standard library only; runs inside the test guest).

Two jobs, started by the guest's init script before the agent:

- **Sampler** (a thread): once a second it prints one console line
  ``negotiator-bench-stat UPTIME NAME PID CPU_TICKS VMRSS_KB VMHWM_KB`` for the negotiator guest
  daemon (``negotiator-guest --daemon``, or the single file: ``negotiator-guest.pyz --daemon``)
  and for qemu-ga, read from ``/proc`` inside the guest. The host reads the console log
  and takes differences over a window, so measuring the daemon at rest costs the daemon nothing
  (no host connection, no command run).
- **Raw channel** (the main thread): a minimal loop on the port of the channel named in
  ``argv[1]``, the reference that negotiator is measured against. Lines from the host:
  ``sync ...`` and ``echo ...`` are written back as they are; ``dd N`` runs
  ``dd if=/dev/zero bs=1M count=N`` with its standard output on the port (guest-to-host
  throughput; the host reads N MiB) and then writes ``dd-done``; ``sink N`` writes ``sink-ready``,
  then runs ``dd of=/dev/null bs=1M count=N iflag=fullblock`` with its standard input on the port
  (host-to-guest throughput; the host writes N MiB once it reads ``sink-ready``) and then writes
  ``sink-done``; ``quit`` releases the port.
"""

import os
import re
import subprocess
import sys
import threading
import time

STAT_PREFIX = 'negotiator-bench-stat'

#: What each sampled program's command line contains (its NUL bytes read as spaces).
NEEDLES = {'negotiator': re.compile(br'negotiator-guest(\.pyz)? --daemon'), 'qemu-ga': re.compile(br'qemu-ga')}


def find_pid(needle, exclude=b'supervisord'):
    """The pid of a process whose command line matches ``needle`` (a compiled pattern), or None."""
    me = os.getpid()
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open('/proc/%s/cmdline' % name, 'rb') as handle:
                cmdline = handle.read().replace(b'\0', b' ')
        except OSError:
            continue
        if needle.search(cmdline) and exclude not in cmdline and b'bench_guest' not in cmdline:
            return int(name)
    return None


def sample(pid):
    with open('/proc/%d/stat' % pid, 'rb') as handle:
        fields = handle.read().rsplit(b')', 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    memory = {}
    with open('/proc/%d/status' % pid, 'rb') as handle:
        for line in handle:
            key, _, value = line.partition(b':')
            if key in (b'VmRSS', b'VmHWM'):
                memory[key] = int(value.split()[0])
    return ticks, memory.get(b'VmRSS', 0), memory.get(b'VmHWM', 0)


def sampler():
    pids = {name: None for name in NEEDLES}
    while True:
        with open('/proc/uptime') as handle:
            uptime = handle.read().split()[0]
        lines = []
        for name, pid in sorted(pids.items()):
            try:
                if pid is None:
                    raise OSError
                ticks, rss, hwm = sample(pid)
            except (OSError, ValueError, IndexError):
                pids[name] = find_pid(NEEDLES[name])
                continue
            lines.append('%s %s %s %d %d %d %d\n' % (STAT_PREFIX, uptime, name, pid, ticks, rss, hwm))
        if lines:
            sys.stdout.write(''.join(lines))
            sys.stdout.flush()
        time.sleep(1.0)


def find_port(channel):
    root = '/sys/class/virtio-ports'
    for entry in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, entry, 'name')) as handle:
                if handle.read().strip() == channel:
                    return '/dev/' + entry
        except OSError:
            continue
    raise SystemExit('bench_guest: no port named %s' % channel)


def raw_channel(channel):
    fd = os.open(find_port(channel), os.O_RDWR)
    buffer = b''
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                time.sleep(0.05)  # no host connected yet: a port reads 0 bytes at once
                continue
            buffer += data
            while b'\n' in buffer:
                line, buffer = buffer.split(b'\n', 1)
                if line.startswith(b'dd '):
                    count = int(line.split()[1])
                    subprocess.call(['dd', 'if=/dev/zero', 'bs=1M', 'count=%d' % count],
                                    stdout=fd, stderr=subprocess.DEVNULL)
                    os.write(fd, b'dd-done\n')
                elif line.startswith(b'sink '):
                    count = int(line.split()[1])
                    os.write(fd, b'sink-ready\n')
                    subprocess.call(['dd', 'of=/dev/null', 'bs=1M', 'count=%d' % count, 'iflag=fullblock'],
                                    stdin=fd, stderr=subprocess.DEVNULL)
                    os.write(fd, b'sink-done\n')
                elif line == b'quit':
                    return
                else:
                    os.write(fd, line + b'\n')
    finally:
        os.close(fd)


def main():
    thread = threading.Thread(target=sampler)
    thread.daemon = True
    thread.start()
    raw_channel(sys.argv[1])
    sys.stdout.write('bench_guest: raw channel released\n')
    sys.stdout.flush()
    thread.join()


if __name__ == '__main__':
    main()
