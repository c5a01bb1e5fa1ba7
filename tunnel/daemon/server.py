"""The server daemon: one UDP endpoint, one TUN device, many client sessions.

Task tree (every task lives in a nursery; cancelling the top tears everything down):

    run_server
      ├─ signal watcher            SIGTERM/SIGINT -> graceful stop, SIGHUP -> reload
      ├─ control socket            `tunnel status`
      ├─ UDP pump                  datagrams -> connection by destination CID
      ├─ TUN pump                  packets -> session by destination address
      ├─ lease reaper              returns expired leases to the pools
      └─ one task per session, owning a nursery with
           ├─ QUIC timer
           └─ handshake deadline, then the wait for the connection to end
"""

from __future__ import annotations

import collections
import contextlib
import functools
import ipaddress
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

import trio
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    DatagramFrameReceived,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler
from aioquic.tls import SessionTicket
from trio_util import wait_any

from tunnel.config import RunOptions, ServerConfig, load_server_config
from tunnel.core.authority import REASON_REVOKED, Admission, Authority, Lease
from tunnel.core.control import CONTROL_STREAM, ServerControl
from tunnel.core.identity import Identity, encode_public_id
from tunnel.core.ippacket import clip_untrusted, ip_header_untrusted, udp_ports_untrusted
from tunnel.core.ippool import AddressPool
from tunnel.core.messages import (
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_OK,
    CLOSE_PROTOCOL,
    CLOSE_RATE_LIMITED,
    CLOSE_REJECTED,
    CLOSE_REPLACED,
    CLOSE_SHUTDOWN,
    PROTOCOL_VERSION,
    AuthRequest,
    AuthResponse,
    Pong,
    ServerHello,
    encode_frame,
)
from tunnel.core.nat64 import Nat64
from tunnel.core.ratelimit import FailureLimiter, TokenBucket
from tunnel.core.routing import RouteTable
from tunnel.core.tokens import TokenSet, token_digest
from tunnel.daemon.aioquic_private.state import (
    ResettableConnection,
    connection_binding,
    smoothed_rtt,
    stream_buffered,
    tune,
)
from tunnel.daemon.driver import QuicDriver
from tunnel.daemon.pathmtu import PathMtu
from tunnel.daemon.platform import SYSTEM, Platform
from tunnel.daemon.quic import (
    MAX_DATAGRAM_PAYLOAD,
    ResetTokens,
    TicketStore,
    server_configuration,
)
from tunnel.daemon.runtime import (
    ControlServer,
    check_ready_fd,
    control_socket_path,
    notify_ready,
    watch_signals,
)
from tunnel.daemon.session import Channel, Drops, SessionLog
from tunnel.daemon.udp import UdpEndpoint, format_address
from tunnel.errors import ProtocolViolation, TunnelError
from tunnel.keyfile import read_key_file

log = logging.getLogger("tunnel.server")

# A server under a flood of new connections: at most this many handshakes in flight from one
# source address and overall; past RETRY_ABOVE pending handshakes, new clients must prove their
# address with a QUIC Retry round trip first.
MAX_PENDING_PER_SOURCE = 16
MAX_PENDING = 1024
RETRY_ABOVE = 64
# Stateless resets and Version Negotiation are cheap to send but never worth a flood of our own.
MAX_RESETS_PER_SECOND = 100
MAX_VERSION_NEGOTIATIONS_PER_SECOND = 100
# Datagrams smaller than a client's first Initial (RFC 9000 14.1) get no Version Negotiation,
# so we never answer with more than we were sent.
SMALLEST_INITIAL = 1200
# How long a rejecting or revoking session waits for the client to have our answer.
LINGER = 1.0
UDP = 17
UDP_BATCH = 64
TUN_BATCH = 64


def _short(client_id: bytes | None) -> str:
    return encode_public_id(client_id)[:12] if client_id else "-"


