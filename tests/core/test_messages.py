"""Tests for tunnel.core.messages: message validation, JSON payloads, framing, transcript."""

import json
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core import messages as m
from tunnel.core.messages import (
    AuthRequest,
    AuthResponse,
    Candidates,
    FrameDecoder,
    Packet,
    PeerAuth,
    PeerGone,
    PeerIntro,
    Ping,
    Pong,
    ServerHello,
    auth_transcript,
    decode_control_payload_untrusted,
    encode_control_payload,
    encode_frame,
    peer_transcript,
)
from tunnel.errors import DecodeError

NONCE = bytes(range(32))
KEY = bytes(range(100, 132))
SIG = bytes(range(64))


def hello(**kw):
    args = {"version": 1, "nonce": NONCE, "max_datagram_payload": 1200}
    return ServerHello(**{**args, **kw})


def request(**kw):
    args = {
        "version": 1,
        "device_id": 7,
        "client_id": KEY,
        "auth_token": "vtoken",
        "signature": SIG,
        "max_datagram_payload": 1200,
    }
    return AuthRequest(**{**args, **kw})


def accept4(**kw):
    args = {
        "accepted": True,
        "assigned_ip": IPv4Address("10.8.0.2"),
        "network": IPv4Network("10.8.0.0/24"),
        "server_ip": IPv4Address("10.8.0.1"),
        "mtu": 1400,
    }
    return AuthResponse(**{**args, **kw})


V6 = {
    "assigned_ip6": IPv6Address("fd00::2"),
    "network6": IPv6Network("fd00::/64"),
    "server_ip6": IPv6Address("fd00::1"),
}


def payload(obj) -> bytes:
    return json.dumps(obj).encode()


def roundtrip(msg):
    frames = FrameDecoder().feed(encode_frame(msg))
    assert frames == [msg]
    return frames[0]


# --- strategies --------------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
hellos = st.builds(
    ServerHello,
    version=st.integers(0, 2**32 - 1),
    nonce=st.binary(min_size=32, max_size=32),
    max_datagram_payload=st.integers(0, m.MAX_PACKET),
    peers=st.booleans(),
)
requests = st.builds(
    AuthRequest,
    version=st.integers(0, 2**32 - 1),
    device_id=st.integers(0, 2**64 - 1),
    client_id=st.binary(min_size=32, max_size=32),
    auth_token=st.none() | texts,
    signature=st.binary(min_size=64, max_size=64),
    max_datagram_payload=st.integers(0, m.MAX_PACKET),
    peers=st.booleans(),
)
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
endpoint_lists = st.lists(
    st.tuples(addresses, st.integers(1, 65535)), max_size=m.MAX_ENDPOINTS
).map(tuple)
candidates = st.builds(Candidates, endpoints=endpoint_lists)
intros = st.builds(
    PeerIntro,
    peer_id=st.binary(min_size=32, max_size=32),
    addresses=st.one_of(
        st.tuples(addresses),
        st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    ),
    endpoints=endpoint_lists,
    secret=st.binary(min_size=32, max_size=32),
)
gones = st.builds(PeerGone, peer_id=st.binary(min_size=32, max_size=32))
peer_auths = st.builds(
    PeerAuth,
    client_id=st.binary(min_size=32, max_size=32),
    signature=st.binary(min_size=64, max_size=64),
    max_datagram_payload=st.integers(0, m.MAX_PACKET),
)
peer_messages = st.one_of(candidates, intros, gones, peer_auths)


@st.composite
def v4_triples(draw):
    prefix = draw(st.integers(8, 30))
    base = draw(st.integers(0, 2**32 - 1)) >> (32 - prefix) << (32 - prefix)
    net = IPv4Network((base, prefix))
    size = 2 ** (32 - prefix)
    a, b = draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    return {"assigned_ip": net[a], "network": net, "server_ip": net[b]}


@st.composite
def v6_triples(draw):
    prefix = draw(st.integers(16, 126))
    base = draw(st.integers(0, 2**128 - 1)) >> (128 - prefix) << (128 - prefix)
    net = IPv6Network((base, prefix))
    size = 2 ** (128 - prefix)
    a, b = draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
    return {"assigned_ip6": net[a], "network6": net, "server_ip6": net[b]}


