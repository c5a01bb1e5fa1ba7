"""Runs of TCP segments joined into one large packet for the TUN device, and split again.

A TUN device opened with a virtio-net header (``IFF_VNET_HDR``) takes a write of one large TCP
packet marked for segmentation (``gso_type``, ``gso_size``) as a single buffer: the kernel's
TCP receive path then runs once per run of segments instead of once per segment, as it does for
what a network card's GRO merged. On the receiving side of a bulk transfer, one write per run
instead of one per packet is most of what the TUN costs (:func:`coalesce`). :func:`segment`
is the kernel's half, the inverse: it cuts such a packet back into the segments it was made of
(the tests hold the two to each other, byte for byte).

Only what the kernel's own GRO would merge is merged: IPv4 without options and not a fragment,
or IPv6 without extension headers, carrying TCP with only ACK set (PSH allowed on the last),
in sequence, with the same addresses, ports, IP header fields, acknowledgement, window and
TCP options, every segment as long as the first but the last, which may be shorter and ends the
run; IPv4 identifications consecutive unless Don't Fragment is set. Everything else passes
through untouched, in order within its flow. Packets from the tunnel are authenticated, so the
segments' TCP checksums are not verified here: the merged packet carries the pseudo-header sum
and a request that whoever needs the checksum (a forwarding path's segmentation) computes it.

Per-packet code, in the style of :mod:`tunnel.core.ippacket`: slices and integers, no
``ipaddress``. Pure: no I/O.
"""

from __future__ import annotations

import struct

from tunnel.core.ippacket import ones_complement_sum

__all__ = [
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "NEEDS_CSUM",
    "PLAIN",
    "VNET_HEADER_LEN",
    "coalesce",
    "segment",
    "segment_count",
]

VNET_HEADER_LEN = 10
# struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
# (little-endian: what a TUN device without TUNSETVNETBE reads on the machines we run on).
_VNET = struct.Struct("<BBHHHH")
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
PLAIN = bytes(VNET_HEADER_LEN)  # a packet as it is, checksums complete

_TCP = 6
_ACK = 0x10
_PSH = 0x08
_FIN = 0x01
_CWR = 0x80
_TCP_CHECKSUM_OFFSET = 16
# IPv4 total length, IPv6 payload length: both 16 bits.
_MAX_LENGTH = 0xFFFF


def _pseudo_header_sum(packet: bytes | bytearray, ip_len: int, tcp_len: int) -> int:
    if ip_len == 20:
        addresses = packet[12:20]
    else:
        addresses = packet[8:40]
    return ones_complement_sum(addresses, _TCP + tcp_len)


def _ipv4_header_checksum(header: bytearray) -> int:
    header[10:12] = b"\0\0"
    return 0xFFFF ^ ones_complement_sum(header)


