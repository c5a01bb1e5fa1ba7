"""When a pump should read past the first packet of a wake-up: a pure policy.

A pump that drains its socket or TUN device until the kernel says EAGAIN pays, for a packet
that arrived alone, one extra system call that finds nothing, and it pays it before the packet
moves on. On an idle link (a ping, a keystroke) every packet arrives alone, on the path of
every round trip. Under load, draining is what makes batches. So: after a quiet spell, take
one packet and go back to waiting (the poller wakes the pump again at once if more were
queued, and that quick return marks the start of a burst); while packets keep coming, drain.
"""

from __future__ import annotations

# Wake-ups closer together than this are one burst.
BURST_GAP = 0.001


class ReadAhead:
    """Per device: call :meth:`should_drain` before reading past the first packet of a
    wake-up, and set :attr:`last_count` to how many packets the wake-up read (an attribute,
    not a method: this runs on the way to every packet)."""

    __slots__ = ("_last_wake", "last_count")

    def __init__(self) -> None:
        self._last_wake = float("-inf")
        self.last_count = 0

    def should_drain(self, now: float) -> bool:
        busy = self.last_count > 1 or now - self._last_wake < BURST_GAP
        self._last_wake = now
        return busy
