"""The client daemon: a reconnect supervisor around one session at a time.

Task tree:

    run_client
      ├─ signal watcher
      ├─ control socket
      └─ supervisor loop: backoff -> connect (fail_after) -> run the session
           one nursery per session:
             ├─ UDP pump       datagrams -> QUIC -> events
             ├─ QUIC timer
             ├─ TUN pump       packets -> QUIC datagrams (once the session is up)
             └─ heartbeat      ping every interval, SessionLost after the timeout

The TUN device and routes are created with the first session and kept across reconnects, so
applications see a pause, not a vanished interface.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from typing import Any

import trio
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.tls import SessionTicket

from tunnel.config import ClientConfig, RunOptions
from tunnel.core.backoff import Backoff
from tunnel.core.identity import Identity, encode_public_id
from tunnel.core.ippacket import udp_ports_untrusted
from tunnel.core.messages import (
    CLOSE_IDENTITY,
    CLOSE_OK,
    CLOSE_PROTOCOL,
    CLOSE_REJECTED,
    PROTOCOL_VERSION,
    AuthRequest,
    AuthResponse,
    FrameDecoder,
    Packet,
    Ping,
    Pong,
    ServerHello,
    auth_transcript,
)
from tunnel.daemon.platform import SYSTEM, Platform
from tunnel.daemon.quic import (
    MAX_DATAGRAM_PAYLOAD,
    QuicDriver,
    client_configuration,
    is_stateless_reset,
    peer_public_key,
    smoothed_rtt,
    tune,
)
from tunnel.daemon.runtime import (
    ControlServer,
    check_ready_fd,
    control_socket_path,
    lone_errors_unwrapped,
    notify_ready,
    watch_signals,
)
from tunnel.daemon.session import Channel, Drops
from tunnel.daemon.tun import TunDevice
from tunnel.daemon.udp import UdpEndpoint, format_address
from tunnel.errors import (
    EXIT_TEMPORARY,
    DecodeError,
    HandshakeTimeout,
    IdentityMismatch,
    PeerRejected,
    SessionLost,
    TunnelError,
)
from tunnel.keyfile import read_key_file

log = logging.getLogger("tunnel.client")

SERVER_HELLO_STREAM = 3  # the server's first unidirectional stream
UDP_BATCH = 64
TUN_BATCH = 64


class GaveUp(TunnelError):
    """max_reconnect_attempts consecutive attempts failed."""

    exit_code = EXIT_TEMPORARY


class ClientSession(Channel):
    """One QUIC connection to the server, from connect to close."""

    def __init__(self, client: Client, endpoint: UdpEndpoint, server_addr: Any) -> None:
        quic = tune(
            QuicConnection(
                configuration=client_configuration(session_ticket=client.ticket),
                session_ticket_handler=self._ticket_received,
            )
        )
        super().__init__(quic, client.drops, set())
        self.client = client
        self.endpoint = endpoint
        self.server_addr = server_addr
        self.driver = QuicDriver(quic, self._send_datagrams, self._handle_event)
        self.rebinds = 0
        self.hello_decoder = FrameDecoder()
        self.response: AuthResponse | None = None
        self.failure: TunnelError | None = None
        self.settled = trio.Event()  # handshake accepted, or failed
        self.ended = trio.Event()
        self.last_pong = trio.current_time()
        self.tun: TunDevice | None = None
        self.own_addresses: frozenset[bytes] = frozenset()
        self.identity_verified = False
        self.resumed = False
        self._unverified_ticket: SessionTicket | None = None

    def _fail(self, error: TunnelError) -> None:
        if self.failure is None:
            self.failure = error
        self.settled.set()
        self.ended.set()

    def _handle_event(self, event: QuicEvent) -> None:
        if isinstance(event, DatagramFrameReceived):
            self._packet_from_server(event.data)
        elif isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, HandshakeCompleted):
            self.resumed = event.session_resumed
            if event.session_resumed:
                # No certificate on resumption: the ticket itself came from a session whose
                # server key we checked, and only such tickets are ever kept.
                self._identity_verified()
                return
            key = peer_public_key(self.quic)
            expected = self.client.config.server_id
            if key == expected:
                self._identity_verified()
            else:
                got = encode_public_id(key) if key else "no Ed25519 key"
                self.quic.close(error_code=CLOSE_IDENTITY, reason_phrase="identity mismatch")
                self._fail(
                    IdentityMismatch(
                        f"server identity mismatch: expected {encode_public_id(expected)}, "
                        f"server presented {got}"
                    )
                )
        elif isinstance(event, ConnectionTerminated):
            if event.error_code == CLOSE_REJECTED and self.response is None:
                self._fail(PeerRejected(f"rejected by server: {event.reason_phrase}"))
            else:
                reason = event.reason_phrase or f"code {event.error_code:#x}"
                self._fail(SessionLost(f"connection closed: {reason}"))

    def _packet_from_server(self, packet: bytes) -> None:
        """Hot path: deliver a packet from the server if it is addressed to us."""
        if self.tun is None:
            return
        self.bytes_in += len(packet)
        self.packets_in += 1
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            dst = packet[16:20]
        elif version == 6 and len(packet) >= 40:
            dst = packet[24:40]
        else:
            self.drops["malformed"] += 1
            return
        if dst not in self.own_addresses:
            # Not for us: the server never routes such packets here; do not let anyone use
            # the tunnel to inject traffic for other hosts behind this client.
            self.drops["not_ours"] += 1
            return
        self.tun.write(packet)

    def _identity_verified(self) -> None:
        self.identity_verified = True
        if self._unverified_ticket is not None:
            self.client.ticket = self._unverified_ticket
            self._unverified_ticket = None

    def _ticket_received(self, ticket: SessionTicket) -> None:
        """Keep tickets only from a server whose identity we verified on this connection."""
        if self.identity_verified:
            self.client.ticket = ticket
        else:
            self._unverified_ticket = ticket

    def _stream_data(self, event: StreamDataReceived) -> None:
        decoder = self.hello_decoder if event.stream_id == SERVER_HELLO_STREAM else self.decoder
        try:
            frames = decoder.feed(event.data)
        except DecodeError as exc:
            self.quic.close(error_code=CLOSE_PROTOCOL, reason_phrase="malformed stream")
            self._fail(SessionLost(f"protocol error from server: {exc}"))
            return
        for frame in frames:
            if isinstance(frame, Packet):
                self._packet_from_server(frame.data)
            elif isinstance(frame, Pong):
                self.last_pong = trio.current_time()
            elif isinstance(frame, Ping):
                self.send_frame(Pong())
            elif isinstance(frame, ServerHello) and event.stream_id == SERVER_HELLO_STREAM:
                self._answer_hello(frame)
            elif isinstance(frame, AuthResponse) and self.response is None:
                self._auth_response(frame)
            else:
                self.quic.close(error_code=CLOSE_PROTOCOL, reason_phrase="unexpected frame")
                self._fail(SessionLost(f"protocol error: unexpected {type(frame).__name__}"))

    def _answer_hello(self, hello: ServerHello) -> None:
        identity = self.client.identity
        transcript = auth_transcript(
            hello.nonce, self.client.config.server_id, identity.public_key, self.client.device_id
        )
        self.max_datagram_payload = min(MAX_DATAGRAM_PAYLOAD, hello.max_datagram_payload)
        self.send_frame(
            AuthRequest(
                version=PROTOCOL_VERSION,
                device_id=self.client.device_id,
                client_id=identity.public_key,
                auth_token=self.client.config.auth_token,
                signature=identity.sign(transcript),
                max_datagram_payload=MAX_DATAGRAM_PAYLOAD,
            )
        )

    def _auth_response(self, response: AuthResponse) -> None:
        self.response = response
        if not response.accepted:
            self._fail(PeerRejected(f"rejected by server: {response.reject_reason}"))
            return
        self.settled.set()

    # -- tasks ----------------------------------------------------------------------------------

    async def udp_pump(self) -> None:
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
            for data, addr in endpoint.receive_batch(UDP_BATCH):
                if is_stateless_reset(self.quic, data):
                    raise SessionLost("the server no longer knows this session (it restarted)")
                driver.receive(data, addr, now)
            tun = self.tun
            writes = tun.writes if tun is not None else 0
            driver.deliver_events()
            if tun is not None and tun.writes != writes:
                # What the kernel answered inside our write (TCP ACKs) joins this send.
                self._forward_from_tun(tun)
            self.touched.add(self)  # whatever receiving produced (ACKs) goes out now
            self._flush()

    def _send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        self.endpoint.send_batch(datagrams)

    async def rebind(self) -> None:
        """Move the connection to a fresh UDP socket (and a fresh connection ID).

        After an address change, a socket may be stuck with a source that no longer works, and
        a NAT may have forgotten our mapping; a new socket gets whatever source the kernel
        picks now, and QUIC migrates the connection to it: the server validates the new path
        and the session, with every TCP connection inside it, carries on.
        """
        family = self.endpoint.family
        fresh = await self.client.platform.open_udp(
            "::" if family == socket.AF_INET6 else "0.0.0.0", 0, key="server", family=family
        )
        old, self.endpoint = self.endpoint, fresh
        old.close()
        self.rebinds += 1
        self.quic.change_connection_id()
        self.quic.send_ping(self.rebinds)
        self.driver.transmit()
        log.info("path silent: moved to a new local socket %s", format_address(fresh.local_address))

    def _flush(self) -> None:
        if self.touched:
            self.touched.clear()
            self.driver.transmit()

    async def tun_pump(self, tun: TunDevice) -> None:
        while True:
            await tun.wait_readable()
            self._forward_from_tun(tun)
            self._flush()

    def _forward_from_tun(self, tun: TunDevice) -> None:
        """Queue what the TUN device holds (up to a batch) to the server; never blocks. The
        caller flushes."""
        server_packed = self.client.server_packed
        server_port = self.client.server_port
        send = self.send_packet
        for packet in tun.read_batch(TUN_BATCH):
            if _is_to_tunnel_port(packet, server_packed, server_port):
                # Our own QUIC traffic routed back into the tunnel would loop forever.
                self.drops["tunnel_port"] += 1
                continue
            send(packet)

    async def heartbeat(self) -> None:
        """Ping every interval; after one missed answer try a new socket (roaming), and declare
        the session lost when nothing came back for the whole timeout."""
        interval = self.client.config.heartbeat_interval
        timeout = self.client.config.heartbeat_timeout
        # One pong late: the path may be dead for this socket only.
        rebind_after = min(interval * 1.5, timeout / 2)
        self.last_pong = trio.current_time()
        next_ping = trio.current_time()
        rebound_for = None
        while True:
            now = trio.current_time()
            silence = now - self.last_pong
            if silence >= timeout:
                raise SessionLost(f"no heartbeat answer for {timeout:g} s")
            if silence >= rebind_after and rebound_for != self.last_pong:
                rebound_for = self.last_pong
                await self.rebind()
            if now >= next_ping:
                self.send_frame(Ping())
                self._flush()
                next_ping = now + interval
            wake = min(next_ping, self.last_pong + timeout)
            if rebound_for != self.last_pong:
                wake = min(wake, self.last_pong + rebind_after)
            await trio.sleep_until(wake)

    async def connect(self) -> AuthResponse:
        """QUIC handshake, identity check and tunnel handshake. Returns the accepted response."""
        self.quic.connect(self.server_addr, now=trio.current_time())
        self.driver.transmit()
        await self.settled.wait()
        if self.failure is not None:
            self.driver.transmit()  # let a close we decided on reach the server
            raise self.failure
        assert self.response is not None
        return self.response

    async def wait_ended(self) -> None:
        await self.ended.wait()
        assert self.failure is not None
        raise self.failure

    def close(self) -> None:
        if not self.ended.is_set():
            self.quic.close(error_code=CLOSE_OK, reason_phrase="client shutting down")
            self.driver.transmit()

    def status(self) -> dict[str, Any]:
        rtt = smoothed_rtt(self.quic)
        started = self.client.session_started_at
        return {
            "server_id": encode_public_id(self.client.config.server_id),
            "remote": format_address(self.server_addr),
            "addresses": self.client.addresses() if self.tun is not None else [],
            **self.counters(),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            "uptime": round(trio.current_time() - started, 3) if started else 0.0,
            "resumed": self.resumed,
            "rebinds": self.rebinds,
        }


def _is_to_tunnel_port(packet: bytes, server_packed: bytes, server_port: int) -> bool:
    """Is this our own QUIC traffic to the server, routed back into the tunnel?"""
    version = packet[0] >> 4 if packet else 0
    dst = packet[16:20] if version == 4 else packet[24:40]
    if dst != server_packed:
        return False
    ports = udp_ports_untrusted(packet)
    return ports is not None and ports[1] == server_port


class Client:
    """State of the client daemon across sessions."""

    def __init__(
        self,
        config: ClientConfig,
        identity: Identity,
        options: RunOptions,
        platform: Platform = SYSTEM,
    ) -> None:
        self.config = config
        self.identity = identity
        self.options = options
        self.platform = platform
        self.device_id = secrets.randbits(64)
        self.ticket: SessionTicket | None = None  # from the last session, for resumption
        self.drops = Drops()
        self.host = platform.host_changes()
        self.connected = trio.Event()  # set by the first established session
        self.tun: TunDevice | None = None
        self.session: ClientSession | None = None
        self.response: AuthResponse | None = None
        self.state = "connecting"
        self.reconnects = 0
        self.started_at = trio.current_time()
        self.session_started_at: float | None = None
        self.last_handshake: float | None = None
        self.server_addr: Any = None
        self.server_packed = b""
        self.server_port = config.server_port

    async def supervise(self) -> None:
        """Connect, run the session, and on loss reconnect with backoff until told to stop.

        Rejections and identity mismatches end the daemon (they will not get better by
        retrying); anything that means "the session is gone" leads to another attempt.
        """
        backoff = Backoff()
        failures = 0
        while True:
            session: ClientSession | None = None
            try:
                session = await self._open_session()
                await self._run_session(session)
            except (SessionLost, HandshakeTimeout) as exc:
                if not self.config.auto_reconnect:
                    raise SessionLost(f"{exc} (auto_reconnect is off)") from None
                log.warning("%s", exc)
            finally:
                if session is not None:
                    session.endpoint.close()
                self.session = None
            if session is not None and session.packets_in > 0 and session.packets_out > 0:
                # The session carried traffic: start over as if it were the first failure.
                backoff.reset()
                failures = 0
            failures += 1
            limit = self.config.max_reconnect_attempts
            if limit is not None and failures > limit:
                raise GaveUp(
                    f"gave up after {limit} failed reconnect attempts "
                    f"(max_reconnect_attempts = {limit})"
                )
            delay = backoff.next_delay()
            self.state = "reconnecting"
            log.info("reconnecting in %.1f s (attempt %d)", delay, failures)
            await trio.sleep(delay)
            self.reconnects += 1

    async def _open_session(self) -> ClientSession:
        family, addr = await self.platform.resolve(
            self.config.server_host, self.config.server_port, key="server"
        )
        self.server_addr = addr
        self.server_packed = ipaddress.ip_address(addr[0]).packed
        endpoint = await self.platform.open_udp(
            "::" if family == socket.AF_INET6 else "0.0.0.0", 0, key="server", family=family
        )
        self.session = ClientSession(self, endpoint, addr)
        self.state = "connecting"
        return self.session

    async def _run_session(self, session: ClientSession) -> None:
        """One session's nursery: returns never, raises SessionLost (or a permanent error)."""
        with lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.udp_pump)
                nursery.start_soon(session.driver.run_timer)
                began = trio.current_time()
                try:
                    with trio.fail_after(self.config.handshake_timeout):
                        response = await session.connect()
                except trio.TooSlowError:
                    raise HandshakeTimeout(
                        f"no answer from {self.config.server_host}:{self.config.server_port} "
                        f"within {self.config.handshake_timeout:g} s"
                    ) from None
                try:
                    self._apply(response)
                    session.own_addresses = frozenset(
                        a.packed
                        for a in (response.assigned_ip, response.assigned_ip6)
                        if a is not None
                    )
                    session.tun = self.tun
                    self.state = "connected"
                    self.session_started_at = trio.current_time()
                    self.last_handshake = self.session_started_at - began
                    log.info(
                        "session up: %s via %s (handshake %.1f ms%s)",
                        ", ".join(self.addresses()),
                        self.tun.name if self.tun else "-",
                        self.last_handshake * 1000,
                        ", resumed" if session.resumed else "",
                    )
                    if not self.connected.is_set():
                        self.connected.set()
                        notify_ready(self.options.ready_fd)
                    nursery.start_soon(session.tun_pump, self.tun)
                    nursery.start_soon(session.heartbeat)
                    await session.wait_ended()
                finally:
                    session.close()

    def _apply(self, response: AuthResponse) -> None:
        """Create the TUN device and routes on the first session; update addresses later."""
        if self.response is not None and _same_addresses(self.response, response):
            self.response = response
            return
        if self.tun is None:
            mtu = min(self.config.mtu, response.mtu or self.config.mtu)
            self.tun = self.platform.open_tun(self.config.tun_name)
            self.host.bring_up(self.tun.name, mtu)
            self._add_addresses(response)
            self._add_routes(response)
        else:
            # The server gave us other addresses (our lease expired): swap them.
            self.host.undo()
            self._add_addresses(response)
            self._add_routes(response)
        self.response = response

    def _add_addresses(self, response: AuthResponse) -> None:
        assert self.tun is not None
        if response.assigned_ip is not None and response.network is not None:
            self.host.add_address(self.tun.name, response.assigned_ip, response.network.prefixlen)
        if response.assigned_ip6 is not None and response.network6 is not None:
            self.host.add_address(self.tun.name, response.assigned_ip6, response.network6.prefixlen)

    def _add_routes(self, response: AuthResponse) -> None:
        assert self.tun is not None
        wanted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        if response.assigned_ip is not None:
            wanted += self.config.routes
        if response.assigned_ip6 is not None:
            wanted += self.config.routes6
        server_ip = ipaddress.ip_address(self.server_addr[0])
        if any(server_ip in net for net in wanted if net.version == server_ip.version):
            # Keep the path to the server outside the tunnel: a host route through whatever
            # reaches it now.
            gateway, oif = self.host.route_to(server_ip)
            host_net = ipaddress.ip_network(f"{server_ip}/{server_ip.max_prefixlen}")
            self.host.add_route(host_net, via=gateway, oif=oif)
        for net in wanted:
            # A default route is installed as its two halves, which win over the existing
            # default by being more specific and leave it untouched for our return.
            halves = list(net.subnets(prefixlen_diff=1)) if net.prefixlen == 0 else [net]
            for half in halves:
                self.host.add_route(half, ifname=self.tun.name)

    def addresses(self) -> list[str]:
        r = self.response
        if r is None:
            return []
        out = []
        if r.assigned_ip is not None and r.network is not None:
            out.append(f"{r.assigned_ip}/{r.network.prefixlen}")
        if r.assigned_ip6 is not None and r.network6 is not None:
            out.append(f"{r.assigned_ip6}/{r.network6.prefixlen}")
        return out

    def status(self) -> dict[str, Any]:
        session = self.session
        return {
            "role": "client",
            "id": self.identity.public_id,
            "server": f"{self.config.server_host}:{self.config.server_port}",
            "server_id": encode_public_id(self.config.server_id),
            "state": self.state,
            "tun": self.tun.name if self.tun else None,
            "addresses": self.addresses(),
            "device_id": self.device_id,
            "uptime": round(trio.current_time() - self.started_at, 3),
            "reconnects": self.reconnects,
            "last_handshake_ms": round(self.last_handshake * 1000, 3)
            if self.last_handshake is not None
            else None,
            "sessions": [session.status()] if session is not None else [],
            "drops": dict(self.drops)
            | ({"tun_write": self.tun.write_drops} if self.tun else {})
            | ({"udp_send": session.endpoint.send_drops} if session else {}),
        }

    def close(self) -> None:
        self.host.undo()
        self.host.close()
        if self.tun is not None:
            self.tun.close()


def _same_addresses(a: AuthResponse, b: AuthResponse) -> bool:
    return (a.assigned_ip, a.network, a.assigned_ip6, a.network6) == (
        b.assigned_ip,
        b.network,
        b.assigned_ip6,
        b.network6,
    )


async def run_client(config: ClientConfig, options: RunOptions) -> None:
    """Run the client until SIGTERM/SIGINT, a permanent failure, or giving up."""
    check_ready_fd(options.ready_fd)
    identity = read_key_file(config.key_file) if config.key_file else Identity.generate()
    client = Client(config, identity, options)
    control = ControlServer(control_socket_path(config.control_socket), client.status)
    try:
        await control.bind()
        log.info(
            "client %s connecting to %s:%d",
            identity.public_id,
            config.server_host,
            config.server_port,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, nursery.cancel_scope, None)
            nursery.start_soon(control.serve)
            await client.supervise()
            nursery.cancel_scope.cancel()
        log.info("client stopped")
    finally:
        # Synchronous on purpose: undoing our changes to the host cannot be cancelled halfway.
        control.close()
        client.close()
