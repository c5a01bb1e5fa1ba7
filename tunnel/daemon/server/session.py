"""One client connection on the server, from its first Initial to its close.

A session knows its own protocol state, counters and send queue, and reaches the rest of the
server only through the :class:`SessionServices` it is given: the session table (connection IDs,
routes, leases), the forwarder (its client's packets), the gatekeeper (its AuthRequest) and the
endpoint it sends from. It knows nothing of other sessions.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import SessionTicket
from trio_util import wait_any

from tunnel.core.authority import REASON_REVOKED, Lease
from tunnel.core.control import CONTROL_STREAM, ServerControl
from tunnel.core.identity import encode_public_id
from tunnel.core.messages import (
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_OK,
    CLOSE_PROTOCOL,
    CLOSE_RATE_LIMITED,
    CLOSE_REJECTED,
    CLOSE_SHUTDOWN,
    PROTOCOL_VERSION,
    AuthRequest,
    AuthResponse,
    Pong,
    ServerHello,
    encode_frame,
)
from tunnel.daemon.aioquic_private.state import (
    acknowledge_now,
    connection_binding,
    shed_handshake_buffers,
    smoothed_rtt,
    stream_buffered,
)
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD, TicketStore
from tunnel.daemon.server.auth import Gatekeeper
from tunnel.daemon.server.forwarder import Forwarder
from tunnel.daemon.server.introducer import Introducer
from tunnel.daemon.server.sessions import SessionTable
from tunnel.daemon.session import Channel, Drops, SessionLog
from tunnel.daemon.udp import UdpEndpoint, format_address
from tunnel.errors import ProtocolViolation

log = logging.getLogger("tunnel.server")

# How long a rejecting or revoking session waits for the client to have our answer.
LINGER = 1.0
QUIET = 0.025  # s without a datagram from the client after which the next is acknowledged at once


def _short(client_id: bytes | None) -> str:
    return encode_public_id(client_id)[:12] if client_id else "-"


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session of one server is given: the server's objects it may call."""

    table: SessionTable
    forwarder: Forwarder
    gatekeeper: Gatekeeper
    introducer: Introducer
    tickets: TicketStore
    endpoint: UdpEndpoint
    handshake_finished: Callable[[ServerSession], None]
    handshake_timeout: float
    # The server's tunnel addresses (packed IPv4, IPv6; None without that pool): where the
    # "packet too big" answers to the internet's senders come from.
    tunnel_addresses: tuple[bytes | None, bytes | None]
    # The operator's names for client keys ([clients]), kept current by reloads.
    names: Mapping[bytes, str] = field(default_factory=dict)


