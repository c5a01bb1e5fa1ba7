"""The DATAGRAM fast path builds packets aioquic's peer accepts, and keeps aioquic's loss
recovery and congestion control exactly as informed as its own builder would."""

from __future__ import annotations

import pytest
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoError, CryptoPair
from aioquic.quic.events import DatagramFrameReceived
from aioquic.quic.packet import QuicProtocolVersion, pull_quic_header
from aioquic.tls import CipherSuite
from hypothesis import given
from hypothesis import strategies as st

import tunnel.daemon.aioquic_private.fastpath as fastpath_module
import tunnel.daemon.driver as driver_module
from tunnel.core.identity import Identity
from tunnel.core.messages import CLOSE_INTERNAL
from tunnel.daemon.aioquic_private.fastpath import (
    Received,
    _datagram_frames,
    build_datagram_packets,
    open_short_packet,
    receive_datagram_fast,
    seal_short_packet,
)
from tunnel.daemon.aioquic_private.pmtu import set_datagram_size
from tunnel.daemon.aioquic_private.state import tune
from tunnel.daemon.driver import QuicDriver
from tunnel.daemon.quic import (
    INITIAL_DATAGRAM_SIZE,
    MAX_DATAGRAM_SIZE,
    client_configuration,
    server_configuration,
)

CLIENT, SERVER = ("198.51.100.2", 5000), ("192.0.2.1", 4433)


def connected_pair(
    datagram_size: int | None = MAX_DATAGRAM_SIZE,
) -> tuple[QuicConnection, QuicConnection, list[float]]:
    """Two connected peers; ``datagram_size`` is what both then send (what path MTU discovery
    finds on a 1500-byte path, by default; None: the 1200 bytes every connection starts at)."""
    now = [0.0]
    client = tune(QuicConnection(configuration=client_configuration()))
    client.connect(SERVER, now=now[0])
    first = client.datagrams_to_send(now=now[0])
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = tune(
        QuicConnection(
            configuration=server_configuration(Identity.generate()),
            original_destination_connection_id=header.destination_cid,
        )
    )
    for data, _ in first:
        server.receive_datagram(data, CLIENT, now=now[0])
    for _ in range(10):
        now[0] += 0.01
        exchange(server, client, SERVER, now[0])
        exchange(client, server, CLIENT, now[0])
    drain(client)
    drain(server)
    if datagram_size is not None:
        for quic in (client, server):
            set_datagram_size(quic, datagram_size)
            # The window of a connection that had this size from the start (RFC 9002 7.2).
            loss = quic._loss
            window = loss._cc.congestion_window * datagram_size // INITIAL_DATAGRAM_SIZE
            loss._cc.congestion_window = max(loss._cc.congestion_window, window)
            loss._pacer.update_rate(loss._cc.congestion_window, loss._rtt_smoothed)
            loss._pacer.bucket_time = loss._pacer.bucket_max
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


# -- the datagram-only payload parser -------------------------------------------------------


def datagram_frame(data: bytes, length_bytes: int | None) -> bytes:
    """A DATAGRAM frame: with a 1- or 2-byte (or longer, legal but unusual) length, or None
    for the length-less form that runs to the end of the packet."""
    if length_bytes is None:
        return b"\x30" + data
    prefix = {1: 0, 2: 0x4000, 4: 0x8000_0000}[length_bytes]
    return b"\x31" + (prefix | len(data)).to_bytes(length_bytes, "big") + data


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    st.booleans(),
    st.data(),
)
def test_datagram_payloads_are_read_as_aioquic_reads_them(datagrams, last_without_length, data):
    sizes = [data.draw(st.sampled_from([1, 2] if len(d) < 64 else [2])) for d in datagrams]
    frames = [datagram_frame(d, n) for d, n in zip(datagrams, sizes, strict=True)]
    if last_without_length:
        frames[-1] = datagram_frame(datagrams[-1], None)
    payload = b"".join(frames)
    assert _datagram_frames(payload, 65535) == datagrams


@given(st.binary(max_size=200))
def test_datagram_payload_parser_never_raises_on_random_bytes(payload):
    result = _datagram_frames(payload, 65535)
    assert result is None or all(isinstance(d, bytes) for d in result)


