"""Sphinx configuration of the negotiator documentation."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for package in ('negotiator-common', 'negotiator-host', 'negotiator-guest'):
    sys.path.insert(0, os.path.join(HERE, '..', package))

from negotiator_common import __version__  # noqa: E402 (found through the path above)

project = 'negotiator'
author = 'The negotiator developers'
copyright = '2026, The negotiator developers'
release = version = __version__

extensions = ['sphinx.ext.autodoc', 'sphinx.ext.intersphinx', 'sphinx.ext.viewcode']
autodoc_member_order = 'bysource'
autodoc_mock_imports = ['executor', 'coloredlogs', 'humanfriendly']
intersphinx_mapping = {}
exclude_patterns = ['_build']
html_theme = 'alabaster'
nitpicky = False
