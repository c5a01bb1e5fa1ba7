"""Datagram path MTU discovery (DPLPMTUD, RFC 8899) for one QUIC path: a pure state machine.

Sizes are UDP payload bytes, the unit QUIC's ``max_datagram_size`` counts. The shell feeds in
what happened (a probe acknowledged or lost, packet losses by size, a path change, the clock)
and reads out the usable size (:attr:`PmtuSearch.current`), the next probe to send
(:meth:`PmtuSearch.next_probe`) and when to call back (:attr:`PmtuSearch.deadline`).

Choices, and where they part from RFC 8899:

- The base is 1200 bytes and is not searched for: QUIC's handshake already carried 1200-byte
  Initial datagrams both ways (RFC 9000 section 14.1), and a path that cannot carry them cannot
  carry QUIC at all, so RFC 8899's BASE state and ERROR state have nothing to do here (a
  base-size probe is only sent to confirm a black hole, below).
- Candidate sizes are the base plus multiples of ``step``, plus sizes that common links make
  (:data:`COMMON_SIZES`: a 1280, 1420, 1450, 1460, 1480, 1492 or 1500-byte link under IPv6 and
  IPv4), plus ``maximum``. A search finds the largest candidate the path carries.
- A search probes the top of its range first (most paths carry the maximum, and then one
  round trip ends the search), then bisects the candidates between the largest size
  acknowledged and the smallest size that failed.
- One search probe is outstanding at a time (and at most one confirmation probe, below). A
  probe fails when the shell reports it lost or when the probe timer runs out:
  ``max(probe_timeout, pto)``, 1 s by default, RFC 8899's floor (it asks for more than 15 s
  where nothing better is known; QUIC's PTO is better). A size fails after ``max_probes`` (3)
  consecutive failures. A probe that timed out and is reported lost later is not counted
  twice; one that is acknowledged late still counts as an acknowledgement, since the path
  carried it. Results are matched to probes by size: any other result (a probe of an earlier
  search or path) is ignored.
- ``current`` is only ever the base or a size whose probe was acknowledged on this path.
- Black holes (the path starts dropping packets of the current size while smaller ones still
  arrive; RFC 8899 section 4.3) are read from ordinary traffic: :meth:`packet_loss_report`
  takes the sizes of packets declared lost and the largest packet acknowledged. A lost packet
  larger than the base and at most ``current`` is a suspect until a packet at least as large
  is acknowledged (or a probe that large is, or ``black_hole_window`` passes). When
  ``black_hole_losses`` (3) suspects stand and then smaller packets are seen to arrive (a later
  report acknowledges something, or a confirmation probe of the base size, which the search
  asks for as soon as the suspects stand, is acknowledged), ``current`` falls to the base at
  once and a new search starts, its range topped by the size that just failed, which is probed
  first: a false alarm (a burst of congestion losses that hit only large packets) costs one
  round trip at the base. The confirmation probe matters when all traffic is full-size (a bulk
  stream: even aioquic's PTO probes are full packets then). Losses with nothing acknowledged
  at all, the confirmation probe included, are an outage, not a black hole, and change
  nothing.
- Probes do not feed black-hole detection (RFC 8899 section 4.1: a lost probe says nothing
  about the packets that are not probes), and the shell should send them outside congestion
  control (RFC 9000 section 14.4).
- After a search completes below ``maximum``, another starts ``raise_interval`` (600 s, RFC
  8899's PMTU_RAISE_TIMER) later over the sizes above ``current``.
- After a path change everything learnt is void: ``current`` returns to the base and a full
  search starts, ``probe_timeout`` later, so that results of probes sent on the old path have
  come in (and been ignored) before any probe on the new one is outstanding.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Iterable

import attrs

__all__ = [
    "BASE_SIZE",
    "COMMON_SIZES",
    "DEFAULT_MAXIMUM",
    "MAX_PROBES",
    "PmtuSearch",
    "PmtuState",
    "PmtuStatistics",
]

BASE_SIZE = 1200
"""QUIC's smallest allowed maximum datagram size (RFC 9000 section 14)."""

DEFAULT_MAXIMUM = 1452
"""A 1500-byte link minus the IPv6 and UDP headers (40 + 8)."""

LARGEST_SIZE = 65527
"""The largest ``max_udp_payload_size`` QUIC allows (RFC 9000 section 18.2)."""

STEP = 16
"""Granularity of the search between the common sizes."""

MAX_PROBES = 3
"""Consecutive failed probes after which a size counts as too large (RFC 8899 section 5.1.2)."""

PROBE_TIMEOUT_S = 1.0
"""Least time a probe has to be acknowledged (RFC 8899 section 5.1.1: not less than 1 s)."""

