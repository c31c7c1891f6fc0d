"""
Giving memory back to the system after a large line, where the C library allows it.

After ``json`` parsed a large line, its objects are freed, but glibc keeps the freed memory:
in the heap (per-thread arenas, one per reading thread) and, once a large block was freed,
with a raised ``mmap`` threshold, so that the next large blocks come from the heap too. A host
daemon that read 16 lines of 4 MiB kept 1.6 GiB that way (``docs/faults.rst``). ``malloc_trim(0)`` hands
the free pages of every arena back at once. It is glibc's: elsewhere (musl) there is nothing to
call, and nothing is done.
"""

import threading
from typing import Any, Optional

__all__ = ('release_free_memory',)

_trim: Optional[Any] = None
_loaded = False
_load_lock = threading.Lock()


def _malloc_trim() -> Optional[Any]:
    """glibc's ``malloc_trim``, found once (ctypes is imported only when a large line came); None elsewhere."""
    global _trim, _loaded
    with _load_lock:
        if not _loaded:
            _loaded = True
            try:
                import ctypes
                _trim = ctypes.CDLL(None).malloc_trim
            except (ImportError, OSError, AttributeError):
                _trim = None
    return _trim


def release_free_memory() -> bool:
    """Return the C library's free memory to the system; False where there is no way to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
