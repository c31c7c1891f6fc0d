"""
Helpers for the end-to-end tests (``tests/test_e2e_*.py``) on real libvirt/QEMU guests.

Why: an agent guest costs about 15 s until its agent answers (boot under TCG, then Python over
9p), so the end-to-end modules share their guests between tests (module-scoped fixtures) and
boot the guests they need side by side. The CLIs run as users run them: the installed
``negotiator-host`` of the virtual environment running the tests, as a subprocess.
"""

import os
import subprocess

import pytest

from vmfixtures import VENV_BIN, negotiator_vm, wait_for_agent

__all__ = ('HOST_CLI', 'GUEST_CLI', 'host_cli', 'start_agents', 'remove_guests')

HOST_CLI = os.path.join(VENV_BIN, 'negotiator-host')
GUEST_CLI = os.path.join(VENV_BIN, 'negotiator-guest')


def host_cli(*args, input=None, timeout=120):
    """Run ``negotiator-host ARGS...`` and return the CompletedProcess (bytes, both streams kept apart)."""
    return subprocess.run([HOST_CLI] + list(args), input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def start_agents(image, commands_per_guest, **kwargs):
    """
    Start one agent guest per entry of ``commands_per_guest`` (a list of ``{name: script}``),
    all at once, and return them once every agent answers a ping. The guests are removed
    again if any of them fails to come up (the error says why; nothing skips).
    """
    if VENV_BIN.startswith('/tmp/'):
        pytest.fail('the tests run from %s, which the guest cannot see (its /tmp is its own)' % VENV_BIN,
                    pytrace=False)
    guests = []
    try:
        for commands in commands_per_guest:
            init_script, files = negotiator_vm.agent_guest_files(VENV_BIN, commands, **kwargs)
            guests.append(negotiator_vm.start_guest(init_script, files=files, image=image))
        for guest in guests:
            guest.wait_for_console(negotiator_vm.AGENT_READY, timeout=90)
        for guest in guests:
            wait_for_agent(guest)
    except BaseException:
        remove_guests(guests)
        raise
    return guests


def remove_guests(guests):
    for guest in guests:
        print('--- console of %s ---\n%s' % (guest.name, guest.console_tail(60)))
        guest.remove()

