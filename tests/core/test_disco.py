"""Tests for tunnel.core.disco: the probe wire format, its authentication, and candidates."""

import hashlib
import hmac
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core import disco
from tunnel.core.disco import (
    MAGIC,
    MAX_CANDIDATES,
    MAX_PING_PADDING,
    MAX_PONG_SIZE,
    MAX_PROBE_SIZE,
    MIN_PING_PADDING,
    MIN_PING_SIZE,
    Ping,
    Pong,
    encode_ping,
    encode_pong,
    format_endpoint,
    is_probe,
    order_candidates,
    parse_probe_untrusted,
    usable_candidate,
)

ALICE = bytes(range(32))
BOB = bytes(range(100, 132))
SECRET = bytes(range(200, 232))
OTHER_SECRET = bytes(32)
TXID = bytes(range(12))


def secrets_of(table):
    return lambda key: table.get(key)


KNOWN = secrets_of({ALICE: SECRET, BOB: SECRET})


def v4(text, port=4433):
    return (IPv4Address(text), port)


def v6(text, port=4433):
    return (IPv6Address(text), port)


# --- wire format -------------------------------------------------------------------------------


def test_magic_can_never_start_a_quic_packet():
    assert len(MAGIC) == 8
    assert MAGIC[0] & 0x80 == 0  # not a long header
    assert MAGIC[0] & 0x40 == 0  # the fixed bit clear: aioquic drops it, no QUIC packet has it


def test_a_ping_has_a_fixed_layout():
    data = encode_ping(Ping(TXID, ALICE, padding=MIN_PING_PADDING), SECRET)
    assert data[:8] == MAGIC and data[8] == disco.TYPE_PING
    assert data[9:21] == TXID and data[21:53] == ALICE
    assert data[53:-16] == bytes(MIN_PING_PADDING)
    assert data[-16:] == hmac.new(SECRET, data[:-16], hashlib.sha256).digest()[:16]
    assert len(data) == MIN_PING_SIZE == 88


def test_a_pong_has_a_fixed_layout():
    data = encode_pong(Pong(TXID, BOB, v4("192.0.2.7", 0x1234)), SECRET)
    assert data[:8] == MAGIC and data[8] == disco.TYPE_PONG
    assert data[9:21] == TXID and data[21:53] == BOB
    assert data[53:60] == b"\x04" + bytes([192, 0, 2, 7]) + b"\x12\x34"
    assert data[-16:] == hmac.new(SECRET, data[:-16], hashlib.sha256).digest()[:16]
    six = encode_pong(Pong(TXID, BOB, v6("2001:db8::1", 1)), SECRET)
    assert six[53] == 6 and six[54:70] == IPv6Address("2001:db8::1").packed
    assert len(six) == MAX_PONG_SIZE


def test_no_pong_is_larger_than_the_smallest_ping():
    # Whoever can make us answer a ping gets back no more than it sent: no amplification.
    smallest_ping = encode_ping(Ping(TXID, ALICE), SECRET)
    assert Ping(TXID, ALICE).padding == MIN_PING_PADDING
    for observed in (v4("255.255.255.255", 65535), v6("ffff:" * 7 + "ffff", 65535)):
        assert len(encode_pong(Pong(TXID, BOB, observed), SECRET)) <= len(smallest_ping)


def test_a_ping_padded_to_the_maximum_fits_the_cap():
    data = encode_ping(Ping(TXID, ALICE, padding=MAX_PING_PADDING), SECRET)
    assert len(data) == MAX_PROBE_SIZE
    assert parse_probe_untrusted(data, KNOWN) == Ping(TXID, ALICE, MAX_PING_PADDING)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"txid": bytes(11)}, ValueError),
        ({"txid": "x" * 12}, TypeError),
        ({"sender": bytes(31)}, ValueError),
        ({"padding": MIN_PING_PADDING - 1}, ValueError),
        ({"padding": MAX_PING_PADDING + 1}, ValueError),
        ({"padding": True}, TypeError),
    ],
)
def test_bad_pings_are_refused_on_construction(kwargs, error):
    with pytest.raises(error):
        Ping(**{"txid": TXID, "sender": ALICE, **kwargs})


