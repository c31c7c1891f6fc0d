#!/usr/bin/env python3
"""
Usage: scripts/bench_zipapp.py [--venv PATH] [--seconds N] [--pings N] [--json-out FILE]

The guest daemon at rest and its ping, run as the single file (scripts/build-guest-agent) on
Python 3.6 and 3.13, beside the installed package: the figures of scripts/benchmark's "daemon at
rest" and "ping" for each way of running the agent (docs/benchmark.rst says what they mean).

It runs from the benchmark's virtual environment (--venv, default
/var/lib/negotiator-bench/venv, made or refreshed by scripts/negotiator_venv.py, then the script
runs again with its Python): its negotiator-guest is the installed variant, on that Python, and
its negotiator_host the API that measures. The archive is also measured on that Python, to tell
what the archive costs from what the older Python costs.

One TCG guest (scripts/negotiator_vm.py) runs the agent under supervisord, restarted as each
variant in turn (scripts/switch_agent.py). For each: the time from the restart call to the new
agent's first answer (its stop, supervisord's start, Python's start over 9p, the archive's
compiling); the ping round trip on one open connection (median and least, after a warm-up); a
few calls of a one-line command (so that the daemon has imported what serving needs, as before
the benchmark's rest window); then the daemon with no host connected for --seconds of guest
time: its CPU share and resident memory (VmRSS), sampled from /proc in the guest once a second
onto the console (scripts/bench_guest.py's ``sample``), which costs the daemon nothing.

Prints a table and writes JSON (default /var/tmp/negotiator-bench-zipapp.json). Exit status 0,
or 1 with a message when the run failed.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

import negotiator_venv  # noqa: E402
import negotiator_vm  # noqa: E402 (it puts negotiator_common on the path when it is not installed)
import switch_agent  # noqa: E402
from negotiator_common.channels import HOST_TO_GUEST_CHANNEL  # noqa: E402
from negotiator_common.errors import NegotiatorError  # noqa: E402

DEFAULT_VENV = '/var/lib/negotiator-bench/venv'
STAT_PREFIX = 'negotiator-zipapp-stat'
DEFAULT_JSON = '/var/tmp/negotiator-bench-zipapp.json'
OTHER_PYTHONS = ('3.6', '3.13')

#: Runs in the guest (any Python 3): the agent's /proc figures once a second, on the console.
SAMPLER = r'''
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_guest import find_pid, sample
pid = None
while True:
    try:
        pid = pid or find_pid(b' --daemon')
        ticks, rss, hwm = sample(pid)
        with open('/proc/uptime') as handle:
            uptime = handle.read().split()[0]
        sys.stdout.write('%s %s %d %d %d %d\n' % (sys.argv[1], uptime, pid, ticks, rss, hwm))
        sys.stdout.flush()
    except (OSError, TypeError, ValueError, IndexError):
        pid = None  # not started yet, or restarted
    time.sleep(1.0)
'''


def log(message, *args):
    sys.stderr.write('bench_zipapp: ' + (message % args if args else message) + '\n')
    sys.stderr.flush()


def real_interpreter(version):
    """The real path of ``pythonVERSION`` on PATH (the guest runs it from the shared root, where no shim works)."""
    found = shutil.which('python' + version)
    if found:
        result = subprocess.run([found, '-c', 'import os, sys; print(os.path.realpath(sys.executable))'],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        if result.returncode == 0:
            return result.stdout.strip()
    raise RuntimeError('no working python%s on PATH (put pyenv\'s versions/%s.*/bin there)' % (version, version))


def build_archive(directory):
    """Build the archive into ``directory`` (scripts/build-guest-agent) and return its path."""
    archive = os.path.join(directory, 'negotiator-guest.pyz')
    subprocess.run([sys.executable, os.path.join(SCRIPTS, 'build-guest-agent'), '--output', archive],
                   check=True, stdout=subprocess.PIPE)
    return archive


def variants(archive):
    """(label, argv prefix) of each way to run the agent, the installed package first."""
    this = '%d.%d' % sys.version_info[:2]
    installed = os.path.join(os.path.dirname(sys.executable), 'negotiator-guest')
    return ([('installed package, Python %s' % this, [installed]),
             ('single file, Python %s' % this, [os.path.realpath(sys.executable), archive])]
            + [('single file, Python %s' % version, [real_interpreter(version), archive]) for version in OTHER_PYTHONS])


def start_bench_guest(bindir, sampler_python):
    commands = dict(switch_agent.COMMANDS, hello='#!/bin/sh\necho hello from the guest\n')
    init_script, files = negotiator_vm.agent_guest_files(bindir, commands=commands)
    with open(os.path.join(SCRIPTS, 'bench_guest.py')) as handle:
        files['bench_guest.py'] = handle.read()
    files['zipapp_sampler.py'] = SAMPLER
    prelude = '%s "$NEGOTIATOR_VM_WORKDIR/zipapp_sampler.py" %s &\n' % (sampler_python, STAT_PREFIX)
    guest = negotiator_vm.start_guest(prelude + init_script, name_prefix='negotiator-bench-', files=files)
    guest.wait_for_console(negotiator_vm.AGENT_READY, timeout=120)
    return guest


def ping_figures(guest, pings):
    """
    Median and least ping round trip (seconds) on one open connection, then five runs of a
    one-line command. The least says what the median hides on a busy host (other guests, other
    work): what a ping costs when nothing else runs.
    """
    from negotiator_host import GuestChannel
    with GuestChannel(socket_path=guest.channel_path(HOST_TO_GUEST_CHANNEL), timeout=30) as channel:
        channel.connect()
        for _ in range(20):
            channel.ping()
        times = [channel.ping() for _ in range(pings)]
        for _ in range(5):
            channel.execute('hello', check=True)
    return statistics.median(times), min(times)


def rest_figures(guest, seconds):
    """CPU share (of one core) and VmRSS (KiB) of the agent over ``seconds`` of guest time, no host connected."""
    start = os.path.getsize(guest.console_log)
    time.sleep(seconds + 2.5)
    with open(guest.console_log, 'rb') as handle:
        handle.seek(start)
        text = handle.read().decode('utf-8', 'replace')
    rows = [(float(uptime), int(pid), int(ticks), int(rss))
            for uptime, pid, ticks, rss in re.findall(r'%s (\S+) (\d+) (\d+) (\d+) \d+' % STAT_PREFIX, text)]
    rows = [row for row in rows if rows and row[1] == rows[-1][1]]  # one process
    if len(rows) < 2:
        raise RuntimeError('too few samples of the agent on the console of %s' % guest.name)
    (first_uptime, _, first_ticks, _), (last_uptime, pid, last_ticks, rss) = rows[0], rows[-1]
    span = last_uptime - first_uptime
    return {'cpu_share': (last_ticks - first_ticks) / os.sysconf('SC_CLK_TCK') / span, 'rss_kib': rss,
            'guest_seconds': span, 'pid': pid}


def measure(guest, label, argv, pings, seconds):
    """The figures of one variant: the agent restarted as ``argv``, then pinged, then left at rest."""
    log('%s: %s', label, ' '.join(argv))
    started = time.monotonic()
    switch_agent.restart_agent(guest, argv)
    answered = time.monotonic() - started
    pid, running = switch_agent.agent_process(guest)
    if argv not in (running[:len(argv)], running[1:1 + len(argv)]):  # a script runs as [python, script, ...]
        raise RuntimeError('the agent runs %r, not %r' % (running, argv))
    ping, least = ping_figures(guest, pings)
    rest = rest_figures(guest, seconds)
    return {'variant': label, 'argv': argv, 'answered_after_s': answered, 'ping_ms': ping * 1000,
            'ping_least_ms': least * 1000,
            'rest_cpu_percent': rest['cpu_share'] * 100, 'rest_rss_mib': rest['rss_kib'] / 1024.0,
            'rest_guest_seconds': rest['guest_seconds'], 'pid': pid}


def print_table(rows):
    from humanfriendly.tables import format_pretty_table
    header = ['variant', 'answered after restart (s)', 'ping: median (ms)', 'ping: least (ms)',
              'at rest: CPU (% of a core)', 'at rest: RSS (MiB)']
    print(format_pretty_table([[row['variant'], '%.1f' % row['answered_after_s'], '%.2f' % row['ping_ms'],
                                '%.2f' % row['ping_least_ms'],
                                '%.3f' % row['rest_cpu_percent'], '%.1f' % row['rest_rss_mib']] for row in rows],
                              header))


def run(args):
    """Build, boot one guest, measure every variant, remove the guest; return the rows."""
    negotiator_vm.ensure_host()
    directory = tempfile.mkdtemp(prefix='negotiator-bench-zipapp-', dir='/var/tmp')
    os.chmod(directory, 0o755)
    try:
        archive = build_archive(directory)
        log('archive: %d bytes', os.path.getsize(archive))
        bindir = os.path.join(directory, 'bin')
        os.mkdir(bindir, 0o755)
        ways = variants(archive)
        switch_agent.write_wrapper(bindir, ways[0][1])
        with start_bench_guest(bindir, os.path.realpath(sys.executable)) as guest:
            guest.wait_for_agent(os.path.dirname(sys.executable), timeout=180)
            # Every variant comes by a restart, the first too: their start-up times compare.
            return [measure(guest, label, argv, args.pings, args.seconds) for label, argv in ways]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(prog='bench_zipapp.py', description=__doc__.split('\n\n')[1])
    parser.add_argument('--venv', metavar='PATH', default=DEFAULT_VENV,
                        help='the virtual environment to run negotiator from, not under /tmp (default %(default)s)')
    parser.add_argument('--seconds', type=int, default=30, help='seconds of guest time at rest (default 30)')
    parser.add_argument('--pings', type=int, default=200, help='pings for the median (default 200)')
    parser.add_argument('--json-out', default=DEFAULT_JSON, help='where to write the JSON (default %(default)s)')
    args = parser.parse_args()
    venv = os.path.abspath(args.venv)
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        try:
            python = os.path.join(negotiator_venv.ensure_venv(venv, sys.executable, say=log), 'python')
        except (negotiator_venv.VenvError, OSError) as err:
            log('failed: %s', err)
            return 1
        os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])
    try:
        rows = run(args)
    except (RuntimeError, OSError, subprocess.CalledProcessError, negotiator_vm.VMError, NegotiatorError) as err:
        log('failed: %s', err)
        return 1
    print_table(rows)
    with open(args.json_out, 'w') as handle:
        json.dump({'rows': rows, 'when': time.strftime('%Y-%m-%d %H:%M:%S %z'), 'cores': os.cpu_count()},
                  handle, indent=2, sort_keys=True)
        handle.write('\n')
    log('wrote %s', args.json_out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
