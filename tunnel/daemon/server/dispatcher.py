"""The server's one receive loop: each datagram to its connection, or to admission.

A datagram whose connection ID names a session goes to that session's driver (its boundary).
Any other asks :class:`~tunnel.core.admission.HandshakeGate`, and the dispatcher carries out
the verdict: a new session, a Retry, a Version Negotiation, a stateless reset, or a drop.

A new session is not made inside the batch that brought its Initial: the Initial waits in the
backlog, and after each batch the dispatcher starts as many waiting handshakes as the work
budget allows (measured in seconds of this process's time), so datagrams of the sessions that
are up are never stuck behind a storm of newcomers.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicHeader,
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.tls import SessionTicket

from tunnel.core.admission import (
    Backlog,
    HandshakeGate,
    PacketKind,
    UnknownDatagram,
    Verdict,
    WorkBudget,
)
from tunnel.daemon.aioquic_private.state import ResettableConnection, tune
from tunnel.daemon.memory import CollectorPause, release_free_memory
from tunnel.daemon.quic import ResetTokens, TicketStore
from tunnel.daemon.server.forwarder import Forwarder
from tunnel.daemon.server.sessions import SessionTable
from tunnel.daemon.session import Drops, transmit_touched
from tunnel.daemon.udp import UdpEndpoint

if TYPE_CHECKING:
    from tunnel.daemon.server.session import ServerSession

log = logging.getLogger("tunnel.server")

UDP_BATCH = 64
DRAIN_BATCHES = 32  # batches read per pass while handshakes wait in the backlog
# Our connection IDs: their length lets a short header be read without parsing it.
CID_LENGTH = 8

_KINDS = {
    QuicPacketType.INITIAL: PacketKind.INITIAL,
    QuicPacketType.ONE_RTT: PacketKind.ONE_RTT,
    QuicPacketType.VERSION_NEGOTIATION: PacketKind.VERSION_NEGOTIATION,
}

# The share of a core new handshakes may take, and the most at once: what is left keeps the
# sessions that are up answered during a storm of newcomers.
HANDSHAKE_SHARE = 0.5
HANDSHAKE_BURST = 0.05  # seconds of work, about a dozen handshakes here
# Handshakes after which, once none is pending, the allocator's free memory is given back.
TRIM_AFTER = 64
# An Initial waits no longer than this for its turn (its client retransmits and queues again).
BACKLOG_MAX_AGE = 5.0


@dataclass(frozen=True, slots=True)
class _Waiting:
    """An admitted Initial waiting in the backlog for the work budget."""

    data: bytes
    addr: Any
    source: Any  # the local address it was sent to
    original_cid: bytes
    retry_cid: bytes | None
    destination_cid: bytes


# Makes the session for an admitted handshake: (connection, client address, local address the
# client sent to, the list its tickets go to until it authenticates).
SessionFactory = Callable[[QuicConnection, Any, Any, list[SessionTicket]], "ServerSession"]


class Dispatcher:
    """Reads the UDP endpoint in batches and hands each datagram to its owner."""

    def __init__(
        self,
        endpoint: UdpEndpoint,
        table: SessionTable,
        forwarder: Forwarder,
        gate: HandshakeGate,
        *,
        quic_config: QuicConfiguration,
        tickets: TicketStore,
        reset_tokens: ResetTokens,
        new_session: SessionFactory,
    ) -> None:
        self.endpoint = endpoint
        self.table = table
        self.forwarder = forwarder
        self.gate = gate
        self.quic_config = quic_config
        self.tickets = tickets
        self.reset_tokens = reset_tokens
        self.new_session = new_session
        self.retry = QuicRetryTokenHandler()
        self.drops = Drops()
        self.retries_sent = 0
        self.resets_sent = 0
        self.budget = WorkBudget(share=HANDSHAKE_SHARE, burst=HANDSHAKE_BURST)
        self.backlog: Backlog[_Waiting] = Backlog(max_age=BACKLOG_MAX_AGE)
        # What a handshake's work is measured with: this process's time, not the trio clock
        # (which stands still while we compute, and is virtual in tests).
        self.work_clock: Callable[[], float] = time.perf_counter
        self._since_trim = 0  # handshakes ended since the allocator last gave memory back
        self.collector = CollectorPause()
        self.nursery: trio.Nursery | None = None  # where new sessions run; set by the server
        # The local address the datagram being handled was sent to (None: the socket's own):
        # what answers to it (new sessions, Retry, resets, Version Negotiation) leave from.
        self.source: Any = None

    async def udp_pump(self) -> None:
        """Forever: a batch of datagrams in, then one send per session that has work."""
        try:
            await self._pump()
        finally:
            self.collector.release(trio.current_time())  # never leave the process without it

    async def _pump(self) -> None:
        endpoint = self.endpoint
        tun = self.forwarder.tun
        touched = self.table.touched
        clock = trio.lowlevel.current_clock()
        backlog = self.backlog
        while True:
            if backlog:
                # Waiting handshakes: up again when the budget allows one, or sooner for data.
                with trio.move_on_at(self.budget.ready_at(clock.current_time())):
                    await endpoint.wait_readable()
            else:
                await endpoint.wait_readable()
            now = clock.current_time()
            received: set[ServerSession] = set()
            # While handshakes wait, every pass spends a slice of work on them: the socket is
            # then drained deeper, or the datagrams of sessions that are up would queue behind
            # the newcomers' retransmissions in the kernel, a batch per slice.
            for _ in range(DRAIN_BATCHES if backlog else 1):
                batch = endpoint.receive_batch_with_local(UDP_BATCH)
                for data, addr, self.source in batch:
                    session = self.dispatch(data, addr, now)
                    if session is not None:
                        received.add(session)
                if len(batch) < UDP_BATCH:
                    break
            if backlog:
                self.collector.hold(now)
                self._start_waiting(now, received)
            else:
                self.collector.release(now)
            writes = tun.writes
            for session in received:
                session.driver.deliver_events()
                session.after_batch(now)
            tun.flush()  # the batch's packets for the kernel, runs of segments merged
            if tun.writes != writes:
                # The kernel answers some packets inside our write (an echo reply, a TCP ACK):
                # take those now, into this batch's send, not after another scheduler round.
                self.forwarder.forward_from_tun()
            # One send per session per batch: what receiving produced (ACKs) together with
            # what the events queued (packets forwarded to other clients, pongs, answers).
            touched |= received
            transmit_touched(touched)

    def dispatch(self, data: bytes, addr: Any, now: float) -> ServerSession | None:
        """One datagram: the session it went to, or None (answered statelessly, or dropped)."""
        by_cid = self.table.by_cid
        if data and not data[0] & 0x80:
            # Short header (every packet after the handshake): our connection IDs come right
            # after the first byte, no need to parse the header twice.
            session = by_cid.get(data[1 : 1 + CID_LENGTH])
            if session is not None:
                session.driver.receive(data, addr, now)
                return session
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.drops["udp_garbage"] += 1
            return None
        session = by_cid.get(header.destination_cid)
        if session is not None:
            session.driver.receive(data, addr, now)
            return session
        unknown = UnknownDatagram(
            kind=_KINDS.get(header.packet_type, PacketKind.OTHER),
            version=header.version,
            size=len(data),
            has_token=bool(header.token),
        )
        decision = self.gate.decide(unknown, addr[0], now)
        if decision.drop is not None:
            self.drops[decision.drop] += 1
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT or verdict is Verdict.ACCEPT_IF_TOKEN_VALID:
            self._admit(header, data, addr, now)
            return None
        if verdict is Verdict.RETRY:
            self._send_retry(header, addr, now)
        elif verdict is Verdict.NEGOTIATE:
            self._send(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self.quic_config.supported_versions,
                ),
                addr,
            )
        elif verdict is Verdict.RESET:
            self._send_stateless_reset(header.destination_cid, len(data), addr)
        return None

    def _admit(self, header: QuicHeader, data: bytes, addr: Any, now: float) -> None:
        """An Initial the gate let through: into the backlog (once per connection ID), where
        it counts as pending until its handshake ends."""
        if header.destination_cid in self.backlog:
            return  # the client retransmitted while it waits: it keeps its place
        original_cid, retry_cid = header.destination_cid, None
        if header.token:
            # The client answers our Retry: its token proves it owns its address.
            try:
                original_cid = self.retry.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=now,
                )
            except ValueError:
                self.drops["retry_token_invalid"] += 1
                return
            retry_cid = header.destination_cid
        waiting = _Waiting(data, addr, self.source, original_cid, retry_cid, header.destination_cid)
        self.backlog.push(header.destination_cid, waiting, now)
        self.gate.started(addr[0])

    def _start_waiting(self, now: float, received: set[ServerSession]) -> None:
        """Start waiting handshakes, oldest first, while the work budget lasts."""
        for expired in self.backlog.expire(now):
            self.drops["handshake_expired"] += 1
            self.gate.finished(expired.addr[0])
        budget, work_clock = self.budget, self.work_clock
        while self.backlog and budget.available(now):
            waiting = self.backlog.pop()
            assert waiting is not None
            started = work_clock()
            received.add(self._accept(waiting, now))
            budget.spent(now, work_clock() - started)

    def _accept(self, waiting: _Waiting, now: float) -> ServerSession:
        tickets: list[SessionTicket] = []
        quic = tune(
            ResettableConnection(
                reset_tokens=self.reset_tokens,
                configuration=self.quic_config,
                original_destination_connection_id=waiting.original_cid,
                retry_source_connection_id=waiting.retry_cid,
                session_ticket_fetcher=self.tickets.pop,
                session_ticket_handler=tickets.append,
            )
        )
        session = self.new_session(quic, waiting.addr, waiting.source, tickets)
        self.table.add(session, [waiting.destination_cid, quic.host_cid])
        session.driver.receive(waiting.data, waiting.addr, now)
        session.send_hello()
        assert self.nursery is not None
        self.nursery.start_soon(session.run)
        return session

    def handshake_finished(self, session: ServerSession) -> None:
        """A pending handshake ended (accepted, rejected or dropped): it no longer counts."""
        self.gate.finished(session.remote[0])
        self._since_trim += 1
        if self._since_trim >= TRIM_AFTER and not self.gate.pending_total:
            # A storm is over: what its handshakes held, freed between the sessions that
            # stay, goes back to the system instead of keeping the peak resident.
            self._since_trim = 0
            release_free_memory()

    def _send(self, packet: bytes, addr: Any) -> None:
        self.endpoint.send(packet, addr, self.source)

    def _send_stateless_reset(self, cid: bytes, size: int, addr: Any) -> None:
        """Tell a client of a connection we do not know (we restarted) that it is gone."""
        packet = self.reset_tokens.reset_packet(cid, size)
        if packet is not None:
            self._send(packet, addr)
            self.resets_sent += 1

    def _send_retry(self, header: QuicHeader, addr: Any, now: float) -> None:
        assert header.version is not None  # admission asks Retry of Initials only
        new_cid = secrets.token_bytes(CID_LENGTH)
        token = self.retry.create_token(
            address=addr,
            original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=new_cid,
            now=now,
        )
        self._send(
            encode_quic_retry(
                version=header.version,
                source_cid=new_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            ),
            addr,
        )
        self.retries_sent += 1

    def status(self) -> dict[str, object]:
        return {
            "pending_handshakes": self.gate.pending_total,
            "waiting_handshakes": len(self.backlog),
            "retries_sent": self.retries_sent,
            "resets_sent": self.resets_sent,
        }