class ServerSession(Channel):
    """One client connection, from its first Initial to its close.

    Everything the client sends passes the connection's :class:`ServerControl` rules first;
    a violation closes this connection with its code, and any other failure while handling it
    (the driver is the boundary) closes it with ``CLOSE_INTERNAL``. Neither reaches the pumps.
    """

    def __init__(
        self, server: Server, quic: QuicConnection, remote: Any, tickets: list[SessionTicket]
    ) -> None:
        super().__init__(quic, Drops(), server.touched)
        self.server = server
        self.remote = remote
        # Every answer leaves from the address the client sent its first packet to: a client
        # drops packets from any other (a secondary address, a floating IP).
        self.source = server.source
        send = functools.partial(server.endpoint.send_batch, source=self.source)
        self.driver = QuicDriver(quic, send, self._handle_event, self._failed)
        self.path_mtu = PathMtu(
            quic,
            functools.partial(server.endpoint.send_probe, source=self.source),
            self._path_size_changed,
            self.driver.transmit,
            label=format_address(remote),
        )
        self.driver.on_path_change = self.path_mtu.path_changed
        self.control = ServerControl()
        # Packets from the internet too big for this client's datagrams: told so from us.
        self.deliver_local = server.tun.write
        self.icmp_source4, self.icmp_source6 = server.tunnel_addresses
        self.nonce = secrets.token_bytes(32)
        self.client_id: bytes | None = None
        self.device_id: int | None = None
        self.token_digest: bytes | None = None
        self.lease: Lease | None = None
        self.established = trio.Event()
        self.handshake_over = trio.Event()  # established, or given up
        self.closed = trio.Event()
        self.started_at = trio.current_time()
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
                self.server.packet_from_client(self, event.data)
            elif isinstance(event, StreamDataReceived):
                if not self.closing:
                    self._stream_data(event)
            elif isinstance(event, StopSendingReceived):
                if not self.closing:
                    self.control.stop_sending(event.stream_id)
            elif isinstance(event, StreamReset):
                if not self.closing:
                    self.control.stream_reset(event.stream_id)
            elif isinstance(event, ConnectionIdIssued):
                self.server.cids[event.connection_id] = self
            elif isinstance(event, ConnectionIdRetired):
                self.server.cids.pop(event.connection_id, None)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
        except ProtocolViolation as exc:
            self.server.protocol_violations += 1
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
        self.server.sessions_failed += 1
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
            version=PROTOCOL_VERSION, nonce=self.nonce, max_datagram_payload=MAX_DATAGRAM_PAYLOAD
        )
        self.quic.send_stream_data(stream_id, encode_frame(hello))

    def _stream_data(self, event: StreamDataReceived) -> None:
        received = self.control.stream_data(
            event.stream_id, event.data, event.end_stream, trio.current_time()
        )
        if received.auth is not None:
            self._authenticate(received.auth)
        for packet in received.packets:
            self.server.packet_from_client(self, packet)
        if received.answer_ping:
            self.send_frame(Pong())
        if received.pings_ignored:
            self.drops["pings_ignored"] += received.pings_ignored

    def _authenticate(self, request: AuthRequest) -> None:
        self.client_id, self.device_id = request.client_id, request.device_id
        self.log = SessionLog(log, {"client": _short(request.client_id)})
        now = trio.current_time()
        limiter = self.server.auth_limiter
        # Keys for repeated failures: the source address, and this identity with this token
        # (hashed: tokens never stay in memory longer than needed, nor reach a log).
        digest = token_digest(request.auth_token) if request.auth_token is not None else b""
        keys = (("source", self.remote[0]), ("credentials", request.client_id, digest))
        if any(limiter.blocked(key, now) for key in keys):
            self.server.rate_limited += 1
            self.close(CLOSE_RATE_LIMITED, "too many failed attempts, try again later")
            return
        try:
            binding = connection_binding(self.quic)
        except ValueError:
            raise ProtocolViolation("AuthRequest before the handshake", CLOSE_PROTOCOL) from None
        admission = self.server.admit(request, nonce=self.nonce, binding=binding, now=now)
        response: AuthResponse = admission.response
        self.send_frame(response)
        if not response.accepted:
            self.server.refused[response.reject_reason or "rejected"] += 1
            self.log.warning(
                "rejected from %s: %s", format_address(self.remote), response.reject_reason
            )
            if admission.credentials_failed:
                self.server.auth_failures += 1
                for key in keys:
                    if limiter.failed(key, now):
                        self.log.warning(
                            "repeated failures from %s: rate limited",
                            format_address(self.remote)
                            if key[0] == "source"
                            else "this identity and token",
                        )
            # The client learns why from the response; the close follows once it has it.
            self.close_after_delivery(CLOSE_REJECTED, response.reject_reason or "rejected")
            return
        self.token_digest = digest
        self.control.established()
        self.set_peer_datagram_limit(min(MAX_DATAGRAM_PAYLOAD, request.max_datagram_payload))
        self.lease = admission.lease
        assert self.lease is not None
        self.server.attach(self)
        for ticket in self._tickets:
            self.server.tickets.add(ticket)
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

    def check_delivered(self) -> None:
        """After a batch from the client (its ACKs among it): is our last word through?"""
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
                with trio.move_on_after(self.server.config.handshake_timeout):
                    await self.handshake_over.wait()
                pending = False
                self.server.handshake_finished(self)
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
                self.server.handshake_finished(self)
            if not self.closed.is_set():
                # Cancelled (server shutting down): tell the client now, not at its timeout.
                self.close(CLOSE_SHUTDOWN, "server shutting down")
                self.driver.transmit()
            self.server.detach(self)

    def _path_size_changed(self, size: int, evicted: list[bytes]) -> None:
        self.path_size_changed(size, evicted)
        self.driver.transmit()

    def current_remote(self) -> Any:
        """The client's address now: QUIC follows a migrating client to its new path."""
        address = self.quic.get_peer_address()
        return address if address is not None else self.remote

    def status(self) -> dict[str, Any]:
        rtt = smoothed_rtt(self.quic)
        return {
            "client_id": encode_public_id(self.client_id) if self.client_id else None,
            "device_id": self.device_id,
            "addresses": [str(a) for a in self.lease.addresses] if self.lease else [],
            "remote": format_address(self.current_remote()),
            **self.counters(),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            **self.path_status(),
            "uptime": round(trio.current_time() - self.started_at, 3),
            "drops": dict(self.drops),
        }


