import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.ratelimit import FailureLimiter, TokenBucket


def test_blocks_after_burst_and_drains_over_time():
    limiter = FailureLimiter(burst=3, rate=1.0)
    assert not limiter.failed("a", 0.0)
    assert not limiter.failed("a", 0.0)
    assert limiter.failed("a", 0.0)  # the third failure crosses the limit
    assert limiter.blocked("a", 0.0)
    assert limiter.blocked("a", 0.5)
    assert not limiter.blocked("a", 1.01)  # drained one unit
    assert not limiter.blocked("b", 0.0)  # others are not affected


def test_reports_crossing_only_once():
    limiter = FailureLimiter(burst=2, rate=0.1)
    results = [limiter.failed("k", 0.0) for _ in range(5)]
    assert results == [False, True, False, False, False]


def test_memory_is_bounded_oldest_forgotten():
    limiter = FailureLimiter(burst=1, rate=0.001, max_keys=10)
    for i in range(100):
        limiter.failed(i, float(i))
    assert len(limiter) == 10
    assert limiter.blocked(99, 99.0)
    assert not limiter.blocked(0, 99.0)


def test_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        FailureLimiter(burst=0)


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 0.5))))
def test_never_blocks_a_key_that_never_failed(events):
    limiter = FailureLimiter(burst=2, rate=1.0)
    now = 0.0
    for key, step in events:
        now += step
        limiter.failed(key, now)
    assert not limiter.blocked("never", now)


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


@given(st.lists(st.floats(min_value=0, max_value=10), max_size=200))
def test_token_bucket_never_exceeds_burst_plus_rate_times_time(gaps):
    bucket = TokenBucket(rate=5.0, burst=4.0)
    now = 0.0
    taken = 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
    assert taken <= 4 + 5.0 * now + 1e-9


def test_token_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0.5)