class _Run:
    """Segments of one flow that will go to the kernel as one packet."""

    __slots__ = (
        "closed",
        "count",
        "first_id",
        "ip_len",
        "match",
        "mss",
        "next_seq",
        "packets",
        "header_len",
        "length",
        "limit",
        "sequential_ids",
    )

    def __init__(
        self, packet: bytes, ip_len: int, header_len: int, seq: int, payload: int, match: int
    ) -> None:
        self.packets = [packet]
        self.ip_len = ip_len
        self.header_len = header_len
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        self.mss = payload
        self.length = len(packet)
        self.match = match
        self.first_id = (packet[4] << 8) | packet[5] if ip_len == 20 else 0
        # Without Don't Fragment (the same for the whole run: it is part of the match) the
        # identifications must be what segmentation recreates.
        self.sequential_ids = ip_len == 20 and not packet[6] & 0x40
        # IPv4 counts its total length in 16 bits, IPv6 its payload length.
        self.limit = _MAX_LENGTH + (ip_len == 40) * 40
        self.count = 1
        self.closed = bool(packet[ip_len + 13] & _PSH)

    def take(self, packet: bytes, seq: int, payload: int, match: int) -> bool:
        """Append ``packet`` if it continues this run; False if it does not (nothing changes)."""
        if (
            self.closed
            or seq != self.next_seq
            or payload > self.mss
            or match != self.match
            or self.length + payload > self.limit
        ):
            return False
        if (
            self.sequential_ids
            and ((packet[4] << 8) | packet[5]) != (self.first_id + self.count) & 0xFFFF
        ):
            return False
        self.packets.append(packet)
        self.count += 1
        self.length += payload
        self.next_seq = (seq + payload) & 0xFFFFFFFF
        if payload < self.mss or packet[self.ip_len + 13] & _PSH:
            self.closed = True
        return True

    def build(self) -> tuple[bytes, bytes | bytearray]:
        """(virtio-net header, packet) for the kernel."""
        packets = self.packets
        if len(packets) == 1:
            return PLAIN, packets[0]
        ip_len, header_len = self.ip_len, self.header_len
        body = bytearray(packets[0])
        for packet in packets[1:]:
            body += memoryview(packet)[header_len:]
        total = len(body)
        if ip_len == 20:
            body[2:4] = total.to_bytes(2, "big")
            body[10:12] = _ipv4_header_checksum(body[:20]).to_bytes(2, "big")
            gso_type = GSO_TCPV4
        else:
            body[4:6] = (total - 40).to_bytes(2, "big")
            gso_type = GSO_TCPV6
        body[ip_len + 13] |= packets[-1][ip_len + 13] & _PSH
        # CHECKSUM_PARTIAL: the field holds the pseudo-header sum (not inverted); the rest is
        # summed by whoever segments or checks it.
        check = ip_len + _TCP_CHECKSUM_OFFSET
        body[check : check + 2] = _pseudo_header_sum(body, ip_len, total - ip_len).to_bytes(
            2, "big"
        )
        header = _VNET.pack(
            NEEDS_CSUM, gso_type, header_len, self.mss, ip_len, _TCP_CHECKSUM_OFFSET
        )
        return header, body


def _tcp_segment(packet: bytes) -> tuple[bytes, int, int, int, int, int] | None:
    """(flow key, IP header length, IP+TCP header length, sequence number, payload length,
    fields that must match) of a segment that may join a run, else None. Never raises."""
    n = len(packet)
    if n < 40:
        return None
    first = packet[0]
    if first == 0x45:
        if packet[9] != _TCP or packet[6] & 0x3F or packet[7] or n != (packet[2] << 8) | packet[3]:
            return None  # not TCP, a fragment, or a length that is not the packet's
        ip_len = 20
        key = packet[12:24]
    elif first >> 4 == 6:
        if n < 60 or packet[6] != _TCP or n != 40 + ((packet[4] << 8) | packet[5]):
            return None
        ip_len = 40
        key = packet[8:44]
    else:
        return None
    header_len = ip_len + (packet[ip_len + 12] >> 4) * 4
    flags = packet[ip_len + 13]
    if header_len < ip_len + 20 or header_len >= n or flags & ~_PSH != _ACK:
        return None  # a bad data offset, no payload, or flags other than ACK and PSH
    # Every header byte but those that differ from segment to segment, as one integer.
    mask = _MASKS.get(header_len - ip_len + ip_len * 256) or _mask(ip_len, header_len)
    match = int.from_bytes(packet[:header_len], "big") & mask
    seq = int.from_bytes(packet[ip_len + 4 : ip_len + 8], "big")
    return key, ip_len, header_len, seq, n - header_len, match


# (IP header length, IP+TCP header length) -> the mask of the header bytes that must match.
_MASKS: dict[int, int] = {}


def _mask(ip_len: int, header_len: int) -> int:
    """Ones over the header but where segments of one run differ: lengths, IPv4
    identification and checksum, sequence number, PSH, TCP checksum."""
    mask = bytearray(b"\xff" * header_len)
    varying = [2, 3, 4, 5, 10, 11] if ip_len == 20 else [4, 5]
    varying += [ip_len + 4, ip_len + 5, ip_len + 6, ip_len + 7, ip_len + 16, ip_len + 17]
    for at in varying:
        mask[at] = 0
    mask[ip_len + 13] = 0xFF ^ _PSH
    value = int.from_bytes(mask, "big")
    _MASKS[header_len - ip_len + ip_len * 256] = value
    return value


def _flow_key(packet: bytes) -> bytes | None:
    """The flow key of any TCP packet, so that one that cannot join a run still ends its
    flow's run (it must not be overtaken by the segments after it)."""
    if len(packet) >= 40 and packet[0] >> 4 == 4 and packet[9] == _TCP:
        ip_len = (packet[0] & 0x0F) * 4
        return packet[12:20] + packet[ip_len : ip_len + 4]
    if len(packet) >= 60 and packet[0] >> 4 == 6 and packet[6] == _TCP:
        return packet[8:44]
    return None


