"""PMTU probes and datagram-size changes inside real aioquic connections, two in-memory peers
and virtual time: probes are acknowledged or lost without congestion control noticing,
aioquic's own sender keeps to a new size, and PmtuSearch driven through this glue finds the
MTU of a path that drops what is too large, and comes back down when it shrinks."""

from __future__ import annotations

import pytest
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import pull_quic_header
from test_fastpath import CLIENT, SERVER, connected_pair, drain, exchange

from tunnel.core.identity import Identity
from tunnel.core.pmtu import BASE_SIZE, PmtuSearch, PmtuState
from tunnel.daemon.aioquic_private.fastpath import (
    Received,
    build_datagram_packets,
    receive_datagram_fast,
)
from tunnel.daemon.aioquic_private.pmtu import (
    PacketTally,
    datagram_frame_room,
    probe_timeout,
    send_probe,
    set_datagram_size,
)
from tunnel.daemon.aioquic_private.state import tune
from tunnel.daemon.quic import (
    MAX_DATAGRAM_PAYLOAD,
    MAX_DATAGRAM_SIZE,
    client_configuration,
    server_configuration,
)


class Results(list):
    """Collects probe outcomes as (size, acked)."""

    def __call__(self, size: int, acked: bool) -> None:
        self.append((size, acked))


def frames_handled(quic: QuicConnection) -> list[int]:
    """Record the type of every frame aioquic's dispatcher hands to a handler."""
    seen: list[int] = []
    handlers = quic._QuicConnection__frame_handlers  # type: ignore[attr-defined]
    for frame_type, (handler, epochs) in list(handlers.items()):

        def recording(context, ftype, buf, _handler=handler):
            seen.append(ftype)
            return _handler(context, ftype, buf)

        handlers[frame_type] = (recording, epochs)
    return seen


def run_timers(quic: QuicConnection, now: float) -> None:
    timer = quic.get_timer()
    if timer is not None and timer <= now:
        quic.handle_timer(now)


def test_a_probe_has_exactly_its_size_and_its_acknowledgement_calls_back():
    client, server, now = connected_pair()
    loss = client._loss
    window, in_flight = loss.congestion_window, loss.bytes_in_flight
    results = Results()
    seen = frames_handled(server)
    probe = send_probe(client, 1300, now[0], results)
    assert probe is not None and len(probe) == 1300
    assert (loss.congestion_window, loss.bytes_in_flight) == (window, in_flight)
    # A PING and PADDING: the fast receiving path takes it as it takes a heartbeat, without
    # aioquic's frame handlers.
    assert receive_datagram_fast(server, probe, CLIENT, now[0]) is Received.PING_ONLY
    assert seen == []
    space = server._spaces[tls.Epoch.ONE_RTT]
    assert space.ack_at is not None  # ack-eliciting: an ACK is scheduled
    assert not [e for e in drain(server) if type(e).__name__ == "ConnectionTerminated"]
    now[0] += 0.03
    exchange(server, client, SERVER, now[0])
    assert results == [(1300, True)]
    assert (loss.congestion_window, loss.bytes_in_flight) == (window, in_flight)


def test_a_lost_probe_is_detected_once_later_packets_are_acknowledged_and_is_no_congestion(
    monkeypatch,
):
    client, server, now = connected_pair()
    cc = client._loss._cc
    congestion: list = []
    original = cc.on_packets_lost

    def on_packets_lost(*, now, packets):
        congestion.append(list(packets))
        original(now=now, packets=packets)

    monkeypatch.setattr(cc, "on_packets_lost", on_packets_lost)
    window = cc.congestion_window
    results = Results()
    assert send_probe(client, 1400, now[0], results) is not None  # dropped on the way
    # Four packets after it, each its own (1000 bytes do not share a packet).
    for _ in range(4):
        client.send_datagram_frame(b"d" * 1000)
    for packet in build_datagram_packets(client, now[0]):
        server.receive_datagram(packet, CLIENT, now=now[0])
    now[0] += 0.03
    exchange(server, client, SERVER, now[0])
    assert results == [(1400, False)]  # three later packets acknowledged: lost
    assert congestion == []
    assert cc.ssthresh is None  # no recovery period began
    assert cc.congestion_window >= window
    assert client._loss.bytes_in_flight == 0


