"""Tests for tunnel.core.coalesce: runs of TCP segments merged for the TUN, and split again."""

from __future__ import annotations

import struct
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.tcpseg import ACK, DST4, FIN, PSH, SRC4, TIMESTAMPS, tcp_packet
from tunnel.core.coalesce import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    PLAIN,
    coalesce,
    segment,
    segment_count,
)
from tunnel.core.ippacket import ones_complement_sum


def flow(
    sizes: list[int], *, start: int = 1000, psh_last: bool = False, ip_id: int = 7, **kw
) -> list[bytes]:
    """Consecutive segments of one flow with the given payload sizes."""
    out, seq = [], start
    for i, size in enumerate(sizes):
        flags = ACK | (PSH if psh_last and i == len(sizes) - 1 else 0)
        payload = bytes([i % 251]) * size
        out.append(tcp_packet(payload, seq=seq, flags=flags, ip_id=(ip_id + i) & 0xFFFF, **kw))
        seq = (seq + size) & 0xFFFFFFFF
    return out


def delivered(writes: list[tuple[bytes, bytes | bytearray]]) -> list[bytes]:
    """What the kernel makes of the writes: every segment, in write order."""
    return [seg for header, packet in writes for seg in segment(header, packet)]


def test_a_run_of_full_segments_is_one_write_the_kernel_splits_back_exactly() -> None:
    segments = flow([1368] * 10 + [500], psh_last=True)
    writes = coalesce(segments)
    assert len(writes) == 1
    header, packet = writes[0]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH", header)
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM,
        GSO_TCPV4,
        1368,
        20,
        16,
    )
    assert hdr_len == 20 + 20 + len(TIMESTAMPS)
    assert len(packet) == hdr_len + 1368 * 10 + 500
    assert delivered(writes) == segments


def test_ipv6_runs_merge_too() -> None:
    segments = flow([1348] * 5, v6=True)
    writes = coalesce(segments)
    assert [struct.unpack("<BB", h[:2])[1] for h, _ in writes] == [GSO_TCPV6]
    assert delivered(writes) == segments


def test_a_lone_segment_and_anything_not_tcp_pass_as_they_are() -> None:
    lone = tcp_packet(b"x" * 100, seq=5)
    udp = bytes([0x45, 0, 0, 28]) + bytes(5) + bytes([17]) + bytes(18)
    assert coalesce([lone, udp, b"", b"\x60"]) == [
        (PLAIN, lone),
        (PLAIN, udp),
        (PLAIN, b""),
        (PLAIN, b"\x60"),
    ]


def test_what_the_kernel_would_not_merge_stays_apart() -> None:
    base = flow([1000, 1000])
    gap = [base[0], tcp_packet(b"y" * 1000, seq=1000 + 1001)]
    other_ack = [base[0], tcp_packet(b"y" * 1000, seq=2000, ack=100, ip_id=8)]
    other_window = [base[0], tcp_packet(b"y" * 1000, seq=2000, window=501, ip_id=8)]
    other_options = [base[0], tcp_packet(b"y" * 1000, seq=2000, options=b"", ip_id=8)]
    other_ttl = [base[0], tcp_packet(b"y" * 1000, seq=2000, ttl=63, ip_id=8)]
    ecn_mark = [base[0], tcp_packet(b"y" * 1000, seq=2000, tos=3, ip_id=8)]
    longer = [base[0], tcp_packet(b"y" * 1001, seq=2000, ip_id=8)]
    fin = [base[0], tcp_packet(b"y" * 1000, seq=2000, flags=ACK | FIN, ip_id=8)]
    push_first = [tcp_packet(b"x" * 1000, seq=1000, flags=ACK | PSH), base[1]]
    ids_jump = [base[0], tcp_packet(b"y" * 1000, seq=2000, ip_id=50, df=False)]
    for case in (
        gap,
        other_ack,
        other_window,
        other_options,
        other_ttl,
        ecn_mark,
        longer,
        fin,
        push_first,
        ids_jump,
    ):
        writes = coalesce(case)
        assert writes == [(PLAIN, p) for p in case]


def test_a_short_segment_ends_its_run() -> None:
    segments = flow([1000, 400, 1000])
    writes = coalesce(segments)
    assert len(writes) == 2
    assert delivered(writes) == segments


