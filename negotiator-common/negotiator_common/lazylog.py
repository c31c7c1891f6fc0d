"""
Loggers that do not import :mod:`logging` until a record could be seen by anyone.

Why: ``import logging`` (with the ``traceback``, ``tokenize``, ``string`` and ``weakref`` it pulls
in) is a large part of a host CLI call's start-up (``python -X importtime``; see
``docs/benchmark.rst``), and a quick CLI call without ``-v`` never logs. While nobody has
imported :mod:`logging`, nobody can have configured it: DEBUG and INFO records would be dropped
by the default WARNING level, so a :class:`LazyLogger` drops them without importing anything.
A WARNING or above, or any other use, imports :mod:`logging` and goes to the real logger. Once
:mod:`logging` is imported (a daemon or ``-v`` configured it, or pytest), every call goes to the
real logger. Whenever a real logger is first made here, its package (``negotiator_common``,
``negotiator_host`` or ``negotiator_guest``) gets a :class:`logging.NullHandler`, so the library
never prints through logging's last resort: this module is the only way in which the library
modules get a logger (``tests/test_quiet_library.py`` checks both).
"""

import sys
from typing import TYPE_CHECKING, Any, Optional, cast

if TYPE_CHECKING:  # the annotations name logging's types without importing it at run time
    import logging

__all__ = ('LazyLogger', 'get_logger')


def _real_logger(name: str) -> 'logging.Logger':
    """``logging.getLogger(name)``, with a :class:`logging.NullHandler` on the logger of its package."""
    import logging
    package = logging.getLogger(name.split('.', 1)[0])
    if not any(isinstance(handler, logging.NullHandler) for handler in package.handlers):
        package.addHandler(logging.NullHandler())
    return logging.getLogger(name)


class LazyLogger(object):
    """Stands for ``logging.getLogger(name)``; see the module's documentation."""

    __slots__ = ('name', '_logger')

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Optional['logging.Logger'] = None

    def _real(self) -> 'logging.Logger':
        if self._logger is None:
            self._logger = _real_logger(self.name)
        return self._logger

    def _dropped(self) -> bool:
        return self._logger is None and 'logging' not in sys.modules

    def getChild(self, suffix: str) -> 'logging.Logger':  # noqa: N802 (logging's name)
        if self._logger is not None:
            return self._logger.getChild(suffix)
        return cast('logging.Logger', LazyLogger(self.name + '.' + suffix))

    def debug(self, *args: object, **kwargs: Any) -> None:
        if not self._dropped():
            self._real().debug(*args, **kwargs)

    def info(self, *args: object, **kwargs: Any) -> None:
        if not self._dropped():
            self._real().info(*args, **kwargs)

    def warning(self, *args: object, **kwargs: Any) -> None:
        self._real().warning(*args, **kwargs)

    def error(self, *args: object, **kwargs: Any) -> None:
        self._real().error(*args, **kwargs)

    def exception(self, *args: object, **kwargs: Any) -> None:
        kwargs.setdefault('exc_info', True)
        self._real().error(*args, **kwargs)

    def critical(self, *args: object, **kwargs: Any) -> None:
        self._real().critical(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real(), name)

    def __repr__(self) -> str:
        return 'LazyLogger(%r)' % self.name


def get_logger(name: str) -> 'logging.Logger':
    """
    The real logger when :mod:`logging` is already imported, else a :class:`LazyLogger`.

    Typed as a :class:`logging.Logger` (which a :class:`LazyLogger` stands for) so that the type
    checker checks every call the library makes on it.
    """
    if 'logging' in sys.modules:
        return _real_logger(name)
    return cast('logging.Logger', LazyLogger(name))
