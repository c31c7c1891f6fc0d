"""
The three packages as pip sees them: one version, read from negotiator_common, and every
package declares the distributions that its modules import.
"""

import ast
import glob
import os
import re
import sys
import sysconfig

import pytest

import negotiator_common
import negotiator_guest
import negotiator_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGES = {'negotiator-common': 'negotiator_common', 'negotiator-host': 'negotiator_host',
            'negotiator-guest': 'negotiator_guest'}


def read(*path):
    with open(os.path.join(ROOT, *path), encoding='utf-8') as handle:
        return handle.read()


def declared(project):
    """The distributions in ``project``'s dependencies, as import names (``negotiator_common``)."""
    block = re.search(r'^dependencies = \[(.*?)^\]', read(project, 'pyproject.toml'), re.MULTILINE | re.DOTALL)
    return {re.match(r'[A-Za-z0-9_.-]+', requirement).group().replace('-', '_').lower()
            for requirement in re.findall(r'"([^"]+)"', block.group(1))}


def imported(package_dir):
    """The top-level names that the modules under ``package_dir`` import, at run time or lazily."""
    names = set()
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith('.py'):
                with open(os.path.join(folder, name), encoding='utf-8') as handle:
                    tree = ast.parse(handle.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(alias.name.split('.')[0] for alias in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split('.')[0])
    return names


def is_standard_library(name):
    """Whether ``name`` is a module of Python itself: looked up on disk, so a stub in sys.modules cannot mislead it."""
    if name in sys.builtin_module_names:
        return True
    stdlib = sysconfig.get_paths()['stdlib']
    return (os.path.exists(os.path.join(stdlib, name + '.py')) or os.path.isdir(os.path.join(stdlib, name))
            or bool(glob.glob(os.path.join(stdlib, 'lib-dynload', name + '.*'))))


@pytest.mark.parametrize('project', sorted(PACKAGES))
def test_each_package_declares_what_it_imports(project):
    package = PACKAGES[project]
    third_party = {name for name in imported(os.path.join(ROOT, project, package))
                   if name != package and not is_standard_library(name)}
    assert third_party <= declared(project)


def test_one_version_read_from_negotiator_common():
    version = negotiator_common.__version__
    assert negotiator_host.__version__ == negotiator_guest.__version__ == version
    # Written once in the modules; flit reads it there for negotiator-common.
    written = [path for path in ('negotiator-common/negotiator_common/__init__.py',
                                 'negotiator-host/negotiator_host/__init__.py',
                                 'negotiator-guest/negotiator_guest/__init__.py', 'docs/conf.py')
               if version in read(path)]
    assert written == ['negotiator-common/negotiator_common/__init__.py']
    common = read('negotiator-common', 'pyproject.toml')
    assert 'dynamic = ["version"]' in common and not re.search(r'^version\b', common, re.MULTILINE)
    # The other two: flit reads a version only from their own files, so their pyproject.toml says
    # it, and pins the very same negotiator-common.
    for project in ('negotiator-host', 'negotiator-guest'):
        pyproject = read(project, 'pyproject.toml')
        assert re.findall(r'^version = "(.*)"$', pyproject, re.MULTILINE) == [version]
        assert re.findall(r'"negotiator-common *([=<>!~]=?) *([^"]*)"', pyproject) == [('==', version)]
