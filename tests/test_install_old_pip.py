"""
Installing on a guest whose pip is too old to build the packages (RHEL 8: pip 9.0.3, Python 3.6).

Why: pip learned to build a project that has only a pyproject.toml in version 19, so the
checkout does not install with the pip that old systems ship. docs/guest.rst ("Old guests and
guests without network") says what to do instead; besides the single-file agent
(test_guest_zipapp.py), wheels built where a newer pip runs and installed by the old pip with
no network. This test runs those very commands (checked against the page) with pip 9.0.3 on
Python 3.6: the pip of this test's environment builds and downloads the wheels, as on the host.
Python 3.6 runs by path, whichever Python runs pytest: the module is marked ``interpreters``,
and ``tox -e guest-agent`` runs it once (tox.ini).
"""

import os
import shlex
import subprocess
import sys

import pytest

from support import REPOSITORY, interpreter

pytestmark = pytest.mark.interpreters

#: The commands of docs/guest.rst, word for word: on the host (pip 19 or later, in the
#: checkout), then in the guest with only the folder ``wheels`` copied in.
ON_THE_HOST = [
    'pip wheel --wheel-dir wheels --no-deps ./negotiator-common ./negotiator-guest',
    'pip download --dest wheels --no-deps --only-binary=:all: --python-version 3.6 --require-hashes'
    ' -r scripts/guest-agent-requirements.txt',
]
IN_THE_GUEST = 'pip3 install --no-index --find-links wheels negotiator-guest'
#: What pip 9 says when asked to install the checkout (the page quotes it so that users recognise it).
OLD_PIP_REFUSES = "Directory './negotiator-common' is not installable. File 'setup.py' not found."


def run(argv, **kwargs):
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            timeout=600, **kwargs)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope='module')
def old_pip(tmp_path_factory):
    """``[python3.6, pip 9.0.3]``, an argv prefix: pip 9.0.3 run from its wheel, installing into a bare venv."""
    folder = tmp_path_factory.mktemp('old-pip')
    status, output = run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:',
                          '--python-version', '3.6', '--dest', str(folder), 'pip==9.0.3'])
    assert status == 0, output
    status, output = run([interpreter('3.6'), '-m', 'venv', '--without-pip', str(folder / 'venv')])
    assert status == 0, output
    return [str(folder / 'venv' / 'bin' / 'python'), str(folder / 'pip-9.0.3-py2.py3-none-any.whl' / 'pip')]


def guest_environment():
    """A guest's environment: none of this machine's pip settings (its indexes, its caches)."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith('PIP_')}
    environment['PIP_CONFIG_FILE'] = os.devnull
    return environment


def test_the_documented_commands_are_the_ones_tested():
    with open(os.path.join(REPOSITORY, 'docs', 'guest.rst')) as handle:
        page = handle.read()
    for command in ON_THE_HOST + [IN_THE_GUEST, OLD_PIP_REFUSES]:
        assert command in page, command


def test_pip_9_cannot_build_the_checkout(old_pip):
    status, output = run(old_pip + ['install', '--no-index', './negotiator-common'], cwd=REPOSITORY,
                         env=guest_environment())
    assert status != 0 and OLD_PIP_REFUSES in output, output


def test_pip_9_installs_the_wheels_built_on_the_host_with_no_network(old_pip, tmp_path):
    wheels = str(tmp_path / 'wheels')
    for command in ON_THE_HOST:
        argv = [wheels if word == 'wheels' else word for word in shlex.split(command)]
        status, output = run([sys.executable, '-m'] + argv, cwd=REPOSITORY)
        assert status == 0, (command, output)
    argv = [wheels if word == 'wheels' else word for word in shlex.split(IN_THE_GUEST)[1:]]
    status, output = run(old_pip + argv, cwd=str(tmp_path), env=guest_environment())
    assert status == 0, output
    assert 'pip 9.0.3 ' in run(old_pip + ['--version'], env=guest_environment())[1]
    venv_bin = os.path.dirname(old_pip[0])
    status, output = run([os.path.join(venv_bin, 'negotiator-guest'), '--help'])
    assert status == 0 and output.startswith('Usage: negotiator-guest [OPTIONS]'), output
