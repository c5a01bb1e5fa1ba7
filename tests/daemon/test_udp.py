"""The UDP endpoint on loopback: batches (GSO) preserve every datagram, its boundaries and its
order; with ``reply_from_target`` an endpoint bound to a wildcard address learns which local
address each datagram was sent to and answers from it (IPv4 loopback accepts all of 127/8,
so 127.0.0.2 plays a host's second address; the namespace test does IPv6 with two)."""

from __future__ import annotations

import socket
import sys
from typing import Any

import pytest
import trio

from tunnel.daemon.udp import (
    IP_MTU_DISCOVER,
    IP_PMTUDISC_PROBE,
    IPV6_MTU_DISCOVER,
    IPV6_PMTUDISC_PROBE,
    LOCAL_CACHE_SIZE,
    SOL_UDP,
    UDP_GRO,
    LocalAddress,
    UdpEndpoint,
    split_run,
)


async def receive(endpoint: UdpEndpoint, count: int) -> list[bytes]:
    got: list[bytes] = []
    with trio.fail_after(5):
        while len(got) < count:
            await endpoint.wait_readable()
            got.extend(data for data, _ in endpoint.receive_batch(64))
    return got


async def receive_with_local(
    endpoint: UdpEndpoint, count: int
) -> list[tuple[bytes, Any, LocalAddress | None]]:
    got: list[tuple[bytes, Any, LocalAddress | None]] = []
    with trio.fail_after(5):
        while len(got) < count:
            await endpoint.wait_readable()
            got.extend(endpoint.receive_batch_with_local(64))
    return got


async def peer(family: int = socket.AF_INET) -> trio.socket.SocketType:
    """An unconnected client socket: it shows where each answer came from."""
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    return sock


async def answers(sock: trio.socket.SocketType, count: int) -> list[tuple[bytes, str]]:
    """``count`` datagrams and the host each came from."""
    got = []
    with trio.fail_after(5):
        for _ in range(count):
            data, addr = await sock.recvfrom(65535)
            got.append((data, addr[0]))
    return got


async def test_batches_arrive_as_the_same_datagrams_in_order():
    sender = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    receiver = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    try:
        to = receiver.local_address
        sizes = [1200] * 10 + [700] + [1200] * 3 + [50, 50, 1300]
        datagrams = [(bytes([i]) * size, to) for i, size in enumerate(sizes)]
        sender.send_batch(datagrams)
        got = await receive(receiver, len(datagrams))
        assert got == [d for d, _ in datagrams]
        assert sender.send_drops == 0
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
async def test_a_run_received_in_one_buffer_is_split_back_into_its_datagrams(bind: str) -> None:
    sender = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    receiver = await UdpEndpoint.bind(bind, 0, key="test", reply_from_target=True)
    try:
        assert receiver.gro  # loopback keeps a GSO run whole for a socket that asks for it
        to = ("127.0.0.1", receiver.local_address[1])
        sizes = [1200] * 20 + [300]
        datagrams = [(bytes([i]) * size, to) for i, size in enumerate(sizes)]
        sender.send_batch(datagrams)
        got = await receive_with_local(receiver, len(datagrams))
        assert [data for data, _, _ in got] == [d for d, _ in datagrams]
        assert all(addr == sender.local_address for _, addr, _ in got)
        if bind == "0.0.0.0":
            assert {local.host for _, _, local in got if local is not None} == {"127.0.0.1"}
            assert all(local is not None for _, _, local in got)
    finally:
        sender.close()
        receiver.close()


def test_a_run_splits_at_its_size_and_anything_else_stays_whole() -> None:
    gro = [(SOL_UDP, UDP_GRO, (100).to_bytes(4, sys.byteorder))]
    assert split_run(b"a" * 100 + b"b" * 100 + b"c" * 30, gro) == [
        b"a" * 100,
        b"b" * 100,
        b"c" * 30,
    ]
    assert split_run(b"x" * 100, gro) == [b"x" * 100]
    assert split_run(b"x" * 50, []) == [b"x" * 50]
    assert split_run(b"x" * 50, [(SOL_UDP, UDP_GRO, b"\0\0\0\0")]) == [b"x" * 50]
    assert split_run(b"x" * 50, [(0, 8, b"pktinfo.....")]) == [b"x" * 50]


async def test_ipv6_dual_stack_endpoint_talks_to_ipv4_peers():
    server = await UdpEndpoint.bind("::", 0, key="test")
    client = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    try:
        client.send(b"hello", ("127.0.0.1", server.local_address[1]))
        with trio.fail_after(5):
            await server.wait_readable()
            ((data, addr),) = server.receive_batch(8)
        assert data == b"hello"
        server.send_batch([(b"back", addr), (b"again", addr)])
        assert await receive(client, 2) == [b"back", b"again"]
    finally:
        server.close()
        client.close()


# -- answering from the address the client sent to -------------------------------------------


@pytest.mark.parametrize(
    ("bind", "family", "target", "local_host"),
    [
        ("0.0.0.0", socket.AF_INET, "127.0.0.2", "127.0.0.2"),
        ("::", socket.AF_INET, "127.0.0.2", "::ffff:127.0.0.2"),  # v4-mapped, dual-stack
        ("::", socket.AF_INET6, "::1", "::1"),
    ],
)
async def test_an_answer_leaves_from_the_address_the_datagram_was_sent_to(
    bind: str, family: int, target: str, local_host: str
) -> None:
    server = await UdpEndpoint.bind(bind, 0, key="test", reply_from_target=True)
    client = await peer(family)
    try:
        assert server.reply_from_target
        await client.sendto(b"hello", (target, server.local_address[1]))
        ((data, addr, local),) = await receive_with_local(server, 1)
        assert data == b"hello"
        assert local is not None and local.host == local_host
        assert local == server.local_for(target)
        server.send(b"answer", addr, source=local)
        assert await answers(client, 1) == [(b"answer", target)]
        assert server.send_drops == 0
    finally:
        server.close()
        client.close()


