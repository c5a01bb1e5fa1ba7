"""Path discovery probes between two clients, and which candidate addresses are worth probing.

Two clients the server introduced to each other punch a direct path by sending small probes
from the UDP socket they talk to the server from (its NAT mapping is the one the server saw) to
every candidate address of the other. A probe shares that socket with QUIC, so it is built never
to parse as QUIC, and the demultiplexer tells the two apart with :func:`is_probe`, a prefix
check, before QUIC sees the datagram.

Wire format (all integers big-endian)::

    magic (8) | type (1) | txid (12) | sender (32) | body | tag (16)

* ``magic`` is :data:`MAGIC`, ``b"\\x00tunnel\\x01"``. Its first byte has the QUIC long-header
  bit (0x80) and the fixed bit (0x40) clear: every QUIC packet has the fixed bit set (RFC 9000
  section 17; aioquic drops anything else as "fixed bit is zero"), so no QUIC packet starts
  with it and no probe that strays into aioquic is taken for one. The last byte is the format
  version: another format gets another magic, and its probes fall through to QUIC, which
  drops them.
* ``type`` is :data:`TYPE_PING` or :data:`TYPE_PONG`; ``txid`` pairs a pong with its ping;
  ``sender`` is the Ed25519 public key of the client that sent the probe, in the clear: the
  receiver finds the introduction (and its secret) by it.
* a Ping's body is ``padding`` zero bytes, at least :data:`MIN_PING_PADDING`, so that a ping is
  never smaller than the largest pong (:data:`MAX_PONG_SIZE`): whoever can make us answer a
  ping (a replayed one, from a forged source) gets back no more bytes than it sent, so an
  answer is never an amplification. A ping may carry more padding (up to
  :data:`MAX_PROBE_SIZE`), e.g. 1200 bytes to show the path carries a QUIC Initial.
* a Pong's body is the source address the ping arrived from, as the answering client saw it
  (a STUN answer for free): ``family (1: 4 or 6) | address (4 or 16) | port (2)``.
* ``tag`` is HMAC-SHA256, truncated to 16 bytes, keyed by the 32-byte secret of the
  introduction (only the two clients and the server know it) over everything before the tag.
  The magic opens the authenticated bytes, so these tags cannot be confused with any other use
  of the same secret.

A probe proves only that whoever sent it knows the introduction's secret. It can be replayed
(from any source address): the daemon matches a pong to a ping by ``txid`` and requires it to
come from the address the ping went to, and answers pings within a budget. The parser
(:func:`parse_probe_untrusted`) returns None for anything that is not a valid probe of a
known sender and never raises: these bytes come from anyone on the internet.

Candidates (:func:`usable_candidate`, :func:`order_candidates`): interface addresses and
server-observed ones, never addresses that cannot leave this host or link, never the tunnel's
own addresses (a "direct" path through the tunnel is the relay in disguise), capped per peer.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
from collections.abc import Callable, Collection, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, TypeAlias

import attrs

from tunnel.core.messages import Address, Endpoint, exact_bytes

__all__ = [
    "MAGIC",
    "MAX_CANDIDATES",
    "MAX_PING_PADDING",
    "MAX_PONG_SIZE",
    "MAX_PROBE_SIZE",
    "MIN_PING_PADDING",
    "MIN_PING_SIZE",
    "SECRET_SIZE",
    "TAG_SIZE",
    "TXID_SIZE",
    "TYPE_PING",
    "TYPE_PONG",
    "Address",
    "Endpoint",
    "Ping",
    "Pong",
    "encode_ping",
    "encode_pong",
    "format_endpoint",
    "is_probe",
    "order_candidates",
    "parse_probe_untrusted",
    "socket_endpoint",
    "usable_candidate",
]

Network: TypeAlias = IPv4Network | IPv6Network

MAGIC = b"\x00tunnel\x01"
"""Opens every probe: first byte 0x00 (no QUIC packet starts so), last byte the version."""

TYPE_PING = 0x01
TYPE_PONG = 0x02

TXID_SIZE = 12
KEY_SIZE = 32  # an Ed25519 public key
SECRET_SIZE = 32  # the introduction's secret
TAG_SIZE = 16  # HMAC-SHA256 truncated: 128 bits are plenty against online forgery

MAX_PROBE_SIZE = 1300
"""Largest probe accepted or built: a 1200-byte QUIC Initial fits, with room to spare."""

MAX_CANDIDATES = 8
"""At most this many candidate endpoints per peer: a peer could report a million."""

_HEAD = len(MAGIC) + 1 + TXID_SIZE + KEY_SIZE  # 53: what every probe has before its body
_SENDER = slice(len(MAGIC) + 1 + TXID_SIZE, _HEAD)
_PORT = struct.Struct(">H")
_FAMILY_SIZE = {4: 4, 6: 16}  # family byte -> address length
_THIS_NETWORK = IPv4Network("0.0.0.0/8")  # RFC 1122: a source, never a destination

MAX_PONG_SIZE = _HEAD + 1 + 16 + _PORT.size + TAG_SIZE  # 88, an IPv6 observed address
MIN_PING_PADDING = MAX_PONG_SIZE - _HEAD - TAG_SIZE  # 19
"""A ping pads itself to at least the size of the largest pong: answers never amplify."""
MIN_PING_SIZE = _HEAD + MIN_PING_PADDING + TAG_SIZE  # == MAX_PONG_SIZE
MAX_PING_PADDING = MAX_PROBE_SIZE - _HEAD - TAG_SIZE
_MIN_PONG_SIZE = _HEAD + 1 + 4 + _PORT.size + TAG_SIZE  # 76, an IPv4 observed address


# --- messages ----------------------------------------------------------------------------------


def _check_padding(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"padding must be an int, not {type(value).__name__}")
    if not MIN_PING_PADDING <= value <= MAX_PING_PADDING:
        raise ValueError(f"padding must be in {MIN_PING_PADDING}..{MAX_PING_PADDING}, not {value}")


def _check_observed(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], IPv4Address | IPv6Address)
        and not isinstance(value[1], bool)
        and isinstance(value[1], int)
        and 1 <= value[1] <= 65535
    ):
        raise ValueError(f"observed must be an (address, port) pair, not {value!r}")
    if isinstance(value[0], IPv6Address) and value[0].scope_id is not None:
        raise ValueError("observed must not carry a scope ID: the wire has no room for one")


@attrs.frozen
class Ping:
    """A probe asking for a :class:`Pong`: ``txid`` (12 random bytes) pairs the two; ``sender``
    is the pinger's public key; ``padding`` zero bytes keep the ping at least as large as any
    answer to it."""

    txid: bytes = attrs.field(validator=exact_bytes(TXID_SIZE))
    sender: bytes = attrs.field(validator=exact_bytes(KEY_SIZE))
    padding: int = attrs.field(default=MIN_PING_PADDING, validator=_check_padding)


@attrs.frozen
class Pong:
    """The answer to a :class:`Ping` (its ``txid``), from ``sender`` (the answering client's
    public key), telling the pinger the source address its ping came from."""

    txid: bytes = attrs.field(validator=exact_bytes(TXID_SIZE))
    sender: bytes = attrs.field(validator=exact_bytes(KEY_SIZE))
    observed: Endpoint = attrs.field(validator=_check_observed)


def _tag(secret: bytes, authenticated: bytes) -> bytes:
    return hmac.new(secret, authenticated, hashlib.sha256).digest()[:TAG_SIZE]


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
        raise ValueError(f"the introduction secret must be {SECRET_SIZE} bytes")


def encode_ping(ping: Ping, secret: bytes) -> bytes:
    """The datagram for ``ping``, tagged with the introduction's ``secret`` (32 bytes; anything
    else raises ValueError)."""
    _check_secret(secret)
    body = MAGIC + bytes((TYPE_PING,)) + ping.txid + ping.sender + bytes(ping.padding)
    return body + _tag(secret, body)


def encode_pong(pong: Pong, secret: bytes) -> bytes:
    """The datagram for ``pong``, tagged with the introduction's ``secret`` (32 bytes; anything
    else raises ValueError). At most :data:`MAX_PONG_SIZE` bytes, the size of the smallest
    ping."""
    _check_secret(secret)
    address, port = pong.observed
    family = 4 if isinstance(address, IPv4Address) else 6
    body = (
        MAGIC
        + bytes((TYPE_PONG,))
        + pong.txid
        + pong.sender
        + bytes((family,))
        + address.packed
        + _PORT.pack(port)
    )
    return body + _tag(secret, body)


def is_probe(data: bytes) -> bool:
    """Whether ``data`` is meant as a probe rather than QUIC: a prefix check, cheap enough for
    every datagram. False for every QUIC packet (their first byte has 0x40 set). Whether it is
    a *valid* probe is :func:`parse_probe_untrusted`'s business."""
    return data[:8] == MAGIC


