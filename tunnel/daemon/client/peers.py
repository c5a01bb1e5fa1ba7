"""Direct paths to other clients: probes, the direct QUIC connection, and the choice of path.

The server introduces a peer (:class:`~tunnel.core.messages.PeerIntro`: its key, its tunnel
addresses, endpoints to try and a secret for the pair). From then on :class:`Peers` keeps a
:class:`PeerLink` for it:

* probes (:mod:`tunnel.core.disco`) go to every endpoint at once, from the very socket the
  session talks to the server from, so the NAT mapping and firewall state the server sees are
  the ones the peer punches through to; probes carry the pair's secret, so nobody else can make
  us answer or send anywhere;
* once an endpoint answered a full round trip, the peer with the smaller key opens a QUIC
  connection to it (:class:`PeerConnection`), and proves its key with a ``PeerAuth`` over the
  connection's channel binding; the other side's key is the TLS certificate it presents. Both
  must be the key the server introduced, or the connection is closed;
* :class:`~tunnel.core.peerpath.PeerPath` decides from these events and the clock when traffic
  takes the direct path, when it falls back to the relay (the server), when to probe again and
  when to keep the path's NAT state alive.

The same rules hold on a direct path as through the server: a peer may send only from its own
tunnel addresses (the ones the server leased it), and only to ours.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
import socket
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel
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

from tunnel.core.control import PeerControl
from tunnel.core.disco import (
    TXID_SIZE,
    encode_ping,
    encode_pong,
    format_endpoint,
    is_probe,
    order_candidates,
    parse_probe_untrusted,
    socket_endpoint,
    usable_candidate,
)
from tunnel.core.disco import Ping as DiscoPing
from tunnel.core.disco import Pong as DiscoPong
from tunnel.core.identity import encode_public_id, verify_signature
from tunnel.core.ippacket import ip_header_untrusted
from tunnel.core.messages import (
    CLOSE_IDENTITY,
    CLOSE_OK,
    Candidates,
    Endpoint,
    PeerAuth,
    PeerIntro,
    Ping,
    Pong,
    peer_transcript,
)
from tunnel.core.peerpath import Actions, PeerPath
from tunnel.core.peerpath import State as PathState
from tunnel.core.ratelimit import TokenBucket
from tunnel.core.routing import RouteTable
from tunnel.daemon.aioquic_private.state import (
    connection_binding,
    largest_received,
    peer_public_key,
    smoothed_rtt,
    tune,
)
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD, peer_configuration
from tunnel.daemon.session import Channel, transmit_touched
from tunnel.errors import ProtocolViolation

if TYPE_CHECKING:
    from tunnel.daemon.client.session import ClientSession

log = logging.getLogger("tunnel.client")

# At most this many introduced peers at once: a server (or whoever holds its key) cannot make
# us keep state without bound.
MAX_PEERS = 256
# Answers to pings, per peer: enough for every endpoint's probes, never a flood.
PONG_RATE = 20.0
# Pings awaiting their pong, per peer: a round's worth.
MAX_PENDING_PINGS = 128
MAX_PINGED_FROM = 16  # endpoints remembered per peer (a replayed ping can come from anywhere)
PINGED_FROM_S = 10.0  # how recent that ping must be: a round pings for about 4 s


def socket_address(endpoint: Endpoint, family_v6: bool) -> tuple[Any, ...]:
    """What ``sendto`` on our socket takes for ``endpoint``."""
    address, port = endpoint
    return (str(address), port, 0, 0) if family_v6 else (str(address), port)


class PeerLink:
    """One introduced peer: what the server told us, the path policy, the direct connection."""

    def __init__(self, intro: PeerIntro, *, our_key: bytes) -> None:
        self.peer_id = intro.peer_id
        self.secret = intro.secret
        self.addresses = frozenset(a.packed for a in intro.addresses)
        self.shown_addresses = [str(a) for a in intro.addresses]
        # The smaller key opens the connection, so two peers that start at once make one.
        self.initiator = our_key < intro.peer_id
        self.policy = PeerPath(initiator=self.initiator)
        self.connection: PeerConnection | None = None
        self.sent_pings: dict[bytes, Endpoint] = {}  # transaction ID -> where it went
        self.pong_budget = TokenBucket(rate=PONG_RATE, burst=PONG_RATE)
        # Endpoints an authenticated ping of this peer came from, and when: the responder
        # takes a connection only from one of them (the initiator connects after its ping got
        # through, from the same socket), so whoever else sits at a candidate address cannot
        # take the connection's place.
        self.pinged_from: dict[Endpoint, float] = {}
        self.label = encode_public_id(intro.peer_id)[:12]

    @property
    def direct(self) -> PeerConnection | None:
        """The connection traffic takes now, or None: the relay."""
        connection = self.connection
        if connection is not None and connection.authenticated and self.policy.is_direct:
            return connection
        return None

    def remember_ping(self, txid: bytes, endpoint: Endpoint) -> None:
        _remember(self.sent_pings, txid, endpoint, MAX_PENDING_PINGS)

    def pinged_by(self, endpoint: Endpoint, now: float) -> None:
        """An authenticated ping of this peer came from ``endpoint``."""
        _remember(self.pinged_from, endpoint, now, MAX_PINGED_FROM)

    def recently_pinged_by(self, endpoint: Endpoint, now: float) -> bool:
        return now - self.pinged_from.get(endpoint, -math.inf) < PINGED_FROM_S


def _remember(table: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Put ``key`` last in ``table`` and drop the oldest entries beyond ``limit``."""
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]


