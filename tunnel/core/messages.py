"""The wire protocol: handshake messages, stream framing and datagram kinds.

See docs/ARCHITECTURE.md, "The connection" and "The data path". Everything here is sans-IO.

On a stream every unit is a *frame*:

* control messages (``ServerHello``, ``AuthRequest``, ``AuthResponse``; for direct paths
  between clients ``Candidates``, ``PeerIntro``, ``PeerGone`` and ``PeerAuth``):
  ``type (u8) + length (u32 BE) + payload``, the payload a UTF-8 JSON object of at most
  ``MAX_CONTROL_PAYLOAD`` bytes;
* ``Packet``: ``0x00 + length (u32 BE) + IP packet`` (at most ``MAX_PACKET`` bytes);
* ``Ping``: the single byte ``0x01``; ``Pong``: the single byte ``0x02``.

In the JSON payloads bytes fields are lowercase hex, addresses and networks are strings, optional
fields that are ``None`` are omitted (``null`` is read as absent), and unknown keys are ignored so
a newer peer can add fields. Address strings are parsed with :mod:`ipaddress`, so any form it
accepts is read; we always write the canonical form.

Errors follow h11: *local misuse* (building a message with bad fields, encoding something too big)
raises ``ValueError`` or ``TypeError``; *remote misbehaviour* (bytes from the peer) raises
:class:`~tunnel.errors.DecodeError` and nothing else. The message classes validate themselves on
construction, so a decoded message is always a valid one.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, TypeAlias, TypeVar

import attrs

from tunnel.core.resolvconf import valid_search_domain
from tunnel.errors import DecodeError

__all__ = [
    "CLOSE_OK",
    "CLOSE_REJECTED",
    "CLOSE_PROTOCOL",
    "CLOSE_HANDSHAKE_TIMEOUT",
    "CLOSE_REPLACED",
    "CLOSE_SHUTDOWN",
    "CLOSE_IDENTITY",
    "CLOSE_RATE_LIMITED",
    "CLOSE_INTERNAL",
    "CLOSE_KICKED",
    "ALPN",
    "PEER_ALPN",
    "DATAGRAM_PING",
    "DATAGRAM_PONG",
    "FRAME_AUTH_REQUEST",
    "FRAME_CANDIDATES",
    "FRAME_PEER_AUTH",
    "FRAME_PEER_GONE",
    "FRAME_PEER_INTRO",
    "FRAME_AUTH_RESPONSE",
    "FRAME_PACKET",
    "FRAME_PING",
    "FRAME_PONG",
    "FRAME_SERVER_HELLO",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DNS_SEARCH",
    "MAX_DNS_SERVERS",
    "MAX_ENDPOINTS",
    "MAX_PACKET",
    "PROTOCOL_VERSION",
    "AuthRequest",
    "Address",
    "AuthResponse",
    "Candidates",
    "ControlMessage",
    "Endpoint",
    "Frame",
    "FrameDecoder",
    "Packet",
    "PeerAuth",
    "PeerGone",
    "PeerIntro",
    "Ping",
    "Pong",
    "ServerHello",
    "auth_transcript",
    "peer_transcript",
    "decode_control_payload_untrusted",
    "encode_control_payload",
    "encode_frame",
    "exact_bytes",
]

PROTOCOL_VERSION = 2
ALPN = "tunnel/1"
PEER_ALPN = "tunnel-peer/1"  # a direct connection between two clients: never a server's

FRAME_PACKET = 0x00
FRAME_PING = 0x01
FRAME_PONG = 0x02
FRAME_SERVER_HELLO = 0x10
FRAME_AUTH_REQUEST = 0x11
FRAME_AUTH_RESPONSE = 0x12
FRAME_CANDIDATES = 0x13  # client -> server: where the client can be reached directly
FRAME_PEER_INTRO = 0x14  # server -> client: another client, and how to reach it
FRAME_PEER_GONE = 0x15  # server -> client: that client is no longer reachable through us
FRAME_PEER_AUTH = 0x16  # peer -> peer: the initiator's proof on a direct connection

# At most this many underlay endpoints per client: a client could report a million.
MAX_ENDPOINTS = 8
# Pushed DNS: glibc reads at most three nameservers and six search domains (MAXNS, MAXDNSRCH).
MAX_DNS_SERVERS = 3
MAX_DNS_SEARCH = 6

MAX_CONTROL_PAYLOAD = 4096
MAX_PACKET = 65535

# A datagram holds either one bare IP packet (first nibble 4 or 6) or one of these single bytes.
DATAGRAM_PING = b"\x01"
DATAGRAM_PONG = b"\x02"

# QUIC application error codes our CONNECTION_CLOSE frames carry (the reason travels as the
# close's reason phrase).
CLOSE_OK = 0x0
CLOSE_REJECTED = 0x100  # the tunnel handshake was refused: permanent for the client
CLOSE_PROTOCOL = 0x101  # the peer broke the protocol
CLOSE_HANDSHAKE_TIMEOUT = 0x102
CLOSE_REPLACED = 0x103  # the same client and device connected again
CLOSE_SHUTDOWN = 0x104  # the server is stopping
CLOSE_IDENTITY = 0x105  # the client refused the server's identity
CLOSE_RATE_LIMITED = 0x106  # too many failed attempts: temporary for the client
CLOSE_INTERNAL = 0x107  # something failed on our side while handling this connection
CLOSE_KICKED = 0x108  # the operator closed this session (`tunnel kick`): the client may return

NONCE_SIZE = 32
BINDING_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
# RFC 791 and RFC 8200 minimum link MTUs.
_MIN_MTU4 = 68
_MIN_MTU6 = 1280

_HEADER = struct.Struct(">BI")
_HEADER_SIZE = _HEADER.size
_TRANSCRIPT_LABEL = b"tunnel-auth-v2\x00"
_PEER_TRANSCRIPT_LABEL = b"tunnel-peer-v1\x00"
_DEVICE_ID = struct.Struct(">Q")

_T = TypeVar("_T")
# What attrs takes as a field validator (its own alias for it is private).
_Validator: TypeAlias = Callable[[Any, "attrs.Attribute[_T]", _T], Any]


# --- validators shared by the message classes --------------------------------------------------


def _int_in(lo: int, hi: int) -> _Validator[Any]:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{attribute.name} must be in {lo}..{hi}, not {value}")

    return check


def exact_bytes(size: int) -> _Validator[Any]:
    """An attrs validator: ``bytes`` of exactly ``size`` (TypeError, ValueError otherwise)."""

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{attribute.name} must be bytes, not {type(value).__name__}")
        if len(value) != size:
            raise ValueError(f"{attribute.name} must be {size} bytes, not {len(value)}")

    return check


def _optional_text(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str or None, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: JSON can carry them as escapes, but nothing downstream wants them.
        raise ValueError(f"{attribute.name} is not encodable as UTF-8") from None


def _optional(cls: type[_T]) -> _Validator[_T | None]:
    return attrs.validators.optional(attrs.validators.instance_of(cls))


def _check_triple(assigned: Any, network: Any, server: Any, suffix: str) -> bool:
    """Validate one address family's (assigned, network, server) triple; True if present."""
    names = f"assigned_ip{suffix}, network{suffix} and server_ip{suffix}"
    present = (assigned is not None, network is not None, server is not None)
    if not any(present):
        return False
    if not all(present):
        raise ValueError(f"{names} must be given together")
    if suffix == "6" and (
        assigned.scope_id is not None
        or server.scope_id is not None
        or network.network_address.scope_id is not None
    ):
        raise ValueError(f"{names} must not carry a scope ID")
    if assigned not in network:
        raise ValueError(f"assigned_ip{suffix} {assigned} is outside network{suffix} {network}")
    if server not in network:
        raise ValueError(f"server_ip{suffix} {server} is outside network{suffix} {network}")
    if assigned == server:
        raise ValueError(f"assigned_ip{suffix} and server_ip{suffix} are both {assigned}")
    return True


