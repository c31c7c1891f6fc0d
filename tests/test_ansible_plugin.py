"""
The connection plugin ``negotiator.guest.negotiator`` (negotiator-ansible/) under real
ansible-core, against a fake :class:`GuestChannel`: which channel it opens from Ansible's
options, what it asks the channel for, and how negotiator's errors become Ansible's (an agent
that does not answer makes the host unreachable; a refusal fails the task). The real guests are
tests/test_e2e_ansible.py's. Marked ``ansible``: ansible-core runs on Python 3.11 and later only,
so ``tox -e ansible`` runs these (the other environments deselect them). Ansible is imported by
the ``ansible`` fixture, not by the module: the environments without it collect the module too.
"""

import os
import shlex
import subprocess
import sys

import pytest
from negotiator_common import __version__
from negotiator_common.client import ExecuteResult
from negotiator_common.errors import ChannelNotFound, CommandNotAllowed, ConnectionClosed, InvalidParams

pytestmark = pytest.mark.ansible

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTION = os.path.join(ROOT, 'negotiator-ansible', 'ansible_collections', 'negotiator', 'guest')
PLUGIN = 'negotiator.guest.negotiator'


class FakeChannel(object):
    """A GuestChannel that records its options and calls; ``script`` says what its calls do."""

    opened = []
    hello_error = None
    """What every ``hello`` raises (None: it answers)."""

    def __init__(self, name, **options):
        self.name = name
        self.options = options
        self.calls = []
        self.closed = False
        self.via = 'direct'
        self.agent_info = {'limits': {'max_timeout': 7200.0}}
        self.script = {}
        FakeChannel.opened.append(self)

    def _step(self, method):
        action = self.script.get(method)
        if isinstance(action, BaseException):
            raise action
        return action

    def hello(self):
        self.calls.append(('hello',))
        if self.hello_error is not None:
            raise self.hello_error
        return dict(self.agent_info)

    def exec(self, argv, input=None, timeout=None, stdout=None, stderr=None, warm=False, preload=None):
        self.calls.append(('exec', list(argv), input, timeout) + (('warm',) if warm else ())
                          + ((preload,) if preload is not None else ()))
        result = self._step('exec') or ExecuteResult('exec', argv, 0)
        stdout.write(b'out:' + (input or b''))
        stderr.write(b'err')
        return result

    def push(self, source, target):
        self.calls.append(('push', source.read(), target))
        self._step('push')

    def pull(self, source, target):
        self.calls.append(('pull', source))
        self._step('pull')
        with open(target, 'wb') as handle:  # a path, as the plugin gives it (the API writes it atomically)
            handle.write(b'pulled from ' + source.encode())

    def close(self):
        self.closed = True


class AnsibleAPI(object):
    """What the tests use of ansible-core, imported when a test runs (see the module's docstring)."""

    def __init__(self):
        from ansible import errors
        from ansible.playbook.play_context import PlayContext
        from ansible.plugins import loader
        self.errors, self.PlayContext, self.loader = errors, PlayContext, loader
        loader.init_plugin_loader()  # its finder of collections: sys.path's, with the installed negotiator-ansible


@pytest.fixture(scope='module')
def ansible():
    return AnsibleAPI()


@pytest.fixture
def connection(monkeypatch, ansible):
    """A factory ``connection(**variables)``: the plugin, loaded by Ansible, over :class:`FakeChannel`."""
    FakeChannel.opened = []

    def make(**variables):
        plugin = ansible.loader.connection_loader.get(PLUGIN, ansible.PlayContext(), None)
        monkeypatch.setattr(sys.modules[type(plugin).__module__], 'GuestChannel', FakeChannel)
        plugin.set_options(var_options=dict({'inventory_hostname': 'web-1'}, **variables))
        return plugin
    return make


def test_the_guest_is_named_by_ansible_host_else_the_inventory_name(connection):
    connection()._connect()
    connection(ansible_host='guest-7', ansible_libvirt_uri='qemu:///session',
               ansible_negotiator_hypervisor='admin@hv-2', ansible_negotiator_socket='/run/x.sock',
               ansible_negotiator_timeout=3)._connect()
    connection(ansible_negotiator_hypervisor='hv-3', ansible_negotiator_ssh="ssh -p 2222 -o 'User admin'")._connect()
    plain, named, remote = FakeChannel.opened
    assert (remote.options['hypervisor'], remote.options['ssh']) == ('hv-3', ['ssh', '-p', '2222', '-o', 'User admin'])
    assert (plain.name, plain.options) == ('web-1', {'uri': None, 'socket': None, 'timeout': 10.0})
    assert (named.name, named.options) == ('guest-7', {'uri': 'qemu:///session', 'socket': '/run/x.sock',
                                                       'timeout': 3.0, 'hypervisor': 'admin@hv-2', 'ssh': ['ssh']})
    assert plain.calls == [('hello',)]


