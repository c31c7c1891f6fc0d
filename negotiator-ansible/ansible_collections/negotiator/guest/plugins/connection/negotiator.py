"""
The connection plugin ``negotiator.guest.negotiator``: Ansible's tasks in a KVM/QEMU guest,
through negotiator's agent over virtio-serial (no network, no SSH in the guest).

Why a plugin of its own rather than ``community.libvirt.libvirt_qemu``: negotiator's ``exec``
takes standard input (so Ansible pipelines its modules: one process in the guest per task instead
of several), streams files both ways under flow control instead of a base64 round trip per chunk,
never cuts output short, and bounds every call by a timeout. Everything goes through
negotiator-host's Python API (:class:`negotiator_host.GuestChannel`): through the host daemon
when it serves the guest, directly on the guest's channel otherwise, or through ``ssh HYPERVISOR
negotiator-host --bridge GUEST`` for a guest on another machine.
"""

import base64
import binascii
import io
import re
import shlex
import zipfile

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from negotiator_common.errors import (
    ChannelError, CommandNotAllowed, CommandTimedOut, NegotiatorError,
)
from negotiator_common.exit_status import exit_status_of_result
from negotiator_common.preload import Preload
from negotiator_host import GuestChannel

DOCUMENTATION = r"""
name: negotiator
short_description: Run tasks in a KVM/QEMU guest through negotiator's agent, without a network
description:
  - Runs Ansible's tasks in a libvirt guest through negotiator's agent over virtio-serial, from
    the hypervisor (through the host daemon when it serves the guest) or from another machine
    over ssh to the hypervisor.
  - Modules run pipelined (through standard input, one process in the guest per task); files
    are streamed both ways; output is never cut short.
  - The agent in the guest must allow it, C(negotiator-guest --daemon --allow-exec --allow-files).
author: The negotiator developers
version_added: "0.1.0"
requirements:
  - negotiator-host (the Python package) in the Python that runs Ansible
  - negotiator-guest --daemon --allow-exec --allow-files in the guest
options:
  remote_addr:
    description:
      - The guest's libvirt name.
    default: inventory_hostname
    type: string
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_negotiator_guest
  uri:
    description:
      - The libvirt URI of the hypervisor's guests (default C($LIBVIRT_DEFAULT_URI), else
        C(qemu:///system)); used only to find the guest's channel when no host daemon serves it.
    type: string
    vars:
      - name: ansible_libvirt_uri
      - name: ansible_negotiator_uri
  hypervisor:
    description:
      - The hypervisor that runs the guest, C([USER@]HOST), when it is not this machine; reached
        with C(ssh HOST negotiator-host --bridge GUEST) (ssh's own configuration and keys apply).
    type: string
    env:
      - name: NEGOTIATOR_HYPERVISOR
    vars:
      - name: ansible_negotiator_hypervisor
  ssh:
    description:
      - With O(hypervisor), the ssh command and its options, split as a shell would (no shell
        runs it), for example C(ssh -p 2222 -F ~/.ssh/negotiator.conf).
    type: string
    default: ssh
    env:
      - name: NEGOTIATOR_SSH
    vars:
      - name: ansible_negotiator_ssh
  socket:
    description:
      - The host daemon's local socket (default C($NEGOTIATOR_HOST_SOCKET), else
        C(/run/negotiator/host.sock)).
    type: string
    vars:
      - name: ansible_negotiator_socket
  timeout:
    description:
      - Seconds that connecting to the agent may take; a guest whose agent does not answer in
        that time is unreachable.
    type: integer
    default: 10
    ini:
      - section: defaults
        key: timeout
    env:
      - name: ANSIBLE_TIMEOUT
    vars:
      - name: ansible_negotiator_timeout
  command_timeout:
    description:
      - Seconds that one command (a module, a file's transfer) may run in the guest before the
        agent kills it; 0 for the longest that the agent allows (its C(max_timeout), a day by
        default). A task's own C(timeout) keyword ends it sooner (the agent kills its command).
    type: integer
    default: 0
    env:
      - name: NEGOTIATOR_COMMAND_TIMEOUT
    vars:
      - name: ansible_negotiator_command_timeout
  shell:
    description:
      - The program in the guest that runs Ansible's command lines, as C(SHELL -c LINE).
    type: string
    default: /bin/sh
    vars:
      - name: ansible_negotiator_shell
  pipelining:
    description:
      - Send modules through standard input (one process in the guest per module) instead of
        copying them into a temporary file first. On by default, since the agent has no terminal and so
        sudo's requiretty never applies.
    type: boolean
    default: true
    env:
      - name: ANSIBLE_PIPELINING
    ini:
      - section: defaults
        key: pipelining
      - section: connection
        key: pipelining
    vars:
      - name: ansible_pipelining
  warm_python:
    description:
      - Run a pipelined module (without C(become)) in a process that the agent forks from a
        Python that has already imported its standard library, instead of in a new interpreter
        (seconds sooner per task in an emulated guest). The first task after the agent starts
        pays for that interpreter's imports once. Where the agent does not offer it (older than
        it, or the interpreter cannot be warm), the module runs in a new interpreter as usual.
    type: boolean
    default: true
    env:
      - name: NEGOTIATOR_WARM_PYTHON
    vars:
      - name: ansible_negotiator_warm_python
  preload_module_utils:
    description:
      - With O(warm_python), also send the module's own libraries (the C(module_utils) in its
        zip file) for the agent to import once, in a warm Python kept for that content, so
        that the same module's next tasks start with them imported (about a second sooner per
        task in an emulated guest). A module whose libraries start a thread as they are imported is
        run without.
    type: boolean
    default: true
    env:
      - name: NEGOTIATOR_PRELOAD_MODULE_UTILS
    vars:
      - name: ansible_negotiator_preload_module_utils
"""