# --- messages ----------------------------------------------------------------------------------


@attrs.frozen
class ServerHello:
    """First message of the server, on its first unidirectional stream.

    ``nonce`` is 32 fresh random bytes the client must sign; ``max_datagram_payload`` is the
    largest QUIC datagram payload the server accepts (0: none); ``peers``: the server
    introduces clients to each other for direct paths (its ``client_to_client`` is on).
    """

    version: int = attrs.field(validator=_int_in(0, _U32_MAX))
    nonce: bytes = attrs.field(validator=exact_bytes(NONCE_SIZE))
    max_datagram_payload: int = attrs.field(validator=_int_in(0, MAX_PACKET))
    peers: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@attrs.frozen
class AuthRequest:
    """The client's credentials, first frame on bidirectional stream 0.

    ``signature`` is Ed25519 by ``client_id`` over
    ``auth_transcript(nonce, server_key, client_id, device_id, binding)``.
    """

    version: int = attrs.field(validator=_int_in(0, _U32_MAX))
    device_id: int = attrs.field(validator=_int_in(0, _U64_MAX))
    client_id: bytes = attrs.field(validator=exact_bytes(PUBLIC_KEY_SIZE))
    auth_token: str | None = attrs.field(validator=_optional_text)
    signature: bytes = attrs.field(validator=exact_bytes(SIGNATURE_SIZE))
    max_datagram_payload: int = attrs.field(validator=_int_in(0, MAX_PACKET))
    peers: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """The client takes peer introductions (its ``peer_to_peer`` is on): without it, the
    server never sends it a frame it would not know."""


