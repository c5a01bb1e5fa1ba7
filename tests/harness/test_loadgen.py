"""The load generator's pure parts: percentiles, ping lines, the echo packets it builds."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from bench.loadgen import load_sources, parse_ping_lines, percentile
from bench.loadgen_worker import CountingTun, echo_request, is_echo_reply
from tunnel.core.ippacket import internet_checksum
from tunnel.testing.fakes import FakeTun


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0


@given(st.lists(st.floats(0, 1e6), min_size=1), st.floats(0, 1))
def test_percentile_is_one_of_the_values(values, fraction):
    assert percentile(values, fraction) in values


def test_ping_lines_without_the_summary_count_what_came_back():
    text = (
        "64 bytes from 10.80.0.1: icmp_seq=1 ttl=64 time=1.20 ms\n"
        "64 bytes from 10.80.0.1: icmp_seq=3 ttl=64 time=900 ms\n"
    )
    result = parse_ping_lines(text)
    assert result["answered"] == 2 and result["sent"] == 3  # seq 2 was lost
    assert result["rtt_max_ms"] == 900.0
    summary = text + "\n--- 10.80.0.1 ping statistics ---\n5 packets transmitted, 2 received\n"
    assert parse_ping_lines(summary)["sent"] == 5


def test_echo_request_is_a_valid_ipv4_icmp_echo():
    src, dst = ipaddress.IPv4Address("10.80.0.9").packed, ipaddress.IPv4Address("10.80.0.1").packed
    packet = echo_request(src, dst, 7, 1)
    assert packet[12:16] == src and packet[16:20] == dst and packet[9] == 1
    assert internet_checksum(packet[:20]) == 0 and internet_checksum(packet[20:]) == 0
    assert packet[20] == 8 and not is_echo_reply(packet)
    reply = packet[:20] + b"\x00" + packet[21:]
    assert is_echo_reply(reply)
    assert not is_echo_reply(b"\x45" + b"\x00" * 10)


def test_load_sources_are_distinct_addresses_on_one_slash_16():
    sources = load_sources(600)
    assert len(set(sources)) == 600
    assert all(
        ipaddress.ip_interface(s).network == ipaddress.ip_network("10.96.0.0/16") for s in sources
    )


def test_the_counting_tun_takes_packets_every_way_a_client_session_hands_them_over():
    # What a session calls on a TUN device (the fake's public face) the counter has too.
    public = {name for name in vars(FakeTun) if not name.startswith("_")}
    needed = public - {"inject", "wait_written", "closed", "close", "wait_readable"}
    assert needed <= set(dir(CountingTun))
    src, dst = ipaddress.IPv4Address("10.80.0.1").packed, ipaddress.IPv4Address("10.80.0.9").packed
    request = echo_request(src, dst, 7, 1)
    reply = request[:20] + b"\x00" + request[21:]
    tun = CountingTun()
    tun.queue(reply)
    tun.write(reply)
    tun.flush()
    assert tun.echo_replies == 2 and tun.read_batch() == []