@st.composite
def responses(draw):
    if not draw(st.booleans()):
        return AuthResponse(
            accepted=False, reject_reason=draw(st.none() | texts), temporary=draw(st.booleans())
        )
    which = draw(st.sampled_from(["4", "6", "46"]))
    fields = {}
    if "4" in which:
        fields.update(draw(v4_triples()))
    if "6" in which:
        fields.update(draw(v6_triples()))
    low = 1280 if "6" in which else 68
    fields["mtu"] = draw(st.none() | st.integers(low, 65535))
    fields["dns"] = tuple(draw(st.lists(resolvers, max_size=m.MAX_DNS_SERVERS)))
    fields["dns_search"] = tuple(draw(st.lists(domains, max_size=m.MAX_DNS_SEARCH)))
    return AuthResponse(accepted=True, **fields)


resolvers = (st.ip_addresses(v=4) | st.ip_addresses(v=6)).filter(
    lambda a: not (a.is_unspecified or a.is_multicast or a.is_link_local)
)
domains = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
)


packets = st.builds(Packet, st.binary(max_size=3000))
frames = st.one_of(
    hellos, requests, responses(), peer_messages, packets, st.just(Ping()), st.just(Pong())
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
)


# --- constants ---------------------------------------------------------------------------------


def test_constants():
    assert m.PROTOCOL_VERSION == 2
    assert m.ALPN == "tunnel/1"
    assert (m.FRAME_PACKET, m.FRAME_PING, m.FRAME_PONG) == (0x00, 0x01, 0x02)
    assert (m.FRAME_SERVER_HELLO, m.FRAME_AUTH_REQUEST, m.FRAME_AUTH_RESPONSE) == (
        0x10,
        0x11,
        0x12,
    )
    assert m.MAX_CONTROL_PAYLOAD == 4096
    assert m.MAX_PACKET == 65535


def test_datagram_kinds_never_look_like_ip():
    for kind in (m.DATAGRAM_PING, m.DATAGRAM_PONG):
        assert len(kind) == 1
        assert kind[0] >> 4 not in (4, 6)
    assert m.DATAGRAM_PING == b"\x01"
    assert m.DATAGRAM_PONG == b"\x02"


# --- message classes ---------------------------------------------------------------------------


def test_messages_are_frozen():
    msg = hello()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        msg.version = 2


@pytest.mark.parametrize(
    "build, exc",
    [
        (lambda: hello(nonce=b"short"), ValueError),
        (lambda: hello(nonce="00" * 32), TypeError),
        (lambda: hello(version=-1), ValueError),
        (lambda: hello(version=True), TypeError),
        (lambda: hello(max_datagram_payload=70000), ValueError),
        (lambda: request(device_id=2**64), ValueError),
        (lambda: request(device_id=-1), ValueError),
        (lambda: request(client_id=bytes(31)), ValueError),
        (lambda: request(signature=bytes(65)), ValueError),
        (lambda: request(auth_token=b"bytes"), TypeError),
        (lambda: request(auth_token="\ud800"), ValueError),
        (lambda: Packet(bytes(m.MAX_PACKET + 1)), ValueError),
        (lambda: Packet("text"), TypeError),
        (lambda: AuthResponse(accepted=1), TypeError),
        (lambda: accept4(network=None), ValueError),
        (lambda: accept4(assigned_ip=IPv4Address("10.9.0.2")), ValueError),
        (lambda: accept4(server_ip=IPv4Address("10.9.0.1")), ValueError),
        (lambda: accept4(server_ip=IPv4Address("10.8.0.2")), ValueError),
        (lambda: accept4(assigned_ip="10.8.0.2"), TypeError),
        (lambda: accept4(network=IPv6Network("fd00::/64")), TypeError),
        (lambda: accept4(reject_reason="no"), ValueError),
        (lambda: accept4(mtu=67), ValueError),
        (lambda: accept4(mtu=65536), ValueError),
        (lambda: accept4(mtu=1000, **V6), ValueError),
        (lambda: accept4(**{**V6, "server_ip6": None}), ValueError),
        (lambda: accept4(**{**V6, "assigned_ip6": IPv6Address("fd01::2")}), ValueError),
        (lambda: accept4(**{**V6, "assigned_ip6": IPv6Address("fd00::2%eth0")}), ValueError),
        (lambda: AuthResponse(accepted=True), ValueError),
        (lambda: AuthResponse(accepted=True, mtu=1400), ValueError),
        (lambda: AuthResponse(accepted=False, mtu=1400), ValueError),
        (lambda: AuthResponse(accepted=True, temporary=True, **V6), ValueError),
        (lambda: AuthResponse(accepted=False, temporary=1), TypeError),
        (lambda: accept4(accepted=False, mtu=None), ValueError),
        (lambda: AuthResponse(accepted=False, **V6), ValueError),
    ],
)
def test_constructor_rejects_invalid_fields(build, exc):
    with pytest.raises(exc):
        build()


