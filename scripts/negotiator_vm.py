#!/usr/bin/env python3
"""
Start and remove throwaway libvirt/QEMU guests for negotiator's end-to-end tests.

Why: negotiator talks to guests over virtio-serial channels, and the only honest test of that is a
real guest. These guests need no disk image: they boot Debian's kernel with a busybox initramfs
(``scripts/build-test-guest``) that mounts the host's ``/`` read-only over 9p, chroots into it and
runs one shell script given on the kernel command line (``negotiator.init=PATH``), then powers
off. The script lives in the guest's work directory ``/var/tmp/negotiator-vm/NAME/``, which the
guest sees at the same path, so the host can also pass files to a running guest through it.

Every guest gets a unique name (``negotiator-test-`` plus a random suffix, or a caller's prefix),
a console log in its work directory and one ``<channel type='unix'>`` per channel name, whose
host-side UNIX socket path libvirt chooses (see :meth:`Guest.channel_path`).

Library use (standard library and ``negotiator_common.channels``, which it takes from the
repository when negotiator-common is not installed; Python 3.6+)::

    import negotiator_vm
    negotiator_vm.ensure_host()
    with negotiator_vm.start_guest('echo hello from the guest') as guest:
        guest.wait_for_console('hello from the guest', timeout=60)

Command line::

    negotiator_vm.py start INIT_SCRIPT [--prefix P] [--channel NAME]... [--memory MIB] [--wait TEXT]
                           [--scratch MIB [--full SIZE]]
    negotiator_vm.py remove NAME...
    negotiator_vm.py list [--prefix P]
    negotiator_vm.py cleanup [--prefix P] [--all]

``start`` prints the guest's name, work directory, console log and channel socket paths;
``remove`` destroys and undefines guests and deletes their work directories; ``list`` shows the
guests whose names start with the prefix; ``cleanup`` removes those whose starting process is gone
(leftovers of a crashed run), but not those kept on purpose (``scripts/demo --keep``); ``--all``:
every one.
"""

import argparse
import collections
import logging
import os
import random
import shlex
import shutil
import socket
import string
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

SCRIPTS = os.path.dirname(os.path.abspath(__file__))

# The channel names and their XML come from negotiator-common. The demo imports this module with
# Debian's python3 before any virtual environment exists: the repository's copy serves then
# (appended to the path, so an installed negotiator-common comes first).
try:
    from negotiator_common.channels import GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNEL, channel_xml
except ImportError:
    sys.path.append(os.path.join(os.path.dirname(SCRIPTS), 'negotiator-common'))
    from negotiator_common.channels import GUEST_TO_HOST_CHANNEL, HOST_TO_GUEST_CHANNEL, channel_xml

