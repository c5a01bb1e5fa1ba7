"""One session of the client: a QUIC connection to the server, from connect to close.

:class:`ClientSession` holds the connection's protocol state (the server's identity checked
before anything secret leaves, the tunnel handshake, the control stream), its pumps (UDP in,
TUN out, the QUIC timer), the heartbeat and path rebinding (a fresh socket when the path goes
silent), and reports its own status. It knows nothing of other sessions, the reconnect loop or
the host's network: what it needs from the client it gets in one :class:`SessionServices`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import trio
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    PingAcknowledged,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import SessionTicket
from trio_util import wait_any

from tunnel.config import ClientConfig
from tunnel.core.control import ClientControl
from tunnel.core.heartbeat import HeartbeatPolicy
from tunnel.core.identity import Identity, encode_public_id
from tunnel.core.ippacket import ip_header_untrusted, udp_ports_untrusted
from tunnel.core.messages import (
    CLOSE_IDENTITY,
    CLOSE_OK,
    CLOSE_REJECTED,
    PROTOCOL_VERSION,
    AuthRequest,
    AuthResponse,
    Pong,
    ServerHello,
    auth_transcript,
)
from tunnel.daemon.aioquic_private.state import (
    connection_binding,
    is_stateless_reset,
    peer_public_key,
    shed_handshake_buffers,
    smoothed_rtt,
    tune,
)
from tunnel.daemon.client.hostnet import ip_of
from tunnel.daemon.client.peers import Peers
from tunnel.daemon.platform import Platform
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD, client_configuration
from tunnel.daemon.session import Channel, Drops, transmit_touched
from tunnel.daemon.tun import TunDevice
from tunnel.daemon.udp import UdpEndpoint, format_address
from tunnel.errors import (
    IdentityMismatch,
    PeerRejected,
    ProtocolViolation,
    SessionLost,
    TemporaryRejection,
    TunnelError,
)

log = logging.getLogger("tunnel.client")

UDP_BATCH = 64
TUN_BATCH = 64
HEARTBEAT_PING = 0  # the uid of our heartbeat PINGs (any acknowledged PING counts as an answer)


@dataclass(slots=True)
class TicketSlot:
    """The one TLS session ticket the client keeps, to resume at the next connection. Only a
    session that verified the server's identity puts one here; each new session reads it."""

    ticket: SessionTicket | None = None


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session of one client is given: the same for all of them."""

    config: ClientConfig
    identity: Identity
    device_id: int  # who we are to the server: a newer session of ours replaces an older one
    tickets: TicketSlot
    drops: Drops  # counted across sessions, reported by the client
    platform: Platform  # for a fresh UDP socket when the path goes silent
    # This host's addresses, for the candidates a direct path to another client may use.
    local_addresses: Callable[[], list[IPv4Address | IPv6Address]] = list


class ClientSession(Channel):
    """One QUIC connection to the server, from connect to close.

    It reaches the rest of the client only through its :class:`SessionServices`. Once the
    server accepted us, the supervisor that made it hands it the TUN device and our tunnel
    addresses (:attr:`tun`, :attr:`own_addresses`, where "packet too big" answers go), and
    starts its data pumps.
    """

    def __init__(self, services: SessionServices, endpoint: UdpEndpoint, server_addr: Any) -> None:
        quic = tune(
            QuicConnection(
                configuration=client_configuration(session_ticket=services.tickets.ticket),
                session_ticket_handler=self._ticket_received,
            )
        )
        super().__init__(quic, services.drops, set())
        self.services = services
        self.endpoint = endpoint
        self.server_addr = server_addr
        # Our own QUIC traffic, should a route send it back into the tunnel, is found by these.
        self.server_packed = ip_of(server_addr).packed
        self.server_port = services.config.server_port
        self.drive(
            self._send_datagrams,
            self._send_probe,
            self._handle_event,
            self._failed,
            label=format_address(server_addr),
        )
        self.control = ClientControl()
        self.rebinds = 0
        self.heard_at = trio.current_time()  # the last datagram from the server
        # The server's hello, held until its identity is verified: nothing secret (token,
        # signature) leaves before that.
        self._hello: ServerHello | None = None
        self.response: AuthResponse | None = None
        self.failure: TunnelError | None = None
        self.settled = trio.Event()  # handshake accepted, or failed
        self.ended = trio.Event()
        # Pongs count from here; :meth:`heartbeat` starts a fresh one when it starts.
        self.heartbeat_policy = HeartbeatPolicy(
            services.config.heartbeat_interval,
            services.config.heartbeat_timeout,
            now=trio.current_time(),
        )
        self.tun: TunDevice | None = None
        self.own_addresses: frozenset[bytes] = frozenset()
        self.identity_verified = False
        self.verified = trio.Event()
        self.may_authenticate = False
        self.resumed = False
        self._unverified_ticket: SessionTicket | None = None
        self.peers: Peers | None = None  # direct paths, once the server introduces peers

    def _fail(self, error: TunnelError) -> None:
        if self.failure is None:
            self.failure = error
        self.settled.set()
        self.ended.set()

    def _failed(self, exc: Exception) -> None:
        """The driver's boundary caught ``exc``: this session is over; the supervisor
        reconnects."""
        log.debug("the failure in full", exc_info=exc)
        self._fail(SessionLost(f"session failed ({type(exc).__name__}: {exc})"))

    def _handle_event(self, event: QuicEvent) -> None:
        try:
            if isinstance(event, DatagramFrameReceived):
                self._packet_from_server(event.data)
            elif isinstance(event, StreamDataReceived):
                self._stream_data(event)
            elif isinstance(event, PingAcknowledged):
                # The server acknowledged a PING of ours (heartbeat, rebind or path probe):
                # the path works, and the silence, if any, is over.
                self.heartbeat_policy.on_pong(trio.current_time())
            elif isinstance(event, StopSendingReceived):
                self.control.stop_sending(event.stream_id)
            elif isinstance(event, StreamReset):
                self.control.stream_reset(event.stream_id)
            elif isinstance(event, HandshakeCompleted):
                self._handshake_completed(event)
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
        except ProtocolViolation as exc:
            self.quic.close(error_code=exc.close_code, reason_phrase=exc.reason)
            self._fail(SessionLost(f"protocol error from server: {exc.reason}"))

    def _handshake_completed(self, event: HandshakeCompleted) -> None:
        shed_handshake_buffers(self.quic)
        self.resumed = event.session_resumed
        if event.session_resumed:
            # No certificate on resumption: the ticket itself came from a session whose
            # server key we checked, and only such tickets are ever kept.
            self._identity_verified()
            return
        key = peer_public_key(self.quic)
        expected = self.services.config.server_id
        if key == expected:
            self._identity_verified()
            return
        got = encode_public_id(key) if key else "no Ed25519 key"
        self.quic.close(error_code=CLOSE_IDENTITY, reason_phrase="identity mismatch")
        self._fail(
            IdentityMismatch(
                f"server identity mismatch: expected {encode_public_id(expected)}, "
                f"server presented {got} (a wrong server_id, or someone else on the path)"
            )
        )

    def _terminated(self, event: ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"code {event.error_code:#x}"
        if (
            event.error_code == CLOSE_REJECTED
            and event.frame_type is None  # an application close: only ever 1-RTT
            and self.response is not None
            and self.response.accepted
        ):
            # Established, so the close came under this connection's 1-RTT keys from the
            # server we verified: a revocation whose control-stream message we missed.
            self._fail(PeerRejected(f"rejected by server: {reason}"))
        else:
            # Anything else may have come in an Initial packet anyone on the path can forge.
            self._fail(SessionLost(f"connection closed: {reason}"))

    def _packet_from_server(self, packet: bytes) -> None:
        """Hot path: deliver a packet from the server if it is addressed to us."""
        if self.tun is None:
            return
        self.bytes_in += len(packet)
        self.packets_in += 1
        header = ip_header_untrusted(packet)
        if header is None:
            self.drops["malformed"] += 1
            return
        if header[2] not in self.own_addresses:
            # Not for us: the server never routes such packets here; do not let anyone use
            # the tunnel to inject traffic for other hosts behind this client.
            self.drops["not_ours"] += 1
            return
        self.tun.queue(packet)  # written when the batch is over

    def _identity_verified(self) -> None:
        self.identity_verified = True
        self.verified.set()
        if self._unverified_ticket is not None:
            self.services.tickets.ticket = self._unverified_ticket
            self._unverified_ticket = None
        if self._hello is not None and self.may_authenticate:
            self._answer_hello(self._hello)

    def _ticket_received(self, ticket: SessionTicket) -> None:
        """Keep tickets only from a server whose identity we verified on this connection."""
        if self.identity_verified:
            self.services.tickets.ticket = ticket
        else:
            self._unverified_ticket = ticket

    def _stream_data(self, event: StreamDataReceived) -> None:
        received = self.control.stream_data(
            event.stream_id, event.data, event.end_stream, trio.current_time()
        )
        if received.hello is not None:
            if self.identity_verified and self.may_authenticate:
                self._answer_hello(received.hello)
            else:
                self._hello = received.hello
        if received.response is not None:
            self._auth_response(received.response)
        for packet in received.packets:
            self._packet_from_server(packet)
        if self.peers is not None:
            for intro in received.intros:
                self.peers.introduced(intro)
            for peer_id in received.gone:
                self.peers.gone(peer_id)
        if received.pong_seen:
            self.heartbeat_policy.on_pong(trio.current_time())
        if received.answer_ping:
            self.send_frame(Pong())

    def _answer_hello(self, hello: ServerHello) -> None:
        self._hello = None
        services = self.services
        identity = services.identity
        transcript = auth_transcript(
            hello.nonce,
            services.config.server_id,
            identity.public_key,
            services.device_id,
            connection_binding(self.quic),
        )
        self.set_peer_datagram_limit(min(MAX_DATAGRAM_PAYLOAD, hello.max_datagram_payload))
        peers = hello.peers and services.config.peer_to_peer
        self.control.request_sent(peers=peers)
        self.send_frame(
            AuthRequest(
                version=PROTOCOL_VERSION,
                device_id=services.device_id,
                client_id=identity.public_key,
                auth_token=services.config.auth_token,
                signature=identity.sign(transcript),
                max_datagram_payload=MAX_DATAGRAM_PAYLOAD,
                peers=peers,
            )
        )

    def _auth_response(self, response: AuthResponse) -> None:
        # Only an identity-verified server gets our request, so only it can answer here.
        if response.accepted:
            self.response = response
            self.settled.set()
            return
        reason = response.reject_reason or "no reason given"
        # We leave politely: the server waits for our ACK of its answer otherwise.
        self.quic.close(error_code=CLOSE_OK, reason_phrase="rejected")
        if response.temporary:
            self._fail(TemporaryRejection(f"server refused us for now: {reason}"))
        else:
            self._fail(PeerRejected(f"rejected by server: {reason}"))

    # -- tasks ----------------------------------------------------------------------------------

    async def udp_pump(self) -> None:
        """Datagrams from the server into QUIC, their events handled, and what they caused
        (ACKs, answers) sent at once; follows the socket across rebinds."""
        driver = self.driver
        clock = trio.lowlevel.current_clock()
        while True:
            endpoint = self.endpoint
            try:
                await endpoint.wait_readable()
            except trio.ClosedResourceError:
                if endpoint is self.endpoint:
                    raise
                continue  # rebound: wait on the new socket
            now = clock.current_time()
            peers = self.peers
            for data, addr in endpoint.receive_batch(UDP_BATCH):
                if peers is not None and peers.receive(data, addr, now):
                    continue  # a probe, or a direct connection's
                if is_stateless_reset(self.quic, data):
                    raise SessionLost("the server no longer knows this session (it restarted)")
                driver.receive(data, addr, now)
                self.heard_at = now
            tun = self.tun
            writes = tun.writes if tun is not None else 0
            driver.deliver_events()
            if peers is not None:
                peers.deliver_events()
            if tun is not None:
                tun.flush()  # the batch's packets for the kernel, runs of segments merged
            if tun is not None and tun.writes != writes:
                # What the kernel answered inside our write (TCP ACKs) joins this send.
                self._forward_from_tun(tun)
            self.touched.add(self)  # whatever receiving produced (ACKs) goes out now
            self._flush()

    def _send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        self.endpoint.send_batch(datagrams)

    def _send_probe(self, probe: bytes, addr: Any) -> bool:
        return self.endpoint.send_probe(probe, addr)

    async def rebind(self) -> None:
        """Move the connection to a fresh UDP socket (and a fresh connection ID).

        After an address change, a socket may be stuck with a source that no longer works, and
        a NAT may have forgotten our mapping; a new socket gets whatever source the kernel
        picks now, and QUIC migrates the connection to it: the server validates the new path
        and the session, with every TCP connection inside it, carries on.
        """
        family = self.endpoint.family
        fresh = await self.services.platform.open_udp(
            "::" if family == socket.AF_INET6 else "0.0.0.0",
            0,
            key="server",
            family=family,
            mark=self.services.config.fwmark,
        )
        old, self.endpoint = self.endpoint, fresh
        old.close()
        self.rebinds += 1
        self.path_mtu.path_changed()  # another source address: perhaps another way there
        if self.peers is not None:
            self.peers.network_changed()  # direct paths ran from the old socket
            self.send_frame(self.peers.candidates())
        self.quic.change_connection_id()
        self.quic.send_ping(self.rebinds)
        self.driver.transmit()
        log.info("path silent: moved to a new local socket %s", format_address(fresh.local_address))

    def probe(self) -> None:
        """The path may have changed: ping now rather than at the next interval, so a new
        source address or NAT mapping is learned by the server, and silence is noticed sooner."""
        self._send_ping()

    def _send_ping(self) -> None:
        self.quic.send_ping(HEARTBEAT_PING)
        self.touched.add(self)
        self._flush()

    def _flush(self) -> None:
        # The server's connection, and the direct connections to peers that share its socket.
        transmit_touched(self.touched)

    async def tun_pump(self, tun: TunDevice) -> None:
        """Packets from the TUN device to the server, a batch per wake-up."""
        while True:
            await tun.wait_readable()
            self._forward_from_tun(tun)
            self._flush()

    def _forward_from_tun(self, tun: TunDevice) -> None:
        """Queue what the TUN device holds (up to a batch) to the server; never blocks. The
        caller flushes."""
        server_packed = self.server_packed
        server_port = self.server_port
        send = self.send_packet
        peers = self.peers
        for packet in tun.read_batch(TUN_BATCH):
            if _is_to_tunnel_port(packet, server_packed, server_port):
                # Our own QUIC traffic routed back into the tunnel would loop forever.
                self.drops["tunnel_port"] += 1
                continue
            if peers is not None and peers.links and peers.send(packet):
                continue  # to a peer, on its direct path
            send(packet)

    async def run_peers(self) -> None:
        """Direct paths to the peers the server introduces: our candidates first, then the
        probes and connections for as long as the session lasts."""
        peers = Peers(self)
        self.peers = peers
        self.send_frame(peers.candidates())
        self._flush()
        try:
            await peers.run()
        finally:
            peers.close()

    async def heartbeat(self) -> None:
        """Ping every interval; after one missed answer try a new socket (roaming), and declare
        the session lost when nothing came back for the whole timeout."""
        config = self.services.config
        policy = HeartbeatPolicy(
            config.heartbeat_interval, config.heartbeat_timeout, now=trio.current_time()
        )
        self.heartbeat_policy = policy
        while True:
            decision = policy.decide(trio.current_time())
            if decision.lost:
                raise SessionLost(f"no heartbeat answer for {policy.timeout:g} s")
            if decision.rebind:
                await self.rebind()
            if decision.ping:
                # A QUIC PING, answered by the server's ACK: one datagram each way and no
                # work above QUIC on the server, which a thousand idle clients add up to.
                self._send_ping()
            # Asked after acting: a pong that came in during the rebind moves it.
            await trio.sleep_until(policy.wake_at())

    async def handshake(self) -> None:
        """QUIC handshake and the server's identity checked; our credentials stay here until
        :meth:`authenticate` (only the winner of a race of addresses may use them: the server
        lets a device's newer session replace its older one)."""
        self.quic.connect(self.server_addr, now=trio.current_time())
        self.driver.transmit()
        await wait_any(self.verified.wait, self.settled.wait)
        self._raise_failure()

    async def authenticate(self) -> AuthResponse | None:
        """The tunnel handshake on a verified connection. Returns the accepted response, or
        None when it failed: the task running this session raises that failure."""
        self.may_authenticate = True
        if self._hello is not None:
            self._answer_hello(self._hello)
            self._flush()
        await self.settled.wait()
        if self.failure is not None:
            self.driver.transmit()  # let a close we decided on reach the server
            return None
        return self.response

    def _raise_failure(self) -> None:
        if self.failure is not None:
            self.driver.transmit()  # let a close we decided on reach the server
            raise self.failure

    async def wait_ended(self) -> None:
        """Wait for this session to end, and raise what ended it."""
        await self.ended.wait()
        assert self.failure is not None
        raise self.failure

    def close(self) -> None:
        """Close the connection (unless it ended already) and send what that queued."""
        if self.peers is not None:
            self.peers.close()
        if not self.ended.is_set():
            self.quic.close(error_code=CLOSE_OK, reason_phrase="client shutting down")
        self.driver.transmit()  # our close, or the one a failure already queued

    def status(self, *, addresses: list[str], up_since: float | None) -> dict[str, Any]:
        """This session for ``tunnel status``. ``addresses``: the client's tunnel addresses
        (shown once this session carries them); ``up_since``: when the client's latest session
        came up (the supervisor keeps it)."""
        rtt = smoothed_rtt(self.quic)
        return {
            "server_id": encode_public_id(self.services.config.server_id),
            "remote": format_address(self.server_addr),
            "addresses": addresses if self.tun is not None else [],
            **self.counters(),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            **self.path_status(),
            "uptime": round(trio.current_time() - up_since, 3) if up_since else 0.0,
            "last_heard": round(trio.current_time() - self.heard_at, 3),
            "resumed": self.resumed,
            "rebinds": self.rebinds,
        }

    def peers_status(self) -> list[dict[str, Any]]:
        """The introduced peers and the path to each, for ``tunnel status``."""
        return self.peers.status() if self.peers is not None else []


def _is_to_tunnel_port(packet: bytes, server_packed: bytes, server_port: int) -> bool:
    """Is this our own QUIC traffic to the server, routed back into the tunnel?"""
    header = ip_header_untrusted(packet)
    if header is None or header[2] != server_packed:
        return False
    ports = udp_ports_untrusted(packet)
    return ports is not None and ports[1] == server_port
