"""
The peak memory of a program that a test runs, without the test process's own, and the memory
figures of a running process (:func:`status_kib`).

Why: a child's ``ru_maxrss`` (``os.wait4``) counts the time between ``fork`` and ``exec``,
when the child still maps its parent's pages: a CLI forked from a pytest process of 245 MiB
"peaked" at 245 MiB whatever it did. So the program is started by a small launcher (a fresh
interpreter of about 10 MiB), which waits for it and writes its peak to a file.
"""

import os
import subprocess
import sys

__all__ = ('start_measured', 'peak_rss', 'status_kib')

_LAUNCHER = '''
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], 'w') as report:
    report.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(status if status >= 0 else 128 - status)
'''


def start_measured(argv, report, **popen_kwargs):
    """``subprocess.Popen(argv, **popen_kwargs)`` through the launcher; its peak goes to the file ``report``."""
    return subprocess.Popen([sys.executable, '-c', _LAUNCHER, str(report)] + list(argv), **popen_kwargs)


def peak_rss(report):
    """The peak resident memory, in bytes, of a program started by :func:`start_measured` that has ended."""
    if not os.path.exists(str(report)):
        raise AssertionError('the launcher wrote no report (did the program end?)')
    with open(str(report)) as handle:
        return int(handle.read())


def status_kib(pid, field):
    """A figure in KiB of the running process ``pid`` from /proc/PID/status: ``VmHWM`` (its peak), ``VmRSS``."""
    with open('/proc/%d/status' % pid) as handle:
        for line in handle:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise AssertionError('no %s in /proc/%d/status' % (field, pid))
