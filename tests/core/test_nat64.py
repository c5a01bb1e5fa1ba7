"""Tests for tunnel.core.nat64: hand-built packets for every path, checksums checked by an
independent (slow, obvious) computation written here, hypothesis for robustness and round
trips."""

import random
import struct
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunnel.core.nat64 import DROP_REASONS, Nat64, Translation
from tunnel.errors import ConfigError

PREFIX = IPv6Network("64:ff9b::/96")
SOURCE = IPv4Address("198.51.100.1").packed
CLIENT = IPv6Address("fd00::2").packed
CLIENT2 = IPv6Address("fd00::3").packed
REMOTE4 = IPv4Address("203.0.113.5").packed
REMOTE6 = IPv6Address("64:ff9b::203.0.113.5").packed
ROUTER4 = IPv4Address("192.0.2.254").packed
ROUTER6 = IPv6Address("64:ff9b::192.0.2.254").packed
TRANSLATOR6 = IPv6Address("64:ff9b::198.51.100.1").packed  # prefix + source_ip

TCP, UDP, ICMP4, ICMP6 = 6, 17, 1, 58
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
CHECKSUM_AT = {TCP: 16, UDP: 6, ICMP4: 2, ICMP6: 2}


# --- an independent packet toolkit ----------------------------------------------------------


def csum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way (not the module's arithmetic)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo4(src, dst, proto, length):
    return src + dst + bytes((0, proto)) + length.to_bytes(2, "big")


def pseudo6(src, dst, nh, length):
    return src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, nh))


def with_checksum(data, at, pseudo=b""):
    data = data[:at] + b"\0\0" + data[at + 2 :]
    value = csum(pseudo + data)
    if at == CHECKSUM_AT[UDP] and pseudo and value == 0:
        value = 0xFFFF  # RFC 768: a UDP checksum that computes to 0 is sent as all ones
    return data[:at] + value.to_bytes(2, "big") + data[at + 2 :]


def tcp(sport, dport, payload=b"", flags=ACK, seq=1000, ack=2000, options=b""):
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, 65535, 0, 0)
    return header + options + payload


def udp(sport, dport, payload=b""):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def echo(kind, ident, seq=1, data=b"ping"):
    return struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data


def ipv6(src, dst, nh, body, hop=64, tc=0, flow=0, fix=True):
    """An IPv6 packet; ``fix`` sets the TCP/UDP/ICMPv6 checksum of ``body``."""
    if fix and nh in (TCP, UDP, ICMP6):
        body = with_checksum(body, CHECKSUM_AT[nh], pseudo6(src, dst, nh, len(body)))
    first = (6 << 28) | (tc << 20) | flow
    return struct.pack("!IHBB", first, len(body), nh, hop) + src + dst + body


def ipv4(src, dst, proto, body, ttl=64, tos=0, ident=0, flags=0x4000, options=b"", fix=True):
    """An IPv4 packet with a valid header checksum; ``fix`` sets the body's checksum."""
    if fix and proto in (TCP, UDP):
        body = with_checksum(body, CHECKSUM_AT[proto], pseudo4(src, dst, proto, len(body)))
    elif fix and proto == ICMP4:
        body = with_checksum(body, 2)
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(body)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, flags, ttl, proto, 0, src, dst
    )
    return with_checksum(header + options, 10) + body


def icmp4(kind, code, rest, quoted):
    return bytes((kind, code, 0, 0)) + rest + quoted


def icmp6(kind, code, rest, quoted):
    return bytes((kind, code, 0, 0)) + rest + quoted


def parse4(packet):
    """Check an IPv4 packet's structure and header checksum; return its fields."""
    assert packet[0] >> 4 == 4
    ihl = (packet[0] & 0x0F) * 4
    assert ihl >= 20
    total = int.from_bytes(packet[2:4], "big")
    assert total == len(packet)
    assert csum(packet[:ihl]) == 0, "IPv4 header checksum"
    flags = int.from_bytes(packet[6:8], "big")
    return SimpleNamespace(
        tos=packet[1],
        ident=int.from_bytes(packet[4:6], "big"),
        df=bool(flags & 0x4000),
        mf=bool(flags & 0x2000),
        offset=flags & 0x1FFF,
        ttl=packet[8],
        proto=packet[9],
        src=packet[12:16],
        dst=packet[16:20],
        body=packet[ihl:],
    )


def parse6(packet):
    """Check an IPv6 packet's structure; return its fields."""
    assert packet[0] >> 4 == 6
    plen = int.from_bytes(packet[4:6], "big")
    assert plen == len(packet) - 40
    first = int.from_bytes(packet[:4], "big")
    return SimpleNamespace(
        tc=(first >> 20) & 0xFF,
        flow=first & 0xFFFFF,
        nh=packet[6],
        hop=packet[7],
        src=packet[8:24],
        dst=packet[24:40],
        body=packet[40:],
    )


def valid4(p):
    """The transport checksum of a parsed IPv4 packet verifies."""
    if p.proto == ICMP4:
        return csum(p.body) == 0
    return csum(pseudo4(p.src, p.dst, p.proto, len(p.body)) + p.body) == 0


def valid6(p):
    return csum(pseudo6(p.src, p.dst, p.nh, len(p.body)) + p.body) == 0


def ports(body):
    return int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big")


def without_checksum(segment, proto):
    """A TCP/UDP segment without its ports and checksum: what translation must not touch."""
    at = CHECKSUM_AT[proto]
    return segment[4:at] + segment[at + 2 :]


def make(**kwargs):
    kwargs.setdefault("rng", random.Random(7))
    return Nat64(prefix=PREFIX, source_ip=IPv4Address(SOURCE), **kwargs)


def translated(result):
    assert isinstance(result, Translation)
    assert result.drop is None, result.drop
    assert result.reply is None
    assert result.packet is not None
    return result.packet


def dropped(result, reason):
    assert isinstance(result, Translation)
    assert result.packet is None
    assert result.drop == reason
    return result.reply


def v6(text):
    return IPv6Address(text).packed


def zero_header_checksum(packet4):
    return packet4[:10] + b"\0\0" + packet4[12:]


OPTIONS = bytes((17, 0, 1, 4, 0, 0, 0, 0))  # an extension header of 8 bytes, then UDP
ROUTING = bytes((17, 0, 0, 0, 0, 0, 0, 0))


def send_udp(nat, *, client=CLIENT, sport=5000, dport=53, payload=b"query", hop=64, now=0.0):
    original = ipv6(client, REMOTE6, UDP, udp(sport, dport, payload), hop=hop)
    return original, nat.outbound(original, now)


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix": IPv6Network("64:ff9b::/64")}, "nat64.prefix: 64:ff9b::/64 is not an IPv6 /96"),
        ({"source_ip": IPv4Address("127.0.0.1")}, "nat64.source_ip: 127.0.0.1"),
        ({"source_ip": IPv4Address("224.0.0.1")}, "nat64.source_ip"),
        ({"port_range": (2000, 1000)}, "nat64.port_range: 2000-1000"),
        ({"port_range": (0, 10)}, "nat64.port_range: 0-10"),
        ({"port_range": (1, 65536)}, "nat64.port_range"),
        ({"port_range": "x"}, "nat64.port_range"),
        ({"udp_timeout": 0}, "nat64.udp_timeout: 0 must be positive"),
        ({"tcp_timeout": -1.0}, "nat64.tcp_timeout"),
        ({"mtu": 1279}, "nat64: mtu 1279"),
        ({"max_mappings_per_client": 0}, "nat64.max_mappings_per_client: 0 must be"),
        ({"max_mappings_per_client": 2.5}, "nat64.max_mappings_per_client: 2.5"),
        ({"max_mappings_per_client": True}, "nat64.max_mappings_per_client: True"),
    ],
)
def test_invalid_settings_are_config_errors(kwargs, message):
    settings_ = {"prefix": PREFIX, "source_ip": IPv4Address(SOURCE), **kwargs}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Nat64(**settings_)


def test_fresh_translator_stats():
    stats = make().stats()
    assert stats["mappings"] == stats["tcp"] == stats["udp"] == stats["icmp"] == 0
    assert all(stats[reason] == 0 for reason in DROP_REASONS)
    assert make().next_expiry() is None


# --- IPv6 -> IPv4 ---------------------------------------------------------------------------


def test_outbound_udp():
    nat = make()
    original, result = send_udp(nat, payload=b"hello world", hop=64)
    p = parse4(translated(result))
    assert p.src == SOURCE and p.dst == REMOTE4
    assert p.proto == UDP and p.ttl == 63
    sport, dport = ports(p.body)
    assert 32768 <= sport <= 65535 and dport == 53
    assert p.body[8:] == b"hello world"
    assert int.from_bytes(p.body[4:6], "big") == 8 + len(b"hello world")
    assert valid4(p)
    assert nat.stats()["udp"] == 1 and nat.stats()["translated_out"] == 1