def parse_probe_untrusted(
    data: bytes, secret_for: Callable[[bytes], bytes | None]
) -> Ping | Pong | None:
    """The probe in ``data`` if it is a well-formed one from a sender we know, else None.

    ``secret_for(sender_key)`` returns the secret of the introduction to that sender, or None
    for a key we were not introduced to (and for our own key: a probe of ours reflected back
    must not count). Malformed, truncated, oversized, unknown-type or badly tagged probes, a
    ping padded below :data:`MIN_PING_PADDING` or with non-zero padding: None. Never raises
    (only ``secret_for`` could).
    """
    size = len(data)
    if not _MIN_PONG_SIZE <= size <= MAX_PROBE_SIZE or data[:8] != MAGIC:
        return None
    kind = data[8]
    if kind == TYPE_PING:
        if size < MIN_PING_SIZE:
            return None
    elif kind == TYPE_PONG:
        if size not in (_MIN_PONG_SIZE, MAX_PONG_SIZE):
            return None
    else:
        return None
    sender = bytes(data[_SENDER])
    secret = secret_for(sender)
    if secret is None:
        return None
    authenticated, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
    if not hmac.compare_digest(_tag(secret, bytes(authenticated)), tag):
        return None
    txid = bytes(data[9 : 9 + TXID_SIZE])
    body = authenticated[_HEAD:]
    if kind == TYPE_PING:
        # The tag already vouches for these bytes; zeros keep one encoding per ping.
        if body.count(0) != len(body):
            return None
        return Ping(txid, sender, len(body))
    family = body[0]
    length = _FAMILY_SIZE.get(family)
    if length is None or len(body) != 1 + length + _PORT.size:
        return None
    raw = bytes(body[1 : 1 + length])
    (port,) = _PORT.unpack_from(body, 1 + length)
    if port == 0:
        return None
    address: Address = IPv4Address(raw) if family == 4 else IPv6Address(raw)
    return Pong(txid, sender, (address, port))