class Server:
    """State shared by the server's tasks. Created and run by :func:`run_server`."""

    def __init__(
        self,
        config: ServerConfig,
        identity: Identity,
        endpoint: UdpEndpoint,
        tun: Any,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.identity = identity
        self.endpoint = endpoint
        self.tun = tun
        self.quic_config = server_configuration(identity)
        self.tickets = TicketStore()
        self.reset_tokens = ResetTokens(identity.seed)
        self.resets_sent = 0
        self._reset_budget = TokenBucket(rate=MAX_RESETS_PER_SECOND, burst=MAX_RESETS_PER_SECOND)
        self._negotiation_budget = TokenBucket(
            rate=MAX_VERSION_NEGOTIATIONS_PER_SECOND, burst=MAX_VERSION_NEGOTIATIONS_PER_SECOND
        )
        self.authority = _authority(config, identity)
        self.cids: dict[bytes, ServerSession] = {}
        # Tunnel address (packed) -> the session holding it in its lease, both ways: a TUN
        # packet's destination finds its session, a client's packet must come from its own.
        self.routes: RouteTable[ServerSession] = RouteTable()
        self.sessions: set[ServerSession] = set()
        self.touched: set[Channel] = set()  # sessions with something to send
        self.drops = Drops()
        self.auth_failures = 0
        self.rate_limited = 0
        self.refused: collections.Counter[str] = collections.Counter()  # by reason
        self.sessions_failed = 0  # closed for an internal error
        self.revoked = 0
        self.protocol_violations = 0
        self.auth_limiter = FailureLimiter()
        self.retry = QuicRetryTokenHandler()
        self.retries_sent = 0
        self.pending_total = 0
        self.pending_by_source: collections.Counter[str] = collections.Counter()
        self.started_at = trio.current_time()
        self.lease_changed = trio.Event()
        self._sessions_nursery: trio.Nursery | None = None
        # The local address the datagram being handled was sent to (None: the socket's own):
        # what answers to it (new sessions, Retry, resets, Version Negotiation) leave from.
        self.source: Any = None
        self.nat64, self.nat64_source, self.nat64_prefix = _nat64(config, self.authority)
        pool4, pool6 = self.authority.pool4, self.authority.pool6
        self.tunnel_addresses = (
            pool4.server_ip.packed if pool4 is not None else None,
            pool6.server_ip.packed if pool6 is not None else None,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the pumps, and every session in a nursery of their own, until cancelled."""
        async with trio.open_nursery() as sessions, trio.open_nursery() as pumps:
            # Sessions never raise (each is its own boundary), so nothing a client does can
            # cancel the pumps; cancelling the pumps (shutdown) cancels the sessions too.
            self._sessions_nursery = sessions
            pumps.start_soon(self.udp_pump)
            pumps.start_soon(self.tun_pump)
            pumps.start_soon(self.lease_reaper)
            if self.nat64 is not None:
                pumps.start_soon(self.nat64_reaper)
            task_status.started()

    # -- the UDP pump ---------------------------------------------------------------------------

    async def udp_pump(self) -> None:
        endpoint = self.endpoint
        tun = self.tun
        clock = trio.lowlevel.current_clock()
        while True:
            await endpoint.wait_readable()
            now = clock.current_time()
            received: set[ServerSession] = set()
            for data, addr, self.source in endpoint.receive_batch_with_local(UDP_BATCH):
                session = self._route_datagram(data, addr, now)
                if session is not None:
                    received.add(session)
            writes = tun.writes
            for session in received:
                session.driver.deliver_events()
                if session._close_after_delivery is not None:
                    session.check_delivered()
            if tun.writes != writes:
                # The kernel answers some packets inside our write (an echo reply, a TCP ACK):
                # take those now, into this batch's send, not after another scheduler round.
                self._forward_from_tun()
            # One send per session per batch: what receiving produced (ACKs) together with
            # what the events queued (packets forwarded to other clients, pongs, answers).
            self.touched |= received
            self.flush()

    def _route_datagram(self, data: bytes, addr: Any, now: float) -> ServerSession | None:
        if data and not data[0] & 0x80:
            # Short header (every packet after the handshake): our connection IDs are 8 bytes
            # and come right after the first byte, no need to parse the header twice.
            session = self.cids.get(data[1:9])
            if session is not None:
                session.driver.receive(data, addr, now)
                return session
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            self.drops["udp_garbage"] += 1
            return None
        session = self.cids.get(header.destination_cid)
        if session is not None:
            session.driver.receive(data, addr, now)
            return session
        if header.version is not None and header.version not in self.quic_config.supported_versions:
            if (
                header.packet_type != QuicPacketType.VERSION_NEGOTIATION
                and len(data) >= SMALLEST_INITIAL
                and self._negotiation_budget.take(now)
            ):
                self.endpoint.send(
                    encode_quic_version_negotiation(
                        source_cid=header.destination_cid,
                        destination_cid=header.source_cid,
                        supported_versions=self.quic_config.supported_versions,
                    ),
                    addr,
                    self.source,
                )
            return None
        if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_INITIAL:
            self.drops["udp_unknown_connection"] += 1
            if header.packet_type == QuicPacketType.ONE_RTT:
                self._send_stateless_reset(header.destination_cid, len(data), addr, now)
            return None
        source = addr[0]
        if self.pending_total >= MAX_PENDING or (
            self.pending_by_source[source] >= MAX_PENDING_PER_SOURCE
        ):
            self.drops["handshake_limit"] += 1
            return None
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
                return None
            retry_cid = header.destination_cid
        elif self.pending_total >= RETRY_ABOVE:
            self._send_retry(header, addr, now)
            return None
        tickets: list[SessionTicket] = []
        quic = tune(
            ResettableConnection(
                reset_tokens=self.reset_tokens,
                configuration=self.quic_config,
                original_destination_connection_id=original_cid,
                retry_source_connection_id=retry_cid,
                session_ticket_fetcher=self.tickets.pop,
                session_ticket_handler=tickets.append,
            )
        )
        session = ServerSession(self, quic, addr, tickets)
        self.pending_by_source[source] += 1
        self.pending_total += 1
        self.cids[header.destination_cid] = session
        self.cids[quic.host_cid] = session
        self.sessions.add(session)
        session.driver.receive(data, addr, now)
        session.send_hello()
        assert self._sessions_nursery is not None
        self._sessions_nursery.start_soon(session.run)
        return session

    def _send_stateless_reset(self, cid: bytes, size: int, addr: Any, now: float) -> None:
        """Tell a client of a connection we do not know (we restarted) that it is gone."""
        packet = self.reset_tokens.reset_packet(cid, size)
        if packet is not None and self._reset_budget.take(now):
            self.endpoint.send(packet, addr, self.source)
            self.resets_sent += 1

    def _send_retry(self, header: Any, addr: Any, now: float) -> None:
        new_cid = secrets.token_bytes(8)
        token = self.retry.create_token(
            address=addr,
            original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=new_cid,
            now=now,
        )
        self.endpoint.send(
            encode_quic_retry(
                version=header.version,
                source_cid=new_cid,
                destination_cid=header.source_cid,
                original_destination_cid=header.destination_cid,
                retry_token=token,
            ),
            addr,
            self.source,
        )
        self.retries_sent += 1

    def handshake_finished(self, session: ServerSession) -> None:
        """A pending handshake ended (accepted, rejected or dropped): it no longer counts."""
        source = session.remote[0]
        self.pending_total -= 1
        self.pending_by_source[source] -= 1
        if self.pending_by_source[source] <= 0:
            del self.pending_by_source[source]

    # -- packets between sessions and the TUN ---------------------------------------------------

    def packet_from_client(self, session: ServerSession, packet: bytes) -> None:
        """Hot path: a packet arrived from ``session``'s client."""
        session.bytes_in += len(packet)
        session.packets_in += 1
        # Only the IP packet itself goes on, never bytes a client appended after it.
        clipped = clip_untrusted(packet)
        if clipped is None or (header := ip_header_untrusted(clipped)) is None:
            session.drops["malformed"] += 1
            self.drops["malformed"] += 1
            return
        packet = clipped
        version, src, dst = header
        owner_of = self.routes.owner_of
        if owner_of(src) is not session:
            session.drops["spoofed_source"] += 1
            self.drops["spoofed_source"] += 1
            return
        peer = owner_of(dst)
        if peer is not None:
            if not self.config.client_to_client:
                self.drops["client_to_client"] += 1
                return
            peer.send_packet(packet)
            return
        if version == 6 and dst[:12] == self.nat64_prefix:
            self._nat64_outbound(session, packet)
            return
        self.tun.write(packet)

    def _nat64_outbound(self, session: ServerSession, packet: bytes) -> None:
        assert self.nat64 is not None
        result = self.nat64.outbound(packet, trio.current_time())
        if result.packet is not None:
            self.tun.write(result.packet)
        if result.reply is not None:
            session.send_packet(result.reply)  # e.g. hop limit exceeded, back to the client
        if result.drop is not None:
            self.drops[result.drop] += 1

    def _nat64_inbound(self, packet: bytes) -> None:
        assert self.nat64 is not None
        result = self.nat64.inbound(packet, trio.current_time())
        if result.reply is not None:
            self.tun.write(result.reply)  # an ICMPv4 error toward the IPv4 sender
        if result.drop is not None:
            self.drops[result.drop] += 1
        translated = result.packet
        if translated is not None:
            header = ip_header_untrusted(translated)
            session = None if header is None else self.routes.owner_of(header[2])
            if session is None:
                self.drops["no_route"] += 1
            else:
                session.send_packet(translated, may_answer=False)

    async def tun_pump(self) -> None:
        tun = self.tun
        while True:
            await tun.wait_readable()
            self._forward_from_tun()
            self.flush()

    def _forward_from_tun(self) -> None:
        """Queue what the TUN device holds (up to a batch) to the sessions it is routed to;
        never blocks. The caller flushes."""
        owner_of = self.routes.owner_of
        drops = self.drops
        nat64_source = self.nat64_source
        for packet in self.tun.read_batch(TUN_BATCH):
            header = ip_header_untrusted(packet)
            if header is None:
                drops["malformed"] += 1
                continue
            version, _, dst = header
            session = owner_of(dst)
            if session is None:
                if dst == nat64_source:
                    self._nat64_inbound(packet)
                else:
                    drops["no_route"] += 1
                continue
            if packet[9 if version == 4 else 6] == UDP and self._from_tunnel_port(packet):
                # Our own QUIC packets routed into the TUN would loop forever.
                drops["tunnel_port"] += 1
                continue
            session.send_packet(packet)

    def _from_tunnel_port(self, packet: bytes) -> bool:
        ports = udp_ports_untrusted(packet)
        return ports is not None and ports[0] == self.config.listen_port

    async def nat64_reaper(self) -> None:
        """Expire idle NAT64 mappings (each lookup also ignores expired ones; this frees them)."""
        assert self.nat64 is not None
        while True:
            expiry = self.nat64.next_expiry()
            await trio.sleep_until(trio.current_time() + 1.0 if expiry is None else expiry)
            self.nat64.expire(trio.current_time())

    def flush(self) -> None:
        """Send what every touched session has queued."""
        touched = self.touched
        while touched:
            touched.pop().driver.transmit()

    # -- session bookkeeping --------------------------------------------------------------------

    def attach(self, session: ServerSession) -> None:
        assert session.lease is not None
        for previous in self.routes.add(session, [a.packed for a in session.lease.addresses]):
            # The same client and device came back before we noticed the old one die.
            previous.log.info("replaced by a new session")
            previous.close(CLOSE_REPLACED, "replaced by a new session")

    def detach(self, session: ServerSession) -> None:
        self.sessions.discard(session)
        self.touched.discard(session)
        for cid in [cid for cid, s in self.cids.items() if s is session]:
            del self.cids[cid]
        self.routes.remove(session)  # only what it still holds: not what a successor took
        if session.lease is not None and not any(s.lease is session.lease for s in self.sessions):
            self.authority.release(session.lease.owner, now=trio.current_time())
            self.lease_changed.set()

    async def lease_reaper(self) -> None:
        while True:
            expiry = self.authority.next_expiry()
            self.lease_changed = trio.Event()
            with trio.move_on_at(math.inf if expiry is None else expiry):
                await self.lease_changed.wait()
            for lease in self.authority.expire(trio.current_time()):
                log.debug("lease of %s expired", ", ".join(str(a) for a in lease.addresses))

    def reload(self) -> None:
        """SIGHUP: re-read tokens and allowed_clients; keep everything else and every session."""
        path = self.config_path
        if path is None:
            log.warning("SIGHUP: no config file to reload")
            return
        try:
            fresh = load_server_config(path)
        except TunnelError as exc:
            log.error("SIGHUP: %s; keeping the running configuration", exc)
            return
        self.authority.reload(
            tokens=TokenSet(fresh.auth_tokens), allowed_clients=fresh.allowed_clients
        )
        revoked = self.revoke_failing()
        log.info(
            "SIGHUP: reloaded %d token(s) and allowed_clients; %d session(s) revoked",
            len(fresh.auth_tokens),
            revoked,
        )

    def revoke_failing(self) -> int:
        """Close every live session whose credentials the current policy no longer admits."""
        revoked = 0
        for session in list(self.sessions):
            if session.lease is None or session.client_id is None or session.closing:
                continue
            assert session.token_digest is not None
            if not self.authority.still_admits(session.client_id, session.token_digest):
                session.revoke()
                revoked += 1
        self.revoked += revoked
        self.flush()
        return revoked

    def admit(self, request: AuthRequest, *, nonce: bytes, binding: bytes, now: float) -> Admission:
        """The authority's verdict on one request."""
        return self.authority.authorize(request, nonce=nonce, binding=binding, now=now)

    def status(self) -> dict[str, Any]:
        return {
            "role": "server",
            "id": self.identity.public_id,
            "listen": format_address(self.endpoint.local_address),
            "tun": self.tun.name,
            "uptime": round(trio.current_time() - self.started_at, 3),
            "pid": os.getpid(),
            "sessions": [s.status() for s in self.sessions if s.lease is not None],
            "pending_handshakes": self.pending_total,
            "auth_failures": self.auth_failures,
            "rate_limited": self.rate_limited,
            "refused": dict(self.refused),
            "revoked": self.revoked,
            "sessions_failed": self.sessions_failed,
            "protocol_violations": self.protocol_violations,
            "retries_sent": self.retries_sent,
            "resets_sent": self.resets_sent,
            "udp_gso": self.endpoint.gso,  # segmentation offload still in use
            "drops": dict(self.drops)
            | {"tun_write": self.tun.write_drops, "udp_send": self.endpoint.send_drops},
            "nat64": self._nat64_status(),
        }

    def _nat64_status(self) -> dict[str, Any] | None:
        if self.nat64 is None:
            return None
        stats = {k: v for k, v in self.nat64.stats().items() if v or not k.startswith("nat64_")}
        return {
            "prefix": str(self.config.nat64.prefix),
            "source_ip": str(ipaddress.IPv4Address(self.nat64_source)),
            **stats,
        }


NAT64_OWNER = ("nat64", 0)  # the pool lease holding the translator's source address


def _nat64(config: ServerConfig, authority: Authority) -> tuple[Nat64 | None, bytes, bytes]:
    """The translator, its IPv4 source (packed) and its /96 prefix's first 12 bytes, or
    (None, b"", b"") when NAT64 is off. Without a configured ``source_ip`` the translator takes
    an address of its own from the IPv4 pool: it must be one the kernel routes into our TUN,
    never a local address of the server."""
    settings = config.nat64
    if not settings.enabled:
        return None, b"", b""
    source = settings.source_ip
    if source is None:
        assert authority.pool4 is not None  # the config requires source_ip or network
        allocated = authority.pool4.allocate(NAT64_OWNER)
        assert isinstance(allocated, ipaddress.IPv4Address)  # an IPv4 pool's
        source = allocated
    translator = Nat64(
        prefix=settings.prefix,
        source_ip=source,
        port_range=settings.port_range,
        tcp_timeout=settings.tcp_timeout,
        udp_timeout=settings.udp_timeout,
        icmp_timeout=settings.icmp_timeout,
        max_mappings_per_client=settings.max_mappings_per_client,
        mtu=config.mtu,
    )
    return translator, source.packed, settings.prefix.network_address.packed[:12]


def _authority(config: ServerConfig, identity: Identity) -> Authority:
    return Authority(
        server_key=identity.public_key,
        tokens=TokenSet(config.auth_tokens),
        allowed_clients=config.allowed_clients,
        max_clients=config.max_clients,
        max_sessions_per_client=config.max_sessions_per_client,
        pool4=AddressPool(config.network, config.server_ip, key="network")
        if config.network is not None
        else None,
        pool6=AddressPool(config.network6, config.server_ip6, key="network6")
        if config.network6 is not None
        else None,
        mtu=config.mtu,
        lease_grace=config.lease_grace,
    )


def _prepare_nat64(server: Server, host_changes: Any, tun_name: str) -> None:
    """Make the kernel hand replies for the translator's source address to our TUN, and say so
    plainly if this namespace does not forward IPv4 (translated packets would go nowhere)."""
    source = ipaddress.IPv4Address(server.nat64_source)
    pool4 = server.authority.pool4
    if pool4 is None or source not in pool4.network:
        host_changes.add_route(ipaddress.IPv4Network(f"{source}/32"), ifname=tun_name)
    if not ipv4_forwarding_enabled():
        log.warning(
            "nat64: IPv4 forwarding is off in this network namespace "
            "(net.ipv4.ip_forward = 0): translated packets will not leave this host"
        )
    log.info("nat64: %s -> IPv4 from %s", server.config.nat64.prefix, source)


def ipv4_forwarding_enabled() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as knob:
            return knob.read().strip() == "1"
    except OSError:
        return True  # cannot tell: do not warn


def _status(server: Server | None) -> dict[str, Any]:
    # The control socket is served only once the server exists.
    assert server is not None
    return server.status()


async def run_server(
    config: ServerConfig, options: RunOptions, platform: Platform = SYSTEM
) -> None:
    """Run the server until SIGTERM/SIGINT (or until cancelled)."""
    check_ready_fd(options.ready_fd)
    identity = read_key_file(config.key_file)
    server: Server | None = None
    # First, so that a second daemon with the same config is refused before touching anything.
    control = ControlServer(control_socket_path(config.control_socket), lambda: _status(server))
    with contextlib.ExitStack() as undo:
        # Synchronous undo on purpose: it cannot be cancelled halfway.
        undo.callback(control.close)
        tun = platform.open_tun(config.tun_name)
        undo.callback(tun.close)
        host_changes = platform.host_changes()
        undo.callback(host_changes.close)
        undo.callback(host_changes.undo)
        endpoint = await platform.open_udp(
            config.listen_host, config.listen_port, key="listen", reply_from_target=True
        )
        undo.callback(endpoint.close)
        server = Server(config, identity, endpoint, tun, options.config_path)
        host_changes.bring_up(tun.name, config.mtu)
        pools = [p for p in (server.authority.pool4, server.authority.pool6) if p is not None]
        for pool in pools:
            host_changes.add_address(tun.name, pool.server_ip, pool.network.prefixlen)
        if server.nat64 is not None:
            _prepare_nat64(server, host_changes, tun.name)
        await control.bind()
        log.info(
            "server %s listening on %s, %s up (%s)",
            identity.public_id,
            format_address(endpoint.local_address),
            tun.name,
            ", ".join(f"{p.server_ip}/{p.network.prefixlen}" for p in pools),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, nursery.cancel_scope, server.reload)
            nursery.start_soon(control.serve)
            await nursery.start(server.run)
            notify_ready(options.ready_fd)
        log.info("server stopped")