def test_valid_responses():
    accept4()
    AuthResponse(accepted=True, **V6)
    accept4(mtu=1280, **V6)
    accept4(mtu=None)
    AuthResponse(accepted=False)
    AuthResponse(accepted=False, reject_reason="bad token")


# --- encoding ----------------------------------------------------------------------------------


def test_packet_ping_pong_wire_format():
    assert encode_frame(Packet(b"\x45abc")) == b"\x00\x00\x00\x00\x04\x45abc"
    assert encode_frame(Packet(b"")) == b"\x00\x00\x00\x00\x00"
    assert encode_frame(Ping()) == b"\x01"
    assert encode_frame(Pong()) == b"\x02"


def test_largest_packet_encodes():
    frame = encode_frame(Packet(bytes(m.MAX_PACKET)))
    assert frame[:5] == b"\x00\x00\x00\xff\xff"
    assert len(frame) == m.MAX_PACKET + 5


def test_encode_oversized_packet_is_local_misuse():
    pkt = Packet(b"")
    object.__setattr__(pkt, "data", bytes(m.MAX_PACKET + 1))  # sneak past the validator
    with pytest.raises(ValueError):
        encode_frame(pkt)


def test_encode_oversized_control_payload_is_local_misuse():
    with pytest.raises(ValueError):
        encode_frame(request(auth_token="x" * m.MAX_CONTROL_PAYLOAD))


def test_encode_non_frame():
    with pytest.raises(TypeError):
        encode_frame(b"\x01")
    with pytest.raises(TypeError):
        encode_control_payload(Ping())


def test_server_hello_wire_format():
    frame = encode_frame(hello())
    assert frame[0] == m.FRAME_SERVER_HELLO
    (length,) = struct.unpack(">I", frame[1:5])
    assert length == len(frame) - 5
    assert json.loads(frame[5:].decode("utf-8")) == {
        "version": 1,
        "nonce": NONCE.hex(),
        "max_datagram_payload": 1200,
    }


def test_auth_request_json_omits_absent_token():
    obj = json.loads(encode_control_payload(request(auth_token=None)))
    assert obj == {
        "version": 1,
        "device_id": 7,
        "client_id": KEY.hex(),
        "signature": SIG.hex(),
        "max_datagram_payload": 1200,
    }
    assert json.loads(encode_control_payload(request()))["auth_token"] == "vtoken"
    assert encode_frame(request())[0] == m.FRAME_AUTH_REQUEST


def test_auth_response_json():
    obj = json.loads(encode_control_payload(accept4(**V6)))
    assert obj == {
        "accepted": True,
        "assigned_ip": "10.8.0.2",
        "network": "10.8.0.0/24",
        "server_ip": "10.8.0.1",
        "assigned_ip6": "fd00::2",
        "network6": "fd00::/64",
        "server_ip6": "fd00::1",
        "mtu": 1400,
    }
    rejected = AuthResponse(accepted=False, reject_reason="server full")
    assert json.loads(encode_control_payload(rejected)) == {
        "accepted": False,
        "reject_reason": "server full",
    }
    for_now = AuthResponse(accepted=False, reject_reason="server full", temporary=True)
    assert json.loads(encode_control_payload(for_now))["temporary"] is True
    assert encode_frame(rejected)[0] == m.FRAME_AUTH_RESPONSE


