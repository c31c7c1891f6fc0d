"""
pytest fixtures for end-to-end tests on real libvirt/QEMU guests (``scripts/negotiator_vm.py``).

Why: end-to-end tests need the host prepared (packages, libvirtd), the guest kernel and initramfs
built, and every guest they start removed again even when a test fails. These fixtures do that
once, in one place. Use them from a test module with::

    from vmfixtures import start_vm, vm_host  # noqa: F401 (pytest fixtures)

    @pytest.mark.vm
    def test_something(start_vm):  # noqa: F811 (the imported fixture)
        guest = start_vm('echo hello')
        guest.wait_for_console('hello', timeout=60)

``tox -e e2e`` runs the tests marked ``vm``; the other environments deselect them by marker.
A guest that cannot start makes the test fail loudly: nothing here skips.

Fixtures:

- ``vm_host`` (session): runs ``scripts/setup-host`` and ``scripts/build-test-guest``, removes
  guests left by crashed earlier runs, and returns the :class:`negotiator_vm.GuestImage`.
- ``start_vm`` (function): a factory ``start_vm(init_script, **kwargs) -> Guest`` taking the
  arguments of :func:`negotiator_vm.start_guest`; every guest it started is removed after the
  test, and the console tail of each is printed (pytest shows it when the test fails).

Helpers: :data:`GUEST_PYTHON` (this interpreter, which the guest runs from the shared root
filesystem) and :func:`python_guest_script` (an init script that runs a Python program there).
"""

import os
import shlex
import sys

import pytest

import negotiator_vm  # scripts/ is on the tests' path (pytest.ini)

__all__ = ('GUEST_PYTHON', 'VENV_BIN', 'negotiator_vm', 'python_guest_script', 'start_agent', 'start_vm', 'vm_host',
           'wait_for_agent')

#: The Python interpreter running the tests; the guest sees the host's root filesystem, so it
#: can run the same interpreter (and the same virtual environment) at the same path.
GUEST_PYTHON = sys.executable


def python_guest_script(filename, *args, python=GUEST_PYTHON):
    """An init script that runs ``python WORKDIR/filename ARGS...`` in the guest."""
    argv = ' '.join(shlex.quote(arg) for arg in args)
    return 'exec %s "$NEGOTIATOR_VM_WORKDIR"/%s %s\n' % (shlex.quote(python), shlex.quote(filename), argv)


@pytest.fixture(scope='session')
def vm_host():
    """The host prepared for guests; returns the kernel/initramfs paths (GuestImage)."""
    problem = None
    try:
        negotiator_vm.ensure_host()
        image = negotiator_vm.build_guest()
        stale = negotiator_vm.remove_stale_guests()
    except negotiator_vm.VMError as err:
        problem = str(err)
    if problem is not None:
        pytest.fail('the test VM host is not usable: %s' % problem, pytrace=False)
    if stale:
        print('removed guests left by an earlier run: %s' % ' '.join(stale))
    return image


@pytest.fixture
def start_vm(vm_host):
    """A factory that starts guests (see start_guest) and removes them all after the test."""
    guests = []

    def start(init_script, **kwargs):
        kwargs.setdefault('image', vm_host)
        guest = negotiator_vm.start_guest(init_script, **kwargs)
        guests.append(guest)
        return guest

    yield start
    errors = []
    for guest in guests:
        print('--- console of %s ---\n%s' % (guest.name, guest.console_tail(60)))
        try:
            guest.remove()
        except negotiator_vm.VMError as err:
            errors.append(str(err))
    if errors:
        pytest.fail('could not remove test guests: %s' % '; '.join(errors), pytrace=False)


#: The ``bin`` folder of the virtual environment running the tests: it has the three packages
#: installed, and the guest runs negotiator-guest from it over the shared root. It must not be
#: under /tmp, which is a tmpfs of its own in the guest.
VENV_BIN = os.path.dirname(GUEST_PYTHON)


def wait_for_agent(guest, timeout=90.0, daemon=None):
    """
    :meth:`negotiator_vm.Guest.wait_for_agent` with this environment's CLI (through ``daemon``, a
    host daemon of ``e2e_support.start_host_daemon``, when given); a test fails when it times out.
    """
    try:
        return guest.wait_for_agent(VENV_BIN, timeout=timeout,
                                    socket_path=daemon.socket_path if daemon is not None else None)
    except negotiator_vm.VMError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture
def start_agent(vm_host):
    """
    A factory ``start_agent(commands=None, supervised=True, **start_guest_kwargs) -> Guest``:
    a guest whose negotiator-guest --daemon (from this virtual environment, under supervisord
    unless ``supervised=False``) answers before it returns; removed after the test.
    """
    if VENV_BIN.startswith('/tmp/'):
        pytest.fail('the tests run from %s, which the guest cannot see (its /tmp is its own):'
                    ' use a virtual environment elsewhere (tox puts it in .tox/)' % VENV_BIN, pytrace=False)
    guests = []

    def start(commands=None, supervised=True, **kwargs):
        kwargs.setdefault('image', vm_host)
        guest = negotiator_vm.start_agent_guest(VENV_BIN, commands=commands, supervised=supervised, **kwargs)
        guests.append(guest)
        wait_for_agent(guest)
        return guest

    yield start
    for guest in guests:
        print('--- console of %s ---\n%s' % (guest.name, guest.console_tail(60)))
        guest.remove()
