"""Direct paths between two clients, with the real daemons on the in-memory network: the server
introduces them, they punch, traffic moves off the server, and back when the path breaks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from test_inmemory_peers import (
    SERVER_ADDR,
    running_client,
    running_server,
    v4,
    wait_for,
)

from tunnel.core.identity import Identity, encode_public_id
from tunnel.core.ippacket import build_ipv4_udp
from tunnel.core.messages import Ping, encode_frame
from tunnel.daemon.aioquic_private.state import connection_binding
from tunnel.daemon.client.peers import Peers
from tunnel.daemon.quic import peer_configuration
from tunnel.testing.fakes import FakeNetwork

A_HOST, B_HOST = "198.51.100.2", "198.51.100.3"


@contextlib.asynccontextmanager
async def two_clients(
    network: FakeNetwork, *, a: dict[str, Any] | None = None, b: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A server with client_to_client on, then client a, then client b (keyword arguments of
    :func:`running_client` for each in ``a`` and ``b``)."""
    async with (
        running_server(network, client_to_client=True) as server,
        running_client(network, A_HOST, **(a or {})) as client_a,
        running_client(network, B_HOST, **(b or {})) as client_b,
    ):
        yield server, client_a, client_b


def packet_a_to_b(payload: bytes) -> bytes:
    return build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.3"), 1000, 2000, payload)


def peer_path(client) -> str | None:
    peers = client.status()["peers"]
    return peers[0]["path"] if peers else None


class Wire:
    """Counts what the fake network carries, and cuts what the test says."""

    def __init__(self, network: FakeNetwork) -> None:
        self.to_server = 0  # datagrams of either client to the server
        self.blocked: set[frozenset[str]] = set()
        network.policy = self.policy

    def policy(self, data: bytes, src, dst) -> bool:
        if tuple(dst) == SERVER_ADDR:
            self.to_server += 1
        return frozenset((src[0], dst[0])) not in self.blocked


async def test_two_clients_go_direct_and_traffic_leaves_the_server(autojump_clock):
    network = FakeNetwork()
    wire = Wire(network)
    with trio.fail_after(60):
        async with two_clients(network) as (server, a, b):
            a.tun.inject(packet_a_to_b(b"first, through the server"))
            await b.tun.wait_written(1)
            began = trio.current_time()
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct")
            assert trio.current_time() - began < 2.0  # the bound, on a clean path
            assert server.status()["introductions"] == 1
            (peer,) = a.status()["peers"]
            assert peer["id"] == encode_public_id(b.identity.public_key)
            assert peer["addresses"] == ["10.78.0.3", "fd78::3"]
            assert peer["endpoint"].startswith(f"{B_HOST}:")
            assert peer["rtt_ms"] is not None

            before = wire.to_server
            for i in range(50):
                a.tun.inject(packet_a_to_b(b"direct %d" % i))
            await b.tun.wait_written(51)
            assert [p[28:] for p in b.tun.written[1:]] == [b"direct %d" % i for i in range(50)]
            # ACKs, heartbeats: a handful, never the 50 packets.
            assert wire.to_server - before < 10


def packet_b_to_a(payload: bytes) -> bytes:
    return build_ipv4_udp(v4("10.78.0.3"), v4("10.78.0.2"), 2000, 1000, payload)


async def test_both_sides_starting_at_once_make_one_connection(autojump_clock, monkeypatch):
    """Both clients send to each other in the same instant, so both are introduced and probe
    at once: each side ever holds one direct connection, and it is the same one."""
    started: list[tuple[bytes, bool]] = []  # (whose Peers, as initiator?)
    original = Peers._start

    def counting(self, link, quic, endpoint):
        started.append((self.identity.public_key, quic.configuration.is_client))
        return original(self, link, quic, endpoint)

    monkeypatch.setattr(Peers, "_start", counting)
    network = FakeNetwork()
    with trio.fail_after(60):
        async with two_clients(network) as (server, a, b):
            a.tun.inject(packet_a_to_b(b"from a"))
            b.tun.inject(packet_b_to_a(b"from b"))
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct")
            await trio.sleep(10)  # long enough for a second attempt to show
            assert server.status()["introductions"] == 1
            assert sorted(started) == sorted(
                [(a.identity.public_key, a.identity.public_key < b.identity.public_key),
                 (b.identity.public_key, b.identity.public_key < a.identity.public_key)]
            )  # fmt: skip
            (link_a,) = a.session.peers.links.values()
            (link_b,) = b.session.peers.links.values()
            assert link_a.connection is not None and link_b.connection is not None
            # One connection: both ends derive the same channel binding from its TLS session.
            assert connection_binding(link_a.connection.quic) == connection_binding(
                link_b.connection.quic
            )
            (peer,) = a.status()["peers"]
            assert (peer["upgrades"], peer["fallbacks"]) == (1, 0)