def test_a_lost_probe_followed_by_one_packet_is_lost_by_the_time_threshold():
    client, server, now = connected_pair()
    results = Results()
    send_probe(client, 1400, now[0], results)  # dropped
    client.send_datagram_frame(b"d" * 100)
    for packet in build_datagram_packets(client, now[0]):
        server.receive_datagram(packet, CLIENT, now=now[0])
    now[0] += 0.03
    exchange(server, client, SERVER, now[0])
    assert results == []  # one later packet: not yet
    timer = client.get_timer()
    assert timer is not None and timer < now[0] + 1.0
    now[0] = timer
    client.handle_timer(now[0])
    assert results == [(1400, False)]
    assert client._loss._cc.ssthresh is None


def test_on_an_idle_connection_a_lost_probe_is_never_declared_lost():
    """Documented: with nothing sent after a probe aioquic never learns it was lost, and
    the probe does not arm the PTO either. The caller (PmtuSearch) times it out."""
    client, server, now = connected_pair()
    before = client._loss.get_loss_detection_time(amplification_limited=False)
    results = Results()
    send_probe(client, 1400, now[0], results)  # dropped
    assert client._loss.get_loss_detection_time(amplification_limited=False) == before
    end = now[0] + 10.0
    while now[0] < end:
        now[0] += 0.1
        run_timers(client, now[0])
        run_timers(server, now[0])
        exchange(client, server, CLIENT, now[0])
        exchange(server, client, SERVER, now[0])
    assert results == []
    assert client._loss._pto_count == 0


def test_no_probe_before_the_handshake_is_confirmed_or_once_closing():
    client = QuicConnection(configuration=client_configuration())
    client.connect(SERVER, now=0.0)
    assert send_probe(client, 1300, 0.0, Results()) is None
    connected, _, now = connected_pair()
    connected.close()
    assert send_probe(connected, 1300, now[0], Results()) is None


@pytest.mark.parametrize("size", [0, 1199, 65528])
def test_sizes_outside_quic_s_range_are_refused(size):
    client, _, now = connected_pair()
    with pytest.raises(ValueError):
        send_probe(client, size, now[0], Results())
    with pytest.raises(ValueError):
        set_datagram_size(client, size)


def test_frame_room_matches_the_fast_path_s_payload_limit():
    client, _, _ = connected_pair()
    assert datagram_frame_room(client, MAX_DATAGRAM_SIZE) == MAX_DATAGRAM_PAYLOAD
    assert datagram_frame_room(client, 1232) == MAX_DATAGRAM_PAYLOAD - 220


@pytest.mark.parametrize("size", [1200, 1232, 1452, 1500, 9000, 16414])
def test_frame_room_is_what_aioquic_s_builder_fits_and_more_sticks(size):
    client, _, now = connected_pair()
    set_datagram_size(client, size)
    room = datagram_frame_room(client, size)
    client.send_datagram_frame(b"x" * room)
    sent = client.datagrams_to_send(now=now[0])
    assert not client._datagrams_pending
    # Full, but for a byte where the length's varint grows by two (at 16384).
    assert size - 1 <= max(len(data) for data, _ in sent) <= size
    # One byte more never leaves aioquic's queue: why set_datagram_size takes such out.
    client.send_datagram_frame(b"y" * (room + 1))
    client.send_datagram_frame(b"z")
    client.datagrams_to_send(now=now[0])
    assert list(client._datagrams_pending) == [b"y" * (room + 1), b"z"]
    assert set_datagram_size(client, size) == [b"y" * (room + 1)]
    client.datagrams_to_send(now=now[0] + 0.1)  # past any pacing delay
    assert not client._datagrams_pending