def test_outbound_tcp_with_options_and_traffic_class():
    nat = make()
    segment = tcp(40000, 443, b"GET / HTTP/1.1\r\n", flags=SYN, options=b"\x02\x04\x05\x50")
    original = ipv6(CLIENT, REMOTE6, TCP, segment, hop=10, tc=0xB8, flow=0xABCDE)
    p = parse4(translated(nat.outbound(original, 1.0)))
    assert p.tos == 0xB8  # traffic class -> TOS, flow label gone
    assert p.ttl == 9 and p.proto == TCP
    sport, dport = ports(p.body)
    assert dport == 443 and sport != 0
    assert p.body[4:16] == segment[4:16]  # seq, ack, offset, flags, window untouched
    assert p.body[18:] == segment[18:]  # urgent pointer, options, payload
    assert valid4(p)


def test_outbound_ttl_is_hop_limit_minus_one_down_to_two():
    nat = make()
    _, result = send_udp(nat, hop=2)
    assert parse4(translated(result)).ttl == 1
    _, result = send_udp(nat, hop=255)
    assert parse4(translated(result)).ttl == 254


def test_df_and_identification_follow_rfc7915():
    nat = make()
    small = [parse4(translated(send_udp(nat, payload=b"x" * 100)[1])) for _ in range(3)]
    assert all(not p.df and not p.mf and p.offset == 0 for p in small)
    assert len({p.ident for p in small}) == 3  # fresh identifications when DF is clear
    # 20 + 8 + 1232 = 1260 bytes is the largest without DF.
    edge = parse4(translated(send_udp(nat, payload=b"x" * 1232)[1]))
    assert not edge.df
    big = parse4(translated(send_udp(nat, payload=b"x" * 1233)[1]))
    assert big.df and big.ident == 0


def test_outbound_echo_request():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 0x1234, 7, b"abcdefg"))
    p = parse4(translated(nat.outbound(original, 0.0)))
    assert p.proto == ICMP4 and p.src == SOURCE and p.dst == REMOTE4
    assert p.body[0] == 8 and p.body[1] == 0
    ident = int.from_bytes(p.body[4:6], "big")
    assert 32768 <= ident <= 65535
    assert p.body[6:8] == (7).to_bytes(2, "big") and p.body[8:] == b"abcdefg"
    assert valid4(p)
    assert nat.stats()["icmp"] == 1


def test_outbound_keeps_a_corrupted_checksum_corrupted():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"data"))
    corrupted = original[:46] + bytes((original[46] ^ 0x5A,)) + original[47:]
    assert not valid4(parse4(translated(nat.outbound(corrupted, 0.0))))


def test_outbound_udp_without_checksum_stays_without():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"data"), fix=False)
    p = parse4(translated(nat.outbound(original, 0.0)))
    assert p.body[6:8] == b"\0\0"


def test_outbound_trailing_bytes_beyond_payload_length_are_ignored():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"data"))
    p = parse4(translated(nat.outbound(original + b"junk", 0.0)))
    assert p.body[8:] == b"data" and valid4(p)


@pytest.mark.parametrize("hop", [0, 1])
def test_outbound_hop_limit_expiry_answers_time_exceeded(hop):
    nat = make()
    original, result = send_udp(nat, hop=hop)
    reply = dropped(result, "nat64_hop_limit")
    r = parse6(reply)
    assert r.src == TRANSLATOR6 and r.dst == CLIENT
    assert r.nh == ICMP6 and r.body[0] == 3 and r.body[1] == 0
    assert r.body[4:8] == b"\0\0\0\0"
    assert r.body[8:] == original  # quoted whole: it fits in 1280
    assert valid6(r)
    assert nat.stats()["mappings"] == 0  # an expired packet creates no mapping
    assert nat.stats()["nat64_hop_limit"] == 1 and nat.stats()["icmp_errors_sent"] == 1


def test_time_exceeded_quote_is_cut_to_1280_bytes():
    nat = make()
    original, result = send_udp(nat, payload=b"z" * 1400, hop=1)
    r = parse6(dropped(result, "nat64_hop_limit"))
    assert 40 + len(r.body) == 1280
    assert r.body[8:] == original[: 1280 - 48]
    assert valid6(r)


def test_echo_hop_limit_expiry():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 1), hop=1)
    r = parse6(dropped(nat.outbound(original, 0.0), "nat64_hop_limit"))
    assert r.body[0] == 3 and valid6(r)


def test_generated_errors_are_rate_limited():
    nat = make(icmp_error_rate=2.0)
    replies = [send_udp(nat, hop=1)[1].reply for _ in range(3)]
    assert replies[0] is not None and replies[1] is not None and replies[2] is None
    assert nat.stats()["icmp_errors_suppressed"] == 1
    assert nat.stats()["nat64_hop_limit"] == 3
    assert send_udp(nat, hop=1, now=1.0)[1].reply is not None  # the bucket refills


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "nat64_malformed"),
        (b"\x60" + bytes(30), "nat64_malformed"),
        (ipv4(ROUTER4, REMOTE4, UDP, udp(1, 2)), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, UDP, udp(1, 2))[:-1], "nat64_malformed"),  # truncated
        (ipv6(CLIENT, REMOTE6, UDP, b""), "nat64_malformed"),  # payload length 0
        (ipv6(CLIENT, REMOTE6, UDP, b"\0" * 7, fix=False), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, UDP, struct.pack("!HHHH", 1, 2, 50, 0)), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, TCP, b"\0" * 19, fix=False), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, TCP, tcp(1, 2)[:12] + b"\x40" + tcp(1, 2)[13:]), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, ICMP6, b"\x80\0\0\0"), "nat64_malformed"),
        (ipv6(CLIENT, v6("2001:db8::1"), UDP, udp(1, 2)), "nat64_wrong_destination"),
        (ipv6(CLIENT, TRANSLATOR6, UDP, udp(1, 2)), "nat64_hairpin"),
        (ipv6(CLIENT, v6("64:ff9b::127.0.0.1"), UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(CLIENT, v6("64:ff9b::224.0.0.9"), UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(CLIENT, v6("64:ff9b::255.255.255.255"), UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(CLIENT, v6("64:ff9b::0.1.2.3"), UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(bytes(16), REMOTE6, UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(IPv6Address("ff02::1").packed, REMOTE6, UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(REMOTE6, REMOTE6, UDP, udp(1, 2)), "nat64_bad_address"),
        (ipv6(CLIENT, REMOTE6, 44, bytes((17, 0, 0, 1, 0, 0, 0, 1)) + b"\0" * 5), "nat64_fragment"),
        (ipv6(CLIENT, REMOTE6, 0, OPTIONS + udp(1, 2)), "nat64_extension_header"),
        (ipv6(CLIENT, REMOTE6, 60, OPTIONS + udp(1, 2)), "nat64_extension_header"),
        (ipv6(CLIENT, REMOTE6, 43, ROUTING + udp(1, 2)), "nat64_extension_header"),
        (ipv6(CLIENT, REMOTE6, 132, b"\0" * 12), "nat64_unsupported"),  # SCTP
        (ipv6(CLIENT, REMOTE6, ICMP6, echo(129, 1)), "nat64_unsupported"),  # echo reply
        (ipv6(CLIENT, REMOTE6, ICMP6, b"\x87\0\0\0" + bytes(20)), "nat64_unsupported"),  # NS
    ],
)  # fmt: skip
def test_outbound_drops(packet, reason):
    nat = make()
    assert dropped(nat.outbound(packet, 0.0), reason) is None
    assert nat.stats()[reason] == 1
    assert nat.stats()["mappings"] == 0


def test_outbound_accepts_bytearray_and_memoryview():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"q"))
    a = translated(nat.outbound(bytearray(original), 0.0))
    b = translated(nat.outbound(memoryview(original), 0.0))
    assert ports(parse4(a).body) == ports(parse4(b).body)


# --- mappings -------------------------------------------------------------------------------


def mapped_port(result):
    return ports(parse4(translated(result)).body)[0]


def test_mapping_is_endpoint_independent_and_reused():
    nat = make()
    first = mapped_port(send_udp(nat, sport=5000, dport=53)[1])
    # Same client and port, another destination port: same mapping.
    assert mapped_port(send_udp(nat, sport=5000, dport=123)[1]) == first
    other = ipv6(CLIENT, IPv6Address("64:ff9b::8.8.8.8").packed, UDP, udp(5000, 53))
    assert mapped_port(nat.outbound(other, 0.0)) == first
    assert nat.stats()["udp"] == 1
    # Another client port, another client: other mappings, other ports.
    second = mapped_port(send_udp(nat, sport=5001)[1])
    third = mapped_port(send_udp(nat, client=CLIENT2, sport=5000)[1])
    assert len({first, second, third}) == 3
    assert nat.stats()["udp"] == 3 and nat.stats()["mappings"] == 3


def test_protocols_have_separate_mappings():
    nat = make(port_range=(40000, 40000))
    u = mapped_port(send_udp(nat, sport=5000)[1])
    t = mapped_port(nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0))
    e = parse4(translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 5000)), 0.0)))
    assert u == t == int.from_bytes(e.body[4:6], "big") == 40000
    assert nat.stats()["mappings"] == 3


def test_ports_are_drawn_at_random_within_the_range():
    a = {mapped_port(send_udp(make(rng=random.Random(s)), sport=1)[1]) for s in range(20)}
    assert len(a) > 10
    assert all(32768 <= port <= 65535 for port in a)


