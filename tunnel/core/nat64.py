"""Stateful NAT64: IPv6 clients reach the IPv4 world through one IPv4 address (sans-IO).

Header translation follows SIIT (RFC 7915); state follows stateful NAT64 (RFC 6146) with NAPT:

- **Outbound** (client -> IPv4): an IPv6 packet whose destination lies in the /96 ``prefix``
  (RFC 6052: the IPv4 destination is the last 32 bits) becomes an IPv4 packet from
  ``source_ip``. TCP and UDP source ports and ICMP echo identifiers are replaced by a port from
  ``port_range``, allocated per (protocol, client address, client port or identifier):
  endpoint-independent mapping, reused while the mapping lives.
- **Inbound** (IPv4 -> client): a TCP/UDP packet to a mapped port, or an ICMPv4 echo reply to a
  mapped identifier, becomes the IPv6 packet to the client that owns the mapping, from the
  prefix-embedded IPv4 source. Filtering is endpoint-independent too: any IPv4 host may reach a
  live mapping (a table of remote endpoints per mapping would not be bounded by the port range).
- **ICMP errors**, which the reference system did not translate: an ICMPv4 destination
  unreachable, time exceeded or parameter problem about a packet we sent becomes the matching
  ICMPv6 error (RFC 7915 section 4.2) for the client, with the embedded packet translated back
  to the client's original IPv6 header (addresses, port or identifier, transport checksum
  adjusted), truncated as needed and never more than 1280 bytes; fragmentation needed becomes
  packet too big with the MTU raised by 20 (the larger IPv6 header), capped at ``mtu`` and never
  below 1280. ICMPv6 errors a client sends about a packet it received through us are translated
  to ICMPv4 the same way (section 5.2), at most 576 bytes. Errors never refresh a mapping.
- **Hop limits**: TTL = hop limit - 1 and the reverse. A packet that would leave with 0 is
  answered with the time exceeded error a router sends: ICMPv6 toward the client from
  ``prefix + source_ip`` (the translator's own address seen from the IPv6 side, which the client
  routes into the tunnel and which names this hop in traceroute), ICMPv4 toward the IPv4 sender
  from ``source_ip``. Errors we generate are rate limited by a token bucket (RFC 4443 2.4(f)).
- **Fragmentation**, per RFC 7915 section 5.1 rather than "always DF": a translated IPv4 packet
  of at most 1260 bytes leaves with DF clear and a fresh identification (so an IPv4 path with an
  MTU below 1280 can fragment what an IPv6 host will never make smaller), a larger one with DF
  set and identification 0 (path-MTU discovery then works through the ICMP error translation).
  An inbound packet whose IPv6 translation exceeds ``mtu`` is answered with fragmentation
  needed (next-hop MTU ``mtu`` - 20) when DF is set; without DF it is forwarded whole and the
  tunnel carries it as an oversized packet.
- **Fragments** (IPv6 with a fragment header right after the fixed header, IPv4 with MF or an
  offset) are reassembled (:mod:`tunnel.core.fragments`: strict about overlaps, bounded, 5 s)
  and the whole datagram is translated: the ports to map are only in the first fragment, and
  the checksums to adjust cover them all (RFC 6146 3.5 allows holding fragments). A datagram
  its IPv6 sender fragmented leaves with DF clear, so the kernel fragments it again for the
  IPv4 path; a reassembled IPv4 datagram had DF clear and is forwarded whole, like any other.
  An atomic fragment (offset 0, no more) is translated as it is.
- **Checksums**: TCP, UDP and ICMP echo checksums are adjusted incrementally (RFC 1624) for the
  new pseudo-header, port or identifier and type, so a corrupted segment stays detectably
  corrupted; an IPv4 UDP checksum of 0 is computed in full for IPv6, where it is mandatory.
  ICMP errors are rebuilt, so their incoming checksum is verified first.
- **Mappings** expire after ``tcp_timeout`` / ``udp_timeout`` / ``icmp_timeout`` without a
  packet in either direction. A TCP mapping that has seen a RST, or a FIN both ways, lives only
  ``tcp_closing_timeout`` more (60 s, Linux's TIME_WAIT); an outbound SYN reopens it. Each
  timeout class keeps its mappings in an ``OrderedDict`` in last-use order, so refreshing,
  expiring and finding the next expiry are O(1). Free ports live in a compact array and are
  drawn at random (RFC 6056), so ports are hard to guess from outside; expired ports go back.
- **Per client**, at most ``max_mappings_per_client`` mappings (all protocols together) per
  client IPv6 address, so one client cannot exhaust the port range for everybody; a new flow
  beyond that is dropped (``nat64_client_mappings``) while the client's existing flows go on.

Limitations (dropped with a reason and counted): IPv6 extension headers other than one fragment
header (``nat64_extension_header``), fragments that overlap, overflow, or find no room
(``nat64_fragment``), new flows beyond the port range (``nat64_ports_exhausted``) or the
client's share of it (``nat64_client_mappings``), IPv4 packets to ``source_ip`` that are not
a reply (``nat64_no_mapping``), hairpinning (a client reaching another client through
``prefix + source_ip``: ``nat64_hairpin``), ICMP types without a translation
(``nat64_unsupported``). Translation to private IPv4 destinations is allowed (the operator
chose the prefix); unspecified, loopback, multicast and reserved (240/4) addresses are not.

Per packet the code uses slicing, integer arithmetic and ``struct`` only: no ``ipaddress``
objects. :meth:`Nat64.outbound` and :meth:`Nat64.inbound` accept any bytes and never raise;
a bug costs one packet (``nat64_internal_error``), not the data path.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from array import array
from collections import Counter, OrderedDict

import attrs

from tunnel.core.fragments import Added, Reassembly, Whole
from tunnel.core.ippacket import internet_checksum
from tunnel.errors import ConfigError

__all__ = [
    "DROP_REASONS",
    "Nat64",
    "Translation",
]

DROP_MALFORMED = "nat64_malformed"
DROP_BAD_CHECKSUM = "nat64_bad_checksum"
DROP_WRONG_DESTINATION = "nat64_wrong_destination"
DROP_BAD_ADDRESS = "nat64_bad_address"
DROP_HAIRPIN = "nat64_hairpin"
DROP_UNSUPPORTED = "nat64_unsupported"
DROP_EXTENSION_HEADER = "nat64_extension_header"
DROP_FRAGMENT = "nat64_fragment"
DROP_HOP_LIMIT = "nat64_hop_limit"
DROP_TOO_BIG = "nat64_too_big"
DROP_NO_MAPPING = "nat64_no_mapping"
DROP_PORTS_EXHAUSTED = "nat64_ports_exhausted"
DROP_CLIENT_MAPPINGS = "nat64_client_mappings"
DROP_INTERNAL = "nat64_internal_error"

DROP_REASONS = (
    DROP_MALFORMED,
    DROP_BAD_CHECKSUM,
    DROP_WRONG_DESTINATION,
    DROP_BAD_ADDRESS,
    DROP_HAIRPIN,
    DROP_UNSUPPORTED,
    DROP_EXTENSION_HEADER,
    DROP_FRAGMENT,
    DROP_HOP_LIMIT,
    DROP_TOO_BIG,
    DROP_NO_MAPPING,
    DROP_PORTS_EXHAUSTED,
    DROP_CLIENT_MAPPINGS,
    DROP_INTERNAL,
)
"""Every ``Translation.drop`` value; :meth:`Nat64.stats` counts each."""

_ICMP4 = 1
_TCP = 6
_UDP = 17
_ICMP6 = 58
_IPV6_FRAGMENT = 44
# Hop-by-hop, routing, destination options, ESP, AH, mobility, HIP, shim6, experiments.
_IPV6_EXTENSIONS = frozenset((0, 43, 50, 51, 60, 135, 139, 140, 253, 254))

_TCP_FIN = 0x01
_TCP_SYN = 0x02
_TCP_RST = 0x04
_TCP_ACK = 0x10
_FIN_OUT = 1
_FIN_IN = 2
_RESET = 4

_IPV6_MIN_MTU = 1280
_ICMP4_ERROR_MAX = 576  # RFC 1812 4.3.2.3
_DF_THRESHOLD = 1260  # RFC 7915 5.1: larger translated IPv4 packets get DF
_ERROR_HOP_LIMIT = 64

# (type, code, the 4 bytes after the checksum) of a translated ICMP error.
_ErrorType = tuple[int, int, bytes]

_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")
_ZERO2 = bytes(2)
_ZERO4 = bytes(4)
_ZERO16 = bytes(16)

# RFC 1191 plateaus, for a fragmentation-needed error from a router that left the MTU at 0.
_PLATEAUS = (65535, 32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)

# RFC 7915 4.2: ICMPv4 destination unreachable code -> ICMPv6 destination unreachable code.
# Codes 2 (protocol) and 4 (fragmentation needed) become other types; 14 and unknown: drop.
_UNREACH_4_TO_6 = {
    0: 0, 1: 0, 3: 4, 5: 0, 6: 0, 7: 0, 8: 0, 9: 1, 10: 1, 11: 0, 12: 0, 13: 1, 15: 1,
}  # fmt: skip
# RFC 7915 figure 3: IPv4 header byte -> IPv6 header byte for parameter problem pointers.
_POINTER_4_TO_6 = {0: 0, 1: 1, 2: 4, 3: 4, 8: 7, 9: 6, 12: 8, 13: 8, 14: 8, 15: 8}
_POINTER_4_TO_6.update(dict.fromkeys(range(16, 20), 24))
# RFC 7915 5.2: ICMPv6 destination unreachable code -> ICMPv4 destination unreachable code.
_UNREACH_6_TO_4 = {0: 1, 1: 10, 2: 1, 3: 1, 4: 3}
# RFC 7915 figure 6: IPv6 header byte -> IPv4 header byte.
_POINTER_6_TO_4 = {0: 0, 1: 1, 4: 2, 5: 2, 6: 9, 7: 8}
_POINTER_6_TO_4.update(dict.fromkeys(range(8, 24), 12))
_POINTER_6_TO_4.update(dict.fromkeys(range(24, 40), 16))


@attrs.frozen
class Translation:
    """The outcome of translating one packet.

    ``packet`` is the translated packet to forward (IPv4 for :meth:`Nat64.outbound`, IPv6 for
    :meth:`Nat64.inbound`). ``reply`` is an ICMP error to send back toward the sender (ICMPv6
    to the client for outbound, ICMPv4 to the IPv4 host for inbound). ``drop`` names the
    reason (one of :data:`DROP_REASONS`) when nothing is forwarded; a reply may accompany it.
    """

    packet: bytes | None = None
    reply: bytes | None = None
    drop: str | None = None


_DROPS = {reason: Translation(drop=reason) for reason in DROP_REASONS}
_HELD = Translation()  # a fragment kept until its datagram is whole


def _sum(data: bytes) -> int:
    """The one's complement sum of the 16-bit words of even-length ``data``, modulo 0xFFFF
    (65536 == 1 mod 65535, so the big-endian integer is congruent to the sum of its words)."""
    return int.from_bytes(data, "big") % 0xFFFF


def _adjust(checksum: int, delta: int) -> int:
    """``checksum`` after the summed data changed by ``delta`` (RFC 1624, eqn. 3).

    A zero sum comes out as 0xFFFF, never 0, which is equivalent for TCP and ICMP and keeps
    a UDP checksum from turning into "no checksum".
    """
    return 0xFFFF - (0xFFFF - checksum + delta) % 0xFFFF


def _unfinished(added: Added) -> Translation:
    """What a fragment that did not complete its datagram comes to."""
    if added is Added.QUEUED or added is Added.DUPLICATE:
        return _HELD
    return _DROPS[DROP_FRAGMENT]  # invalid, or no room


def _df(total: int, reassembled: bool) -> bool:
    """RFC 7915 5.1: DF on a translated IPv4 packet larger than an IPv6 host would ever make
    smaller, unless the IPv6 sender fragmented it, which says the network may too."""
    return total > _DF_THRESHOLD and not reassembled


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _bad_ipv4(address: bytes) -> bool:
    """0/8, loopback, multicast, 240/4 and broadcast: never translated."""
    first = address[0]
    return first == 0 or first == 127 or first >= 224


@attrs.define(eq=False)
class _Queue:
    """Mappings sharing one idle timeout, in last-use order: the first expires first."""

    timeout: float
    entries: OrderedDict[int, _Mapping] = attrs.Factory(OrderedDict)


@attrs.define(eq=False)
class _Mapping:
    proto: int  # IPv4 protocol number: 6, 17 or 1
    client: bytes  # the client's IPv6 address
    client_port: int  # or ICMP identifier
    port: int  # on source_ip
    client_sum: int  # _sum(client)
    delta_out: int  # the TCP/UDP checksum change outbound (addresses and port); -delta_out in
    queue: _Queue
    expires: float
    tcp_state: int = 0  # _FIN_OUT | _FIN_IN | _RESET


class Nat64:
    """A stateful NAT64 translator for one IPv4 ``source_ip`` and one /96 ``prefix``.

    ``port_range`` is inclusive and shared by TCP ports, UDP ports and ICMP identifiers (each
    protocol has the whole range). ``mtu`` is the MTU toward the clients (the tunnel's).
    ``tcp_closing_timeout`` replaces ``tcp_timeout`` once a TCP mapping saw a RST or a FIN
    each way. ``icmp_error_rate`` bounds the ICMP errors we generate per second, in bursts of
    as many (0: none; translated errors are not limited). ``max_mappings_per_client`` caps the
    mappings of one client IPv6 address, all protocols together: the default of 1024 is well
    above what one host keeps open (a busy desktop holds a few hundred flows) and yet 1/32 of
    the default 32768-port range, so one runaway or hostile client cannot starve the others.
    ``rng`` draws ports and IPv4 identifications; tests pass a seeded one.

    Raises :class:`tunnel.errors.ConfigError` for a prefix that is not an IPv6 /96, a
    source_ip that is not a unicast IPv4 address, an empty or invalid port range, a timeout
    that is not positive, an mtu outside 1280-65535, a max_mappings_per_client below 1 or a
    negative icmp_error_rate.
    """

    def __init__(
        self,
        *,
        prefix: ipaddress.IPv6Network,
        source_ip: ipaddress.IPv4Address,
        port_range: tuple[int, int] = (32768, 65535),
        tcp_timeout: float = 300.0,
        udp_timeout: float = 30.0,
        icmp_timeout: float = 30.0,
        tcp_closing_timeout: float = 60.0,
        mtu: int = 1420,
        max_mappings_per_client: int = 1024,
        icmp_error_rate: float = 100.0,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(prefix, ipaddress.IPv6Network) or prefix.prefixlen != 96:
            raise ConfigError(f"nat64.prefix: {prefix} is not an IPv6 /96")
        if not isinstance(source_ip, ipaddress.IPv4Address) or _bad_ipv4(source_ip.packed):
            raise ConfigError(f"nat64.source_ip: {source_ip} is not a unicast IPv4 address")
        try:
            low, high = (int(port) for port in port_range)
        except (TypeError, ValueError):
            raise ConfigError(f"nat64.port_range: {port_range!r} is not two ports") from None
        if not 1 <= low <= high <= 0xFFFF:
            raise ConfigError(f"nat64.port_range: {low}-{high} is not a range of ports 1-65535")
        timeouts = {
            "tcp_timeout": tcp_timeout,
            "udp_timeout": udp_timeout,
            "icmp_timeout": icmp_timeout,
            "tcp_closing_timeout": tcp_closing_timeout,
        }
        for key, value in timeouts.items():
            if not value > 0:
                raise ConfigError(f"nat64.{key}: {value} must be positive")
        if not _IPV6_MIN_MTU <= mtu <= 0xFFFF:
            raise ConfigError(f"nat64: mtu {mtu} must be 1280-65535 for IPv6 clients")
        if type(max_mappings_per_client) is not int or max_mappings_per_client < 1:
            raise ConfigError(
                f"nat64.max_mappings_per_client: {max_mappings_per_client!r} must be an integer"
                " of at least 1"
            )
        if not icmp_error_rate >= 0:
            raise ConfigError(f"nat64: icmp_error_rate {icmp_error_rate} must not be negative")

        self._prefix12 = prefix.network_address.packed[:12]
        self._prefix_sum = _sum(self._prefix12)
        self._src4 = source_ip.packed
        self._src4_sum = _sum(self._src4)
        self._router6 = self._prefix12 + self._src4
        self._mtu = mtu
        self._rng = rng if rng is not None else random.Random()

        self._tcp = _Queue(float(tcp_timeout))
        self._tcp_closing = _Queue(float(min(tcp_timeout, tcp_closing_timeout)))
        self._udp = _Queue(float(udp_timeout))
        self._icmp = _Queue(float(icmp_timeout))
        self._queues = (self._tcp, self._tcp_closing, self._udp, self._icmp)
        self._proto_queues = {
            _TCP: (self._tcp, self._tcp_closing),
            _UDP: (self._udp,),
            _ICMP4: (self._icmp,),
        }
        self._proto_queue = {_TCP: self._tcp, _UDP: self._udp, _ICMP4: self._icmp}
        self._by_client: dict[int, dict[tuple[bytes, int], _Mapping]] = {
            proto: {} for proto in (_TCP, _UDP, _ICMP4)
        }
        self._by_port: dict[int, dict[int, _Mapping]] = {
            proto: {} for proto in (_TCP, _UDP, _ICMP4)
        }
        self._max_per_client = max_mappings_per_client
        # Mappings per client address, all protocols; a client with none has no key.
        self._per_client: Counter[bytes] = Counter()
        # 2 bytes a port: the free list of a full 64k range costs 128 KiB per protocol.
        self._free = {proto: array("H", range(low, high + 1)) for proto in (_TCP, _UDP, _ICMP4)}

        # Fragments wait here for the rest of their datagram: clients' IPv6, the world's IPv4.
        self._fragments6 = Reassembly()
        self._fragments4 = Reassembly()

        self._ident = self._rng.randrange(0x10000)
        self._error_rate = float(icmp_error_rate)
        self._error_burst = max(1.0, self._error_rate) if self._error_rate > 0 else 0.0
        self._error_tokens = self._error_burst
        self._error_time: float | None = None

        self._drops = dict.fromkeys(DROP_REASONS, 0)
        self._counters = dict.fromkeys(
            (
                "translated_out",
                "translated_in",
                "icmp_errors_sent",
                "icmp_errors_suppressed",
                "expired",
            ),
            0,
        )

    # --- public API ---------------------------------------------------------------------

    def outbound(self, packet: bytes, now: float) -> Translation:
        """Translate an IPv6 packet from a client (destination inside the prefix) to IPv4.

        Accepts any bytes-like object; never raises.
        """
        try:
            result = self._outbound(packet if type(packet) is bytes else bytes(packet), now)
        except Exception:  # a bug must cost one packet, not the server's data path
            result = _DROPS[DROP_INTERNAL]
        self._count(result, "translated_out")
        return result

    def inbound(self, packet: bytes, now: float) -> Translation:
        """Translate an IPv4 packet to ``source_ip`` (a reply from the IPv4 world) to IPv6.

        Accepts any bytes-like object; never raises.
        """
        try:
            result = self._inbound(packet if type(packet) is bytes else bytes(packet), now)
        except Exception:  # a bug must cost one packet, not the server's data path
            result = _DROPS[DROP_INTERNAL]
        self._count(result, "translated_in")
        return result

    def expire(self, now: float) -> int:
        """Drop every mapping idle past its timeout at ``now``; returns how many. Forgets the
        datagrams whose fragments stopped coming, too."""
        self._fragments6.expire(now)
        self._fragments4.expire(now)
        return sum(self._expire_queue(queue, now) for queue in self._queues)

    def next_expiry(self) -> float | None:
        """When the next mapping expires if nothing refreshes it, or an incomplete datagram is
        forgotten; None without either."""
        deadlines = [next(iter(q.entries.values())).expires for q in self._queues if q.entries]
        for fragments in (self._fragments6, self._fragments4):
            deadline = fragments.next_expiry()
            if deadline is not None:
                deadlines.append(deadline)
        return min(deadlines) if deadlines else None

    def stats(self) -> dict[str, int]:
        """Counters: ``mappings`` (live or not yet expired), ``tcp``, ``udp``, ``icmp``,
        ``translated_out``, ``translated_in``, ``icmp_errors_sent`` (errors we generated),
        ``icmp_errors_suppressed`` (by the rate limit), ``expired``, ``fragments_waiting``
        (datagrams with fragments held), ``fragments_reassembled_out`` and ``_in`` (datagrams
        made whole from fragments), ``fragments_expired`` (given up incomplete),
        and one counter per drop reason in :data:`DROP_REASONS`."""
        tcp = len(self._by_port[_TCP])
        udp = len(self._by_port[_UDP])
        icmp = len(self._by_port[_ICMP4])
        return {
            "mappings": tcp + udp + icmp,
            "tcp": tcp,
            "udp": udp,
            "icmp": icmp,
            "fragments_waiting": len(self._fragments6) + len(self._fragments4),
            "fragments_reassembled_out": self._fragments6.completed,
            "fragments_reassembled_in": self._fragments4.completed,
            "fragments_expired": self._fragments6.expired + self._fragments4.expired,
            **self._counters,
            **self._drops,
        }

    # --- bookkeeping --------------------------------------------------------------------

    def _count(self, result: Translation, translated: str) -> None:
        if result.drop is not None:
            self._drops[result.drop] += 1
        elif result.packet is not None:
            self._counters[translated] += 1
        if result.reply is not None:
            self._counters["icmp_errors_sent"] += 1

    def _expire_queue(self, queue: _Queue, now: float) -> int:
        entries = queue.entries
        count = 0
        while entries:
            mapping = next(iter(entries.values()))
            if mapping.expires > now:
                break
            self._remove(mapping)
            count += 1
        return count

    def _remove(self, mapping: _Mapping) -> None:
        del mapping.queue.entries[mapping.port]
        del self._by_port[mapping.proto][mapping.port]
        del self._by_client[mapping.proto][(mapping.client, mapping.client_port)]
        left = self._per_client[mapping.client] - 1
        if left:
            self._per_client[mapping.client] = left
        else:
            del self._per_client[mapping.client]  # so departed clients cost no memory
        self._free[mapping.proto].append(mapping.port)
        self._counters["expired"] += 1

    def _live(self, mapping: _Mapping | None, now: float) -> _Mapping | None:
        """``mapping`` unless it has expired (then it goes now, even if nobody called
        :meth:`expire` in time)."""
        if mapping is not None and mapping.expires <= now:
            self._remove(mapping)
            return None
        return mapping

    def _mapping_for_client(
        self, proto: int, client: bytes, client_port: int, now: float
    ) -> _Mapping | str:
        """The live mapping of (proto, client, client_port), created if needed; else the drop
        reason: the client is at its cap, or the port range is exhausted."""
        mapping = self._live(self._by_client[proto].get((client, client_port)), now)
        if mapping is not None:
            return mapping
        if self._per_client[client] >= self._max_per_client:
            # Some of them may be idle past their timeout with nobody having called expire();
            # collecting them is amortised O(1), each mapping goes once.
            for queue in self._queues:
                self._expire_queue(queue, now)
            if self._per_client[client] >= self._max_per_client:
                return DROP_CLIENT_MAPPINGS
        free = self._free[proto]
        if not free:
            for queue in self._proto_queues[proto]:
                self._expire_queue(queue, now)
            if not free:
                return DROP_PORTS_EXHAUSTED
        # Swap-remove a random element: O(1) and unpredictable.
        index = self._rng.randrange(len(free))
        port = free[index]
        free[index] = free[-1]
        free.pop()
        queue = self._proto_queue[proto]
        client_sum = _sum(client)
        delta_out = self._src4_sum - client_sum - self._prefix_sum + port - client_port
        mapping = _Mapping(
            proto, client, client_port, port, client_sum, delta_out, queue, now + queue.timeout
        )
        self._by_client[proto][(client, client_port)] = mapping
        self._by_port[proto][port] = mapping
        queue.entries[port] = mapping
        self._per_client[client] += 1
        return mapping

    def _touch(self, mapping: _Mapping, now: float, queue: _Queue | None = None) -> None:
        """Refresh ``mapping`` at ``now``, moving it to ``queue`` if given."""
        if queue is None or queue is mapping.queue:
            queue = mapping.queue
            queue.entries.move_to_end(mapping.port)
        else:
            del mapping.queue.entries[mapping.port]
            mapping.queue = queue
            queue.entries[mapping.port] = mapping
        mapping.expires = now + queue.timeout

    def _touch_tcp(self, mapping: _Mapping, flags: int, outbound: bool, now: float) -> None:
        state = mapping.tcp_state
        if flags & _TCP_RST:
            state |= _RESET
        elif outbound and flags & _TCP_SYN and not flags & _TCP_ACK:
            state = 0  # a new connection from the same client port
        elif flags & _TCP_FIN:
            state |= _FIN_OUT if outbound else _FIN_IN
        mapping.tcp_state = state
        closing = state & _RESET or state & (_FIN_OUT | _FIN_IN) == _FIN_OUT | _FIN_IN
        self._touch(mapping, now, self._tcp_closing if closing else self._tcp)

    def _allow_error(self, now: float) -> bool:
        """Take a token from the bucket of ICMP errors we may generate."""
        if self._error_time is not None:
            elapsed = max(0.0, now - self._error_time)
            self._error_tokens = min(
                self._error_burst, self._error_tokens + elapsed * self._error_rate
            )
        self._error_time = now
        if self._error_tokens >= 1.0:
            self._error_tokens -= 1.0
            return True
        self._counters["icmp_errors_suppressed"] += 1
        return False

    # --- packet builders ----------------------------------------------------------------

    def _ipv4_header(
        self, tos: int, total: int, ttl: int, proto: int, src: bytes, dst: bytes, df: bool
    ) -> bytes:
        if df:
            ident, flags = 0, 0x4000
        else:
            self._ident = ident = (self._ident + 1) & 0xFFFF
            flags = 0
        s = (0x4500 | tos) + total + ident + flags + ((ttl << 8) | proto) + _sum(src) + _sum(dst)
        return _IPV4_HEADER.pack(0x45, tos, total, ident, flags, ttl, proto, -s % 0xFFFF, src, dst)

    def _icmp4_error(self, dst: bytes, kind: int, code: int, rest: bytes, about: bytes) -> bytes:
        """An ICMPv4 error from source_ip to ``dst`` quoting ``about``, at most 576 bytes."""
        body = bytes((kind, code, 0, 0)) + rest + about[: _ICMP4_ERROR_MAX - 28]
        body = body[:2] + _u16(internet_checksum(body)) + body[4:]
        header = self._ipv4_header(
            0, 20 + len(body), _ERROR_HOP_LIMIT, _ICMP4, self._src4, dst, False
        )
        return header + body

    def _icmp6_packet(
        self, src: bytes, dst: bytes, kind: int, code: int, rest: bytes, about: bytes, *,
        hop_limit: int = _ERROR_HOP_LIMIT, traffic_class: int = 0,
    ) -> bytes:  # fmt: skip
        """An ICMPv6 error quoting ``about``, cut so the whole packet fits in 1280 bytes."""
        body = (bytes((kind, code, 0, 0)) + rest + about)[: _IPV6_MIN_MTU - 40]
        length = len(body)
        pseudo = src + dst + length.to_bytes(4, "big") + b"\x00\x00\x00\x3a"
        body = body[:2] + _u16(internet_checksum(pseudo + body)) + body[4:]
        first = 0x60000000 | (traffic_class << 20)
        return _IPV6_HEADER.pack(first, length, _ICMP6, hop_limit, src, dst) + body

    def _time_exceeded6(self, packet: bytes, now: float) -> Translation:
        if not self._allow_error(now):
            return _DROPS[DROP_HOP_LIMIT]
        reply = self._icmp6_packet(self._router6, packet[8:24], 3, 0, _ZERO4, packet)
        return Translation(reply=reply, drop=DROP_HOP_LIMIT)

    def _icmp4_reply(
        self, packet: bytes, kind: int, code: int, rest: bytes, drop: str, now: float
    ) -> Translation:
        if not self._allow_error(now):
            return _DROPS[drop]
        return Translation(
            reply=self._icmp4_error(packet[12:16], kind, code, rest, packet), drop=drop
        )

    # --- IPv6 -> IPv4 -------------------------------------------------------------------

    def _outbound(self, packet: bytes, now: float, reassembled: bool = False) -> Translation:
        n = len(packet)
        if n < 40 or packet[0] >> 4 != 6:
            return _DROPS[DROP_MALFORMED]
        plen = (packet[4] << 8) | packet[5]
        if plen == 0 or 40 + plen > n:  # 0 would be a jumbogram, which needs an extension header
            return _DROPS[DROP_MALFORMED]
        if 40 + plen < n:
            packet = packet[: 40 + plen]
        if packet[24:36] != self._prefix12:
            return _DROPS[DROP_WRONG_DESTINATION]
        src = packet[8:24]
        dst4 = packet[36:40]
        if src[0] == 0xFF or src == _ZERO16 or src[:12] == self._prefix12 or _bad_ipv4(dst4):
            return _DROPS[DROP_BAD_ADDRESS]
        if dst4 == self._src4:
            return _DROPS[DROP_HAIRPIN]
        nh = packet[6]
        if nh == _TCP or nh == _UDP:
            return self._outbound_transport(packet, nh, plen, src, dst4, now, reassembled)
        if nh == _ICMP6:
            if plen < 8:
                return _DROPS[DROP_MALFORMED]
            kind = packet[40]
            if kind == 128:
                return self._outbound_echo(packet, plen, src, dst4, now, reassembled)
            if 1 <= kind <= 4:
                return self._outbound_error(packet, plen, src, dst4, now)
            return _DROPS[DROP_UNSUPPORTED]
        if nh == _IPV6_FRAGMENT:
            if reassembled or plen < 8:  # a fragment header inside a fragmented datagram
                return _DROPS[DROP_FRAGMENT]
            return self._outbound_fragment(packet, plen, src, now)
        if nh in _IPV6_EXTENSIONS:
            return _DROPS[DROP_EXTENSION_HEADER]
        return _DROPS[DROP_UNSUPPORTED]

    def _outbound_fragment(self, packet: bytes, plen: int, src: bytes, now: float) -> Translation:
        """Keep a fragment until its datagram is whole, then translate the datagram."""
        field = (packet[42] << 8) | packet[43]
        offset, more = field & 0xFFF8, bool(field & 1)
        # The first fragment's fixed header, naming what the fragment header said follows.
        header = packet[:6] + packet[40:41] + packet[7:40]
        data = packet[48 : 40 + plen]
        if offset == 0 and not more:  # an atomic fragment (RFC 6946): whole as it is
            whole: Whole | Added = Whole(header, data)
        else:
            key = (src, packet[24:40], packet[44:48])
            whole = self._fragments6.add(key, offset, more, data, header, now, source=src)
        if not isinstance(whole, Whole):
            return _unfinished(whole)
        size = len(whole.payload)
        if size > 0xFFFF - 20:  # no room in an IPv4 packet
            return _DROPS[DROP_TOO_BIG]
        rebuilt = whole.header[:4] + _u16(size) + whole.header[6:] + whole.payload
        return self._outbound(rebuilt, now, reassembled=True)

    def _outbound_transport(
        self,
        packet: bytes,
        proto: int,
        plen: int,
        src: bytes,
        dst4: bytes,
        now: float,
        reassembled: bool,
    ) -> Translation:
        if proto == _TCP:
            if plen < 20 or not 20 <= (packet[52] >> 4) * 4 <= plen:
                return _DROPS[DROP_MALFORMED]
            at = 56  # checksum offset in the packet
        else:
            if plen < 8:
                return _DROPS[DROP_MALFORMED]
            length = (packet[44] << 8) | packet[45]
            if not 8 <= length <= plen:
                return _DROPS[DROP_MALFORMED]
            if length < plen:
                packet = packet[: 40 + length]
                plen = length
            at = 46
        hop = packet[7]
        if hop <= 1:
            return self._time_exceeded6(packet, now)
        mapping = self._mapping_for_client(proto, src, (packet[40] << 8) | packet[41], now)
        if isinstance(mapping, str):
            return _DROPS[mapping]
        if proto == _TCP:
            self._touch_tcp(mapping, packet[53], True, now)
        else:
            self._touch(mapping, now)
        checksum = (packet[at] << 8) | packet[at + 1]
        if checksum or proto == _TCP:  # UDP 0 = "no checksum", legal in IPv4
            checksum = _adjust(checksum, mapping.delta_out)
        tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
        total = 20 + plen
        header = self._ipv4_header(
            tos, total, hop - 1, proto, self._src4, dst4, _df(total, reassembled)
        )
        return Translation(
            packet=header + _u16(mapping.port) + packet[42:at] + _u16(checksum) + packet[at + 2 :]
        )

    def _outbound_echo(
        self, packet: bytes, plen: int, src: bytes, dst4: bytes, now: float, reassembled: bool
    ) -> Translation:
        hop = packet[7]
        if hop <= 1:
            return self._time_exceeded6(packet, now)
        ident = (packet[44] << 8) | packet[45]
        mapping = self._mapping_for_client(_ICMP4, src, ident, now)
        if isinstance(mapping, str):
            return _DROPS[mapping]
        self._touch(mapping, now)
        # Out of the sum: the ICMPv6 pseudo-header and type 128; in: type 8, the new identifier.
        delta = (
            -mapping.client_sum
            - self._prefix_sum
            - _sum(dst4)
            - plen
            - _ICMP6
            + ((8 - 128) << 8)
            + mapping.port
            - ident
        )
        checksum = _adjust((packet[42] << 8) | packet[43], delta)
        total = 20 + plen
        header = self._ipv4_header(
            ((packet[0] & 0x0F) << 4) | (packet[1] >> 4),
            total, hop - 1, _ICMP4, self._src4, dst4, _df(total, reassembled),
        )  # fmt: skip
        return Translation(
            packet=header
            + bytes((8, packet[41]))
            + _u16(checksum)
            + _u16(mapping.port)
            + packet[46:]
        )

    def _outbound_error(
        self, packet: bytes, plen: int, src: bytes, dst4: bytes, now: float
    ) -> Translation:
        """An ICMPv6 error from a client about a packet it received through us."""
        icmp = packet[40:]
        pseudo = src + packet[24:40] + plen.to_bytes(4, "big") + b"\x00\x00\x00\x3a"
        if internet_checksum(pseudo + icmp) != 0:
            return _DROPS[DROP_BAD_CHECKSUM]
        inner = icmp[8:]
        if len(inner) < 48 or inner[0] >> 4 != 6:
            return _DROPS[DROP_MALFORMED]
        # It must quote a packet we delivered to this very client from a translated address.
        if inner[24:40] != src or inner[8:20] != self._prefix12:
            return _DROPS[DROP_NO_MAPPING]
        inner_nh = inner[6]
        if inner_nh == _TCP or inner_nh == _UDP:
            proto, client_port = inner_nh, (inner[42] << 8) | inner[43]
        elif inner_nh == _ICMP6:
            if inner[40] != 129:
                return _DROPS[DROP_UNSUPPORTED]
            proto, client_port = _ICMP4, (inner[44] << 8) | inner[45]
        elif inner_nh == _IPV6_FRAGMENT:
            return _DROPS[DROP_FRAGMENT]
        elif inner_nh in _IPV6_EXTENSIONS:
            return _DROPS[DROP_EXTENSION_HEADER]
        else:
            return _DROPS[DROP_UNSUPPORTED]
        mapping = self._live(self._by_client[proto].get((src, client_port)), now)
        if mapping is None:
            return _DROPS[DROP_NO_MAPPING]
        translated = self._error_type_6_to_4(icmp[0], icmp[1], icmp[4:8])
        if translated is None:
            return _DROPS[DROP_UNSUPPORTED]
        hop = packet[7]
        if hop <= 1:
            return _DROPS[DROP_HOP_LIMIT]  # no error about an error
        kind, code, rest = translated
        body = bytes((kind, code, 0, 0)) + rest + self._inner_6_to_4(inner, proto, mapping)
        body = body[: _ICMP4_ERROR_MAX - 20]
        body = body[:2] + _u16(internet_checksum(body)) + body[4:]
        header = self._ipv4_header(
            ((packet[0] & 0x0F) << 4) | (packet[1] >> 4),
            20 + len(body), hop - 1, _ICMP4, self._src4, dst4, False,
        )  # fmt: skip
        return Translation(packet=header + body)

    def _error_type_6_to_4(self, kind: int, code: int, rest: bytes) -> _ErrorType | None:
        """RFC 7915 5.2: (type, code, rest of header) of the ICMPv4 error, or None."""
        if kind == 1:
            code4 = _UNREACH_6_TO_4.get(code)
            return None if code4 is None else (3, code4, _ZERO4)
        if kind == 2:
            mtu6 = int.from_bytes(rest, "big")
            mtu4 = max(68, min(mtu6 - 20, self._mtu - 20))
            return 3, 4, b"\x00\x00" + _u16(mtu4)
        if kind == 3:
            return (11, code, _ZERO4) if code <= 1 else None
        if kind == 4:
            if code == 1:
                return 3, 2, _ZERO4  # unrecognized next header -> protocol unreachable
            if code == 0:
                pointer = _POINTER_6_TO_4.get(int.from_bytes(rest, "big"))
                return None if pointer is None else (12, 0, bytes((pointer, 0, 0, 0)))
        return None

    def _inner_6_to_4(self, inner: bytes, proto: int, mapping: _Mapping) -> bytes:
        """The quoted IPv6 packet (a reply we delivered) as the IPv4 packet it came from."""
        iplen = (inner[4] << 8) | inner[5]
        remote4 = inner[20:24]
        header = _IPV4_HEADER.pack(
            0x45, ((inner[0] & 0x0F) << 4) | (inner[1] >> 4), min(0xFFFF, 20 + iplen), 0, 0,
            inner[7], proto, 0, remote4, self._src4,
        )  # fmt: skip
        header = header[:10] + _u16(internet_checksum(header)) + header[12:]
        transport = inner[40:]
        if proto == _ICMP4:
            delta = (
                -(self._prefix_sum + _sum(remote4) + mapping.client_sum + iplen + _ICMP6)
                + ((0 - 129) << 8)
                + mapping.port
                - mapping.client_port
            )
            checksum = _adjust((transport[2] << 8) | transport[3], delta)
            transport = (
                b"\x00" + transport[1:2] + _u16(checksum) + _u16(mapping.port) + transport[6:]
            )
        else:
            transport = transport[:2] + _u16(mapping.port) + transport[4:]
            at = 16 if proto == _TCP else 6
            if len(transport) >= at + 2:
                checksum = (transport[at] << 8) | transport[at + 1]
                if checksum or proto == _TCP:
                    checksum = _adjust(checksum, mapping.delta_out)
                    transport = transport[:at] + _u16(checksum) + transport[at + 2 :]
            elif len(transport) == at + 1:
                # Half a checksum: its new high byte depends on the missing low byte.
                transport = transport[:at]
        return header + transport

    # --- IPv4 -> IPv6 -------------------------------------------------------------------

    def _inbound(self, packet: bytes, now: float) -> Translation:
        n = len(packet)
        if n < 20 or packet[0] >> 4 != 4:
            return _DROPS[DROP_MALFORMED]
        ihl = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if ihl < 20 or total < ihl or total > n:
            return _DROPS[DROP_MALFORMED]
        if total < n:
            packet = packet[:total]
        if internet_checksum(packet[:ihl]) != 0:
            return _DROPS[DROP_BAD_CHECKSUM]
        if packet[16:20] != self._src4:
            return _DROPS[DROP_WRONG_DESTINATION]
        src4 = packet[12:16]
        if _bad_ipv4(src4) or src4 == self._src4:
            return _DROPS[DROP_BAD_ADDRESS]
        field = (packet[6] << 8) | packet[7]
        if field & 0x3FFF:  # MF or a fragment offset
            return self._inbound_fragment(packet, ihl, total, field, now)
        proto = packet[9]
        plen = total - ihl
        if proto == _TCP or proto == _UDP:
            return self._inbound_transport(packet, proto, ihl, plen, now)
        if proto == _ICMP4:
            if plen < 8:
                return _DROPS[DROP_MALFORMED]
            kind = packet[ihl]
            if kind == 0:
                return self._inbound_echo_reply(packet, ihl, plen, now)
            if kind == 3 or kind == 11 or kind == 12:
                return self._inbound_error(packet, ihl, now)
        return _DROPS[DROP_UNSUPPORTED]

    def _inbound_fragment(
        self, packet: bytes, ihl: int, total: int, field: int, now: float
    ) -> Translation:
        """Keep a fragment until its datagram is whole, then translate the datagram (which,
        fragmented, had DF clear: it is forwarded whole, however large)."""
        key = (packet[12:16], packet[9], packet[4:6])
        offset, more = (field & 0x1FFF) * 8, bool(field & 0x2000)
        whole = self._fragments4.add(
            key, offset, more, packet[ihl:total], packet[:ihl], now, source=packet[12:16]
        )
        if not isinstance(whole, Whole):
            return _unfinished(whole)
        first = whole.header  # with every option the first fragment carried
        total = len(first) + len(whole.payload)
        if total > 0xFFFF:
            return _DROPS[DROP_TOO_BIG]
        # Length, no flags or offset, and a zero checksum while computing it.
        header = first[:2] + _u16(total) + first[4:6] + _ZERO2 + first[8:10] + _ZERO2 + first[12:]
        header = header[:10] + _u16(internet_checksum(header)) + header[12:]
        return self._inbound(header + whole.payload, now)

    def _inbound_checks(self, packet: bytes, plen: int, now: float) -> Translation | None:
        """TTL and size checks of a packet with a live mapping: a Translation if it stops."""
        if packet[8] <= 1:
            return self._icmp4_reply(packet, 11, 0, _ZERO4, DROP_HOP_LIMIT, now)
        if 40 + plen > self._mtu and packet[6] & 0x40:
            rest = b"\x00\x00" + _u16(self._mtu - 20)
            return self._icmp4_reply(packet, 3, 4, rest, DROP_TOO_BIG, now)
        return None

    def _ipv6_header(self, packet: bytes, plen: int, nh: int, client: bytes) -> bytes:
        return _IPV6_HEADER.pack(
            0x60000000 | (packet[1] << 20), plen, nh, packet[8] - 1,
            self._prefix12 + packet[12:16], client,
        )  # fmt: skip

    def _inbound_transport(
        self, packet: bytes, proto: int, ihl: int, plen: int, now: float
    ) -> Translation:
        if proto == _TCP:
            if plen < 20 or not 20 <= (packet[ihl + 12] >> 4) * 4 <= plen:
                return _DROPS[DROP_MALFORMED]
            at = ihl + 16
        else:
            if plen < 8:
                return _DROPS[DROP_MALFORMED]
            length = (packet[ihl + 4] << 8) | packet[ihl + 5]
            if not 8 <= length <= plen:
                return _DROPS[DROP_MALFORMED]
            if length < plen:
                packet = packet[: ihl + length]
                plen = length
            at = ihl + 6
        port = (packet[ihl + 2] << 8) | packet[ihl + 3]
        mapping = self._live(self._by_port[proto].get(port), now)
        if mapping is None:
            return _DROPS[DROP_NO_MAPPING]
        stop = self._inbound_checks(packet, plen, now)
        if stop is not None:
            return stop
        if proto == _TCP:
            self._touch_tcp(mapping, packet[ihl + 13], False, now)
        else:
            self._touch(mapping, now)
        header = self._ipv6_header(packet, plen, proto, mapping.client)
        checksum = (packet[at] << 8) | packet[at + 1]
        if checksum or proto == _TCP:
            checksum = _adjust(checksum, -mapping.delta_out)
            segment = (
                packet[ihl : ihl + 2]
                + _u16(mapping.client_port)
                + packet[ihl + 4 : at]
                + _u16(checksum)
                + packet[at + 2 :]
            )
        else:  # IPv4 UDP without checksum: IPv6 requires one, computed in full
            segment = packet[ihl : ihl + 2] + _u16(mapping.client_port) + packet[ihl + 4 : at]
            segment += b"\x00\x00" + packet[at + 2 :]
            pseudo = header[8:40] + plen.to_bytes(4, "big") + b"\x00\x00\x00\x11"
            checksum = internet_checksum(pseudo + segment) or 0xFFFF
            segment = segment[:6] + _u16(checksum) + segment[8:]
        return Translation(packet=header + segment)

    def _inbound_echo_reply(self, packet: bytes, ihl: int, plen: int, now: float) -> Translation:
        ident = (packet[ihl + 4] << 8) | packet[ihl + 5]
        mapping = self._live(self._by_port[_ICMP4].get(ident), now)
        if mapping is None:
            return _DROPS[DROP_NO_MAPPING]
        stop = self._inbound_checks(packet, plen, now)
        if stop is not None:
            return stop
        self._touch(mapping, now)
        delta = (
            self._prefix_sum
            + _sum(packet[12:16])
            + mapping.client_sum
            + plen
            + _ICMP6
            + (129 << 8)
            + mapping.client_port
            - ident
        )
        checksum = _adjust((packet[ihl + 2] << 8) | packet[ihl + 3], delta)
        header = self._ipv6_header(packet, plen, _ICMP6, mapping.client)
        return Translation(
            packet=header
            + bytes((129, packet[ihl + 1]))
            + _u16(checksum)
            + _u16(mapping.client_port)
            + packet[ihl + 6 :]
        )

    def _inbound_error(self, packet: bytes, ihl: int, now: float) -> Translation:
        """An ICMPv4 error about a packet we sent: to the client that owns the mapping."""
        icmp = packet[ihl:]
        if internet_checksum(icmp) != 0:
            return _DROPS[DROP_BAD_CHECKSUM]
        inner = icmp[8:]
        if len(inner) < 20 or inner[0] >> 4 != 4:
            return _DROPS[DROP_MALFORMED]
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner_ihl < 20 or len(inner) < inner_ihl + 8:  # RFC 792 quotes 8 bytes at least
            return _DROPS[DROP_MALFORMED]
        if inner[12:16] != self._src4:
            return _DROPS[DROP_NO_MAPPING]
        if (inner[6] & 0x1F) | inner[7]:  # a non-first fragment quotes no ports
            return _DROPS[DROP_FRAGMENT]
        proto = inner[9]
        transport = inner[inner_ihl:]
        if proto == _TCP or proto == _UDP:
            port = (transport[0] << 8) | transport[1]
        elif proto == _ICMP4:
            if transport[0] != 8:
                return _DROPS[DROP_UNSUPPORTED]
            port = (transport[4] << 8) | transport[5]
        else:
            return _DROPS[DROP_UNSUPPORTED]
        mapping = self._live(self._by_port[proto].get(port), now)
        if mapping is None:
            return _DROPS[DROP_NO_MAPPING]
        translated = self._error_type_4_to_6(icmp[0], icmp[1], icmp[4:8], inner)
        if translated is None:
            return _DROPS[DROP_UNSUPPORTED]
        if packet[8] <= 1:
            return _DROPS[DROP_HOP_LIMIT]  # no error about an error
        kind, code, rest = translated
        about = self._inner_4_to_6(inner, inner_ihl, proto, transport, mapping)
        return Translation(
            packet=self._icmp6_packet(
                self._prefix12 + packet[12:16],
                mapping.client,
                kind,
                code,
                rest,
                about,
                hop_limit=packet[8] - 1,
                traffic_class=packet[1],
            )  # fmt: skip
        )

    def _error_type_4_to_6(
        self, kind: int, code: int, rest: bytes, inner: bytes
    ) -> _ErrorType | None:
        """RFC 7915 4.2: (type, code, rest of header) of the ICMPv6 error, or None."""
        if kind == 3:
            if code == 4:
                mtu = (rest[2] << 8) | rest[3]
                if mtu < 68:  # a pre-RFC 1191 router: guess from the quoted length
                    length = (inner[2] << 8) | inner[3]
                    mtu = next((p for p in _PLATEAUS if p < length), 68)
                mtu6 = max(_IPV6_MIN_MTU, min(mtu + 20, self._mtu))
                return 2, 0, mtu6.to_bytes(4, "big")
            if code == 2:
                return 4, 1, b"\x00\x00\x00\x06"  # pointer to the next header field
            code6 = _UNREACH_4_TO_6.get(code)
            return None if code6 is None else (1, code6, _ZERO4)
        if kind == 11:
            return (3, code, _ZERO4) if code <= 1 else None
        if kind == 12 and code in (0, 2):
            pointer = _POINTER_4_TO_6.get(rest[0])
            return None if pointer is None else (4, 0, pointer.to_bytes(4, "big"))
        return None

    def _inner_4_to_6(
        self, inner: bytes, inner_ihl: int, proto: int, transport: bytes, mapping: _Mapping
    ) -> bytes:
        """The quoted IPv4 packet (one we sent) as the client's original IPv6 packet."""
        iplen = max(0, ((inner[2] << 8) | inner[3]) - inner_ihl)
        remote4 = inner[16:20]
        header = _IPV6_HEADER.pack(
            0x60000000 | (inner[1] << 20), iplen, _ICMP6 if proto == _ICMP4 else proto,
            inner[8], mapping.client, self._prefix12 + remote4,
        )  # fmt: skip
        if proto == _ICMP4:
            delta = (
                mapping.client_sum
                + self._prefix_sum
                + _sum(remote4)
                + iplen
                + _ICMP6
                + ((128 - 8) << 8)
                + mapping.client_port
                - mapping.port
            )
            checksum = _adjust((transport[2] << 8) | transport[3], delta)
            transport = (
                b"\x80"
                + transport[1:2]
                + _u16(checksum)
                + _u16(mapping.client_port)
                + transport[6:]
            )
        else:
            transport = _u16(mapping.client_port) + transport[2:]
            at = 16 if proto == _TCP else 6
            if len(transport) >= at + 2:
                checksum = (transport[at] << 8) | transport[at + 1]
                if checksum or proto == _TCP:
                    checksum = _adjust(checksum, -mapping.delta_out)
                    transport = transport[:at] + _u16(checksum) + transport[at + 2 :]
            elif len(transport) == at + 1:
                # Half a checksum: its new high byte depends on the missing low byte.
                transport = transport[:at]
        return header + transport
