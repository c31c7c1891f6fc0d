"""
Real ansible-core (tox.ini pins the version) through the connection plugin
``negotiator.guest.negotiator`` against real guests: ad-hoc calls and one playbook whose tasks the
tests check one by one (command, shell, copy and fetch of 10 MiB, template, setup, become, a
task's timeout), a guest that does not exist (unreachable), an agent started without
``--allow-exec`` (a clear failure), and the guest reached over ssh to its hypervisor (a real
``sshd`` on this machine, tests/sshd_support.py).

Why one playbook: Ansible starts a process per task on the controller and Python in the guest per
module (over 9p, under TCG), so each run costs seconds; the playbook pays for Ansible's start once
and the tests read its tasks' results from the json callback. The two guests boot side by side.
"""

import hashlib
import json
import os
import subprocess
import textwrap

import pytest

from e2e_support import remove_guests
from sshd_support import Sshd
from vmfixtures import VENV_BIN, negotiator_vm, vm_host, wait_for_agent  # noqa: F401 (vm_host: a fixture)

pytestmark = [pytest.mark.vm, pytest.mark.ansible]

PLUGIN = 'negotiator.guest.negotiator'
MIB = 1024 * 1024
TASK_TIMEOUT = 5
"""The ``timeout`` of the task that would sleep a minute."""


@pytest.fixture(scope='module')
def guests(vm_host):  # noqa: F811 (the imported fixture)
    """``(allowed, plain)``: agents with and without ``--allow-exec --allow-files``, booted side by side."""
    started = []
    try:
        for daemon_args in (['--allow-exec', '--allow-files'], []):
            init_script, files = negotiator_vm.agent_guest_files(VENV_BIN, daemon_args=daemon_args)
            started.append(negotiator_vm.start_guest(init_script, files=files, image=vm_host))
        for guest in started:
            guest.wait_for_console(negotiator_vm.AGENT_READY, timeout=90)
        for guest in started:
            wait_for_agent(guest, timeout=180)  # two agents' Pythons start at once, over 9p under TCG
    except BaseException:
        remove_guests(started)
        raise
    yield started
    remove_guests(started)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('ansible')


@pytest.fixture(scope='module')
def sshd():
    server = Sshd(VENV_BIN)
    yield server
    server.stop()


@pytest.fixture(scope='module')
def inventory(guests, workdir, sshd):
    """
    An inventory: ``ok`` (agent with both switches), ``noexec`` (without), ``gone`` (no such
    guest), ``remote`` (``ok``'s guest over ssh, this machine's sshd playing the hypervisor).
    """
    allowed, plain = guests
    path = workdir / 'inventory.ini'
    path.write_text(textwrap.dedent("""\
        ok ansible_host={allowed}
        noexec ansible_host={plain}
        gone ansible_host=negotiator-e2e-no-such-guest
        remote ansible_host={allowed} ansible_negotiator_hypervisor=root@127.0.0.1 ansible_negotiator_ssh="{ssh}"

        [all:vars]
        ansible_connection={plugin}
        ansible_python_interpreter=/usr/bin/python3
        # The test guest's root is the host's, read-only: Ansible's files go to its /tmp (where
        # a become to another user needs them: one of Ansible's system_tmpdirs).
        ansible_remote_tmp=/tmp
        ansible_negotiator_socket={socket}
        """).format(allowed=allowed.name, plain=plain.name, plugin=PLUGIN, socket=workdir / 'no-daemon.sock',
                    ssh=' '.join(sshd.ssh)))
    return path


RESULTS_CALLBACK = """\
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    \"\"\"Each task's result on each host, one JSON line, into the file $NEGOTIATOR_TEST_RESULTS.\"\"\"

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'results'
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, result, outcome):
        record = dict(result._result, task_name=result._task.get_name(), outcome=outcome)
        with open(os.environ['NEGOTIATOR_TEST_RESULTS'], 'a') as handle:
            handle.write(json.dumps({'host': result._host.get_name(), 'result': record}, default=str) + '\\n')

    def v2_runner_on_ok(self, result):
        self._write(result, 'ok')

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._write(result, 'failed')

    def v2_runner_on_unreachable(self, result):
        self._write(result, 'unreachable')
"""
"""
A callback plugin of the tests (ansible-core 2.19 has no json callback of its own any more: it is
ansible.posix's): every result, with its task's name and its outcome, as JSON lines.
"""