def test_port_exhaustion_is_a_counted_drop_and_expiry_frees_ports():
    nat = make(port_range=(40000, 40002), udp_timeout=30.0)
    got = {mapped_port(send_udp(nat, sport=1000 + i, now=float(i))[1]) for i in range(3)}
    assert got == {40000, 40001, 40002}
    dropped(send_udp(nat, sport=2000, now=5.0)[1], "nat64_ports_exhausted")
    dropped(send_udp(nat, sport=2001, now=5.0)[1], "nat64_ports_exhausted")
    assert nat.stats()["nat64_ports_exhausted"] == 2
    # Existing mappings still work while exhausted.
    assert mapped_port(send_udp(nat, sport=1001, now=6.0)[1]) in got
    # At t=30 the mapping made at t=0 has expired: its port serves a new client port,
    # without anybody calling expire() first.
    port = mapped_port(send_udp(nat, sport=2000, now=30.0)[1])
    assert port in got
    assert nat.stats()["udp"] == 3 and nat.stats()["expired"] == 1


def test_expire_and_next_expiry():
    nat = make(udp_timeout=30.0, icmp_timeout=10.0, tcp_timeout=300.0)
    send_udp(nat, sport=1, now=0.0)
    send_udp(nat, sport=2, now=5.0)
    nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 9)), 1.0)
    nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(7, 80, flags=SYN)), 2.0)
    assert nat.stats()["mappings"] == 4
    assert nat.next_expiry() == 11.0  # the echo mapping
    assert nat.expire(10.9) == 0
    assert nat.expire(11.0) == 1
    assert nat.next_expiry() == 30.0
    send_udp(nat, sport=1, now=20.0)  # refresh
    assert nat.next_expiry() == 35.0
    assert nat.expire(49.0) == 1  # sport 2
    assert nat.next_expiry() == 50.0
    assert nat.expire(1000.0) == 2
    assert nat.next_expiry() is None
    assert nat.stats()["mappings"] == 0 and nat.stats()["expired"] == 4


def reply_for(request4, payload=b"answer", ttl=60, proto=UDP, flags=ACK):
    """The IPv4 packet a remote host sends back to a translated request."""
    p = parse4(request4)
    sport, dport = ports(p.body)
    if proto == UDP:
        body = udp(dport, sport, payload)
    else:
        body = tcp(dport, sport, payload, flags=flags)
    return ipv4(p.dst, p.src, proto, body, ttl=ttl)


def test_inbound_refreshes_the_mapping():
    nat = make(udp_timeout=30.0)
    _, result = send_udp(nat, now=0.0)
    translated(nat.inbound(reply_for(result.packet), 25.0))
    assert nat.next_expiry() == 55.0
    assert nat.expire(54.0) == 0


def test_tcp_mapping_shortens_after_fin_both_ways_and_reopens_on_syn():
    nat = make(tcp_timeout=300.0, tcp_closing_timeout=60.0)
    out = nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0).packet
    assert nat.next_expiry() == 300.0
    nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=FIN | ACK)), 1.0)
    assert nat.next_expiry() == 301.0  # one FIN is not enough
    translated(nat.inbound(reply_for(out, b"", proto=TCP, flags=FIN | ACK), 2.0))
    assert nat.next_expiry() == 62.0
    nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=ACK)), 3.0)
    assert nat.next_expiry() == 63.0
    nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 4.0)
    assert nat.next_expiry() == 304.0


def test_tcp_rst_shortens_the_mapping():
    nat = make(tcp_timeout=300.0, tcp_closing_timeout=60.0)
    out = nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0).packet
    translated(nat.inbound(reply_for(out, b"", proto=TCP, flags=RST), 1.0))
    assert nat.next_expiry() == 61.0
    assert nat.expire(61.0) == 1


def test_closing_timeout_never_exceeds_the_tcp_timeout():
    nat = make(tcp_timeout=10.0, tcp_closing_timeout=60.0)
    nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=RST)), 0.0)
    assert nat.next_expiry() == 10.0


def test_mappings_are_bounded_by_the_port_range():
    nat = make(port_range=(50000, 50009))
    for i in range(100):
        send_udp(nat, sport=i, now=0.0)
    assert nat.stats()["udp"] == 10
    assert nat.stats()["nat64_ports_exhausted"] == 90


# --- mappings per client --------------------------------------------------------------------


def send_echo(nat, *, client=CLIENT, ident=1, now=0.0):
    return nat.outbound(ipv6(client, REMOTE6, ICMP6, echo(128, ident)), now)


def send_tcp(nat, *, client=CLIENT, sport=5000, flags=SYN, now=0.0):
    return nat.outbound(ipv6(client, REMOTE6, TCP, tcp(sport, 80, flags=flags)), now)


def test_default_cap_is_1024_mappings_per_client():
    nat = make()
    for sport in range(1024):
        translated(send_udp(nat, sport=sport)[1])
    dropped(send_udp(nat, sport=1024)[1], "nat64_client_mappings")
    translated(send_udp(nat, client=CLIENT2, sport=1024)[1])


def test_a_client_at_its_cap_cannot_add_flows_but_keeps_its_own():
    nat = make(max_mappings_per_client=3)
    # The cap counts all protocols together.
    out = translated(send_udp(nat, sport=1)[1])
    translated(send_tcp(nat, sport=2))
    translated(send_echo(nat, ident=3))
    dropped(send_udp(nat, sport=4)[1], "nat64_client_mappings")
    dropped(send_tcp(nat, sport=4), "nat64_client_mappings")
    dropped(send_echo(nat, ident=4), "nat64_client_mappings")
    assert nat.stats()["nat64_client_mappings"] == 3
    assert nat.stats()["mappings"] == 3
    # Its existing flows go on, both ways.
    assert mapped_port(send_udp(nat, sport=1, now=1.0)[1]) == ports(parse4(out).body)[0]
    translated(send_tcp(nat, sport=2, flags=ACK, now=1.0))
    translated(send_echo(nat, ident=3, now=1.0))
    translated(nat.inbound(reply_for(out), 1.0))
    # Another client is not affected.
    for sport in range(3):
        translated(send_udp(nat, client=CLIENT2, sport=sport, now=1.0)[1])
    dropped(send_udp(nat, client=CLIENT2, sport=3, now=1.0)[1], "nat64_client_mappings")


def test_expiry_frees_room_under_the_cap():
    nat = make(max_mappings_per_client=2, udp_timeout=30.0, icmp_timeout=10.0)
    translated(send_udp(nat, sport=1, now=0.0)[1])
    translated(send_echo(nat, ident=1, now=0.0))
    dropped(send_udp(nat, sport=2, now=5.0)[1], "nat64_client_mappings")
    # The echo mapping is idle past its timeout at 10: room again, without expire() first.
    translated(send_udp(nat, sport=2, now=10.0)[1])
    dropped(send_udp(nat, sport=3, now=10.0)[1], "nat64_client_mappings")
    assert nat.expire(40.0) == 2
    for sport in (4, 5):
        translated(send_udp(nat, sport=sport, now=40.0)[1])
    dropped(send_udp(nat, sport=6, now=40.0)[1], "nat64_client_mappings")


def test_an_expired_flow_of_a_client_at_its_cap_comes_back():
    nat = make(max_mappings_per_client=1, udp_timeout=30.0)
    translated(send_udp(nat, sport=1, now=0.0)[1])
    translated(send_udp(nat, sport=1, now=30.0)[1])  # expired and made again: still one
    dropped(send_udp(nat, sport=2, now=31.0)[1], "nat64_client_mappings")


def test_closed_tcp_mappings_leave_the_cap_when_they_expire():
    nat = make(max_mappings_per_client=1, tcp_timeout=300.0, tcp_closing_timeout=60.0)
    translated(send_tcp(nat, sport=1, now=0.0))
    translated(send_tcp(nat, sport=1, flags=RST, now=1.0))
    dropped(send_tcp(nat, sport=2, now=2.0), "nat64_client_mappings")
    translated(send_tcp(nat, sport=2, now=61.0))


def test_the_port_range_still_runs_out_below_the_cap():
    nat = make(port_range=(40000, 40001), max_mappings_per_client=5)
    translated(send_udp(nat, sport=1)[1])
    translated(send_udp(nat, client=CLIENT2, sport=1)[1])
    dropped(send_udp(nat, sport=2)[1], "nat64_ports_exhausted")


# One step: (client 0-2, UDP or echo, client port 0-5, seconds to wait first).
_cap_steps = st.lists(
    st.tuples(
        st.integers(0, 2), st.sampled_from([UDP, ICMP6]), st.integers(0, 5), st.integers(0, 12)
    ),
    max_size=60,
)


