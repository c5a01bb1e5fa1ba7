"""The DATAGRAM fast path builds packets aioquic's peer accepts, and keeps aioquic's loss
recovery and congestion control exactly as informed as its own builder would."""

from __future__ import annotations

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import DatagramFrameReceived
from aioquic.quic.packet import pull_quic_header

from tunnel.core.identity import Identity
from tunnel.daemon.quic import (
    build_datagram_packets,
    client_configuration,
    receive_datagram_fast,
    server_configuration,
    tune,
)

CLIENT, SERVER = ("198.51.100.2", 5000), ("192.0.2.1", 4433)


def connected_pair() -> tuple[QuicConnection, QuicConnection, list[float]]:
    now = [0.0]
    client = tune(QuicConnection(configuration=client_configuration()))
    client.connect(SERVER, now=now[0])
    first = client.datagrams_to_send(now=now[0])
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = tune(QuicConnection(configuration=server_configuration(Identity.generate()),
                                 original_destination_connection_id=header.destination_cid))
    for data, _ in first:
        server.receive_datagram(data, CLIENT, now=now[0])
    for _ in range(10):
        now[0] += 0.01
        exchange(server, client, SERVER, now[0])
        exchange(client, server, CLIENT, now[0])
    drain(client)
    drain(server)
    return client, server, now


def exchange(sender: QuicConnection, receiver: QuicConnection, source, now: float) -> None:
    for data, _ in sender.datagrams_to_send(now=now):
        receiver.receive_datagram(data, source, now=now)


def drain(quic: QuicConnection) -> list:
    events = []
    while (event := quic.next_event()) is not None:
        events.append(event)
    return events


def test_packets_carry_every_datagram_in_order():
    client, server, now = connected_pair()
    assert client._handshake_confirmed
    sizes = [1400, 52, 52, 52, 1422, 700, 700, 1, 63, 64, 1300]
    datagrams = [bytes([i]) * size for i, size in enumerate(sizes)]
    for data in datagrams:
        client.send_datagram_frame(data)
    before = client._loss.bytes_in_flight
    packets = build_datagram_packets(client, now[0])
    assert not client._datagrams_pending
    assert len(packets) < len(datagrams)  # the small ones shared packets
    assert all(len(p) <= 1452 for p in packets)
    assert client._loss.bytes_in_flight == before + sum(len(p) for p in packets)
    for packet in packets:
        server.receive_datagram(packet, CLIENT, now=now[0])
    got = [e.data for e in drain(server) if isinstance(e, DatagramFrameReceived)]
    assert got == datagrams
    # The server's ACKs release them from flight, as for aioquic's own packets.
    now[0] += 0.05
    exchange(server, client, SERVER, now[0])
    assert client._loss.bytes_in_flight < before + 1000


def test_stops_at_the_congestion_window_and_leaves_the_rest_to_aioquic():
    client, server, now = connected_pair()
    for _ in range(200):
        client.send_datagram_frame(b"\x45" * 1400)
    packets = build_datagram_packets(client, now[0])
    window = client._loss.congestion_window
    assert client._loss.bytes_in_flight <= window
    assert 0 < len(packets) < 200
    assert len(client._datagrams_pending) == 200 - len(packets)


def test_not_used_before_the_handshake_is_confirmed():
    client = QuicConnection(configuration=client_configuration())
    client.connect(SERVER, now=0.0)
    client.send_datagram_frame(b"early")
    assert build_datagram_packets(client, 0.0) == []
    assert len(client._datagrams_pending) == 1


def test_receiving_half_delivers_and_acknowledges_like_aioquic():
    client, server, now = connected_pair()
    datagrams = [bytes([i]) * (100 + i) for i in range(30)]
    for data in datagrams:
        client.send_datagram_frame(data)
    packets = build_datagram_packets(client, now[0])
    largest_before = server._spaces[tls.Epoch.ONE_RTT].largest_received_packet
    for packet in packets:
        assert receive_datagram_fast(server, packet, CLIENT, now[0])
    got = [e.data for e in drain(server) if isinstance(e, DatagramFrameReceived)]
    assert got == datagrams
    space = server._spaces[tls.Epoch.ONE_RTT]
    assert space.largest_received_packet > largest_before
    assert space.ack_at is not None  # an ACK is due, as aioquic would have scheduled
    # A replayed packet is dropped as a duplicate: nothing new is delivered.
    assert receive_datagram_fast(server, packets[0], CLIENT, now[0])
    assert not [e for e in drain(server) if isinstance(e, DatagramFrameReceived)]


def test_receiving_half_leaves_everything_unusual_to_aioquic():
    client, server, now = connected_pair()
    client.send_datagram_frame(b"x" * 200)
    (packet,) = build_datagram_packets(client, now[0])
    other_path = ("198.51.100.99", 6000)
    assert not receive_datagram_fast(server, packet, other_path, now[0])  # migration
    wrong_cid = packet[:1] + bytes(8) + packet[9:]
    assert not receive_datagram_fast(server, wrong_cid, CLIENT, now[0])
    long_header = bytes([0xC0]) + packet[1:]
    assert not receive_datagram_fast(server, long_header, CLIENT, now[0])
    assert not receive_datagram_fast(server, packet[:20], CLIENT, now[0])
    assert not drain(server)
