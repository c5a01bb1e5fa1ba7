"""The benchmark's pure parts: parsing tool output, interleaving the contenders, combining runs."""

from __future__ import annotations

import pytest

from bench.harness import (
    FIGURES,
    BenchError,
    combine_pings,
    parse_ping,
    throughput_metrics,
    throughput_schedule,
    turn_order,
)

PING_OUTPUT = """PING 10.78.0.1 (10.78.0.1) 56(84) bytes of data.

--- 10.78.0.1 ping statistics ---
10 packets transmitted, 9 received, 10% packet loss, time 452ms
rtt min/avg/max/mdev = 0.812/1.042/1.503/0.190 ms
"""


def test_ping_summary_is_parsed():
    assert parse_ping(PING_OUTPUT) == {
        "min_ms": 0.812,
        "avg_ms": 1.042,
        "max_ms": 1.503,
        "mdev_ms": 0.19,
        "sent": 10,
        "received": 9,
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
    firsts = [turn_order(names, i)[0] for i in range(6)]
    assert firsts == names * 2
    assert all(sorted(turn_order(names, i)) == sorted(names) for i in range(6))


def test_throughput_runs_go_figure_by_figure_with_turns():
    names = ["tunnel", "wireguard-go", "openvpn"]
    schedule = throughput_schedule(names)
    assert len(schedule) == 4 * len(names)
    figures = [key for key, *_ in schedule]
    # each figure is measured for every contender back to back
    assert figures == [key for key, _, _ in FIGURES for _ in names]
    firsts = [schedule[i * len(names)][3] for i in range(4)]
    assert firsts == [*names, names[0]]
    assert {(key, reverse, flows) for key, reverse, flows, _ in schedule} == set(FIGURES)


def test_cpu_per_gb_is_over_all_runs():
    runs = {
        "tcp_up_1": {"mbit_s": 500.0, "bytes": 1e9, "cpu_server_s": 10.0, "cpu_client_s": 8.0},
        "tcp_up_4": {"mbit_s": 600.0, "bytes": 3e9, "cpu_server_s": 20.0, "cpu_client_s": 40.0},
    }
    metrics = throughput_metrics(runs, has_pids=True)
    assert metrics["tcp_up_1"] == 500.0 and metrics["tcp_up_4"] == 600.0
    assert metrics["cpu_server_s_per_gb"] == pytest.approx(7.5)
    assert metrics["cpu_client_s_per_gb"] == pytest.approx(12.0)
    assert "cpu_server_s_per_gb" not in throughput_metrics(runs, has_pids=False)
