"""The fast path side by side with aioquic's own: two copies of one connected pair get the same
datagrams, losses, reorderings, duplicates, waits and key updates. One copy is driven by
QuicDriver (the fast path both ways, aioquic wherever the fast path leaves off), the other by
aioquic's ``datagrams_to_send`` and ``receive_datagram`` alone. After every step both must have
put the same bytes on the wire, delivered the same events (the datagrams in the same order) and
kept the same loss recovery, congestion control and ACK state.

The copies are deep copies of one pair, with their own copies of the keys, so their packets
can be compared byte for byte. Where the fast path differs from aioquic on purpose (see
:mod:`tunnel.daemon.aioquic_private.fastpath`), the scenario keeps out of the way:

- neither copy paces (the fast path asks the pacer before every packet, aioquic once per
  ``datagrams_to_send``, so with pacing the two send the same packets at different times);
- datagrams go from the client to the server only, and the comparison ends where aioquic
  would put frames of its own in front of queued datagrams (a due ACK, a PTO probe's PING, a
  connection ID to retire that waited for the window with them): the fast path sends
  datagrams in packets of their own, and aioquic those frames after them;
- the idle deadline is compared to the second (the fast path's receiver pushes it back at most
  once a second).

Packets for a connection ID the peer has retired (a client's aioquic leaves ``host_cid`` naming
it) are compared like any other: both drop them.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoContext
from aioquic.quic.events import DatagramFrameReceived, QuicEvent
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketPacer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_fastpath import CLIENT, SERVER, connected_pair

from tunnel.daemon.aioquic_private.state import acknowledge_now
from tunnel.daemon.driver import QuicDriver
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD

C2S, S2C = "client->server", "server->client"


class Unpaced(QuicPacketPacer):
    """A pacer that never holds a packet back (``packet_time`` stays None)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        pass


@functools.cache
def template() -> tuple[QuicConnection, QuicConnection, float]:
    """One connected pair, unpaced, never touched again: every scenario copies it twice."""
    client, server, now = connected_pair()
    for quic in (client, server):
        quic._loss._pacer = Unpaced(max_datagram_size=quic._max_datagram_size)
    return client, server, now[0]


def clone(pair: tuple[QuicConnection, QuicConnection]) -> tuple[QuicConnection, QuicConnection]:
    """A deep copy of two connections. What cannot be copied is made again from the same inputs
    (packet protection from each key's secret, aioquic's C buffers) or shared (the TLS context
    and the configuration, which nothing here uses after the handshake)."""
    memo: dict[int, Any] = {}
    for quic in pair:
        memo[id(quic.tls)] = quic.tls
        memo[id(quic._configuration)] = quic._configuration
        for buf in quic._crypto_buffers.values():
            twin_buffer = Buffer(capacity=buf.capacity)
            twin_buffer.push_bytes(buf.data)
            memo[id(buf)] = twin_buffer
        for crypto_pair in (*quic._cryptos.values(), *quic._cryptos_initial.values()):
            for context in (crypto_pair.send, crypto_pair.recv):
                if context.aead is not None:
                    twin = CryptoContext()
                    twin.setup(
                        cipher_suite=context.cipher_suite,
                        secret=context.secret,
                        version=context.version,
                    )
                    memo[id(context.aead)] = twin.aead
                    memo[id(context.hp)] = twin.hp
    return copy.deepcopy(pair, memo)


def deterministic_connection_ids(quic: QuicConnection, seed: int) -> None:
    """New connection IDs (and reset tokens) from a seeded generator instead of os.urandom, so
    that both copies issue the same ones."""
    rng = random.Random(seed)
    replenish = quic._replenish_connection_ids

    def replenish_deterministically() -> None:
        before = len(quic._host_cids)
        replenish()
        for connection_id in quic._host_cids[before:]:
            connection_id.cid = rng.randbytes(len(connection_id.cid))
            connection_id.stateless_reset_token = rng.randbytes(16)

    quic._replenish_connection_ids = replenish_deterministically  # type: ignore[method-assign]


class StopComparing(Exception):
    """The scenario reached a state where the fast path is known to differ from aioquic."""