RAISE_INTERVAL_S = 600.0
"""Time after a search ends below the maximum until the next one (RFC 8899 PMTU_RAISE_TIMER)."""

BLACK_HOLE_LOSSES = 3
"""Uncontradicted losses of packets larger than the base that make a black hole."""

BLACK_HOLE_WINDOW_S = 30.0
"""How long a lost packet stays a suspect without being contradicted."""

# Link MTUs seen in practice, each minus IPv6 (48) and IPv4 (28) IP and UDP headers: 1280
# (IPv6 minimum), 1420 (WireGuard), 1450 (VXLAN), 1460 (DS-Lite), 1480 (6in4), 1492 (PPPoE),
# 1500 (Ethernet), 9000 (jumbo frames).
COMMON_SIZES = (1232, 1252, 1372, 1392, 1402, 1412, 1422, 1432, 1444, 1452, 1464, 1472, 8952, 8972)

# Suspect losses remembered at most; the oldest go first.
_SUSPECT_LIMIT = 64


class PmtuState(enum.Enum):
    """Where a :class:`PmtuSearch` is."""

    IDLE = "idle"  # not started
    SEARCHING = "searching"  # probing (or waiting to, after a path change)
    COMPLETE = "complete"  # settled; the raise timer may be armed


@attrs.frozen
class PmtuStatistics:
    """A snapshot of a :class:`PmtuSearch`'s counters. ``probes_sent`` counts confirmation
    probes too; ``probes_acked`` and ``probes_failed`` only the search's own."""

    current: int
    state: PmtuState
    probes_sent: int
    probes_acked: int
    probes_failed: int
    searches: int
    black_holes: int


@attrs.frozen
class _Suspect:
    size: int
    report: int  # sequence number of the report that brought it
    time: float


