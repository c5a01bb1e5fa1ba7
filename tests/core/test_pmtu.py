"""PmtuSearch: exact behaviour in small cases, and properties over a simulated path with a
random MTU, probe losses, MTU drops and path changes."""

from __future__ import annotations

import heapq
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.pmtu import (
    BASE_SIZE,
    COMMON_SIZES,
    MAX_PROBES,
    PmtuSearch,
    PmtuState,
)


def expected(search: PmtuSearch, mtu: int) -> int:
    """What a search over a path carrying at most ``mtu`` bytes must settle on."""
    return max([search.base, *(c for c in search.candidates if c <= mtu)])


def probe_and_answer(search: PmtuSearch, now: float, mtu: int) -> int:
    """Send the due probe and answer it at once as a loss-free path of ``mtu`` would."""
    size = search.next_probe(now)
    assert size is not None
    if size <= mtu:
        search.probe_acked(size, now)
    else:
        search.probe_lost(size, now)
    return size


# -- exact cases -------------------------------------------------------------------------


def test_candidates_hold_the_grid_the_common_sizes_and_the_maximum():
    search = PmtuSearch(maximum=1452, step=16)
    assert search.candidates[0] == 1216
    assert search.candidates[-1] == 1452
    assert {1232, 1252, 1412, 1432, 1444, 1452} <= set(search.candidates)
    assert list(search.candidates) == sorted(set(search.candidates))
    assert all(BASE_SIZE < c <= 1452 for c in search.candidates)
    jumbo = PmtuSearch(maximum=8972)
    assert {1472, 8952, 8972} <= set(jumbo.candidates)
    assert all(c <= 1452 for c in COMMON_SIZES if c in search.candidates)


def test_before_start_nothing_happens():
    search = PmtuSearch()
    assert search.state is PmtuState.IDLE
    assert search.current == BASE_SIZE
    assert search.next_probe(0.0) is None
    assert search.deadline is None
    search.path_changed(0.0)
    assert search.packet_loss_report(0.0, lost=[1452] * 10, largest_acked=100) is False
    assert search.current == BASE_SIZE


def test_a_1500_byte_path_takes_one_probe_of_the_maximum():
    search = PmtuSearch()
    search.start(0.0)
    assert search.next_probe(0.0) == 1452
    assert search.next_probe(0.0) is None  # one outstanding at a time
    assert search.deadline == 1.0
    search.probe_acked(1452, 0.05)
    assert search.current == 1452
    assert search.state is PmtuState.COMPLETE
    assert search.deadline is None  # at the maximum: nothing to raise to
    assert search.next_probe(0.1) is None


def test_a_1280_byte_ipv6_path_bisects_down_to_1232():
    search = PmtuSearch()
    search.start(0.0)
    now = 0.0
    sizes = []
    while search.state is PmtuState.SEARCHING:
        sizes.append(probe_and_answer(search, now, 1232))
        now += 0.1
    assert search.current == 1232
    assert sizes[:3] == [1452] * MAX_PROBES  # the top first, three tries
    assert len(sizes) <= MAX_PROBES * (1 + math.ceil(math.log2(len(search.candidates) + 1)))
    assert search.deadline == pytest.approx(now - 0.1 + 600.0)  # the raise timer


def test_probe_timer_is_the_floor_or_the_pto():
    search = PmtuSearch(probe_timeout=1.0)
    search.start(10.0)
    assert search.next_probe(10.0, pto=0.3) == 1452
    assert search.deadline == 11.0
    search.timer(10.5)  # early: harmless
    assert search.statistics().probes_failed == 0
    search.timer(11.0)
    assert search.statistics().probes_failed == 1
    assert search.next_probe(11.0, pto=2.5) == 1452
    assert search.deadline == 13.5


def test_a_probe_that_timed_out_is_not_failed_twice_by_its_late_loss():
    search = PmtuSearch()
    search.start(0.0)
    search.next_probe(0.0)
    search.timer(1.0)  # failure 1
    search.next_probe(1.0)  # the retry, same size
    search.probe_lost(1452, 1.2)  # the first probe's late loss report
    assert search.statistics().probes_failed == 1
    search.probe_lost(1452, 1.3)  # the retry's own
    assert search.statistics().probes_failed == 2