async def test_a_broken_direct_path_falls_back_to_the_server_and_recovers(autojump_clock):
    network = FakeNetwork()
    wire = Wire(network)
    with trio.fail_after(300):
        async with two_clients(network) as (_, a, b):
            a.tun.inject(packet_a_to_b(b"hello"))
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct")
            wire.blocked.add(frozenset((A_HOST, B_HOST)))
            sent = 1
            # Traffic keeps flowing while the path dies: lost packets are TCP's to resend,
            # but once the client notices, everything arrives through the server.
            while peer_path(a) != "relay":
                a.tun.inject(packet_a_to_b(b"during"))
                sent += 1
                await trio.sleep(0.5)
            arrived = len(b.tun.written)
            a.tun.inject(packet_a_to_b(b"relayed"))
            await b.tun.wait_written(arrived + 1)
            assert b.tun.written[-1].endswith(b"relayed")

            wire.blocked.clear()
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct", 0.5)


async def test_peer_to_peer_off_keeps_traffic_on_the_server(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(60):
        async with two_clients(network, a={"peer_to_peer": False}) as (server, a, b):
            a.tun.inject(packet_a_to_b(b"hello"))
            await b.tun.wait_written(1)
            await trio.sleep(5)
            assert a.status()["peers"] == [] and b.status()["peers"] == []
            assert server.status()["introductions"] == 0


async def test_client_to_client_turned_off_ends_direct_paths(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(60):
        async with two_clients(network) as (server, a, b):
            a.tun.inject(packet_a_to_b(b"hello"))
            await wait_for(lambda: peer_path(a) == "direct")
            server._reload_client_to_client(False)
            await wait_for(lambda: a.status()["peers"] == [] and b.status()["peers"] == [])
            arrived = len(b.tun.written)
            a.tun.inject(packet_a_to_b(b"refused"))
            await trio.sleep(2)
            assert len(b.tun.written) == arrived
            assert server.drops["client_to_client"] == 1


class Forger(Identity):
    """A client whose proof on direct connections is signed by some other key (its probes
    are its own: it knows the introduction's secret, as a stolen one would allow)."""

    def sign(self, message: bytes) -> bytes:
        if message.startswith(b"tunnel-peer-v1"):
            return Identity.generate().sign(message)
        return super().sign(message)


def ordered_identities(forger_first: bool) -> tuple[Identity, Identity]:
    """Identities for a and b; the first (smaller key) opens the direct connection."""
    while True:
        a, b = (Forger.generate() if forger_first else Identity.generate()), Identity.generate()
        if a.public_key < b.public_key:
            return a, b


async def test_a_peer_presenting_another_key_on_the_direct_path_is_refused(
    autojump_clock, monkeypatch
):
    """a opens the connection (smaller key); what answers at b's endpoint proves another key
    in TLS: a refuses it and the traffic stays on the server."""
    a_id, b_id = ordered_identities(forger_first=False)
    original = Peers._configuration

    def impostor(self, *, initiator):
        if self.identity.public_key == b_id.public_key and not initiator:
            return peer_configuration(Identity.generate(), initiator=False)
        return original(self, initiator=initiator)

    monkeypatch.setattr(Peers, "_configuration", impostor)
    await stays_relayed(a_id, b_id, "presented")


async def test_a_peer_that_cannot_prove_the_introduced_key_is_refused(autojump_clock):
    """a opens the connection, but its PeerAuth is not signed by its key: b refuses it."""
    a_id, b_id = ordered_identities(forger_first=True)
    await stays_relayed(a_id, b_id, "failed to prove the introduced key")


async def stays_relayed(a_id: Identity, b_id: Identity, refusal: str) -> None:
    network = FakeNetwork()
    with trio.fail_after(60):
        async with two_clients(network, a={"identity": a_id}, b={"identity": b_id}) as (_, a, b):
            handler = Remember()
            logging.getLogger("tunnel.client").addHandler(handler)
            try:
                a.tun.inject(packet_a_to_b(b"hello"))
                await b.tun.wait_written(1)
                await wait_for(lambda: any(refusal in line for line in handler.lines))
                await trio.sleep(10)  # retries back off; none of them may succeed
                assert peer_path(a) == "relay" and peer_path(b) == "relay"
                a.tun.inject(packet_a_to_b(b"through the server"))
                await b.tun.wait_written(2)
            finally:
                logging.getLogger("tunnel.client").removeHandler(handler)


class Remember(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_a_stranger_spraying_a_clients_socket_changes_nothing(autojump_clock):
    """Datagrams from anywhere (forged probes, probe-shaped garbage, QUIC-shaped packets with
    the direct connection's IDs, Initials) while a direct path runs: no new connection, no
    failure, the path stays direct and carries traffic."""
    import random

    from tunnel.core.disco import MAGIC

    rng = random.Random(1405)
    network = FakeNetwork()
    with trio.fail_after(120):
        async with two_clients(network) as (_, a, b):
            a.tun.inject(packet_a_to_b(b"hello"))
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct")
            peers = a.session.peers
            (link,) = peers.links.values()
            connection = link.connection
            cids = list(peers.by_cid)
            a_addr = a.session.endpoint.local_address
            stranger = network.bind("203.0.113.66", 5000)
            for i in range(3000):
                kind = i % 4
                if kind == 0:
                    data = MAGIC + rng.randbytes(rng.randrange(0, 200))
                elif kind == 1:
                    data = bytes([0x40 | rng.randrange(64)]) + rng.choice(cids) + rng.randbytes(60)
                elif kind == 2:
                    data = bytes([0xC0]) + rng.randbytes(4) + bytes([8]) + rng.randbytes(1300)
                else:
                    data = rng.randbytes(rng.randrange(1, 1400))
                stranger.send(data, a_addr)
                if i % 100 == 0:
                    await trio.sleep(0.01)
            await trio.sleep(1)
            assert link.connection is connection and not connection.ended
            assert peer_path(a) == "direct"
            arrived = len(b.tun.written)
            a.tun.inject(packet_a_to_b(b"still direct"))
            await b.tun.wait_written(arrived + 1)
            assert a.session.peers is peers and a.state == "connected"


@pytest.mark.parametrize("misbehaviour", ["reset", "stop sending", "garbage", "ping flood"])
async def test_a_misbehaving_peer_harms_only_its_direct_connection(autojump_clock, misbehaviour):
    """The authenticated peer breaks the direct connection's rules: that connection closes (or,
    for a flood of pings, answers within its budget) and the session to the server, with the
    relay, carries on."""
    network = FakeNetwork()
    with trio.fail_after(120):
        async with two_clients(network) as (_, a, b):
            a.tun.inject(packet_a_to_b(b"hello"))
            await wait_for(lambda: peer_path(a) == "direct" and peer_path(b) == "direct")
            a_session = a.session
            (a_link,) = a_session.peers.links.values()
            (b_link,) = b.session.peers.links.values()
            hostile = b_link.connection
            if misbehaviour == "reset":
                hostile.quic.reset_stream(0, 0)
            elif misbehaviour == "stop sending":
                hostile.quic.stop_stream(0, 0)
            elif misbehaviour == "garbage":
                hostile.quic.send_stream_data(0, b"\x7f" + bytes(100))
            else:
                for _ in range(100):
                    hostile.quic.send_stream_data(0, encode_frame(Ping()) * 100)
                    hostile.driver.transmit()
            hostile.driver.transmit()
            if misbehaviour == "ping flood":
                await trio.sleep(2)
                assert a_link.connection is not None and not a_link.connection.ended
                # One pong a batch at most, and past the budget none: counted, not queued.
                assert a_link.connection.drops["pings_ignored"] > 0
            else:
                await wait_for(lambda: peer_path(a) == "relay")
            assert a.session is a_session and a.state == "connected"
            arrived = len(b.tun.written)
            a.tun.inject(packet_a_to_b(b"still arrives"))
            await b.tun.wait_written(arrived + 1)
