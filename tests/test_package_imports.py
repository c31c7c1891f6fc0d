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


def test_the_host_package_imports_its_names_when_first_used():
    # The console script imports negotiator_host.oneshot through the package, and the full CLI
    # when the call is not its plainest: neither must import the API or the discovery (Python
    # 3.6 too, which has no module __getattr__).
    result = run_python(
        "import sys, negotiator_host.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('negotiator_host.')))\n"
        "import negotiator_host\n"
        "from negotiator_host import GuestChannel, list_guests, CallTimeout, __version__\n"
        "from negotiator_common.errors import CallTimeout as common_timeout\n"
        "print(GuestChannel.__module__, list_guests.__module__, CallTimeout is common_timeout)\n"
        "print(sorted(set(negotiator_host.__all__) - set(dir(negotiator_host))))\n"
        "try:\n"
        "    negotiator_host.nothing\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['negotiator_host.cli', 'negotiator_host.local_socket', 'negotiator_host.oneshot']",
        'negotiator_host.channel negotiator_host.discovery True',
        '[]',
        "module 'negotiator_host' has no attribute 'nothing'"]


def test_every_public_name_of_the_host_package_is_there():
    result = run_python("import negotiator_host\n"
                        "from negotiator_host import *\n"
                        "names = negotiator_host.__all__\n"
                        "print(all(globals()[name] is getattr(negotiator_host, name) for name in names))")
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'True\n'