@settings(max_examples=200)
@given(cap=st.integers(1, 4), steps=_cap_steps, collect=st.booleans())
def test_cap_against_a_model(cap, steps, collect):
    """Whatever the sequence of flows, a new flow is dropped exactly when its client already
    has ``cap`` live mappings; the other clients are never affected."""
    timeouts = {UDP: 30.0, ICMP6: 10.0}
    nat = make(max_mappings_per_client=cap, udp_timeout=30.0, icmp_timeout=10.0)
    clients = [v6(f"fd00::{i + 10}") for i in range(3)]
    live: dict[tuple[int, int, int], float] = {}  # (client, proto, port) -> expiry
    now = 0.0
    for client, proto, port, wait in steps:
        now += wait
        if collect:
            nat.expire(now)
        live = {key: expires for key, expires in live.items() if expires > now}
        key = (client, proto, port)
        if proto == UDP:
            _, result = send_udp(nat, client=clients[client], sport=port, now=now)
        else:
            result = send_echo(nat, client=clients[client], ident=port, now=now)
        own = sum(1 for other in live if other[0] == client)
        if key not in live and own >= cap:
            dropped(result, "nat64_client_mappings")
        else:
            translated(result)
            live[key] = now + timeouts[proto]
    assert nat.stats()["nat64_ports_exhausted"] == 0
    nat.expire(now + 30.0)
    assert nat.stats()["mappings"] == 0
    for i in range(cap):  # every client has its whole allowance back
        translated(send_udp(nat, client=clients[0], sport=100 + i, now=now + 30.0)[1])


# --- IPv4 -> IPv6 ---------------------------------------------------------------------------


def test_inbound_udp_reply():
    nat = make()
    original, result = send_udp(nat, sport=5000, dport=53)
    reply4 = ipv4(REMOTE4, SOURCE, UDP, udp(53, ports(parse4(result.packet).body)[0], b"answer"),
                  ttl=50, tos=0x20)  # fmt: skip
    r = parse6(translated(nat.inbound(reply4, 1.0)))
    assert r.src == REMOTE6 and r.dst == CLIENT
    assert r.nh == UDP and r.hop == 49 and r.tc == 0x20 and r.flow == 0
    assert ports(r.body) == (53, 5000)
    assert r.body[8:] == b"answer"
    assert valid6(r)
    assert nat.stats()["translated_in"] == 1


def test_inbound_udp_zero_checksum_is_computed():
    nat = make()
    _, result = send_udp(nat)
    port = ports(parse4(result.packet).body)[0]
    reply4 = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, b"no checksum here"), fix=False)
    r = parse6(translated(nat.inbound(reply4, 1.0)))
    assert r.body[6:8] != b"\0\0"
    assert valid6(r)


def test_inbound_udp_checksum_that_sums_to_zero_is_never_zero():
    """A UDP checksum whose value would be 0 must be sent as 0xFFFF (0 = none)."""
    nat = make()
    _, result = send_udp(nat)
    port = ports(parse4(result.packet).body)[0]
    # Search a payload whose IPv6 checksum computes to 0 (one's complement sum 0xFFFF).
    for i in range(70000):
        payload = i.to_bytes(4, "big")
        if csum(pseudo6(REMOTE6, CLIENT, UDP, 12) + udp(53, 5000, payload)) == 0:
            break
    else:
        pytest.skip("no such payload")
    reply4 = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, payload))
    r = parse6(translated(nat.inbound(reply4, 1.0)))
    assert r.body[6:8] == b"\xff\xff"
    assert valid6(r)
    reply4 = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, payload), fix=False)
    assert parse6(translated(nat.inbound(reply4, 1.0))).body[6:8] == b"\xff\xff"


def test_inbound_tcp_reply():
    nat = make()
    segment = tcp(41000, 443, flags=SYN)
    out = translated(nat.outbound(ipv6(CLIENT, REMOTE6, TCP, segment), 0.0))
    r = parse6(translated(nat.inbound(reply_for(out, b"\x16\x03\x01", proto=TCP), 0.5)))
    assert r.src == REMOTE6 and r.dst == CLIENT and r.nh == TCP
    assert ports(r.body) == (443, 41000)
    assert r.body[20:] == b"\x16\x03\x01"
    assert valid6(r)


def test_inbound_echo_reply():
    nat = make()
    out = parse4(translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 0x4242, 3)), 0.0)))
    ident = int.from_bytes(out.body[4:6], "big")
    reply4 = ipv4(REMOTE4, SOURCE, ICMP4, echo(0, ident, 3, b"ping"), ttl=100)
    r = parse6(translated(nat.inbound(reply4, 0.1)))
    assert r.src == REMOTE6 and r.dst == CLIENT and r.nh == ICMP6 and r.hop == 99
    assert r.body[0] == 129 and r.body[1] == 0
    assert r.body[4:] == echo(129, 0x4242, 3, b"ping")[4:]
    assert valid6(r)


def test_inbound_ipv4_options_are_skipped():
    nat = make()
    _, result = send_udp(nat)
    port = ports(parse4(result.packet).body)[0]
    options = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    reply4 = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, b"opt"), options=options)
    r = parse6(translated(nat.inbound(reply4, 1.0)))
    assert ports(r.body) == (53, 5000) and r.body[8:] == b"opt" and valid6(r)


def test_inbound_trailing_bytes_are_ignored():
    nat = make()
    _, result = send_udp(nat)
    reply4 = reply_for(result.packet, b"abc")
    r = parse6(translated(nat.inbound(reply4 + b"ethernet padding", 1.0)))
    assert r.body[8:] == b"abc" and valid6(r)


@pytest.mark.parametrize("ttl", [0, 1])
def test_inbound_ttl_expiry_answers_time_exceeded(ttl):
    nat = make()
    _, result = send_udp(nat)
    reply4 = reply_for(result.packet, b"x" * 1000, ttl=ttl)
    r = parse4(dropped(nat.inbound(reply4, 1.0), "nat64_hop_limit"))
    assert r.src == SOURCE and r.dst == REMOTE4 and r.proto == ICMP4
    assert r.body[0] == 11 and r.body[1] == 0
    assert 20 + len(r.body) <= 576
    assert r.body[8:] == reply4[: 576 - 28]
    assert valid4(r)


def test_inbound_ttl_two_leaves_with_hop_limit_one():
    nat = make()
    _, result = send_udp(nat)
    assert parse6(translated(nat.inbound(reply_for(result.packet, ttl=2), 1.0))).hop == 1


def test_inbound_too_big_with_df_answers_fragmentation_needed():
    nat = make(mtu=1420)
    _, result = send_udp(nat)
    port = ports(parse4(result.packet).body)[0]
    fits = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, b"x" * (1420 - 48)))
    assert len(parse6(translated(nat.inbound(fits, 1.0))).body) == 1420 - 40
    big = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, b"x" * (1420 - 47)))
    r = parse4(dropped(nat.inbound(big, 1.0), "nat64_too_big"))
    assert r.dst == REMOTE4 and r.body[0] == 3 and r.body[1] == 4
    assert int.from_bytes(r.body[6:8], "big") == 1400
    assert valid4(r)
    # Without DF the sender does not do PMTUD: the packet goes through whole.
    loose = ipv4(REMOTE4, SOURCE, UDP, udp(53, port, b"x" * (1420 - 47)), flags=0)
    assert len(parse6(translated(nat.inbound(loose, 1.0))).body) == 1420 - 39


def test_inbound_unknown_mapping():
    nat = make()
    _, result = send_udp(nat)
    port = ports(parse4(result.packet).body)[0]
    dropped(nat.inbound(ipv4(REMOTE4, SOURCE, UDP, udp(53, port ^ 1)), 0.0), "nat64_no_mapping")
    dropped(nat.inbound(ipv4(REMOTE4, SOURCE, TCP, tcp(53, port)), 0.0), "nat64_no_mapping")
    dropped(nat.inbound(ipv4(REMOTE4, SOURCE, ICMP4, echo(0, port)), 0.0), "nat64_no_mapping")
    assert nat.stats()["nat64_no_mapping"] == 3


def test_inbound_after_expiry_has_no_mapping():
    nat = make(udp_timeout=30.0)
    _, result = send_udp(nat, now=0.0)
    reply4 = reply_for(result.packet)
    translated(nat.inbound(reply4, 29.9))
    dropped(nat.inbound(reply4, 59.9), "nat64_no_mapping")  # expired lazily, at 59.9
    assert nat.stats()["mappings"] == 0


# --- fragments ------------------------------------------------------------------------------

HELD = Translation()


def fragments6(packet, size, ident=0x1234567):
    """An IPv6 packet without extension headers cut into fragments of ``size`` bytes of
    payload (a multiple of 8) each but the last."""
    nh, body = packet[6], packet[40:]
    pieces = []
    for at in range(0, len(body), size):
        piece = body[at : at + size]
        header = struct.pack("!BBHI", nh, 0, at | (at + size < len(body)), ident)
        length = struct.pack("!H", 8 + len(piece))
        pieces.append(packet[:4] + length + bytes((44,)) + packet[7:40] + header + piece)
    return pieces