class ServerSession(Channel):
    """One client connection, from its first Initial to its close.

    Everything the client sends passes the connection's :class:`ServerControl` rules first;
    a violation closes this connection with its code, and any other failure while handling it
    (the driver is the boundary) closes it with ``CLOSE_INTERNAL``. Neither reaches the pumps.
    """

    def __init__(
        self,
        services: SessionServices,
        quic: QuicConnection,
        remote: Any,
        source: Any,
        tickets: list[SessionTicket],
    ) -> None:
        super().__init__(quic, Drops(), services.table.touched)
        self.services = services
        self.table = services.table
        self._forward = services.forwarder.from_client
        self.remote = remote
        # Every answer leaves from the address the client sent its first packet to: a client
        # drops packets from any other (a secondary address, a floating IP).
        self.source = source
        send = functools.partial(services.endpoint.send_batch, source=source)
        self.drive(
            send,
            functools.partial(services.endpoint.send_probe, source=source),
            self._handle_event,
            self._failed,
            label=format_address(remote),
        )
        self.control = ServerControl()
        # Packets from the internet too big for this client's datagrams: told so from us.
        self.deliver_local = services.forwarder.tun.write
        self.icmp_source4, self.icmp_source6 = services.tunnel_addresses
        self.nonce = secrets.token_bytes(32)
        self.client_id: bytes | None = None
        self.device_id: int | None = None
        self.token_digest: bytes | None = None
        self.lease: Lease | None = None
        self.established = trio.Event()
        self.handshake_over = trio.Event()  # established, or given up
        self.closed = trio.Event()
        self.started_at = trio.current_time()
        self.heard_at = self.started_at  # the last batch of datagrams from the client
        self.log = SessionLog(log, {"client": "-"})
        self._hello_sent = False
        self.closing = False
        # Tickets aioquic issued on this connection: they become usable for resumption only once
        # the client has authenticated, so a flood of token-less handshakes cannot push the
        # tickets of real clients out of the bounded store.
        self._tickets = tickets
        # A close that waits until the client has our last words (a rejection) or LINGER passed.
        self._close_after_delivery: tuple[int, str] | None = None
        self._linger_requested = trio.Event()
        self._delivered = trio.Event()

    # -- events (called synchronously from the UDP pump or the timer) --------------------------

    def _handle_event(self, event: QuicEvent) -> None:
        try:
            if isinstance(event, DatagramFrameReceived):
                if self.closing:
                    return
                if self.lease is None:
                    self.control.datagram()  # raises: nothing but the request before auth
                self._forward(self, event.data)
            elif isinstance(event, StreamDataReceived):
                if not self.closing:
                    self._stream_data(event)
            elif isinstance(event, StopSendingReceived):
                if not self.closing:
                    self.control.stop_sending(event.stream_id)
            elif isinstance(event, StreamReset):
                if not self.closing:
                    self.control.stream_reset(event.stream_id)
            elif isinstance(event, HandshakeCompleted):
                shed_handshake_buffers(self.quic)  # a third of an idle session's memory
            elif isinstance(event, ConnectionIdIssued):
                self.table.cid_issued(self, event.connection_id)
            elif isinstance(event, ConnectionIdRetired):
                self.table.cid_retired(self, event.connection_id)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
        except ProtocolViolation as exc:
            self.table.protocol_violations += 1
            self.log.info("protocol violation from %s: %s", format_address(self.remote), exc.reason)
            self.close(exc.close_code, exc.reason)

    def _terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code not in (CLOSE_OK, CLOSE_SHUTDOWN):
            self.log.info(
                "connection closed: %s (code %#x)", event.reason_phrase or "-", event.error_code
            )
        else:
            self.log.info("connection closed by peer")
        self.closed.set()
        self.handshake_over.set()

    def _failed(self, exc: Exception) -> None:
        """The driver's boundary caught ``exc``: this connection is closed, nothing else."""
        self.closing = True
        self.table.failed += 1
        self.log.warning(
            "session from %s failed (%s: %s): closed with an internal error",
            format_address(self.remote),
            type(exc).__name__,
            exc,
        )
        self.log.debug("the failure in full", exc_info=exc)
        self.closed.set()
        self.handshake_over.set()

    def send_hello(self) -> None:
        """Our nonce goes out on the first server-initiated stream, with the handshake flight."""
        if self._hello_sent:
            return
        self._hello_sent = True
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=True)
        hello = ServerHello(
            version=PROTOCOL_VERSION,
            nonce=self.nonce,
            max_datagram_payload=MAX_DATAGRAM_PAYLOAD,
            peers=self.services.introducer.enabled,
        )
        self.quic.send_stream_data(stream_id, encode_frame(hello))

    def _stream_data(self, event: StreamDataReceived) -> None:
        received = self.control.stream_data(
            event.stream_id, event.data, event.end_stream, trio.current_time()
        )
        if received.auth is not None:
            self._authenticate(received.auth)
        for packet in received.packets:
            self._forward(self, packet)
        if received.candidates is not None:
            self.services.introducer.candidates(self, received.candidates)
        if received.answer_ping:
            self.send_frame(Pong())
        if received.pings_ignored:
            self.drops["pings_ignored"] += received.pings_ignored

    def _authenticate(self, request: AuthRequest) -> None:
        self.client_id, self.device_id = request.client_id, request.device_id
        self.log = SessionLog(log, {"client": self.name_of(request.client_id)})
        now = trio.current_time()
        gatekeeper = self.services.gatekeeper
        attempt = gatekeeper.attempt(request, self.remote[0])
        if gatekeeper.blocked(attempt, now):
            self.close(CLOSE_RATE_LIMITED, "too many failed attempts, try again later")
            return
        try:
            binding = connection_binding(self.quic)
        except ValueError:
            raise ProtocolViolation("AuthRequest before the handshake", CLOSE_PROTOCOL) from None
        admission = gatekeeper.admit(attempt, nonce=self.nonce, binding=binding, now=now)
        response: AuthResponse = admission.response
        self.send_frame(response)
        if not response.accepted:
            self.log.warning(
                "rejected from %s: %s", format_address(self.remote), response.reject_reason
            )
            # The client learns why from the response; the close follows once it has it.
            self.close_after_delivery(CLOSE_REJECTED, response.reject_reason or "rejected")
            return
        self.token_digest = attempt.digest
        introducer = self.services.introducer
        peers = request.peers and introducer.enabled
        self.control.established(peers=peers)
        self.set_peer_datagram_limit(min(MAX_DATAGRAM_PAYLOAD, request.max_datagram_payload))
        self.lease = admission.lease
        assert self.lease is not None
        self.table.attach(self)
        if peers:
            introducer.joined(self)
        for ticket in self._tickets:
            self.services.tickets.add(ticket)
        self._tickets.clear()
        self.log.info(
            "session up from %s: %s (device %016x)",
            format_address(self.remote),
            ", ".join(str(a) for a in self.lease.addresses),
            request.device_id,
        )
        self.established.set()
        self.handshake_over.set()

    def revoke(self) -> None:
        """The client's credentials no longer pass (SIGHUP): tell it on the control stream,
        where only we can speak, then close."""
        self.log.warning("credentials revoked: closing the session")
        self.send_frame(AuthResponse(accepted=False, reject_reason=REASON_REVOKED))
        self.close_after_delivery(CLOSE_REJECTED, REASON_REVOKED)

    def close(self, code: int, reason: str) -> None:
        self.closing = True
        self.quic.close(error_code=code, reason_phrase=reason)
        self.mark_touched()
        self.handshake_over.set()

    def close_after_delivery(self, code: int, reason: str) -> None:
        """Close once the client has acknowledged everything on the control stream (aioquic's
        close would discard it), or after LINGER: a client that withholds ACKs gains nothing."""
        self.closing = True
        self._close_after_delivery = (code, reason)
        self.mark_touched()
        self.handshake_over.set()
        self._linger_requested.set()

    def after_batch(self, now: float) -> None:
        """A batch from the client was handled (its ACKs among it): if we wait to close, is
        our last word through?"""
        if now - self.heard_at >= QUIET:
            # The first word after a silence (a heartbeat, mostly): answered with the ACK at
            # once, in this batch's send, not by a timer a millisecond later.
            acknowledge_now(self.quic, now)
        self.heard_at = now
        if self._close_after_delivery is not None:
            self.check_delivered()

    def check_delivered(self) -> None:
        if not stream_buffered(self.quic, CONTROL_STREAM):
            self._delivered.set()

    async def _linger(self, code: int, reason: str) -> None:
        self.check_delivered()
        with trio.move_on_after(LINGER):
            await wait_any(self._delivered.wait, self.closed.wait)
        if not self.closed.is_set() and not self.driver.failed:
            self.close(code, reason)
            self.driver.transmit()

    async def _until_closed(self) -> None:
        while not self.closed.is_set():
            if self._close_after_delivery is not None:
                await self._linger(*self._close_after_delivery)
                await self.closed.wait()  # aioquic's close, its draining period over
                return
            await wait_any(self.closed.wait, self._linger_requested.wait)

    # -- lifetime -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Owns the session's tasks; returns when the connection has ended, cleaned up. Never
        raises: whatever goes wrong here ends this session only."""
        try:
            await self._run()
        except Exception as exc:
            self.driver.fail(exc)

    async def _run(self) -> None:
        pending = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.driver.run_timer)
                with trio.move_on_after(self.services.handshake_timeout):
                    await self.handshake_over.wait()
                pending = False
                self.services.handshake_finished(self)
                if self.established.is_set():
                    # Only for clients that authenticated: probes cost us bandwidth.
                    nursery.start_soon(self.path_mtu.run)
                if not self.handshake_over.is_set():
                    self.log.info(
                        "handshake from %s not completed in time: dropped",
                        format_address(self.remote),
                    )
                    self.close(CLOSE_HANDSHAKE_TIMEOUT, "handshake timeout")
                    self.driver.transmit()
                await self._until_closed()
                nursery.cancel_scope.cancel()
        finally:
            if pending:
                self.services.handshake_finished(self)
            if not self.closed.is_set():
                # Cancelled (server shutting down): tell the client now, not at its timeout.
                self.close(CLOSE_SHUTDOWN, "server shutting down")
                self.driver.transmit()
            self.services.introducer.left(self)
            self.table.detach(self)

    def current_remote(self) -> Any:
        """The client's address now: QUIC follows a migrating client to its new path."""
        address = self.quic.get_peer_address()
        return address if address is not None else self.remote

    def name_of(self, client_id: bytes) -> str:
        """How logs name the client: the operator's name for it, else its ID's first 12."""
        return self.services.names.get(client_id) or _short(client_id)

    def status(self) -> dict[str, Any]:
        rtt = smoothed_rtt(self.quic)
        return {
            "client_id": encode_public_id(self.client_id) if self.client_id else None,
            "name": self.services.names.get(self.client_id) if self.client_id else None,
            "device_id": self.device_id,
            "addresses": [str(a) for a in self.lease.addresses] if self.lease else [],
            "remote": format_address(self.current_remote()),
            **self.counters(),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            **self.path_status(),
            "uptime": round(trio.current_time() - self.started_at, 3),
            "last_heard": round(trio.current_time() - self.heard_at, 3),
            "drops": dict(self.drops),
        }