class PmtuSearch:
    """DPLPMTUD for one path (see the module docstring for the method and its choices).

    Drive it like this: :meth:`start` once the connection is established; after every input
    (:meth:`probe_acked`, :meth:`probe_lost`, :meth:`packet_loss_report`,
    :meth:`path_changed`, :meth:`timer`) send a probe of every size :meth:`next_probe`
    returns until it returns None, apply :attr:`current` if it changed, and call
    :meth:`timer` at :attr:`deadline`.

    Local misuse (bad parameters, starting twice) raises ``ValueError``/``RuntimeError``;
    results that match no probe of this path are ignored.
    """

    def __init__(
        self,
        *,
        maximum: int = DEFAULT_MAXIMUM,
        base: int = BASE_SIZE,
        step: int = STEP,
        max_probes: int = MAX_PROBES,
        probe_timeout: float = PROBE_TIMEOUT_S,
        raise_interval: float = RAISE_INTERVAL_S,
        black_hole_losses: int = BLACK_HOLE_LOSSES,
        black_hole_window: float = BLACK_HOLE_WINDOW_S,
    ) -> None:
        if not BASE_SIZE <= base <= maximum <= LARGEST_SIZE:
            raise ValueError(
                f"need {BASE_SIZE} <= base <= maximum <= {LARGEST_SIZE}, got {base}, {maximum}"
            )
        if step < 1 or max_probes < 1 or black_hole_losses < 1:
            raise ValueError("step, max_probes and black_hole_losses must be at least 1")
        if not (probe_timeout > 0 and raise_interval > 0 and black_hole_window > 0):
            raise ValueError("probe_timeout, raise_interval and black_hole_window must be > 0")
        self.base = base
        self.maximum = maximum
        self.max_probes = max_probes
        self.probe_timeout = probe_timeout
        self.raise_interval = raise_interval
        self.black_hole_losses = black_hole_losses
        self.black_hole_window = black_hole_window
        grid = set(range(base + step, maximum + 1, step))
        common = {size for size in COMMON_SIZES if base < size <= maximum}
        top = {maximum} if maximum > base else set()
        #: Every size a search may probe, ascending; all above the base.
        self.candidates: tuple[int, ...] = tuple(sorted(grid | common | top))

        self._state = PmtuState.IDLE
        self._current = base
        # The search range, as indices into candidates: `_good` the largest acknowledged
        # (-1: the base), `_bad` the smallest failed (len: none). Sizes strictly between are
        # open; `_top_first` probes the largest open one before bisecting.
        self._good = -1
        self._bad = len(self.candidates)
        self._top_first = True
        self._target: int | None = None  # index being probed, with retries
        self._failures = 0  # consecutive failures at the target
        self._probe: int | None = None  # size of the outstanding probe
        self._probe_deadline: float | None = None
        self._confirm_deadline: float | None = None  # of an outstanding base-size probe
        self._not_before: float | None = None  # no probe before this (after a path change)
        self._raise_at: float | None = None
        # Sizes of probes that timed out, by count: their late loss report is not a failure.
        self._timed_out: dict[int, int] = {}
        self._suspects: list[_Suspect] = []
        self._report = 0
        self._acked_report = -1  # the last report that acknowledged anything
        self._probes_sent = self._probes_acked = self._probes_failed = 0
        self._searches = self._black_holes = 0

    # -- outputs -------------------------------------------------------------------------

    @property
    def current(self) -> int:
        """The largest UDP payload to send on this path now: the base or an acknowledged
        probe's size."""
        return self._current

    @property
    def state(self) -> PmtuState:
        """Idle, searching or complete."""
        return self._state

    @property
    def deadline(self) -> float | None:
        """When :meth:`timer` must be called next (None: no timer needed)."""
        deadline = None
        if self._state is PmtuState.SEARCHING:
            if self._probe is not None:
                deadline = self._probe_deadline
            else:
                deadline = self._not_before  # None: a probe is ready now
        elif self._state is PmtuState.COMPLETE:
            deadline = self._raise_at
        confirm = self._confirm_deadline
        if confirm is not None and (deadline is None or confirm < deadline):
            return confirm
        return deadline

    def next_probe(self, now: float, *, pto: float = 0.0) -> int | None:
        """The size of the probe to send now, or None. A returned size counts as sent; its
        timer runs ``max(probe_timeout, pto)``, ``pto`` being the connection's current probe
        timeout (RTT-based) if the shell knows it. Call it until it returns None: besides the
        search's probe there may be a confirmation probe of the base size (black-hole
        detection), each handled like any other."""
        timeout = max(self.probe_timeout, pto)
        self._expire_suspects(now)
        if self._confirm_deadline is None and self._needs_confirmation():
            self._confirm_deadline = now + timeout
            self._probes_sent += 1
            return self.base
        if self._state is not PmtuState.SEARCHING or self._probe is not None:
            return None
        if self._not_before is not None:
            if now < self._not_before:
                return None
            self._not_before = None
        assert self._target is not None
        size = self.candidates[self._target]
        self._probe = size
        self._probe_deadline = now + timeout
        self._probes_sent += 1
        return size

    def statistics(self) -> PmtuStatistics:
        """An immutable snapshot of the counters."""
        return PmtuStatistics(
            current=self._current,
            state=self._state,
            probes_sent=self._probes_sent,
            probes_acked=self._probes_acked,
            probes_failed=self._probes_failed,
            searches=self._searches,
            black_holes=self._black_holes,
        )

    # -- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin: the connection is established (and its handshake confirmed)."""
        if self._state is not PmtuState.IDLE:
            raise RuntimeError("PmtuSearch.start() called twice")
        self._new_search(now, good=-1, bad=len(self.candidates))

    def probe_acked(self, size: int, now: float) -> None:
        """A probe of ``size`` bytes was acknowledged."""
        if size == self.base:
            # A confirmation probe (late or not): small packets do get through.
            self._confirm_deadline = None
            if self._state is not PmtuState.IDLE and self._current > self.base:
                self._report += 1
                self._acked_report = self._report
                self._check_black_hole(now)
            return
        late = self._suppress_late(size)
        if self._state is not PmtuState.SEARCHING:
            return
        if size != self._probe and not (late and self._open(size)):
            # Not this search's probe (an older path's, say), or nothing left to learn.
            return
        self._probes_acked += 1
        index = self.candidates.index(size)
        if size == self._probe or (self._target is not None and self._target <= index):
            self._probe = self._probe_deadline = None
        self._good = index
        self._drop_suspects(size)
        self._set_current(size)
        self._top_first = False
        self._choose(now)

    def probe_lost(self, size: int, now: float) -> None:
        """A probe of ``size`` bytes was declared lost."""
        if size == self.base:
            self._confirm_deadline = None  # an outage, maybe: asked again while suspects stand
            return
        if self._suppress_late(size) or self._state is not PmtuState.SEARCHING:
            return  # its timer already counted it
        if size == self._probe:
            self._fail(now)

    def timer(self, now: float) -> None:
        """The clock reached :attr:`deadline` (calling it early or late is harmless)."""
        if self._confirm_deadline is not None and now >= self._confirm_deadline:
            self._confirm_deadline = None
        if self._state is PmtuState.SEARCHING:
            deadline = self._probe_deadline
            if self._probe is not None and deadline is not None and now >= deadline:
                self._timed_out[self._probe] = min(
                    self._timed_out.get(self._probe, 0) + 1, self.max_probes
                )
                self._fail(now)
        elif self._state is PmtuState.COMPLETE:
            if self._raise_at is not None and now >= self._raise_at:
                # Search again above the current size (RFC 8899 section 5.3.1).
                self._new_search(now, good=self._good, bad=len(self.candidates))

    def path_changed(self, now: float) -> None:
        """The path changed (migration, new local address or interface): nothing learnt
        holds. ``current`` returns to the base and a new search starts shortly."""
        if self._state is PmtuState.IDLE:
            return
        self._set_current(self.base)
        self._timed_out.clear()  # late results of the old path's probes must not count
        self._new_search(now, good=-1, bad=len(self.candidates))
        self._not_before = now + self.probe_timeout

    def packet_loss_report(self, now: float, *, lost: Iterable[int], largest_acked: int) -> bool:
        """What ordinary (non-probe) packets did since the previous report: ``lost`` the UDP
        payload sizes of those declared lost, ``largest_acked`` the size of the largest one
        acknowledged (0: none). Returns True if this revealed a black hole, in which case
        :attr:`current` is now the base."""
        self._report += 1
        if self._state is PmtuState.IDLE or self._current <= self.base:
            self._suspects.clear()
            return False
        suspects = self._suspects
        if largest_acked > 0:
            self._drop_suspects(largest_acked)
            self._acked_report = self._report
        self._expire_suspects(now)
        # Packets above the current size were sent before it fell; they tell nothing new.
        ceiling = self._current
        for size in lost:
            if largest_acked < size <= ceiling and size > self.base:
                suspects.append(_Suspect(size=size, report=self._report, time=now))
        if len(suspects) > _SUSPECT_LIMIT:
            del suspects[: len(suspects) - _SUSPECT_LIMIT]
        return self._check_black_hole(now)

    # -- the search ----------------------------------------------------------------------

    def _expire_suspects(self, now: float) -> None:
        horizon = now - self.black_hole_window
        suspects = self._suspects
        if suspects and suspects[0].time < horizon:
            suspects[:] = [s for s in suspects if s.time >= horizon]

    def _needs_confirmation(self) -> bool:
        """Do enough suspects stand that a base-size probe should show whether small
        packets still arrive?"""
        return (
            self._state is not PmtuState.IDLE
            and self._current > self.base
            and len(self._suspects) >= self.black_hole_losses
        )

    def _check_black_hole(self, now: float) -> bool:
        # Black hole: enough suspects lost before a report (or confirmation) that shows
        # smaller packets still arrive, and nothing of their size arrived since.
        earlier = sum(1 for s in self._suspects if s.report < self._acked_report)
        if earlier < self.black_hole_losses:
            return False
        self._black_holes += 1
        failed = self.candidates.index(self._current)
        self._set_current(self.base)
        # Search below the failed size, probing it again first (a false alarm costs one RTT).
        self._new_search(now, good=-1, bad=failed + 1)
        return True

    def _new_search(self, now: float, *, good: int, bad: int) -> None:
        self._searches += 1
        self._state = PmtuState.SEARCHING
        self._good, self._bad = good, bad
        self._top_first = True
        self._target = None
        self._probe = self._probe_deadline = None
        self._not_before = self._raise_at = None
        self._choose(now)

    def _open(self, size: int) -> bool:
        """Is ``size`` a candidate this search has not decided yet?"""
        index = bisect_left(self.candidates, size)
        return (
            index < len(self.candidates)
            and self.candidates[index] == size
            and self._good < index < self._bad
        )

    def _choose(self, now: float) -> None:
        """Pick the next size to probe, or complete the search."""
        if self._bad - self._good <= 1:
            self._state = PmtuState.COMPLETE
            self._target = None
            self._probe = self._probe_deadline = None
            # Another search later, unless the maximum is already in use.
            at_top = self._good == len(self.candidates) - 1
            self._raise_at = None if at_top else now + self.raise_interval
            return
        target = self._bad - 1 if self._top_first else (self._good + self._bad) // 2
        if target != self._target:
            self._target = target
            self._failures = 0

    def _fail(self, now: float) -> None:
        self._probes_failed += 1
        self._probe = self._probe_deadline = None
        self._failures += 1
        if self._failures >= self.max_probes:
            assert self._target is not None
            self._bad = self._target
            self._top_first = False
            self._choose(now)

    def _suppress_late(self, size: int) -> bool:
        """Account for a result of a probe that had timed out; True if it was one."""
        count = self._timed_out.get(size, 0)
        if not count:
            return False
        if count == 1:
            del self._timed_out[size]
        else:
            self._timed_out[size] = count - 1
        return True

    def _drop_suspects(self, delivered: int) -> None:
        """A packet of ``delivered`` bytes got through: no loss at or below it was the path."""
        if self._suspects:
            self._suspects[:] = [s for s in self._suspects if s.size > delivered]

    def _set_current(self, size: int) -> None:
        if size != self._current:
            self._current = size
            self._suspects.clear()
