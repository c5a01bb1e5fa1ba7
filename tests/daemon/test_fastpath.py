"""The DATAGRAM fast path builds packets aioquic's peer accepts, and keeps aioquic's loss
recovery and congestion control exactly as informed as its own builder would."""

from __future__ import annotations

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import DatagramFrameReceived
from aioquic.quic.packet import pull_quic_header

from tunnel.core.identity import Identity
from tunnel.daemon.quic import (
    build_datagram_packets,
    client_configuration,
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