@pytest.mark.parametrize(
    "observed",
    [
        ("192.0.2.1", 1),
        (IPv4Address("192.0.2.1"), 0),
        (IPv4Address("192.0.2.1"), 65536),
        (IPv4Address("192.0.2.1"), True),
        (IPv6Address("fe80::1%eth0"), 1),
        (IPv4Address("192.0.2.1"),),
    ],
)
def test_bad_observed_addresses_are_refused_on_construction(observed):
    with pytest.raises(ValueError):
        Pong(TXID, BOB, observed)


def test_the_secret_must_be_32_bytes():
    with pytest.raises(ValueError, match="32 bytes"):
        encode_ping(Ping(TXID, ALICE), bytes(16))
    with pytest.raises(ValueError, match="32 bytes"):
        encode_pong(Pong(TXID, BOB, v4("192.0.2.1")), bytes(33))


def test_the_secret_is_looked_up_by_the_sender():
    seen = []

    def secret_for(key):
        seen.append(key)
        return SECRET

    parse_probe_untrusted(encode_ping(Ping(TXID, ALICE), SECRET), secret_for)
    parse_probe_untrusted(encode_pong(Pong(TXID, BOB, v4("192.0.2.1")), SECRET), secret_for)
    assert seen == [ALICE, BOB]


def test_unknown_sender_and_wrong_secret_are_none():
    ping = encode_ping(Ping(TXID, ALICE), SECRET)
    assert parse_probe_untrusted(ping, secrets_of({BOB: SECRET})) is None
    assert parse_probe_untrusted(ping, secrets_of({ALICE: OTHER_SECRET})) is None
    assert parse_probe_untrusted(ping, secrets_of({ALICE: SECRET})) == Ping(TXID, ALICE)


def test_a_probe_of_our_own_reflected_back_is_none():
    # The daemon's lookup knows its peers, not itself: a ping of ours sent back is nothing.
    ours = encode_ping(Ping(TXID, ALICE), SECRET)
    assert parse_probe_untrusted(ours, secrets_of({BOB: SECRET})) is None


def test_nonzero_padding_is_none_even_with_a_good_tag():
    body = MAGIC + b"\x01" + TXID + ALICE + b"\x01" * MIN_PING_PADDING
    forged = body + hmac.new(SECRET, body, hashlib.sha256).digest()[:16]
    assert parse_probe_untrusted(forged, KNOWN) is None


def test_an_underpadded_ping_is_none_even_with_a_good_tag():
    # Answering it would send back more than it brought.
    body = MAGIC + b"\x01" + TXID + ALICE + bytes(MIN_PING_PADDING - 1)
    short = body + hmac.new(SECRET, body, hashlib.sha256).digest()[:16]
    assert parse_probe_untrusted(short, KNOWN) is None


@pytest.mark.parametrize(
    "body",
    [
        b"\x05" + bytes(4) + b"\x00\x01",  # no such family
        b"\x06" + bytes(4) + b"\x00\x01",  # IPv6 with an IPv4-sized address
        b"\x04" + bytes([192, 0, 2, 1]) + b"\x00\x00",  # port 0
        b"\x03" + bytes(16) + b"\x00\x01",  # IPv6 size, unknown family
    ],
)
def test_malformed_pong_bodies_are_none_even_with_a_good_tag(body):
    head = MAGIC + b"\x02" + TXID + BOB + body
    data = head + hmac.new(SECRET, head, hashlib.sha256).digest()[:16]
    assert parse_probe_untrusted(data, KNOWN) is None


def test_unknown_types_and_oversized_probes_are_none():
    head = MAGIC + b"\x03" + TXID + ALICE + bytes(MIN_PING_PADDING)
    unknown = head + hmac.new(SECRET, head, hashlib.sha256).digest()[:16]
    assert parse_probe_untrusted(unknown, KNOWN) is None
    head = MAGIC + b"\x01" + TXID + ALICE + bytes(MAX_PING_PADDING + 1)
    oversized = head + hmac.new(SECRET, head, hashlib.sha256).digest()[:16]
    assert len(oversized) == MAX_PROBE_SIZE + 1
    assert parse_probe_untrusted(oversized, KNOWN) is None