def would_bundle(quic: QuicConnection, now: float) -> bool:
    """Would aioquic put frames of its own in front of the datagrams of its next packet (those
    its sender writes first: a due ACK, a PING, a probe, connection IDs to issue or retire),
    with room in the window for the fast path to send some datagrams? The fast path sends them
    in packets of their own, and aioquic its frames after them."""
    pending = quic._datagrams_pending
    ack_at = quic._spaces[tls.Epoch.ONE_RTT].ack_at
    own_frames = (
        (ack_at is not None and ack_at <= now)
        or quic._probe_pending
        or quic._ping_pending
        or quic._retire_connection_ids
        or not all(connection_id.was_sent for connection_id in quic._host_cids)
    )
    if not (pending and own_frames):
        return False
    room = quic._loss.congestion_window - quic._loss.bytes_in_flight
    # The smallest packet the fast path would send: the first datagram alone (a 1- or 2-byte
    # length, short header and AEAD tag).
    return room >= len(pending[0]) + (2 if len(pending[0]) < 64 else 3) + 27


def for_retired_connection_id(quic: QuicConnection, packet: bytes) -> bool:
    """Is this 1-RTT packet for the connection ID that ``quic.host_cid`` still names although
    the peer retired it? Both copies must drop it (counted, to show the scenarios reach it)."""
    destination = packet[1:9]
    return (
        not packet[0] & 0x80
        and destination == quic.host_cid
        and all(connection_id.cid != destination for connection_id in quic._host_cids)
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def current_time(self) -> float:
        return self.now


class Endpoint:
    """One end of one copy: how it is driven, and what it lost (packet numbers, from aioquic's
    loss detection)."""

    def __init__(self, quic: QuicConnection, clock: Clock) -> None:
        self.quic = quic
        self.clock = clock
        self.lost: list[int] = []
        loss = quic._loss
        declare = loss._on_packets_lost

        def on_packets_lost(*, packets, **kwargs):  # type: ignore[no-untyped-def]
            packets = list(packets)
            self.lost.extend(packet.packet_number for packet in packets)
            declare(packets=packets, **kwargs)

        loss._on_packets_lost = on_packets_lost

    def fire_timer(self) -> bool:
        timer = self.quic.get_timer()
        if timer is None or timer > self.clock.now:
            return False
        self.quic.handle_timer(self.clock.now)
        return True


class Fast(Endpoint):
    """Driven as the daemon drives it: through a QuicDriver."""

    def __init__(self, quic: QuicConnection, clock: Clock) -> None:
        super().__init__(quic, clock)
        self._sent: list[tuple[bytes, Any]] = []
        self._events: list[QuicEvent] = []
        self.failures: list[Exception] = []
        self.driver = QuicDriver(quic, self._sent.extend, self._events.append, self.failures.append)
        self.driver._clock = clock  # type: ignore[assignment]
        # What aioquic's own sender and receiver did here: the rest was the fast path's.
        self.generic_sent = self.generic_received = self.sent = self.received = 0
        send_generic, receive_generic = quic.datagrams_to_send, quic.receive_datagram

        def datagrams_to_send(now: float) -> list[tuple[bytes, Any]]:
            datagrams = send_generic(now=now)
            self.generic_sent += len(datagrams)
            return datagrams

        def receive_datagram(data: bytes, addr: Any, now: float) -> None:
            self.generic_received += 1
            receive_generic(data, addr, now)

        quic.datagrams_to_send = datagrams_to_send  # type: ignore[method-assign]
        quic.receive_datagram = receive_datagram  # type: ignore[method-assign]

    def receive(self, data: bytes, addr: Any) -> None:
        self.received += 1
        self.driver.receive(data, addr, self.clock.now)

    def fire_timer(self) -> bool:
        fired = super().fire_timer()
        if fired:
            self.driver._aioquic_due = True  # what QuicDriver.run_timer does after the timer
        return fired

    def flush(self) -> tuple[list[QuicEvent], list[tuple[bytes, Any]]]:
        self.driver.pump()
        events, sent = self._events[:], self._sent[:]
        self._events.clear()
        self._sent.clear()
        self.sent += len(sent)
        assert not self.failures
        return events, sent


class Plain(Endpoint):
    """Driven through aioquic's own API only."""

    def receive(self, data: bytes, addr: Any) -> None:
        self.quic.receive_datagram(data, addr, self.clock.now)

    def flush(self) -> tuple[list[QuicEvent], list[tuple[bytes, Any]]]:
        events = list(iter(self.quic.next_event, None))
        return events, self.quic.datagrams_to_send(now=self.clock.now)


def snapshot(quic: QuicConnection) -> dict[str, Any]:
    """What the comparison holds equal: everything the fast path touches."""
    loss = quic._loss
    space = quic._spaces[tls.Epoch.ONE_RTT]
    crypto = quic._cryptos[tls.Epoch.ONE_RTT]
    return {
        "state": quic._state,
        "packet number": quic._packet_number,
        "datagrams queued": list(quic._datagrams_pending),
        "spin bit": (quic._spin_bit, quic._spin_highest_pn),
        "key phase": (crypto.send.key_phase, crypto.recv.key_phase, crypto._update_key_requested),
        "bytes in flight": loss.bytes_in_flight,
        "congestion control": {
            name: value
            for name, value in vars(loss._cc).items()
            if isinstance(value, int | float | type(None))
        },
        "rtt": (loss._rtt_latest, loss._rtt_min, loss._rtt_smoothed, loss._rtt_variance),
        "pto count": loss._pto_count,
        "loss detection time": loss.get_loss_detection_time(amplification_limited=False),
        "sent packets": {
            number: (p.sent_bytes, p.in_flight, p.is_ack_eliciting, p.sent_time)
            for number, p in space.sent_packets.items()
        },
        "largest acked": space.largest_acked_packet,
        "loss time": space.loss_time,
        "ack-eliciting in flight": space.ack_eliciting_in_flight,
        "ack queue": list(space.ack_queue),
        "ack at": space.ack_at,
        "expected packet number": space.expected_packet_number,
        "largest received": (space.largest_received_packet, space.largest_received_time),
        "sent since receipt": quic._ack_eliciting_sent_since_receipt,
        "path bytes sent": quic._network_paths[0].bytes_sent,
        "path validated": quic._network_paths[0].is_validated,
    }


@dataclass
class Copy:
    client: Endpoint
    server: Endpoint


class SideBySide:
    """Both copies, the network between them, and the comparison after every step."""

    def __init__(self) -> None:
        client, server, now = template()
        self.clock_fast, self.clock_plain = Clock(now), Clock(now)
        fast_client, fast_server = clone((client, server))
        plain_client, plain_server = clone((client, server))
        for seed, quic in enumerate((fast_client, fast_server, plain_client, plain_server)):
            deterministic_connection_ids(quic, seed % 2)
        self.fast = Copy(Fast(fast_client, self.clock_fast), Fast(fast_server, self.clock_fast))
        self.plain = Copy(
            Plain(plain_client, self.clock_plain), Plain(plain_server, self.clock_plain)
        )
        self.wire: dict[str, list[bytes]] = {C2S: [], S2C: []}
        self.sequence = 0
        self.delivered: list[bytes] = []
        self.seen: set[str] = set()  # what happened on the way, for the statistics
        self.flush()

    # -- the steps --------------------------------------------------------------------------

    def send(self, sizes: list[int]) -> None:
        """The client queues datagrams (the same in both copies) and sends."""
        for size in sizes:
            self.sequence += 1
            data = (self.sequence.to_bytes(4, "big") * (size // 4 + 1))[:size]
            self.fast.client.quic.send_datagram_frame(data)
            self.plain.client.quic.send_datagram_frame(data)
        self.flush()

    def network(self, direction: str, index: int, fate: str) -> None:
        """One packet in flight (``index``: not necessarily the oldest) is delivered, dropped or
        delivered and sent again later (a duplicate)."""
        wire = self.wire[direction]
        if not wire:
            return
        index %= len(wire)
        if index:
            self.seen.add("reordered")
        packet = wire.pop(index)
        if fate == "drop":
            self.seen.add("dropped")
        else:
            self.deliver(direction, packet)
            if fate == "duplicate":
                self.seen.add("duplicated")
                wire.append(packet)
        self.flush()

    def deliver_all(self, direction: str) -> None:
        wire = self.wire[direction]
        while wire:
            self.deliver(direction, wire.pop(0))
        self.flush()

    def wait(self, seconds: float, timers: bool = True) -> None:
        """Time passes; timers that are due fire, unless ``timers`` is false: then both ends
        only send what they have (as after a wake-up for a packet that came before the timer
        task ran), so a due ACK goes only if ``aioquic_has_work`` sees it."""
        self.clock_fast.now += seconds
        self.clock_plain.now += seconds
        if not timers:
            self.seen.add("sent with timers overdue")
        for fast, plain in (
            (self.fast.client, self.plain.client),
            (self.fast.server, self.plain.server),
        ):
            if not timers:
                break
            fired = plain.fire_timer()
            assert fast.fire_timer() == fired
        self.flush()

    def change_connection_id(self) -> None:
        """The client moves to the server's next connection ID and retires the old one (the
        server answers with a new one): frames the fast path leaves to aioquic both ways, and
        a connection ID the server's fast path does not know until aioquic switched to it."""
        if self.plain.client.quic._peer_cid_available:
            self.seen.add("connection ID changed")
        self.fast.client.quic.change_connection_id()
        self.plain.client.quic.change_connection_id()
        self.flush()

    def heartbeat(self) -> None:
        """The client's PING, and the server's ACK at once (``acknowledge_now``, as a server
        session answers a quiet client): on the fast copy, both without aioquic's sender on
        the server."""
        self.seen.add("heartbeat")
        self.sequence += 1
        self.fast.client.quic.send_ping(self.sequence)
        self.plain.client.quic.send_ping(self.sequence)
        self.flush()
        wire = self.wire[C2S]
        while wire:
            self.deliver(C2S, wire.pop(0))
        acknowledge_now(self.fast.server.quic, self.clock_fast.now)
        acknowledge_now(self.plain.server.quic, self.clock_plain.now)
        self.flush()

    def key_update(self, side: str) -> None:
        self.seen.add(f"key update by the {side}")
        getattr(self.fast, side).quic.request_key_update()
        getattr(self.plain, side).quic.request_key_update()
        self.flush()

    def settle(self) -> None:
        """Everything in flight delivered, in order, until both ends are quiet."""
        for _ in range(20):
            if not self.wire[C2S] and not self.wire[S2C]:
                self.wait(0.05)
                if not self.wire[C2S] and not self.wire[S2C]:
                    return
            self.deliver_all(C2S)
            self.deliver_all(S2C)
        raise AssertionError("the pair did not settle")

    # -- the comparison ---------------------------------------------------------------------

    def deliver(self, direction: str, packet: bytes) -> None:
        receiver = self.plain.server if direction == C2S else self.plain.client
        if for_retired_connection_id(receiver.quic, packet):
            self.seen.add("compared: a packet for a retired connection ID")
        if direction == C2S:
            self.fast.server.receive(packet, CLIENT)
            self.plain.server.receive(packet, CLIENT)
        else:
            self.fast.client.receive(packet, SERVER)
            self.plain.client.receive(packet, SERVER)

    def flush(self) -> None:
        """Both ends of both copies hand out their events and send; everything must match."""
        for side, direction in (("client", C2S), ("server", S2C)):
            fast, plain = getattr(self.fast, side), getattr(self.plain, side)
            if would_bundle(plain.quic, self.clock_plain.now):
                self.seen.add("stopped: aioquic would bundle its frames with datagrams")
                raise StopComparing
            fast_events, fast_sent = fast.flush()
            plain_events, plain_sent = plain.flush()
            assert fast_events == plain_events, f"{side} events"
            assert fast_sent == plain_sent, f"{side} sent other datagrams"
            self.delivered += [e.data for e in fast_events if isinstance(e, DatagramFrameReceived)]
            self.wire[direction] += [data for data, _ in fast_sent]
            self.compare(side, fast, plain)
        client = self.fast.client.quic
        if client._datagrams_pending:
            self.seen.add("window full")
        if self.fast.client.lost:
            self.seen.add("packets declared lost")
        if client._loss._cc.ssthresh is not None:
            self.seen.add("congestion event")
        if client._loss._pto_count:
            self.seen.add("PTO")

    def compare(self, side: str, fast: Endpoint, plain: Endpoint) -> None:
        fast_state, plain_state = snapshot(fast.quic), snapshot(plain.quic)
        for name, value in plain_state.items():
            assert fast_state[name] == value, f"{side}: {name}"
        assert fast.lost == plain.lost, f"{side}: packets declared lost"
        # The fast path's receiver pushes the idle deadline back at most once a second.
        fast_close, plain_close = fast.quic._close_at, plain.quic._close_at
        assert fast_close is not None and plain_close is not None
        assert plain_close - 1.0 - 1e-9 <= fast_close <= plain_close, f"{side}: idle deadline"


# -- the scenarios ----------------------------------------------------------------------------

datagram_sizes = st.one_of(
    st.integers(0, 80),
    st.integers(1300, MAX_DATAGRAM_PAYLOAD),
    st.integers(0, MAX_DATAGRAM_PAYLOAD),
)
directions = st.sampled_from([C2S, S2C])
network_step = st.tuples(
    st.just("network"),
    directions,
    st.integers(0, 3) | st.integers(0, 40),
    st.sampled_from(["deliver", "deliver", "drop", "duplicate"]),
)
step_kinds = {
    "send": st.tuples(st.just("send"), st.lists(datagram_sizes, min_size=1, max_size=14)),
    "network": network_step,
    "deliver_all": st.tuples(st.just("deliver_all"), directions),
    "wait": st.tuples(
        st.just("wait"),
        st.sampled_from([0.0005, 0.002, 0.01, 0.03, 0.1, 0.3, 1.0]),
        st.sampled_from([True, True, False]),
    ),
    "key_update": st.tuples(st.just("key_update"), st.sampled_from(["client", "server"])),
    "change_connection_id": st.tuples(st.just("change_connection_id")),
    "heartbeat": st.tuples(st.just("heartbeat")),
}
# Weighted: mostly sending and the network, now and then the rest.
steps = st.sampled_from(
    ["send"] * 6
    + ["network"] * 12
    + ["deliver_all"] * 2
    + ["wait"] * 4
    + ["key_update"] * 2
    + ["change_connection_id"]
    + ["heartbeat"] * 2
).flatmap(step_kinds.__getitem__)


def run(scenario: SideBySide, sequence: list[tuple[Any, ...]]) -> None:
    """Play the steps, then let the pair settle (unless the comparison had to stop)."""
    actions: dict[str, Callable[..., None]] = {
        "send": scenario.send,
        "network": scenario.network,
        "deliver_all": scenario.deliver_all,
        "wait": scenario.wait,
        "key_update": scenario.key_update,
        "change_connection_id": scenario.change_connection_id,
        "heartbeat": scenario.heartbeat,
    }
    try:
        for name, *arguments in sequence:
            actions[name](*arguments)
        scenario.settle()
    except StopComparing:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=10, max_size=40))
def test_the_fast_path_matches_aioquic_step_by_step(sequence):
    scenario = SideBySide()
    run(scenario, sequence)
    for seen in sorted(scenario.seen):
        event(seen)


def key_phases(endpoint: Endpoint) -> tuple[int, int]:
    crypto = endpoint.quic._cryptos[tls.Epoch.ONE_RTT]
    return crypto.send.key_phase, crypto.recv.key_phase


def test_a_scripted_scenario_exercises_every_case():
    """Losses (a congestion event), reordering, duplicates, key updates both ways, a full
    window and a PTO in one run, each checked to have happened, and the fast path to have
    done the work."""
    scenario = SideBySide()
    fast_client, fast_server = scenario.fast.client, scenario.fast.server
    scenario.send([1400] * 6 + [40] * 30)
    scenario.network(C2S, 1, "drop")
    scenario.network(C2S, 1, "duplicate")  # delivered out of order, and again later
    scenario.deliver_all(C2S)  # the duplicate too: the server drops it
    scenario.wait(0.002)  # the server's ACK is due
    scenario.deliver_all(S2C)
    assert "packets declared lost" in scenario.seen
    scenario.key_update("client")
    scenario.send([700, 52, 52])
    scenario.network(C2S, 2, "deliver")  # the new key phase, out of order
    scenario.deliver_all(C2S)
    assert key_phases(fast_server) == (1, 1)
    window = fast_client.quic._loss.congestion_window
    scenario.send([1400] * (window // 1400 + 4))  # more than the window holds
    assert "window full" in scenario.seen
    scenario.deliver_all(C2S)
    scenario.key_update("server")
    scenario.wait(0.002)
    scenario.deliver_all(S2C)  # ACKs in the server's new key phase open the window again
    assert key_phases(fast_client) == (0, 0)
    assert not fast_client.quic._datagrams_pending
    scenario.deliver_all(C2S)
    scenario.wait(0.002)
    scenario.network(S2C, 0, "drop")  # the last ACK is lost: the client's PTO fires
    for _ in range(5):
        scenario.wait(0.1)
    scenario.settle()
    assert {
        "dropped",
        "reordered",
        "duplicated",
        "key update by the client",
        "key update by the server",
        "window full",
        "packets declared lost",
        "congestion event",
        "PTO",
    } <= scenario.seen
    assert scenario.sequence - 1 <= len(scenario.delivered) < scenario.sequence
    assert fast_server.generic_received < fast_server.received / 4, "the fast path received"
    assert fast_client.generic_sent < fast_client.sent / 4, "the fast path sent"


def test_heartbeats_are_acknowledged_by_the_fast_path():
    """An idle session's heartbeats: the server's fast path takes each PING and builds each
    ACK, the bytes aioquic would send (the client's PINGs acknowledged in both copies: events
    compared). With a gap in the ranges, an ACK in a packet whose number is a multiple of 8
    is left to aioquic, which adds its ACK-of-ACK PING there; the client's answer to it
    prunes the ranges."""
    scenario = SideBySide()
    server = scenario.fast.server
    space = server.quic._spaces[tls.Epoch.ONE_RTT]

    def heartbeats(count: int) -> tuple[int, set[int]]:
        generic_before = server.generic_sent
        ranges = set()
        for _ in range(count):
            scenario.wait(10.0, timers=False)
            scenario.heartbeat()
            ranges.add(len(space.ack_queue))
            assert len(scenario.wire[S2C]) == 1, "one ACK per heartbeat"
            scenario.deliver_all(S2C)
            scenario.deliver_all(C2S)  # the client's ACK of an ACK-of-ACK PING, if any
        return server.generic_sent - generic_before, ranges

    received_before, generic_received_before = server.received, server.generic_received
    assert heartbeats(20) == (0, {1})
    assert server.received == received_before + 20
    assert server.generic_received == generic_received_before

    scenario.send([100, 100, 100])
    scenario.network(C2S, 1, "drop")
    scenario.deliver_all(C2S)
    scenario.wait(0.002)
    scenario.deliver_all(S2C)
    generic, ranges = heartbeats(12)
    # aioquic's: the ACK with its ACK-of-ACK PING, then the answer to the client's next
    # heartbeat, which carried the client's ACK of that PING (a frame aioquic handles).
    assert generic == 2 and ranges == {1, 2}
    assert {"heartbeat"} <= scenario.seen


def test_the_window_boundary_byte_by_byte():
    """The fast path stops at the congestion window where aioquic's builder does, to the byte:
    a window with exactly one packet's room, one byte less or more, for packets of one or
    several datagrams."""
    for sizes in ([0], [1], [63], [64], [1000], [MAX_DATAGRAM_PAYLOAD], [40] * 20, [700, 700]):
        frames = sum(1 + (1 if size < 64 else 2) + size for size in sizes)
        for extra in (-2, -1, 0, 1, 2):
            scenario = SideBySide()
            for copy_ in (scenario.fast, scenario.plain):
                loss = copy_.client.quic._loss
                loss._cc.congestion_window = loss.bytes_in_flight + frames + 27 + extra
            scenario.send(sizes)  # compared: the same packets, or none, from both
            sent = scenario.wire[C2S]
            assert bool(sent) == (extra >= 0) or len(sizes) > 1, (sizes, extra)


def test_more_ack_ranges_than_aioquic_keeps():
    """Every other packet lost, until the server's ACK ranges outnumber what aioquic keeps
    (MAX_ACK_RANGES): both drop the oldest range the same way. (A window that holds them all,
    and no time passing until the end, keeps congestion control and timers out of it.)"""
    scenario = SideBySide()
    for copy_ in (scenario.fast, scenario.plain):
        copy_.client.quic._loss._cc.congestion_window = 10**7
    space = scenario.fast.server.quic._spaces[tls.Epoch.ONE_RTT]
    for i in range(2 * MAX_ACK_RANGES + 10):
        scenario.send([1400])
        scenario.network(C2S, 0, "drop" if i % 2 else "deliver")
    assert len(space.ack_queue) == MAX_ACK_RANGES
    scenario.settle()
    assert len(scenario.fast.client.lost) > MAX_ACK_RANGES


def test_a_packet_for_a_retired_connection_id_is_dropped():
    """The client moves to a new connection ID of the server's, the server follows with one of
    the client's and retires the client's old one; a packet the server sent to that old ID
    before, arriving after the retirement, is dropped by aioquic, and by the fast path."""
    scenario = SideBySide()
    client = scenario.fast.client.quic
    scenario.send([100])
    scenario.deliver_all(C2S)
    scenario.wait(0.002)
    (stale,) = scenario.wire[S2C]  # the server's ACK, for the client's current ID
    scenario.wire[S2C].clear()
    scenario.change_connection_id()
    scenario.send([100])
    scenario.deliver_all(C2S)  # the server switches IDs and retires the client's old one
    scenario.wait(0.002)
    scenario.deliver_all(S2C)
    assert stale[1:9] == client.host_cid
    assert all(connection_id.cid != client.host_cid for connection_id in client._host_cids)
    scenario.fast.client.receive(stale, SERVER)
    scenario.plain.client.receive(stale, SERVER)
    assert snapshot(scenario.fast.client.quic) == snapshot(scenario.plain.client.quic)