async def test_without_a_source_the_kernel_picks_one_by_routing():
    # what the source is for: the answer to 127.0.0.2 would come from 127.0.0.1
    server = await UdpEndpoint.bind("0.0.0.0", 0, key="test", reply_from_target=True)
    client = await peer()
    try:
        await client.sendto(b"hello", ("127.0.0.2", server.local_address[1]))
        ((_, addr, _),) = await receive_with_local(server, 1)
        server.send(b"answer", addr)
        assert await answers(client, 1) == [(b"answer", "127.0.0.1")]
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
async def test_a_gso_batch_leaves_from_the_source(bind: str) -> None:
    server = await UdpEndpoint.bind(bind, 0, key="test", reply_from_target=True)
    client = await peer()
    try:
        await client.sendto(b"hello", ("127.0.0.3", server.local_address[1]))
        ((_, addr, local),) = await receive_with_local(server, 1)
        sizes = [1200] * 10 + [700] + [1200] * 3 + [50, 50, 1300]
        datagrams = [(bytes([i]) * size, addr) for i, size in enumerate(sizes)]
        server.send_batch(datagrams, source=local)
        got = await answers(client, len(datagrams))
        assert got == [(data, "127.0.0.3") for data, _ in datagrams]
        assert server.gso and server.send_drops == 0
    finally:
        server.close()
        client.close()


async def test_a_source_the_host_lacks_drops_the_datagrams_but_keeps_gso():
    # For IPv6 the kernel refuses such a source with EINVAL, also an answer to "cannot
    # segment": it must not switch GSO off for good.
    server = await UdpEndpoint.bind("::", 0, key="test", reply_from_target=True)
    client = await peer(socket.AF_INET6)
    try:
        to = client.getsockname()
        gone = server.local_for("2001:db8::1")
        server.send_batch([(b"x" * 1000, to)] * 4, source=gone)
        server.send(b"y", to, source=gone)
        assert server.send_drops == 5
        assert server.gso
        server.send_batch([(b"z" * 1000, to)] * 4, source=server.local_for("::1"))
        assert await answers(client, 4) == [(b"z" * 1000, "::1")] * 4
    finally:
        server.close()
        client.close()


async def test_plain_receives_and_sends_still_work_with_packet_info_on():
    server = await UdpEndpoint.bind("::", 0, key="test", reply_from_target=True)
    client = await peer()
    try:
        await client.sendto(b"hello", ("127.0.0.2", server.local_address[1]))
        with trio.fail_after(5):
            await server.wait_readable()
            ((data, addr),) = server.receive_batch(8)
        assert data == b"hello"
        server.send_batch([(b"back", addr), (b"again", addr)])
        assert [data for data, _ in await answers(client, 2)] == [b"back", b"again"]
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize(("bind", "option"), [("127.0.0.1", True), ("0.0.0.0", False)])
async def test_no_local_address_where_the_endpoint_does_not_learn_it(bind: str, option: bool):
    # bound to one address, the kernel answers from it anyway: nothing to learn
    server = await UdpEndpoint.bind(bind, 0, key="test", reply_from_target=option)
    client = await peer()
    try:
        assert not server.reply_from_target
        await client.sendto(b"hello", ("127.0.0.1", server.local_address[1]))
        ((data, addr, local),) = await receive_with_local(server, 1)
        assert (data, local) == (b"hello", None)
        server.send(b"answer", addr, source=local)
        assert await answers(client, 1) == [(b"answer", "127.0.0.1")]
    finally:
        server.close()
        client.close()


async def test_many_local_addresses_stay_correct_and_bounded():
    server = await UdpEndpoint.bind("0.0.0.0", 0, key="test", reply_from_target=True)
    client = await peer()
    try:
        targets = [f"127.0.1.{n}" for n in range(1, LOCAL_CACHE_SIZE + 10)]
        for target in targets:
            await client.sendto(target.encode(), (target, server.local_address[1]))
        got = await receive_with_local(server, len(targets))
        assert [(data.decode(), local and local.host) for data, _, local in got] == [
            (target, target) for target in targets
        ]
        assert len(server._locals) <= LOCAL_CACHE_SIZE
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
async def test_datagrams_are_never_fragmented_and_a_refused_probe_says_so(bind: str) -> None:
    endpoint = await UdpEndpoint.bind(bind, 0, key="listen")
    target = ("127.0.0.1", 9) if bind == "0.0.0.0" else ("::ffff:127.0.0.1", 9)
    try:
        # Don't-fragment without the kernel's path MTU cache, for IPv4 (v4-mapped included).
        assert endpoint.sock.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER) == IP_PMTUDISC_PROBE
        if bind == "::":
            level, option = socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER
            assert endpoint.sock.getsockopt(level, option) == IPV6_PMTUDISC_PROBE
        # Larger than anything the host can send (EMSGSIZE): a loss the search learns at once.
        assert endpoint.send_probe(bytes(65535), target) is False
        assert endpoint.send_probe(bytes(1452), target) is True
    finally:
        endpoint.close()
