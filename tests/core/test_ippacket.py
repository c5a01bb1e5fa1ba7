"""Tests for tunnel.core.ippacket: header inspection, packet builders, checksums."""

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.ippacket import (
    addresses_untrusted,
    build_ipv4_udp,
    build_ipv6_udp,
    clip_untrusted,
    internet_checksum,
    ip_header_untrusted,
    ip_version,
    is_link_local_source,
    udp_destination_port_untrusted,
)

A4 = IPv4Address("10.8.0.2").packed
B4 = IPv4Address("192.0.2.1").packed
A6 = IPv6Address("fd00::2").packed
B6 = IPv6Address("2001:db8::1").packed

ports = st.integers(0, 65535)
payloads = st.binary(max_size=1500)
addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)


def reference_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way, to check the fast one against."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_checksum_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        header = (packet[0] & 0x0F) * 4
        udp = packet[header:]
        pseudo = packet[12:20] + bytes((0, 17)) + len(udp).to_bytes(2, "big")
    else:
        udp = packet[40:]
        pseudo = packet[8:40] + len(udp).to_bytes(4, "big") + bytes((0, 0, 0, 17))
    return udp[6:8] != b"\0\0" and internet_checksum(pseudo + udp) == 0


# --- checksum ----------------------------------------------------------------------------------


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2 & 0xFFFF)


def test_checksum_known_ipv4_header():
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861
    fixed = header[:10] + b"\xb8\x61" + header[12:]
    assert internet_checksum(fixed) == 0


def test_checksum_edge_cases():
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(bytes(10)) == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0
    assert internet_checksum(b"\x01") == internet_checksum(b"\x01\x00")


@given(st.binary(max_size=2000))
def test_checksum_matches_reference(data):
    assert internet_checksum(data) == reference_checksum(data)


# --- builders ----------------------------------------------------------------------------------


def test_build_ipv4_udp_layout():
    pkt = build_ipv4_udp(A4, B4, 5000, 53, b"hello", ttl=17)
    assert len(pkt) == 20 + 8 + 5
    assert pkt[0] == 0x45
    assert int.from_bytes(pkt[2:4], "big") == len(pkt)
    assert pkt[8] == 17 and pkt[9] == 17
    assert pkt[12:16] == A4 and pkt[16:20] == B4
    assert pkt[20:22] == (5000).to_bytes(2, "big")
    assert pkt[22:24] == (53).to_bytes(2, "big")
    assert pkt[24:26] == (13).to_bytes(2, "big")
    assert pkt[28:] == b"hello"
    assert internet_checksum(pkt[:20]) == 0
    assert udp_checksum_ok(pkt)


def test_build_ipv6_udp_layout():
    pkt = build_ipv6_udp(A6, B6, 5000, 53, b"hello", hop_limit=9)
    assert len(pkt) == 40 + 8 + 5
    assert pkt[0] >> 4 == 6
    assert int.from_bytes(pkt[4:6], "big") == 13
    assert pkt[6] == 17 and pkt[7] == 9
    assert pkt[8:24] == A6 and pkt[24:40] == B6
    assert pkt[42:44] == (53).to_bytes(2, "big")
    assert pkt[48:] == b"hello"
    assert udp_checksum_ok(pkt)


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_ipv4_udp(A6, B4, 1, 2, b""),
        lambda: build_ipv4_udp(A4, B4[:3], 1, 2, b""),
        lambda: build_ipv4_udp(A4, B4, -1, 2, b""),
        lambda: build_ipv4_udp(A4, B4, 1, 65536, b""),
        lambda: build_ipv4_udp(A4, B4, 1, 2, b"", ttl=256),
        lambda: build_ipv4_udp(A4, B4, 1, 2, bytes(65535 - 27)),
        lambda: build_ipv6_udp(A4, B6, 1, 2, b""),
        lambda: build_ipv6_udp(A6, B6, 1, 2, b"", hop_limit=-1),
        lambda: build_ipv6_udp(A6, B6, 1, 2, bytes(65535 - 7)),
    ],
)
def test_builders_reject_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_largest_ipv4_packet():
    pkt = build_ipv4_udp(A4, B4, 1, 2, bytes(65535 - 28))
    assert len(pkt) == 65535
    assert addresses_untrusted(pkt) == (A4, B4)
    assert udp_destination_port_untrusted(pkt) == 2


