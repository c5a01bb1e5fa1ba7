"""Minimal, fast inspection of raw IP packets for routing and anti-spoofing.

These functions run for every packet, at hundreds of thousands of packets per second, so they
break the usual style on purpose: no ``ipaddress`` objects, no classes, no exceptions for control
flow and no ``struct`` calls, just length checks, indexing, slicing and integer arithmetic on
``bytes``. Addresses come back as 4- or 16-byte ``bytes`` slices; compare them with other
``bytes`` (e.g. ``IPv4Address.packed``) computed once outside the hot path.

The ``*_untrusted`` functions accept any ``bytes`` and never raise: anything they cannot make
sense of gives ``None``. They check only what they need to read safely; they do not verify
checksums or options, which the receiving kernel does.

:func:`ip_header_untrusted` is the one place the shell (tunnel.daemon) reads an IP header's
version and addresses, for routing and anti-spoofing; :func:`clip_untrusted` is the one place it
checks a length field. The translators in this package (``nat64``, ``icmp``, ``fragments``) parse
the whole header themselves, as they must rewrite it.

``build_ipv4_udp``, ``build_ipv6_udp`` and ``internet_checksum`` make valid packets for tests and
the demo; they are not on the hot path.
"""

from __future__ import annotations

__all__ = [
    "addresses_untrusted",
    "build_ipv4_udp",
    "build_ipv6_udp",
    "clip_untrusted",
    "internet_checksum",
    "ip_header_untrusted",
    "ip_version",
    "is_link_local_source",
    "ones_complement_sum",
    "udp_destination_port_untrusted",
    "udp_ports_untrusted",
]

_IPV4_HEADER = 20
_IPV6_HEADER = 40
_UDP_HEADER = 8
_PROTO_UDP = 17


def ip_version(packet: bytes) -> int:
    """The IP version nibble of ``packet`` (4 or 6 for IP, anything else for garbage); 0 if
    ``packet`` is empty."""
    return packet[0] >> 4 if packet else 0


def clip_untrusted(packet: bytes) -> bytes | None:
    """The IPv4 or IPv6 packet at the start of ``packet``, without whatever follows it, or
    ``None`` if it is not one. IPv4 needs version 4, IHL >= 5 and a total length from the
    header's size up to the bytes at hand; IPv6 needs 40 bytes and a payload length that fits
    (jumbograms are refused). The same object comes back when nothing trails. Never raises."""
    n = len(packet)
    if n >= _IPV4_HEADER:
        first = packet[0]
        version = first >> 4
        if version == 4:
            total = (packet[2] << 8) | packet[3]
            if (first & 0x0F) < 5 or total < (first & 0x0F) * 4 or total > n:
                return None
        elif version == 6 and n >= _IPV6_HEADER:
            total = _IPV6_HEADER + ((packet[4] << 8) | packet[5])
            if total > n:
                return None
        else:
            return None
        return packet if total == n else packet[:total]
    return None


def ip_header_untrusted(packet: bytes) -> tuple[int, bytes, bytes] | None:
    """``(version, source, destination)`` of an IPv4 or IPv6 packet, the addresses as 4- or
    16-byte ``bytes``, or ``None``: the fixed header must be there whole (20 bytes for version
    4, 40 for version 6); nothing else about it is checked (see :func:`clip_untrusted` for the
    length fields). Never raises."""
    n = len(packet)
    if n >= _IPV4_HEADER:
        version = packet[0] >> 4
        if version == 4:
            return 4, packet[12:16], packet[16:20]
        if version == 6 and n >= _IPV6_HEADER:
            return 6, packet[8:24], packet[24:40]
    return None


def addresses_untrusted(packet: bytes) -> tuple[bytes, bytes] | None:
    """``(source, destination)`` of an IPv4 or IPv6 packet, as 4- or 16-byte ``bytes``.

    IPv4 needs at least 20 bytes, version 4, IHL >= 5 and a total length field no larger than
    the packet; IPv6 needs at least 40 bytes and version 6. Anything else gives ``None``. Never
    raises. (:func:`ip_header_untrusted`, with the IPv4 length fields checked too.)
    """
    header = ip_header_untrusted(packet)
    if header is None:
        return None
    version, source, destination = header
    if version == 4:
        first = packet[0]
        if (first & 0x0F) < 5 or ((packet[2] << 8) | packet[3]) > len(packet):
            return None
    return source, destination