def bulk(client: QuicConnection, server: QuicConnection, now: list[float], data: bytes) -> list:
    """Send ``data`` on stream 0 and run both peers until it all arrived; the sizes of every
    datagram aioquic's sender produced on the way."""
    client.send_stream_data(0, data)
    sizes = []
    received = bytearray()
    for _ in range(2000):
        now[0] += 0.005
        run_timers(client, now[0])
        run_timers(server, now[0])
        for datagram, _ in client.datagrams_to_send(now=now[0]):
            sizes.append(len(datagram))
            server.receive_datagram(datagram, CLIENT, now=now[0])
        exchange(server, client, SERVER, now[0])
        for event in drain(server):
            if isinstance(event, StreamDataReceived):
                received += event.data
        if len(received) == len(data):
            break
    assert bytes(received) == data
    return sizes


def test_after_set_datagram_size_aioquic_s_packets_keep_to_it():
    client, server, now = connected_pair()
    client.send_datagram_frame(b"a" * 1400)  # fitted 1452 bytes, not 1232
    client.send_datagram_frame(b"b" * 1000)
    assert set_datagram_size(client, 1232) == [b"a" * 1400]
    assert list(client._datagrams_pending) == [b"b" * 1000]
    loss = client._loss
    assert client._max_datagram_size == 1232
    assert loss._cc._max_datagram_size == 1232 and loss._pacer._max_datagram_size == 1232
    sizes = bulk(client, server, now, bytes(range(256)) * 1200)
    assert max(sizes) == 1232
    # And back up: full packets of the new size again.
    set_datagram_size(client, 1452)
    sizes = bulk(client, server, now, bytes(range(256)) * 1200)
    assert max(sizes) == 1452


def test_the_tally_counts_lost_and_acknowledged_packets_by_size_but_not_probes():
    client, server, now = connected_pair()
    tally = PacketTally(client)
    for size in (1400, 900, 1000, 700, 800):
        client.send_datagram_frame(b"t" * size)
    packets = build_datagram_packets(client, now[0])
    assert len(packets) == 5
    send_probe(client, 1452, now[0], Results())  # dropped too: not counted
    client.send_datagram_frame(b"u" * 100)
    packets += build_datagram_packets(client, now[0])
    for packet in packets[1:]:  # the first, the largest, is lost
        server.receive_datagram(packet, CLIENT, now=now[0])
    now[0] += 0.03
    exchange(server, client, SERVER, now[0])
    lost, largest = tally.take()
    assert lost == [len(packets[0])]
    assert largest == len(packets[2])  # the 1000-byte datagram's packet
    assert tally.take() == ([], 0)


def handshake_over(largest: int, size: int | None) -> bool:
    """Can a client and server connect over a path carrying at most ``largest`` bytes, each
    set to ``size`` before anything is sent (None: as configured)?"""
    now = 0.0
    client = tune(QuicConnection(configuration=client_configuration()))
    server = None
    if size is not None:
        set_datagram_size(client, size)
    client.connect(SERVER, now=now)
    for _ in range(200):
        for data, _ in client.datagrams_to_send(now=now):
            if server is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                server = tune(
                    QuicConnection(
                        configuration=server_configuration(Identity.generate()),
                        original_destination_connection_id=header.destination_cid,
                    )
                )
                if size is not None:
                    set_datagram_size(server, size)
            if len(data) <= largest:
                server.receive_datagram(data, CLIENT, now=now)
        if server is not None and server._network_paths:
            for data, _ in server.datagrams_to_send(now=now):
                if len(data) <= largest:
                    client.receive_datagram(data, SERVER, now=now)
            run_timers(server, now)
        if client._handshake_confirmed:
            return True
        now += 0.05
        run_timers(client, now)
    return False