def fragments4(packet, size, ident=0x4242):
    """An IPv4 packet (20-byte header) cut into fragments of ``size`` payload bytes."""
    p, body = parse4(packet), packet[20:]
    return [
        ipv4(p.src, p.dst, p.proto, body[at : at + size], ttl=p.ttl, ident=ident,
             flags=(0x2000 if at + size < len(body) else 0) | at // 8, fix=False)
        for at in range(0, len(body), size)
    ]  # fmt: skip


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
@pytest.mark.parametrize("proto", [UDP, ICMP6])
def test_outbound_fragments_are_translated_as_one_datagram(order, proto):
    payload = bytes(range(256)) * 12  # 3072 bytes: three fragments of 1232
    body = udp(5000, 53, payload) if proto == UDP else echo(128, 5000, data=payload)
    whole = ipv6(CLIENT, REMOTE6, proto, body)
    pieces = fragments6(whole, 1232)
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(pieces)
    nat = make()
    results = [nat.outbound(piece, 1.0) for piece in pieces]
    assert results[:-1] == [HELD] * (len(pieces) - 1)
    p = parse4(translated(results[-1]))
    # The same datagram as the unfragmented packet gives, except DF: its sender fragmented
    # it, so IPv4 routers may too.
    expected = parse4(translated(make().outbound(whole, 1.0)))
    assert expected.df and not p.df
    assert (p.src, p.dst, p.proto, p.ttl, p.body) == (
        expected.src, expected.dst, expected.proto, expected.ttl, expected.body)  # fmt: skip
    assert valid4(p)
    stats = nat.stats()
    assert stats["translated_out"] == 1 and stats["fragments_waiting"] == 0
    assert stats["fragments_reassembled_out"] == 1


def test_outbound_atomic_fragment_is_translated_at_once():
    whole = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"query"))
    (atomic,) = fragments6(whole, 1232)
    assert atomic[6] == 44
    p = parse4(translated(make().outbound(atomic, 1.0)))
    assert p.body == parse4(translated(make().outbound(whole, 1.0))).body


def test_inbound_fragments_are_translated_as_one_datagram():
    nat = make()
    _, result = send_udp(nat)
    reply = reply_for(result.packet, bytes(range(256)) * 16)  # 4104 bytes of UDP
    pieces = fragments4(reply, 1480)
    assert len(pieces) == 3
    results = [nat.inbound(piece, 1.0) for piece in reversed(pieces)]
    assert results[:-1] == [HELD, HELD]
    p = parse6(translated(results[-1]))
    expected = parse6(translated(make_and_deliver(reply)))
    assert (p.src, p.dst, p.nh, p.body) == (expected.src, expected.dst, UDP, expected.body)
    assert valid6(p) and len(p.body) == 8 + 4096  # forwarded whole: DF was clear


def make_and_deliver(reply4):
    """What a fresh translator makes of ``reply4`` unfragmented, with DF clear."""
    nat = make()
    send_udp(nat)
    p = parse4(reply4)
    return nat.inbound(ipv4(p.src, p.dst, p.proto, p.body, ttl=p.ttl, flags=0, fix=False), 1.0)


def test_inbound_fragments_without_a_mapping_are_dropped_when_whole():
    nat = make()
    reply = ipv4(REMOTE4, SOURCE, UDP, udp(53, 40000, b"x" * 100))
    first, last = fragments4(reply, 56)
    assert nat.inbound(first, 1.0) == HELD
    dropped(nat.inbound(last, 1.0), "nat64_no_mapping")


def test_overlapping_fragments_are_dropped():
    nat = make()
    _, result = send_udp(nat)
    reply = reply_for(result.packet, b"x" * 200)
    first, second = fragments4(reply, 104)
    assert nat.inbound(first, 1.0) == HELD
    overlapping = ipv4(REMOTE4, SOURCE, UDP, b"y" * 16, ident=0x4242, flags=0x2000 | 12,
                       fix=False)  # fmt: skip
    dropped(nat.inbound(overlapping, 1.0), "nat64_fragment")
    assert nat.stats()["fragments_waiting"] == 0
    # The rest of that datagram now starts another, which never completes.
    assert nat.inbound(second, 1.0) == HELD


def test_incomplete_datagrams_expire_with_the_mappings():
    nat = make()
    whole = ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"x" * 2000))
    first = fragments6(whole, 1232)[0]
    assert nat.outbound(first, 10.0) == HELD
    assert nat.stats()["fragments_waiting"] == 1
    assert nat.next_expiry() == 15.0
    nat.expire(15.0)
    stats = nat.stats()
    assert stats["fragments_waiting"] == 0 and stats["fragments_expired"] == 1


def test_fragment_header_inside_a_fragmented_datagram_is_dropped():
    inner = ipv6(CLIENT, REMOTE6, 44, struct.pack("!BBHI", UDP, 0, 0, 1) + udp(1, 2), fix=False)
    outer = fragments6(inner, 8)
    nat = make()
    results = [nat.outbound(packet, 1.0) for packet in outer]
    assert results[:-1] == [HELD] * (len(outer) - 1)
    dropped(results[-1], "nat64_fragment")


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "nat64_malformed"),
        (b"\x45" + bytes(10), "nat64_malformed"),
        (ipv6(CLIENT, REMOTE6, UDP, udp(1, 2)), "nat64_malformed"),
        (ipv4(REMOTE4, SOURCE, UDP, udp(53, 1))[:-1], "nat64_malformed"),  # total > length
        (b"\x44" + ipv4(REMOTE4, SOURCE, UDP, udp(53, 1))[1:], "nat64_malformed"),  # IHL 4
        (ipv4(REMOTE4, SOURCE, UDP, b"\0" * 7, fix=False), "nat64_malformed"),
        (ipv4(REMOTE4, SOURCE, UDP, struct.pack("!HHHH", 53, 1, 9, 0)), "nat64_malformed"),
        (ipv4(REMOTE4, SOURCE, TCP, b"\0" * 19, fix=False), "nat64_malformed"),
        (ipv4(REMOTE4, SOURCE, ICMP4, b"\0" * 7), "nat64_malformed"),
        (zero_header_checksum(ipv4(REMOTE4, SOURCE, UDP, udp(53, 1))), "nat64_bad_checksum"),
        (ipv4(REMOTE4, ROUTER4, UDP, udp(53, 1)), "nat64_wrong_destination"),
        (ipv4(IPv4Address("127.0.0.1").packed, SOURCE, UDP, udp(53, 1)), "nat64_bad_address"),
        (ipv4(IPv4Address("0.0.0.0").packed, SOURCE, UDP, udp(53, 1)), "nat64_bad_address"),
        (ipv4(IPv4Address("239.1.1.1").packed, SOURCE, UDP, udp(53, 1)), "nat64_bad_address"),
        (ipv4(SOURCE, SOURCE, UDP, udp(53, 1)), "nat64_bad_address"),
        (ipv4(REMOTE4, SOURCE, 132, b"\0" * 12), "nat64_unsupported"),
        (ipv4(REMOTE4, SOURCE, ICMP4, echo(8, 1)), "nat64_unsupported"),  # echo request
        (ipv4(REMOTE4, SOURCE, ICMP4, icmp4(5, 1, ROUTER4, b"\0" * 28)), "nat64_unsupported"),
        (ipv4(REMOTE4, SOURCE, ICMP4, icmp4(4, 0, b"\0" * 4, b"\0" * 28)), "nat64_unsupported"),
    ],
)  # fmt: skip
def test_inbound_drops(packet, reason):
    nat = make()
    assert dropped(nat.inbound(packet, 0.0), reason) is None
    assert nat.stats()[reason] == 1


# --- ICMPv4 errors -> ICMPv6 errors ---------------------------------------------------------


def restored(original, hop_delta=1):
    """The client's original packet as a translated error should quote it: the same bytes,
    but the hop limit our translation decremented and no flow label."""
    return original[:1] + bytes((original[1] & 0xF0, 0, 0)) + original[4:7] + bytes(
        (original[7] - hop_delta,)
    ) + original[8:]  # fmt: skip


def error4(router, kind, code, rest, quoted, ttl=64):
    return ipv4(router, SOURCE, ICMP4, icmp4(kind, code, rest, quoted), ttl=ttl, flags=0)


def test_port_unreachable_is_translated_with_the_packet_restored():
    nat = make()
    original, result = send_udp(nat, sport=5000, dport=53, payload=b"who is there")
    err = error4(REMOTE4, 3, 3, b"\0" * 4, result.packet, ttl=30)
    r = parse6(translated(nat.inbound(err, 1.0)))
    assert r.src == REMOTE6 and r.dst == CLIENT and r.nh == ICMP6 and r.hop == 29
    assert r.body[0] == 1 and r.body[1] == 4 and r.body[4:8] == b"\0\0\0\0"
    assert r.body[8:] == restored(original)  # addresses, port, checksum all back
    assert valid6(r)
    assert valid6(parse6(r.body[8:]))


def test_time_exceeded_from_a_router_with_a_truncated_quote():
    nat = make()
    segment = tcp(41000, 443, b"payload" * 10, flags=SYN)
    original = ipv6(CLIENT, REMOTE6, TCP, segment, hop=5)
    out = translated(nat.outbound(original, 0.0))
    err = error4(ROUTER4, 11, 0, b"\0" * 4, out[:28])  # header + 8 bytes, RFC 792 style
    r = parse6(translated(nat.inbound(err, 1.0)))
    assert r.src == ROUTER6 and r.dst == CLIENT
    assert r.body[0] == 3 and r.body[1] == 0
    inner = r.body[8:]
    assert len(inner) == 48
    assert inner == restored(original)[:48]  # payload length is the original's, ports back
    assert valid6(r)