@given(addr4, addr4, ports, ports, payloads, st.integers(0, 255))
def test_ipv4_build_parse_roundtrip(src, dst, sport, dport, payload, ttl):
    pkt = build_ipv4_udp(src, dst, sport, dport, payload, ttl=ttl)
    assert ip_version(pkt) == 4
    assert addresses_untrusted(pkt) == (src, dst)
    assert udp_destination_port_untrusted(pkt) == dport
    assert internet_checksum(pkt[:20]) == 0
    assert udp_checksum_ok(pkt)


@given(addr6, addr6, ports, ports, payloads, st.integers(0, 255))
def test_ipv6_build_parse_roundtrip(src, dst, sport, dport, payload, hop_limit):
    pkt = build_ipv6_udp(src, dst, sport, dport, payload, hop_limit=hop_limit)
    assert ip_version(pkt) == 6
    assert addresses_untrusted(pkt) == (src, dst)
    assert udp_destination_port_untrusted(pkt) == dport
    assert udp_checksum_ok(pkt)


# --- inspection --------------------------------------------------------------------------------


def test_ip_version():
    assert ip_version(b"") == 0
    assert ip_version(b"\x45") == 4
    assert ip_version(b"\x60\x00") == 6
    assert ip_version(b"\x01") == 0
    assert ip_version(b"\xf0") == 15


def test_addresses_return_bytes():
    src, dst = addresses_untrusted(build_ipv4_udp(A4, B4, 1, 2, b"x"))
    assert type(src) is bytes and type(dst) is bytes


def test_addresses_rejects_malformed_ipv4():
    pkt = build_ipv4_udp(A4, B4, 1, 2, b"payload")
    assert addresses_untrusted(pkt[:19]) is None
    assert addresses_untrusted(pkt[:-1]) is None  # total length says more than we have
    assert addresses_untrusted(pkt + b"pad") == (A4, B4)  # trailing link padding is fine
    for ihl in range(5):
        assert addresses_untrusted(bytes([0x40 | ihl]) + pkt[1:]) is None
    assert addresses_untrusted(b"\x45" + bytes(19)) == (bytes(4), bytes(4))


def test_addresses_rejects_malformed_ipv6():
    pkt = build_ipv6_udp(A6, B6, 1, 2, b"payload")
    assert addresses_untrusted(pkt[:39]) is None
    assert addresses_untrusted(pkt[:40]) == (A6, B6)


@pytest.mark.parametrize("first", [0x00, 0x15, 0x35, 0x55, 0x75, 0xF5])
def test_addresses_rejects_other_versions(first):
    assert addresses_untrusted(bytes([first]) + bytes(59)) is None
    assert udp_destination_port_untrusted(bytes([first]) + bytes(59)) is None


