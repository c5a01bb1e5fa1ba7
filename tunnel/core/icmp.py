"""ICMP "packet too big" for inner packets that no longer fit the path.

When the path between client and server shrinks (PPPoE, a mobile link, a tunnel in a
tunnel), a full-size inner packet no longer fits one QUIC datagram. Carrying it framed on the
control stream works but is reliable and ordered, which costs a bulk transfer dearly; telling
the inner sender the size that fits lets its own path MTU discovery adapt once, as a router on
the path would (RFC 9484 section 10.1 does the same for CONNECT-IP):

* IPv4 with DF set: ICMP type 3 code 4 "fragmentation needed", with the next-hop MTU
  (RFC 1191). Without DF the sender allows fragmentation: no error, the caller carries it.
* IPv6: ICMPv6 type 2 "Packet Too Big" (RFC 8201), never with an MTU below 1280 (RFC 8200:
  every IPv6 link carries 1280); a packet of at most 1280 bytes that does not fit is the
  caller's to carry.

The error comes from the given tunnel address, as from a router on the path, except to a
sender that holds that address itself (the server host's own traffic into the tunnel): a
kernel drops a packet that arrives with one of its own addresses as the source (a "martian"),
so that error comes from the packet's destination instead, which the kernel accepts.

Never an error about an ICMP error, about a non-first IPv4 fragment, or to a source that is
unspecified, multicast or broadcast (RFC 1122 3.2.2, RFC 4443 2.4). Rate limiting is the
caller's (one bucket per session). Pure, like :mod:`tunnel.core.ippacket`.
"""

from __future__ import annotations

from tunnel.core.ippacket import internet_checksum

__all__ = ["IPV4_QUOTE_LIMIT", "IPV6_MIN_MTU", "packet_too_big_untrusted"]

IPV6_MIN_MTU = 1280
# An ICMPv4 error stays within 576 bytes (RFC 1812 4.3.2.3); an ICMPv6 one within 1280.
IPV4_QUOTE_LIMIT = 576
_ICMP4 = 1
_ICMP6 = 58
_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
_TTL = 64


def packet_too_big_untrusted(
    packet: bytes, mtu: int, source4: bytes | None, source6: bytes | None
) -> bytes | None:
    """The ICMP error telling ``packet``'s sender that ``mtu`` is the largest packet that
    fits, sent from ``source4`` (IPv4, 4 bytes) or ``source6`` (IPv6, 16 bytes); ``None``
    when no error may or need be sent (see the module docstring). Never raises."""
    n = len(packet)
    if n >= 20 and packet[0] >> 4 == 4:
        return _too_big4(packet, mtu, source4)
    if n >= 40 and packet[0] >> 4 == 6:
        return _too_big6(packet, mtu, source6)
    return None


def _too_big4(packet: bytes, mtu: int, source: bytes | None) -> bytes | None:
    ihl = (packet[0] & 0x0F) * 4
    flags_offset = (packet[6] << 8) | packet[7]
    sender = packet[12:16]
    if source == sender:
        source = packet[16:20]
    if (
        source is None
        or ihl < 20
        or len(packet) < ihl
        or not flags_offset & 0x4000  # DF clear: fragmenting is allowed
        or flags_offset & 0x1FFF  # not the first fragment
        or len(packet) <= mtu
        or not 68 <= mtu <= 0xFFFF
        or sender[0] == 0
        or sender[0] >= 224  # multicast, reserved, broadcast
        or (packet[9] == _ICMP4 and len(packet) > ihl and packet[ihl] in _ICMP4_ERRORS)
    ):
        return None
    quote = packet[: IPV4_QUOTE_LIMIT - 28]
    icmp = bytearray(b"\x03\x04\x00\x00\x00\x00" + mtu.to_bytes(2, "big") + quote)
    icmp[2:4] = internet_checksum(bytes(icmp)).to_bytes(2, "big")
    total = 20 + len(icmp)
    header = bytearray(
        b"\x45\x00"
        + total.to_bytes(2, "big")
        + b"\x00\x00\x00\x00"
        + bytes((_TTL, _ICMP4))
        + b"\x00\x00"
        + source
        + sender
    )
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + bytes(icmp)


def _too_big6(packet: bytes, mtu: int, source: bytes | None) -> bytes | None:
    sender = packet[8:24]
    if source == sender:
        source = packet[24:40]
    if (
        source is None
        or len(packet) <= max(mtu, IPV6_MIN_MTU)
        or mtu > 0xFFFFFFFF
        or sender == bytes(16)
        or sender[0] == 0xFF  # multicast
        or (packet[6] == _ICMP6 and len(packet) > 40 and packet[40] < 128)  # an error
    ):
        return None
    mtu = max(mtu, IPV6_MIN_MTU)
    quote = packet[: IPV6_MIN_MTU - 48]
    length = 8 + len(quote)
    icmp = bytearray(b"\x02\x00\x00\x00" + mtu.to_bytes(4, "big") + quote)
    pseudo = source + sender + length.to_bytes(4, "big") + b"\x00\x00\x00" + bytes((_ICMP6,))
    icmp[2:4] = internet_checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    header = b"\x60\x00\x00\x00" + length.to_bytes(2, "big") + bytes((_ICMP6, _TTL))
    return header + source + sender + bytes(icmp)