@attrs.frozen
class AuthResponse:
    """The server's verdict, on stream 0.

    Accepted: no ``reject_reason``, and a complete IPv4 triple (``assigned_ip``, ``network``,
    ``server_ip``), a complete IPv6 triple (``assigned_ip6``, ``network6``, ``server_ip6``) or
    both, each with both addresses inside the network and distinct; ``mtu`` optional (at least
    68, or 1280 with IPv6); ``dns`` (resolver addresses, at most ``MAX_DNS_SERVERS``) and
    ``dns_search`` (search domains, at most ``MAX_DNS_SEARCH``, each a plain DNS name: they end
    up in the client's resolver configuration) optional. Rejected: optional ``reject_reason``,
    nothing else.
    Construction raises ``ValueError``/``TypeError`` if these rules are broken.
    """

    accepted: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    reject_reason: str | None = attrs.field(default=None, validator=_optional_text)
    assigned_ip: IPv4Address | None = attrs.field(default=None, validator=_optional(IPv4Address))
    network: IPv4Network | None = attrs.field(default=None, validator=_optional(IPv4Network))
    server_ip: IPv4Address | None = attrs.field(default=None, validator=_optional(IPv4Address))
    assigned_ip6: IPv6Address | None = attrs.field(default=None, validator=_optional(IPv6Address))
    network6: IPv6Network | None = attrs.field(default=None, validator=_optional(IPv6Network))
    server_ip6: IPv6Address | None = attrs.field(default=None, validator=_optional(IPv6Address))
    mtu: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_int_in(_MIN_MTU4, MAX_PACKET))
    )
    temporary: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """Rejected for a reason that may pass (server full, no free address): try again later."""
    dns: tuple[Address, ...] = attrs.field(default=(), validator=lambda i, a, v: _check_dns(v))
    dns_search: tuple[str, ...] = attrs.field(
        default=(), validator=lambda i, a, v: _check_dns_search(v)
    )

    def __attrs_post_init__(self) -> None:
        if self.accepted and self.temporary:
            raise ValueError("an accepted AuthResponse is not temporary")
        if not self.accepted and (self.dns or self.dns_search):
            raise ValueError("a rejecting AuthResponse carries no dns")
        has4 = _check_triple(self.assigned_ip, self.network, self.server_ip, "")
        has6 = _check_triple(self.assigned_ip6, self.network6, self.server_ip6, "6")
        if self.accepted:
            if self.reject_reason is not None:
                raise ValueError("an accepted AuthResponse carries no reject_reason")
            if not (has4 or has6):
                raise ValueError("an accepted AuthResponse needs an IPv4 or an IPv6 assignment")
            if has6 and self.mtu is not None and self.mtu < _MIN_MTU6:
                raise ValueError(f"mtu {self.mtu} is below the IPv6 minimum of {_MIN_MTU6}")
        elif has4 or has6 or self.mtu is not None:
            raise ValueError("a rejecting AuthResponse carries no addresses and no mtu")


