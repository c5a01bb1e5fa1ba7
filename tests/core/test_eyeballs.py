import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.eyeballs import (
    DEFAULT_ATTEMPT_DELAY_S,
    MAX_ATTEMPT_DELAY_S,
    MIN_ATTEMPT_DELAY_S,
    attempt_delay,
    is_ipv6,
    order_addresses,
)

# Linux's numbers; the module only groups by them.
INET, INET6 = 2, 10


def v4(last: int, port: int = 4433):
    return (INET, (f"192.0.2.{last}", port))


def v6(last: int, port: int = 4433):
    return (INET6, (f"2001:db8::{last:x}", port, 0, 0))


addresses = st.lists(
    st.one_of(st.builds(v4, st.integers(1, 6)), st.builds(v6, st.integers(1, 6))), max_size=16
)


def first_occurrences(infos):
    return list(dict.fromkeys(infos))


def of_family(entries, family):
    return [e for e in entries if e[0] == family]


def assert_interleaved(ordered, lead):
    """Families alternate, ``lead`` first, until one runs out; the rest is the other."""
    fours, sixes = len(of_family(ordered, INET)), len(of_family(ordered, INET6))
    both = 2 * min(fours, sixes)
    other = INET if lead == INET6 else INET6
    expected = [lead, other] * (both // 2)
    assert [e[0] for e in ordered[:both]] == expected
    assert len({e[0] for e in ordered[both:]}) <= 1


def test_interleaves_starting_with_ipv6_and_drops_duplicates():
    infos = [v4(1), v4(2), v4(1), v4(3), v6(1), v6(2), v6(1)]
    assert order_addresses(infos) == [v6(1), v4(1), v6(2), v4(2), v4(3)]


def test_one_family_keeps_its_order():
    assert order_addresses([v4(3), v4(1), v4(2)]) == [v4(3), v4(1), v4(2)]
    assert order_addresses([]) == []


def test_same_host_other_port_is_another_address():
    assert order_addresses([v4(1, 1), v4(1, 2)]) == [v4(1, 1), v4(1, 2)]


def test_the_last_winner_goes_first_and_its_family_leads():
    infos = [v6(1), v6(2), v4(1), v4(2)]
    assert order_addresses(infos, prefer=v4(2)) == [v4(2), v6(1), v4(1), v6(2)]
    assert order_addresses(infos, prefer=v6(2)) == [v6(2), v4(1), v6(1), v4(2)]


def test_a_winner_the_name_no_longer_has_is_ignored():
    infos = [v4(1), v6(1)]
    assert order_addresses(infos, prefer=v4(9)) == [v6(1), v4(1)]


def test_ipv6_is_read_from_the_address():
    assert is_ipv6(v6(1)) and not is_ipv6(v4(1))
    assert is_ipv6((INET6, ("::ffff:192.0.2.1", 1, 0, 0)))


@given(addresses)
def test_every_address_appears_once(infos):
    ordered = order_addresses(infos)
    assert len(ordered) == len(set(ordered)) == len(set(infos))
    assert set(ordered) == set(infos)


@given(addresses)
def test_each_family_keeps_its_own_order(infos):
    ordered = order_addresses(infos)
    for family in (INET, INET6):
        assert of_family(ordered, family) == of_family(first_occurrences(infos), family)


@given(addresses)
def test_ipv6_first_and_families_alternate_while_both_remain(infos):
    ordered = order_addresses(infos)
    if any(e[0] == INET6 for e in infos):
        assert ordered[0][0] == INET6
    assert_interleaved(ordered, INET6)


@given(addresses, st.data())
def test_a_preferred_address_leads_and_the_rest_keep_their_order(infos, data):
    prefer = data.draw(st.sampled_from(infos)) if infos else v4(1)
    ordered = order_addresses(infos, prefer=prefer)
    assert set(ordered) == set(infos)
    if not infos:
        return
    assert ordered[0] == prefer
    assert_interleaved(ordered, prefer[0])
    for family in (INET, INET6):
        unique = of_family(first_occurrences(infos), family)
        assert [e for e in of_family(ordered, family) if e != prefer] == [
            e for e in unique if e != prefer
        ]


@given(addresses, st.none() | st.builds(v4, st.integers(1, 6)) | st.builds(v6, st.integers(1, 6)))
def test_ordering_an_ordered_list_changes_nothing(infos, prefer):
    ordered = order_addresses(infos, prefer=prefer)
    assert order_addresses(ordered, prefer=prefer) == ordered


def test_attempt_delay_without_history_is_the_rfc_default():
    assert attempt_delay() == DEFAULT_ATTEMPT_DELAY_S == 0.25
    for nonsense in (math.nan, math.inf, -1.0):
        assert attempt_delay(nonsense) == DEFAULT_ATTEMPT_DELAY_S


@pytest.mark.parametrize(
    ("rtt", "expected"), [(0.0, 0.1), (0.01, 0.1), (0.08, 0.16), (0.5, 1.0), (5.0, 2.0)]
)
def test_attempt_delay_follows_the_rtt_within_the_rfc_bounds(rtt, expected):
    assert attempt_delay(rtt) == pytest.approx(expected)


@given(st.floats(min_value=0, max_value=1e9))
def test_attempt_delay_is_always_within_bounds(rtt):
    assert MIN_ATTEMPT_DELAY_S <= attempt_delay(rtt) <= MAX_ATTEMPT_DELAY_S