# --- candidates --------------------------------------------------------------------------------


def usable_candidate(
    ip: Address,
    *,
    own_tunnel_addresses: Collection[Address],
    tunnel_networks: Iterable[Network] = (),
) -> bool:
    """Whether ``ip`` is worth offering or probing as a direct-path address.

    Refused: addresses that never leave the host or the link (loopback, unspecified and 0/8,
    IPv4 169.254/16 and IPv6 fe80::/10 link-local, deprecated IPv6 site-local, an IPv6 address
    with a scope), multicast, reserved space (240/4 with the broadcast address; IPv6 outside
    the unicast allocations, which takes in ::/8 and NAT64's 64:ff9b::/96), IPv4-mapped IPv6
    (the caller unmaps what a dual-stack socket reports), our own tunnel addresses and anything
    inside ``tunnel_networks``: a peer's tunnel address would route through the tunnel, the
    relay in disguise. Accepted: global addresses and private ones (RFC 1918, RFC 6598 shared
    space, ULA fc00::/7): two clients behind one NAT reach each other only through their LAN
    addresses.
    """
    if isinstance(ip, IPv6Address) and (
        ip.scope_id is not None or ip.ipv4_mapped is not None or ip.is_site_local
    ):
        return False
    if isinstance(ip, IPv4Address) and ip in _THIS_NETWORK:
        return False
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        return False
    if ip.is_multicast or ip.is_reserved:
        return False
    if ip in own_tunnel_addresses:
        return False
    return not any(ip.version == net.version and ip in net for net in tunnel_networks)


def order_candidates(
    observed: Endpoint | None,
    reported: Iterable[Endpoint],
    *,
    own_tunnel_addresses: Collection[Address],
    tunnel_networks: Collection[Network] = (),
    limit: int = MAX_CANDIDATES,
) -> tuple[Endpoint, ...]:
    """The endpoints to probe for one peer, best first: the one the server observed (its NAT
    mapping towards the internet), then the ones the peer reported in their order; unusable
    ones (:func:`usable_candidate`) and port 0 left out, duplicates dropped, at most ``limit``.
    Stops reading ``reported`` once full."""
    chosen: dict[Endpoint, None] = {}  # an ordered set
    if limit <= 0:
        return ()
    first = () if observed is None else (observed,)
    for address, port in itertools.chain(first, reported):
        if not 1 <= port <= 65535 or (address, port) in chosen:
            continue
        if not usable_candidate(
            address, own_tunnel_addresses=own_tunnel_addresses, tunnel_networks=tunnel_networks
        ):
            continue
        chosen[(address, port)] = None
        if len(chosen) >= limit:
            break
    return tuple(chosen)


def socket_endpoint(addr: Any) -> Endpoint | None:
    """A socket address (``(host, port)``, or IPv6's 4-tuple) as an endpoint: a scope dropped,
    IPv4-mapped IPv6 (a dual-stack socket's view of an IPv4 peer) turned back into IPv4; None
    for anything that is not an address and a port."""
    try:
        address = ip_address(str(addr[0]).split("%", 1)[0])
        port = int(addr[1])
    except (ValueError, TypeError, IndexError):
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, port


def format_endpoint(endpoint: Endpoint) -> str:
    """``192.0.2.1:4433`` or ``[2001:db8::1]:4433``, for logs and status."""
    address, port = endpoint
    if isinstance(address, IPv6Address):
        return f"[{address}]:{port}"
    return f"{address}:{port}"
