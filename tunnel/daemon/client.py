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
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.tls import SessionTicket
from trio_util import wait_any

from tunnel.config import ClientConfig, RunOptions
from tunnel.core.backoff import Backoff
from tunnel.core.control import ClientControl
from tunnel.core.eyeballs import attempt_delay
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
    Ping,
    Pong,
    ServerHello,
    auth_transcript,
)
from tunnel.core.netchange import gains, matters
from tunnel.core.underlay import Route
from tunnel.daemon.aioquic_private.state import (
    connection_binding,
    is_stateless_reset,
    peer_public_key,
    smoothed_rtt,
    tune,
)
from tunnel.daemon.connector import race
from tunnel.daemon.driver import QuicDriver
from tunnel.daemon.pathmtu import PathMtu
from tunnel.daemon.platform import SYSTEM, Platform
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD, client_configuration
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
    EXIT_PERMANENT,
    EXIT_TEMPORARY,
    HandshakeTimeout,
    IdentityMismatch,
    PeerRejected,
    ProtocolViolation,
    SessionLost,
    TemporaryRejection,
    TunnelError,
)
from tunnel.keyfile import read_key_file

log = logging.getLogger("tunnel.client")

UDP_BATCH = 64
TUN_BATCH = 64
SERVER_ROUTE = "server"  # the keys of host routes to the server in HostChanges: "server IP"


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
        self.driver = QuicDriver(quic, self._send_datagrams, self._handle_event, self._failed)
        self.path_mtu = PathMtu(
            quic,
            self._send_probe,
            self._path_size_changed,
            self.driver.transmit,
            label=format_address(server_addr),
        )
        self.driver.on_path_change = self.path_mtu.path_changed
        self.control = ClientControl()
        self.rebinds = 0
        # The server's hello, held until its identity is verified: nothing secret (token,
        # signature) leaves before that.
        self._hello: ServerHello | None = None
        self.response: AuthResponse | None = None
        self.failure: TunnelError | None = None
        self.settled = trio.Event()  # handshake accepted, or failed
        self.ended = trio.Event()
        # Pongs count from here; :meth:`heartbeat` starts a fresh one when it starts.
        self.heartbeat_policy = HeartbeatPolicy(
            client.config.heartbeat_interval,
            client.config.heartbeat_timeout,
            now=trio.current_time(),
        )
        self.tun: TunDevice | None = None
        self.own_addresses: frozenset[bytes] = frozenset()
        self.identity_verified = False
        self.verified = trio.Event()
        self.may_authenticate = False
        self.resumed = False
        self._unverified_ticket: SessionTicket | None = None

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
        self.tun.write(packet)

    def _identity_verified(self) -> None:
        self.identity_verified = True
        self.verified.set()
        if self._unverified_ticket is not None:
            self.client.ticket = self._unverified_ticket
            self._unverified_ticket = None
        if self._hello is not None and self.may_authenticate:
            self._answer_hello(self._hello)

    def _ticket_received(self, ticket: SessionTicket) -> None:
        """Keep tickets only from a server whose identity we verified on this connection."""
        if self.identity_verified:
            self.client.ticket = ticket
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
        if received.pong_seen:
            self.heartbeat_policy.on_pong(trio.current_time())
        if received.answer_ping:
            self.send_frame(Pong())

    def _answer_hello(self, hello: ServerHello) -> None:
        self._hello = None
        identity = self.client.identity
        transcript = auth_transcript(
            hello.nonce,
            self.client.config.server_id,
            identity.public_key,
            self.client.device_id,
            connection_binding(self.quic),
        )
        self.set_peer_datagram_limit(min(MAX_DATAGRAM_PAYLOAD, hello.max_datagram_payload))
        self.control.request_sent()
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

    def _send_probe(self, probe: bytes, addr: Any) -> bool:
        return self.endpoint.send_probe(probe, addr)

    def _path_size_changed(self, size: int, evicted: list[bytes]) -> None:
        self.path_size_changed(size, evicted)
        self._flush()

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
        self.path_mtu.path_changed()  # another source address: perhaps another way there
        self.quic.change_connection_id()
        self.quic.send_ping(self.rebinds)
        self.driver.transmit()
        log.info("path silent: moved to a new local socket %s", format_address(fresh.local_address))

    def probe(self) -> None:
        """The path may have changed: ping now rather than at the next interval, so a new
        source address or NAT mapping is learned by the server, and silence is noticed sooner."""
        self.send_frame(Ping())
        self._flush()

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
        config = self.client.config
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
                self.send_frame(Ping())
                self._flush()
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
        await self.ended.wait()
        assert self.failure is not None
        raise self.failure

    def close(self) -> None:
        if not self.ended.is_set():
            self.quic.close(error_code=CLOSE_OK, reason_phrase="client shutting down")
        self.driver.transmit()  # our close, or the one a failure already queued

    def status(self) -> dict[str, Any]:
        rtt = smoothed_rtt(self.quic)
        started = self.client.session_started_at
        return {
            "server_id": encode_public_id(self.client.config.server_id),
            "remote": format_address(self.server_addr),
            "addresses": self.client.addresses() if self.tun is not None else [],
            **self.counters(),
            "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
            **self.path_status(),
            "uptime": round(trio.current_time() - started, 3) if started else 0.0,
            "resumed": self.resumed,
            "rebinds": self.rebinds,
        }


