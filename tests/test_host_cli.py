"""The negotiator-host CLI, as a subprocess (real exit statuses and byte streams) and in-process."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from negotiator_host import cli

from fake_libvirt import FakeLibvirt
from support import start_agents


@pytest.fixture
def world(monkeypatch):
    """Three running guests with agents (one without a channel), in a fake libvirt."""
    fake = FakeLibvirt().activate(monkeypatch)
    agents = start_agents(fake)
    fake.add_guest('plain', 9, channels=('org.qemu.guest_agent.0',))
    yield fake
    for agent in agents:
        agent.stop()
    fake.cleanup()


def run_cli(fake, *args, stdin=b''):
    process = subprocess.run([sys.executable, '-m', 'negotiator_host'] + list(args), input=stdin,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fake.environ, timeout=60)
    return process.returncode, process.stdout, process.stderr


def test_execute_one_guest_passes_bytes_and_status_through(world):
    status, out, err = run_cli(world, '--execute', 'binary', 'alpha')
    assert (status, out, err) == (0, bytes(range(256)) * 4, b'err\xff\n')
    status, out, err = run_cli(world, 'alpha', '-e', 'fail')
    assert (status, out, err) == (3, b'partial\n', b'it failed\n')


def test_options_after_guest_names_and_stdin(world):
    status, out, err = run_cli(world, 'béta-2', '--stdin', '-e', 'cat-stdin', stdin=b'\x00in\xff')
    assert (status, out) == (0, b'\x00in\xff')
    status, out, _ = run_cli(world, 'alpha', '-e', "echo-args 'a b' c")
    assert out == b'a b c\n'


def test_several_guests_prefix_lines_and_fail_together(world):
    status, out, err = run_cli(world, '-e', 'two-lines', 'alpha', 'gamma.3')
    assert status == 0
    assert sorted(out.splitlines()) == [b'alpha: one', b'alpha: two', b'gamma.3: one', b'gamma.3: two']
    assert sorted(err.splitlines()) == [b'alpha: warn', b'gamma.3: warn']
    status, out, err = run_cli(world, '-e', 'fail', 'alpha', 'gamma.3')
    assert status == 3


def test_all_runs_on_every_guest_with_the_channel(world):
    status, out, err = run_cli(world, '--all', '--json', '-e', 'echo-args hi')
    assert status == 0, err
    objects = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted(o['guest'] for o in objects) == ['alpha', 'béta-2', 'gamma.3']
    assert all(o['stdout'] == 'hi\n' and o['exit_status'] == 0 and o['ok'] for o in objects)


def test_json_errors_and_first_failure_status(world):
    status, out, err = run_cli(world, '--json', '-p', 'alpha', 'plain', 'nosuch')
    objects = [json.loads(line) for line in out.decode().splitlines()]
    assert [o['guest'] for o in objects] == ['alpha', 'plain', 'nosuch']
    assert objects[0]['ok'] and objects[0]['rtt'] > 0
    assert objects[1]['error']['type'] == 'ChannelNotFound'
    assert objects[2]['error']['type'] == 'GuestNotFound'
    assert status == 69


def test_json_failure_has_the_shape_of_negotiator_guests(world):
    # The shape both CLIs print (negotiator-guest's): the error with its data, and the exit status it gives.
    status, out, err = run_cli(world, '--json', '-e', 'sleep 30', '-t', '0.5', 'alpha')
    failure = json.loads(out.decode())
    assert status == 75 and failure['exit_status'] == 75 and failure['guest'] == 'alpha' and not failure['ok']
    assert sorted(failure['error']) == ['code', 'data', 'message', 'type']
    assert failure['error']['type'] in ('CommandTimedOut', 'CallTimeout') and isinstance(failure['error']['data'], dict)
    status, out, err = run_cli(world, '-g', '-j')
    assert all(row['error'] is None for row in json.loads(out.decode()))


@pytest.mark.parametrize('args,expected', [
    (['-e', 'nosuch', 'alpha'], 77),
    (['-e', 'true', 'nosuch'], 69),
    (['-e', 'true', 'plain'], 69),
    (['-e', 'sleep 30', '-t', '0.5', 'alpha'], 75),
    (['--bogus'], 64),
    (['-e', 'true'], 64),
    (['-p', '-e', 'x', 'alpha'], 64),
    (['-t', 'soon', '-p', 'alpha'], 64),
])
def test_exit_statuses_of_our_own_failures(world, args, expected):
    status, out, err = run_cli(world, *args)
    assert status == expected
    assert len(err.decode().strip().splitlines()) == 1 and b'Traceback' not in err
    assert err.startswith(b'negotiator-host: ')


def test_missing_channel_message_has_the_xml(world):
    status, out, err = run_cli(world, '-p', 'plain')
    assert status == 69
    assert b"<target type='virtio' name='negotiator-host-to-guest.0'/>" in err


def test_libvirtd_down(world):
    world.set_down()
    for args in (['--list-guests'], ['--all', '-p']):
        status, out, err = run_cli(world, *args)
        assert status == 69 and b'libvirtd' in err and b'Traceback' not in err


def test_list_guests_table_and_json(world):
    status, out, err = run_cli(world, '--list-guests')
    assert status == 0
    text = out.decode()
    for name in ('alpha', 'béta-2', 'gamma.3'):
        assert name in text
    assert 'plain' not in text
    status, out, err = run_cli(world, '-g', '-j')
    rows = json.loads(out.decode())
    assert [r['name'] for r in rows] == ['alpha', 'béta-2', 'gamma.3']
    assert all(r['reachable'] and r['version'] and r['rtt'] > 0 and r['state'] == 'running' for r in rows)


def test_list_guests_does_not_wait_long_for_a_silent_agent(world):
    world.add_guest('silent', 10, listen=True)  # a socket that accepts but never answers
    started = time.monotonic()
    status, out, err = run_cli(world, '--list-guests', '--json', '--timeout', '60')
    elapsed = time.monotonic() - started
    rows = {r['name']: r for r in json.loads(out.decode())}
    assert status == 0 and rows['alpha']['reachable'] and not rows['silent']['reachable']
    # Bounded by the listing's probe timeout (3 s), not by the call timeout (60 s here).
    assert elapsed < 30


def test_list_commands_one_and_several(world):
    status, out, err = run_cli(world, '-c', 'alpha')
    assert status == 0 and b'cat-stdin\n' in out and not out.startswith(b'alpha:')
    assert re.search(rb'^hostname +\S.*host name', out, re.MULTILINE)  # with its description, as in the guest's CLI
    status, out, err = run_cli(world, '-c', 'alpha', 'gamma.3')
    assert b'alpha: cat-stdin\n' in out and b'gamma.3: cat-stdin\n' in out


def test_ping_one_guest_in_process(world, capsys):
    assert cli.run(['alpha', '--ping']) == 0
    assert capsys.readouterr().out.startswith('alpha: agent negotiator-guest')


def test_help_prints_the_usage_text(capsys):
    assert cli.run(['--help']) == 0
    assert '--list-guests' in capsys.readouterr().out


def test_parse_options_contract():
    options = cli.parse_options(['g1', '-t', '2.5', '--execute=ls -l', 'g2', '-j', '--connect', 'qemu:///session'])
    assert options.guests == ['g1', 'g2'] and options.timeout == 2.5 and options.command == ['ls', '-l']
    assert options.json and options.uri == 'qemu:///session'
    assert cli.parse_options(['-t', '0', '-p', 'g']).timeout is None
    assert cli.parse_options(['-t', '2m', '-p', 'g']).timeout == 120.0
    assert cli.parse_options(['-d', '--commands-dir', '/a', '--commands-dir=/b']).commands_dirs == ['/a', '/b']


def test_docs_page_carries_the_usage_text_verbatim():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, '..', 'docs', 'host.rst'), encoding='utf-8') as handle:
        page = handle.read()
    usage = '\n'.join(('   ' + line) if line.strip() else '' for line in cli.__doc__.strip('\n').splitlines())
    assert usage in page


def test_daemon_refuses_a_bad_policy_file(world, tmp_path):
    policy = tmp_path / 'policy.ini'
    policy.write_text('[web-*]\nalow = typo\n')
    status, out, err = run_cli(world, '--daemon', '--policy', str(policy))
    assert status == 64 and b"policy.ini, line 2: unknown key 'alow'" in err
    status, out, err = run_cli(world, '--daemon', '--policy', str(tmp_path / 'missing.ini'))
    assert status == 64 and b'cannot read the policy file' in err
