"""The fault-injecting UDP relay, on real loopback sockets.

Datagrams on loopback are delivered inside ``sendto``, so once every task is blocked
(``wait_all_tasks_blocked``) everything sent so far has been relayed: the counting tests need
no sleeps. The timing tests (delay) use the real clock with generous bounds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import tool_argv
from tests.support.relay import UdpRelay, _answer_line, apply_command, send_command

HOST = "127.0.0.1"
BOUND = 10  # seconds any of these tests may take


UdpFactory = Callable[[], trio.socket.SocketType]


@pytest.fixture
def new_udp() -> Iterator[UdpFactory]:
    """Makes UDP sockets bound to a free loopback port; closes them after the test."""
    made: list[socket.socket] = []

    def make() -> trio.socket.SocketType:
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        made.append(raw)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        raw.bind((HOST, 0))
        return trio.socket.from_stdlib_socket(raw)

    yield make
    # the trio run is over: close the plain sockets underneath
    for raw in made:
        raw.close()


def drain(sock: trio.socket.SocketType) -> list[tuple[bytes, Any]]:
    """Every datagram already waiting on ``sock``."""
    out = []
    while True:
        try:
            out.append(sock._sock.recvfrom(65535))
        except BlockingIOError:
            return out


@asynccontextmanager
async def relay_to(upstream: Any, **settings: Any) -> AsyncIterator[tuple[UdpRelay, Any]]:
    relay = UdpRelay((HOST, 0), upstream[:2], rng=random.Random(7), **settings)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(relay.run)
            yield relay, address
            nursery.cancel_scope.cancel()


async def echo(sock: trio.socket.SocketType, sources: list[Any]) -> None:
    while True:
        data, peer = await sock.recvfrom(65535)
        sources.append(peer)
        await sock.sendto(b"echo:" + data, peer)


async def send_paced(sock: trio.socket.SocketType, target: Any, payloads: list[bytes]) -> None:
    """Send, letting the relay catch up every 64 datagrams (no kernel buffer overflows)."""
    for i, payload in enumerate(payloads):
        await sock.sendto(payload, target)
        if i % 64 == 63:
            await trio.testing.wait_all_tasks_blocked()
    await trio.testing.wait_all_tasks_blocked()


def seqs(datagrams: list[tuple[bytes, Any]]) -> list[int]:
    return [struct.unpack("!I", data[:4])[0] for data, _ in datagrams]


def numbered(n: int) -> list[bytes]:
    return [struct.pack("!I", i) + b"x" * 100 for i in range(n)]


# --- forwarding ------------------------------------------------------------------------------


async def test_forwards_both_ways_with_one_upstream_source_per_client(new_udp: UdpFactory) -> None:
    server = new_udp()
    sources: list[Any] = []
    a, b = new_udp(), new_udp()
    async with trio.open_nursery() as outer:
        outer.start_soon(echo, server, sources)
        async with relay_to(server.getsockname()) as (relay, address):
            await a.sendto(b"from-a", address)
            await b.sendto(b"from-b", address)
            assert await a.recv(100) == b"echo:from-a"
            assert await b.recv(100) == b"echo:from-b"
            await a.sendto(b"again", address)
            assert await a.recv(100) == b"echo:again"

            # the server saw two sources, the relay's, one per client, stable per client
            assert len(set(sources)) == 2
            assert sources[0] == sources[2]
            assert set(sources) == set(relay.upstream_addresses())
            assert not set(sources) & {a.getsockname(), b.getsockname()}
            stats = relay.statistics()
            assert (stats.up.forwarded, stats.down.forwarded, stats.flows) == (3, 3, 2)
            assert stats.dropped == 0
            assert stats.up.bytes_forwarded == len(b"from-a" + b"from-b" + b"again")
        outer.cancel_scope.cancel()


async def test_large_datagrams_pass_whole(new_udp: UdpFactory) -> None:
    server = new_udp()
    client = new_udp()
    async with relay_to(server.getsockname()) as (_, address):
        await client.sendto(b"z" * 65000, address)
        data, _ = await server.recvfrom(65535)
        assert data == b"z" * 65000


# --- loss ------------------------------------------------------------------------------------


async def test_loss_drops_about_the_configured_share(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    n = 4000
    async with relay_to(sink.getsockname(), loss=0.2) as (relay, address):
        await send_paced(client, address, numbered(n))
        got = drain(sink)
        stats = relay.statistics().up
    assert stats.received == n
    assert stats.lost + stats.forwarded == n
    assert len(got) == stats.forwarded
    # binomial(4000, 0.2): standard deviation ~25, so +-150 is six of them
    assert 650 <= stats.lost <= 950, stats
    assert seqs(got) == sorted(seqs(got)), "loss alone must not reorder"


async def test_loss_is_repeatable_with_the_same_seed(new_udp: UdpFactory) -> None:
    runs = []
    for _ in range(2):
        sink, client = new_udp(), new_udp()
        async with relay_to(sink.getsockname(), loss=0.5) as (_, address):
            await send_paced(client, address, numbered(300))
            runs.append(seqs(drain(sink)))
    assert runs[0] == runs[1]
    assert 0 < len(runs[0]) < 300


# --- reorder ---------------------------------------------------------------------------------


async def test_reorder_swaps_neighbours_and_loses_nothing(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    n = 500
    async with relay_to(sink.getsockname(), reorder=0.2) as (relay, address):
        await send_paced(client, address, numbered(n))
        got = seqs(drain(sink))
        # the last datagram may be held back until reorder_timeout: wait for it
        while len(got) < n:
            data, _ = await sink.recvfrom(65535)
            got += seqs([(data, None)])
        stats = relay.statistics().up
    assert sorted(got) == list(range(n))
    inversions = [i for i in range(n - 1) if got[i] > got[i + 1]]
    # one swap per held datagram, but for a last one that went out alone after the timeout
    assert len(inversions) in (stats.reordered, stats.reordered - 1), (inversions, stats)
    assert 50 <= stats.reordered <= 150, stats
    # a held datagram goes out right after the next one: every inversion is a neighbour swap
    for i in inversions:
        assert got[i] == got[i + 1] + 1, got[max(0, i - 3) : i + 4]


async def test_a_held_datagram_goes_out_after_reorder_timeout_if_nothing_follows(
    new_udp: UdpFactory,
) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), reorder=1.0, reorder_timeout=0.05) as (_, address):
        started = trio.current_time()
        await client.sendto(b"lonely", address)
        assert await sink.recv(100) == b"lonely"
        assert trio.current_time() - started >= 0.05


# --- blackhole -------------------------------------------------------------------------------


async def test_blackhole_drops_everything_both_ways_until_lifted(new_udp: UdpFactory) -> None:
    server, client = new_udp(), new_udp()
    async with relay_to(server.getsockname()) as (relay, address):
        await client.sendto(b"hello", address)
        _, source = await server.recvfrom(100)  # the client's upstream socket

        relay.blackhole = True
        for i in range(20):
            await client.sendto(b"up%d" % i, address)
            await server.sendto(b"down%d" % i, source)
        await trio.testing.wait_all_tasks_blocked()
        assert drain(server) == [] and drain(client) == []
        stats = relay.statistics()
        assert (stats.up.blackholed, stats.down.blackholed) == (20, 20)

        relay.blackhole = False
        await client.sendto(b"up-again", address)
        assert await server.recv(100) == b"up-again"
        await server.sendto(b"down-again", source)
        assert await client.recv(100) == b"down-again"


async def test_blackhole_opens_no_sockets_for_new_clients(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), blackhole=True) as (relay, address):
        await client.sendto(b"x", address)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.statistics().flows == 0


async def test_blackhole_also_drops_what_is_already_queued(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), delay=0.2) as (relay, address):
        await client.sendto(b"in-flight", address)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.statistics().queued == 1
        relay.blackhole = True
        with trio.move_on_after(0.4):
            await sink.recv(100)
            pytest.fail("a queued datagram crossed the partition")
        assert relay.statistics().up.blackholed == 1


# --- delay, jitter, duplicates, queue bound --------------------------------------------------


async def test_delay_delays_without_blocking_other_datagrams(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), delay=0.2) as (relay, address):
        started = trio.current_time()
        for payload in numbered(20):
            await client.sendto(payload, address)
        got = []
        while len(got) < 20:
            data, _ = await sink.recvfrom(65535)
            got.append((data, trio.current_time() - started))
        # each one waited its 0.2 s, all at the same time (not 20 * 0.2 s in a row)
        assert all(0.2 <= t for _, t in got), got
        assert got[-1][1] < 0.2 + 0.5
        assert seqs(got) == list(range(20)), "a constant delay keeps the order"
        assert relay.statistics().up.delayed == 20


async def test_delay_applies_to_replies_too(new_udp: UdpFactory) -> None:
    server = new_udp()
    client = new_udp()
    sources: list[Any] = []
    async with trio.open_nursery() as outer:
        outer.start_soon(echo, server, sources)
        async with relay_to(server.getsockname(), delay=0.1) as (_, address):
            started = trio.current_time()
            await client.sendto(b"ping", address)
            assert await client.recv(100) == b"echo:ping"
            assert trio.current_time() - started >= 0.2  # 0.1 each way
        outer.cancel_scope.cancel()


async def test_jitter_spreads_arrival_times(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), jitter=0.1) as (_, address):
        started = trio.current_time()
        for payload in numbered(30):
            await client.sendto(payload, address)
        got = []
        while len(got) < 30:
            data, _ = await sink.recvfrom(65535)
            got.append((data, trio.current_time() - started))
    assert sorted(seqs(got)) == list(range(30))
    assert seqs(got) != list(range(30)), "30 random delays in [0, 0.1) came out in order"
    assert max(t for _, t in got) < 0.1 + 0.5


async def test_duplicate_sends_twice(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), duplicate=1.0) as (relay, address):
        await send_paced(client, address, numbered(10))
        got = seqs(drain(sink))
        stats = relay.statistics().up
    assert sorted(got) == sorted(list(range(10)) * 2)
    assert (stats.duplicated, stats.forwarded) == (10, 20)


async def test_the_queue_is_bounded(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    async with relay_to(sink.getsockname(), delay=0.1, max_queued=5) as (relay, address):
        await send_paced(client, address, numbered(20))
        stats = relay.statistics()
        assert stats.queued == 5
        assert stats.up.overflowed == 15
        got = []
        while len(got) < 5:
            data, _ = await sink.recvfrom(65535)
            got.append((data, None))
    assert seqs(got) == [0, 1, 2, 3, 4]


async def test_the_number_of_clients_is_bounded(new_udp: UdpFactory) -> None:
    sink = new_udp()
    clients = [new_udp() for _ in range(3)]
    async with relay_to(sink.getsockname(), max_flows=2) as (relay, address):
        for client in clients:
            await client.sendto(b"x", address)
            await trio.testing.wait_all_tasks_blocked()
        stats = relay.statistics()
    assert (stats.flows, stats.evicted_flows, stats.up.forwarded) == (2, 1, 3)


# --- rebind ----------------------------------------------------------------------------------


async def test_rebind_changes_the_source_the_server_sees_and_replies_still_arrive(
    new_udp: UdpFactory,
) -> None:
    server = new_udp()
    client = new_udp()
    sources: list[Any] = []
    async with trio.open_nursery() as outer:
        outer.start_soon(echo, server, sources)
        async with relay_to(server.getsockname()) as (relay, address):
            await client.sendto(b"one", address)
            assert await client.recv(100) == b"echo:one"

            relay.rebind()
            await client.sendto(b"two", address)
            assert await client.recv(100) == b"echo:two"
            assert sources[1] != sources[0]
            assert sources[1][0] == sources[0][0] == HOST

            relay.rebind("127.0.0.2")  # all of 127/8 is local on Linux
            await client.sendto(b"three", address)
            assert await client.recv(100) == b"echo:three"
            assert sources[2][0] == "127.0.0.2"

            # the old sources are gone: the server's replies to them go nowhere
            await server.sendto(b"stale", sources[0])
            await trio.testing.wait_all_tasks_blocked()
            assert drain(client) == []
            assert relay.statistics().rebinds == 2
        outer.cancel_scope.cancel()


async def test_a_failed_rebind_changes_nothing(new_udp: UdpFactory) -> None:
    server, client = new_udp(), new_udp()
    async with relay_to(server.getsockname()) as (relay, address):
        await client.sendto(b"one", address)
        await server.recv(100)
        before = relay.upstream_addresses()
        with pytest.raises(OSError):
            relay.rebind("192.0.2.1")  # TEST-NET-1: not an address of this host
        with pytest.raises(ValueError):
            relay.rebind("not-an-address")
        assert relay.upstream_addresses() == before
        assert relay.upstream_bind is None
        await client.sendto(b"two", address)
        assert await server.recv(100) == b"two"


# --- attributes and the control channel ------------------------------------------------------


def idle_relay() -> UdpRelay:
    return UdpRelay((HOST, 0), (HOST, 9), rng=random.Random(1))


@pytest.mark.parametrize(
    ("name", "value"),
    [("loss", 1.5), ("loss", -0.1), ("loss", float("nan")), ("reorder", "0.1"),
     ("duplicate", True), ("delay", -1), ("jitter", float("inf")), ("blackhole", 1)],
)  # fmt: skip
def test_invalid_fault_values_are_refused(name: str, value: Any) -> None:
    relay = idle_relay()
    before = relay.faults()
    with pytest.raises(ValueError, match=name):
        setattr(relay, name, value)
    assert relay.faults() == before
    answer = apply_command(relay, {name: value})
    assert answer["ok"] is False and name in answer["error"]
    assert relay.faults() == before


def test_apply_command_sets_faults_and_reports() -> None:
    relay = idle_relay()
    answer = apply_command(relay, {"loss": 0.05, "delay": 0.01, "blackhole": True})
    assert answer["ok"] is True
    assert answer["faults"] == {
        "loss": 0.05,
        "delay": 0.01,
        "jitter": 0.0,
        "reorder": 0.0,
        "duplicate": 0.0,
        "blackhole": True,
    }
    assert (relay.loss, relay.delay, relay.blackhole) == (0.05, 0.01, True)
    assert answer["stats"]["forwarded"] == 0 and "up" in answer["stats"]
    assert apply_command(relay, {"stats": True})["faults"] == answer["faults"]


@pytest.mark.parametrize(
    "command",
    [{"loss": 0.5, "delay": -1}, {"loss": 0.5, "bogus": 1}, {"loss": 0.5, "rebind": 3},
     {"loss": 0.5, "rebind": "nowhere"}, [1, 2], "loss", None],
)  # fmt: skip
def test_a_bad_command_changes_nothing(command: Any) -> None:
    relay = idle_relay()
    answer = apply_command(relay, command)
    assert answer["ok"] is False and answer["error"]
    assert relay.loss == 0.0 and relay.upstream_bind is None


@given(st.binary(max_size=200))
def test_any_control_line_gets_one_json_answer(line: bytes) -> None:
    answer = json.loads(_answer_line(idle_relay(), line))
    assert isinstance(answer, dict) and isinstance(answer["ok"], bool)


@given(
    st.dictionaries(
        st.sampled_from(
            ["loss", "delay", "jitter", "reorder", "duplicate", "blackhole", "rebind", "stats", "x"]
        ),
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    )
)
# Generating text is slow on a busy machine without an example database (a fresh clone).
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_command_object_is_answered_and_applied_all_or_nothing(command: Any) -> None:
    relay = idle_relay()
    before = relay.faults()
    answer = apply_command(relay, command)
    if not answer["ok"]:
        assert relay.faults() == before


# --- the command line ------------------------------------------------------------------------


async def test_cli_relays_and_obeys_its_control_socket(new_udp: UdpFactory) -> None:
    sink, client = new_udp(), new_udp()
    sink_port = sink.getsockname()[1]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind((HOST, 0))
    port = probe.getsockname()[1]
    probe.close()
    with tempfile.TemporaryDirectory(prefix="relay-") as tmp:
        control = Path(tmp) / "relay.sock"
        read_fd, write_fd = os.pipe()
        argv = [*tool_argv("relay"), "--listen", f"{HOST}:{port}",
                "--upstream", f"{HOST}:{sink_port}", "--seed", "3", "--control", str(control),
                "--ready-fd", str(write_fd)]  # fmt: skip
        with trio.fail_after(BOUND):
            proc = await trio.lowlevel.open_process(
                argv, pass_fds=(write_fd,), stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            os.close(write_fd)
            try:
                async with trio.lowlevel.FdStream(read_fd) as ready:
                    assert b"\n" in await ready.receive_some(10)
                await client.sendto(b"through", (HOST, port))
                assert await sink.recv(100) == b"through"

                answer = await send_command(control, {"blackhole": True})
                assert answer["ok"] and answer["faults"]["blackhole"] is True
                await client.sendto(b"blocked", (HOST, port))
                answer = await send_command(control, {"blackhole": False, "rebind": True})
                assert answer["stats"]["up"]["blackholed"] == 1
                assert answer["stats"]["rebinds"] == 1
                await client.sendto(b"again", (HOST, port))
                assert await sink.recv(100) == b"again"
                bad = await send_command(control, {"loss": 7})
                assert bad["ok"] is False and "loss" in bad["error"]
            finally:
                proc.send_signal(signal.SIGTERM)
                code = await proc.wait()
            assert proc.stderr is not None
            chunks = []
            while chunk := await proc.stderr.receive_some(65536):
                chunks.append(chunk)
            stderr = b"".join(chunks).decode()
            assert code == 0, stderr
            assert "relay: stats" in stderr
            assert not control.exists()


async def test_cli_control_on_stdin(new_udp: UdpFactory) -> None:
    sink = new_udp()
    argv = [*tool_argv("relay"), "--listen", f"{HOST}:0",
            "--upstream", f"{HOST}:{sink.getsockname()[1]}", "--control", "-"]  # fmt: skip
    commands = b'{"loss": 0.25}\nnot json\n{"stats": true}\n'
    with trio.fail_after(BOUND):
        proc = await trio.run_process(
            argv, stdin=commands, capture_stdout=True, capture_stderr=True, check=False
        )
    answers = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert proc.returncode == 0, proc.stderr
    assert [a["ok"] for a in answers] == [True, False, True]
    assert answers[2]["faults"]["loss"] == 0.25


def test_cli_refuses_bad_arguments() -> None:
    for args in (
        ["--listen", "nowhere", "--upstream", "127.0.0.1:1"],
        ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--loss", "2"],
    ):
        proc = subprocess.run(
            tool_argv("relay", *args), capture_output=True, text=True, timeout=BOUND, check=False
        )
        assert proc.returncode == 2, proc.stderr