def coalesce(packets: list[bytes]) -> list[tuple[bytes, bytes | bytearray]]:
    """The writes that deliver ``packets``: (virtio-net header, packet) pairs, runs of TCP
    segments merged. Packets of one flow stay in order; flows may interleave differently (as
    with the kernel's GRO). Never raises on any bytes."""
    out: list[_Run | bytes] = []
    runs: dict[bytes, _Run] = {}
    for packet in packets:
        parsed = _tcp_segment(packet)
        if parsed is None:
            key = _flow_key(packet)
            if key is not None:
                runs.pop(key, None)
            out.append(packet)
            continue
        key, ip_len, header_len, seq, payload, match = parsed
        run = runs.get(key)
        if run is not None and run.take(packet, seq, payload, match):
            continue
        run = _Run(packet, ip_len, header_len, seq, payload, match)
        runs[key] = run
        out.append(run)
    return [(PLAIN, item) if isinstance(item, bytes) else item.build() for item in out]


def segment_count(header: bytes, packet: bytes | bytearray) -> int:
    """How many packets the kernel makes of a write of ``packet`` with virtio-net ``header``."""
    gso_type: int = header[1]
    header_len: int = header[2] | header[3] << 8
    mss: int = header[4] | header[5] << 8
    if gso_type == GSO_NONE or not mss:
        return 1
    return max(1, -(-(len(packet) - header_len) // mss))


def segment(header: bytes, packet: bytes | bytearray) -> list[bytes]:
    """What the kernel makes of a write of ``packet`` with virtio-net ``header``: the packet
    with its checksum completed, or, for a TCP segmentation request, the segments, each with
    its own lengths, sequence number, identification and checksums. Raises ValueError on a
    header it cannot apply."""
    flags, gso_type, header_len, mss, csum_start, csum_offset = _VNET.unpack(header)
    data = bytearray(packet)
    if gso_type == GSO_NONE:
        if flags & NEEDS_CSUM:
            at = csum_start + csum_offset
            if at + 2 > len(data):
                raise ValueError("checksum offset past the packet")
            seed = (data[at] << 8) | data[at + 1]
            data[at : at + 2] = b"\0\0"
            data[at : at + 2] = (0xFFFF ^ ones_complement_sum(data[csum_start:], seed)).to_bytes(
                2, "big"
            )
        return [bytes(data)]
    if gso_type not in (GSO_TCPV4, GSO_TCPV6) or not mss or header_len >= len(data):
        raise ValueError(f"unsupported segmentation request (type {gso_type}, size {mss})")
    ip_len = 20 if gso_type == GSO_TCPV4 else 40
    head, payload = data[:header_len], data[header_len:]
    seq = int.from_bytes(head[ip_len + 4 : ip_len + 8], "big")
    ip_id = (head[4] << 8) | head[5]
    last_flags = head[ip_len + 13]
    pieces = [payload[i : i + mss] for i in range(0, len(payload), mss)]
    segments = []
    for index, piece in enumerate(pieces):
        seg = bytearray(head) + piece
        total = len(seg)
        if ip_len == 20:
            seg[2:4] = total.to_bytes(2, "big")
            seg[4:6] = ((ip_id + index) & 0xFFFF).to_bytes(2, "big")
            seg[10:12] = _ipv4_header_checksum(seg[:20]).to_bytes(2, "big")
        else:
            seg[4:6] = (total - 40).to_bytes(2, "big")
        seg[ip_len + 4 : ip_len + 8] = ((seq + index * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        flags_now = last_flags
        if index:
            flags_now &= ~_CWR  # congestion window reduced: said once, in the first
        if index != len(pieces) - 1:
            flags_now &= ~(_PSH | _FIN)
        seg[ip_len + 13] = flags_now
        check = ip_len + _TCP_CHECKSUM_OFFSET
        seg[check : check + 2] = b"\0\0"
        pseudo = _pseudo_header_sum(seg, ip_len, total - ip_len)
        seg[check : check + 2] = (0xFFFF ^ ones_complement_sum(seg[ip_len:], pseudo)).to_bytes(
            2, "big"
        )
        segments.append(bytes(seg))
    return segments
