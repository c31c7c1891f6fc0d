"""
Whose commands run: a command, its directory and every directory above must be out of others' reach.

The suite runs as root, so a file or directory handed to ``nobody`` stands for someone else's.
"""

import logging
import os
import subprocess
import sys

import pytest

from negotiator_common.commands import CommandRegistry
from negotiator_common.errors import CommandNotFound

from support import write_command

NOBODY = 65534
PROBE = 'echo ran'
"""The body of the commands these tests write."""


def commands_dir_under(parent, parent_mode=0o755):
    """``parent/commands`` holding one command, ``probe``, with ``parent`` at ``parent_mode``."""
    os.makedirs(str(parent), exist_ok=True)
    os.chmod(str(parent), parent_mode)
    directory = os.path.join(str(parent), 'commands')
    os.mkdir(directory)
    os.chmod(directory, 0o755)
    write_command(directory, 'probe', PROBE)
    return directory


def offered(directory):
    """The names a registry of ``directory`` (without built-ins) lists, and whether ``probe`` resolves."""
    registry = CommandRegistry([directory], builtins=False)
    names = [c.name for c in registry.list()]
    try:
        registry.resolve('probe')
    except CommandNotFound:
        return names, False
    return names, True


def refusals(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith('Refusing ')]


def test_a_command_file_owned_by_someone_else_is_refused_and_logged_once(tmp_path, caplog):
    directory = commands_dir_under(tmp_path / 'safe')
    write_command(directory, 'mine', PROBE)
    os.chown(os.path.join(directory, 'probe'), NOBODY, NOBODY)
    caplog.set_level(logging.WARNING)
    registry = CommandRegistry([directory], builtins=False)
    assert [c.name for c in registry.list()] == ['mine']
    with pytest.raises(CommandNotFound):
        registry.resolve('probe')
    registry.list()
    assert refusals(caplog) == ['Refusing %s: the file is owned by uid %d, neither root nor the agent\'s user'
                                % (os.path.join(directory, 'probe'), NOBODY)]


def test_a_commands_directory_owned_by_someone_else_is_refused(tmp_path, caplog):
    directory = commands_dir_under(tmp_path / 'safe')
    os.chown(directory, NOBODY, NOBODY)
    caplog.set_level(logging.WARNING)
    assert offered(directory) == ([], False)
    assert 'the directory is owned by uid %d' % NOBODY in refusals(caplog)[0]


def test_a_world_writable_directory_above_is_refused(tmp_path, caplog):
    directory = commands_dir_under(tmp_path / 'open', parent_mode=0o777)
    caplog.set_level(logging.WARNING)
    assert offered(directory) == ([], False)
    assert refusals(caplog) == ['Refusing %s: the directory %s above it is writable by others than its owner'
                                ' (mode 777)' % (directory, tmp_path / 'open')]


def test_a_directory_above_owned_by_someone_else_is_refused(tmp_path):
    directory = commands_dir_under(tmp_path / 'theirs')
    os.chown(str(tmp_path / 'theirs'), NOBODY, NOBODY)
    assert offered(directory) == ([], False)


def test_a_sticky_shared_directory_above_is_accepted_when_its_entry_is_ours(tmp_path):
    # As /tmp: writable by all, but nobody else can rename or remove an entry they do not own.
    directory = commands_dir_under(tmp_path / 'shared' / 'ours', parent_mode=0o755)
    os.chmod(str(tmp_path / 'shared'), 0o1777)
    assert offered(directory) == (['probe'], True)


def test_a_link_in_a_sticky_shared_directory_is_refused_when_someone_else_owns_it(tmp_path, caplog):
    # Its owner may remove the link and put another in its place.
    directory = commands_dir_under(tmp_path / 'safe')
    shared = str(tmp_path / 'shared')
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    theirs, ours = os.path.join(shared, 'theirs'), os.path.join(shared, 'ours')
    os.symlink(directory, theirs)
    os.lchown(theirs, NOBODY, NOBODY)
    os.symlink(directory, ours)
    caplog.set_level(logging.WARNING)
    assert offered(ours) == (['probe'], True)
    assert offered(theirs) == ([], False)
    assert refusals(caplog) == ['Refusing %s: %s, in the shared directory %s, is owned by uid %d, neither root nor'
                                ' the agent\'s user' % (theirs, theirs, shared, NOBODY)]


def test_a_link_to_the_commands_directory_in_a_writable_directory_is_refused(tmp_path):
    # Whoever may write where the link lives may point it elsewhere.
    directory = commands_dir_under(tmp_path / 'safe')
    os.mkdir(str(tmp_path / 'open'))
    os.chmod(str(tmp_path / 'open'), 0o777)
    link = os.path.join(str(tmp_path / 'open'), 'commands')
    os.symlink(directory, link)
    assert offered(directory) == (['probe'], True)
    assert offered(link) == ([], False)


def test_a_command_owned_by_the_agents_own_user_runs(tmp_path, monkeypatch):
    # An agent running as an unprivileged user may run its own user's commands.
    directory = commands_dir_under(tmp_path / 'safe')
    for path in (os.path.join(directory, 'probe'), directory, str(tmp_path / 'safe')):
        os.chown(path, NOBODY, NOBODY)
    monkeypatch.setattr(os, 'geteuid', lambda: NOBODY)
    assert offered(directory) == (['probe'], True)


def test_a_refusal_is_logged_never_printed_by_the_library(tmp_path):
    # A program that uses the library without configuring logging must not see the warning on
    # its stderr (logging's last-resort handler prints to it when no handler is installed).
    directory = commands_dir_under(tmp_path / 'safe')
    os.chown(os.path.join(directory, 'probe'), NOBODY, NOBODY)
    script = ('import sys\nfrom negotiator_common.commands import CommandRegistry\n'
              'sys.exit(len(CommandRegistry([sys.argv[1]]).list()) == 0)\n')
    process = subprocess.run([sys.executable, '-c', script, directory], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=60)
    assert (process.returncode, process.stdout, process.stderr) == (0, b'', b'')
