"""Memory after a burst of work: the C allocator's free pages given back, and the garbage
collector kept from stalling the loop while the burst lasts.

A storm of handshakes allocates a lot for a short while (TLS state, 16 KiB buffers per
connection) and frees it again, scattered between the sessions that stay. glibc keeps such
holes in its heap: the server's resident memory would stay at the storm's peak. ``malloc_trim``
returns the free pages (not only the top of the heap) to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
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
    return trim


_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Return the allocator's free pages to the kernel; False where there is no way to."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class CollectorPause:
    """Python's cyclic garbage collector held off while a storm of handshakes is admitted.

    A full collection walks every object the server holds: with a thousand sessions up, a
    third of a second in which no datagram is handled, and a storm, growing the heap, sets off
    one after another. During a storm they wait; the collector runs again once it is over, and
    at the latest after ``longest`` seconds (a storm that never ends must not make garbage
    cycles pile up for ever), after which it stays on for as long again.
    """

    def __init__(self, longest: float = 30.0) -> None:
        self.longest = longest
        self._paused_at: float | None = None
        self._resumed_at = -math.inf
        self.pauses = 0

    def hold(self, now: float) -> None:
        """Handshakes are waiting: keep the collector off, within the bound."""
        if self._paused_at is None:
            if now - self._resumed_at >= self.longest and gc.isenabled():
                gc.disable()
                self._paused_at = now
                self.pauses += 1
        elif now - self._paused_at >= self.longest:
            self.release(now)

    def release(self, now: float) -> None:
        """The storm is over (or lasted too long): the collector runs again."""
        if self._paused_at is not None:
            self._paused_at = None
            self._resumed_at = now
            gc.enable()