def test_time_exceeded_about_an_echo_request():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 0x0BAD, 1, b"trace"), hop=3)
    out = translated(nat.outbound(original, 0.0))
    r = parse6(translated(nat.inbound(error4(ROUTER4, 11, 0, b"\0" * 4, out), 1.0)))
    assert r.body[0] == 3
    assert r.body[8:] == restored(original)
    assert valid6(parse6(r.body[8:])) and valid6(r)


def test_quoted_tcp_checksum_is_restored_when_present():
    nat = make()
    original = ipv6(CLIENT, REMOTE6, TCP, tcp(41000, 443, b"data", flags=ACK))
    out = translated(nat.outbound(original, 0.0))
    r = parse6(translated(nat.inbound(error4(ROUTER4, 3, 1, b"\0" * 4, out[:40]), 1.0)))
    assert r.body[0] == 1 and r.body[1] == 0  # host unreachable -> no route
    assert r.body[8:] == restored(original)[:60]


@pytest.mark.parametrize(
    ("advertised", "mtu", "quoted_payload", "expected"),
    [
        (1400, 1420, 1472, 1420),  # +20
        (1300, 1420, 1472, 1320),
        (1500, 1420, 1472, 1420),  # capped at the tunnel MTU
        (1500, 9000, 1472, 1520),
        (1000, 1420, 1472, 1280),  # never below the IPv6 minimum
        (68, 1420, 1472, 1280),
        (0, 9000, 1472, 1512),  # pre-RFC 1191 router: plateau below 1500 is 1492
        (0, 9000, 1172, 1280),  # plateau 1006 -> 1026 -> raised to 1280
    ],
)
def test_fragmentation_needed_becomes_packet_too_big(advertised, mtu, quoted_payload, expected):
    nat = make(mtu=mtu)
    original, result = send_udp(nat, payload=b"p" * quoted_payload)
    err = error4(ROUTER4, 3, 4, struct.pack("!HH", 0, advertised), result.packet[: 576 - 28])
    r = parse6(translated(nat.inbound(err, 1.0)))
    assert r.body[0] == 2 and r.body[1] == 0
    assert int.from_bytes(r.body[4:8], "big") == expected
    assert r.body[8:] == restored(original)[: len(r.body) - 8]
    assert valid6(r)


def test_translated_error_never_exceeds_1280_bytes():
    nat = make(mtu=9000)
    original, result = send_udp(nat, payload=b"q" * 3000)
    err = error4(ROUTER4, 3, 4, struct.pack("!HH", 0, 1500), result.packet)  # quotes it all
    reply = translated(nat.inbound(err, 1.0))
    assert len(reply) == 1280
    r = parse6(reply)
    assert r.body[8:] == restored(original)[: 1280 - 48]
    assert valid6(r)


@pytest.mark.parametrize(
    ("kind", "code", "rest", "expected"),
    [
        (3, 0, b"\0\0\0\0", (1, 0, 0)),
        (3, 1, b"\0\0\0\0", (1, 0, 0)),
        (3, 2, b"\0\0\0\0", (4, 1, 6)),  # protocol unreachable -> parameter problem
        (3, 3, b"\0\0\0\0", (1, 4, 0)),
        (3, 5, b"\0\0\0\0", (1, 0, 0)),
        (3, 9, b"\0\0\0\0", (1, 1, 0)),
        (3, 10, b"\0\0\0\0", (1, 1, 0)),
        (3, 13, b"\0\0\0\0", (1, 1, 0)),
        (3, 15, b"\0\0\0\0", (1, 1, 0)),
        (11, 0, b"\0\0\0\0", (3, 0, 0)),
        (11, 1, b"\0\0\0\0", (3, 1, 0)),
        (12, 0, b"\x08\0\0\0", (4, 0, 7)),  # TTL -> hop limit
        (12, 0, b"\x09\0\0\0", (4, 0, 6)),  # protocol -> next header
        (12, 0, b"\x0d\0\0\0", (4, 0, 8)),  # source address
        (12, 2, b"\x11\0\0\0", (4, 0, 24)),  # destination address
        (12, 0, b"\x02\0\0\0", (4, 0, 4)),  # total length -> payload length
    ],
)
def test_icmpv4_error_types_are_mapped(kind, code, rest, expected):
    nat = make()
    _, result = send_udp(nat)
    r = parse6(translated(nat.inbound(error4(ROUTER4, kind, code, rest, result.packet), 1.0)))
    assert (r.body[0], r.body[1], int.from_bytes(r.body[4:8], "big")) == expected
    assert valid6(r)


@pytest.mark.parametrize(
    ("kind", "code", "rest"),
    [(3, 14, b"\0" * 4), (3, 99, b"\0" * 4), (11, 2, b"\0" * 4), (12, 1, b"\0" * 4),
     (12, 0, b"\x05\0\0\0"), (12, 0, b"\x0a\0\0\0"), (12, 0, b"\x20\0\0\0")],
)  # fmt: skip
def test_untranslatable_icmpv4_errors_are_dropped(kind, code, rest):
    nat = make()
    _, result = send_udp(nat)
    dropped(nat.inbound(error4(ROUTER4, kind, code, rest, result.packet), 1.0), "nat64_unsupported")


def test_icmpv4_error_checks():
    nat = make(udp_timeout=30.0)
    _, result = send_udp(nat, now=0.0)
    out = result.packet
    good = error4(ROUTER4, 3, 3, b"\0" * 4, out)
    # A bad ICMP checksum.
    bad = good[:22] + bytes((good[22] ^ 1,)) + good[23:]
    bad = with_checksum(bad[:20], 10) + bad[20:]
    dropped(nat.inbound(bad, 1.0), "nat64_bad_checksum")
    # Quoting a packet that was not ours, or not mapped.
    other = ipv4(ROUTER4, REMOTE4, UDP, udp(1, 2))
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, other), 1.0), "nat64_no_mapping")
    unmapped = ipv4(SOURCE, REMOTE4, UDP, udp(ports(parse4(out).body)[0] ^ 1, 53))
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, unmapped), 1.0), "nat64_no_mapping")
    # A quote too short to hold ports, a quote of a non-first fragment.
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, out[:27]), 1.0), "nat64_malformed")
    frag = out[:6] + b"\x00\x10" + out[8:]
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, frag), 1.0), "nat64_fragment")
    # An error about a quoted echo reply or ICMP error: we only send echo requests.
    quoted = ipv4(SOURCE, REMOTE4, ICMP4, echo(0, 1))
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, quoted), 1.0), "nat64_unsupported")
    # An expiring error is dropped silently: no error about an error.
    assert dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, out, ttl=1), 1.0),
                   "nat64_hop_limit") is None  # fmt: skip
    # Errors do not refresh the mapping.
    translated(nat.inbound(good, 29.0))
    assert nat.next_expiry() == 30.0
    dropped(nat.inbound(good, 30.0), "nat64_no_mapping")


# --- ICMPv6 errors from clients -> ICMPv4 ---------------------------------------------------


def received_by_client(nat, payload=b"unwanted"):
    """A UDP reply delivered to the client: (the IPv4 reply, its IPv6 translation)."""
    _, result = send_udp(nat, sport=5000, dport=53)
    reply4 = reply_for(result.packet, payload, ttl=64)
    return reply4, translated(nat.inbound(reply4, 0.5))


def test_client_port_unreachable_is_translated_to_icmpv4():
    nat = make()
    reply4, delivered = received_by_client(nat)
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered), hop=64)
    p = parse4(translated(nat.outbound(err, 1.0)))
    assert p.src == SOURCE and p.dst == REMOTE4 and p.proto == ICMP4 and p.ttl == 63
    assert p.body[0] == 3 and p.body[1] == 3
    assert valid4(p)
    inner = parse4(p.body[8:])
    original = parse4(reply4)
    assert inner.src == REMOTE4 and inner.dst == SOURCE and inner.proto == UDP
    assert inner.ttl == 63  # what the client received
    assert inner.body == original.body  # ports and checksum as the remote host sent them
    assert valid4(inner)


@pytest.mark.parametrize(
    ("kind", "code", "rest", "expected"),
    [
        (1, 0, b"\0" * 4, (3, 1, b"\0" * 4)),
        (1, 1, b"\0" * 4, (3, 10, b"\0" * 4)),
        (1, 3, b"\0" * 4, (3, 1, b"\0" * 4)),
        (1, 4, b"\0" * 4, (3, 3, b"\0" * 4)),
        (2, 0, (1400).to_bytes(4, "big"), (3, 4, (1380).to_bytes(4, "big"))),
        (2, 0, (9000).to_bytes(4, "big"), (3, 4, (1400).to_bytes(4, "big"))),  # tunnel MTU
        (3, 0, b"\0" * 4, (11, 0, b"\0" * 4)),
        (3, 1, b"\0" * 4, (11, 1, b"\0" * 4)),
        (4, 0, (7).to_bytes(4, "big"), (12, 0, b"\x08\0\0\0")),
        (4, 0, (30).to_bytes(4, "big"), (12, 0, b"\x10\0\0\0")),
        (4, 1, (6).to_bytes(4, "big"), (3, 2, b"\0" * 4)),
    ],
)
def test_icmpv6_error_types_are_mapped(kind, code, rest, expected):
    nat = make(mtu=1420)
    _, delivered = received_by_client(nat)
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(kind, code, rest, delivered))
    p = parse4(translated(nat.outbound(err, 1.0)))
    assert (p.body[0], p.body[1], p.body[4:8]) == expected
    assert valid4(p)