display = Display()

LONGEST_COMMAND = 24 * 3600.0
"""Seconds for a command when the agent announces no ``max_timeout`` (the agent's own default)."""


def pipelined_interpreter(cmd, shell):
    """
    The Python interpreter of ``cmd`` when it is a pipelined module's command line and nothing
    else, as Ansible makes it: ``SHELL -c 'PYTHON && sleep 0'`` with ``PYTHON`` an absolute path;
    else None. Anything more (``become``, variables set before the interpreter, arguments) is
    not a bare interpreter, and runs through the shell as written.
    """
    try:
        outer = shlex.split(cmd)
        inner = shlex.split(outer[2]) if len(outer) == 3 and outer[:2] == [shell, '-c'] else None
    except ValueError:  # unbalanced quotes: not Ansible's
        return None
    if inner is not None and len(inner) == 4 and inner[1:] == ['&&', 'sleep', '0'] and inner[0].startswith('/'):
        return inner[0]
    return None


def without_outer_shell(cmd):
    """
    The argv of ``cmd`` without its outer shell, when ``cmd`` is ``EXECUTABLE -c 'SCRIPT'`` exactly
    as Ansible builds its commands (``EXECUTABLE + ' -c ' + shlex.quote(SCRIPT)``, EXECUTABLE an
    absolute path): a shell given that line would only take the quotes off and run EXECUTABLE,
    so the agent runs ``[EXECUTABLE, '-c', SCRIPT]`` itself and the guest starts one shell, not
    two. Else None: anything the outer shell would expand runs through it as written.
    """
    try:
        words = shlex.split(cmd)
    except ValueError:  # unbalanced quotes: not Ansible's
        return None
    if len(words) == 3 and words[1] == '-c' and words[0].startswith('/') and cmd == ' '.join(
            shlex.quote(word) for word in words):
        return words
    return None


_SLEEP_0 = ' && sleep 0'
"""What Ansible appends to every command it runs through a shell (``_low_level_execute_command``)."""

_POSIX_SHELLS = ('sh', 'bash', 'dash', 'ksh', 'zsh')


def with_null_command_for_sleep_0(argv):
    """
    ``argv`` with the ``sleep 0`` ending Ansible's commands made the shell's null command ``:``,
    when ``argv`` is a POSIX shell's ``[SHELL, '-c', 'SCRIPT && sleep 0']``. Ansible appends it
    against an SSH race that drops a command's last output (ansible#13876), which a channel does
    not have; ``:`` ends with the same status and prints the same nothing, without the guest
    starting a program (0.08 s a command in the emulated test guest: three in each ``copy``).
    Else ``argv`` unchanged, and also where ``sleep`` may not be the program (the script names
    it again, as a function or alias) or the line may be inside a here-document.
    """
    if len(argv) != 3 or argv[1] != '-c' or argv[0].rpartition('/')[2] not in _POSIX_SHELLS:
        return argv
    script = argv[2]
    if not script.endswith(_SLEEP_0) or script.count('sleep') != 1 or '<<' in script:
        return argv
    return [argv[0], '-c', script[:-len(_SLEEP_0)] + ' && :']