def test_a_lookup_is_made_only_for_well_formed_probes():
    calls = []
    parse_probe_untrusted(MAGIC + bytes(5), lambda key: calls.append(key))
    parse_probe_untrusted(b"\x40" + bytes(200), lambda key: calls.append(key))
    assert calls == []


def test_format_endpoint():
    assert format_endpoint(v4("192.0.2.1", 4433)) == "192.0.2.1:4433"
    assert format_endpoint(v6("2001:db8::1", 4433)) == "[2001:db8::1]:4433"


# --- properties of the wire format --------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
txids = st.binary(min_size=12, max_size=12)
paddings = st.integers(MIN_PING_PADDING, MAX_PING_PADDING)
ports = st.integers(1, 65535)
observed_addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), ports), st.tuples(st.ip_addresses(v=6), ports)
)
pings = st.builds(Ping, txids, keys, paddings)
small_pings = st.builds(Ping, txids, keys, st.integers(MIN_PING_PADDING, 64))
pongs = st.builds(Pong, txids, keys, observed_addresses)


def encode(probe, secret):
    return encode_ping(probe, secret) if isinstance(probe, Ping) else encode_pong(probe, secret)


@given(st.one_of(pings, pongs), keys)
def test_round_trip(probe, secret):
    data = encode(probe, secret)
    assert is_probe(data)
    assert len(data) <= MAX_PROBE_SIZE
    assert parse_probe_untrusted(data, secrets_of({probe.sender: secret})) == probe


@given(st.one_of(small_pings, pongs), keys)
def test_every_truncation_is_none(probe, secret):
    data = encode(probe, secret)
    lookup = secrets_of({probe.sender: secret})
    for size in range(len(data)):
        assert parse_probe_untrusted(data[:size], lookup) is None


@settings(max_examples=50)
@given(st.one_of(small_pings, pongs), keys)
def test_every_single_bit_flip_is_none(probe, secret):
    data = encode(probe, secret)
    # A flipped sender bit makes a new key: give every key the secret, so the tag must catch it.
    lookup = lambda _key: secret  # noqa: E731
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert parse_probe_untrusted(bytes(flipped), lookup) is None, bit


@given(st.one_of(pings, pongs), keys, keys)
def test_the_wrong_secret_is_none(probe, secret, other):
    if other == secret:
        return
    assert parse_probe_untrusted(encode(probe, secret), lambda _key: other) is None


@given(st.one_of(pings, pongs), keys)
def test_an_extra_byte_is_none(probe, secret):
    data = encode(probe, secret)
    assert parse_probe_untrusted(data + b"\x00", lambda _key: secret) is None


@settings(max_examples=300)
@given(st.binary(max_size=MAX_PROBE_SIZE + 10))
def test_random_bytes_never_raise(data):
    assert parse_probe_untrusted(data, lambda _key: SECRET) is None
    assert parse_probe_untrusted(MAGIC + data, lambda _key: SECRET) is None
    assert parse_probe_untrusted(MAGIC + data, lambda _key: None) is None


@given(st.integers(0, 255).filter(lambda b: b & 0xC0), st.binary(max_size=64))
def test_no_quic_packet_is_a_probe(first, rest):
    # Every QUIC packet has the fixed bit (0x40) set; long headers also have 0x80.
    assert not is_probe(bytes([first]) + MAGIC[1:] + rest)
    assert not is_probe(bytes([first]) + rest)


@given(st.binary(max_size=64))
def test_is_probe_is_the_magic_prefix(data):
    assert is_probe(data) == data.startswith(MAGIC)
    assert is_probe(MAGIC + data)


# --- candidates --------------------------------------------------------------------------------

TUNNEL4 = IPv4Address("10.8.0.2")
TUNNEL6 = IPv6Address("fd00:8::2")
OWN = frozenset({TUNNEL4, TUNNEL6})


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.1",  # documentation space counts as global for us
        "203.0.113.9",
        "8.8.8.8",
        "10.1.2.3",  # RFC 1918: two clients behind one NAT
        "172.16.0.1",
        "192.168.1.20",
        "100.64.1.1",  # RFC 6598: behind one carrier NAT
        "2001:db8::1",
        "2606:4700::1111",
        "fd12:3456::1",  # ULA
        "2002:c000:201::1",  # 6to4
    ],
)
def test_global_and_private_addresses_are_usable(text):
    assert usable_candidate(ip_address(text), own_tunnel_addresses=OWN)


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "169.254.3.4",
        "fe80::1",
        "febf::1",  # the end of fe80::/10
        "fe80::1%eth0",
        "fec0::1",  # site-local, deprecated
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "ff0e::1",
        "255.255.255.255",
        "240.0.0.1",
        "::ffff:192.0.2.1",  # IPv4-mapped: the caller unmaps
        "100::1",  # discard-only
        "10.8.0.2",  # our own tunnel addresses
        "fd00:8::2",
    ],
)
def test_unusable_addresses_are_refused(text):
    assert not usable_candidate(ip_address(text), own_tunnel_addresses=OWN)