def udp_ports_untrusted(packet: bytes) -> tuple[int, int] | None:
    """The UDP (source, destination) ports of ``packet``, or ``None``.

    IPv4: honours the IHL, reads within the total length and gives ``None`` for non-first
    fragments (they carry no UDP header). IPv6: only when the fixed header's next header is UDP
    (17); a UDP header behind extension headers gives ``None``. Never raises.
    """
    n = len(packet)
    if n < _IPV4_HEADER:
        return None
    first = packet[0]
    version = first >> 4
    if version == 4:
        header = (first & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if (
            header < _IPV4_HEADER
            or total > n
            or header + 4 > total
            or packet[9] != _PROTO_UDP
            or ((packet[6] & 0x1F) | packet[7])  # fragment offset != 0
        ):
            return None
        return (
            (packet[header] << 8) | packet[header + 1],
            (packet[header + 2] << 8) | packet[header + 3],
        )
    if version == 6:
        if n < _IPV6_HEADER + 4 or packet[6] != _PROTO_UDP:
            return None
        return (packet[40] << 8) | packet[41], (packet[42] << 8) | packet[43]
    return None


def udp_destination_port_untrusted(packet: bytes) -> int | None:
    """The UDP destination port of ``packet``, or ``None`` (see :func:`udp_ports_untrusted`)."""
    ports = udp_ports_untrusted(packet)
    return None if ports is None else ports[1]


def is_link_local_source(src: bytes) -> bool:
    """True if ``src`` is an IPv6 link-local address (fe80::/10). IPv4 addresses (4 bytes) are
    never treated as link-local here."""
    return len(src) == 16 and src[0] == 0xFE and (src[1] & 0xC0) == 0x80


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of ``data`` (big-endian words, an odd byte padded
    with zero) plus ``initial``, folded, not inverted: what a checksum field holds for a
    packet whose checksum is left to be completed (a pseudo-header sum)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # 65536 == 1 (mod 65535), so the big-endian integer of the data is congruent to the sum of
    # its 16-bit words, which is what one's complement addition computes.
    value = int.from_bytes(data, "big") + initial
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF  # one's complement sum of non-zero data is never +0
    return total


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 Internet checksum of ``data`` (padded with a zero byte if odd).

    Checksumming data that includes its own correct checksum gives 0.
    """
    return ~ones_complement_sum(data) & 0xFFFF


def _check_udp_args(sport: int, dport: int, payload: bytes, limit: int) -> None:
    for name, port in (("sport", sport), ("dport", dport)):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} {port} is not a port number")
    if len(payload) > limit:
        raise ValueError(f"UDP payload of {len(payload)} bytes does not fit (max {limit})")


def _udp(pseudo: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = _UDP_HEADER + len(payload)
    header = (
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\0\0"
    )
    checksum = internet_checksum(pseudo + header + payload)
    if checksum == 0:
        checksum = 0xFFFF  # 0 means "no checksum" in UDP (RFC 768)
    return header[:6] + checksum.to_bytes(2, "big") + payload


def build_ipv4_udp(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, ttl: int = 64
) -> bytes:
    """A valid IPv4/UDP packet (no options, not fragmented, header and UDP checksums set).

    Raises ``ValueError`` for addresses that are not 4 bytes, bad ports or TTL, or a payload
    that does not fit in 65535 bytes.
    """
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if not 0 <= ttl <= 255:
        raise ValueError(f"ttl {ttl} is out of range")
    _check_udp_args(sport, dport, payload, 0xFFFF - _IPV4_HEADER - _UDP_HEADER)
    src, dst, payload = bytes(src), bytes(dst), bytes(payload)
    udp_length = _UDP_HEADER + len(payload)
    pseudo = src + dst + bytes((0, _PROTO_UDP)) + udp_length.to_bytes(2, "big")
    udp = _udp(pseudo, sport, dport, payload)
    total = _IPV4_HEADER + udp_length
    header = (
        bytes((0x45, 0))
        + total.to_bytes(2, "big")
        + b"\x00\x00\x40\x00"  # identification 0, Don't Fragment
        + bytes((ttl, _PROTO_UDP))
        + b"\x00\x00"
        + src
        + dst
    )
    checksum = internet_checksum(header).to_bytes(2, "big")
    return header[:10] + checksum + header[12:] + udp


def build_ipv6_udp(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, hop_limit: int = 64
) -> bytes:
    """A valid IPv6/UDP packet (no extension headers, UDP checksum set).

    Raises ``ValueError`` for addresses that are not 16 bytes, bad ports or hop limit, or a
    payload that does not fit in a 65535-byte payload length.
    """
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if not 0 <= hop_limit <= 255:
        raise ValueError(f"hop_limit {hop_limit} is out of range")
    _check_udp_args(sport, dport, payload, 0xFFFF - _UDP_HEADER)
    src, dst, payload = bytes(src), bytes(dst), bytes(payload)
    udp_length = _UDP_HEADER + len(payload)
    pseudo = src + dst + udp_length.to_bytes(4, "big") + bytes((0, 0, 0, _PROTO_UDP))
    udp = _udp(pseudo, sport, dport, payload)
    header = (
        b"\x60\x00\x00\x00"  # version 6, traffic class 0, flow label 0
        + udp_length.to_bytes(2, "big")
        + bytes((_PROTO_UDP, hop_limit))
        + src
        + dst
    )
    return header + udp