def ansibles_shell_command(cmd):
    """
    The argv to run a command line that Ansible built (``EXECUTABLE -c 'SCRIPT'``) as cheaply as
    it runs the same: without its outer shell, and with the null command for ``sleep 0``. None
    for any other line.
    """
    argv = without_outer_shell(cmd)
    return None if argv is None else with_null_command_for_sleep_0(argv)


_ZIP_DATA = re.compile(rb"zip_data='([A-Za-z0-9+/=]+)'|ZIPDATA = \"\"\"([A-Za-z0-9+/=\s]+)\"\"\"")
"""Where an AnsiballZ module holds its zip file, in base64: ansible-core 2.19's keyword, or the older constant."""

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)

_LIBRARIES = {}
"""The libraries of the modules this controller sent, by their zip data (a play uses a few modules)."""


def module_libraries(module):
    """
    The libraries of the pipelined AnsiballZ module ``module`` (bytes) to preload: its zip file
    made again with every entry's time fixed, and the modules of its ``module_utils`` packages;
    None if ``module`` holds no zip file. AnsiballZ stamps each controller run's zip file with
    that run's time: without the fixed time, the same content would make a new warm Python in
    the guest at every run of ``ansible``.
    """
    found = _ZIP_DATA.search(module)
    if found is None:
        return None
    encoded = found.group(1) or found.group(2)
    if encoded not in _LIBRARIES:
        if len(_LIBRARIES) >= 64:
            _LIBRARIES.clear()
        _LIBRARIES[encoded] = _libraries_in(encoded)
    return _LIBRARIES[encoded]