def test_a_late_acknowledgement_of_a_timed_out_probe_counts():
    search = PmtuSearch()
    search.start(0.0)
    search.next_probe(0.0)
    search.timer(1.0)
    search.probe_acked(1452, 1.5)  # it did get there
    assert search.current == 1452
    assert search.state is PmtuState.COMPLETE


def test_results_that_match_no_probe_are_ignored():
    search = PmtuSearch()
    search.start(0.0)
    search.probe_acked(1400, 0.0)  # never sent
    search.probe_lost(1452, 0.0)  # not sent yet
    assert search.current == BASE_SIZE
    assert search.statistics().probes_failed == 0


def test_the_raise_timer_searches_above_the_current_size():
    search = PmtuSearch(raise_interval=600.0)
    search.start(0.0)
    now = 0.0
    while search.state is PmtuState.SEARCHING:
        probe_and_answer(search, now, 1412)
    assert search.current == 1412
    done = now
    assert search.deadline == done + 600.0
    search.timer(done + 600.0)
    assert search.state is PmtuState.SEARCHING
    assert search.current == 1412  # still usable while searching
    # The path got better: the maximum is probed first and found.
    assert probe_and_answer(search, done + 600.0, 1500) == 1452
    assert search.current == 1452


def test_a_path_change_returns_to_the_base_and_waits_before_probing():
    search = PmtuSearch(probe_timeout=1.0)
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    search.path_changed(5.0)
    assert search.current == BASE_SIZE
    assert search.state is PmtuState.SEARCHING
    assert search.next_probe(5.5) is None
    assert search.deadline == 6.0
    search.timer(6.0)
    assert search.next_probe(6.0) == 1452


def test_a_probe_result_from_before_a_path_change_is_ignored():
    search = PmtuSearch()
    search.start(0.0)
    search.next_probe(0.0)
    search.path_changed(0.1)
    search.probe_acked(1452, 0.2)  # crossed the old path
    assert search.current == BASE_SIZE
    search.timer(1.1)
    assert search.next_probe(1.1) == 1452


def test_a_black_hole_falls_to_the_base_and_probes_the_failed_size_first():
    search = PmtuSearch()
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    assert search.current == 1452
    # Full-size packets lost, small ones still acknowledged...
    assert not search.packet_loss_report(1.0, lost=[1452, 1452], largest_acked=300)
    assert not search.packet_loss_report(1.1, lost=[1452, 1452], largest_acked=0)
    # ...and a later report shows small packets still arrive.
    assert search.packet_loss_report(1.2, lost=[], largest_acked=120)
    assert search.current == BASE_SIZE
    assert search.statistics().black_holes == 1
    assert search.next_probe(1.2) == 1452  # a false alarm would cost one round trip
    search.probe_acked(1452, 1.25)
    assert search.current == 1452


def test_suspects_alone_ask_for_a_base_probe_whose_ack_confirms_the_black_hole():
    search = PmtuSearch()
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    # Only full-size traffic, all of it lost: nothing small to show the path is alive.
    assert not search.packet_loss_report(1.0, lost=[1452] * 3, largest_acked=0)
    assert search.next_probe(1.0) == BASE_SIZE
    assert search.next_probe(1.0) is None
    assert search.deadline == 2.0
    search.probe_acked(BASE_SIZE, 1.05)
    assert search.current == BASE_SIZE
    assert search.statistics().black_holes == 1
    assert search.next_probe(1.05) == 1452