def test_the_tunnel_networks_are_refused():
    networks = (IPv4Network("10.8.0.0/24"), IPv6Network("fd00:8::/64"))
    for text in ("10.8.0.3", "fd00:8::3"):
        address = ip_address(text)
        assert usable_candidate(address, own_tunnel_addresses=OWN)
        assert not usable_candidate(address, own_tunnel_addresses=OWN, tunnel_networks=networks)
    assert usable_candidate(
        ip_address("10.9.0.1"), own_tunnel_addresses=OWN, tunnel_networks=networks
    )


def test_order_puts_the_observed_endpoint_first_and_drops_duplicates_and_junk():
    observed = v4("203.0.113.5", 41000)
    reported = [
        v4("192.168.1.20", 41000),
        v4("203.0.113.5", 41000),  # the same as observed
        v6("fe80::1", 41000),  # link-local
        v4("10.8.0.2", 41000),  # our tunnel address
        v6("2001:db8::20", 41000),
        v4("192.168.1.20", 41000),  # again
        v4("192.168.1.21", 0),  # no port
        (IPv6Address("::ffff:192.0.2.1"), 41000),
    ]
    assert order_candidates(observed, reported, own_tunnel_addresses=OWN) == (
        observed,
        v4("192.168.1.20", 41000),
        v6("2001:db8::20", 41000),
    )
    assert order_candidates(None, reported[:1], own_tunnel_addresses=OWN) == (
        v4("192.168.1.20", 41000),
    )
    assert order_candidates(v4("127.0.0.1"), (), own_tunnel_addresses=OWN) == ()


def test_order_caps_and_stops_reading_a_flood():
    def flood():
        for n in range(10**9):
            yield (IPv4Address(0x0A000000 + 1 + n % 2**24), 1000 + n % 60000)

    chosen = order_candidates(v4("203.0.113.5"), flood(), own_tunnel_addresses=OWN)
    assert len(chosen) == MAX_CANDIDATES
    assert chosen[0] == v4("203.0.113.5")
    assert order_candidates(None, flood(), own_tunnel_addresses=OWN, limit=3) == tuple(
        (IPv4Address(0x0A000001 + n), 1000 + n) for n in range(3)
    )
    assert order_candidates(v4("203.0.113.5"), flood(), own_tunnel_addresses=OWN, limit=0) == ()


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(st.one_of(st.none(), st.tuples(addresses, ports)), st.lists(st.tuples(addresses, ports)))
def test_order_properties(observed, reported):
    chosen = order_candidates(observed, reported, own_tunnel_addresses=OWN)
    assert len(chosen) == len(set(chosen)) <= MAX_CANDIDATES
    assert all(usable_candidate(a, own_tunnel_addresses=OWN) for a, _ in chosen)
    everything = ([] if observed is None else [observed]) + reported
    assert set(chosen) <= set(everything)
    if observed is not None and usable_candidate(observed[0], own_tunnel_addresses=OWN):
        assert chosen[0] == observed
    # In the order given: the first usable ones.
    expected = list(
        dict.fromkeys(e for e in everything if usable_candidate(e[0], own_tunnel_addresses=OWN))
    )
    assert list(chosen) == expected[:MAX_CANDIDATES]


@given(addresses)
def test_usable_candidates_are_global_or_private_unicast(address):
    if usable_candidate(address, own_tunnel_addresses=OWN):
        assert not (address.is_loopback or address.is_link_local or address.is_multicast)
        assert not address.is_unspecified and address not in OWN
        assert address.is_global or address.is_private or address in IPv4Network("100.64.0.0/10")
