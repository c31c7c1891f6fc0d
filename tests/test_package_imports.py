"""
What the packages promise at import: ``import negotiator_guest`` is cheap (no :mod:`logging`),
and no package's logger prints through logging's last resort when nobody configured logging.

Each check runs in a fresh interpreter: pytest itself has imported logging long ago.
"""

import subprocess
import sys

import pytest


def run_python(program):
    return subprocess.run([sys.executable, '-c', program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_importing_the_guest_package_imports_no_logging():
    result = run_python("import sys, negotiator_guest; print(sorted(m for m in sys.modules if m == 'logging'"
                        " or m.startswith('negotiator_guest.')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout == '[]\n'


@pytest.mark.parametrize('module', ['negotiator_common.runner', 'negotiator_host.channel', 'negotiator_guest.port'])
def test_a_library_warning_is_never_printed_by_logging_itself(module):
    # No logging configured: logging's last resort would print a WARNING to stderr.
    result = run_python("import importlib; importlib.import_module(%r).logger.warning('must not print')" % module)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
