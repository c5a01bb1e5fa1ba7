"""When a pump reads past the first packet of a wake-up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.readahead import BURST_GAP, ReadAhead


def test_a_lone_packet_after_a_quiet_spell_is_read_alone():
    policy = ReadAhead()
    assert not policy.should_drain(100.0)  # first wake-up ever
    policy.last_count = 1
    assert not policy.should_drain(100.0 + 10 * BURST_GAP)


def test_wake_ups_in_quick_succession_are_a_burst():
    policy = ReadAhead()
    policy.should_drain(100.0)
    policy.last_count = 1
    assert policy.should_drain(100.0 + BURST_GAP / 2)


def test_a_wake_up_that_found_several_packets_drains_the_next():
    policy = ReadAhead()
    policy.should_drain(100.0)
    policy.last_count = 5
    assert policy.should_drain(200.0)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 64)), max_size=50))
def test_the_decision_follows_only_the_last_wake_up(steps):
    policy = ReadAhead()
    now, last_wake, last_count = 0.0, float("-inf"), 0
    for gap, count in steps:
        now += gap
        expected = last_count > 1 or now - last_wake < BURST_GAP
        assert policy.should_drain(now) == expected
        policy.last_count = last_count = count
        last_wake = now