def _libraries_in(encoded):
    try:
        source = zipfile.ZipFile(io.BytesIO(base64.b64decode(re.sub(rb'\s+', b'', encoded))))
        written = io.BytesIO()
        modules = []
        with zipfile.ZipFile(written, 'w', zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(source.namelist()):
                entry = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                archive.writestr(entry, source.read(name))
                parts = name[:-len('.py')].split('/') if name.endswith('.py') else []
                if parts and parts[-1] == '__init__':
                    parts.pop()
                if 'module_utils' in parts and all(part.isidentifier() for part in parts):
                    modules.append('.'.join(parts))
        return Preload(written.getvalue(), modules) if modules else None
    except (ValueError, binascii.Error, zipfile.BadZipFile, NegotiatorError):
        return None  # not an archive this plugin can send: the module imports its libraries itself


class Connection(ConnectionBase):
    """Ansible's connection to one guest: one :class:`GuestChannel`, opened at the first call."""

    transport = 'negotiator.guest.negotiator'
    has_pipelining = True
    has_tty = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel = None

    def _connect(self):
        """Open the channel and say ``hello``: a guest whose agent does not answer is unreachable."""
        if self._connected:
            return self
        guest = self.get_option('remote_addr')
        options = {'uri': self.get_option('uri'), 'socket': self.get_option('socket'),
                   'timeout': float(self.get_option('timeout'))}
        hypervisor = self.get_option('hypervisor')
        if hypervisor:
            options.update(hypervisor=hypervisor, ssh=shlex.split(self.get_option('ssh')))
        display.vvv('negotiator: connecting to %s%s' % (guest, ' on %s' % hypervisor if hypervisor else ''),
                    host=guest)
        channel = GuestChannel(guest, **options)
        try:
            channel.hello()
        except NegotiatorError as exc:
            channel.close()
            raise AnsibleConnectionFailure('negotiator could not reach the agent in %s: %s' % (guest, exc)) from exc
        display.vvv('negotiator: connected to %s (%s)' % (guest, channel.via), host=guest)
        self._channel = channel
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=True):
        """
        Run ``cmd`` (a shell command line, as Ansible makes it) in the guest with ``in_data`` on
        its standard input; return ``(exit status, stdout, stderr)``. The output is collected in
        full (no cap), as over ssh.
        """
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        if sudoable and self.become and self.become.expect_prompt():
            raise AnsibleError('negotiator cannot answer a password prompt of %s (the agent has no terminal): the'
                               ' agent runs as root in the guest, which becomes any user without a password'
                               % self.become.name)
        interpreter = pipelined_interpreter(cmd, self.get_option('shell')) if in_data else None
        warm = interpreter is not None and bool(self.get_option('warm_python'))
        argv = [interpreter] if warm else ansibles_shell_command(cmd) or [self.get_option('shell'), '-c', cmd]
        preload = module_libraries(in_data) if warm and self.get_option('preload_module_utils') else None
        display.vvv('negotiator: exec %s%s' % (cmd, _how_warm(warm, preload)), host=self._guest())
        stdout, stderr = io.BytesIO(), io.BytesIO()
        options = {'preload': preload} if preload is not None else {}
        result = self._call(self._open_channel().exec, argv, input=in_data, warm=warm,
                            timeout=self._command_timeout(), stdout=stdout, stderr=stderr, **options)
        status = exit_status_of_result(result.exit_status, result.signal)
        display.vvv('negotiator: exit status %d after %.2f s in the guest' % (status, result.duration),
                    host=self._guest())
        return status, stdout.getvalue(), stderr.getvalue()

    def put_file(self, in_path, out_path):
        """Copy the controller's file ``in_path`` to ``out_path`` in the guest (streamed)."""
        super().put_file(in_path, out_path)
        display.vvv('negotiator: put %s to %s' % (in_path, out_path), host=self._guest())
        try:
            source = open(in_path, 'rb')
        except FileNotFoundError as exc:
            raise AnsibleFileNotFound('file or module does not exist: %s' % in_path) from exc
        except OSError as exc:
            raise AnsibleError('cannot read %s: %s' % (in_path, exc)) from exc
        with source:
            self._call(self._open_channel().push, source, out_path)

    def fetch_file(self, in_path, out_path):
        """Copy the guest's file ``in_path`` to ``out_path`` on the controller (streamed)."""
        super().fetch_file(in_path, out_path)
        display.vvv('negotiator: fetch %s to %s' % (in_path, out_path), host=self._guest())
        # A path, not an open file: the API writes it without a name until its CRC-32 is checked,
        # so a failed fetch leaves no partial file behind (and says which path, and why).
        self._call(self._open_channel().pull, in_path, out_path)

    def close(self):
        """Close the channel (a command still running in the guest is cancelled there)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._connected = False

    def reset(self):
        """Ansible's ``meta: reset_connection``: the next task connects again."""
        self.close()

    def _guest(self):
        return self.get_option('remote_addr')

    def _open_channel(self):
        if self._channel is None:
            self._connect()
        return self._channel

    def _command_timeout(self):
        """The ``command_timeout`` option, or the longest the agent allows when it is 0."""
        wanted = self.get_option('command_timeout')
        if wanted:
            return float(wanted)
        limits = self._open_channel().agent_info.get('limits')
        longest = limits.get('max_timeout') if isinstance(limits, dict) else None
        return float(longest) if isinstance(longest, (int, float)) and longest > 0 else LONGEST_COMMAND

    def _call(self, method, *args, **kwargs):
        """
        One call on the channel, its errors turned into Ansible's: the agent gone or silent makes
        the host unreachable (negotiator's message kept), a refusal or a failure fails the task.
        Whatever interrupts the call (a task's ``timeout``, Ctrl-C) closes the channel first, so
        that the agent cancels the command in the guest.
        """
        guest = self._guest()
        try:
            return method(*args, **kwargs)
        except CommandNotAllowed as exc:
            raise AnsibleError('negotiator: the agent in %s refused: %s' % (guest, exc.message)) from exc
        except CommandTimedOut as exc:
            raise AnsibleError('negotiator: the command in %s ran past its timeout and was killed: %s'
                               % (guest, exc.message)) from exc
        except ChannelError as exc:
            self.close()
            raise AnsibleConnectionFailure('negotiator lost the agent in %s: %s' % (guest, exc)) from exc
        except NegotiatorError as exc:
            raise AnsibleError('negotiator: %s' % exc) from exc
        except BaseException:
            self.close()
            raise


def _how_warm(warm, preload):
    """What ``-vvv`` says of a command's interpreter."""
    if not warm:
        return ''
    if preload is None:
        return ' (warm Python)'
    return ' (warm Python, %d modules of its own preloaded)' % len(preload.modules)
