"""
Helpers of the tests of the single-file guest agent (``scripts/build-guest-agent``).

Why: the archive must run on the oldest and the newest Python that negotiator supports, so the
tests run other interpreters than their own (found on PATH as ``python3.6`` and ``python3.13``:
``scripts/test`` and tox put every pyenv interpreter there). A missing one fails the test, it is
never skipped. The same helpers serve the unit tests and the real-guest tests (whose guests
run these interpreters from the host's root, shared read-only).
"""

import os
import shutil
import subprocess
import sys

import pytest

__all__ = ('BUILD_SCRIPT', 'GUEST_PYTHONS', 'ROOT', 'build_zipapp', 'interpreter', 'write_command')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = os.path.join(ROOT, 'scripts', 'build-guest-agent')

#: The oldest Python that negotiator supports (RHEL 8's) and the newest: the archive must run on both.
GUEST_PYTHONS = ('3.6', '3.13')


def build_zipapp(output, source_root=ROOT):
    """Run ``scripts/build-guest-agent --output OUTPUT`` (of ``source_root``) and return its line about the archive."""
    result = subprocess.run([sys.executable, os.path.join(source_root, 'scripts', 'build-guest-agent'),
                             '--output', str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=600)
    if result.returncode != 0:
        pytest.fail('build-guest-agent failed (%d):\n%s%s' % (result.returncode, result.stdout, result.stderr),
                    pytrace=False)
    return result.stdout.strip()


_interpreters = {}


def interpreter(version):
    """
    The real path of CPython ``version`` (``'3.6'``), found on PATH as ``pythonVERSION``.

    The real path (not a pyenv shim, not a symbolic link) because guests run it from the shared
    root, where no shim would know which version to choose.
    """
    if version not in _interpreters:
        found = shutil.which('python' + version)
        result = None
        if found:
            result = subprocess.run([found, '-c', 'import os, sys; print(os.path.realpath(sys.executable));'
                                     ' print("%d.%d" % sys.version_info[:2])'],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        if result is None or result.returncode != 0 or result.stdout.split()[1:] != [version]:
            pytest.fail('no working python%s on PATH (%s): the single-file agent must be tested on it; put '
                        'pyenv\'s versions/%s.*/bin on PATH, as scripts/test does'
                        % (version, found or 'not found', version), pytrace=False)
        _interpreters[version] = result.stdout.split()[0]
    return _interpreters[version]


def write_command(directory, name, body):
    """An executable ``#!/bin/sh`` command ``name`` in ``directory`` (a commands directory of an agent)."""
    path = os.path.join(str(directory), name)
    with open(path, 'w') as handle:
        handle.write('#!/bin/sh\n' + body + '\n')
    os.chmod(path, 0o755)
    return path