def with_options(pkt: bytes, options: bytes) -> bytes:
    """Insert IPv4 options into a built packet and fix up IHL, total length and checksum."""
    assert len(options) % 4 == 0
    header = bytearray(pkt[:20] + options)
    header[0] = 0x40 | (len(header) // 4)
    header[2:4] = (len(pkt) + len(options)).to_bytes(2, "big")
    header[10:12] = b"\0\0"
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + pkt[20:]


def test_udp_port_honours_ihl():
    pkt = with_options(build_ipv4_udp(A4, B4, 1111, 2222, b"data"), b"\x01\x01\x01\x00" * 3)
    assert pkt[0] == 0x48
    assert internet_checksum(pkt[:32]) == 0
    assert addresses_untrusted(pkt) == (A4, B4)
    assert udp_destination_port_untrusted(pkt) == 2222


def test_udp_port_ipv4_fragments():
    pkt = bytearray(build_ipv4_udp(A4, B4, 1, 53, b"data"))
    pkt[6:8] = b"\x20\x00"  # More Fragments, offset 0: the first fragment has the UDP header
    assert udp_destination_port_untrusted(bytes(pkt)) == 53
    for frag in (b"\x20\x01", b"\x00\x01", b"\x1f\xff", b"\x01\x00"):
        pkt[6:8] = frag
        assert udp_destination_port_untrusted(bytes(pkt)) is None
        assert addresses_untrusted(bytes(pkt)) == (A4, B4)


def test_udp_port_ipv4_not_udp_or_truncated():
    pkt = bytearray(build_ipv4_udp(A4, B4, 1, 53, b""))
    pkt[9] = 6  # TCP
    assert udp_destination_port_untrusted(bytes(pkt)) is None
    pkt[9] = 17
    assert udp_destination_port_untrusted(bytes(pkt[:23])) is None
    # Port bytes beyond the total length field (padding) are not read.
    short = bytearray(pkt[:24])
    short[2:4] = (23).to_bytes(2, "big")
    assert udp_destination_port_untrusted(bytes(short)) is None
    short[2:4] = (24).to_bytes(2, "big")
    assert udp_destination_port_untrusted(bytes(short)) == 53
    # IHL pointing past the end.
    assert udp_destination_port_untrusted(bytes([0x4F]) + bytes(pkt[1:])) is None


def test_udp_port_ipv6():
    pkt = bytearray(build_ipv6_udp(A6, B6, 1, 443, b"quic"))
    assert udp_destination_port_untrusted(bytes(pkt)) == 443
    assert udp_destination_port_untrusted(bytes(pkt[:44])) == 443
    assert udp_destination_port_untrusted(bytes(pkt[:43])) is None
    pkt[6] = 0  # hop-by-hop options header first: not followed
    assert udp_destination_port_untrusted(bytes(pkt)) is None
    pkt[6] = 58  # ICMPv6
    assert udp_destination_port_untrusted(bytes(pkt)) is None


def test_link_local():
    assert is_link_local_source(IPv6Address("fe80::1").packed)
    assert is_link_local_source(IPv6Address("febf:ffff::1").packed)
    assert not is_link_local_source(IPv6Address("fec0::1").packed)
    assert not is_link_local_source(IPv6Address("fe7f::1").packed)
    assert not is_link_local_source(A6)
    assert not is_link_local_source(IPv4Address("169.254.1.1").packed)
    assert not is_link_local_source(b"")


@given(addr6)
def test_link_local_matches_ipaddress(raw):
    assert is_link_local_source(raw) == IPv6Address(raw).is_link_local


@settings(max_examples=1000)
@given(st.binary(max_size=80))
def test_random_bytes_never_raise(data):
    version = ip_version(data)
    assert isinstance(version, int)
    addrs = addresses_untrusted(data)
    if addrs is not None:
        src, dst = addrs
        assert len(src) == len(dst) == (4 if version == 4 else 16)
        is_link_local_source(src)
    port = udp_destination_port_untrusted(data)
    assert port is None or 0 <= port <= 65535


@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x6F]), st.binary(max_size=80))
def test_plausible_headers_never_raise(first, rest):
    # Random bytes rarely start with a valid version nibble; force it.
    data = bytes([first]) + rest
    addresses_untrusted(data)
    port = udp_destination_port_untrusted(data)
    assert port is None or 0 <= port <= 65535


# --- clip_untrusted ----------------------------------------------------------------------------


@given(st.binary(max_size=100), st.binary(max_size=40))
def test_clip_keeps_only_the_ip_packet(payload, trailer):
    packet4 = build_ipv4_udp(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 1, 2, payload)
    packet6 = build_ipv6_udp(bytes(15) + b"\x01", bytes(15) + b"\x02", 1, 2, payload)
    for packet in (packet4, packet6):
        assert clip_untrusted(packet) is packet
        assert clip_untrusted(packet + trailer) == packet


@given(st.binary(max_size=80))
def test_clip_never_raises_and_never_grows(data):
    clipped = clip_untrusted(data)
    if clipped is not None:
        assert data.startswith(clipped)
        assert clipped[0] >> 4 in (4, 6)