def test_anything_but_datagram_frames_is_left_to_aioquic():
    one = datagram_frame(b"abc", 1)
    assert _datagram_frames(one + b"\x01", 65535) is None  # a PING after it
    assert _datagram_frames(b"\x00" + one, 65535) is None  # PADDING first
    assert _datagram_frames(datagram_frame(b"abc", 4), 65535) is None  # unusual length form
    assert _datagram_frames(b"\x31\x05abc", 65535) is None  # runs past the end
    assert _datagram_frames(b"", 65535) is None  # no frames at all
    assert _datagram_frames(one, None) is None  # DATAGRAM not negotiated
    assert _datagram_frames(datagram_frame(b"x" * 100, 2), 100) is None  # over our limit
    assert _datagram_frames(datagram_frame(b"x" * 90, 2), 100) == [b"x" * 90]


def test_receiving_half_reports_what_aioquic_has_to_answer():
    client, server, now = connected_pair()
    client.send_datagram_frame(b"x" * 200)
    (packet,) = build_datagram_packets(client, now[0])
    assert receive_datagram_fast(server, packet, CLIENT, now[0]) is Received.DATAGRAMS_ONLY
    # A heartbeat: a PING (padded), nothing for aioquic's sender but the ACK.
    client.send_ping(7)
    ((ping_packet, _),) = client.datagrams_to_send(now=now[0])
    assert receive_datagram_fast(server, ping_packet, CLIENT, now[0]) is Received.PING_ONLY
    assert server._spaces[tls.Epoch.ONE_RTT].ack_at is not None
    # Stream data goes through aioquic's frame handlers.
    client.send_stream_data(0, b"hello")
    ((stream_packet, _),) = client.datagrams_to_send(now=now[0])
    assert receive_datagram_fast(server, stream_packet, CLIENT, now[0]) is Received.DONE


# -- the driver sends through aioquic's generic path only when it may have work -------------


class CountingConnection:
    """Counts calls of aioquic's generic ``datagrams_to_send`` on one connection."""

    def __init__(self, quic: QuicConnection) -> None:
        self.calls = 0
        original = quic.datagrams_to_send

        def counted(now: float):
            self.calls += 1
            return original(now=now)

        quic.datagrams_to_send = counted  # type: ignore[method-assign]


def reply_number(quic: QuicConnection) -> int:
    """The packet number of the last packet ``quic`` sent."""
    return quic._packet_number - 1


def test_driver_skips_the_generic_sender_when_only_datagrams_are_queued(monkeypatch):
    client, server, now = connected_pair()

    class Clock:
        def current_time(self) -> float:
            return now[0]

    monkeypatch.setattr(driver_module.trio.lowlevel, "current_clock", Clock)
    sent: list = []
    failures: list[Exception] = []
    driver = QuicDriver(client, sent.extend, lambda event: None, failures.append)
    generic = CountingConnection(client)

    driver.transmit()  # a new driver knows nothing about the connection: full send
    assert generic.calls == 1

    client.send_datagram_frame(b"p" * 100)
    driver.transmit()
    assert generic.calls == 1 and len(sent) == 1  # sent by the fast path alone

    for queue_work in (
        lambda: client.send_stream_data(0, b"control"),
        lambda: client.send_ping(1),
        lambda: client.change_connection_id(),
    ):
        queue_work()
        before = generic.calls
        driver.transmit()
        assert generic.calls == before + 1

    # A packet of datagrams from the peer schedules an ACK but nothing else; the ACK goes
    # out once it is due, built by the fast path too, and the peer takes it.
    server.send_datagram_frame(b"q" * 100)
    (reply,) = build_datagram_packets(server, now[0])
    before = generic.calls
    driver.receive(reply, SERVER, now[0])
    driver.transmit()
    assert generic.calls == before
    now[0] += 0.05
    sent.clear()
    driver.transmit()
    assert generic.calls == before and len(sent) == 1  # the ACK
    server_space = server._spaces[tls.Epoch.ONE_RTT]
    assert reply_number(server) in server_space.sent_packets
    server.receive_datagram(sent[0][0], CLIENT, now=now[0])
    assert reply_number(server) not in server_space.sent_packets  # acknowledged
    sent.clear()

    # Anything else from the peer (here its ACKs) goes through aioquic's sender.
    client.send_datagram_frame(b"r" * 100)
    driver.transmit()
    for data, _ in sent:
        server.receive_datagram(data, CLIENT, now=now[0])
    now[0] += 0.05
    acks = server.datagrams_to_send(now=now[0])
    assert acks
    before = generic.calls
    for data, _ in acks:
        driver.receive(data, SERVER, now[0])
    driver.transmit()
    assert generic.calls == before + 1
    assert not failures


