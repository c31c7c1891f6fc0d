"""
The README's first command, ``scripts/demo``, run for real: one run, checked step by step.

Why: the demo is what a newcomer runs first; if it breaks, nothing else in the README is
believed. It boots a real guest, so it runs in ``tox -e e2e`` (marker ``vm``), and like the other
end-to-end tests it fails, never skips, when the guest cannot boot: the demo's own output (which
names the failed step and why) is in the failure message. Its command line (usage text, usage
errors) is checked without a VM.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from vmfixtures import negotiator_vm

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'demo')


def _steps(output):
    """The demo's output cut into steps: {title: text under it}, in order."""
    steps = {}
    for block in re.split(r'^==> ', output, flags=re.MULTILINE)[1:]:
        title, _, rest = block.partition('\n')
        steps[title.split(' ...')[0]] = title + '\n' + rest
    return steps


def _step(steps, start):
    matches = [text for title, text in steps.items() if title.startswith(start)]
    assert matches, 'the demo printed no step starting with %r; steps: %s' % (start, list(steps))
    return matches[0]


def run_demo(*args):
    return subprocess.run([DEMO] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_the_usage_shows_the_options_and_the_exit_statuses():
    result = run_demo('--help')
    assert result.returncode == 0, result.stderr
    assert '--keep' in result.stdout and '--venv DIR' in result.stdout
    assert 'Exit status: 0 when every step worked, 1 when one failed' in result.stdout
    assert '2 for a usage error' in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--verbose'], 'unrecognized arguments: --verbose'),
    (['--venv', '/tmp/demo-venv'], 'is under /tmp, which the guest does not share'),
])
def test_a_usage_error_exits_2_before_anything_is_done(args, message):
    result = run_demo(*args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr
    assert not os.path.exists('/tmp/demo-venv')


@pytest.mark.vm
def test_demo_shows_every_step():
    try:
        result = subprocess.run([DEMO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True, errors='replace', timeout=1800)
    except subprocess.TimeoutExpired as err:
        pytest.fail('scripts/demo did not finish within 30 minutes; output so far:\n%s'
                    % (err.stdout or ''), pytrace=False)
    output = result.stdout
    sys.stdout.write(output)  # pytest shows it when an assertion below fails
    assert result.returncode == 0, 'scripts/demo failed (status %d):\n%s' % (result.returncode, output)

    match = re.search(r'guest (negotiator-demo-[a-z0-9]+) is up', output)
    assert match, output
    guest = match.group(1)
    steps = _steps(output)

    assert 'host ready' in _step(steps, 'Preparing the host')
    assert re.search(r'creating|reusing|reinstalling', _step(steps, 'Installing negotiator'))
    assert 'initramfs ' in _step(steps, "Building the test guest")
    assert 'answered in' in _step(steps, "Waiting for the guest agent")
    daemon = _step(steps, 'Starting negotiator-host --daemon')
    assert '$ negotiator-host --daemon --commands-dir ' in daemon
    socket = re.search(r'--socket (\S+/host\.sock) --audit-log \S+/audit\.log %s$' % re.escape(guest), daemon,
                       flags=re.MULTILINE)
    assert socket, daemon
    assert 'connected to both channels of %s' % guest in daemon
    assert 'NEGOTIATOR_HOST_SOCKET=%s' % socket.group(1) in daemon

    listed = _step(steps, 'The running guests')
    assert '$ negotiator-host --list-guests' in listed
    # Reachable, and served by the host daemon (the last column).
    assert re.search(r'\| %s +\| running +\| yes .*\| yes +\|$' % re.escape(guest), listed, flags=re.MULTILINE), listed

    commands = _step(steps, 'The commands the guest offers')
    assert '$ negotiator-host --list-commands %s' % guest in commands
    for name in ('ask-host', 'greet', 'os-release', 'uptime'):
        assert re.search(r'^    %s( |$)' % name, commands, flags=re.MULTILINE), (name, commands)

    builtin = _step(steps, 'A built-in command')
    assert '$ negotiator-host --execute os-release %s' % guest in builtin
    assert re.search(r'^    ID=', builtin, flags=re.MULTILINE), builtin

    greet = _step(steps, 'A command installed in the guest')
    assert "$ negotiator-host --execute 'greet World' %s" % guest in greet
    assert 'Hello, World! This is greet, a command inside the guest' in greet

    together = _step(steps, 'Two callers at once')
    assert "$ negotiator-host --execute 'take-time 2 alone' %s\n" % guest in together
    assert 'alone: take-time 2 ran in the guest' in together and 'one call alone: ' in together
    for number in (1, 2):
        assert "$ negotiator-host --execute 'take-time 2 caller-%d' %s &" % (number, guest) in together
        assert 'caller-%d: take-time 2 ran in the guest' % number in together
    assert 'two at once: ' in together
    records = [json.loads(line) for line in together.splitlines() if line.startswith('    {')]
    assert sorted((r['uid'], r['guest'], r['command'], r['args'], r['exit_status']) for r in records) == [
        (0, guest, 'take-time', ['2', 'caller-%d' % number], 0) for number in (1, 2)], together

    ask = _step(steps, 'Guest to host')
    assert '$ negotiator-host --timeout 60 --execute ask-host %s' % guest in ask
    assert 'host-facts (on the host): NEGOTIATOR_GUEST=%s\n' % guest in ask

    cleanup = _step(steps, 'Cleaning up')
    assert 'stopped negotiator-host --daemon (exit status 0)' in cleanup
    assert 'removed guest %s' % guest in cleanup
    assert 'The demo worked' in output
    for title, text in steps.items():
        assert re.search(r'done in \d+\.\d s', text), 'step %r has no timing:\n%s' % (title, text)
    assert guest not in negotiator_vm.list_guests('negotiator-demo-'), 'the demo left its guest behind'
