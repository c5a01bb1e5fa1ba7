"""Rate limits for abuse the server must absorb without locking out honest clients.

A :class:`FailureLimiter` counts failures per key (a source address, a token) in a leaky bucket:
each failure adds one, the bucket drains at ``rate`` per second, and a key with ``burst``
failures in its bucket is refused until it drains. Honest clients with the right credentials
never fill a bucket, and one attacker's bucket is not anyone else's. Memory is bounded: the
oldest keys are forgotten first.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable


class FailureLimiter:
    """Leaky-bucket failure counter per key."""

    def __init__(self, *, burst: float = 5.0, rate: float = 0.2, max_keys: int = 65536) -> None:
        if burst <= 0 or rate <= 0 or max_keys <= 0:
            raise ValueError("burst, rate and max_keys must be positive")
        self.burst = burst
        self.rate = rate
        self.max_keys = max_keys
        # key -> (level, time of last update); ordered by last update for eviction.
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = (
            collections.OrderedDict()
        )

    def _level(self, key: Hashable, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        level, since = entry
        return max(0.0, level - (now - since) * self.rate)

    def blocked(self, key: Hashable, now: float) -> bool:
        """True while ``key`` has failed too often recently: one more failure would take it
        past ``burst``."""
        return self._level(key, now) > self.burst - 1

    def failed(self, key: Hashable, now: float) -> bool:
        """Record one failure; returns True if this failure made the key blocked."""
        was_blocked = self.blocked(key, now)
        self._buckets[key] = (self._level(key, now) + 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return not was_blocked and self.blocked(key, now)

    def __len__(self) -> int:
        return len(self._buckets)


class Bucket:
    """A level that refills at ``rate`` a second up to ``burst``: what :class:`TokenBucket`
    and the handshake budget (:class:`tunnel.core.admission.WorkBudget`) spend from."""

    __slots__ = ("rate", "burst", "_level", "_since")

    def __init__(self, *, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._since: float | None = None

    def _refill(self, now: float) -> float:
        """The level at ``now`` (a ``now`` earlier than the last one changes nothing)."""
        since = self._since
        if since is None or now > since:
            if since is not None:
                self._level = min(self.burst, self._level + (now - since) * self.rate)
            self._since = now
        return self._level


class TokenBucket(Bucket):
    """At most ``burst`` events at once and ``rate`` a second on average; one bucket, no keys.

    For work a peer can ask of us at will (answering its pings): beyond the budget the request
    is ignored, so a flood costs us a counter, not a queue.
    """

    __slots__ = ()

    def __init__(self, *, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        super().__init__(rate=rate, burst=burst)

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self._refill(now) >= 1:
            self._level -= 1
            return True
        return False
