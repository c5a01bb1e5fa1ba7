"""Server and client daemons run against each other in one process: fake UDP network, fake
TUN devices, virtual time. Everything above the kernel is the real code."""

from __future__ import annotations

import ipaddress
import socket
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.config import RunOptions, client_config_from_dict, server_config_from_dict
from tunnel.core.identity import Identity
from tunnel.core.ippacket import build_ipv4_udp, build_ipv6_udp, internet_checksum
from tunnel.core.messages import CLOSE_SHUTDOWN
from tunnel.core.netchange import NetworkChange
from tunnel.core.tokens import new_token
from tunnel.core.underlay import Route
from tunnel.daemon.client import Client, GaveUp
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD
from tunnel.daemon.server import Server
from tunnel.errors import PeerRejected, SessionLost
from tunnel.testing.fakes import FakeNetwork, FakePlatform, FakeTun

SERVER_ADDR = ("192.0.2.1", 4433)
TOKEN = new_token()
SERVER_IDENTITY = Identity.generate()


def v4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def server_config(**overrides):
    data = {
        "key_file": "/nonexistent/server.key",
        "network": "10.78.0.0/24",
        "network6": "fd78::/64",
        "auth_tokens": [TOKEN],
        "handshake_timeout": 3.0,
        "lease_grace": 30.0,
    }
    data.update(overrides)
    return server_config_from_dict({k: v for k, v in data.items() if v is not None})


def client_config(**overrides):
    data = {
        "server": f"{SERVER_ADDR[0]}:{SERVER_ADDR[1]}",
        "server_id": SERVER_IDENTITY.public_id,
        "auth_token": TOKEN,
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 3.0,
        "handshake_timeout": 2.0,
    }
    data.update(overrides)
    return client_config_from_dict(data)


@asynccontextmanager
async def running_server(net: FakeNetwork, tun: FakeTun | None = None, **overrides):
    endpoint = net.bind(*SERVER_ADDR)
    server = Server(server_config(**overrides), SERVER_IDENTITY, endpoint, tun or FakeTun("srv"))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running_client(net: FakeNetwork, host: str, identity=None, **overrides):
    platform = FakePlatform(net, host)
    client = Client(
        client_config(**overrides), identity or Identity.generate(), RunOptions(), platform
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.supervise)
        with trio.fail_after(10):
            await client.connected.wait()
        yield client
        nursery.cancel_scope.cancel()


async def wait_for(condition, step=0.05):
    """Poll a condition on virtual time (the daemons expose state, not events, for these)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(step)


async def test_two_clients_get_consecutive_addresses_and_exchange_packets(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        async with (
            running_client(network, "198.51.100.2") as a,
            running_client(network, "198.51.100.3") as b,
        ):
            assert a.addresses() == ["10.78.0.2/24", "fd78::2/64"]
            assert b.addresses() == ["10.78.0.3/24", "fd78::3/64"]

            # client -> server TUN, IPv4 and IPv6
            a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1000, 53, b"hi"))
            a.tun.inject(build_ipv6_udp(v6("fd78::2"), v6("fd78::1"), 1000, 53, b"hi6"))
            await server.tun.wait_written(2)
            assert server.tun.written[0].endswith(b"hi")
            assert server.tun.written[1].endswith(b"hi6")

            # server TUN -> the right client, by destination
            server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.3"), 53, 1000, b"to-b"))
            await b.tun.wait_written(1)
            assert b.tun.written[0].endswith(b"to-b")
            assert a.tun.written == []

            status = server.status()
            assert {tuple(s["addresses"]) for s in status["sessions"]} == {
                ("10.78.0.2", "fd78::2"),
                ("10.78.0.3", "fd78::3"),
            }


def udp_echo(packet: bytes) -> bytes | None:
    """The server host's own stack answering a UDP/IPv4 packet, addresses and ports swapped."""
    if packet[0] >> 4 != 4 or packet[9] != 17:
        return None
    src, dst = packet[12:16], packet[16:20]
    sport, dport = int.from_bytes(packet[20:22], "big"), int.from_bytes(packet[22:24], "big")
    return build_ipv4_udp(dst, src, dport, sport, packet[28:])


async def test_an_answer_the_kernel_queues_inside_our_write_goes_out_at_once(autojump_clock):
    # The fake TUN queues the echo without signalling readability: the server only finds it
    # by reading right after its write, which is what keeps a round trip to one wake-up.
    network = FakeNetwork()
    async with running_server(network, tun=FakeTun("srv", answer=udp_echo)):
        async with running_client(network, "198.51.100.2") as client:
            client.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1000, 7, b"ping"))
            with trio.fail_after(5):
                await client.tun.wait_written(1)
            (reply,) = client.tun.written
            assert reply[12:16] == v4("10.78.0.1") and reply.endswith(b"ping")


async def test_spoofed_and_malformed_packets_are_dropped_and_counted(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        a.tun.inject(build_ipv4_udp(v4("10.78.0.99"), v4("10.78.0.1"), 1, 2, b"spoof"))
        a.tun.inject(build_ipv6_udp(v6("fe80::1"), v6("fd78::1"), 1, 2, b"link-local"))
        a.tun.inject(b"\x45garbage")
        a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, b"fine"))
        await server.tun.wait_written(1)
        await trio.sleep(1)
        assert [p[-4:] for p in server.tun.written] == [b"fine"]
        assert server.drops["spoofed_source"] == 2
        assert server.drops["malformed"] == 1


