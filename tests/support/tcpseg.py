"""TCP segments with correct checksums, as a sender's kernel makes them, for the tests of
:mod:`tunnel.core.coalesce` and of a real TUN device taking merged runs."""

from __future__ import annotations

import struct

from tunnel.core.ippacket import internet_checksum

ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02
SRC4, DST4 = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
SRC6 = bytes.fromhex("fd00" + "00" * 13 + "02")
DST6 = bytes.fromhex("fd00" + "00" * 13 + "01")
TIMESTAMPS = bytes([1, 1, 8, 10]) + struct.pack("!II", 1234, 5678)


def tcp_packet(
    payload: bytes,
    *,
    seq: int,
    v6: bool = False,
    src: bytes | None = None,
    dst: bytes | None = None,
    sport: int = 40000,
    dport: int = 5201,
    flags: int = ACK,
    ack: int = 99,
    window: int = 500,
    options: bytes = TIMESTAMPS,
    ip_id: int = 7,
    df: bool = True,
    ttl: int = 64,
    tos: int = 0,
) -> bytes:
    """One IPv4 or IPv6 TCP segment (the addresses default to 10.0.0.2 -> 10.0.0.1, or fd00::2
    -> fd00::1)."""
    src = src or (SRC6 if v6 else SRC4)
    dst = dst or (DST6 if v6 else DST4)
    doff = (20 + len(options)) // 4
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
        + options
        + payload
    )
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp[16:18] = internet_checksum(pseudo + tcp).to_bytes(2, "big")
    if v6:
        return struct.pack("!IHBB", (6 << 28) | (tos << 20), len(tcp), 6, ttl) + src + dst + tcp
    ip = bytearray(
        struct.pack("!BBHHHBBH", 0x45, tos, 20 + len(tcp), ip_id, 0x4000 if df else 0, ttl, 6, 0)
        + src
        + dst
    )
    ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
    return bytes(ip) + tcp