def test_driver_is_the_connection_fault_boundary(monkeypatch):
    """A handler that raises closes that connection with CLOSE_INTERNAL and reports the
    exception; nothing reaches the caller, and the failed driver ignores what comes after."""
    client, server, now = connected_pair()

    class Clock:
        def current_time(self) -> float:
            return now[0]

    monkeypatch.setattr(driver_module.trio.lowlevel, "current_clock", Clock)
    monkeypatch.setattr(driver_module.trio, "current_time", lambda: now[0])

    def explode(event):
        raise RuntimeError("handler bug")

    sent: list = []
    failures: list[Exception] = []
    driver = QuicDriver(client, sent.extend, explode, failures.append)
    server.send_datagram_frame(b"q" * 100)
    for data, _ in server.datagrams_to_send(now=now[0]):
        driver.receive(data, SERVER, now[0])
    driver.deliver_events()  # does not raise
    assert driver.failed and [type(f) for f in failures] == [RuntimeError]
    assert sent, "the close was sent"
    for data, _ in sent:
        server.receive_datagram(data, CLIENT, now=now[0])
    now[0] += 10  # past the draining period, when aioquic reports the close
    server.handle_timer(now[0])
    closes = [
        e for e in iter(server.next_event, None) if type(e).__name__ == "ConnectionTerminated"
    ]
    assert closes and closes[0].error_code == CLOSE_INTERNAL
    sent.clear()
    driver.receive(b"anything", SERVER, now[0])
    driver.transmit()
    assert not sent and len(failures) == 1


# -- packet protection called directly gives aioquic's bytes --------------------------------

SUITES = [
    CipherSuite.AES_128_GCM_SHA256,
    CipherSuite.AES_256_GCM_SHA384,
    CipherSuite.CHACHA20_POLY1305_SHA256,
]


def crypto_pairs(suite: CipherSuite, secret: bytes) -> tuple[CryptoPair, CryptoPair]:
    """A sender's and a receiver's CryptoPair sharing one 1-RTT secret."""
    sender, receiver = CryptoPair(), CryptoPair()
    size = 48 if suite == CipherSuite.AES_256_GCM_SHA384 else 32
    key = (secret * 2)[:size]
    for pair in (sender, receiver):
        pair.send.setup(cipher_suite=suite, secret=key, version=QuicProtocolVersion.VERSION_1)
        pair.recv.setup(cipher_suite=suite, secret=key, version=QuicProtocolVersion.VERSION_1)
    return sender, receiver


def test_direct_packet_protection_is_in_use_with_this_aioquic():
    # If aioquic's internals move, the fast path quietly falls back; this says when it did.
    assert fastpath_module._DIRECT_CRYPTO


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
@given(
    secret=st.binary(min_size=32, max_size=32),
    payload=st.binary(min_size=20, max_size=1400),
    number=st.integers(min_value=0, max_value=2**32),
    spin=st.booleans(),
)
def test_sealing_and_opening_match_aioquic_byte_for_byte(suite, secret, payload, number, spin):
    sender, receiver = crypto_pairs(suite, secret)
    cid = secret[:8]
    first = 0x41 | (spin << 5)
    header = bytes((first,)) + cid + (number & 0xFFFF).to_bytes(2, "big")
    packet = seal_short_packet(sender, first, cid, number, payload)
    assert packet == sender.encrypt_packet(header, payload, number)
    expected = max(0, number - 1000)
    assert open_short_packet(receiver, packet, expected) == receiver.decrypt_packet(
        packet, 9, expected
    )
    tampered = packet[:-1] + bytes((packet[-1] ^ 1,))
    with pytest.raises(CryptoError):
        open_short_packet(receiver, tampered, expected)
    with pytest.raises(CryptoError):
        open_short_packet(receiver, packet[:20], expected)  # too short to sample