def _check_dns(value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_DNS_SERVERS:
        raise ValueError(f"dns must be a tuple of at most {MAX_DNS_SERVERS} addresses")
    for address in value:
        if not isinstance(address, IPv4Address | IPv6Address):
            raise TypeError(f"dns holds {type(address).__name__}, not an address")
        if address.is_unspecified or address.is_multicast or address.is_link_local:
            # A link-local resolver would need a scope the client cannot know.
            raise ValueError(f"dns: {address} cannot be a resolver address")


def _check_dns_search(value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_DNS_SEARCH:
        raise ValueError(f"dns_search must be a tuple of at most {MAX_DNS_SEARCH} domains")
    for domain in value:
        if not isinstance(domain, str) or not valid_search_domain(domain):
            raise ValueError(f"dns_search: not a domain name: {domain!r}")


Address: TypeAlias = IPv4Address | IPv6Address
Endpoint: TypeAlias = tuple[Address, int]  # an underlay address and UDP port


def _check_endpoints(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{attribute.name} must be a tuple")
    if len(value) > MAX_ENDPOINTS:
        raise ValueError(f"{attribute.name}: {len(value)} endpoints, at most {MAX_ENDPOINTS}")
    for item in value:
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or not isinstance(item[0], IPv4Address | IPv6Address)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int)
            or not 1 <= item[1] <= 65535
        ):
            raise ValueError(f"{attribute.name}: not an (address, port) pair: {item!r}")


def _check_tunnel_addresses(
    _instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 2:
        raise ValueError(f"{attribute.name} must hold one or two addresses")
    if not all(isinstance(a, IPv4Address | IPv6Address) for a in value):
        raise TypeError(f"{attribute.name} must hold addresses")
    if len({a.version for a in value}) != len(value):
        raise ValueError(f"{attribute.name}: at most one address of each family")


@attrs.frozen
class Candidates:
    """The client's own underlay endpoints (interface addresses with the port of the socket it
    talks to the server from), for the server to pass on in introductions. The server adds the
    endpoint it observes itself, first."""

    endpoints: tuple[Endpoint, ...] = attrs.field(validator=_check_endpoints)


@attrs.frozen
class PeerIntro:
    """The server introduces another client: its key (its identity on a direct path), its
    tunnel addresses, the endpoints to try, and a secret only the two of them and the server
    know (it keys the probes and binds the direct connection's proof)."""

    peer_id: bytes = attrs.field(validator=exact_bytes(PUBLIC_KEY_SIZE))
    addresses: tuple[Address, ...] = attrs.field(validator=_check_tunnel_addresses)
    endpoints: tuple[Endpoint, ...] = attrs.field(validator=_check_endpoints)
    secret: bytes = attrs.field(validator=exact_bytes(NONCE_SIZE))


@attrs.frozen
class PeerGone:
    """The introduced client left, or may no longer be reached directly (policy changed)."""

    peer_id: bytes = attrs.field(validator=exact_bytes(PUBLIC_KEY_SIZE))


@attrs.frozen
class PeerAuth:
    """First frame of a direct connection, from the peer that opened it (the QUIC client):
    Ed25519 by ``client_id`` over ``peer_transcript(secret, client_id, responder, binding)``.
    The responder's key was checked in the TLS handshake already."""

    client_id: bytes = attrs.field(validator=exact_bytes(PUBLIC_KEY_SIZE))
    signature: bytes = attrs.field(validator=exact_bytes(SIGNATURE_SIZE))
    max_datagram_payload: int = attrs.field(validator=_int_in(0, MAX_PACKET))


@attrs.frozen
class Packet:
    """One IP packet framed on stream 0 (a packet too large for a datagram)."""

    data: bytes = attrs.field()

    @data.validator
    def _check_data(self, _attribute: attrs.Attribute[bytes], value: object) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"Packet.data must be bytes, not {type(value).__name__}")
        if len(value) > MAX_PACKET:
            raise ValueError(f"packet of {len(value)} bytes exceeds {MAX_PACKET}")


@attrs.frozen
class Ping:
    """Stream keepalive request (the byte 0x01)."""


@attrs.frozen
class Pong:
    """Answer to a Ping (the byte 0x02)."""


ControlMessage = (
    ServerHello | AuthRequest | AuthResponse | Candidates | PeerIntro | PeerGone | PeerAuth
)
Frame = ControlMessage | Packet | Ping | Pong

_PING = Ping()
_PONG = Pong()

_CONTROL_TYPES: dict[type, int] = {
    ServerHello: FRAME_SERVER_HELLO,
    AuthRequest: FRAME_AUTH_REQUEST,
    AuthResponse: FRAME_AUTH_RESPONSE,
    Candidates: FRAME_CANDIDATES,
    PeerIntro: FRAME_PEER_INTRO,
    PeerGone: FRAME_PEER_GONE,
    PeerAuth: FRAME_PEER_AUTH,
}
# Maximum payload length for each length-prefixed frame type; anything absent (and not a single
# byte ping/pong) is an unknown type.
_MAX_LENGTH: dict[int, int] = {
    FRAME_PACKET: MAX_PACKET,
    FRAME_SERVER_HELLO: MAX_CONTROL_PAYLOAD,
    FRAME_AUTH_REQUEST: MAX_CONTROL_PAYLOAD,
    FRAME_AUTH_RESPONSE: MAX_CONTROL_PAYLOAD,
    FRAME_CANDIDATES: MAX_CONTROL_PAYLOAD,
    FRAME_PEER_INTRO: MAX_CONTROL_PAYLOAD,
    FRAME_PEER_GONE: MAX_CONTROL_PAYLOAD,
    FRAME_PEER_AUTH: MAX_CONTROL_PAYLOAD,
}


# --- encoding ----------------------------------------------------------------------------------


def _endpoints_to_json(endpoints: tuple[Endpoint, ...]) -> list[list[Any]]:
    return [[str(address), port] for address, port in endpoints]


def _message_to_json(msg: ControlMessage) -> dict[str, Any]:
    obj: dict[str, Any]
    if isinstance(msg, ServerHello):
        obj = {
            "version": msg.version,
            "nonce": msg.nonce.hex(),
            "max_datagram_payload": msg.max_datagram_payload,
        }
        if msg.peers:
            obj["peers"] = True
        return obj
    if isinstance(msg, AuthRequest):
        obj = {
            "version": msg.version,
            "device_id": msg.device_id,
            "client_id": msg.client_id.hex(),
            "signature": msg.signature.hex(),
            "max_datagram_payload": msg.max_datagram_payload,
        }
        if msg.auth_token is not None:
            obj["auth_token"] = msg.auth_token
        if msg.peers:
            obj["peers"] = True
        return obj
    if isinstance(msg, Candidates):
        return {"endpoints": _endpoints_to_json(msg.endpoints)}
    if isinstance(msg, PeerIntro):
        return {
            "peer_id": msg.peer_id.hex(),
            "addresses": [str(a) for a in msg.addresses],
            "endpoints": _endpoints_to_json(msg.endpoints),
            "secret": msg.secret.hex(),
        }
    if isinstance(msg, PeerGone):
        return {"peer_id": msg.peer_id.hex()}
    if isinstance(msg, PeerAuth):
        return {
            "client_id": msg.client_id.hex(),
            "signature": msg.signature.hex(),
            "max_datagram_payload": msg.max_datagram_payload,
        }
    obj = {"accepted": msg.accepted}
    for name in (
        "reject_reason",
        "assigned_ip",
        "network",
        "server_ip",
        "assigned_ip6",
        "network6",
        "server_ip6",
        "mtu",
    ):
        value = getattr(msg, name)
        if value is not None:
            obj[name] = value if isinstance(value, str | int) else str(value)
    if msg.temporary:
        obj["temporary"] = True
    if msg.dns:
        obj["dns"] = [str(a) for a in msg.dns]
    if msg.dns_search:
        obj["dns_search"] = list(msg.dns_search)
    return obj


def encode_control_payload(msg: ControlMessage) -> bytes:
    """The JSON payload of a control message (without the frame header).

    Raises ``ValueError`` if it exceeds ``MAX_CONTROL_PAYLOAD`` and ``TypeError`` for anything
    that is not a control message.
    """
    if type(msg) not in _CONTROL_TYPES:
        raise TypeError(f"not a control message: {type(msg).__name__}")
    payload = json.dumps(_message_to_json(msg), separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(
            f"{type(msg).__name__} payload is {len(payload)} bytes, over {MAX_CONTROL_PAYLOAD}"
        )
    return payload


def encode_frame(msg: Frame) -> bytes:
    """Encode one frame for a stream.

    Raises ``ValueError`` for local misuse (packet over ``MAX_PACKET``, control payload over
    ``MAX_CONTROL_PAYLOAD``) and ``TypeError`` for an object that is not a frame.
    """
    if type(msg) is Packet:
        data = msg.data
        if len(data) > MAX_PACKET:
            raise ValueError(f"packet of {len(data)} bytes exceeds {MAX_PACKET}")
        return _HEADER.pack(FRAME_PACKET, len(data)) + data
    if type(msg) is Ping:
        return b"\x01"
    if type(msg) is Pong:
        return b"\x02"
    frame_type = _CONTROL_TYPES.get(type(msg))
    # isinstance() only narrows the type for mypy: no subclass of Packet, Ping or Pong is in
    # _CONTROL_TYPES either
    if frame_type is None or isinstance(msg, Packet | Ping | Pong):
        raise TypeError(f"not a frame: {type(msg).__name__}")
    payload = encode_control_payload(msg)
    return _HEADER.pack(frame_type, len(payload)) + payload


def auth_transcript(
    nonce: bytes, server_key: bytes, client_key: bytes, device_id: int, binding: bytes
) -> bytes:
    """The bytes the client signs: a domain-separation label, the server's nonce, both public
    keys, the device ID (u64 BE) and the connection's channel binding (32 bytes both ends
    derive from this QUIC connection's secrets). The nonce and the server key stop replay to
    another server; the binding makes a signature useless on any other connection, even one a
    relay opened to the same server with the same nonce. Raises ``ValueError`` for wrong sizes
    or ranges."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, not {len(nonce)}")
    if len(binding) != BINDING_SIZE:
        raise ValueError(f"binding must be {BINDING_SIZE} bytes, not {len(binding)}")
    if len(server_key) != PUBLIC_KEY_SIZE or len(client_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public keys must be {PUBLIC_KEY_SIZE} bytes")
    if isinstance(device_id, bool) or not isinstance(device_id, int):
        raise ValueError("device_id must be an int")
    if not 0 <= device_id <= _U64_MAX:
        raise ValueError(f"device_id {device_id} does not fit in a u64")
    return (
        _TRANSCRIPT_LABEL
        + bytes(nonce)
        + bytes(server_key)
        + bytes(client_key)
        + _DEVICE_ID.pack(device_id)
        + bytes(binding)
    )


def peer_transcript(secret: bytes, initiator: bytes, responder: bytes, binding: bytes) -> bytes:
    """The bytes the initiator of a direct connection signs: a label of their own (never valid
    as a server's transcript), the introduction's secret, both keys and the connection's
    channel binding. Raises ``ValueError`` for wrong sizes."""
    if len(secret) != NONCE_SIZE:
        raise ValueError(f"secret must be {NONCE_SIZE} bytes, not {len(secret)}")
    if len(binding) != BINDING_SIZE:
        raise ValueError(f"binding must be {BINDING_SIZE} bytes, not {len(binding)}")
    if len(initiator) != PUBLIC_KEY_SIZE or len(responder) != PUBLIC_KEY_SIZE:
        raise ValueError(f"public keys must be {PUBLIC_KEY_SIZE} bytes")
    return _PEER_TRANSCRIPT_LABEL + secret + initiator + responder + binding


# --- decoding (untrusted) ----------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-f]*")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # Two parsers could pick different values for a repeated key; refuse the ambiguity.
        raise DecodeError("control payload repeats a key")
    return obj


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"control payload contains {name}, which is not JSON")


def _parse_object(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit easily in 4096 bytes.
        raise DecodeError(f"control payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("control payload is not a JSON object")
    return obj


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise DecodeError(f"control payload lacks {key!r}")
        return None
    # bool is an int subclass; never accept true/false where a number is expected.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _get_hex(obj: dict[str, Any], key: str, size: int) -> bytes:
    value = _get(obj, key, str, required=True)
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        raise DecodeError(f"{key!r} must be {size} bytes of lowercase hex")
    return bytes.fromhex(value)


def _get_ip(obj: dict[str, Any], key: str, parse: type) -> Any:
    value = _get(obj, key, str, required=False)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError:
        raise DecodeError(f"{key!r} is not a valid {parse.__name__}: {value!r}") from None


def _decode_server_hello(obj: dict[str, Any]) -> ServerHello:
    return ServerHello(
        version=_get(obj, "version", int, required=True),
        nonce=_get_hex(obj, "nonce", NONCE_SIZE),
        max_datagram_payload=_get(obj, "max_datagram_payload", int, required=True),
        peers=_get(obj, "peers", bool, required=False) or False,
    )


def _parse_address(value: object, key: str) -> Address:
    if not isinstance(value, str):
        raise DecodeError(f"{key!r} holds a {type(value).__name__}, not an address")
    try:
        parsed = ip_address(value)
    except ValueError:
        raise DecodeError(f"{key!r} holds an invalid address: {value!r}") from None
    return parsed


def _get_endpoints(obj: dict[str, Any], key: str) -> tuple[Endpoint, ...]:
    items = _get(obj, key, list, required=True)
    if len(items) > MAX_ENDPOINTS:
        raise DecodeError(f"{key!r} lists {len(items)} endpoints, at most {MAX_ENDPOINTS}")
    endpoints = []
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            raise DecodeError(f"{key!r} holds something other than [address, port]")
        port = item[1]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise DecodeError(f"{key!r} holds an invalid port: {port!r}")
        endpoints.append((_parse_address(item[0], key), port))
    return tuple(endpoints)


def _decode_candidates(obj: dict[str, Any]) -> Candidates:
    return Candidates(endpoints=_get_endpoints(obj, "endpoints"))


def _decode_peer_intro(obj: dict[str, Any]) -> PeerIntro:
    addresses = _get(obj, "addresses", list, required=True)
    if len(addresses) > 2:
        raise DecodeError("'addresses' lists more than two addresses")
    return PeerIntro(
        peer_id=_get_hex(obj, "peer_id", PUBLIC_KEY_SIZE),
        addresses=tuple(_parse_address(a, "addresses") for a in addresses),
        endpoints=_get_endpoints(obj, "endpoints"),
        secret=_get_hex(obj, "secret", NONCE_SIZE),
    )


def _decode_peer_gone(obj: dict[str, Any]) -> PeerGone:
    return PeerGone(peer_id=_get_hex(obj, "peer_id", PUBLIC_KEY_SIZE))


def _decode_peer_auth(obj: dict[str, Any]) -> PeerAuth:
    return PeerAuth(
        client_id=_get_hex(obj, "client_id", PUBLIC_KEY_SIZE),
        signature=_get_hex(obj, "signature", SIGNATURE_SIZE),
        max_datagram_payload=_get(obj, "max_datagram_payload", int, required=True),
    )


def _decode_auth_request(obj: dict[str, Any]) -> AuthRequest:
    return AuthRequest(
        version=_get(obj, "version", int, required=True),
        device_id=_get(obj, "device_id", int, required=True),
        client_id=_get_hex(obj, "client_id", PUBLIC_KEY_SIZE),
        auth_token=_get(obj, "auth_token", str, required=False),
        signature=_get_hex(obj, "signature", SIGNATURE_SIZE),
        max_datagram_payload=_get(obj, "max_datagram_payload", int, required=True),
        peers=_get(obj, "peers", bool, required=False) or False,
    )


def _decode_auth_response(obj: dict[str, Any]) -> AuthResponse:
    return AuthResponse(
        accepted=_get(obj, "accepted", bool, required=True),
        reject_reason=_get(obj, "reject_reason", str, required=False),
        assigned_ip=_get_ip(obj, "assigned_ip", IPv4Address),
        network=_get_ip(obj, "network", IPv4Network),
        server_ip=_get_ip(obj, "server_ip", IPv4Address),
        assigned_ip6=_get_ip(obj, "assigned_ip6", IPv6Address),
        network6=_get_ip(obj, "network6", IPv6Network),
        server_ip6=_get_ip(obj, "server_ip6", IPv6Address),
        mtu=_get(obj, "mtu", int, required=False),
        temporary=_get(obj, "temporary", bool, required=False) or False,
        dns=_get_addresses(obj, "dns", MAX_DNS_SERVERS),
        dns_search=_get_domains(obj, "dns_search"),
    )


def _get_addresses(obj: dict[str, Any], key: str, limit: int) -> tuple[Address, ...]:
    items = _get(obj, key, list, required=False) or []
    if len(items) > limit:
        raise DecodeError(f"{key!r} lists {len(items)} addresses, at most {limit}")
    return tuple(_parse_address(item, key) for item in items)


def _get_domains(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _get(obj, key, list, required=False) or []
    if len(items) > MAX_DNS_SEARCH:
        raise DecodeError(f"{key!r} lists {len(items)} domains, at most {MAX_DNS_SEARCH}")
    for item in items:
        if not isinstance(item, str) or not valid_search_domain(item):
            raise DecodeError(f"{key!r} holds something other than a domain name")
    return tuple(items)


_DECODERS: dict[int, Callable[[dict[str, Any]], ControlMessage]] = {
    FRAME_SERVER_HELLO: _decode_server_hello,
    FRAME_AUTH_REQUEST: _decode_auth_request,
    FRAME_AUTH_RESPONSE: _decode_auth_response,
    FRAME_CANDIDATES: _decode_candidates,
    FRAME_PEER_INTRO: _decode_peer_intro,
    FRAME_PEER_GONE: _decode_peer_gone,
    FRAME_PEER_AUTH: _decode_peer_auth,
}


def decode_control_payload_untrusted(frame_type: int, payload: bytes) -> ControlMessage:
    """Decode the JSON payload of a control frame of ``frame_type``.

    Raises :class:`~tunnel.errors.DecodeError`, and only that, for an unknown type, a payload
    over ``MAX_CONTROL_PAYLOAD``, bad JSON, missing keys, wrong types, bad lengths or a message
    that breaks its class's rules.
    """
    decoder = _DECODERS.get(frame_type)
    if decoder is None:
        raise DecodeError(f"not a control frame type: {frame_type!r}")
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise DecodeError(f"control payload of {len(payload)} bytes exceeds {MAX_CONTROL_PAYLOAD}")
    obj = _parse_object(bytes(payload))
    try:
        return decoder(obj)
    except (ValueError, TypeError) as exc:
        # The class validators reject what is well-typed JSON but not a valid message.
        raise DecodeError(f"invalid control message 0x{frame_type:02x}: {exc}") from None


class FrameDecoder:
    """Incremental decoder for one stream's bytes.

    ``feed()`` returns every frame completed by the new bytes and keeps at most one partial frame
    (never more than its maximum size + 5 bytes). A frame header announcing more than the
    maximum for its type is refused as soon as the header is seen. After a
    :class:`~tunnel.errors.DecodeError` the decoder is poisoned: every later ``feed()`` raises
    ``DecodeError`` too. A ``feed()`` that raises returns none of the frames in that chunk; the
    stream is dead anyway.
    """

    def __init__(self) -> None:
        self._pending = bytearray()  # one incomplete frame, starting at its type byte
        self._poisoned = False

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return the frames it completes, in order. Raises DecodeError."""
        if self._poisoned:
            raise DecodeError("frame decoder already failed")
        try:
            return self._feed(memoryview(data).cast("B"))
        except DecodeError:
            self._poisoned = True
            self._pending = bytearray()
            raise

    def _feed(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        end = len(view)
        pos = 0
        pending = self._pending
        # First complete the pending frame, copying only the bytes it still needs, so the
        # buffer never grows past one frame however large the chunk is.
        while pending:
            need = _frame_size(pending)
            if len(pending) == need:
                frames.append(_decode_frame(pending[0], bytes(pending[_HEADER_SIZE:])))
                pending.clear()
                break
            if pos == end:
                return frames
            take = min(need - len(pending), end - pos)
            pending += view[pos : pos + take]
            pos += take
        # Then decode whole frames straight out of the chunk (no copying of the remainder).
        while pos < end:
            frame_type = view[pos]
            if frame_type == FRAME_PING:
                frames.append(_PING)
                pos += 1
                continue
            if frame_type == FRAME_PONG:
                frames.append(_PONG)
                pos += 1
                continue
            limit = _MAX_LENGTH.get(frame_type)
            if limit is None:
                raise DecodeError(f"unknown frame type 0x{frame_type:02x}")
            if end - pos < _HEADER_SIZE:
                pending += view[pos:]
                break
            _, length = _HEADER.unpack_from(view, pos)
            if length > limit:
                raise DecodeError(f"frame 0x{frame_type:02x} announces {length} bytes, max {limit}")
            frame_end = pos + _HEADER_SIZE + length
            if frame_end > end:
                pending += view[pos:]
                break
            frames.append(_decode_frame(frame_type, bytes(view[pos + _HEADER_SIZE : frame_end])))
            pos = frame_end
        return frames


def _frame_size(pending: bytearray) -> int:
    """Total size of the length-prefixed frame starting ``pending`` (the header size while the
    header is incomplete). Raises DecodeError for an unknown type or an oversized length."""
    frame_type = pending[0]
    limit = _MAX_LENGTH.get(frame_type)
    if limit is None:
        raise DecodeError(f"unknown frame type 0x{frame_type:02x}")
    if len(pending) < _HEADER_SIZE:
        return _HEADER_SIZE
    length: int = _HEADER.unpack_from(pending, 0)[1]
    if length > limit:
        raise DecodeError(f"frame 0x{frame_type:02x} announces {length} bytes, max {limit}")
    return _HEADER_SIZE + length


def _decode_frame(frame_type: int, body: bytes) -> Frame:
    if frame_type == FRAME_PACKET:
        return Packet(body)
    return decode_control_payload_untrusted(frame_type, body)