def run_ansible(program, inventory, *args, timeout=300):
    """
    ``ansible``/``ansible-playbook`` of the tests' environment with the tests' callback; returns
    ``(exit status, {host: [task results, in order]}, what it printed)``; each result has its
    ``task_name`` and its ``outcome`` (ok, failed, unreachable).
    """
    directory = inventory.parent
    plugins = directory / 'callback_plugins'
    plugins.mkdir(exist_ok=True)
    (plugins / 'results.py').write_text(RESULTS_CALLBACK)
    results_path = directory / 'results.jsonl'
    if results_path.exists():
        results_path.unlink()
    env = dict(os.environ, ANSIBLE_CALLBACK_PLUGINS=str(plugins), ANSIBLE_CALLBACKS_ENABLED='results',
               ANSIBLE_LOAD_CALLBACK_PLUGINS='1', NEGOTIATOR_TEST_RESULTS=str(results_path),
               ANSIBLE_LOCAL_TEMP=str(directory / 'local-tmp'), ANSIBLE_NOCOLOR='1', ANSIBLE_RETRY_FILES_ENABLED='0')
    done = subprocess.run([os.path.join(VENV_BIN, program), '-i', str(inventory)] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                          cwd=str(directory))
    output = done.stdout.decode('utf-8', 'replace')
    results = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            results.setdefault(record['host'], []).append(record['result'])
    return done.returncode, results, output


def test_ad_hoc_ping(inventory):
    status, results, output = run_ansible('ansible', inventory, 'ok', '-m', 'ansible.builtin.ping', '-vvv')
    assert status == 0, output
    assert results['ok'][0]['ping'] == 'pong'
    # The pipelined module ran in the agent's warm Python, which imported its module_utils first.
    assert "sleep 0' (warm Python, " in output and 'modules of its own preloaded)' in output, output


def test_a_missing_guest_is_unreachable_and_an_agent_without_exec_fails_clearly(inventory):
    status, results, output = run_ansible('ansible', inventory, 'gone,noexec', '-m', 'ansible.builtin.ping')
    assert status == 4, output  # 4: some host unreachable
    gone, noexec = results['gone'][0], results['noexec'][0]
    assert gone['outcome'] == 'unreachable', gone
    assert 'negotiator could not reach the agent in negotiator-e2e-no-such-guest' in gone['msg'], gone
    assert noexec['outcome'] == 'failed', noexec
    assert 'negotiator-guest --daemon --allow-exec' in noexec['msg'], noexec


def test_the_guest_over_ssh_to_its_hypervisor(inventory, vm_host):  # noqa: F811 (the imported fixture)
    status, results, output = run_ansible('ansible', inventory, 'remote', '-m', 'ansible.builtin.command',
                                          '-a', 'uname -r')
    assert status == 0, output
    assert results['remote'][0]['stdout'] == guest_kernel(vm_host)


def guest_kernel(image):
    """The release of the test guest's kernel (scripts/build-test-guest writes it beside the kernel)."""
    with open(os.path.join(os.path.dirname(image.kernel), 'kernel-version')) as handle:
        return handle.read().strip()


