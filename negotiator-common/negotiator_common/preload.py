"""
Libraries that a warm Python imports before it forks a program (``exec``'s ``preload``,
``docs/protocol.rst``, "Warm Python").

Why: a warm Python has imported the standard library, but an Ansible module still imports its
own libraries (``ansible.module_utils``, sent in the module's zip file) at every run, about a
second of the 2 s that a warm ``stat`` took in the emulated test guest; forked from an
interpreter that had imported them, ``stat`` took 0.85 s and ``ping`` 0.1 s instead of 1.3 s.
A caller that knows which libraries its programs import sends them as a zip archive and
names the modules to import from it; the agent keeps one warm Python per (interpreter,
archive, modules), see :mod:`negotiator_common.warm`.

This module holds the value and its checks, shared by the client that sends it and the agent
that receives it. It does no I/O.
"""

import base64
import binascii
import re
from typing import Any, Dict, Sequence

from negotiator_common.errors import InvalidParams

__all__ = ('MAX_ARCHIVE_SIZE', 'MAX_MODULES', 'Preload')

MAX_ARCHIVE_SIZE = 8 * 1024 * 1024
"""The largest archive an agent takes, in bytes (an Ansible module's zip file is under 1 MiB)."""

MAX_MODULES = 2048
"""How many modules a preload names at most."""

_MODULE_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')
_MAX_MODULE_NAME = 200


class Preload(object):
    """
    A zip ``archive`` (bytes) and the ``modules`` to import from it (dotted names, in order).

    :attr:`key` names this content: two preloads with the same key make the same warm Python,
    whoever sends them. The agent computes it from what it received, never takes it from the
    caller, so that no caller can pass an archive off as another's.
    """

    def __init__(self, archive: bytes, modules: Sequence[str]) -> None:
        if not isinstance(archive, bytes):
            raise InvalidParams('the preload archive must be bytes')
        if len(archive) > MAX_ARCHIVE_SIZE:
            raise InvalidParams('the preload archive is larger than %d bytes' % MAX_ARCHIVE_SIZE)
        if not isinstance(modules, (list, tuple)) or len(modules) > MAX_MODULES:
            raise InvalidParams('preload modules must be a list of at most %d names' % MAX_MODULES)
        for name in modules:
            if not isinstance(name, str) or len(name) > _MAX_MODULE_NAME or not _MODULE_NAME.match(name):
                raise InvalidParams('%r is not the dotted name of a module' % (name,))
        self.archive = archive
        self.modules = tuple(modules)

    @property
    def key(self) -> str:
        import hashlib  # imported when used: the agent starts without it
        digest = hashlib.sha256(self.archive)
        digest.update(b'\0' + '\n'.join(self.modules).encode('ascii'))
        return digest.hexdigest()

    def to_wire(self) -> Dict[str, Any]:
        return {'archive': base64.b64encode(self.archive).decode('ascii'), 'modules': list(self.modules)}

    @classmethod
    def from_wire(cls, value: Any) -> 'Preload':
        """The ``preload`` parameter of an ``exec``; :class:`InvalidParams` if it is not one."""
        if not isinstance(value, dict) or not isinstance(value.get('archive'), str):
            raise InvalidParams('preload must be an object with an archive (base64) and modules')
        encoded = value['archive']
        if len(encoded) > (MAX_ARCHIVE_SIZE + 2) // 3 * 4:
            raise InvalidParams('the preload archive is larger than %d bytes' % MAX_ARCHIVE_SIZE)
        try:
            archive = base64.b64decode(encoded.encode('ascii'), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise InvalidParams('the preload archive is not base64: %s' % exc) from exc
        return cls(archive, value.get('modules', []))