def test_non_ascii_text_is_utf8():
    msg = AuthResponse(accepted=False, reject_reason="zu viele Geräte ✗")
    assert "Geräte ✗".encode() in encode_control_payload(msg)
    roundtrip(msg)


# --- round trips -------------------------------------------------------------------------------


@given(frames)
def test_roundtrip_every_frame(msg):
    roundtrip(msg)


@given(st.one_of(hellos, requests, responses(), peer_messages))
def test_payload_roundtrip(msg):
    frame_type = encode_frame(msg)[0]
    assert decode_control_payload_untrusted(frame_type, encode_control_payload(msg)) == msg


@given(st.lists(frames, max_size=12), st.data())
def test_stream_split_anywhere(msgs, data):
    stream = b"".join(encode_frame(msg) for msg in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    out = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == msgs
    assert len(decoder._pending) == 0


def test_byte_at_a_time():
    msgs = [hello(), request(), accept4(), Packet(b"\x60" * 100), Ping(), Pong(), Packet(b"")]
    stream = b"".join(encode_frame(msg) for msg in msgs)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == msgs


def test_feed_accepts_bytearray_and_memoryview():
    stream = encode_frame(Packet(b"\x45" * 10)) + b"\x01"
    assert FrameDecoder().feed(bytearray(stream)) == [Packet(b"\x45" * 10), Ping()]
    assert FrameDecoder().feed(memoryview(stream)) == [Packet(b"\x45" * 10), Ping()]
    assert FrameDecoder().feed(b"") == []


def test_many_small_frames_in_one_chunk_is_linear():
    # 200k pings and 50k small packets in a single feed: quadratic re-slicing would take minutes.
    stream = b"\x01\x02" * 100_000 + encode_frame(Packet(b"\x45" * 20)) * 50_000
    out = FrameDecoder().feed(stream)
    assert len(out) == 250_000
    assert out[0] == Ping() and out[1] == Pong() and out[-1] == Packet(b"\x45" * 20)


def test_large_packet_byte_at_a_time_is_linear():
    stream = encode_frame(Packet(bytes(m.MAX_PACKET)))
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == [Packet(bytes(m.MAX_PACKET))]


def test_buffer_never_exceeds_one_frame():
    big = encode_frame(Packet(bytes(m.MAX_PACKET)))
    decoder = FrameDecoder()
    # Two max-size frames plus a partial third in one chunk: only the partial one is kept.
    out = decoder.feed(big + big + big[:-1])
    assert len(out) == 2
    assert len(decoder._pending) == len(big) - 1 <= m.MAX_PACKET + 5
    # Completing it with a chunk carrying a lot more must not grow the buffer past one frame.
    out = decoder.feed(big[-1:] + big * 3 + big[:100])
    assert len(out) == 4
    assert len(decoder._pending) == 100


# --- decoding failures -------------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", [0x03, 0x0F, 0x17, 0x45, 0x60, 0xFF])
def test_unknown_frame_type(frame_type):
    with pytest.raises(DecodeError):
        FrameDecoder().feed(bytes([frame_type]))


def test_unknown_type_after_partial_frame():
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00") == []
    assert decoder.feed(b"\x00\x01\x45") == [Packet(b"\x45")]
    with pytest.raises(DecodeError):
        decoder.feed(b"\x07")


@pytest.mark.parametrize(
    "frame_type, limit",
    [
        (m.FRAME_PACKET, m.MAX_PACKET),
        (m.FRAME_SERVER_HELLO, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_AUTH_REQUEST, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_AUTH_RESPONSE, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_CANDIDATES, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_PEER_INTRO, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_PEER_GONE, m.MAX_CONTROL_PAYLOAD),
        (m.FRAME_PEER_AUTH, m.MAX_CONTROL_PAYLOAD),
    ],
)
def test_oversized_length_rejected_from_header_alone(frame_type, limit):
    header = struct.pack(">BI", frame_type, limit + 1)
    with pytest.raises(DecodeError):
        FrameDecoder().feed(header)
    # Also when the header arrives in pieces.
    decoder = FrameDecoder()
    assert decoder.feed(header[:3]) == []
    with pytest.raises(DecodeError):
        decoder.feed(header[3:])
    # And when it follows a complete frame in the same chunk.
    with pytest.raises(DecodeError):
        FrameDecoder().feed(b"\x01" + struct.pack(">BI", frame_type, 2**32 - 1))


def test_poisoned_after_error():
    decoder = FrameDecoder()
    with pytest.raises(DecodeError):
        decoder.feed(b"\x01\x02\x99")
    for chunk in (b"", b"\x01", encode_frame(hello())):
        with pytest.raises(DecodeError):
            decoder.feed(chunk)


def test_malformed_control_payload_in_stream_raises():
    bad = b"not json"
    with pytest.raises(DecodeError):
        FrameDecoder().feed(struct.pack(">BI", m.FRAME_SERVER_HELLO, len(bad)) + bad)


GOOD_HELLO = {"version": 1, "nonce": NONCE.hex(), "max_datagram_payload": 1200}
GOOD_REQUEST = json.loads(encode_control_payload(request()))
GOOD_RESPONSE = json.loads(encode_control_payload(accept4(**V6)))


@pytest.mark.parametrize(
    "dns, dns_search",
    [
        (["fe80::1"], []),  # a link-local resolver needs a scope the client cannot know
        (["0.0.0.0"], []),
        (["10.0.0.1"] * (m.MAX_DNS_SERVERS + 1), []),
        (["10.0.0.1"], ["a.example"] * (m.MAX_DNS_SEARCH + 1)),
        (["10.0.0.1"], ["corp.example\nnameserver 6.6.6.6"]),  # a line of its own, injected
        (["10.0.0.1"], ["corp example"]),
        (["10.0.0.1"], [""]),
        (["10.0.0.1"], [7]),
        (["not an address"], []),
        ("10.0.0.1", []),
    ],
)
def test_pushed_dns_that_could_harm_the_client_is_refused(dns, dns_search):
    obj = {**GOOD_RESPONSE, "dns": dns, "dns_search": dns_search}
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(m.FRAME_AUTH_RESPONSE, payload(obj))


def test_pushed_dns_round_trips_and_a_rejection_carries_none():
    msg = accept4(dns=(IPv4Address("10.8.0.1"),), dns_search=("corp.example",))
    assert (
        decode_control_payload_untrusted(m.FRAME_AUTH_RESPONSE, encode_control_payload(msg)) == msg
    )
    with pytest.raises(ValueError):
        AuthResponse(accepted=False, dns=(IPv4Address("10.8.0.1"),))


def test_unknown_keys_ignored_and_null_is_absent():
    obj = {**GOOD_HELLO, "future": {"x": [1, 2]}, "extension": None}
    assert decode_control_payload_untrusted(m.FRAME_SERVER_HELLO, payload(obj)) == hello()
    obj = {**GOOD_REQUEST, "auth_token": None}
    assert decode_control_payload_untrusted(m.FRAME_AUTH_REQUEST, payload(obj)) == request(
        auth_token=None
    )
    obj = {"accepted": False, "reject_reason": None, "mtu": None}
    assert decode_control_payload_untrusted(m.FRAME_AUTH_RESPONSE, payload(obj)) == AuthResponse(
        accepted=False
    )


@pytest.mark.parametrize(
    "frame_type, obj",
    [
        # missing required keys
        (m.FRAME_SERVER_HELLO, {"version": 1, "nonce": NONCE.hex()}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "version": None}),
        (m.FRAME_AUTH_REQUEST, {k: v for k, v in GOOD_REQUEST.items() if k != "signature"}),
        (m.FRAME_AUTH_RESPONSE, {"reject_reason": "x"}),
        # wrong types
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "version": "1"}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "version": True}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "version": 1.0}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": list(NONCE)}),
        (m.FRAME_AUTH_REQUEST, {**GOOD_REQUEST, "auth_token": 5}),
        (m.FRAME_AUTH_REQUEST, {**GOOD_REQUEST, "device_id": "7"}),
        (m.FRAME_AUTH_RESPONSE, {"accepted": 1}),
        (m.FRAME_AUTH_RESPONSE, {"accepted": "true"}),
        (m.FRAME_AUTH_RESPONSE, {"accepted": False, "reject_reason": ["x"]}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "mtu": "1400"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "assigned_ip": 168296450}),
        # bad hex / lengths
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": NONCE.hex()[:-2]}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": NONCE.hex() + "00"}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": NONCE.hex().upper()}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": "zz" * 32}),
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "nonce": " " + NONCE.hex()[1:]}),
        (m.FRAME_AUTH_REQUEST, {**GOOD_REQUEST, "client_id": KEY.hex()[:62]}),
        (m.FRAME_AUTH_REQUEST, {**GOOD_REQUEST, "signature": SIG.hex() * 2}),
        # out of range
        (m.FRAME_SERVER_HELLO, {**GOOD_HELLO, "max_datagram_payload": -1}),
        (m.FRAME_AUTH_REQUEST, {**GOOD_REQUEST, "device_id": 2**64}),
        # invalid responses
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "network": "10.8.0.1/24"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "assigned_ip": "10.8.1.2"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "assigned_ip": "10.8.0.1"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "assigned_ip": "010.8.0.2"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "assigned_ip": "fd00::2"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "server_ip6": None}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "server_ip6": "fd00::1%eth0"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "network6": "fd00::%1/64"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "mtu": 1279}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "reject_reason": "but no"}),
        (m.FRAME_AUTH_RESPONSE, {"accepted": True}),
        (m.FRAME_AUTH_RESPONSE, {"accepted": True, "network": "10.0.0.0/8"}),
        (m.FRAME_AUTH_RESPONSE, {**GOOD_RESPONSE, "accepted": False}),
        # not an object
        (m.FRAME_SERVER_HELLO, [GOOD_HELLO]),
        (m.FRAME_SERVER_HELLO, "hello"),
        (m.FRAME_AUTH_RESPONSE, None),
    ],
)
def test_decode_rejects(frame_type, obj):
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(frame_type, payload(obj))
    frame = struct.pack(">BI", frame_type, len(payload(obj))) + payload(obj)
    with pytest.raises(DecodeError):
        FrameDecoder().feed(frame)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf{}",  # UTF-8 BOM
        '{"version": 1}'.encode("utf-16"),
        b'{"accepted": false, "reject_reason": "\xc3"}',  # invalid UTF-8
        b'{"accepted": false, "reject_reason": "\\ud800"}',  # lone surrogate
        b'{"accepted": false, "accepted": true}',  # duplicate key
        b'{"accepted": false, "mtu": NaN}',
        b'{"accepted": false, "mtu": Infinity}',
        b'{"accepted": false, "mtu": 1e999}',
        b"[" * 4000 + b"]" * 4000,
        b'{"a":' * 800 + b"1" + b"}" * 800,
        b'{"accepted": false} trailing',
        b"{'accepted': false}",
    ],
)
def test_decode_rejects_bad_json(raw):
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(m.FRAME_AUTH_RESPONSE, raw)