def test_clip_refuses_lengths_that_do_not_fit():
    packet4 = bytearray(build_ipv4_udp(b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02", 1, 2, b"x"))
    packet4[2:4] = (len(packet4) + 1).to_bytes(2, "big")
    assert clip_untrusted(bytes(packet4)) is None
    packet4[2:4] = (19).to_bytes(2, "big")  # shorter than its own header
    assert clip_untrusted(bytes(packet4)) is None
    packet6 = bytearray(build_ipv6_udp(bytes(16), bytes(16), 1, 2, b"x"))
    packet6[4:6] = (len(packet6)).to_bytes(2, "big")
    assert clip_untrusted(bytes(packet6)) is None
    assert clip_untrusted(b"\x60" + bytes(38)) is None


# --- ip_header_untrusted: the shell's one header parser ----------------------------------------


def reference_header(data: bytes):
    """The fixed header the slow, independent way: struct for the fields, ipaddress for the
    addresses."""
    if len(data) >= 20 and struct.unpack_from("!B", data)[0] >> 4 == 4:
        fields = struct.unpack_from("!BBHHHBBH4s4s", data)
        return 4, IPv4Address(fields[8]).packed, IPv4Address(fields[9]).packed
    if len(data) >= 40 and struct.unpack_from("!B", data)[0] >> 4 == 6:
        _, _, _, _, src, dst = struct.unpack_from("!IHBB16s16s", data)
        return 6, IPv6Address(src).packed, IPv6Address(dst).packed
    return None


@settings(max_examples=1000)
@given(st.binary(max_size=80))
def test_header_matches_the_reference_on_random_bytes(data):
    header = ip_header_untrusted(data)
    assert header == reference_header(data)
    if header is not None:
        version, src, dst = header
        assert type(src) is bytes and type(dst) is bytes
        assert len(src) == len(dst) == (4 if version == 4 else 16)


@given(st.sampled_from([0x40, 0x45, 0x4F, 0x60, 0x6F, 0x50, 0xF0]), st.binary(max_size=80))
def test_header_matches_the_reference_on_plausible_headers(first, rest):
    data = bytes([first]) + rest
    assert ip_header_untrusted(data) == reference_header(data)


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), payloads, st.binary(max_size=40))
def test_header_of_built_ipv4_packets(src, dst, payload, options):
    pkt = build_ipv4_udp(src.packed, dst.packed, 1, 2, payload)
    assert ip_header_untrusted(pkt) == (4, src.packed, dst.packed)
    padded = with_options(pkt, options[: len(options) // 4 * 4])
    header = ip_header_untrusted(padded)
    assert header is not None
    assert (IPv4Address(header[1]), IPv4Address(header[2])) == (src, dst)


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), payloads)
def test_header_of_built_ipv6_packets(src, dst, payload):
    pkt = build_ipv6_udp(src.packed, dst.packed, 1, 2, payload)
    version, got_src, got_dst = ip_header_untrusted(pkt)
    assert (version, IPv6Address(got_src), IPv6Address(got_dst)) == (6, src, dst)


@given(st.binary(max_size=80), st.sampled_from([b"", b"\x45", b"\x60"]))
def test_header_agrees_with_clip_and_addresses(rest, start):
    data = start + rest
    clipped = clip_untrusted(data)
    if clipped is not None:
        # What the server does with a client's packet: clip, then read the header.
        assert ip_header_untrusted(clipped) is not None
        assert ip_header_untrusted(clipped) == ip_header_untrusted(data)
    addresses = addresses_untrusted(data)
    if addresses is not None:
        assert ip_header_untrusted(data)[1:] == addresses


def test_header_needs_the_whole_fixed_header_only():
    pkt4 = build_ipv4_udp(A4, B4, 1, 2, b"payload")
    assert ip_header_untrusted(pkt4[:19]) is None
    assert ip_header_untrusted(pkt4[:20]) == (4, A4, B4)
    assert ip_header_untrusted(pkt4[:-1]) == (4, A4, B4)  # lengths are clip_untrusted's job
    pkt6 = build_ipv6_udp(A6, B6, 1, 2, b"payload")
    assert ip_header_untrusted(pkt6[:39]) is None
    assert ip_header_untrusted(pkt6[:40]) == (6, A6, B6)
    assert ip_header_untrusted(b"") is None
    assert ip_header_untrusted(b"\x45garbage") is None
    assert ip_header_untrusted(b"\x55" + pkt4[1:]) is None
    assert ip_header_untrusted(b"\x40" + pkt6[1:]) == (4, pkt6[12:16], pkt6[16:20])
