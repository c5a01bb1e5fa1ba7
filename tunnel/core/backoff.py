"""Reconnect backoff policy: exponential delay with a cap, plus random jitter.

Attempt n (counting from 1) waits ``min(base * 2**(n-1), cap) + jitter * max_jitter`` seconds,
``jitter`` drawn uniformly from [0, 1). The defaults give 1, 2, 4, ... 60 seconds plus up to
half a second. Pure: the caller sleeps.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["Backoff", "reconnect_delay"]

BASE_S = 1.0
"""Delay before the first retry, without jitter."""

CAP_S = 60.0
"""Longest delay, without jitter."""

MAX_JITTER_S = 0.5
"""Largest jitter added to a delay."""

# 2.0 ** 1023 is the largest power of two a float holds; beyond it the delay is the cap anyway.
_MAX_EXPONENT = 1023


def _delay(attempt: int, jitter: float, base: float, cap: float, max_jitter: float) -> float:
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    # base * 2.0**1023 may overflow to inf, which min() turns into the cap.
    exponential = base * 2.0 ** min(attempt - 1, _MAX_EXPONENT)
    return min(exponential, cap) + jitter * max_jitter


def reconnect_delay(attempt: int, jitter: float) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (>= 1) with the default policy:
    ``min(2**(attempt-1), 60) + jitter * 0.5``, ``jitter`` in [0, 1).

    Raises ValueError for an attempt below 1 or a jitter outside [0, 1).
    """
    return _delay(attempt, jitter, BASE_S, CAP_S, MAX_JITTER_S)


def _non_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.define
class Backoff:
    """A reconnect backoff counter.

    Each :meth:`next_delay` counts one more attempt and returns its delay, the jitter drawn
    from ``rng``; :meth:`reset` after a session got established. Pass a seeded
    ``random.Random`` for reproducible delays.
    """

    rng: random.Random = attrs.field(factory=random.Random)
    base: float = attrs.field(default=BASE_S, validator=_non_negative)
    cap: float = attrs.field(default=CAP_S, validator=_non_negative)
    max_jitter: float = attrs.field(default=MAX_JITTER_S, validator=_non_negative)
    attempts: int = attrs.field(default=0, init=False)
    """Attempts counted since construction or the last :meth:`reset`."""

    def next_delay(self) -> float:
        """Count one more attempt and return the seconds to wait before it."""
        self.attempts += 1
        return _delay(self.attempts, self.rng.random(), self.base, self.cap, self.max_jitter)

    def reset(self) -> None:
        """Start again from the first attempt's delay."""
        self.attempts = 0