def test_decode_payload_limits_and_types():
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(m.FRAME_PACKET, payload(GOOD_HELLO))
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(0x99, payload(GOOD_HELLO))
    padded = payload({**GOOD_HELLO, "pad": "x" * m.MAX_CONTROL_PAYLOAD})
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(m.FRAME_SERVER_HELLO, padded)
    # Exactly at the limit is fine.
    obj = {**GOOD_HELLO, "pad": ""}
    obj["pad"] = "x" * (m.MAX_CONTROL_PAYLOAD - len(payload(obj)))
    assert len(payload(obj)) == m.MAX_CONTROL_PAYLOAD
    assert decode_control_payload_untrusted(m.FRAME_SERVER_HELLO, payload(obj)) == hello()
    assert FrameDecoder().feed(
        struct.pack(">BI", m.FRAME_SERVER_HELLO, m.MAX_CONTROL_PAYLOAD) + payload(obj)
    ) == [hello()]


def test_liberal_address_forms():
    obj = {**GOOD_RESPONSE, "network6": "FD00:0:0:0::/64", "assigned_ip6": "FD00::2"}
    msg = decode_control_payload_untrusted(m.FRAME_AUTH_RESPONSE, payload(obj))
    assert msg == accept4(**V6)


# --- fuzzing: arbitrary input gives a value or DecodeError, nothing else -----------------------


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_frame_decoder_random_bytes(data):
    decoder = FrameDecoder()
    try:
        out = decoder.feed(data)
    except DecodeError:
        return
    assert all(isinstance(f, Packet | Ping | Pong | m.ControlMessage) for f in out)


