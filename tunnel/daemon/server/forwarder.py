"""Packets between the sessions and the TUN device: the server's forwarding plane.

From a client: clipped to its IP length, checked against the route table (its source must be
one of the client's own addresses), then delivered to another client, to the NAT64 translator
or to the TUN device. From the TUN device: to the session holding the destination, or to the
translator's IPv4 side. The route table is exact-match (a lease is a few host addresses); the
NAT64 prefix stays a comparison of 12 bytes, taken only when that lookup missed, and the
client-to-client switch a property of the sender's packet, not of any address.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

import trio

from tunnel.core.ippacket import clip_untrusted, ip_header_untrusted, udp_ports_untrusted
from tunnel.core.nat64 import Nat64
from tunnel.core.routing import RouteTable
from tunnel.daemon.server.introducer import Introducer
from tunnel.daemon.session import Channel, Drops, transmit_touched

if TYPE_CHECKING:
    from tunnel.daemon.server.session import ServerSession

UDP = 17
TUN_BATCH = 64


class Forwarder:
    """Routes packets by the session table's routes; counts what it drops and why."""

    def __init__(
        self,
        tun: Any,
        routes: RouteTable[ServerSession],
        touched: set[Channel],
        introducer: Introducer,
        *,
        client_to_client: bool,
        listen_port: int,
        nat64: Nat64 | None = None,
        nat64_source: bytes = b"",
        nat64_prefix: bytes = b"",
    ) -> None:
        self.tun = tun
        self.routes = routes
        self.touched = touched
        self.introducer = introducer
        self.client_to_client = client_to_client
        self.listen_port = listen_port
        self.nat64 = nat64
        self.nat64_source = nat64_source  # packed IPv4, b"" without NAT64
        self.nat64_prefix = nat64_prefix  # the /96's first 12 bytes, b"" without NAT64
        self.drops = Drops()

    def from_client(self, session: ServerSession, packet: bytes) -> None:
        """Hot path: a packet arrived from ``session``'s client. The caller flushes the
        sessions and the TUN device."""
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
            if not self.client_to_client:
                self.drops["client_to_client"] += 1
                return
            peer.send_packet(packet)
            if not self.introducer.introduced(session, peer):
                self.introducer.relayed(session, peer)  # they may reach each other directly
            return
        if version == 6 and dst[:12] == self.nat64_prefix:
            self._nat64_outbound(session, packet)
            return
        self.tun.queue(packet)

    def _nat64_outbound(self, session: ServerSession, packet: bytes) -> None:
        assert self.nat64 is not None
        result = self.nat64.outbound(packet, trio.current_time())
        if result.packet is not None:
            self.tun.queue(result.packet)
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
        """Forever: what the TUN device holds, to the sessions, sent at once."""
        tun = self.tun
        while True:
            await tun.wait_readable()
            self.forward_from_tun()
            transmit_touched(self.touched)

    def forward_from_tun(self) -> None:
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
        return ports is not None and ports[0] == self.listen_port

    async def nat64_reaper(self) -> None:
        """Expire idle NAT64 mappings (each lookup also ignores expired ones; this frees them)."""
        assert self.nat64 is not None
        while True:
            expiry = self.nat64.next_expiry()
            await trio.sleep_until(trio.current_time() + 1.0 if expiry is None else expiry)
            self.nat64.expire(trio.current_time())

    def nat64_status(self, prefix: str) -> dict[str, Any] | None:
        if self.nat64 is None:
            return None
        stats = {k: v for k, v in self.nat64.stats().items() if v or not k.startswith("nat64_")}
        return {
            "prefix": prefix,
            "source_ip": str(ipaddress.IPv4Address(self.nat64_source)),
            **stats,
        }