class PeerConnection(Channel):
    """The direct QUIC connection to one peer, either role. Its boundary is its driver, as for
    the server's connection: whatever goes wrong in it closes it, and traffic falls back."""

    def __init__(self, peers: Peers, link: PeerLink, quic: QuicConnection, endpoint: Endpoint):
        super().__init__(quic, peers.drops, peers.touched)
        self.peers = peers
        self.link = link
        self.endpoint = endpoint
        self.addr = socket_address(endpoint, peers.family_v6)
        self.control = PeerControl(initiator=link.initiator)
        self.drive(
            peers.send_datagrams,
            peers.send_probe,
            self._handle_event,
            self._failed,
            label=format_endpoint(endpoint),
        )
        self.authenticated = False
        self.ready = trio.Event()  # authenticated
        self.ended = False
        self.cids: set[bytes] = set()
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        """The connection's timer and, once authenticated, its path MTU search."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.driver.run_timer)
                nursery.start_soon(self._path_mtu_once_authenticated)

    async def _path_mtu_once_authenticated(self) -> None:
        await self.ready.wait()
        await self.path_mtu.run()

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        before = largest_received(self.quic)
        self.driver.receive(data, addr, now)
        if self.authenticated and largest_received(self.quic) != before:
            self.link.policy.heard(now)  # any packet its keys opened, ACKs too

    # -- events --------------------------------------------------------------------------------

    def _handle_event(self, event: QuicEvent) -> None:
        try:
            if isinstance(event, DatagramFrameReceived):
                self.control.datagram()
                self._packet_from_peer(event.data)
            elif isinstance(event, StreamDataReceived):
                self._stream_data(event)
            elif isinstance(event, StopSendingReceived):
                self.control.stop_sending(event.stream_id)
            elif isinstance(event, StreamReset):
                self.control.stream_reset(event.stream_id)
            elif isinstance(event, HandshakeCompleted):
                self._handshake_completed()
            elif isinstance(event, ConnectionIdIssued):
                self.peers.cid_issued(self, event.connection_id)
            elif isinstance(event, ConnectionIdRetired):
                self.peers.cid_retired(self, event.connection_id)
            elif isinstance(event, ConnectionTerminated):
                self.peers.connection_ended(self, event.reason_phrase or "closed by the peer")
        except ProtocolViolation as exc:
            self.close(exc.close_code, exc.reason)

    def _handshake_completed(self) -> None:
        if not self.link.initiator:
            return  # the initiator proves its key with its PeerAuth
        key = peer_public_key(self.quic)
        if key != self.link.peer_id:
            got = encode_public_id(key) if key else "no Ed25519 key"
            log.warning(
                "peer %s: %s presented %s: refused",
                self.link.label,
                format_endpoint(self.endpoint),
                got,
            )
            self.close(CLOSE_IDENTITY, "identity mismatch")
            return
        transcript = peer_transcript(
            self.link.secret,
            self.peers.identity.public_key,
            self.link.peer_id,
            connection_binding(self.quic),
        )
        self.send_frame(
            PeerAuth(
                client_id=self.peers.identity.public_key,
                signature=self.peers.identity.sign(transcript),
                max_datagram_payload=MAX_DATAGRAM_PAYLOAD,
            )
        )
        self.send_frame(Ping())  # its pong is the round trip that makes the path usable

    def _stream_data(self, event: StreamDataReceived) -> None:
        now = trio.current_time()
        received = self.control.stream_data(event.stream_id, event.data, event.end_stream, now)
        if received.peer_auth is not None:
            self._check_peer_auth(received.peer_auth)
            if self.ended:
                return
        for packet in received.packets:
            self._packet_from_peer(packet)
        if received.pong_seen and self.link.initiator and not self.authenticated:
            self._authenticated(now)
        if received.answer_ping:
            self.send_frame(Pong())
        if received.pings_ignored:
            self.drops["pings_ignored"] += received.pings_ignored

    def _check_peer_auth(self, auth: PeerAuth) -> None:
        try:
            transcript = peer_transcript(
                self.link.secret,
                auth.client_id,
                self.peers.identity.public_key,
                connection_binding(self.quic),
            )
        except ValueError:
            self.close(CLOSE_IDENTITY, "PeerAuth before the handshake")
            return
        if auth.client_id != self.link.peer_id or not verify_signature(
            auth.client_id, transcript, auth.signature
        ):
            log.warning(
                "peer %s: a connection from %s failed to prove the introduced key: refused",
                self.link.label,
                format_endpoint(self.endpoint),
            )
            self.close(CLOSE_IDENTITY, "identity mismatch")
            return
        self.set_peer_datagram_limit(min(MAX_DATAGRAM_PAYLOAD, auth.max_datagram_payload))
        self._authenticated(trio.current_time())

    def _authenticated(self, now: float) -> None:
        self.authenticated = True
        self.ready.set()
        log.info(
            "peer %s: direct connection at %s", self.link.label, format_endpoint(self.endpoint)
        )
        self.link.policy.connected(self.endpoint, now)
        self.peers.wake()

    def _packet_from_peer(self, packet: bytes) -> None:
        """A packet from the peer: only from its own tunnel addresses, only to ours."""
        self.bytes_in += len(packet)
        self.packets_in += 1
        header = ip_header_untrusted(packet)
        tun = self.peers.session.tun
        if header is None:
            self.drops["peer_malformed"] += 1
        elif header[1] not in self.link.addresses:
            self.drops["peer_spoofed_source"] += 1
        elif header[2] not in self.peers.session.own_addresses:
            self.drops["peer_not_ours"] += 1
        elif tun is not None:
            tun.queue(packet)  # the client's receive loop flushes after the batch

    def _failed(self, exc: Exception) -> None:
        log.info(
            "peer %s: direct connection failed (%s: %s)", self.link.label, type(exc).__name__, exc
        )
        self.peers.connection_ended(self, f"failed: {type(exc).__name__}")

    def close(self, code: int = CLOSE_OK, reason: str = "closed") -> None:
        """Close the connection; it ends once aioquic has sent the close."""
        if not self.driver.failed:
            self.quic.close(error_code=code, reason_phrase=reason)
            self.mark_touched()
        self.peers.connection_ended(self, reason)

    def status(self) -> dict[str, Any]:
        rtt = smoothed_rtt(self.quic)
        return {"rtt_ms": round(rtt * 1000, 3) if rtt is not None else None, **self.counters()}


class Peers:
    """Every introduced peer of one client session, and the demultiplexing of the session's
    socket between the server's connection, probes and direct connections."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.identity = session.services.identity
        self.drops = session.drops
        self.touched = session.touched
        self.family_v6 = session.endpoint.family == socket.AF_INET6
        self.links: dict[bytes, PeerLink] = {}
        self.routes: RouteTable[PeerLink] = RouteTable()  # tunnel address -> peer
        self.by_cid: dict[bytes, PeerConnection] = {}
        self._received: set[PeerConnection] = set()  # in this batch
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closing = False  # the session is ending: no new tasks

    # -- what the server tells us --------------------------------------------------------------

    def introduced(self, intro: PeerIntro) -> None:
        if intro.peer_id == self.identity.public_key:
            return
        now = trio.current_time()
        endpoints = tuple(
            e
            for e in order_candidates(
                None,
                intro.endpoints,
                own_tunnel_addresses=self._own_addresses(),
            )
            if (e[0].version == 6) == self.family_v6
        )
        link = self.links.get(intro.peer_id)
        if link is None:
            if len(self.links) >= MAX_PEERS:
                self.drops["peers_full"] += 1
                return
            link = PeerLink(intro, our_key=self.identity.public_key)
            self.links[intro.peer_id] = link
            self.routes.add(link, link.addresses)
            log.info(
                "peer %s (%s) introduced: trying %s",
                link.label,
                ", ".join(link.shown_addresses),
                ", ".join(format_endpoint(e) for e in endpoints) or "no endpoint",
            )
            link.policy.introduced(endpoints, now)
        else:
            link.policy.candidates_changed(endpoints, now)
        self.wake()

    def gone(self, peer_id: bytes) -> None:
        link = self.links.pop(peer_id, None)
        if link is None:
            return
        log.info("peer %s gone", link.label)
        self.routes.remove(link)
        if link.connection is not None:
            link.connection.close(CLOSE_OK, "peer gone")

    def network_changed(self) -> None:
        """Our socket or addresses changed: direct connections are likely dead, probe anew."""
        now = trio.current_time()
        for link in self.links.values():
            if link.connection is not None:
                link.connection.close(CLOSE_OK, "network changed")
            link.policy.candidates_changed(link.policy.candidates, now)
        self.wake()

    # -- the socket ----------------------------------------------------------------------------

    def receive(self, data: bytes, addr: Any, now: float) -> bool:
        """Take ``data`` if it is a probe or belongs to a direct connection; False: the
        server's connection's."""
        if not data:
            return False
        first = data[0]
        if not first & 0x40:
            if is_probe(data):
                self._probe(data, addr, now)
                return True
            return False
        if not first & 0x80:
            connection = self.by_cid.get(data[1:9])
        else:
            length = data[5] if len(data) > 5 else 0
            connection = self.by_cid.get(data[6 : 6 + length])
            if connection is None and first & 0x30 == 0:  # an Initial
                connection = self._accept(data, addr, now)
        if connection is None:
            return False
        connection.receive(data, addr, now)
        self._received.add(connection)
        return True

    def deliver_events(self) -> None:
        """After a batch: the direct connections that received hand out their events."""
        received, self._received = self._received, set()
        for connection in received:
            connection.driver.deliver_events()
            self.touched.add(connection)

    def _probe(self, data: bytes, addr: Any, now: float) -> None:
        probe = parse_probe_untrusted(data, self._secret_for)
        endpoint = socket_endpoint(addr)
        if probe is None or endpoint is None:
            self.drops["probe_invalid"] += 1
            return
        link = self.links[probe.sender]
        if isinstance(probe, DiscoPing):
            if not usable_candidate(endpoint[0], own_tunnel_addresses=self._own_addresses()):
                return
            if link.pong_budget.take(now):
                pong = DiscoPong(probe.txid, self.identity.public_key, endpoint)
                self.session.endpoint.send(encode_pong(pong, link.secret), addr)
            link.pinged_by(endpoint, now)
            link.policy.ping_received(endpoint, now)
        else:
            sent_to = link.sent_pings.pop(probe.txid, None)
            if sent_to != endpoint:
                return  # a replay, or an answer from somewhere we did not ask
            link.policy.pong_received(endpoint, now)
        self.wake()

    def _secret_for(self, sender: bytes) -> bytes | None:
        link = self.links.get(sender)
        return None if link is None else link.secret

    def _accept(self, data: bytes, addr: Any, now: float) -> PeerConnection | None:
        """An Initial from an endpoint of a peer we wait for: the responder's connection."""
        endpoint = socket_endpoint(addr)
        if endpoint is None or len(data) < 1200:
            return None
        for link in self.links.values():
            if (
                not link.initiator
                and link.connection is None
                and endpoint in link.policy.candidates
                and link.policy.state is not PathState.RELAY
                and link.recently_pinged_by(endpoint, now)
            ):
                original = bytes(data[6 : 6 + data[5]])
                quic = tune(
                    QuicConnection(
                        configuration=self._configuration(initiator=False),
                        original_destination_connection_id=original,
                    )
                )
                connection = self._start(link, quic, endpoint)
                self.cid_issued(connection, original)
                return connection
        return None

    def send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        self.session.endpoint.send_batch(datagrams)

    def send_probe(self, probe: bytes, addr: Any) -> bool:
        return self.session.endpoint.send_probe(probe, addr)

    # -- the TUN side --------------------------------------------------------------------------

    def send(self, packet: bytes) -> bool:
        """Send ``packet`` on a direct path if its destination is a peer's and that path is
        up; False: it goes through the server."""
        header = ip_header_untrusted(packet)
        if header is None:
            return False
        link = self.routes.owner_of(header[2])
        if link is None:
            return False
        connection = link.direct
        if connection is None:
            return False
        connection.send_packet(packet)
        link.policy.sent(trio.current_time())
        return True

    # -- connections ---------------------------------------------------------------------------

    def _configuration(self, *, initiator: bool) -> Any:
        return peer_configuration(self.identity, initiator=initiator)

    def _connect(self, link: PeerLink, endpoint: Endpoint, now: float) -> None:
        quic = tune(QuicConnection(configuration=self._configuration(initiator=True)))
        connection = self._start(link, quic, endpoint)
        quic.connect(connection.addr, now=now)
        connection.driver.transmit()

    def _start(self, link: PeerLink, quic: QuicConnection, endpoint: Endpoint) -> PeerConnection:
        connection = PeerConnection(self, link, quic, endpoint)
        link.connection = connection
        self.cid_issued(connection, quic.host_cid)
        assert self._nursery is not None
        self._nursery.start_soon(connection.run)
        return connection

    def cid_issued(self, connection: PeerConnection, cid: bytes) -> None:
        if not connection.ended:
            self.by_cid[cid] = connection
            connection.cids.add(cid)

    def cid_retired(self, connection: PeerConnection, cid: bytes) -> None:
        if self.by_cid.get(cid) is connection:
            del self.by_cid[cid]
        connection.cids.discard(cid)

    def connection_ended(self, connection: PeerConnection, reason: str) -> None:
        """``connection`` closed or failed: nothing routes to it, its link falls back."""
        if connection.ended:
            return
        connection.ended = True
        link = connection.link
        if link.connection is connection:
            link.connection = None
            was_direct = link.policy.is_direct
            link.policy.direct_failed(trio.current_time())
            if was_direct:
                log.info("peer %s: direct path lost (%s): through the server", link.label, reason)
        # The close still has to go out; the CIDs go once the peer's last packets are in.
        if self._nursery is not None and not self._closing:
            self._nursery.start_soon(self._forget_later, connection)
        else:
            connection.driver.transmit()
            connection.scope.cancel()
        self.wake()

    async def _forget_later(self, connection: PeerConnection) -> None:
        connection.driver.transmit()
        await trio.sleep(1.0)  # the peer's last retransmissions still find the connection
        for cid in list(connection.cids):
            self.cid_retired(connection, cid)
        connection.scope.cancel()

    # -- the loop ------------------------------------------------------------------------------

    def wake(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        """Act on every peer's policy when it asks, until the session ends."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                now = trio.current_time()
                wake = math.inf
                for link in list(self.links.values()):
                    self._act(link, link.policy.poll(now), now)
                    wake = min(wake, link.policy.wake_at())
                transmit_touched(self.touched)
                self._changed = trio.Event()
                if wake <= trio.current_time():
                    await trio.lowlevel.checkpoint()
                    continue
                with trio.move_on_at(wake):
                    await self._changed.wait()

    def _act(self, link: PeerLink, actions: Actions, now: float) -> None:
        if actions.close and link.connection is not None:
            link.connection.close(CLOSE_OK, "path failed")
        for endpoint in actions.ping:
            txid = secrets.token_bytes(TXID_SIZE)
            link.remember_ping(txid, endpoint)
            ping = DiscoPing(txid, self.identity.public_key)
            self.session.endpoint.send(
                encode_ping(ping, link.secret), socket_address(endpoint, self.family_v6)
            )
        if actions.connect is not None and link.connection is None:
            self._connect(link, actions.connect, now)
        if actions.switch_to is PathState.DIRECT:
            direct = link.policy.endpoint
            log.info(
                "peer %s: traffic takes the direct path to %s",
                link.label,
                format_endpoint(direct) if direct else "-",
            )
        elif actions.switch_to is PathState.RELAY:
            log.info("peer %s: traffic goes through the server", link.label)
        if actions.keepalive and link.connection is not None:
            link.connection.quic.send_ping(0)
            link.connection.mark_touched()

    def close(self) -> None:
        """Close every direct connection (the session ends)."""
        self._closing = True
        for link in list(self.links.values()):
            if link.connection is not None:
                link.connection.close(CLOSE_OK, "client shutting down")
        transmit_touched(self.touched)

    def _own_addresses(self) -> list[Any]:
        return [ipaddress.ip_address(a) for a in self.session.own_addresses]

    def candidates(self) -> Candidates:
        """Our endpoints to report to the server: this host's usable addresses of the
        socket's family, with the socket's port."""
        port = int(self.session.endpoint.local_address[1])
        own = self._own_addresses()
        endpoints: list[Endpoint] = []
        for address in self.session.services.local_addresses():
            if (address.version == 6) != self.family_v6:
                continue
            if usable_candidate(address, own_tunnel_addresses=own) and len(endpoints) < 8:
                endpoints.append((address, port))
        return Candidates(endpoints=tuple(endpoints))

    def status(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        out = []
        for link in self.links.values():
            policy = link.policy.status(now)
            connection = link.direct
            since = policy["since_heard"]
            out.append(
                {
                    "id": encode_public_id(link.peer_id),
                    "addresses": link.shown_addresses,
                    "path": policy["path"],
                    "endpoint": policy["endpoint"],
                    "rtt_ms": connection.status()["rtt_ms"] if connection else None,
                    "last_heard": round(float(since), 3) if isinstance(since, float) else None,
                    "upgrades": policy["upgrades"],
                    "fallbacks": policy["fallbacks"],
                }
            )
        return out