@given(st.lists(st.binary(max_size=40), max_size=10))
def test_fuzz_frame_decoder_chunks(chunks):
    decoder = FrameDecoder()
    failed = False
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except DecodeError:
            failed = True
            continue
        assert not failed, "a poisoned decoder accepted input"


@settings(max_examples=300)
@given(st.sampled_from([0x10, 0x11, 0x12]), st.binary(max_size=200))
def test_fuzz_payload_random_bytes(frame_type, raw):
    try:
        decode_control_payload_untrusted(frame_type, raw)
    except DecodeError:
        pass


@settings(max_examples=300)
@given(st.sampled_from([0x10, 0x11, 0x12]), json_values)
def test_fuzz_payload_random_json(frame_type, value):
    try:
        decode_control_payload_untrusted(frame_type, payload(value))
    except DecodeError:
        pass


@settings(max_examples=500)
@given(
    st.sampled_from(
        [
            (m.FRAME_SERVER_HELLO, GOOD_HELLO),
            (m.FRAME_AUTH_REQUEST, GOOD_REQUEST),
            (m.FRAME_AUTH_RESPONSE, GOOD_RESPONSE),
            (m.FRAME_AUTH_RESPONSE, {"accepted": False, "reject_reason": "x"}),
        ]
    ),
    st.dictionaries(
        st.sampled_from(sorted({*GOOD_REQUEST, *GOOD_RESPONSE, *GOOD_HELLO})),
        json_values
        | st.sampled_from(["10.8.0.7", "10.8.0.0/24", "fd00::9", "fd00::/64", "00" * 32]),
        max_size=3,
    ),
)
def test_fuzz_payload_mutated_fields(base, changes):
    # Mutations of valid messages reach the deeper validation paths.
    frame_type, obj = base
    try:
        decode_control_payload_untrusted(frame_type, payload({**obj, **changes}))
    except DecodeError:
        pass