def test_at_the_base_size_from_the_start_a_handshake_fits_a_1280_byte_path():
    # aioquic pads Initial datagrams to its max_datagram_size: at 1452, the handshake itself
    # never gets through a 1280-byte IPv6 path. Our configurations start at the base.
    assert not handshake_over(1232, MAX_DATAGRAM_SIZE)
    assert handshake_over(1232, BASE_SIZE)
    assert handshake_over(1232, None)


# -- PmtuSearch driven through the glue, over a path that drops what is too large ----------


class Session:
    """What a session does for PMTU discovery, over an in-memory path whose client-to-server
    direction carries UDP payloads of at most ``mtu`` bytes (the path MTU less the IP and UDP
    headers)."""

    def __init__(self, mtu: int) -> None:
        self.client, self.server, self._now = connected_pair()
        self.mtu = mtu
        self.search = PmtuSearch()
        self.tally = PacketTally(self.client)
        self.applied = BASE_SIZE
        set_datagram_size(self.client, BASE_SIZE)
        self.search.start(self.now)
        self.received = bytearray()

    @property
    def now(self) -> float:
        return self._now[0]

    def _on_result(self, size: int, acked: bool) -> None:
        if acked:
            self.search.probe_acked(size, self.now)
        else:
            self.search.probe_lost(size, self.now)

    def _to_server(self, datagram: bytes) -> None:
        if len(datagram) <= self.mtu:
            self.server.receive_datagram(datagram, CLIENT, now=self.now)

    def tick(self, dt: float = 0.005) -> None:
        self._now[0] += dt
        client, server, search = self.client, self.server, self.search
        run_timers(client, self.now)
        run_timers(server, self.now)
        for datagram, _ in client.datagrams_to_send(now=self.now):
            self._to_server(datagram)
        exchange(server, client, SERVER, self.now)
        for event in drain(server):
            if isinstance(event, StreamDataReceived):
                self.received += event.data
        # The PMTU part: feed the search, apply its size, send its probes.
        lost, largest = self.tally.take()
        if lost or largest:
            search.packet_loss_report(self.now, lost=lost, largest_acked=largest)
        if search.deadline is not None and search.deadline <= self.now:
            search.timer(self.now)
        while (size := search.next_probe(self.now, pto=probe_timeout(client))) is not None:
            probe = send_probe(client, size, self.now, self._on_result)
            assert probe is not None
            self._to_server(probe)
        if search.current != self.applied:
            set_datagram_size(client, search.current)
            self.applied = search.current


@pytest.mark.parametrize(
    ("largest", "found"), [(1500, 1452), (1452, 1452), (1400, 1392), (1300, 1296), (1232, 1232)]
)
def test_the_search_finds_the_path_mtu_through_real_connections(largest, found):
    session = Session(largest)
    while session.search.state is PmtuState.SEARCHING and session.now < 60.0:
        session.tick(0.02)
    assert session.search.current == found
    assert session.client._max_datagram_size == found


def test_a_black_hole_under_a_bulk_stream_is_found_and_the_transfer_completes():
    session = Session(1500)
    while session.search.state is PmtuState.SEARCHING:
        session.tick(0.02)
    assert session.search.current == 1452
    # The path shrinks to 1280 bytes (IPv6): every full packet of the stream is lost now.
    session.mtu = 1232
    data = bytes(range(256)) * 2000
    session.client.send_stream_data(0, data)
    shrunk = session.now
    while session.search.statistics().black_holes == 0 and session.now < shrunk + 30.0:
        session.tick()
    assert session.search.statistics().black_holes == 1
    assert session.now - shrunk < 3.0  # within seconds
    while len(session.received) < len(data) and session.now < shrunk + 50.0:
        session.tick()
    assert bytes(session.received) == data
    while session.search.state is PmtuState.SEARCHING:
        session.tick(0.02)
    assert session.search.current == 1232
