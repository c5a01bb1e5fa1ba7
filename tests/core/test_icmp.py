"""ICMP "packet too big" for inner packets that no longer fit the path."""

from ipaddress import IPv4Address, IPv6Address

from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.icmp import IPV4_QUOTE_LIMIT, IPV6_MIN_MTU, packet_too_big_untrusted
from tunnel.core.ippacket import build_ipv4_udp, build_ipv6_udp, internet_checksum

SRC4, DST4, ROUTER4 = (IPv4Address(a).packed for a in ("10.8.0.2", "192.0.2.9", "10.8.0.1"))
SRC6, DST6, ROUTER6 = (IPv6Address(a).packed for a in ("fd00::2", "2001:db8::9", "fd00::1"))


def with_df(packet: bytes, df: bool) -> bytes:
    raw = bytearray(packet)
    raw[6] = raw[6] | 0x40 if df else raw[6] & ~0x40
    raw[10:12] = b"\x00\x00"
    raw[10:12] = internet_checksum(bytes(raw[:20])).to_bytes(2, "big")
    return bytes(raw)


def big4(size: int = 1400, df: bool = True) -> bytes:
    packet = build_ipv4_udp(SRC4, DST4, 5000, 53, bytes(size - 28))
    return with_df(packet, df)


def big6(size: int = 1400) -> bytes:
    return build_ipv6_udp(SRC6, DST6, 5000, 53, bytes(size - 48))


def test_ipv4_fragmentation_needed_goes_back_to_the_sender_with_the_mtu():
    packet = big4()
    error = packet_too_big_untrusted(packet, 1252, ROUTER4, ROUTER6)
    assert error is not None and len(error) <= IPV4_QUOTE_LIMIT
    assert error[0] == 0x45 and error[9] == 1
    assert error[12:16] == ROUTER4 and error[16:20] == SRC4
    assert internet_checksum(error[:20]) == 0 and internet_checksum(error[20:]) == 0
    assert error[20:22] == b"\x03\x04" and int.from_bytes(error[26:28], "big") == 1252
    assert error[28:] == packet[: len(error) - 28]  # the quoted packet, from its start


def test_ipv6_packet_too_big_never_says_less_than_1280():
    packet = big6()
    error = packet_too_big_untrusted(packet, 1200, ROUTER4, ROUTER6)
    assert error is not None and len(error) <= IPV6_MIN_MTU
    assert error[6] == 58 and error[8:24] == ROUTER6 and error[24:40] == SRC6
    assert error[40] == 2 and int.from_bytes(error[44:48], "big") == IPV6_MIN_MTU
    pseudo = ROUTER6 + SRC6 + (len(error) - 40).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    assert internet_checksum(pseudo + error[40:]) == 0
    assert packet_too_big_untrusted(big6(1280), 1200, ROUTER4, ROUTER6) is None  # caller's


def test_to_a_sender_holding_the_tunnel_address_the_error_comes_from_the_destination():
    # The server host's own traffic: an error from its own address would be a martian there.
    packet = with_df(build_ipv4_udp(ROUTER4, SRC4, 5000, 53, bytes(1372)), True)
    error = packet_too_big_untrusted(packet, 1252, ROUTER4, ROUTER6)
    assert error is not None
    assert error[12:16] == SRC4 and error[16:20] == ROUTER4
    assert internet_checksum(error[:20]) == 0 and internet_checksum(error[20:]) == 0
    packet6 = build_ipv6_udp(ROUTER6, SRC6, 5000, 53, bytes(1352))
    error6 = packet_too_big_untrusted(packet6, 1232, ROUTER4, ROUTER6)
    assert error6 is not None and error6[8:24] == SRC6 and error6[24:40] == ROUTER6
    pseudo = SRC6 + ROUTER6 + (len(error6) - 40).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    assert internet_checksum(pseudo + error6[40:]) == 0


def test_no_error_where_none_may_be_sent():
    assert packet_too_big_untrusted(big4(df=False), 1252, ROUTER4, ROUTER6) is None
    assert packet_too_big_untrusted(big4(1200), 1252, ROUTER4, ROUTER6) is None  # it fits
    assert packet_too_big_untrusted(big4(), 1252, None, ROUTER6) is None
    error = packet_too_big_untrusted(big4(), 1252, ROUTER4, ROUTER6)
    assert packet_too_big_untrusted(error + bytes(1000), 600, ROUTER4, ROUTER6) is None
    error6 = packet_too_big_untrusted(big6(), 1280, ROUTER4, ROUTER6)
    assert packet_too_big_untrusted(error6 + bytes(400), 1280, ROUTER4, ROUTER6) is None
    fragment = bytearray(big4())
    fragment[7] = 10  # offset 80: not the first fragment
    assert packet_too_big_untrusted(bytes(fragment), 1252, ROUTER4, ROUTER6) is None
    multicast = bytearray(big6())
    multicast[8] = 0xFF
    assert packet_too_big_untrusted(bytes(multicast), 1280, ROUTER4, ROUTER6) is None


@given(st.binary(max_size=1600), st.integers(0, 70000))
def test_never_raises_and_stays_small(data, mtu):
    error = packet_too_big_untrusted(data, mtu, ROUTER4, ROUTER6)
    if error is not None:
        assert len(error) <= (IPV4_QUOTE_LIMIT if error[0] >> 4 == 4 else IPV6_MIN_MTU)
        assert len(error) < len(data)