PLAYBOOK = """\
- hosts: ok
  gather_facts: false
  tasks:
    - name: command
      ansible.builtin.command: /bin/echo hello from the guest
      register: said
    - name: shell
      ansible.builtin.shell: printf '%%s|%%s\\n' "it's" 'say "hi"' | tr a-z A-Z; exit 3
      ignore_errors: true
    - name: copy
      ansible.builtin.copy: {src: to-guest.bin, dest: /tmp/to-guest.bin, mode: '0640'}
    - name: make a file in the guest
      ansible.builtin.shell: head -c %(size)d /dev/urandom > /tmp/from-guest.bin && sha256sum /tmp/from-guest.bin
    - name: fetch
      ansible.builtin.fetch: {src: /tmp/from-guest.bin, dest: fetched/from-guest.bin, flat: true}
    - name: template
      ansible.builtin.template: {src: page.j2, dest: /tmp/page.txt}
    - name: read what arrived
      ansible.builtin.shell: sha256sum /tmp/to-guest.bin && cat /tmp/page.txt
    - name: setup
      ansible.builtin.setup: {gather_subset: [min]}
    - name: become
      ansible.builtin.command: id -un
      become: true
      become_method: ansible.builtin.su
      become_user: nobody
      become_flags: -s /bin/sh
    - name: timeout
      ansible.builtin.command: sleep 61
      timeout: %(timeout)d
      ignore_errors: true
    - name: the command that timed out is gone
      ansible.builtin.command: pgrep -f 'sleep 61'
      register: sleeping
      until: sleeping.rc == 1
      retries: 20
      delay: 1
      failed_when: sleeping.rc != 1
"""


@pytest.fixture(scope='module')
def playbook(inventory, workdir):
    """The playbook's run: ``{task name: result}`` of host ``ok``, and the bytes of the file copied in."""
    to_guest = os.urandom(10 * MIB)
    (workdir / 'to-guest.bin').write_bytes(to_guest)
    (workdir / 'page.j2').write_text('guest={{ inventory_hostname }} answer={{ 6 * 7 }}\n')
    (workdir / 'play.yml').write_text(PLAYBOOK % {'size': 10 * MIB, 'timeout': TASK_TIMEOUT})
    status, results, output = run_ansible('ansible-playbook', inventory, str(workdir / 'play.yml'), timeout=1800)
    print(output[-20000:])
    tasks = {result['task_name']: result for result in results['ok']}
    return status, tasks, to_guest, output


def test_the_playbook_ran_every_task(playbook):
    status, tasks, _, output = playbook
    assert status == 0, output
    assert len(tasks) == 11, sorted(tasks)


def test_command(playbook):
    result = playbook[1]['command']
    assert (result['rc'], result['stdout']) == (0, 'hello from the guest'), result


def test_shell_with_pipes_quotes_and_a_non_zero_exit(playbook):
    result = playbook[1]['shell']
    assert result['outcome'] == 'failed' and result['rc'] == 3, result
    assert result['stdout'] == 'IT\'S|SAY "HI"', result


def test_copy_of_10_mib_arrives_whole(playbook):
    _, tasks, to_guest, _ = playbook
    assert tasks['copy']['changed'] is True and tasks['copy']['mode'] == '0640', tasks['copy']
    assert tasks['copy']['checksum'] == hashlib.sha1(to_guest).hexdigest()
    assert tasks['read what arrived']['stdout'].split()[0] == hashlib.sha256(to_guest).hexdigest()


def test_fetch_of_10_mib_arrives_whole(playbook, workdir):
    tasks = playbook[1]
    fetched = (workdir / 'fetched' / 'from-guest.bin').read_bytes()
    assert len(fetched) == 10 * MIB
    assert tasks['make a file in the guest']['stdout'].split()[0] == hashlib.sha256(fetched).hexdigest()
    assert tasks['fetch']['checksum'] == hashlib.sha1(fetched).hexdigest()


def test_template(playbook):
    assert playbook[1]['read what arrived']['stdout_lines'][1] == 'guest=ok answer=42'


def test_setup(playbook, vm_host):  # noqa: F811 (the imported fixture)
    facts = playbook[1]['setup']['ansible_facts']
    assert (facts['ansible_system'], facts['ansible_kernel']) == ('Linux', guest_kernel(vm_host)), facts


def test_become_another_user_with_su(playbook):
    assert playbook[1]['become']['stdout'] == 'nobody'


def test_a_task_that_times_out_fails_and_its_command_is_killed_in_the_guest(playbook):
    _, tasks, _, _ = playbook
    timed_out = tasks['timeout']
    assert timed_out['outcome'] == 'failed', timed_out
    assert 'timed out' in timed_out['msg'].lower() and str(TASK_TIMEOUT) in timed_out['msg'], timed_out
    assert tasks['the command that timed out is gone']['rc'] == 1
