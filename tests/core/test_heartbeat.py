"""Tests for tunnel.core.heartbeat: pings, one rebind per silence, lost after the timeout, in
virtual time."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.heartbeat import Decision, HeartbeatPolicy

NOTHING = Decision()
PING = Decision(ping=True)
REBIND = Decision(rebind=True)
LOST = Decision(lost=True)


def run(policy: HeartbeatPolicy, now: float, pongs=(), until=math.inf, steps=10_000):
    """Drive ``policy`` as the client's heartbeat task does: decide, then sleep until
    wake_at(); the pongs (times) arrive while it sleeps. Returns [(time, decision)] up to the
    loss or ``until``."""
    pongs = sorted(pongs)
    log = []
    for _ in range(steps):
        decision = policy.decide(now)
        log.append((now, decision))
        if decision.lost:
            return log
        wake = policy.wake_at()
        assert wake > now, f"wake_at {wake!r} is not after {now!r}"
        while pongs and pongs[0] < wake:
            policy.on_pong(max(now, pongs.pop(0)))
        if wake > until:
            return log
        now = wake
    raise AssertionError("the heartbeat never settled")


def test_a_silent_path_pings_rebinds_once_then_is_lost():
    # As in tests/daemon/test_inmemory_peers.py: interval 1 s, timeout 3 s, rebind after 1.5 s.
    policy = HeartbeatPolicy(1.0, 3.0, now=100.0)
    assert policy.rebind_after == 1.5
    assert run(policy, 100.0) == [
        (100.0, PING),
        (101.0, PING),
        (101.5, REBIND),
        (102.0, PING),
        (103.0, LOST),
    ]


def test_the_first_decision_pings_at_once_and_the_next_after_an_interval():
    policy = HeartbeatPolicy(10.0, 30.0, now=5.0)
    assert policy.decide(5.0) == PING
    assert policy.wake_at() == 15.0
    assert policy.decide(5.0) == NOTHING  # asked again at once: nothing new
    assert policy.decide(14.9) == NOTHING
    assert policy.decide(15.0) == PING
    assert policy.next_ping == 25.0


def test_pongs_keep_a_session_alive_without_rebinds():
    policy = HeartbeatPolicy(1.0, 3.0, now=0.0)
    pongs = [k + 0.05 for k in range(100)]  # each ping answered after 50 ms
    log = run(policy, 0.0, pongs=pongs, until=100.0)
    decisions = [d for _, d in log]
    assert LOST not in decisions and not any(d.rebind for d in decisions)
    assert [t for t, d in log if d.ping] == [float(k) for k in range(101)]


def test_one_rebind_per_silence_and_another_after_a_pong():
    policy = HeartbeatPolicy(1.0, 10.0, now=0.0)  # rebind after 1.5 s
    assert policy.decide(0.0) == PING
    assert policy.decide(1.5) == Decision(rebind=True, ping=True)
    for now in (2.5, 3.5, 9.5):
        assert policy.decide(now) == PING  # the same silence: no second rebind
    policy.on_pong(9.75)
    assert policy.wake_at() == 10.5  # the next ping; the new silence's rebind after it
    assert policy.decide(10.5) == PING
    assert policy.wake_at() == 11.25
    assert policy.decide(11.25) == REBIND
    assert policy.decide(11.4) == NOTHING
    assert policy.decide(19.75) == LOST


def test_rebind_after_is_one_pong_late_but_at_most_half_the_timeout():
    assert HeartbeatPolicy(10.0, 30.0, now=0.0).rebind_after == 15.0
    assert HeartbeatPolicy(10.0, 15.0, now=0.0).rebind_after == 7.5


def test_a_pong_while_rebinding_counts_before_the_next_wake_up():
    # The shell awaits the new socket between deciding and asking wake_at(): a pong in that
    # gap starts a new silence, with its own rebind, and moves the loss.
    policy = HeartbeatPolicy(10.0, 12.0, now=0.0)  # rebind after 6 s
    assert policy.decide(0.0) == PING
    policy.on_pong(0.25)
    assert policy.wake_at() == 6.25
    assert policy.decide(6.25) == REBIND
    policy.on_pong(6.5)
    assert policy.wake_at() == 10.0
    assert policy.decide(10.0) == PING
    assert policy.wake_at() == 12.5
    assert policy.decide(12.5) == REBIND
    assert policy.wake_at() == 18.5
    assert policy.decide(18.5) == LOST


def test_lost_at_the_deadline_despite_float_rounding():
    # (253.13656587308097 + 3.0) - 253.13656587308097 < 3.0: a policy comparing durations
    # would say "not yet" at the wake-up it asked for, and be woken there again and again.
    pong = 253.13656587308097
    assert (pong + 3.0) - pong < 3.0
    policy = HeartbeatPolicy(1.0, 3.0, now=pong)
    policy.decide(pong)
    assert policy.decide(pong + 3.0) == LOST


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [(0.0, 3.0), (-1.0, 3.0), (1.0, 0.0), (math.nan, 3.0), (1.0, math.inf), (math.inf, 3.0)],
)
def test_bad_timers_are_refused(interval, timeout):
    with pytest.raises(ValueError, match="heartbeat"):
        HeartbeatPolicy(interval, timeout, now=0.0)


intervals = st.floats(0.01, 100.0)
ratios = st.floats(0.1, 50.0)  # timeout / interval (the config wants > 1; the policy does not)
starts = st.floats(0.0, 1e5)
gaps = st.lists(st.floats(0.0, 5.0), max_size=40)  # between pongs, in intervals


def pong_times(start, interval, gaps):
    times, t = [], start
    for gap in gaps:
        t += gap * interval
        times.append(t)
    return times


@settings(max_examples=300)
@given(intervals, ratios, starts, gaps)
def test_properties_of_a_heartbeat_in_virtual_time(interval, ratio, start, gap_list):
    timeout = interval * ratio
    policy = HeartbeatPolicy(interval, timeout, now=start)
    pongs = pong_times(start, interval, gap_list)
    pings, rebound_for = [], []
    last_pong = start
    now = start
    for _ in range(20_000):
        decision = policy.decide(now)
        # Never lost before `timeout` of silence; lost the moment it is reached.
        assert decision.lost == (now >= last_pong + timeout)
        if decision.lost:
            assert now == last_pong + timeout  # not a wake-up late
            assert now <= pings[-1] + interval  # no ping was skipped on the way
            break
        if decision.rebind:
            assert now >= last_pong + policy.rebind_after
            assert last_pong not in rebound_for  # at most one rebind per silence
            rebound_for.append(last_pong)
        if decision.ping:
            pings.append(now)
        wake = policy.wake_at()
        assert wake > now  # always in the future: the caller never spins
        while pongs and pongs[0] < wake:
            pong = max(now, pongs.pop(0))
            # A silence that lasted rebind_after before this pong had its rebind.
            if pong > last_pong + policy.rebind_after:
                assert last_pong in rebound_for
            policy.on_pong(pong)
            last_pong = pong
        now = wake
        if not pongs and now > last_pong + timeout + interval:
            raise AssertionError("silence past the timeout, not lost")
    else:
        raise AssertionError("the heartbeat never got lost, with no pongs left")
    # Pings every interval exactly, from the start.
    assert pings[0] == start
    assert all(b == a + interval for a, b in zip(pings, pings[1:], strict=False))