# --- auth transcript ---------------------------------------------------------------------------


BINDING = bytes(range(32))


def test_auth_transcript_layout():
    server = bytes([1]) * 32
    client = bytes([2]) * 32
    t = auth_transcript(NONCE, server, client, 0x0102030405060708, BINDING)
    assert t == (
        b"tunnel-auth-v2\x00" + NONCE + server + client + bytes([1, 2, 3, 4, 5, 6, 7, 8]) + BINDING
    )
    assert len(t) == 15 + 32 + 32 + 32 + 8 + 32


def test_auth_transcript_binds_every_field():
    base = (NONCE, KEY, bytes(32), 1, BINDING)
    variants = {
        auth_transcript(*base),
        auth_transcript(bytes(32), KEY, bytes(32), 1, BINDING),
        auth_transcript(NONCE, bytes(32), KEY, 1, BINDING),
        auth_transcript(NONCE, bytes(32), bytes(32), 1, BINDING),
        auth_transcript(NONCE, KEY, bytes(32), 2, BINDING),
        auth_transcript(NONCE, KEY, bytes(32), 1, bytes(32)),
    }
    assert len(variants) == 6


@pytest.mark.parametrize(
    "args",
    [
        (NONCE[:31], KEY, KEY, 1, BINDING),
        (NONCE, KEY + b"x", KEY, 1, BINDING),
        (NONCE, KEY, KEY[:1], 1, BINDING),
        (NONCE, KEY, KEY, -1, BINDING),
        (NONCE, KEY, KEY, 2**64, BINDING),
        (NONCE, KEY, KEY, "1", BINDING),
        (NONCE, KEY, KEY, 1, BINDING[:31]),
    ],
)
def test_auth_transcript_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        auth_transcript(*args)