@pytest.mark.parametrize(
    ("kind", "code", "rest"),
    [(1, 5, b"\0" * 4), (1, 6, b"\0" * 4), (3, 2, b"\0" * 4), (4, 2, b"\0" * 4),
     (4, 0, (2).to_bytes(4, "big")), (4, 0, (40).to_bytes(4, "big"))],
)  # fmt: skip
def test_untranslatable_icmpv6_errors_are_dropped(kind, code, rest):
    nat = make()
    _, delivered = received_by_client(nat)
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(kind, code, rest, delivered))
    dropped(nat.outbound(err, 1.0), "nat64_unsupported")


def test_client_error_about_an_echo_reply():
    nat = make()
    out = parse4(translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 77)), 0.0)))
    ident = int.from_bytes(out.body[4:8], "big") >> 16
    reply4 = ipv4(REMOTE4, SOURCE, ICMP4, echo(0, ident, 1, b"pong"))
    delivered = translated(nat.inbound(reply4, 0.1))
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered))
    p = parse4(translated(nat.outbound(err, 0.2)))
    inner = parse4(p.body[8:])
    assert inner.proto == ICMP4 and inner.body == parse4(reply4).body
    assert valid4(inner) and valid4(p)


def test_client_errors_are_cut_to_576_bytes():
    nat = make()
    _, delivered = received_by_client(nat, b"w" * 1000)
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered))
    packet = translated(nat.outbound(err, 1.0))
    assert len(packet) == 576
    assert valid4(parse4(packet))


def test_client_error_quote_ending_inside_the_tcp_checksum_leaves_it_out():
    nat = make()
    out = translated(nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0))
    delivered = translated(nat.inbound(reply_for(out, b"", proto=TCP, flags=SYN | ACK), 0.5))
    quote = delivered[: 40 + CHECKSUM_AT[TCP] + 1]
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, quote))
    p = parse4(translated(nat.outbound(err, 1.0)))
    assert valid4(p)
    inner = p.body[8:]
    assert len(inner) == 20 + CHECKSUM_AT[TCP]
    assert inner[20:] == reply_for(out, b"", proto=TCP, flags=SYN | ACK)[20:36]


def test_client_error_checks():
    nat = make()
    _, delivered = received_by_client(nat)
    good = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered))
    translated(nat.outbound(good, 1.0))
    # Bad checksum.
    dropped(nat.outbound(good[:-1] + bytes((good[-1] ^ 1,)), 1.0), "nat64_bad_checksum")
    # Another client cannot send errors about this client's mapping.
    spoof = ipv6(CLIENT2, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered))
    dropped(nat.outbound(spoof, 1.0), "nat64_no_mapping")
    # A quote of a packet that did not come through us.
    native = ipv6(IPv6Address("2001:db8::9").packed, CLIENT, UDP, udp(53, 5000))
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, native))
    dropped(nat.outbound(err, 1.0), "nat64_no_mapping")
    # A quote with no mapping, a short quote, a quoted fragment.
    unmapped = ipv6(REMOTE6, CLIENT, UDP, udp(53, 5999))
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, unmapped))
    dropped(nat.outbound(err, 1.0), "nat64_no_mapping")
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered[:47]))
    dropped(nat.outbound(err, 1.0), "nat64_malformed")
    fragment = delivered[:6] + b"\x2c" + delivered[7:]
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, fragment))
    dropped(nat.outbound(err, 1.0), "nat64_fragment")
    # An expiring error is dropped without an answer.
    err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered), hop=1)
    assert dropped(nat.outbound(err, 1.0), "nat64_hop_limit") is None


# --- round trips ----------------------------------------------------------------------------

addr6 = st.binary(min_size=16, max_size=16).filter(
    lambda a: a[0] not in (0x00, 0xFF) and a[:12] != PREFIX.network_address.packed[:12]
)
remote4s = st.binary(min_size=4, max_size=4).filter(
    lambda a: a[0] not in (0, 127) and a[0] < 224 and a != SOURCE
)
ports_ = st.integers(0, 65535)


@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    proto=st.sampled_from([TCP, UDP, ICMP6]),
    client=addr6,
    remote=remote4s,
    cport=ports_,
    rport=ports_,
    payload=st.binary(max_size=1400),
    hop=st.integers(2, 255),
    ttl=st.integers(2, 255),
    tc=st.integers(0, 255),
    flags=st.sampled_from([ACK, SYN, SYN | ACK, FIN | ACK, RST, 0]),
)
def test_round_trip_restores_addresses_ports_and_payload(
    proto, client, remote, cport, rport, payload, hop, ttl, tc, flags
):
    nat = make(mtu=65535)
    remote6 = PREFIX.network_address.packed[:12] + remote
    if proto == TCP:
        body = tcp(cport, rport, payload, flags=flags)
    elif proto == UDP:
        body = udp(cport, rport, payload)
    else:
        body = echo(128, cport, rport, payload)
    original = ipv6(client, remote6, proto, body, hop=hop, tc=tc)
    out = parse4(translated(nat.outbound(original, 0.0)))
    assert out.src == SOURCE and out.dst == remote and out.ttl == hop - 1 and out.tos == tc
    assert out.df == (20 + len(body) > 1260)
    assert valid4(out)
    if proto == ICMP6:
        assert out.proto == ICMP4 and out.body[0] == 8
        assert out.body[6:] == body[6:]
        mapped = int.from_bytes(out.body[4:6], "big")
        back = ipv4(remote, SOURCE, ICMP4, b"\0" + out.body[1:], ttl=ttl)
    else:
        assert out.proto == proto
        mapped, dport = ports(out.body)
        assert dport == rport
        assert without_checksum(out.body, proto) == without_checksum(body, proto)
        swapped = struct.pack("!HH", dport, mapped) + out.body[4:]
        back = ipv4(remote, SOURCE, proto, swapped, ttl=ttl)
    assert 32768 <= mapped <= 65535
    r = parse6(translated(nat.inbound(back, 1.0)))
    assert r.src == remote6 and r.dst == client and r.hop == ttl - 1
    assert valid6(r)
    if proto == ICMP6:
        assert r.nh == ICMP6 and r.body[0] == 129
        assert r.body[4:] == body[4:]  # identifier restored, sequence and data intact
    else:
        assert r.nh == proto
        assert ports(r.body) == (rport, cport)
        assert without_checksum(r.body, proto) == without_checksum(body, proto)


@settings(max_examples=200)
@given(
    proto=st.sampled_from([TCP, UDP, ICMP6]),
    cport=ports_,
    payload=st.binary(max_size=1500),
    cut=st.integers(8, 1500),
    kind=st.sampled_from([(3, 3), (3, 1), (11, 0), (3, 4)]),
)
@example(proto=TCP, cport=0, payload=b"", cut=17, kind=(3, 3))  # ends inside the checksum
def test_icmp_error_quotes_restore_the_original_packet(proto, cport, payload, cut, kind):
    nat = make()
    if proto == TCP:
        body = tcp(cport, 443, payload)
    elif proto == UDP:
        body = udp(cport, 443, payload)
    else:
        body = echo(128, cport, 1, payload)
    original = ipv6(CLIENT, REMOTE6, proto, body, hop=64)
    out = translated(nat.outbound(original, 0.0))
    quote = out[: 20 + cut]
    rest = struct.pack("!HH", 0, 1400) if kind == (3, 4) else b"\0" * 4
    r = parse6(translated(nat.inbound(error4(ROUTER4, *kind, rest, quote), 1.0)))
    assert 40 + len(r.body) <= 1280
    assert valid6(r)
    inner = r.body[8:]
    expected = restored(original)
    assert inner == expected[: len(inner)]
    length = min(len(expected), 40 + cut, 1280 - 48)
    if proto == TCP and length == 40 + CHECKSUM_AT[TCP] + 1:
        length -= 1  # half a checksum cannot be restored: left out
    assert len(inner) == length


# --- robustness -----------------------------------------------------------------------------

_NEVER = {"nat64_internal_error"}


def check_result(result):
    assert isinstance(result, Translation)
    assert result.drop not in _NEVER
    assert result.drop in DROP_REASONS or result.drop is None
    assert (result.packet is None) != (result.drop is None) or result == Translation()
    if result.packet is not None:
        if result.packet[0] >> 4 == 4:
            parse4(result.packet)
        else:
            parse6(result.packet)
    if result.reply is not None:
        if result.reply[0] >> 4 == 4:
            assert valid4(parse4(result.reply))
        else:
            assert valid6(parse6(result.reply))