async def test_packets_for_unknown_destinations_are_counted(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2"):
        server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.77"), 1, 2, b"x"))
        await trio.sleep(1)
        assert server.drops["no_route"] == 1


async def test_truncated_packets_from_the_tun_are_counted_and_the_pump_goes_on(autojump_clock):
    # Shorter than their fixed header: once read as an empty destination, which matched the
    # NAT64 source of a server without NAT64 (b"") and killed the TUN pump.
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        server.tun.inject(b"\x45" + bytes(10))
        server.tun.inject(b"\x60" + bytes(20))
        await trio.sleep(1)
        assert server.drops["malformed"] == 2
        server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 1, 2, b"after"))
        with trio.fail_after(5):
            await a.tun.wait_written(1)


@pytest.mark.parametrize("c2c", [True, False])
async def test_client_to_client_only_when_enabled(autojump_clock, c2c):
    network = FakeNetwork()
    async with (
        running_server(network, client_to_client=c2c) as server,
        running_client(network, "198.51.100.2") as a,
        running_client(network, "198.51.100.3") as b,
    ):
        a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.3"), 1, 2, b"peer"))
        a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, b"sync"))
        await server.tun.wait_written(1)
        if c2c:
            with trio.fail_after(1):
                await b.tun.wait_written(1)
            assert b.tun.written[0].endswith(b"peer")
        else:
            await trio.sleep(1)
            assert b.tun.written == []
            assert server.drops["client_to_client"] == 1


async def test_packet_too_large_for_a_datagram_travels_on_the_stream(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(30):
        async with (
            running_server(network, mtu=9000) as server,
            running_client(network, "198.51.100.2", mtu=9000) as a,
        ):
            payload = bytes(range(256)) * 20
            # DF clear: the sender allows the packet to be cut, so it is carried whole.
            big = may_fragment(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, payload))
            assert len(big) > MAX_DATAGRAM_PAYLOAD
            a.tun.inject(big)
            await server.tun.wait_written(1)
            assert server.tun.written[0] == big


async def test_a_packet_too_big_for_a_datagram_is_answered_with_the_size_that_fits(
    autojump_clock,
):
    network = FakeNetwork()
    with trio.fail_after(30):
        async with (
            running_server(network, mtu=9000) as server,
            running_client(network, "198.51.100.2", mtu=9000) as a,
        ):
            # Once the tunnel knows its path's size (no answer before: it could be too low)...
            await wait_for(lambda: not a.session.path_mtu.searching)
            # ...DF set (as TCP sends): the sender hears "fragmentation needed" from the
            # server's tunnel address, and its path MTU discovery does the rest.
            big = build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, bytes(5000))
            a.tun.inject(big)
            await a.tun.wait_written(1)
            (error,) = a.tun.written
            assert error[12:16] == v4("10.78.0.1") and error[16:20] == v4("10.78.0.2")
            assert error[20:22] == b"\x03\x04"
            assert int.from_bytes(error[26:28], "big") == a.session.max_datagram_payload
            assert server.tun.written == []
            assert a.drops["too_big"] == 1


def may_fragment(packet: bytes) -> bytes:
    """The IPv4 packet with DF clear (header checksum fixed)."""
    raw = bytearray(packet)
    raw[6] &= ~0x40
    raw[10:12] = b"\x00\x00"
    raw[10:12] = internet_checksum(bytes(raw[:20])).to_bytes(2, "big")
    return bytes(raw)