def test_a_command_runs_through_the_shell_with_its_input_and_the_agents_longest_timeout(connection):
    plugin = connection()
    status, stdout, stderr = plugin.exec_command("echo 'a b' | wc -w", in_data=b'module')
    assert (status, stdout, stderr) == (0, b'out:module', b'err')
    assert FakeChannel.opened[0].calls[1] == ('exec', ['/bin/sh', '-c', "echo 'a b' | wc -w"], b'module', 7200.0)
    assert plugin.is_pipelining_enabled()


@pytest.mark.parametrize('cmd, interpreter', [
    ("/bin/sh -c '/usr/bin/python3 && sleep 0'", '/usr/bin/python3'),
    ("/bin/sh -c '/usr/libexec/platform-python3.6 && sleep 0'", '/usr/libexec/platform-python3.6'),
])
def test_a_pipelined_module_runs_in_a_warm_python(connection, cmd, interpreter):
    plugin = connection()
    assert plugin.exec_command(cmd, in_data=b'module')[:2] == (0, b'out:module')
    assert FakeChannel.opened[0].calls[1] == ('exec', [interpreter], b'module', 7200.0, 'warm')


@pytest.mark.parametrize('cmd, in_data', [
    ("/bin/sh -c '/usr/bin/python3 && sleep 0'", None),  # not pipelined: the program comes from a file
    ("/bin/sh -c 'LANG=C /usr/bin/python3 && sleep 0'", b'module'),  # a variable set for it
    ("/bin/sh -c 'sudo -H -S -n  -u root /bin/sh -c '\"'\"'/usr/bin/python3'\"'\"' && sleep 0'", b'module'),  # become
    ("/bin/sh -c 'python3 && sleep 0'", b'module'),  # not an absolute path
    ("/bin/sh -c '/usr/bin/python3 /tmp/x.py && sleep 0'", b'module'),
    ("/bin/bash -c '/usr/bin/python3 && sleep 0'", b'module'),  # not the shell of the option
])
def test_anything_but_a_bare_pipelined_interpreter_runs_as_a_shells_script(connection, cmd, in_data):
    # Ansible's EXECUTABLE -c 'SCRIPT' (shlex.quote): the agent runs EXECUTABLE, not a shell that runs it,
    # and the shell ends with its null command where Ansible has it start sleep.
    connection().exec_command(cmd, in_data=in_data)
    executable, script = cmd.split(' -c ', 1)
    script = shlex.split(script)[0]
    assert script.endswith(' && sleep 0')
    assert FakeChannel.opened[0].calls[1] == ('exec', [executable, '-c', script[:-len('sleep 0')] + ':'], in_data,
                                              7200.0)