def test_a_lost_confirmation_probe_is_an_outage_and_is_asked_again():
    search = PmtuSearch()
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    search.packet_loss_report(1.0, lost=[1452] * 3, largest_acked=0)
    assert search.next_probe(1.0) == BASE_SIZE
    search.probe_lost(BASE_SIZE, 1.2)
    assert search.current == 1452
    assert search.next_probe(1.2) == BASE_SIZE  # suspects still stand
    search.timer(2.2)  # timed out: asked again
    assert search.next_probe(2.2) == BASE_SIZE
    assert search.current == 1452
    # Once the suspects expire nothing more is asked, reports or not.
    search.timer(40.0)
    assert search.next_probe(40.0) is None
    assert search.deadline is None
    assert search.current == 1452


def test_losses_contradicted_by_a_large_acknowledgement_are_no_black_hole():
    search = PmtuSearch()
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    for i in range(20):
        # Congestion: full-size packets lost, but others of their size get through.
        assert not search.packet_loss_report(1.0 + i, lost=[1452] * 5, largest_acked=1452)
    assert not search.packet_loss_report(30.0, lost=[], largest_acked=100)
    assert search.current == 1452


def test_losses_with_nothing_acknowledged_are_an_outage_not_a_black_hole():
    search = PmtuSearch()
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    for i in range(20):
        assert not search.packet_loss_report(1.0 + i, lost=[1452], largest_acked=0)
    assert search.current == 1452


def test_old_suspects_expire():
    search = PmtuSearch(black_hole_window=30.0)
    search.start(0.0)
    probe_and_answer(search, 0.0, 1500)
    search.packet_loss_report(1.0, lost=[1452, 1452, 1452], largest_acked=0)
    assert not search.packet_loss_report(40.0, lost=[], largest_acked=100)
    assert search.current == 1452


def test_losses_above_the_current_size_are_old_news():
    search = PmtuSearch()
    search.start(0.0)
    now = 0.0
    while search.state is PmtuState.SEARCHING:
        probe_and_answer(search, now, 1412)
    # Packets from before a decrease (larger than current) do not count.
    search.packet_loss_report(1.0, lost=[1452] * 10, largest_acked=0)
    assert not search.packet_loss_report(1.1, lost=[], largest_acked=100)
    assert search.current == 1412


def test_a_maximum_at_the_base_never_probes():
    search = PmtuSearch(maximum=BASE_SIZE)
    search.start(0.0)
    assert search.candidates == ()
    assert search.state is PmtuState.COMPLETE
    assert search.next_probe(0.0) is None
    assert search.deadline is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"maximum": 1199},
        {"base": 1100},
        {"base": 1400, "maximum": 1300},
        {"maximum": 70000},
        {"step": 0},
        {"max_probes": 0},
        {"probe_timeout": 0.0},
        {"raise_interval": -1.0},
        {"black_hole_losses": 0},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        PmtuSearch(**kwargs)


def test_starting_twice_is_misuse():
    search = PmtuSearch()
    search.start(0.0)
    with pytest.raises(RuntimeError):
        search.start(1.0)


# -- a simulated path --------------------------------------------------------------------