def test_a_run_stops_short_of_the_ip_length_limit() -> None:
    segments = flow([1400] * 60)
    writes = coalesce(segments)
    assert all(len(packet) <= 0xFFFF for _, packet in writes)
    assert len(writes) == 2
    assert delivered(writes) == segments


def test_without_dont_fragment_consecutive_identifications_merge() -> None:
    segments = flow([900] * 4, df=False)
    writes = coalesce(segments)
    assert len(writes) == 1
    assert delivered(writes) == segments


def test_a_packet_that_cannot_merge_is_not_overtaken_by_its_own_flow() -> None:
    data = flow([1000] * 4)
    pure_ack = tcp_packet(b"", seq=3000, ip_id=20)
    segments = [data[0], data[1], pure_ack, data[2], data[3]]
    assert delivered(coalesce(segments)) == segments


@st.composite
def interleaved_flows(draw: st.DrawFn) -> list[bytes]:
    """Up to three flows (v4 and v6), each a run of mostly equal segments with the odd short,
    pushed, lost or repeated one, interleaved in any order."""
    streams = []
    for port in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        mss = draw(st.integers(1, 1400))
        sizes = draw(st.lists(st.sampled_from([mss, mss, mss, max(1, mss // 3)]), max_size=12))
        packets = flow(
            sizes,
            start=draw(st.integers(0, 2**32 - 1)),
            v6=v6,
            sport=1000 + port,
            psh_last=draw(st.booleans()),
            df=draw(st.booleans()),
        )
        if packets and draw(st.booleans()):
            packets.pop(draw(st.integers(0, len(packets) - 1)))  # lost on the way
        if packets and draw(st.booleans()):
            i = draw(st.integers(0, len(packets) - 1))
            packets.insert(i, packets[i])  # retransmitted
        streams.append(packets)
    merged: list[bytes] = []
    while any(streams):
        pick = draw(st.sampled_from([s for s in streams if s]))
        merged.append(pick.pop(0))
    return merged


def _by_flow(packets: list[bytes]) -> dict[bytes, list[bytes]]:
    flows = defaultdict(list)
    for packet in packets:
        key = packet[12:24] if packet[0] >> 4 == 4 else packet[8:44]
        flows[key].append(packet)
    return dict(flows)


@settings(max_examples=300, deadline=None)
@given(interleaved_flows())
def test_every_segment_arrives_once_and_in_order_within_its_flow(packets: list[bytes]) -> None:
    writes = coalesce(packets)
    assert len(writes) <= len(packets)
    assert _by_flow(delivered(writes)) == _by_flow(packets)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=8))
def test_any_bytes_pass_through_without_raising(packets: list[bytes]) -> None:
    writes = coalesce(packets)
    assert len(writes) <= len(packets)
    assert all(packet in packets for header, packet in writes if header == PLAIN)
    assert all(len(header) == 10 for header, _ in writes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=40, max_size=120), min_size=2, max_size=8), st.data())
def test_segments_mutated_anywhere_never_break_it(
    packets: list[bytes], data: st.DataObject
) -> None:
    base = flow([80] * len(packets))
    mutated = []
    for packet, noise in zip(base, packets, strict=True):
        at = data.draw(st.integers(0, len(packet) - 1))
        mutated.append(packet[:at] + noise[:4] + packet[at + 4 :])
    for header, packet in coalesce(mutated):
        if header != PLAIN:
            assert struct.unpack("<BB", header[:2]) in (
                (NEEDS_CSUM, GSO_TCPV4),
                (NEEDS_CSUM, GSO_TCPV6),
            )
            segment(header, packet)


def test_a_checksum_left_to_complete_is_completed() -> None:
    packet = bytearray(tcp_packet(b"abc", seq=1))
    good = bytes(packet)
    pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(packet) - 20)
    packet[36:38] = ones_complement_sum(pseudo).to_bytes(2, "big")
    header = struct.pack("<BBHHHH", NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)
    assert segment(header, packet) == [good]


@settings(max_examples=100, deadline=None)
@given(interleaved_flows())
def test_the_count_of_segments_in_a_write_is_what_the_kernel_makes_of_it(
    packets: list[bytes],
) -> None:
    for header, packet in coalesce(packets):
        assert segment_count(header, packet) == len(segment(header, packet))
