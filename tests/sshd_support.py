"""
A real OpenSSH server for one test module: Debian's ``sshd`` (``scripts/setup-host`` installs
it, never as a service), on a free port of 127.0.0.1, with a host key and a client key made
for the test in a temporary directory, root login by key only.

Why not the machine's own sshd: there is none on the test machines, and the test must not
depend on, or change, how this machine is reached. The client side is an ssh configuration
file (:attr:`Sshd.client_config`: the port, the key, the known host key, no prompts), so a test
passes ``['ssh', '-F', sshd.client_config]`` wherever ssh options go. The authorized key sets
the ``PATH`` of the commands it runs so that they find the tests' ``negotiator-host`` (the
virtualenv's ``bin`` first), as an administrator would install it in ``/usr/local/bin``.
"""

import os
import shutil
import socket
import subprocess
import tempfile

from waiting import wait_until

__all__ = ('Sshd', 'SSHD')

SSHD = '/usr/sbin/sshd'

_SERVER_CONFIG = '''\
Port %(port)d
ListenAddress 127.0.0.1
HostKey %(directory)s/host_key
PidFile %(directory)s/sshd.pid
AuthorizedKeysFile %(directory)s/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment yes
PrintMotd no
'''

_CLIENT_CONFIG = '''\
Host *
    Port %(port)d
    IdentityFile %(directory)s/client_key
    IdentitiesOnly yes
    UserKnownHostsFile %(directory)s/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
'''


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _keygen(path: str) -> str:
    """A new ed25519 key pair at ``path``; the public key's line."""
    subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'negotiator-test', '-f', path], check=True)
    with open(path + '.pub') as handle:
        return handle.read().strip()


class Sshd(object):
    """``sshd -D`` with a configuration, keys and a port of its own; :meth:`stop` ends it and removes them."""

    def __init__(self, path_first: str) -> None:
        self.directory = tempfile.mkdtemp(prefix='negotiator-sshd-')
        self.port = _free_port()
        values = {'port': self.port, 'directory': self.directory}
        host_key = _keygen(os.path.join(self.directory, 'host_key'))
        client_key = _keygen(os.path.join(self.directory, 'client_key'))
        path = '%s:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' % path_first
        self._write('authorized_keys', 'environment="PATH=%s" %s\n' % (path, client_key))
        self._write('known_hosts', '[127.0.0.1]:%d %s\n' % (self.port, host_key))
        self.server_config = self._write('sshd_config', _SERVER_CONFIG % values)
        self.client_config = self._write('ssh_config', _CLIENT_CONFIG % values)
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.log_path = os.path.join(self.directory, 'sshd.log')
        with open(self.log_path, 'wb') as log:
            self.process = subprocess.Popen([SSHD, '-D', '-e', '-f', self.server_config], stdout=log,
                                            stderr=subprocess.STDOUT)
        if not wait_until(self._listening, timeout=20, interval=0.05):
            self.stop()
            raise RuntimeError('sshd did not listen on port %d: %s' % (self.port, self.log()))

    @property
    def ssh(self):
        """The ssh command that reaches this server (options from :attr:`client_config`)."""
        return ['ssh', '-F', self.client_config]

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        with open(path, 'w') as handle:
            handle.write(text)
        os.chmod(path, 0o600)
        return path

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError('sshd exited with status %s: %s' % (self.process.returncode, self.log()))
        try:
            socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        with open(self.log_path, errors='replace') as handle:
            return handle.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)