def _ip(address: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP of a socket address (a scope such as ``%eth0`` left off)."""
    return ipaddress.ip_address(address[0].split("%", 1)[0])


def _packed(address: Any) -> bytes:
    return _ip(address).packed


def _is_permanent(exc: BaseException) -> bool:
    """Does this failure (or any failure in this group) say "do not retry"?"""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_permanent(inner) for inner in exc.exceptions)
    return isinstance(exc, TunnelError) and exc.exit_code == EXIT_PERMANENT


def _describe(exc: BaseException) -> str:
    """One line for the log: our own errors say what happened; anything else is a failure
    inside the session, named by its type."""
    if isinstance(exc, TunnelError):
        return str(exc)
    return f"session failed ({type(exc).__name__}: {exc})"


def _is_to_tunnel_port(packet: bytes, server_packed: bytes, server_port: int) -> bool:
    """Is this our own QUIC traffic to the server, routed back into the tunnel?"""
    header = ip_header_untrusted(packet)
    if header is None or header[2] != server_packed:
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
        self.tun_index: int | None = None
        self._tunnel_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # Host routes outside the tunnel, by server address, and the addresses we may use.
        self._server_routes: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Route] = {}
        self._server_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self.monitor: Any = None  # the NetworkMonitor while it runs
        self._network_gained = trio.Event()
        self._attempt_scope: trio.CancelScope | None = None
        self._won_last: Any = None  # the address that won the last race: tried first next time
        self._last_rtt: float | None = None

    async def supervise(self) -> None:
        """Connect, run the session, and on loss reconnect with backoff until told to stop.

        Permanent, and the end of the daemon: local problems (config, key file, the host
        refusing a TUN device) and a rejection the verified server sent on the control stream.
        Everything else is temporary and retried, whatever it looks like, because the network
        can forge it: closes in Initial packets, another key presented, resets, a name that
        does not resolve, "server full", and any failure inside a session.
        """
        with lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_network)
                await self._reconnect_loop()
                nursery.cancel_scope.cancel()

    async def _reconnect_loop(self) -> None:
        backoff = Backoff()
        failures = 0
        while True:
            attempt = trio.CancelScope()
            self._attempt_scope = attempt
            try:
                with attempt:
                    await self._open_session()
            except Exception as exc:
                if _is_permanent(exc):
                    raise
                if not self.config.auto_reconnect:
                    raise SessionLost(f"{_describe(exc)} (auto_reconnect is off)") from None
                if isinstance(exc, IdentityMismatch):
                    log.error("%s", exc)
                else:
                    log.warning("%s", _describe(exc))
                if not isinstance(exc, TunnelError):
                    log.debug("the failure in full", exc_info=exc)
            finally:
                self._attempt_scope = None
                session, self.session = self.session, None
            if attempt.cancelled_caught:
                # The network changed under a handshake whose retransmissions may have been
                # spent while the path was down: a fresh attempt, at once.
                log.info("network changed: connecting again now")
                self.reconnects += 1
                continue
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
            self._network_gained = trio.Event()
            with trio.move_on_after(delay):
                await self._network_gained.wait()
                log.info("network changed: reconnecting now")
            self.reconnects += 1

    async def _watch_network(self) -> None:
        """React to the host's network changing: follow the underlay with the host route to
        the server, cut a backoff or a stalled handshake short when something came up, and
        probe a live session at once. Without a monitor the client still works, on timers."""
        try:
            monitor = self.platform.network_monitor()
        except TunnelError as exc:
            log.warning("not watching the network (%s): reconnects wait for their timers", exc)
            return
        self.monitor = monitor
        try:
            if self.tun is not None:
                monitor.ignore_interface(self.tun.name)
            while True:
                try:
                    batch = await monitor.wait_change()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.warning("network monitor stopped: %s", exc)
                    return
                if matters(batch):
                    self.network_changed(gained=gains(batch))
        finally:
            self.monitor = None
            monitor.close()

    def network_changed(self, *, gained: bool) -> None:
        """Something in the host's network that may touch the path to the server changed."""
        log.debug("network changed%s", " (something came up)" if gained else "")
        try:
            self._keep_server_reachable()
        except TunnelError as exc:
            log.warning("host route to the server: %s", exc)
        if self.state == "connected":
            if self.session is not None:
                self.session.probe()
        elif gained:
            self._network_gained.set()
            if self._attempt_scope is not None and self.state == "connecting":
                self._attempt_scope.cancel()

    async def _open_session(self) -> None:
        """Resolve every address of the server and race handshakes to them (Happy Eyeballs);
        the verified winner authenticates and runs. Returns never; raises SessionLost (or a
        permanent error) when the session ends."""
        self.state = "connecting"
        candidates = await self.platform.resolve_all(
            self.config.server_host, self.config.server_port, key="server", prefer=self._won_last
        )
        # Outside the tunnel before the first packet, for every address the race may try.
        self._keep_server_reachable([address for _, address in candidates])
        began = trio.current_time()
        with lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                won = await race(
                    nursery, candidates, self._attempt, delay=attempt_delay(self._last_rtt)
                )
                session: ClientSession = won.value
                self._won_last = won.candidate
                self.session = session
                self.server_addr = session.server_addr
                self.server_packed = _packed(session.server_addr)
                self._keep_server_reachable([session.server_addr])
                left = self.config.handshake_timeout - (trio.current_time() - began)
                try:
                    with trio.fail_after(max(left, 0.0)):
                        response = await session.authenticate()
                except trio.TooSlowError:
                    raise HandshakeTimeout(
                        f"no answer from {self.config.server_host}:{self.config.server_port} "
                        f"within {self.config.handshake_timeout:g} s"
                    ) from None
                if response is not None:
                    self._start_session(session, response, began, nursery)
                await trio.sleep_forever()  # until the session's task raises its end

    async def _attempt(
        self, candidate: Any, *, task_status: trio.TaskStatus[ClientSession]
    ) -> None:
        """One address of the race: its own socket and connection; reports the session once
        the server's identity is verified, then runs its pumps until the session ends."""
        family, addr = candidate
        log.debug("handshake with %s", format_address(addr))
        endpoint = await self.platform.open_udp(
            "::" if family == socket.AF_INET6 else "0.0.0.0", 0, key="server", family=family
        )
        session = ClientSession(self, endpoint, addr)
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(session.udp_pump)
                pumps.start_soon(session.driver.run_timer)
                try:
                    with trio.fail_after(self.config.handshake_timeout):
                        await session.handshake()
                except trio.TooSlowError:
                    raise HandshakeTimeout(
                        f"no answer from {format_address(addr)} "
                        f"within {self.config.handshake_timeout:g} s"
                    ) from None
                task_status.started(session)
                await session.wait_ended()
        finally:
            session.close()
            session.endpoint.close()
            if self.session is session:
                self._last_rtt = smoothed_rtt(session.quic)

    def _start_session(
        self,
        session: ClientSession,
        response: AuthResponse,
        began: float,
        nursery: trio.Nursery,
    ) -> None:
        """The server accepted us: TUN device, addresses and routes, then the data pumps."""
        self._apply(response)
        session.own_addresses = frozenset(
            a.packed for a in (response.assigned_ip, response.assigned_ip6) if a is not None
        )
        session.tun = self.tun
        # What our applications send too big for the path: told so from the server.
        session.deliver_local = self.tun.write if self.tun else None
        session.icmp_source4 = response.server_ip.packed if response.server_ip else None
        session.icmp_source6 = response.server_ip6.packed if response.server_ip6 else None
        self.state = "connected"
        self.session_started_at = trio.current_time()
        self.last_handshake = self.session_started_at - began
        log.info(
            "session up: %s via %s to %s (handshake %.1f ms%s)",
            ", ".join(self.addresses()),
            self.tun.name if self.tun else "-",
            format_address(session.server_addr),
            self.last_handshake * 1000,
            ", resumed" if session.resumed else "",
        )
        if not self.connected.is_set():
            self.connected.set()
            notify_ready(self.options.ready_fd)
        assert self.tun is not None  # _apply made it
        nursery.start_soon(session.tun_pump, self.tun)
        nursery.start_soon(session.heartbeat)
        nursery.start_soon(session.path_mtu.run)

    def _apply(self, response: AuthResponse) -> None:
        """Create the TUN device and routes on the first session; update addresses later."""
        if self.response is not None and _same_addresses(self.response, response):
            self.response = response
            return
        if self.tun is None:
            mtu = min(self.config.mtu, response.mtu or self.config.mtu)
            self.tun = self.platform.open_tun(self.config.tun_name)
            if self.monitor is not None:
                self.monitor.ignore_interface(self.tun.name)
            self.tun_index = self.host.bring_up(self.tun.name, mtu)
            self._add_addresses(response)
            self._add_routes(response)
        else:
            # The server gave us other addresses (our lease expired): swap them.
            self.host.undo()
            self._server_routes.clear()
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
        self._tunnel_routes = wanted
        self._keep_server_reachable()
        for net in wanted:
            # A default route is installed as its two halves, which win over the existing
            # default by being more specific and leave it untouched for our return.
            halves: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
                list(net.subnets(prefixlen_diff=1)) if net.prefixlen == 0 else [net]
            )
            for half in halves:
                self.host.add_route(half, ifname=self.tun.name)

    def _keep_server_reachable(self, addresses: list[Any] | None = None) -> None:
        """Full tunnel: keep a host route outside the tunnel to each server address we may
        use (every candidate during a race, then the winner's), through whatever reaches it
        now: the underlay may have moved (another gateway or interface), the name may resolve
        elsewhere. None: the addresses of last time. Nothing where the tunnel's routes miss
        the server."""
        if addresses is not None:
            self._server_ips = {_ip(address) for address in addresses}
        if self.tun is None:
            return
        wanted_ips = {
            ip
            for ip in self._server_ips
            if any(ip in net for net in self._tunnel_routes if net.version == ip.version)
        }
        for ip in list(self._server_routes):
            if ip not in wanted_ips:
                self.host.set_route(f"{SERVER_ROUTE} {ip}", None)
                del self._server_routes[ip]
        for ip in wanted_ips:
            current = self._server_routes.get(ip)
            underlay = self.host.underlay_route_to(ip, avoid_oif=self.tun_index, avoid=current)
            if underlay is None:
                log.warning("no route to the server %s outside the tunnel", ip)
                continue
            wanted = Route(
                ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"), underlay.gateway, underlay.oif
            )
            if wanted != current:
                self.host.set_route(f"{SERVER_ROUTE} {ip}", wanted)
                self._server_routes[ip] = wanted
                log.info(
                    "server %s reached outside the tunnel%s (interface %s)",
                    ip,
                    f" via {wanted.gateway}" if wanted.gateway else "",
                    wanted.oif,
                )

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