class SimulatedPath:
    """A path with an MTU, a round-trip time and a script of probe losses, driving a
    PmtuSearch the way a session would: send what next_probe returns, deliver results one RTT
    later (a lost probe is reported lost, or not, as the script says), fire the timer.

    Checks on every step that the search never uses a size no probe on this path proved."""

    def __init__(
        self,
        search: PmtuSearch,
        mtu: int,
        rtt: float,
        probe_losses: list[bool] | None = None,
        loss_reported: list[bool] | None = None,
    ) -> None:
        self.search = search
        self.mtu = mtu
        self.rtt = rtt
        self.now = 0.0
        self._losses = list(probe_losses or [])
        self._reported = iter(loss_reported or [])
        self._events: list[tuple[float, int, str, int, int]] = []
        self._seq = 0
        self.epoch = 0
        self.proven: set[int] = set()  # sizes acknowledged on the current path
        self.sent: list[tuple[int, bool]] = []  # (size, delivered), in order

    def pto(self) -> float:
        return 1.5 * self.rtt

    def _push(self, at: float, kind: str, size: int) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, size, self.epoch))

    def _send_probes(self) -> None:
        while (size := self.search.next_probe(self.now, pto=self.pto())) is not None:
            lost = self._losses.pop(0) if self._losses else False
            delivered = size <= self.mtu and not lost
            self.sent.append((size, delivered))
            if delivered:
                self._push(self.now + self.rtt, "ack", size)
            elif next(self._reported, True):
                self._push(self.now + 1.25 * self.rtt, "lost", size)

    def check(self) -> None:
        current = self.search.current
        assert current == self.search.base or current in self.proven

    def step(self, until: float) -> bool:
        """Advance to the next event or deadline at or before ``until``; False if none."""
        self._send_probes()
        times = [self._events[0][0]] if self._events else []
        if self.search.deadline is not None:
            times.append(self.search.deadline)
        if not times or min(times) > until:
            return False
        self.now = max(self.now, min(times))
        while self._events and self._events[0][0] <= self.now:
            _, _, kind, size, epoch = heapq.heappop(self._events)
            if kind == "ack":
                if epoch == self.epoch:
                    self.proven.add(size)
                self.search.probe_acked(size, self.now)
            else:
                self.search.probe_lost(size, self.now)
            self.check()
        deadline = self.search.deadline
        if deadline is not None and deadline <= self.now:
            self.search.timer(self.now)
        self.check()
        self._send_probes()
        return True

    def run_until_complete(self, limit: float) -> None:
        while self.search.state is not PmtuState.COMPLETE and self.now < limit:
            if not self.step(limit):
                break

    def run_until(self, until: float) -> None:
        while self.step(until):
            pass
        self.now = max(self.now, until)

    def settle(self) -> None:
        """Run until the loss script is spent, then long enough for a raise search."""
        while self._losses and self.step(math.inf):
            pass
        self.run_until(self.now + 2 * self.search.raise_interval + 100.0)

    def change_path(self, mtu: int) -> None:
        self.epoch += 1
        self.proven = set()
        self.mtu = mtu
        self.search.path_changed(self.now)

    def wrongly_failed(self) -> bool:
        """Did some size the path carries lose MAX_PROBES probes in a row?"""
        run_size, run = None, 0
        for size, delivered in self.sent:
            if size != run_size:
                run_size, run = size, 0
            run = 0 if delivered else run + 1
            if run >= self.search.max_probes and size <= self.mtu:
                return True
        return False


maxima = st.sampled_from([1452, 1472, 1500, 8972])
mtus = st.integers(min_value=BASE_SIZE, max_value=9100)
rtts = st.floats(min_value=0.001, max_value=0.5)


@settings(max_examples=300, deadline=None)
@given(maxima, mtus, rtts, st.lists(st.booleans(), max_size=60), st.lists(st.booleans()))
def test_search_converges_to_the_largest_candidate_the_path_carries(
    maximum, mtu, rtt, probe_losses, loss_reported
):
    search = PmtuSearch(maximum=maximum)
    search.start(0.0)
    path = SimulatedPath(search, mtu, rtt, probe_losses, loss_reported)
    path.run_until_complete(limit=3600.0)
    assert search.state is PmtuState.COMPLETE
    want = expected(search, mtu)
    assert search.current <= want
    if not path.wrongly_failed():
        assert search.current == want
        # Bounded: the top, then a bisection; each size at most MAX_PROBES tries, each try at
        # most one probe timer.
        sizes = 1 + math.ceil(math.log2(len(search.candidates) + 1))
        assert len(path.sent) <= MAX_PROBES * sizes
        assert path.now <= len(path.sent) * max(search.probe_timeout, path.pto()) + rtt
    # Whatever the losses did, the raise timer finds the rest once probes get through.
    path.settle()
    assert search.current == want


@settings(max_examples=200, deadline=None)
@given(maxima, mtus, mtus, rtts, st.lists(st.booleans(), max_size=30))
def test_after_a_path_change_the_search_starts_over_and_reconverges(
    maximum, mtu, new_mtu, rtt, probe_losses
):
    search = PmtuSearch(maximum=maximum)
    search.start(0.0)
    path = SimulatedPath(search, mtu, rtt, probe_losses)
    # The change comes at a random point: after some steps of the first search.
    for _ in range(len(probe_losses) % 7):
        path.step(3600.0)
    path.change_path(new_mtu)
    assert search.current == BASE_SIZE
    path.settle()
    assert search.current == expected(search, new_mtu)