async def test_client_tunnel_port_traffic_is_not_sent_into_the_tunnel(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        looping = build_ipv4_udp(v4("10.78.0.2"), v4(SERVER_ADDR[0]), 5555, SERVER_ADDR[1], b"x")
        a.tun.inject(looping)
        await trio.sleep(1)
        assert a.drops["tunnel_port"] == 1
        assert server.tun.written == []


async def expect_permanent(net, host, exc_type, match, **overrides):
    client = Client(
        client_config(**overrides), Identity.generate(), RunOptions(), FakePlatform(net, host)
    )
    with trio.fail_after(5), pytest.raises(exc_type, match=match):
        await client.supervise()
    return client


async def test_wrong_token_is_a_permanent_rejection(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        await expect_permanent(
            network,
            "198.51.100.9",
            PeerRejected,
            "Invalid authentication token",
            auth_token=new_token(),
        )
        assert server.gatekeeper.auth_failures == 1
        # The server keeps serving others.
        async with running_client(network, "198.51.100.2") as a:
            assert a.addresses()[0] == "10.78.0.2/24"


async def test_client_not_in_allowed_clients_is_rejected(autojump_clock):
    network = FakeNetwork()
    allowed = Identity.generate()
    async with running_server(network, allowed_clients=[allowed.public_id]):
        await expect_permanent(network, "198.51.100.9", PeerRejected, "client not allowed")
        async with running_client(network, "198.51.100.2", identity=allowed) as a:
            assert a.addresses()


async def expect_retried(net, host, match, caplog, **overrides):
    """The client takes the failure as temporary: it retries until max_reconnect_attempts."""
    client = Client(
        client_config(max_reconnect_attempts=2, **overrides),
        Identity.generate(),
        RunOptions(),
        FakePlatform(net, host),
    )
    with trio.fail_after(30), pytest.raises(GaveUp, match="gave up after 2"):
        await client.supervise()
    messages = [r.getMessage() for r in caplog.records if r.name == "tunnel.client"]
    assert sum(match in m for m in messages) == 3, messages  # the first try and two retries
    return client


async def test_wrong_server_id_is_retried_as_an_identity_mismatch(autojump_clock, caplog):
    # Whoever answers on the path can present another key: loud, but never permanent.
    network = FakeNetwork()
    async with running_server(network) as server:
        client = await expect_retried(
            network,
            "198.51.100.9",
            "server identity mismatch",
            caplog,
            server_id=Identity.generate().public_id,
        )
        assert any(
            r.levelname == "ERROR" and "identity mismatch" in r.getMessage() for r in caplog.records
        )
        await trio.sleep(1)
        # A session ticket from a server we did not trust is never kept for resumption.
        assert client.ticket is None
        # Nor did the token or a signature leave: the server never saw a request.
        assert server.gatekeeper.auth_failures == 0 and not server.gatekeeper.refused
        assert all(s.client_id is None for s in server.table.sessions)


async def test_server_full_is_temporary_and_the_client_gets_in_once_there_is_room(
    autojump_clock, caplog
):
    network = FakeNetwork()
    async with running_server(network, max_clients=1) as server, trio.open_nursery() as nursery:
        waiting = Client(
            client_config(),
            Identity.generate(),
            RunOptions(),
            FakePlatform(network, "198.51.100.10"),
        )
        async with running_client(network, "198.51.100.2"):
            await expect_retried(network, "198.51.100.9", "Server full", caplog)
            assert server.gatekeeper.refused["Server full"] == 3
            nursery.start_soon(waiting.supervise)
            await wait_for(lambda: waiting.reconnects >= 1)
            assert waiting.state != "connected"
        # The first client left: the one that kept retrying gets in by itself.
        with trio.fail_after(70):
            await wait_for(lambda: waiting.state == "connected")
        nursery.cancel_scope.cancel()


async def test_pool_exhaustion_is_temporary(autojump_clock, caplog):
    network = FakeNetwork()
    async with (
        running_server(network, network="10.78.0.0/30", network6=None),
        running_client(network, "198.51.100.2"),
    ):
        await expect_retried(network, "198.51.100.9", "address pool exhausted", caplog)


async def test_sessions_per_client_identity_are_bounded(autojump_clock, caplog):
    network = FakeNetwork()
    me = Identity.generate()
    async with (
        running_server(network, max_sessions_per_client=1) as server,
        running_client(network, "198.51.100.2", identity=me),
    ):
        # The same identity from a second device (a second client process) waits its turn.
        client = Client(
            client_config(max_reconnect_attempts=1),
            me,
            RunOptions(),
            FakePlatform(network, "198.51.100.3"),
        )
        with trio.fail_after(30), pytest.raises(GaveUp):
            await client.supervise()
        assert server.gatekeeper.refused["too many sessions for this client"] == 2
        # Another identity is not affected.
        async with running_client(network, "198.51.100.4") as other:
            assert other.addresses()


async def test_a_rejection_forged_in_an_initial_packet_is_temporary(autojump_clock, caplog):
    """CONNECTION_CLOSE in an Initial packet can come from anyone on the path. A fake server
    answers every Initial with one, carrying our own rejection code and words: the client must
    retry, not exit for good."""
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicErrorCode

    from tunnel.core.messages import CLOSE_REJECTED
    from tunnel.daemon.quic import server_configuration

    network = FakeNetwork()
    endpoint = network.bind(*SERVER_ADDR)
    config = server_configuration(SERVER_IDENTITY)

    async def forger():
        while True:
            await endpoint.wait_readable()
            for data, addr in endpoint.receive_batch(16):
                quic = QuicConnection(
                    configuration=config, original_destination_connection_id=data[6:14]
                )
                quic.receive_datagram(data, addr, now=trio.current_time())
                quic.close(
                    error_code=CLOSE_REJECTED,
                    frame_type=QuicErrorCode.NO_ERROR,
                    reason_phrase="Invalid authentication token",
                )
                for out, to in quic.datagrams_to_send(now=trio.current_time()):
                    endpoint.send(out, to)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forger)
        await expect_retried(network, "198.51.100.9", "Invalid authentication token", caplog)
        nursery.cancel_scope.cancel()


async def test_tickets_are_kept_only_for_clients_that_authenticated(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        from aioquic.quic.connection import QuicConnection

        from tunnel.daemon.quic import client_configuration

        # A token-less peer completes the QUIC handshake (aioquic issues it a ticket) and
        # never authenticates: nothing lands in the store.
        endpoint = network.bind("198.51.100.66", 5000)
        quic = QuicConnection(configuration=client_configuration())
        quic.connect(SERVER_ADDR, now=trio.current_time())
        for _ in range(20):
            for data, addr in quic.datagrams_to_send(now=trio.current_time()):
                endpoint.send(data, addr)
            await trio.sleep(0.05)
            for data, addr in endpoint.receive_batch(64):
                quic.receive_datagram(data, addr, now=trio.current_time())
        assert quic._handshake_complete
        assert len(server.tickets) == 0
        async with running_client(network, "198.51.100.2"):
            assert len(server.tickets) == 1


async def test_revoked_credentials_close_that_session_only(autojump_clock):
    from tunnel.core.tokens import TokenSet

    network = FakeNetwork()
    other_token = new_token()
    async with running_server(network, auth_tokens=[TOKEN, other_token]) as server:
        async with running_client(network, "198.51.100.3", auth_token=other_token) as b:
            client = Client(
                client_config(),
                Identity.generate(),
                RunOptions(),
                FakePlatform(network, "198.51.100.2"),
            )
            async with trio.open_nursery() as nursery:
                failure: list[BaseException] = []

                async def run_a():
                    try:
                        await client.supervise()
                    except PeerRejected as exc:
                        failure.append(exc)

                nursery.start_soon(run_a)
                await wait_for(lambda: client.state == "connected")
                server.authority.reload(tokens=TokenSet([other_token]), allowed_clients=None)
                assert server.revoke_failing() == 1
                start = trio.current_time()
                await wait_for(lambda: bool(failure))
                assert trio.current_time() - start < 1.0
                assert "credentials revoked" in str(failure[0])
            assert b.state == "connected" and b.reconnects == 0
            assert server.status()["revoked"] == 1
            with trio.fail_after(5):  # the revoked connection's draining period
                await wait_for(lambda: len(server.table.sessions) == 1)
            assert [s.client_id for s in server.table.sessions if s.lease] == [
                b.identity.public_key
            ]


async def test_silent_peer_is_dropped_after_the_handshake_deadline(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        from aioquic.quic.connection import QuicConnection

        from tunnel.daemon.quic import client_configuration

        endpoint = network.bind("198.51.100.66", 5000)
        quic = QuicConnection(configuration=client_configuration())
        quic.connect(SERVER_ADDR, now=trio.current_time())
        for data, addr in quic.datagrams_to_send(now=trio.current_time()):
            endpoint.send(data, addr)
        await trio.sleep(1)
        assert server.status()["pending_handshakes"] == 1
        await trio.sleep(server.config.handshake_timeout + 1)
        assert server.status()["pending_handshakes"] == 0
        assert not server.table.sessions


async def test_heartbeat_declares_a_partition_and_the_client_comes_back(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        first = a.addresses()
        network.policy = lambda data, src, dst: False  # full partition
        start = trio.current_time()
        await wait_for(lambda: a.state != "connected")
        # Declared within heartbeat_timeout (3 s), long before QUIC's 60 s idle timeout.
        assert trio.current_time() - start <= 3.5
        network.policy = lambda data, src, dst: True
        await wait_for(lambda: a.state == "connected")
        assert a.addresses() == first
        assert a.reconnects >= 1
        # The reconnect resumed the TLS session with the ticket from the first one.
        assert a.session.resumed
        assert a.tun is a.platform.tuns[0] and len(a.platform.tuns) == 1
        # The old session is gone from the server once its own idle timeout passes.
        await trio.sleep(70)
        assert len([s for s in server.table.sessions if s.lease is not None]) == 1


async def test_max_reconnect_attempts_gives_up_with_a_temporary_failure(autojump_clock):
    network = FakeNetwork()
    client = Client(
        client_config(max_reconnect_attempts=2),
        Identity.generate(),
        RunOptions(),
        FakePlatform(network, "198.51.100.2"),
    )
    with trio.fail_after(60), pytest.raises(GaveUp, match="gave up after 2"):
        await client.supervise()
    assert GaveUp.exit_code == 111


async def test_server_shutdown_closes_clients_at_once(autojump_clock):
    network = FakeNetwork()
    async with running_client_and_server_then_stop(network) as (client, stopped_at):
        # The client heard the close right away rather than at its heartbeat timeout.
        assert client.lost_at is not None
        assert client.lost_at - stopped_at < 0.5


@asynccontextmanager
async def running_client_and_server_then_stop(network):
    endpoint = network.bind(*SERVER_ADDR)
    server = Server(server_config(), SERVER_IDENTITY, endpoint, FakeTun("srv"))
    client = Client(
        client_config(auto_reconnect=False),
        Identity.generate(),
        RunOptions(),
        FakePlatform(network, "198.51.100.2"),
    )
    client.lost_at = None

    async def run_client():
        try:
            await client.supervise()
        except Exception:
            client.lost_at = trio.current_time()

    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def run_server(task_status=trio.TASK_STATUS_IGNORED):
            with server_scope:
                await server.run(task_status=task_status)

        await outer.start(run_server)
        outer.start_soon(run_client)
        await client.connected.wait()
        stopped_at = trio.current_time()
        server_scope.cancel()
        await trio.sleep(2)
        yield client, stopped_at


async def test_client_moves_to_a_new_socket_when_its_path_dies(autojump_clock):
    """A NAT that forgot us, or a source address that vanished: only the current socket's path
    is dead. The client migrates to a new socket; the session survives without a reconnect."""
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        dead = a.session.endpoint.local_address
        network.policy = lambda data, src, dst: dead not in (src, dst)
        await trio.sleep(5)
        assert a.state == "connected"
        assert a.reconnects == 0
        assert a.session.rebinds == 1
        a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, b"after"))
        with trio.fail_after(2):
            await server.tun.wait_written(1)
        (session,) = server.status()["sessions"]
        assert session["remote"] != f"{dead[0]}:{dead[1]}"


async def test_repeated_auth_failures_are_rate_limited_per_source(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        for _ in range(5):
            await expect_permanent(
                network,
                "203.0.113.7",
                PeerRejected,
                "Invalid authentication token",
                auth_token=new_token(),
            )
        # Even the right token is refused from that source for a while...
        client = Client(
            client_config(auto_reconnect=False),
            Identity.generate(),
            RunOptions(),
            FakePlatform(network, "203.0.113.7"),
        )
        with trio.fail_after(5), pytest.raises(SessionLost, match="too many failed attempts"):
            await client.supervise()
        assert server.gatekeeper.rate_limited == 1
        # ...while everyone else gets in as usual.
        async with running_client(network, "198.51.100.2") as a:
            assert a.addresses()


async def test_under_load_new_clients_must_answer_a_retry(autojump_clock, monkeypatch):
    monkeypatch.setattr("tunnel.daemon.server.daemon.RETRY_ABOVE", 0)
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        assert a.addresses()
        assert server.dispatcher.retries_sent == 1


async def test_handshakes_in_flight_are_limited_per_source(autojump_clock, monkeypatch):
    monkeypatch.setattr("tunnel.daemon.server.daemon.MAX_PENDING_PER_SOURCE", 2)
    from aioquic.quic.connection import QuicConnection

    from tunnel.daemon.quic import client_configuration

    network = FakeNetwork()
    async with running_server(network) as server:
        for port in range(5000, 5004):  # four silent peers from one address
            endpoint = network.bind("203.0.113.9", port)
            quic = QuicConnection(configuration=client_configuration())
            quic.connect(SERVER_ADDR, now=trio.current_time())
            endpoint.send_batch(quic.datagrams_to_send(now=trio.current_time()))
        await trio.sleep(0.5)
        assert server.status()["pending_handshakes"] == 2
        assert server.drops["handshake_limit"] == 2
        async with running_client(network, "198.51.100.2") as a:  # others unaffected
            assert a.addresses()


async def test_client_delivers_only_packets_addressed_to_it(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        session = next(iter(server.table.sessions))
        session.send_packet(build_ipv4_udp(v4("10.78.0.1"), v4("192.168.1.5"), 1, 2, b"other"))
        session.send_packet(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 1, 2, b"mine"))
        session.driver.transmit()
        with trio.fail_after(2):
            await a.tun.wait_written(1)
        await trio.sleep(0.5)
        assert [p[-4:] for p in a.tun.written] == [b"mine"]
        assert a.drops["not_ours"] == 1


async def test_a_replayed_signature_is_refused(autojump_clock, monkeypatch):
    """An AuthRequest recorded from a real client's handshake, replayed on a new connection,
    does not verify: the signature covers that connection's nonce only."""
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import ConnectionTerminated

    from tunnel.core.messages import AuthRequest, encode_frame
    from tunnel.daemon.client import ClientSession
    from tunnel.daemon.quic import client_configuration

    recorded: list[AuthRequest] = []
    original = ClientSession.send_frame

    def recording(self, frame):
        if isinstance(frame, AuthRequest):
            recorded.append(frame)
        original(self, frame)

    monkeypatch.setattr(ClientSession, "send_frame", recording)
    network = FakeNetwork()
    async with running_server(network) as server:
        async with running_client(network, "198.51.100.2"):
            pass
        (request,) = recorded
        # The attacker: a fresh QUIC connection that sends the recorded request verbatim.
        endpoint = network.bind("203.0.113.50", 6000)
        quic = QuicConnection(configuration=client_configuration())
        quic.connect(SERVER_ADDR, now=trio.current_time())
        quic.send_stream_data(0, encode_frame(request))
        closed = None
        with trio.fail_after(5):
            while closed is None:
                endpoint.send_batch(quic.datagrams_to_send(now=trio.current_time()))
                await trio.sleep(0.01)
                for data, addr in endpoint.receive_batch(64):
                    quic.receive_datagram(data, addr, now=trio.current_time())
                timer = quic.get_timer()
                if timer is not None and timer <= trio.current_time():
                    quic.handle_timer(now=trio.current_time())
                while (event := quic.next_event()) is not None:
                    if isinstance(event, ConnectionTerminated):
                        closed = event
        assert closed.reason_phrase == "invalid client signature"
        assert server.gatekeeper.auth_failures == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datagrams=st.lists(st.binary(max_size=1500), max_size=20),
    packets=st.lists(st.binary(max_size=200), max_size=20),
)
def test_garbage_never_disturbs_the_server(datagrams, packets):
    """Random bytes on the UDP port and random 'IP packets' from an admitted client: the server
    neither raises nor loses its session."""

    async def scenario():
        network = FakeNetwork()
        async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
            junk = network.bind("203.0.113.99", 7000)
            junk.send_batch([(d, SERVER_ADDR) for d in datagrams])
            for packet in packets:
                a.tun.inject(packet)
            await trio.sleep(1)
            a.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, b"alive"))
            with trio.fail_after(2):
                await server.tun.wait_written(1)
            assert server.tun.written[-1].endswith(b"alive") or any(
                p.endswith(b"alive") for p in server.tun.written
            )
            assert a.state == "connected"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_ipv6_only_server_translates_to_ipv4_with_nat64(autojump_clock):
    network = FakeNetwork()
    nat64 = {"enabled": True, "source_ip": "192.0.2.77", "udp_timeout": 5.0}
    async with (
        running_server(network, network=None, nat64=nat64) as server,
        running_client(network, "198.51.100.2") as a,
    ):
        assert a.addresses() == ["fd78::2/64"]  # IPv6 only
        v4_host = v4("198.51.100.7")
        a.tun.inject(build_ipv6_udp(v6("fd78::2"), v6("64:ff9b::198.51.100.7"), 5353, 53, b"q"))
        with trio.fail_after(2):
            await server.tun.wait_written(1)
        out = server.tun.written[0]
        assert out[0] >> 4 == 4 and out[12:16] == v4("192.0.2.77") and out[16:20] == v4_host
        mapped_port = int.from_bytes(out[20:22], "big")
        server.tun.inject(build_ipv4_udp(v4_host, v4("192.0.2.77"), 53, mapped_port, b"answer"))
        with trio.fail_after(2):
            await a.tun.wait_written(1)
        back = a.tun.written[0]
        assert back[0] >> 4 == 6
        assert back[8:24] == v6("64:ff9b::198.51.100.7") and back[24:40] == v6("fd78::2")
        assert int.from_bytes(back[42:44], "big") == 5353 and back.endswith(b"answer")
        assert server.status()["nat64"]["udp"] == 1
        await trio.sleep(6)  # past udp_timeout
        assert server.status()["nat64"]["mappings"] == 0


