"""Giving the C allocator's free memory back to the system after a burst of work.

A storm of handshakes allocates a lot for a short while (TLS state, 16 KiB buffers per
connection) and frees it again, scattered between the sessions that stay. glibc keeps such
holes in its heap: the server's resident memory would stay at the storm's peak. ``malloc_trim``
returns the free pages (not only the top of the heap) to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("tunnel.memory")


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Return the allocator's free pages to the kernel; False where there is no way to."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
