"""Path MTU discovery in the real server and client daemons, over a fake network whose path
carries at most a given UDP payload, on virtual time: both ends find the path's size, datagrams
follow it, inner senders hear "packet too big" with the size that fits once it is known, and a
path that shrinks under a transfer is noticed and searched again."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
from test_inmemory_peers import running_client, running_server, v4, v6, wait_for

from tunnel.core.ippacket import build_ipv4_udp, build_ipv6_udp
from tunnel.core.pmtu import BASE_SIZE
from tunnel.daemon.aioquic_private.pmtu import datagram_frame_room
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD, MAX_DATAGRAM_SIZE
from tunnel.testing.fakes import FakeNetwork


class Path:
    """A network policy: datagrams larger than ``mtu`` bytes of UDP payload are dropped (as a
    router with a smaller link drops a don't-fragment packet), and counted."""

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.too_big = 0
        self.largest = 0

    def __call__(self, data: bytes, src, dst) -> bool:
        if len(data) > self.mtu:
            self.too_big += 1
            return False
        self.largest = max(self.largest, len(data))
        return True


def settled(client, server) -> bool:
    (session,) = server.table.sessions
    return not client.session.path_mtu.searching and not session.path_mtu.searching


@asynccontextmanager
async def settled_tunnel(path: Path):
    """A server and a client over ``path``, once both ends have settled on its size."""
    network = FakeNetwork()
    network.policy = path
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        await wait_for(lambda: settled(a, server))
        yield server, a


@pytest.mark.parametrize("mtu", [1232, 1252, 1444, 1472])
async def test_both_ends_find_the_size_of_a_smaller_path(autojump_clock, mtu):
    path = Path(mtu)
    with trio.fail_after(60):
        async with settled_tunnel(path) as (server, a):
            (session,) = server.table.sessions
            expected = min(mtu, MAX_DATAGRAM_SIZE)
            for channel in (a.session, session):
                assert channel.path_mtu.current == expected
                assert channel.quic._max_datagram_size == expected
                room = datagram_frame_room(channel.quic, expected)
                assert channel.max_datagram_payload == min(room, MAX_DATAGRAM_PAYLOAD)
            # The handshake and everything since fit the path: nothing was dropped but the
            # probes that were too large.
            assert path.largest == expected
            status = a.status()["sessions"][0]
            assert status["path_mtu"] == expected
            assert status["datagram_payload"] == a.session.max_datagram_payload
            assert server.status()["sessions"][0]["path_mtu"] == expected

            # The largest packet that fits goes as one datagram, end to end.
            payload = a.session.max_datagram_payload - 28
            a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, bytes(payload)))
            await server.tun.wait_written(1)
            assert a.session.drops == {}


async def test_a_packet_too_big_for_the_path_is_answered_once_the_size_is_known(autojump_clock):
    with trio.fail_after(60):
        async with settled_tunnel(Path(1252)) as (server, a):
            room = a.session.max_datagram_payload
            assert room == datagram_frame_room(a.session.quic, 1252)
            # DF set: told the size that fits, from the server's tunnel address.
            a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, bytes(1372)))
            await a.tun.wait_written(1)
            (error,) = a.tun.written
            assert error[20:22] == b"\x03\x04"
            assert int.from_bytes(error[26:28], "big") == room
            # IPv6 of at most 1280 bytes cannot be told (1280 is IPv6's minimum): the stream
            # carries it whole.
            packet = build_ipv6_udp(v6("fd78::2"), v6("fd78::1"), 1, 2, bytes(1280 - 48))
            a.tun.inject(packet)
            await server.tun.wait_written(1)
            assert server.tun.written == [packet]


async def test_until_the_size_is_known_an_oversize_packet_is_carried_not_refused(
    autojump_clock,
):
    network = FakeNetwork()
    network.policy = Path(1252)
    with trio.fail_after(60):
        async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
            # Connected, but the search has barely begun: a 1400-byte DF packet must not make
            # its sender settle for the base size.
            assert a.session.path_mtu.searching
            assert a.session.max_datagram_payload == datagram_frame_room(a.session.quic, BASE_SIZE)
            packet = build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, bytes(1372))
            a.tun.inject(packet)
            await server.tun.wait_written(1)
            assert server.tun.written == [packet]
            assert a.tun.written == []


async def test_a_path_that_shrinks_under_a_transfer_is_found_again(autojump_clock):
    path = Path(1472)
    with trio.fail_after(120):
        async with settled_tunnel(path) as (server, a):
            (session,) = server.table.sessions
            assert session.path_mtu.current == MAX_DATAGRAM_SIZE
            path.mtu = 1232  # a link on the way now has an MTU of 1280 (IPv6)
            # Full-size traffic from the server (a download): every packet is lost now.
            payload = bytes(session.max_datagram_payload - 28)
            sent = 0
            while session.path_mtu.current != 1232 or session.path_mtu.searching:
                for _ in range(8):
                    server.tun.inject(
                        build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 1, 2, payload)
                    )
                    sent += 1
                await trio.sleep(0.02)
                assert trio.current_time() < 60, session.path_mtu.status()
            assert session.path_mtu.search.statistics().black_holes == 1
            # Datagrams follow the new size: a packet that fits it arrives.
            fits = session.max_datagram_payload - 28
            assert fits == datagram_frame_room(session.quic, 1232) - 28
            written = len(a.tun.written)
            server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 1, 2, bytes(fits)))
            await a.tun.wait_written(written + 1)
            assert a.status()["state"] == "connected" and a.reconnects == 0


async def test_a_client_that_moves_to_a_new_socket_searches_again(autojump_clock):
    with trio.fail_after(60):
        async with settled_tunnel(Path(1472)) as (server, a):
            before = a.session.path_mtu.search.statistics().searches
            (session,) = server.table.sessions
            server_searches = session.path_mtu.search.statistics().searches
            await a.session.rebind()
            # The client knows it moved; the server sees the new address as a new path.
            await wait_for(lambda: a.session.path_mtu.search.statistics().searches > before)
            await wait_for(lambda: session.path_mtu.search.statistics().searches > server_searches)
            await wait_for(lambda: settled(a, server))
            assert a.session.path_mtu.current == session.path_mtu.current == MAX_DATAGRAM_SIZE


async def test_the_server_hosts_own_traffic_hears_too_big_from_its_destination(autojump_clock):
    with trio.fail_after(60):
        async with settled_tunnel(Path(1252)) as (server, a):
            (session,) = server.table.sessions
            # From the server's own tunnel address: an error from that address would be
            # dropped by its kernel as a martian, so it comes from the client's.
            server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 1, 2, bytes(1372)))
            await server.tun.wait_written(1)
            (error,) = server.tun.written
            assert error[12:16] == v4("10.78.0.2") and error[16:20] == v4("10.78.0.1")
            assert int.from_bytes(error[26:28], "big") == session.max_datagram_payload
            assert a.tun.written == []