async def test_server_never_sends_its_own_quic_traffic_into_the_tunnel(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        own = build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), SERVER_ADDR[1], 5555, b"loop")
        server.tun.inject(own)
        server.tun.inject(build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 53, 5555, b"fine"))
        with trio.fail_after(2):
            await a.tun.wait_written(1)
        await trio.sleep(0.5)
        assert [p[-4:] for p in a.tun.written] == [b"fine"]
        assert server.drops["tunnel_port"] == 1


async def test_a_restarted_server_resets_old_sessions_at_once(autojump_clock):
    """The new server process knows nothing of the old session, but its stateless reset
    (tokens derived from its identity key) tells the client at the next packet instead of at
    the heartbeat timeout."""
    network = FakeNetwork()
    async with running_client_and_restartable_server(network) as (client, restart, servers):
        first = client.addresses()
        restarted_at = await restart()
        await wait_for(lambda: client.reconnects >= 1 and client.state == "connected")
        # heartbeat_interval is 10 s here and the timeout 60 s: only the reset explains this.
        assert trio.current_time() - restarted_at < 12
        assert client.addresses() == first
        assert servers[-1].dispatcher.resets_sent >= 1


@asynccontextmanager
async def running_client_and_restartable_server(network):
    servers = []
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                endpoint = network.bind(*SERVER_ADDR)
                try:
                    server = Server(server_config(), SERVER_IDENTITY, endpoint, FakeTun("srv"))
                    servers.append(server)
                    await server.run(task_status=task_status)
                finally:
                    endpoint.close()

        await nursery.start(serve)
        client = Client(
            client_config(heartbeat_interval=10.0, heartbeat_timeout=60.0),
            Identity.generate(),
            RunOptions(),
            FakePlatform(network, "198.51.100.2"),
        )
        nursery.start_soon(client.supervise)
        await client.connected.wait()

        async def restart():
            nonlocal scope
            # A crash: the old process says nothing more (its goodbye is dropped), then a new
            # process starts on the same address with the same identity.
            network.policy = lambda data, src, dst: False
            scope.cancel()
            await trio.sleep(0.5)
            network.policy = lambda data, src, dst: True
            scope = trio.CancelScope()
            await nursery.start(serve)
            return trio.current_time()

        yield client, restart, servers
        nursery.cancel_scope.cancel()