@pytest.mark.parametrize('script', [
    'chmod u+rwx /nonexistent/x && sleep 0',
    'rm -f -r /nonexistent/x/ > /dev/null 2>&1 && sleep 0',
    'false && sleep 0',
    'echo a; exit 3 && sleep 0',
    'echo a # a comment && sleep 0',
    "echo 'a && sleep 0",  # unbalanced: the same syntax error
])
def test_the_null_command_for_sleep_0_changes_neither_output_nor_exit_status(connection, script):
    connection().exec_command('/bin/sh -c ' + shlex.quote(script))
    argv = FakeChannel.opened[0].calls[1][1]
    assert argv == ['/bin/sh', '-c', script[:-len('sleep 0')] + ':']
    # Both run for real by the shell that Ansible names: only the program started differs.
    ran = [subprocess.run(each, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for each in (argv, ['/bin/sh', '-c', script])]
    assert [(done.returncode, done.stdout, done.stderr) for done in ran] == [
        (ran[1].returncode, ran[1].stdout, ran[1].stderr)] * 2


@pytest.mark.parametrize('cmd', [
    "/bin/sh -c 'sleep() { echo b; }; true && sleep 0'",  # sleep may be a function
    "/bin/sh -c 'cat <<EOF\nc\nEOF && sleep 0'",  # the line may be in a here-document
    "/usr/bin/fish -c 'true && sleep 0'",  # not a POSIX shell: no null command to count on
    "/bin/sh -c 'sleep 0'",  # the sleep is the command
    "/bin/sh -c 'true && sleep 1'",
])
def test_sleep_stays_where_the_null_command_may_not_mean_the_same(connection, cmd):
    connection().exec_command(cmd)
    assert FakeChannel.opened[0].calls[1][1] == shlex.split(cmd)


@pytest.mark.parametrize('cmd', [
    "/bin/sh -c '/usr/bin/python3 && sleep 0",  # unbalanced quotes
    "/bin/sh -c 'sudo -u root /bin/sh -c '\\''/usr/bin/python3'\\'' && sleep 0'",  # not shlex.quote's quoting
    "/bin/sh -c \"$HOME/x\"",  # the outer shell would expand it
    "/bin/sh -c 'a' ; rm -rf /tmp/x",  # more than one command
    "sh -c 'true'",  # looked up in PATH by the outer shell
    "echo 'a b' | wc -w",
])
def test_a_command_line_that_is_not_exactly_ansibles_runs_through_the_shell_as_written(connection, cmd):
    connection().exec_command(cmd, in_data=b'x')
    assert FakeChannel.opened[0].calls[1] == ('exec', ['/bin/sh', '-c', cmd], b'x', 7200.0)


def test_the_warm_python_is_an_option(connection):
    cmd = "/bin/sh -c '/usr/bin/python3 && sleep 0'"
    connection(ansible_negotiator_warm_python=False).exec_command(cmd, in_data=b'module')
    assert FakeChannel.opened[0].calls[1] == ('exec', ['/bin/sh', '-c', '/usr/bin/python3 && :'], b'module', 7200.0)


def ansiballz(date_time, style='2.19'):
    """A pipelined module as AnsiballZ makes it: a program with its zip file in base64, stamped ``date_time``."""
    import base64
    import io
    import zipfile
    written = io.BytesIO()
    with zipfile.ZipFile(written, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, text in (('ansible/__init__.py', ''), ('ansible/module_utils/__init__.py', ''),
                           ('ansible/module_utils/basic.py', 'X = 1\n'), ('ansible/modules/__init__.py', ''),
                           ('ansible/modules/ping.py', 'print(1)\n'), ('ansible/module_utils/data.json', '{}')):
            archive.writestr(zipfile.ZipInfo(name, date_time=date_time), text)
    encoded = base64.b64encode(written.getvalue()).decode()
    if style == '2.19':
        return ("def _ansiballz_main(zip_data): pass\n_ansiballz_main(\nzip_data='%s',\n)\n" % encoded).encode()
    return ('ZIPDATA = """%s"""\n' % '\n'.join(encoded[i:i + 76] for i in range(0, len(encoded), 76))).encode()


def test_a_modules_own_libraries_are_sent_to_preload_the_same_for_every_run_of_the_controller(connection):
    import io
    import zipfile
    cmd = "/bin/sh -c '/usr/bin/python3 && sleep 0'"
    plugin = connection()
    for date_time, style in (((2026, 12, 1, 6, 42, 26), '2.19'), ((2026, 12, 1, 7, 0, 1), '2.19'),
                             ((2025, 1, 2, 3, 4, 6), 'older')):
        plugin.exec_command(cmd, in_data=ansiballz(date_time, style))
    calls = FakeChannel.opened[0].calls[1:]
    assert [call[4] for call in calls] == ['warm'] * 3
    preloads = [call[5] for call in calls]
    assert preloads[0].modules == ('ansible.module_utils', 'ansible.module_utils.basic')
    assert len({preload.key for preload in preloads}) == 1  # the time each run stamps is not part of it
    archive = zipfile.ZipFile(io.BytesIO(preloads[0].archive))
    assert sorted(archive.namelist())[-1] == 'ansible/modules/ping.py'  # whole: the module is found beside them
    assert {entry.date_time for entry in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_preloading_is_an_option_and_a_program_without_a_zip_file_runs_warm_without(connection):
    cmd = "/bin/sh -c '/usr/bin/python3 && sleep 0'"
    module = ansiballz((2026, 12, 1, 6, 42, 26))
    connection(ansible_negotiator_preload_module_utils=False).exec_command(cmd, in_data=module)
    connection().exec_command(cmd, in_data=b"zip_data='bm90IGEgemlw'")  # base64, but not of a zip file
    assert FakeChannel.opened[0].calls[1] == ('exec', ['/usr/bin/python3'], module, 7200.0, 'warm')
    assert FakeChannel.opened[1].calls[1][4:] == ('warm',)


def test_the_command_timeout_and_the_shell_are_options(connection):
    connection(ansible_negotiator_command_timeout=30, ansible_negotiator_shell='/bin/bash').exec_command('true')
    assert FakeChannel.opened[0].calls[1] == ('exec', ['/bin/bash', '-c', 'true'], None, 30.0)


def test_a_command_ended_by_a_signal_has_the_status_a_shell_gives_it(connection):
    plugin = connection()
    plugin._connect()
    FakeChannel.opened[0].script['exec'] = ExecuteResult('exec', [], None, signal=9)
    assert plugin.exec_command('sleep 9')[0] == 137


def test_an_agent_that_does_not_answer_makes_the_host_unreachable_with_negotiators_message(connection, ansible,
                                                                                          monkeypatch):
    monkeypatch.setattr(FakeChannel, 'hello_error', ChannelNotFound('the channel socket of web-1 does not exist'))
    with pytest.raises(ansible.errors.AnsibleConnectionFailure, match='the channel socket of web-1 does not exist'):
        connection().exec_command('true')
    assert FakeChannel.opened[0].closed


def test_the_exec_switch_off_fails_the_task_with_the_agents_message(connection, ansible):
    plugin = connection()
    plugin._connect()
    FakeChannel.opened[0].script['exec'] = CommandNotAllowed('guest refuses exec: switch it on with --allow-exec')
    with pytest.raises(ansible.errors.AnsibleError, match='--allow-exec') as raised:
        plugin.exec_command('true')
    assert not isinstance(raised.value, ansible.errors.AnsibleConnectionFailure)


def test_a_connection_lost_under_a_call_is_unreachable_and_the_next_call_connects_again(connection, ansible):
    plugin = connection()
    plugin._connect()
    FakeChannel.opened[0].script['exec'] = ConnectionClosed('the guest stopped')
    with pytest.raises(ansible.errors.AnsibleConnectionFailure, match='the guest stopped'):
        plugin.exec_command('true')
    assert FakeChannel.opened[0].closed
    assert plugin.exec_command('true')[0] == 0
    assert len(FakeChannel.opened) == 2


def test_another_error_of_negotiator_fails_the_task(connection, ansible):
    plugin = connection()
    plugin._connect()
    FakeChannel.opened[0].script['exec'] = InvalidParams('timeout must be above 0')
    with pytest.raises(ansible.errors.AnsibleError, match='timeout must be above 0') as raised:
        plugin.exec_command('true')
    assert not isinstance(raised.value, ansible.errors.AnsibleConnectionFailure)


def test_an_interrupted_call_closes_the_channel_so_that_the_guest_cancels_the_command(connection):
    plugin = connection()
    plugin._connect()
    FakeChannel.opened[0].script['exec'] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        plugin.exec_command('sleep 60')
    assert FakeChannel.opened[0].closed


def test_files_go_both_ways_over_push_and_pull(connection, tmp_path):
    plugin = connection()
    source = tmp_path / 'in.bin'
    source.write_bytes(b'\x00\xff' * 10)
    plugin.put_file(str(source), '/tmp/in.bin')
    plugin.fetch_file('/etc/hostname', str(tmp_path / 'out'))
    assert FakeChannel.opened[0].calls[1:] == [('push', b'\x00\xff' * 10, '/tmp/in.bin'), ('pull', '/etc/hostname')]
    assert (tmp_path / 'out').read_bytes() == b'pulled from /etc/hostname'


def test_a_missing_local_file_is_ansibles_file_not_found(connection, ansible, tmp_path):
    with pytest.raises(ansible.errors.AnsibleFileNotFound):
        connection().put_file(str(tmp_path / 'missing'), '/tmp/x')


@pytest.mark.parametrize('method, pipelined', [('sudo', True), ('su', False)])
def test_become_without_a_password_runs_as_ansible_built_it_and_a_password_is_refused(connection, ansible, method,
                                                                                     pipelined):
    plugin = connection()
    become = ansible.loader.become_loader.get(method)
    become.set_options(direct={'become_user': 'nobody'})
    plugin.set_become_plugin(become)
    command = become.build_become_command('id -un', plugin._shell)
    plugin.exec_command(command, in_data=b'module')
    assert FakeChannel.opened[0].calls[1][1] == ['/bin/sh', '-c', command]
    assert plugin.is_pipelining_enabled() is pipelined  # su never pipelines: Ansible's own choice
    become.set_options(direct={'become_user': 'nobody', 'become_pass': 'secret'})
    become.build_become_command('id -un', plugin._shell)
    with pytest.raises(ansible.errors.AnsibleError, match='password prompt of %s' % method):
        plugin.exec_command(command)


def test_ansible_doc_lists_the_plugin():
    listed = subprocess.run([os.path.join(os.path.dirname(sys.executable), 'ansible-doc'), '-t', 'connection', '-l'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    assert PLUGIN.encode() in listed.stdout


def test_the_collection_and_its_package_have_negotiators_version():
    with open(os.path.join(COLLECTION, 'galaxy.yml')) as handle:
        assert 'version: %s\n' % __version__ in handle.read()
    with open(os.path.join(ROOT, 'negotiator-ansible', 'pyproject.toml')) as handle:
        text = handle.read()
    assert 'version = "%s"\n' % __version__ in text
    assert '"negotiator-host == %s"' % __version__ in text

