"""The benchmark's pure parts: parsing tool output and combining interleaved ping rounds."""

from __future__ import annotations

import pytest

from tunnel.testing.benchharness import BenchError, combine_pings, parse_ping, ping_order

PING_OUTPUT = """PING 10.78.0.1 (10.78.0.1) 56(84) bytes of data.

--- 10.78.0.1 ping statistics ---
10 packets transmitted, 9 received, 10% packet loss, time 452ms
rtt min/avg/max/mdev = 0.812/1.042/1.503/0.190 ms
"""


def test_ping_summary_is_parsed():
    assert parse_ping(PING_OUTPUT) == {
        "min_ms": 0.812, "avg_ms": 1.042, "max_ms": 1.503, "mdev_ms": 0.19,
        "sent": 10, "received": 9,
    }
    with pytest.raises(BenchError):
        parse_ping("ping: connect: Network is unreachable")


def test_rounds_combine_into_the_average_over_every_answer():
    rounds = [
        {"min_ms": 0.9, "avg_ms": 1.0, "max_ms": 1.2, "sent": 10, "received": 10},
        {"min_ms": 0.7, "avg_ms": 2.0, "max_ms": 3.0, "sent": 10, "received": 5},
    ]
    combined = combine_pings(rounds)
    assert combined["avg_ms"] == pytest.approx((10 * 1.0 + 5 * 2.0) / 15)
    assert (combined["min_ms"], combined["max_ms"]) == (0.7, 3.0)
    assert (combined["sent"], combined["received"], combined["rounds"]) == (20, 15, 2)
    with pytest.raises(BenchError):
        combine_pings([{"min_ms": 0, "avg_ms": 0, "max_ms": 0, "sent": 10, "received": 0}])


def test_every_contender_takes_its_turn_to_go_first():
    names = ["tunnel", "wireguard-go", "openvpn"]
    firsts = [ping_order(names, i)[0] for i in range(6)]
    assert firsts == names * 2
    assert all(sorted(ping_order(names, i)) == sorted(names) for i in range(6))