__all__ = (
    'DEFAULT_CHANNELS',
    'DEFAULT_PREFIX',
    'DEFAULT_URI',
    'FULL_DIR',
    'SCRATCH_DIR',
    'SCRATCH_SERIAL',
    'WORK_ROOT',
    'Guest',
    'GuestImage',
    'VMError',
    'build_guest',
    'ensure_host',
    'list_guests',
    'owner_pid',
    'remove_guest',
    'remove_stale_guests',
    'start_guest',
    'AGENT_READY',
    'AgentAnswer',
    'agent_guest_files',
    'start_agent_guest',
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

DEFAULT_PREFIX = 'negotiator-test-'
DEFAULT_URI = 'qemu:///system'
DEFAULT_CHANNELS = (HOST_TO_GUEST_CHANNEL, GUEST_TO_HOST_CHANNEL)
#: Parent of the guests' work directories; never a tmpfs in the guest (see test-guest-init).
WORK_ROOT = '/var/tmp/negotiator-vm'

GuestImage = collections.namedtuple('GuestImage', 'kernel initrd')

AgentAnswer = collections.namedtuple('AgentAnswer', 'output tries')
"""What :meth:`Guest.wait_for_agent` got: the line ``negotiator-host --ping`` printed, after how many tries."""

#: A file in a guest's work directory that keeps it from :func:`remove_stale_guests` (:meth:`Guest.keep`).
KEPT_MARK = 'kept'


class VMError(Exception):
    """A test guest could not be set up, started, reached or removed."""


def _run(argv, check=True, timeout=120):
    """Run a command (an argv list, never a shell) and return its CompletedProcess."""
    logger.debug('running %s', argv)
    try:
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VMError('%s failed: %s' % (' '.join(argv), err)) from err
    if check and result.returncode != 0:
        raise VMError('%s failed with exit status %d:\n%s%s' % (
            ' '.join(argv), result.returncode, result.stdout, result.stderr))
    return result


def _virsh(uri, *args, **kw):
    return _run(['virsh', '-q', '-c', uri] + list(args), **kw)


_host_ready = False
_image = None


def ensure_host(force=False):
    """Run ``scripts/setup-host`` (packages, libvirtd) once per process; raise VMError on failure."""
    global _host_ready
    if _host_ready and not force:
        return
    result = _run([os.path.join(SCRIPTS, 'setup-host')], check=False, timeout=1800)
    logger.debug('setup-host said:\n%s', result.stderr)
    if result.returncode != 0:
        raise VMError('scripts/setup-host failed:\n%s%s' % (result.stdout, result.stderr))
    _host_ready = True


def build_guest(force=False):
    """Run ``scripts/build-test-guest`` (once per process) and return a :class:`GuestImage`."""
    global _image
    if _image is not None and not force:
        return _image
    result = _run([os.path.join(SCRIPTS, 'build-test-guest')], check=False, timeout=1800)
    logger.debug('build-test-guest said:\n%s', result.stderr)
    if result.returncode != 0:
        raise VMError('scripts/build-test-guest failed:\n%s%s' % (result.stdout, result.stderr))
    paths = dict(line.split('=', 1) for line in result.stdout.splitlines() if '=' in line)
    try:
        _image = GuestImage(kernel=paths['kernel'], initrd=paths['initrd'])
    except KeyError as err:
        raise VMError('unexpected output of build-test-guest: %r' % result.stdout) from err
    return _image


def _random_suffix(length=8):
    alphabet = string.ascii_lowercase + string.digits
    return ''.join(random.SystemRandom().choice(alphabet) for _ in range(length))


#: The serial number by which the guest's init finds its scratch disk (scripts/test-guest-init).
SCRATCH_SERIAL = 'negotiator-scratch'
#: Where the guest's init mounts the scratch disk, and the small tmpfs asked for with ``full_size``.
SCRATCH_DIR = '/srv'
FULL_DIR = '/srv/full'


def _disk_xml(path):
    """A virtio disk of the raw file ``path``; the host's cache is not flushed (a throwaway guest's disk)."""
    return ("    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='unsafe'/>"
            "<source file=%s/><target dev='vda' bus='virtio'/><serial>%s</serial></disk>\n"
            % (quoteattr(path), SCRATCH_SERIAL))


def _domain_xml(name, image, cmdline, channels, memory_mib, console_log, disk=None):
    channels_xml = ''.join('    %s\n' % channel_xml(channel) for channel in channels)
    if disk is not None:
        channels_xml = _disk_xml(disk) + channels_xml
    return """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/'/><target dir='hostroot'/><readonly/>
    </filesystem>
{channels}    <serial type='file'><source path={log}/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
""".format(name=escape(name), memory=int(memory_mib), kernel=escape(image.kernel),
           initrd=escape(image.initrd), cmdline=escape(cmdline), channels=channels_xml,
           log=quoteattr(console_log))


class Guest(object):
    """A running (or finished) throwaway guest; removes itself when used as a context manager."""

    def __init__(self, name, workdir, uri=DEFAULT_URI):
        self.name = name
        self.workdir = workdir
        self.uri = uri
        self.console_log = os.path.join(workdir, 'console.log')
        self.init_script = os.path.join(workdir, 'init.sh')

    def __repr__(self):
        return 'Guest(%r)' % self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()

    def state(self):
        """The domain's state as ``virsh domstate`` says it (e.g. 'running', 'shut off')."""
        return _virsh(self.uri, 'domstate', self.name).stdout.strip()

    def is_running(self):
        return self.state() == 'running'

    def dumpxml(self):
        return _virsh(self.uri, 'dumpxml', self.name).stdout

    def channel_path(self, name):
        """The host-side UNIX socket of channel ``name`` (libvirt chooses it at each start)."""
        root = ET.fromstring(self.dumpxml())
        for channel in root.findall('./devices/channel'):
            target = channel.find('target')
            source = channel.find('source')
            if target is not None and target.get('name') == name and source is not None:
                path = source.get('path')
                if path:
                    return path
        raise VMError('guest %s has no channel %r with a socket path (is it running?)'
                      % (self.name, name))

    def read_console(self):
        """The console output so far (text; undecodable bytes replaced)."""
        try:
            with open(self.console_log, 'rb') as handle:
                return handle.read().decode('utf-8', 'replace')
        except (IOError, OSError):
            return ''

    def console_tail(self, lines=40):
        return '\n'.join(self.read_console().splitlines()[-lines:])

    def wait_for_console(self, text, timeout=60.0, interval=0.1):
        """
        Wait until ``text`` appears in the console log and return the log so far.

        Raises VMError with the tail of the log when the timeout expires, or as soon as the
        guest has stopped without printing it.
        """
        deadline = time.monotonic() + timeout
        next_state_check = time.monotonic() + 1.0
        while True:
            output = self.read_console()
            if text in output:
                return output
            now = time.monotonic()
            if now >= deadline:
                raise VMError('guest %s did not print %r within %.1f s; console tail:\n%s'
                              % (self.name, text, timeout, self.console_tail()))
            if now >= next_state_check:
                next_state_check = now + 1.0
                if not self._domain_active():
                    output = self.read_console()
                    if text in output:
                        return output
                    raise VMError('guest %s stopped without printing %r; console tail:\n%s'
                                  % (self.name, text, self.console_tail()))
            time.sleep(interval)

    def _domain_active(self):
        result = _virsh(self.uri, 'domstate', self.name, check=False)
        if result.returncode != 0 and 'failed to connect' in result.stderr.lower():
            # libvirtd is restarting (another test may restart it): the guest runs on meanwhile.
            return True
        return result.returncode == 0 and result.stdout.strip() in ('running', 'paused', 'in shutdown')

    def connect(self, channel, timeout=10.0):
        """
        Connect to the host side of ``channel`` and return the connected ``socket.socket``.

        Retries until ``timeout`` (the socket may not exist yet right after the start). The
        socket takes one client at a time; the caller closes it.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.channel_path(channel))
                return sock
            except (OSError, VMError) as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VMError('cannot connect to channel %r of guest %s: %s'
                                  % (channel, self.name, err)) from err
                time.sleep(0.1)

    def reset(self):
        """Hard-reset the guest (like pressing the reset button): it boots again."""
        _virsh(self.uri, 'reset', self.name)

    def destroy(self):
        """Power the guest off at once (no error when it is not running)."""
        result = _virsh(self.uri, 'destroy', self.name, check=False)
        if result.returncode != 0 and self._domain_active():
            raise VMError('virsh destroy %s failed: %s' % (self.name, result.stderr.strip()))

    def remove(self):
        """Destroy and undefine the guest and delete its work directory; safe to call twice."""
        remove_guest(self.name, uri=self.uri)

    def keep(self):
        """Keep this guest from :func:`remove_stale_guests` once its starting process is gone."""
        open(os.path.join(self.workdir, KEPT_MARK), 'w').close()

    def wait_for_agent(self, bindir, timeout=120.0, interval=0.5, socket_path=None):
        """
        Wait until the agent in this guest answers ``negotiator-host --ping`` (the one in
        ``bindir``; with ``socket_path``, through the host daemon listening there, which holds
        the guest's channel) and return an :class:`AgentAnswer`.

        Why the CLI: the demo waits from an interpreter that has no negotiator installed, the
        tests and the benchmark from its virtual environment, and all of them wait for what a
        user's first call needs. The agent's Python starts slowly (over 9p, under TCG), hence
        the retries. Raises VMError with the console's tail at the timeout, or as soon as the
        guest has stopped.
        """
        argv = [os.path.join(bindir, 'negotiator-host'), '--connect', self.uri, '--ping', '--timeout', '3', self.name]
        if socket_path is not None:
            argv[1:1] = ['--socket', socket_path]
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            tries += 1
            result = _run(argv, check=False, timeout=30)
            if result.returncode == 0:
                return AgentAnswer(result.stdout.strip(), tries)
            if time.monotonic() >= deadline:
                raise VMError('the agent in %s did not answer within %.0f s (last: %s); console tail:\n%s'
                              % (self.name, timeout, (result.stderr or result.stdout).strip(), self.console_tail()))
            if not self._domain_active():
                raise VMError('guest %s stopped before its agent answered; console tail:\n%s'
                              % (self.name, self.console_tail()))
            time.sleep(interval)


def remove_guest(name, uri=DEFAULT_URI):
    """Destroy and undefine guest ``name`` and delete its work directory, whatever is left."""
    deadline = time.monotonic() + 60
    while True:
        _virsh(uri, 'destroy', name, check=False)
        result = _virsh(uri, 'undefine', name, check=False)
        if result.returncode == 0:
            break
        state = _virsh(uri, 'domstate', name, check=False)
        if state.returncode != 0 and ('failed to get domain' in state.stderr or 'not found' in state.stderr.lower()):
            break  # gone already
        # libvirtd may be restarting (a test restarts it): try again rather than leave a guest running.
        if time.monotonic() >= deadline:
            raise VMError('cannot remove guest %s: %s' % (name, (state.stderr or result.stderr).strip()))
        time.sleep(1)
    workdir = os.path.join(WORK_ROOT, name)
    if os.path.isdir(workdir):
        shutil.rmtree(workdir, ignore_errors=True)


def list_guests(prefix=DEFAULT_PREFIX, uri=DEFAULT_URI):
    """Names of all defined guests (running or not) whose names start with ``prefix``."""
    result = _virsh(uri, 'list', '--all', '--name')
    return sorted(line.strip() for line in result.stdout.splitlines()
                  if line.strip().startswith(prefix))


def owner_pid(name):
    """The pid of the process that started guest ``name`` (recorded in its work directory), or None."""
    try:
        with open(os.path.join(WORK_ROOT, name, 'owner.pid')) as handle:
            return int(handle.read().strip())
    except (IOError, OSError, ValueError):
        return None


def _owner_alive(name):
    """Whether another process that started guest ``name`` still lives (this one's guests are stale to it)."""
    pid = owner_pid(name)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_guests(prefix=DEFAULT_PREFIX, uri=DEFAULT_URI, all_owners=False):
    """
    Remove guests (and work directories) left by earlier runs and return their names.

    By default a guest whose starting process is still alive (another test session or demo
    running at the same time, whose work directory may not be a defined guest yet) is kept, and
    so is a guest kept on purpose (:meth:`Guest.keep`); ``all_owners=True`` removes every guest
    with the prefix.
    """
    def stale(name):
        return all_owners or not (_owner_alive(name) or os.path.exists(os.path.join(WORK_ROOT, name, KEPT_MARK)))

    names = [name for name in list_guests(prefix, uri) if stale(name)]
    for name in names:
        logger.info('removing stale guest %s', name)
        remove_guest(name, uri=uri)
    defined = set(list_guests(prefix, uri))
    if os.path.isdir(WORK_ROOT):
        for entry in os.listdir(WORK_ROOT):
            if entry.startswith(prefix) and entry not in defined and stale(entry):
                shutil.rmtree(os.path.join(WORK_ROOT, entry), ignore_errors=True)
    return names


def start_guest(init_script, name_prefix=DEFAULT_PREFIX, channels=DEFAULT_CHANNELS,
                memory_mib=384, uri=DEFAULT_URI, image=None, kernel_args=(), files=None,
                scratch_mib=None, full_size=None):
    """
    Define and start a guest that runs ``init_script`` (shell text for ``/bin/sh``) and return a
    :class:`Guest`.

    The guest runs the script chrooted into the host's root filesystem (read-only; /tmp, /run
    and /var/log are tmpfs), then powers off; the script finds its work directory in
    ``$NEGOTIATOR_VM_WORKDIR``. ``files`` maps file names to text written into the work
    directory before the start (e.g. a Python program for the script to run). ``channels`` are
    the virtio-serial port names (add ``'org.qemu.guest_agent.0'`` for the QEMU agent).
    ``image`` defaults to :func:`build_guest`; ``kernel_args`` are appended to the kernel
    command line. The caller must remove the guest (use it as a context manager).

    ``scratch_mib`` gives the guest a scratch disk of that size (a sparse raw file in its work
    directory, removed with it), which the guest's init formats and mounts on :data:`SCRATCH_DIR`:
    the guest's other writable places are memory. ``full_size`` (tmpfs syntax, e.g. ``'8m'``,
    with a scratch disk only) adds a tmpfs of that size on :data:`FULL_DIR`, a place to fill up.
    """
    if full_size is not None and not scratch_mib:
        raise VMError('full_size needs a scratch disk (its mount point %s is on it)' % FULL_DIR)
    if image is None:
        image = build_guest()
    name = name_prefix + _random_suffix()
    workdir = os.path.join(WORK_ROOT, name)
    os.makedirs(workdir)
    os.chmod(workdir, 0o755)
    guest = Guest(name, workdir, uri=uri)
    with open(os.path.join(workdir, 'owner.pid'), 'w') as handle:
        handle.write('%d\n' % os.getpid())
    for filename, text in sorted((files or {}).items()):
        with open(os.path.join(workdir, filename), 'w') as handle:
            handle.write(text)
    with open(guest.init_script, 'w') as handle:
        handle.write('export NEGOTIATOR_VM_WORKDIR=%s\n' % shlex.quote(workdir))
        handle.write(init_script)
        if not init_script.endswith('\n'):
            handle.write('\n')
    kernel_args = list(kernel_args)
    disk = None
    if scratch_mib:
        disk = os.path.join(workdir, 'scratch.img')
        with open(disk, 'wb') as handle:
            handle.truncate(int(scratch_mib) * 1024 * 1024)
        if full_size is not None:
            kernel_args.append('negotiator.full=%s' % full_size)
    cmdline = ' '.join(['console=ttyS0', 'negotiator.init=' + guest.init_script, 'quiet'] + kernel_args)
    xml_path = os.path.join(workdir, 'domain.xml')
    with open(xml_path, 'w') as handle:
        handle.write(_domain_xml(name, image, cmdline, channels, memory_mib, guest.console_log, disk))
    try:
        _virsh(uri, 'define', xml_path)
        _virsh(uri, 'start', name)
    except VMError:
        guest.remove()
        raise
    logger.info('started guest %s (console log %s)', name, guest.console_log)
    return guest


AGENT_READY = 'negotiator-agent-guest: ready'
"""What an agent guest prints on its console once supervisord (and so the daemon) has started."""


def agent_guest_files(bindir, commands=None, supervised=True, daemon_args=()):
    """
    The init script and files of a guest that runs ``negotiator-guest --daemon``.

    ``bindir`` is the ``bin`` folder of a virtual environment on the host that has
    negotiator-guest installed (the guest runs it from the shared root). ``commands`` maps
    command names to script text: they are installed, executable, in a commands directory of
    the guest. With ``supervised`` (the default) the daemon runs under Debian's supervisord,
    which restarts it when it dies, as in production; the daemon's log is copied to the
    console. Returns ``(init_script, files)`` for :func:`start_guest`.
    """
    daemon = ' '.join(shlex.quote(a) for a in [os.path.join(bindir, 'negotiator-guest'), '--daemon',
                                                '--commands-dir', '/tmp/negotiator-commands'] + list(daemon_args))
    files = {}
    install = ['mkdir -p -m 755 /tmp/negotiator-commands']
    for name, text in sorted((commands or {}).items()):
        files['command-' + name] = text
        install.append('install -m 755 "$NEGOTIATOR_VM_WORKDIR/command-%s" /tmp/negotiator-commands/%s'
                       % (name, name))
    if supervised:
        files['supervisord.conf'] = '\n'.join([
            '[supervisord]', 'nodaemon=true', 'logfile=/tmp/supervisord.log', 'pidfile=/tmp/supervisord.pid',
            'childlogdir=/tmp', '',
            '[unix_http_server]', 'file=/tmp/supervisor.sock', '',
            '[rpcinterface:supervisor]',
            'supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface', '',
            '[supervisorctl]', 'serverurl=unix:///tmp/supervisor.sock', '',
            '[program:negotiator-guest]', 'command=' + daemon, 'autostart=true', 'autorestart=true',
            'startsecs=0', 'stopwaitsecs=5', 'redirect_stderr=true',
            'stdout_logfile=/tmp/negotiator-guest.log', 'stdout_logfile_maxbytes=0', '']) + '\n'
        run = ['touch /tmp/negotiator-guest.log', 'tail -F /tmp/negotiator-guest.log 2>/dev/null &',
               'echo %s' % shlex.quote(AGENT_READY),
               'exec supervisord -c "$NEGOTIATOR_VM_WORKDIR/supervisord.conf"']
    else:
        run = ['echo %s' % shlex.quote(AGENT_READY), 'exec ' + daemon]
    return '\n'.join(install + run) + '\n', files


def start_agent_guest(bindir, commands=None, supervised=True, daemon_args=(), **kwargs):
    """
    Start a guest that runs ``negotiator-guest --daemon`` (see :func:`agent_guest_files`) and
    wait until its init script has started it; other arguments go to :func:`start_guest`.
    The daemon itself needs a few seconds more to start (Python over 9p under TCG): callers
    wait for its first answer with :meth:`Guest.wait_for_agent`.
    """
    boot_timeout = kwargs.pop('boot_timeout', 90)
    init_script, files = agent_guest_files(bindir, commands, supervised, daemon_args)
    files.update(kwargs.pop('files', None) or {})
    guest = start_guest(init_script, files=files, **kwargs)
    try:
        guest.wait_for_console(AGENT_READY, timeout=boot_timeout)
    except VMError:
        guest.remove()
        raise
    return guest


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='negotiator_vm.py', description='Throwaway libvirt guests for negotiator tests.')
    parser.add_argument('--uri', default=DEFAULT_URI, help='libvirt URI (default %(default)s)')
    parser.add_argument('-v', '--verbose', action='store_true', help='log what is done')
    commands = parser.add_subparsers(dest='command')
    start = commands.add_parser('start', help='build if needed and start a guest')
    start.add_argument('init_script', help="file with the shell script the guest runs ('-': stdin)")
    start.add_argument('--prefix', default=DEFAULT_PREFIX, help='guest name prefix')
    start.add_argument('--channel', action='append', dest='channels', metavar='NAME',
                       help='virtio-serial channel name (repeatable; default: %s)'
                       % ' '.join(DEFAULT_CHANNELS))
    start.add_argument('--memory', type=int, default=384, help='MiB (default %(default)s)')
    start.add_argument('--scratch', type=int, metavar='MIB', help='a scratch disk of MIB mounted on %s' % SCRATCH_DIR)
    start.add_argument('--full', metavar='SIZE', help='with --scratch: a tmpfs of SIZE (e.g. 8m) on %s' % FULL_DIR)
    start.add_argument('--wait', metavar='TEXT', help='wait until the console shows TEXT')
    start.add_argument('--timeout', type=float, default=120.0, help='for --wait (seconds)')
    remove = commands.add_parser('remove', help='destroy and undefine guests')
    remove.add_argument('names', nargs='+')
    for command in ('list', 'cleanup'):
        sub = commands.add_parser(command, help='list guests' if command == 'list'
                                  else 'remove leftover guests (whose starting process is gone, unless kept)')
        sub.add_argument('--prefix', default=DEFAULT_PREFIX, help='guest name prefix')
        if command == 'cleanup':
            sub.add_argument('--all', action='store_true',
                             help='also guests whose starting process still runs, and kept ones')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(message)s')
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command == 'start':
            if args.init_script == '-':
                script = sys.stdin.read()
            else:
                with open(args.init_script) as handle:
                    script = handle.read()
            ensure_host()
            guest = start_guest(script, name_prefix=args.prefix,
                                channels=tuple(args.channels or DEFAULT_CHANNELS),
                                memory_mib=args.memory, uri=args.uri,
                                scratch_mib=args.scratch, full_size=args.full)
            print('name=%s' % guest.name)
            print('workdir=%s' % guest.workdir)
            print('console_log=%s' % guest.console_log)
            for channel in args.channels or DEFAULT_CHANNELS:
                print('channel %s=%s' % (channel, guest.channel_path(channel)))
            if args.wait:
                guest.wait_for_console(args.wait, timeout=args.timeout)
                print('console shows %r' % args.wait)
        elif args.command == 'remove':
            for name in args.names:
                remove_guest(name, uri=args.uri)
                print('removed %s' % name)
        elif args.command == 'list':
            for name in list_guests(args.prefix, uri=args.uri):
                print(name)
        elif args.command == 'cleanup':
            names = remove_stale_guests(args.prefix, uri=args.uri, all_owners=args.all)
            print('removed %d guest(s)%s' % (len(names), ': ' + ' '.join(names) if names else ''))
    except VMError as err:
        print('negotiator_vm.py: error: %s' % err, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
