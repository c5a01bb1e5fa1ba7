import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.backoff import Backoff, reconnect_delay


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0)],
)
def test_reconnect_delay_without_jitter(attempt, expected):
    assert reconnect_delay(attempt, 0.0) == expected


def test_reconnect_delay_jitter_adds_up_to_half_a_second():
    assert reconnect_delay(1, 0.5) == 1.25
    assert reconnect_delay(10, 0.999) == pytest.approx(60.4995)
    assert reconnect_delay(10, 0.999) < 60.5


def test_reconnect_delay_huge_attempt_is_capped():
    assert reconnect_delay(10**6, 0.0) == 60.0
    assert reconnect_delay(10**100, 0.25) == 60.125


@pytest.mark.parametrize(
    ("attempt", "jitter"),
    [(0, 0.0), (-1, 0.0), (1, -0.1), (1, 1.0), (1, 2.0), (1, math.nan)],
)
def test_reconnect_delay_rejects_bad_arguments(attempt, jitter):
    with pytest.raises(ValueError):
        reconnect_delay(attempt, jitter)


@given(st.integers(min_value=1, max_value=10**4), st.floats(min_value=0.0, max_value=1.0))
def test_reconnect_delay_formula(attempt, jitter):
    if jitter >= 1.0:
        return
    delay = reconnect_delay(attempt, jitter)
    assert delay == min(2.0 ** min(attempt - 1, 100), 60.0) + jitter * 0.5
    assert 1.0 <= delay <= 60.5  # float rounding may reach the bound


@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0.0, max_value=0.999))
def test_reconnect_delay_never_decreases_with_attempts(attempt, jitter):
    assert reconnect_delay(attempt, jitter) <= reconnect_delay(attempt + 1, jitter)


def test_backoff_counts_attempts_and_resets():
    backoff = Backoff(random.Random(1))
    assert backoff.attempts == 0
    delays = [backoff.next_delay() for _ in range(9)]
    assert backoff.attempts == 9
    expected = [1, 2, 4, 8, 16, 32, 60, 60, 60]
    for delay, base in zip(delays, expected, strict=True):
        assert base <= delay < base + 0.5
    backoff.reset()
    assert backoff.attempts == 0
    assert 1.0 <= backoff.next_delay() < 1.5
    assert backoff.attempts == 1


def test_backoff_matches_reconnect_delay_with_same_rng():
    backoff = Backoff(random.Random(42))
    twin = random.Random(42)
    for attempt in range(1, 12):
        assert backoff.next_delay() == reconnect_delay(attempt, twin.random())


def test_backoff_seeded_is_reproducible():
    a, b = Backoff(random.Random(7)), Backoff(random.Random(7))
    assert [a.next_delay() for _ in range(5)] == [b.next_delay() for _ in range(5)]


def test_backoff_custom_policy():
    backoff = Backoff(random.Random(0), base=0.1, cap=0.5, max_jitter=0.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_backoff_zero_policy_for_tests():
    backoff = Backoff(random.Random(0), base=0.0, cap=0.0, max_jitter=0.0)
    assert {backoff.next_delay() for _ in range(70)} == {0.0}


def test_backoff_default_rngs_are_not_shared():
    assert Backoff().rng is not Backoff().rng


@pytest.mark.parametrize("field", ["base", "cap", "max_jitter"])
@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_backoff_rejects_negative_settings(field, value):
    with pytest.raises(ValueError, match=field):
        Backoff(**{field: value})


def test_backoff_survives_a_very_long_outage():
    backoff = Backoff(random.Random(3))
    for _ in range(2000):
        delay = backoff.next_delay()
    assert 60.0 <= delay <= 60.5