def primed():
    """A translator with a live mapping of each protocol, and its translated packets."""
    nat = make(port_range=(40000, 40003), icmp_error_rate=1e9)
    sent = [
        translated(nat.outbound(ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"q")), 0.0)),
        translated(nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0)),
        translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 5000)), 0.0)),
    ]
    return nat, sent


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    nat, _ = primed()
    check_result(nat.outbound(data, 1.0))
    check_result(nat.inbound(data, 1.0))
    for version in (0x45, 0x60):
        check_result(nat.outbound(bytes((version,)) + data, 1.0))
        check_result(nat.inbound(bytes((version,)) + data, 1.0))


@settings(max_examples=1000)
@given(
    nh=st.sampled_from([TCP, UDP, ICMP6, 0, 43, 44, 60, 99]),
    body=st.binary(max_size=120),
    hop=st.integers(0, 255),
    length_delta=st.integers(-3, 3),
    icmp_kind=st.sampled_from([None, 1, 2, 3, 4, 128, 129]),
    quote=st.booleans(),
)
def test_structured_ipv6_garbage_never_raises(nh, body, hop, length_delta, icmp_kind, quote):
    nat, sent = primed()
    if nh == ICMP6 and icmp_kind is not None:
        if quote:  # an error quoting something that looks like a delivered packet
            body = ipv6(REMOTE6, CLIENT, UDP, udp(53, 5000)) + body
        body = bytes((icmp_kind, 0, 0, 0, 0, 0, 0, 0)) + body
    packet = ipv6(CLIENT, REMOTE6, nh, body, hop=hop)
    length = max(0, min(0xFFFF, len(body) + length_delta))
    packet = packet[:4] + length.to_bytes(2, "big") + packet[6:]
    check_result(nat.outbound(packet, 1.0))


@settings(max_examples=1000)
@given(
    proto=st.sampled_from([TCP, UDP, ICMP4, 2]),
    which=st.integers(0, 2),
    body=st.binary(max_size=120),
    ttl=st.integers(0, 255),
    flags=st.sampled_from([0, 0x4000, 0x2000, 0x0010]),
    icmp_kind=st.sampled_from([None, 0, 3, 4, 8, 11, 12]),
    code=st.integers(0, 16),
    cut=st.integers(0, 80),
    options=st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x00" * 40]),
)
def test_structured_ipv4_garbage_never_raises(
    proto, which, body, ttl, flags, icmp_kind, code, cut, options
):
    nat, sent = primed()
    mapped = ports(parse4(sent[which]).body)[0]
    if proto in (TCP, UDP):
        body = mapped.to_bytes(2, "big") * 2 + body
    elif proto == ICMP4 and icmp_kind == 0:
        body = bytes((0, code, 0, 0)) + mapped.to_bytes(2, "big") + body
    elif proto == ICMP4 and icmp_kind is not None:  # an error quoting one of our packets
        body = bytes((icmp_kind, code, 0, 0)) + body[:4].ljust(4, b"\0") + sent[which][:cut]
    packet = ipv4(REMOTE4, SOURCE, proto, body, ttl=ttl, flags=flags, options=options)
    check_result(nat.inbound(packet, 1.0))


@settings(max_examples=500)
@given(data=st.data())
def test_mutated_valid_packets_never_raise(data):
    nat, sent = primed()
    _, delivered = received_by_client(nat)
    candidates = [
        ipv6(CLIENT, REMOTE6, UDP, udp(5000, 53, b"abc")),
        ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, delivered)),
        error4(ROUTER4, 3, 4, b"\0\0\x05\x00", sent[0]),
        error4(ROUTER4, 11, 0, b"\0" * 4, sent[2]),
        reply_for(sent[1], b"x", proto=TCP),
    ]
    packet = bytearray(data.draw(st.sampled_from(candidates)))
    for _ in range(data.draw(st.integers(1, 4))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    for candidate in (bytes(packet), bytes(packet[:cut])):
        check_result(nat.outbound(candidate, 1.0))
        check_result(nat.inbound(candidate, 1.0))
    assert nat.stats()["mappings"] <= 12


def test_every_drop_is_counted():
    nat = make()
    nat.outbound(b"", 0.0)
    nat.inbound(b"", 0.0)
    send_udp(nat, hop=1)
    stats = nat.stats()
    assert stats["nat64_malformed"] == 2 and stats["nat64_hop_limit"] == 1
    assert set(DROP_REASONS) <= set(stats)
    assert all(isinstance(value, int) for value in stats.values())


# --- remaining corners ----------------------------------------------------------------------


def test_udp_length_shorter_than_the_ip_payload_is_honoured():
    nat = make()
    segment = udp(5000, 53, b"real") + b"trailer"
    original = ipv6(CLIENT, REMOTE6, UDP, segment, fix=False)
    fixed = with_checksum(segment[:12], 6, pseudo6(CLIENT, REMOTE6, UDP, 12)) + b"trailer"
    original = original[:40] + fixed
    p = parse4(translated(nat.outbound(original, 0.0)))
    assert p.body[8:] == b"real" and valid4(p)
    port = ports(p.body)[0]
    reply = udp(53, port, b"back")
    reply = with_checksum(reply, 6, pseudo4(REMOTE4, SOURCE, UDP, 12)) + b"pad"
    r = parse6(translated(nat.inbound(ipv4(REMOTE4, SOURCE, UDP, reply, fix=False), 1.0)))
    assert r.body[8:] == b"back" and valid6(r)


def test_echo_identifiers_can_run_out_too():
    nat = make(port_range=(60000, 60000))
    translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 1)), 0.0))
    dropped(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 2)), 0.0), "nat64_ports_exhausted")


def test_echo_reply_ttl_expiry():
    nat = make()
    out = parse4(translated(nat.outbound(ipv6(CLIENT, REMOTE6, ICMP6, echo(128, 1)), 0.0)))
    reply4 = ipv4(REMOTE4, SOURCE, ICMP4, echo(0, int.from_bytes(out.body[4:6], "big")), ttl=1)
    r = parse4(dropped(nat.inbound(reply4, 0.1), "nat64_hop_limit"))
    assert r.body[0] == 11 and valid4(r)


def test_inbound_rate_limited_error_has_no_reply():
    nat = make(icmp_error_rate=1.0)
    _, result = send_udp(nat)
    reply4 = reply_for(result.packet, ttl=1)
    assert dropped(nat.inbound(reply4, 1.0), "nat64_hop_limit") is not None
    assert dropped(nat.inbound(reply4, 1.0), "nat64_hop_limit") is None
    assert nat.stats()["icmp_errors_suppressed"] == 1 and nat.stats()["icmp_errors_sent"] == 1


def test_inbound_tcp_with_a_bad_data_offset():
    nat = make()
    out = translated(nat.outbound(ipv6(CLIENT, REMOTE6, TCP, tcp(5000, 80, flags=SYN)), 0.0))
    reply4 = reply_for(out, b"", proto=TCP)
    bad = reply4[:32] + b"\x40" + reply4[33:]  # data offset 4 words
    dropped(nat.inbound(bad, 1.0), "nat64_malformed")


def test_errors_quoting_protocols_we_never_translate():
    nat = make()
    _, delivered = received_by_client(nat)
    gre = ipv4(SOURCE, REMOTE4, 47, b"\0" * 8)
    dropped(nat.inbound(error4(ROUTER4, 3, 3, b"\0" * 4, gre), 1.0), "nat64_unsupported")
    for nh, body, reason in (
        (99, b"\0" * 8, "nat64_unsupported"),
        (60, b"\0" * 8, "nat64_extension_header"),
        (ICMP6, echo(128, 5000), "nat64_unsupported"),
    ):
        quoted = ipv6(REMOTE6, CLIENT, nh, body)
        err = ipv6(CLIENT, REMOTE6, ICMP6, icmp6(1, 4, b"\0" * 4, quoted))
        dropped(nat.outbound(err, 1.0), reason)


def test_icmp_error_rate_zero_generates_no_errors():
    nat = make(icmp_error_rate=0.0)
    assert dropped(send_udp(nat, hop=1)[1], "nat64_hop_limit") is None
    assert nat.stats()["icmp_errors_suppressed"] == 1
    with pytest.raises(ConfigError, match="icmp_error_rate"):
        make(icmp_error_rate=-1.0)


@settings(max_examples=500)
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 300), st.booleans(), st.binary(max_size=64), st.integers(1, 2)),
        max_size=12,
    ),
    inner=st.sampled_from([UDP, TCP, ICMP6, 44, 0]),
    proto4=st.sampled_from([UDP, TCP, ICMP4]),
)
def test_fragment_streams_never_raise(pieces, inner, proto4):
    nat, sent = primed()
    mapped = ports(parse4(sent[0]).body)[0].to_bytes(2, "big")
    for offset8, more, data, ident in pieces:
        field = offset8 * 8 | more
        header6 = struct.pack("!BBHI", inner, 0, field, ident)
        check_result(nat.outbound(ipv6(CLIENT, REMOTE6, 44, header6 + data, fix=False), 1.0))
        if offset8 == 0:
            data = mapped * 2 + data  # a first fragment that reaches a live mapping
        flags = (0x2000 if more else 0) | offset8
        packet4 = ipv4(REMOTE4, SOURCE, proto4, data, flags=flags, ident=ident, fix=False)
        check_result(nat.inbound(packet4, 1.0))
