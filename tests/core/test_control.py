"""The control-stream rules of both ends, fed frames directly."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.control import (
    CONTROL_STREAM,
    HELLO_STREAM,
    PONG_BURST,
    ClientControl,
    PeerControl,
    Phase,
    ServerControl,
)
from tunnel.core.messages import (
    CLOSE_PROTOCOL,
    AuthRequest,
    AuthResponse,
    Candidates,
    Packet,
    PeerAuth,
    PeerGone,
    PeerIntro,
    Ping,
    Pong,
    ServerHello,
    encode_frame,
)
from tunnel.errors import ProtocolViolation

REQUEST = AuthRequest(
    version=2,
    device_id=7,
    client_id=bytes(32),
    auth_token=None,
    signature=bytes(64),
    max_datagram_payload=1400,
)
HELLO = ServerHello(version=2, nonce=bytes(32), max_datagram_payload=1400)
ACCEPT = AuthResponse(
    accepted=True,
    assigned_ip=IPv4Address("10.8.0.2"),
    network=IPv4Network("10.8.0.0/24"),
    server_ip=IPv4Address("10.8.0.1"),
)
REJECT = AuthResponse(accepted=False, reject_reason="no")
PING, PONG = encode_frame(Ping()), encode_frame(Pong())


def violation(call, *args) -> str:
    with pytest.raises(ProtocolViolation) as info:
        call(*args)
    assert info.value.close_code == CLOSE_PROTOCOL
    return info.value.reason


def established_server() -> ServerControl:
    server = ServerControl()
    assert server.stream_data(CONTROL_STREAM, encode_frame(REQUEST), False, 0.0).auth == REQUEST
    server.established()
    return server


# --- the server's side -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame", [Ping(), Pong(), Packet(b"\x45" + bytes(19)), ACCEPT, HELLO], ids=repr
)
def test_server_accepts_nothing_but_the_request_before_authentication(frame):
    reason = violation(ServerControl().stream_data, CONTROL_STREAM, encode_frame(frame), False, 0)
    assert reason == f"{type(frame).__name__} before authentication"


def test_server_refuses_frames_behind_the_request_in_the_same_batch():
    reason = violation(
        ServerControl().stream_data, CONTROL_STREAM, encode_frame(REQUEST) + PING, False, 0.0
    )
    assert reason == "Ping before authentication"


def test_server_refuses_a_second_request():
    server = established_server()
    assert violation(server.stream_data, CONTROL_STREAM, encode_frame(REQUEST), False, 1.0) == (
        "a second AuthRequest"
    )


def test_server_refuses_datagrams_before_authentication_only():
    server = ServerControl()
    assert violation(server.datagram) == "DATAGRAM before authentication"
    established_server().datagram()


@pytest.mark.parametrize("stream_id", [1, 2, 3, 4, 8])
def test_server_refuses_every_other_stream(stream_id):
    assert violation(established_server().stream_data, stream_id, PING, False, 1.0) == (
        f"unexpected stream {stream_id}"
    )


def test_resets_stop_sending_and_fin_end_the_connection():
    server = established_server()
    assert "reset" in violation(server.stream_reset, CONTROL_STREAM)
    assert "STOP_SENDING" in violation(server.stop_sending, CONTROL_STREAM)
    assert "finished" in violation(server.stream_data, CONTROL_STREAM, b"", True, 1.0)
    client = ClientControl()
    assert "reset" in violation(client.stream_reset, HELLO_STREAM)
    assert "STOP_SENDING" in violation(client.stop_sending, CONTROL_STREAM)


def test_server_carries_packets_and_answers_pings_once_established():
    server = established_server()
    packet = b"\x45" + bytes(19)
    received = server.stream_data(
        CONTROL_STREAM, encode_frame(Packet(packet)) + PING + PONG, False, 1.0
    )
    assert received.packets == [packet]
    assert received.answer_ping and received.pong_seen


def test_a_flood_of_pings_gets_one_pong_per_batch_and_a_bounded_budget():
    server = established_server()
    first = server.stream_data(CONTROL_STREAM, PING * 10_000, False, 1.0)
    assert first.answer_ping and first.pings_ignored == 0  # coalesced into one answer
    answered = sum(
        server.stream_data(CONTROL_STREAM, PING, False, 1.0).answer_ping for _ in range(100)
    )
    assert answered == PONG_BURST - 1  # the burst is spent; nothing more at the same instant
    assert server.stream_data(CONTROL_STREAM, PING, False, 2.0).answer_ping  # it refills


def test_a_malformed_or_oversized_frame_is_a_violation():
    assert "malformed" in violation(
        ServerControl().stream_data, CONTROL_STREAM, b"\x00\xff\xff\xff\xff", False, 0.0
    )
    assert "malformed" in violation(ServerControl().stream_data, CONTROL_STREAM, b"\x77", False, 0)


@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64), st.booleans()), max_size=20))
def test_server_raises_nothing_but_violations(chunks):
    server = ServerControl()
    for stream_id, data, fin in chunks:
        try:
            received = server.stream_data(stream_id, data, fin, 0.0)
        except ProtocolViolation:
            return
        if received.auth is not None:
            server.established()


# --- the client's side -------------------------------------------------------------------------


def test_client_takes_the_hello_then_one_response():
    client = ClientControl()
    assert client.stream_data(HELLO_STREAM, encode_frame(HELLO), False, 0.0).hello == HELLO
    client.request_sent()
    received = client.stream_data(CONTROL_STREAM, encode_frame(ACCEPT) + PONG, False, 0.0)
    assert received.response == ACCEPT and received.pong_seen
    assert client.phase is Phase.ESTABLISHED
    assert violation(client.stream_data, CONTROL_STREAM, encode_frame(ACCEPT), False, 0.0) == (
        "a second accepting AuthResponse"
    )


def test_client_takes_a_rejection_after_establishment_as_a_revocation():
    client = ClientControl()
    client.stream_data(HELLO_STREAM, encode_frame(HELLO), False, 0.0)
    client.request_sent()
    client.stream_data(CONTROL_STREAM, encode_frame(ACCEPT), False, 0.0)
    assert client.stream_data(CONTROL_STREAM, encode_frame(REJECT), False, 0.0).response == REJECT


def test_client_refuses_what_comes_out_of_order():
    assert "before we asked" in violation(
        ClientControl().stream_data, CONTROL_STREAM, encode_frame(ACCEPT), False, 0.0
    )
    client = ClientControl()
    client.stream_data(HELLO_STREAM, encode_frame(HELLO), False, 0.0)
    assert "hello stream" in violation(
        client.stream_data, HELLO_STREAM, encode_frame(HELLO), False, 0.0
    )
    client.request_sent()
    assert "before the AuthResponse" in violation(
        client.stream_data, CONTROL_STREAM, PING, False, 0.0
    )
    assert "unexpected stream 7" == violation(client.stream_data, 7, b"", False, 0.0)


@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64), st.booleans()), max_size=20))
def test_client_raises_nothing_but_violations(chunks):
    client = ClientControl()
    for stream_id, data, fin in chunks:
        try:
            if client.stream_data(stream_id, data, fin, 0.0).hello is not None:
                client.request_sent()
        except ProtocolViolation:
            return


# --- direct paths --------------------------------------------------------------------------------

CANDIDATES = Candidates(endpoints=((IPv6Address("2001:db8::2"), 40000),))
INTRO = PeerIntro(
    peer_id=bytes(range(32)),
    addresses=(IPv4Address("10.8.0.3"),),
    endpoints=((IPv4Address("198.51.100.9"), 40001),),
    secret=bytes(32),
)
GONE = PeerGone(peer_id=bytes(range(32)))
PEER_AUTH = PeerAuth(client_id=bytes(32), signature=bytes(64), max_datagram_payload=1400)


def established_client(*, peers: bool) -> ClientControl:
    client = ClientControl()
    client.stream_data(HELLO_STREAM, encode_frame(HELLO), False, 0.0)
    client.request_sent(peers=peers)
    client.stream_data(CONTROL_STREAM, encode_frame(ACCEPT), False, 0.0)
    return client


def test_server_takes_candidates_only_from_a_client_that_takes_peers():
    server = ServerControl()
    server.stream_data(CONTROL_STREAM, encode_frame(REQUEST), False, 0.0)
    server.established(peers=True)
    frames = encode_frame(CANDIDATES) + encode_frame(Candidates(endpoints=()))
    assert server.stream_data(CONTROL_STREAM, frames, False, 0.0).candidates == Candidates(())
    assert "takes no peers" in violation(
        established_server().stream_data, CONTROL_STREAM, encode_frame(CANDIDATES), False, 0.0
    )
    before = ServerControl()
    assert "before authentication" in violation(
        before.stream_data, CONTROL_STREAM, encode_frame(CANDIDATES), False, 0.0
    )


@pytest.mark.parametrize("frame", [INTRO, GONE, PEER_AUTH], ids=repr)
def test_server_refuses_what_only_clients_are_sent(frame):
    server = ServerControl()
    server.stream_data(CONTROL_STREAM, encode_frame(REQUEST), False, 0.0)
    server.established(peers=True)
    assert violation(server.stream_data, CONTROL_STREAM, encode_frame(frame), False, 0.0)


def test_client_takes_introductions_only_when_it_asked_for_them():
    client = established_client(peers=True)
    received = client.stream_data(
        CONTROL_STREAM, encode_frame(INTRO) + encode_frame(GONE), False, 0.0
    )
    assert received.intros == [INTRO] and received.gone == [GONE.peer_id]
    for frame in (INTRO, GONE):
        assert "take no peers" in violation(
            established_client(peers=False).stream_data,
            CONTROL_STREAM,
            encode_frame(frame),
            False,
            0.0,
        )
    early = ClientControl()
    early.stream_data(HELLO_STREAM, encode_frame(HELLO), False, 0.0)
    early.request_sent(peers=True)
    assert "before the AuthResponse" in violation(
        early.stream_data, CONTROL_STREAM, encode_frame(INTRO), False, 0.0
    )
    assert violation(
        established_client(peers=True).stream_data,
        CONTROL_STREAM,
        encode_frame(CANDIDATES),
        False,
        0.0,
    )


def test_peer_responder_takes_the_peer_auth_first_and_once():
    responder = PeerControl(initiator=False)
    assert "before the PeerAuth" in violation(
        responder.stream_data, CONTROL_STREAM, PING, False, 0.0
    )
    responder = PeerControl(initiator=False)
    assert "before the PeerAuth" in violation(responder.datagram)
    received = responder.stream_data(CONTROL_STREAM, encode_frame(PEER_AUTH) + PING, False, 0.0)
    assert received.peer_auth == PEER_AUTH and received.answer_ping
    responder.datagram()  # accepted now
    assert "unexpected PeerAuth" in violation(
        responder.stream_data, CONTROL_STREAM, encode_frame(PEER_AUTH), False, 0.0
    )


@pytest.mark.parametrize("frame", [PEER_AUTH, REQUEST, HELLO, ACCEPT, INTRO, CANDIDATES], ids=repr)
def test_peer_initiator_takes_data_only(frame):
    initiator = PeerControl(initiator=True)
    packet = encode_frame(Packet(b"\x45" + bytes(19)))
    assert initiator.stream_data(CONTROL_STREAM, packet + PONG, False, 0.0).pong_seen
    assert violation(initiator.stream_data, CONTROL_STREAM, encode_frame(frame), False, 0.0)


@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=64), st.booleans()), max_size=20),
)
def test_peer_control_raises_nothing_but_violations(initiator, chunks):
    control = PeerControl(initiator=initiator)
    for stream_id, data, fin in chunks:
        try:
            control.stream_data(stream_id, data, fin, 0.0)
            control.datagram()
        except ProtocolViolation:
            return