class Traffic:
    """Ordinary packets on a simulated path, and what a session's loss tally would report to
    the search one RTT later: every ``interval`` a burst of ``full`` packets of the current
    size and ``small`` ones of 200 bytes; those above the MTU are lost, and ``drop`` picks
    further losses among the full ones (congestion)."""

    def __init__(self, path: SimulatedPath, full: int, small: int, drops: list[int]) -> None:
        self.path = path
        self.full = full
        self.small = small
        self._drops = iter(drops)
        self.interval = max(path.rtt, 0.01)
        self._next = path.now
        self._inflight: list[tuple[float, list[int], int]] = []

    def run(self, until: float) -> None:
        path, search = self.path, self.path.search
        while self._next <= until:
            path.run_until(self._next)
            size = search.current
            drop = next(self._drops, 0) % (self.full + 1)
            lost = [size] * self.full if size > path.mtu else []
            delivered = self.full - len(lost)
            # Congestion never takes every full-size packet of a burst in these runs.
            drop = min(drop, max(delivered - 1, 0))
            lost += [size] * drop
            delivered -= drop
            largest = max(size if delivered else 0, 200 if self.small else 0)
            self._inflight.append((self._next + path.rtt, lost, largest))
            while self._inflight and self._inflight[0][0] <= self._next:
                _, lost_sizes, largest_acked = self._inflight.pop(0)
                search.packet_loss_report(self._next, lost=lost_sizes, largest_acked=largest_acked)
                path.check()
            self._next += self.interval


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([1452, 1500]),
    st.integers(min_value=BASE_SIZE, max_value=1451),
    rtts,
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=0, max_value=4),  # 0: only full-size traffic, a bulk stream
)
def test_an_mtu_drop_is_a_black_hole_found_within_seconds_then_reconverged(
    maximum, new_mtu, rtt, full, small
):
    search = PmtuSearch(maximum=maximum)
    search.start(0.0)
    path = SimulatedPath(search, 1500, rtt)
    path.run_until_complete(limit=60.0)
    assert search.current == expected(search, 1500)
    before = search.current
    traffic = Traffic(path, full=full, small=small, drops=[])
    traffic.run(path.now + 1.0)
    assert search.statistics().black_holes == 0
    # The MTU drops under the current size, with no path change to tell.
    assert new_mtu < before
    path.mtu = new_mtu
    dropped_at = path.now
    while search.statistics().black_holes == 0 and path.now < dropped_at + 60.0:
        traffic.run(path.now + traffic.interval)
    assert search.statistics().black_holes == 1
    # Three losses, then a report or a confirmation probe showing small packets still
    # arrive, each a round trip or a burst later: well within seconds.
    assert path.now - dropped_at <= 4 * traffic.interval + 2 * rtt + 0.05
    assert search.current <= expected(search, new_mtu)  # the base, or already re-proven
    traffic.run(path.now + 60.0)
    assert search.current == expected(search, new_mtu)
    path.run_until(path.now + 2 * search.raise_interval + 100.0)
    assert search.current == expected(search, new_mtu)


@settings(max_examples=200, deadline=None)
@given(
    rtts,
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=0, max_value=4),
    st.lists(st.integers(min_value=0, max_value=8), max_size=200),
)
def test_congestion_that_leaves_full_size_packets_arriving_is_no_black_hole(
    rtt, full, small, drops
):
    search = PmtuSearch()
    search.start(0.0)
    path = SimulatedPath(search, 1500, rtt)
    path.run_until_complete(limit=60.0)
    traffic = Traffic(path, full=full, small=small, drops=drops)
    traffic.run(path.now + 200 * traffic.interval)
    assert search.statistics().black_holes == 0
    assert search.current == 1452