# -- direct paths between clients -------------------------------------------------------------


def test_peer_frames_wire_format():
    intro = PeerIntro(
        peer_id=KEY,
        addresses=(IPv4Address("10.78.0.3"), IPv6Address("fd78::3")),
        endpoints=((IPv4Address("198.51.100.7"), 40000), (IPv6Address("2001:db8::7"), 40000)),
        secret=NONCE,
    )
    assert json.loads(encode_control_payload(intro)) == {
        "peer_id": KEY.hex(),
        "addresses": ["10.78.0.3", "fd78::3"],
        "endpoints": [["198.51.100.7", 40000], ["2001:db8::7", 40000]],
        "secret": NONCE.hex(),
    }
    assert encode_frame(PeerGone(KEY))[0] == m.FRAME_PEER_GONE


def test_peers_flags_are_omitted_when_off_so_older_peers_see_nothing_new():
    plain = ServerHello(version=2, nonce=NONCE, max_datagram_payload=1200)
    assert "peers" not in json.loads(encode_control_payload(plain))
    offered = ServerHello(version=2, nonce=NONCE, max_datagram_payload=1200, peers=True)
    assert json.loads(encode_control_payload(offered))["peers"] is True


@pytest.mark.parametrize(
    "build",
    [
        lambda: Candidates(endpoints=((IPv4Address("192.0.2.1"), 0),)),  # port 0
        lambda: Candidates(endpoints=((IPv4Address("192.0.2.1"), 1),) * (m.MAX_ENDPOINTS + 1)),
        lambda: Candidates(endpoints=(("192.0.2.1", 1),)),  # not an address object
        lambda: PeerIntro(peer_id=KEY, addresses=(), endpoints=(), secret=NONCE),
        lambda: PeerIntro(
            peer_id=KEY,
            addresses=(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")),  # two IPv4
            endpoints=(),
            secret=NONCE,
        ),
        lambda: PeerIntro(
            peer_id=KEY, addresses=(IPv4Address("10.0.0.1"),), endpoints=(), secret=b"x"
        ),
    ],
)
def test_peer_messages_reject_invalid_fields(build):
    with pytest.raises((ValueError, TypeError)):
        build()


@pytest.mark.parametrize(
    "frame_type, obj",
    [
        (m.FRAME_CANDIDATES, {}),
        (m.FRAME_CANDIDATES, {"endpoints": [["192.0.2.1"]]}),
        (m.FRAME_CANDIDATES, {"endpoints": [["192.0.2.1", 0]]}),
        (m.FRAME_CANDIDATES, {"endpoints": [["192.0.2.1", True]]}),
        (m.FRAME_CANDIDATES, {"endpoints": [["not an address", 1]]}),
        (m.FRAME_CANDIDATES, {"endpoints": [[1, 1]]}),
        (m.FRAME_CANDIDATES, {"endpoints": [["192.0.2.1", 1]] * (m.MAX_ENDPOINTS + 1)}),
        (m.FRAME_PEER_INTRO, {"peer_id": KEY.hex(), "addresses": [], "endpoints": []}),
        (
            m.FRAME_PEER_INTRO,
            {
                "peer_id": KEY.hex(),
                "addresses": ["10.0.0.1", "fd00::1", "10.0.0.2"],
                "endpoints": [],
                "secret": NONCE.hex(),
            },
        ),
        (m.FRAME_PEER_GONE, {"peer_id": "00"}),
        (m.FRAME_PEER_AUTH, {"client_id": KEY.hex(), "signature": SIG.hex()}),
    ],
)
def test_decode_rejects_bad_peer_messages(frame_type, obj):
    with pytest.raises(DecodeError):
        decode_control_payload_untrusted(frame_type, json.dumps(obj).encode())


def test_peer_transcript_is_distinct_from_the_server_transcript():
    binding = bytes(32)
    peer = peer_transcript(NONCE, KEY, SIG[:32], binding)
    server = auth_transcript(NONCE, KEY, SIG[:32], 0, binding)
    assert peer != server and not server.startswith(peer[:15])
    with pytest.raises(ValueError):
        peer_transcript(NONCE[:31], KEY, KEY, binding)