# -- the host's network changing under the client ------------------------------------------------

LINK_UP = NetworkChange("link", up=True, ifindex=2, ifname="eth0")
SERVER_ROUTE_KEY = f"server {SERVER_ADDR[0]}"


async def test_a_network_change_cuts_the_reconnect_backoff_short(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(300):
        await _backoff_cut_short(network)


async def _backoff_cut_short(network):
    async with running_server(network), running_client(network, "198.51.100.2") as a:
        network.policy = lambda data, src, dst: False  # the link is gone
        # Long enough for the backoff to grow past 8 s (1, 2, 4, 8 ...).
        await wait_for(lambda: a.reconnects >= 3 and a.state == "reconnecting")
        await trio.sleep(0.5)  # into the 8 s wait
        network.policy = lambda data, src, dst: True
        back = trio.current_time()
        a.platform.monitor.announce(LINK_UP)
        await wait_for(lambda: a.state == "connected")
        # One handshake away, not the rest of an 8 s (or longer) backoff.
        assert trio.current_time() - back < 1.0


async def test_a_network_change_restarts_a_stalled_handshake(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(300):
        await _stalled_handshake_restarted(network)


async def _stalled_handshake_restarted(network):
    async with running_server(network), running_client(network, "198.51.100.2") as a:
        network.policy = lambda data, src, dst: False
        await wait_for(lambda: a.reconnects >= 1 and a.state == "connecting")
        # The attempt's Initial and its retransmissions (0.2, 0.6 and 1.4 s after it, at
        # aioquic's initial RTT of 0.1 s) went into the void; the next would come after the
        # attempt's 2 s deadline, and then the backoff.
        await trio.sleep(1.5)
        network.policy = lambda data, src, dst: True
        back = trio.current_time()
        a.platform.monitor.announce(LINK_UP)
        await wait_for(lambda: a.state == "connected")
        assert trio.current_time() - back < 0.5


async def test_the_host_route_to_the_server_follows_the_underlay(autojump_clock):
    network = FakeNetwork()
    with trio.fail_after(300):
        await _host_route_follows(network)


async def _host_route_follows(network):
    # A route through the tunnel that covers the server's own address: a host route keeps
    # the server outside it. (A default route needs none: policy routing, below.)
    async with (
        running_server(network),
        running_client(network, "198.51.100.2", routes=["192.0.0.0/8"], routes6=[]) as a,
    ):
        host = a.network.host
        server_net = ipaddress.ip_network(f"{SERVER_ADDR[0]}/32")
        assert host.moving[SERVER_ROUTE_KEY] == Route(server_net, "192.0.2.254", 2)
        # The default gateway moves (another Wi-Fi, DHCP gave another router).
        host.underlay = ("192.0.2.253", 3)
        a.platform.monitor.announce(
            NetworkChange("route", up=True, ifindex=3, detail="0.0.0.0/0", table=254)
        )
        await wait_for(lambda: host.moving[SERVER_ROUTE_KEY].gateway == "192.0.2.253")
        assert host.moving[SERVER_ROUTE_KEY] == Route(server_net, "192.0.2.253", 3)
        # A session lost and won back keeps the TUN device and every route all along: no
        # moment in which traffic could leave in the clear.
        network.policy = lambda data, src, dst: False
        await wait_for(lambda: a.state != "connected")
        assert ("route", "192.0.0.0/8", a.tun.name, None) in host.applied
        assert host.moving[SERVER_ROUTE_KEY] == Route(server_net, "192.0.2.253", 3)
        network.policy = lambda data, src, dst: True
        await wait_for(lambda: a.state == "connected")
        assert a.platform.tuns == [a.tun]


async def test_a_full_tunnel_routes_by_policy_and_refuses_ipv6_it_does_not_carry(autojump_clock):
    network = FakeNetwork()
    async with (
        running_server(network, dns=["10.8.0.1"], dns_search=["corp.example"]),
        running_client(network, "198.51.100.2", routes=["0.0.0.0/0"], routes6=[]) as a,
    ):
        host = a.network.host
        mark = a.config.fwmark
        assert ("table route", mark, "0.0.0.0/0", a.tun.name) in host.applied
        assert ("table route", mark, "::/0", "unreachable") in host.applied
        rules = [entry for entry in host.applied if entry[0] == "rule"]
        assert len(rules) == 4, rules  # suppress + "not fwmark" for each family
        assert all(dict(rule[2])["priority"] in (32764, 32765) for rule in rules), rules
        assert ("sysctl", "net.ipv4.conf.all.src_valid_mark", "1") in host.applied
        assert host.moving == {}  # no host route pins the server to a gateway
        assert a.platform.state.get("policy_routing")["table"] == mark  # for a killed client
        # The pushed resolvers, for every lookup (the full tunnel's "~." routing domain).
        ((ifname, _, settings),) = a.platform.dns.applied
        assert ifname == a.tun.name
        assert settings.servers == (ipaddress.ip_address("10.8.0.1"),)
        assert settings.search == ("corp.example",)
        assert settings.route_all is True
        assert a.status()["dns"]["servers"] == ["10.8.0.1"]
    a.close()
    assert a.platform.dns.restores == 1
    assert a.platform.state.read() == {}  # nothing left to recover


async def test_allow_ipv6_outside_leaves_ipv6_alone_and_accept_dns_off_ignores_the_push(
    autojump_clock,
):
    network = FakeNetwork()
    async with (
        running_server(network, dns=["10.8.0.1"]),
        running_client(
            network, "198.51.100.2", routes=["0.0.0.0/0"], routes6=[], allow_ipv6_outside=True,
            accept_dns=False,
        ) as a,
    ):  # fmt: skip
        host = a.network.host
        assert not [e for e in host.applied if e[0] == "table route" and e[2] == "::/0"]
        assert {e[1] for e in host.applied if e[0] == "rule"} == {socket.AF_INET}
        assert a.platform.dns.applied == []
        assert a.status()["dns"] is None


async def test_a_name_that_stops_resolving_is_reached_at_its_last_addresses(autojump_clock):
    """The resolver may sit behind the very tunnel that is down (pushed DNS), or a kill switch
    refuses the others: the addresses of the last lookup keep the client coming back."""
    network = FakeNetwork()
    platform = FakePlatform(network, "198.51.100.2")
    platform.names["vpn.example"] = [SERVER_ADDR[0]]
    client = Client(
        client_config(server=f"vpn.example:{SERVER_ADDR[1]}"),
        Identity.generate(),
        RunOptions(),
        platform,
    )

    async def lookup_hangs(*args, **kwargs):
        await trio.sleep_forever()

    with trio.fail_after(300):
        async with trio.open_nursery() as nursery, running_server(network):
            nursery.start_soon(client.supervise)
            await client.connected.wait()
            for broken in ("no such name", "no answer"):
                if broken == "no such name":
                    platform.names["vpn.example"] = []
                else:
                    platform.resolve_all = lookup_hangs
                reconnects = client.reconnects
                network.policy = lambda data, src, dst: False  # the session is lost
                await wait_for(lambda: client.state != "connected")
                network.policy = lambda data, src, dst: True
                await wait_for(lambda: client.state == "connected")
                assert client.reconnects > reconnects, broken
            nursery.cancel_scope.cancel()


async def test_with_a_kill_switch_a_restart_finds_the_server_at_the_addresses_kept(autojump_clock):
    """Closed by the kill switch, a restarted client cannot look the name up through the
    network's resolver: it uses the addresses the previous run kept in its state file."""
    network = FakeNetwork()
    platform = FakePlatform(network, "198.51.100.2")
    platform.names["vpn.example"] = [SERVER_ADDR[0]]
    config = client_config(
        server=f"vpn.example:{SERVER_ADDR[1]}", kill_switch=True, tun_name="vpn0"
    )
    with trio.fail_after(60):
        async with running_server(network):
            for run in ("first", "after a crash"):
                client = Client(config, Identity.generate(), RunOptions(), platform)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.supervise)
                    await client.connected.wait()
                    nursery.cancel_scope.cancel()
                kept = platform.state.get("server_addresses")
                assert kept["server"] == f"vpn.example:{SERVER_ADDR[1]}", run
                assert [a[1][0] for a in kept["addresses"]] == [SERVER_ADDR[0]], run
                platform.names["vpn.example"] = []  # no lookup gets through any more


async def test_version_negotiation_only_for_full_size_datagrams_and_rate_limited(autojump_clock):
    network = FakeNetwork()
    async with running_server(network):
        prober = network.bind("198.51.100.77", 6000)
        # A long header of an unknown version: first byte, version, 8-byte DCID, 8-byte SCID.
        header = b"\xc0" + b"\x1a\x2a\x3a\x4a" + b"\x08" + bytes(8) + b"\x08" + bytes(range(8))
        prober.send(header + bytes(100), SERVER_ADDR)
        await trio.sleep(0.1)
        assert prober.receive_batch(10) == []  # no answer larger than what we sent
        for _ in range(300):
            prober.send(header + bytes(1200 - len(header)), SERVER_ADDR)
        await trio.sleep(0.1)
        answers = prober.receive_batch(1000)
        assert 1 <= len(answers) <= 100  # at most 100 a second
        assert answers[0][0][1:5] == bytes(4)  # version 0: Version Negotiation


async def test_every_address_of_the_name_is_tried_and_a_dead_first_one_costs_a_moment(
    autojump_clock,
):
    """Happy Eyeballs: the name's IPv6 address (first, as a broken IPv6 path looks) never
    answers; the IPv4 one does. Connected about one attempt delay later, and again so on
    every reconnect, never after a whole handshake timeout."""
    network = FakeNetwork()
    with trio.fail_after(120):
        async with running_server(network) as server:
            platform = FakePlatform(network, "198.51.100.2")
            platform.names["vpn.test"] = ["2001:db8::dead", SERVER_ADDR[0]]
            client = Client(
                client_config(server=f"vpn.test:{SERVER_ADDR[1]}"),
                Identity.generate(),
                RunOptions(),
                platform,
            )
            async with trio.open_nursery() as nursery:
                began = trio.current_time()
                nursery.start_soon(client.supervise)
                await client.connected.wait()
                assert trio.current_time() - began < 1.0  # the handshake timeout is 2 s
                assert client.server_addr == SERVER_ADDR
                # A server restart (stateless reset): back just as quickly.
                for session in list(server.table.sessions):
                    session.close(CLOSE_SHUTDOWN, "restart")
                server.flush()
                await wait_for(lambda: client.state != "connected")
                lost = trio.current_time()
                await wait_for(lambda: client.state == "connected")
                assert trio.current_time() - lost < 2.5  # one backoff step, one delay
                # Only the winner ever authenticated: one session on the server.
                await wait_for(lambda: len([s for s in server.table.sessions if s.lease]) == 1)
                nursery.cancel_scope.cancel()
