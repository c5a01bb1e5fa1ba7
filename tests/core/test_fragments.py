"""Fragment reassembly: whole datagrams out of any order, strict about overlaps, bounded."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.fragments import Added, Reassembly, Whole

HEADER = b"H" * 20


def split(payload: bytes, size: int) -> list[tuple[int, bool, bytes]]:
    """(offset, more, data) fragments of ``payload``, ``size`` bytes each but the last."""
    if not payload:
        return [(0, False, b"")]
    return [
        (at, at + size < len(payload), payload[at : at + size])
        for at in range(0, len(payload), size)
    ]


def feed(
    reassembly: Reassembly, pieces: list[tuple[int, bool, bytes]], key: object = "k", now=0.0
) -> list[Whole | Added]:
    return [
        reassembly.add(key, offset, more, data, HEADER if offset == 0 else b"", now)
        for offset, more, data in pieces
    ]


@settings(max_examples=300)
@given(
    payload=st.binary(max_size=6000),
    size=st.integers(1, 200).map(lambda n: n * 8),
    seed=st.integers(0, 2**32),
    duplicates=st.integers(0, 3),
)
def test_any_order_with_duplicates_gives_the_datagram_back(payload, size, seed, duplicates):
    rng = random.Random(seed)
    pieces = split(payload, size)
    arrival = pieces + [rng.choice(pieces) for _ in range(duplicates)]
    rng.shuffle(arrival)
    reassembly = Reassembly()
    results = feed(reassembly, arrival)
    wholes = [r for r in results if isinstance(r, Whole)]
    assert wholes and set(wholes) == {Whole(HEADER, payload)}
    # Whole as soon as the last missing fragment arrived, and not before. Late duplicates
    # start the datagram afresh (complete again only if every fragment comes again).
    done = max(arrival.index(piece) for piece in pieces)
    assert results.index(wholes[0]) == done
    assert all(r in (Added.QUEUED, Added.DUPLICATE) for r in results[:done])
    if done == len(results) - 1:
        assert len(reassembly) == 0 and reassembly.buffered_bytes == 0


def test_datagrams_are_kept_apart_by_key():
    reassembly = Reassembly()
    a, b = split(b"a" * 24, 8), split(b"b" * 24, 8)
    assert feed(reassembly, a[:2], key="a") == [Added.QUEUED] * 2
    assert feed(reassembly, b, key="b")[-1] == Whole(HEADER, b"b" * 24)
    assert feed(reassembly, a[2:], key="a") == [Whole(HEADER, b"a" * 24)]


@pytest.mark.parametrize(
    "second",
    [
        (4 * 8, True, b"x" * 16),  # overlaps the first's tail
        (0, True, b"y" * 8),  # the same offset, other bytes
        (48, False, b"z" * 8),  # an end before the first fragment's end
    ],
)
def test_overlap_or_contradiction_discards_the_datagram(second):
    reassembly = Reassembly()
    assert feed(reassembly, [(0, True, b"a" * 56)]) == [Added.QUEUED]
    assert feed(reassembly, [second]) == [Added.DISCARDED]
    assert len(reassembly) == 0 and reassembly.buffered_bytes == 0


def test_two_different_ends_discard_the_datagram():
    reassembly = Reassembly()
    assert feed(reassembly, [(16, False, b"a" * 8)]) == [Added.QUEUED]
    assert feed(reassembly, [(32, False, b"b" * 8)]) == [Added.DISCARDED]
    assert len(reassembly) == 0


@pytest.mark.parametrize(
    "fragment",
    [
        (0, True, b"a" * 12),  # not the last, and not a multiple of 8
        (0, True, b""),  # an empty fragment that is not the last
        (65528, False, b"a" * 16),  # past 65535
        (-8, True, b"a" * 8),
    ],
)
def test_malformed_fragments_are_discarded(fragment):
    assert feed(Reassembly(), [fragment]) == [Added.DISCARDED]


def test_limits_refuse_new_fragments_and_keep_the_old():
    reassembly = Reassembly(max_datagrams=2, max_bytes=80, max_fragments=2)
    assert feed(reassembly, [(0, True, b"a" * 8)], key=1) == [Added.QUEUED]
    assert feed(reassembly, [(0, True, b"b" * 8)], key=2) == [Added.QUEUED]
    assert feed(reassembly, [(0, True, b"c" * 8)], key=3) == [Added.REFUSED]  # datagrams
    assert feed(reassembly, [(8, True, b"a" * 48)], key=1) == [Added.QUEUED]
    assert feed(reassembly, [(8, True, b"b" * 24)], key=2) == [Added.REFUSED]  # bytes
    assert feed(reassembly, [(8, True, b"b" * 8), (16, True, b"b" * 8)], key=2) == [
        Added.QUEUED,
        Added.REFUSED,  # fragments in one datagram
    ]
    assert reassembly.buffered_bytes == 72 and len(reassembly) == 2


def test_incomplete_datagrams_expire():
    reassembly = Reassembly(timeout=5.0)
    feed(reassembly, [(0, True, b"a" * 8)], key=1, now=10.0)
    feed(reassembly, [(0, True, b"b" * 8)], key=2, now=12.0)
    assert reassembly.next_expiry() == 15.0
    assert reassembly.expire(14.9) == 0
    assert reassembly.expire(15.0) == 1
    assert reassembly.next_expiry() == 17.0
    # A fragment arriving after its datagram expired starts afresh.
    assert feed(reassembly, [(8, False, b"b" * 8)], key=2, now=17.5) == [Added.QUEUED]
    assert reassembly.expired == 2 and len(reassembly) == 1
    assert reassembly.buffered_bytes == 8


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(-16, 70000),
            st.booleans(),
            st.binary(max_size=64),
            st.floats(0, 20),
        ),
        max_size=60,
    )
)
def test_arbitrary_fragments_never_raise_and_stay_bounded(fragments):
    reassembly = Reassembly(
        max_datagrams=3, max_per_source=2, max_bytes=256, max_fragments=8, timeout=5.0
    )
    now = 0.0
    for key, offset, more, data, step in fragments:
        now += step
        result = reassembly.add(key, offset, more, data, HEADER, now, source=key % 2)
        assert isinstance(result, (Whole, Added))
        assert len(reassembly) <= 3
        assert 0 <= reassembly.buffered_bytes <= 256
    now += 6.0
    reassembly.expire(now)
    assert len(reassembly) == 0 and reassembly.buffered_bytes == 0
    # every sender has its whole allowance back
    for key in (10, 12):
        assert reassembly.add(key, 0, True, b"x" * 8, HEADER, now, source=0) is Added.QUEUED


def test_one_sender_cannot_take_all_the_room():
    reassembly = Reassembly(max_datagrams=4, max_per_source=2)
    for ident in range(3):
        result = reassembly.add(("greedy", ident), 0, True, b"a" * 8, HEADER, 0.0, "greedy")
        assert result is (Added.QUEUED if ident < 2 else Added.REFUSED)
    # another sender still gets in, and the greedy one's next datagram once one is whole
    assert reassembly.add("other", 0, True, b"b" * 8, HEADER, 0.0, "other") is Added.QUEUED
    whole = reassembly.add(("greedy", 0), 8, False, b"c", b"", 0.0, "greedy")
    assert whole == Whole(HEADER, b"a" * 8 + b"c")
    assert reassembly.add(("greedy", 9), 0, True, b"d" * 8, HEADER, 0.0, "greedy") is (Added.QUEUED)
