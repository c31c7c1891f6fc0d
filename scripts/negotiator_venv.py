"""
A virtual environment with the repository's three packages, for ``scripts/demo`` and
``scripts/benchmark``.

Why: both run negotiator from a virtual environment outside ``/tmp`` (the test guest shares the
host's root filesystem, but its ``/tmp`` is its own, and it runs ``negotiator-guest`` from the
same environment), installed from the repository's folders as users install them (not
editable), and both must reinstall when the sources change and only then (pip takes a minute).
A SHA-256 of the sources and the interpreter, kept in the environment, says when.

Standard library only: the demo and the benchmark call it before any environment exists.
"""

import fcntl
import hashlib
import os
import subprocess

__all__ = ('PACKAGES', 'REPO', 'VenvError', 'check_location', 'ensure_venv', 'sources_digest')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('negotiator-common', 'negotiator-host', 'negotiator-guest')
STAMP = 'negotiator-sources.sha256'
"""The file in the environment that holds the digest of what was installed."""

_SKIP_DIRS = {'__pycache__', 'build', 'dist', '.tox', '.pytest_cache'}


class VenvError(Exception):
    """The virtual environment could not be placed, created or installed; the message says why."""


def check_location(venv):
    """Refuse a virtual environment under ``/tmp``, which the guest does not share."""
    path = os.path.realpath(os.path.abspath(venv))
    if path == '/tmp' or path.startswith('/tmp/'):
        raise VenvError('the virtual environment %s is under /tmp, which the guest does not share'
                        ' (it has a /tmp of its own): choose another place (--venv)' % venv)


def sources_digest(python):
    """SHA-256 over the three packages' sources (names and contents) and the interpreter: a change means reinstall."""
    digest = hashlib.sha256()
    digest.update(('python=%s\n' % os.path.realpath(python)).encode())
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith('.egg-info'))
            for name in sorted(files):
                if name.endswith(('.pyc', '.pyo')):
                    continue
                path = os.path.join(root, name)
                digest.update(('%s\n' % os.path.relpath(path, REPO)).encode())
                with open(path, 'rb') as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


def _run(argv, env=None, timeout=900):
    """Run argv (a list, never a shell); return its output, or raise VenvError with it."""
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                errors='replace', timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VenvError('%s failed: %s' % (' '.join(argv), err)) from err
    if result.returncode != 0:
        raise VenvError('%s failed with exit status %d:\n%s' % (' '.join(argv), result.returncode,
                                                                result.stdout.rstrip()))
    return result.stdout


def _installed_digest(venv):
    try:
        with open(os.path.join(venv, STAMP)) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _usable(venv):
    """Whether the environment's Python imports the packages (a half-made environment does not)."""
    try:
        _run([os.path.join(venv, 'bin', 'python'), '-c', 'import negotiator_host, negotiator_guest'], timeout=120)
    except VenvError:
        return False
    return True


def _install(venv):
    """The three packages, reinstalled whatever pip thinks of their version; their dependencies if missing."""
    env = dict(os.environ)
    env.pop('PYTHONDONTWRITEBYTECODE', None)  # pip compiles the bytecode that the CLIs start from
    pip = [os.path.join(venv, 'bin', 'python'), '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
    sources = [os.path.join(REPO, package) for package in PACKAGES]
    _run(pip + ['--force-reinstall', '--no-deps'] + sources, env=env)
    _run(pip + sources, env=env)


def ensure_venv(venv, python, say=lambda text: None):
    """
    Create or reuse the virtual environment ``venv`` (made with ``python``) holding the three
    packages, reinstalled when their sources changed; return its ``bin`` folder.

    ``say`` gets a line for each thing done. Several processes may call it at once: one
    installs, the others wait for it (a lock next to the environment) and then reuse.
    """
    check_location(venv)
    os.makedirs(os.path.dirname(os.path.abspath(venv)), exist_ok=True)
    with open(os.path.abspath(venv).rstrip('/') + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = sources_digest(python)
        installed = _installed_digest(venv)
        usable = installed is not None and _usable(venv)
        if installed == wanted and usable:
            say('reusing %s (the package sources have not changed)' % venv)
            return os.path.join(venv, 'bin')
        if usable:
            say('the package sources changed: reinstalling into %s' % venv)
        else:
            say('creating %s (%s)' % (venv, _run([python, '--version']).strip()))
            _run([python, '-m', 'venv', '--clear', venv])
        if os.path.exists(os.path.join(venv, STAMP)):
            os.remove(os.path.join(venv, STAMP))
        say('pip install %s' % ' '.join('./' + package for package in PACKAGES))
        _install(venv)
        with open(os.path.join(venv, STAMP), 'w') as handle:
            handle.write(wanted + '\n')
    return os.path.join(venv, 'bin')
