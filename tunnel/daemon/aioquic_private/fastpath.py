"""The DATAGRAM fast path: 1-RTT packets of DATAGRAM frames built and read beside aioquic.

One of the private-state modules (see :mod:`tunnel.daemon.aioquic_private` for the rule, the
inventory and the aioquic versions checked), and the one on the per-packet path, which is why
it reads aioquic's state directly instead of through accessors. Sans-IO, like aioquic: the
trio side is :class:`tunnel.daemon.driver.QuicDriver`, which calls
:func:`receive_datagram_fast` for every datagram received and :func:`outgoing_datagrams` once
per send.

- Sending (:func:`build_datagram_packets`): aioquic's queued datagrams laid out as packets of
  DATAGRAM frames, sealed (:func:`seal_short_packet`) and registered with its loss recovery,
  congestion control, pacer and idle timer as its own builder would.
- Receiving (:func:`receive_datagram_fast`): a 1-RTT packet for the current connection ID on
  the current, validated path, decrypted (:func:`open_short_packet`), its DATAGRAM frames read
  here (:func:`_datagram_frames`), any other payload handed to aioquic's frame dispatcher, and
  its ACK bookkeeping done as aioquic does it.
- Acknowledging (:func:`build_ack_packet`): when a due ACK is all there is to send, the
  ACK-only packet aioquic's builder would make, without the builder. With the receiver taking
  a lone PING (a heartbeat) itself, an idle session's heartbeat never reaches aioquic.
- :func:`aioquic_has_work` says when aioquic's own, costlier sender must run as well.

Where the two differ on purpose (tests/daemon/test_fastpath_side_by_side.py holds them to
the same packets and state everywhere else): the sender asks the pacer before every packet,
aioquic once per ``datagrams_to_send``; the sender never puts datagrams behind frames of
aioquic's own (a due ACK, a probe's PING, connection-ID frames that waited for the window with
them), it sends them in packets of their own and aioquic those frames after them; the receiver
pushes the idle deadline back at most once a second, aioquic on every packet.

The receiver takes only packets for :func:`live_host_cid`: ``host_cid`` while it is still one
of our issued connection IDs. A client's aioquic never moves ``host_cid`` when the server
switches IDs, so once the server retires the old one, ``host_cid`` still names it; aioquic
drops packets for it, and so do we.
"""

from __future__ import annotations

import enum
from typing import Any

from aioquic import tls
from aioquic._crypto import AEAD as _AeadPrimitive
from aioquic._crypto import HeaderProtection as _HeaderProtection
from aioquic.buffer import Buffer
from aioquic.quic.connection import (
    END_STATES,
    NetworkAddress,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicNetworkPath,
    QuicReceiveContext,
)
from aioquic.quic.crypto import CryptoError, CryptoPair, KeyUnavailableError
from aioquic.quic.events import DatagramFrameReceived
from aioquic.quic.packet import (
    PACKET_SPIN_BIT,
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    decode_packet_number,
    push_ack_frame,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import MAX_ACK_RANGES
from cryptography.exceptions import InvalidTag

from tunnel.daemon.quic import IDLE_TIMEOUT

__all__ = [
    "Received",
    "aioquic_has_work",
    "build_ack_packet",
    "build_datagram_packets",
    "open_short_packet",
    "outgoing_datagrams",
    "receive_datagram_fast",
    "seal_short_packet",
    "send_short_packet",
]


# aioquic 1.6 and later protect packets in Python over `cryptography`; the layers between a
# packet and the two primitive calls (pair, context, AEAD and header-protection objects, and
# copies of the packet) cost more than the primitives, so the fast paths call them directly.
# With aioquic's older C extension, or during a key update, aioquic's own methods do the work.
def _direct_crypto_usable() -> bool:
    try:
        aead = _AeadPrimitive(b"aes-128-gcm", bytes(16), bytes(12))
        protection = _HeaderProtection(b"aes-128-ecb", bytes(16))
        return (
            isinstance(aead._iv, int)
            and callable(aead._aead.encrypt)
            and len(protection._mask(bytes(16))) >= 5
        )
    except Exception:  # a C extension, or internals that moved: aioquic's own path
        return False


_DIRECT_CRYPTO = _direct_crypto_usable()


def seal_short_packet(
    crypto: CryptoPair, first_byte: int, peer_cid: bytes, number: int, payload: bytes
) -> bytes:
    """A protected 1-RTT packet with a 2-byte packet number: exactly what aioquic's
    ``crypto.encrypt_packet(header, payload, number)`` returns for that header."""
    header = bytes((first_byte,)) + peer_cid + (number & 0xFFFF).to_bytes(2, "big")
    if not _DIRECT_CRYPTO or crypto._update_key_requested:
        return crypto.encrypt_packet(header, payload, number)
    context = crypto.send
    # Callers only seal once the 1-RTT keys exist (their `aead is None` check): no assert in
    # the way of every packet.
    aead = context.aead
    protected = aead._aead.encrypt(  # type: ignore[union-attr]
        (aead._iv ^ number).to_bytes(12, "big"),  # type: ignore[union-attr]
        payload,
        header,
    )
    # Header protection samples 16 bytes starting 4 bytes after the packet number's start.
    mask = context.hp._mask(protected[2:18])  # type: ignore[union-attr]
    truncated = (number & 0xFFFF) ^ ((mask[1] << 8) | mask[2])
    return b"".join(
        (bytes((first_byte ^ (mask[0] & 0x1F),)), peer_cid, truncated.to_bytes(2, "big"), protected)
    )


def open_short_packet(
    crypto: CryptoPair, data: bytes, expected_number: int
) -> tuple[bytes, bytes, int]:
    """(plain header, payload, packet number) of a 1-RTT packet to an 8-byte connection ID:
    exactly what aioquic's ``crypto.decrypt_packet(data, 9, expected_number)`` returns, and
    the same CryptoError when the packet does not authenticate."""
    context = crypto.recv
    if not _DIRECT_CRYPTO or context.aead is None or len(data) < 29:
        return crypto.decrypt_packet(data, 9, expected_number)
    mask = context.hp._mask(data[13:29])  # type: ignore[union-attr]  # keys exist with aead
    first = data[0] ^ (mask[0] & 0x1F)
    if (first >> 2) & 1 != context.key_phase:
        return crypto.decrypt_packet(data, 9, expected_number)  # a key update: aioquic's
    pn_length = (first & 3) + 1
    end = 9 + pn_length
    truncated = int.from_bytes(data[9:end], "big") ^ int.from_bytes(mask[1 : 1 + pn_length], "big")
    number = decode_packet_number(truncated, pn_length * 8, expected_number)
    plain_header = bytes((first,)) + data[1:9] + truncated.to_bytes(pn_length, "big")
    aead = context.aead
    try:
        payload = aead._aead.decrypt(
            (aead._iv ^ number).to_bytes(12, "big"), data[end:], plain_header
        )
    except InvalidTag as exc:
        raise CryptoError(str(exc)) from None
    return plain_header, payload, number


_ONE_RTT = tls.Epoch.ONE_RTT


def _remember_one_rtt(quic: QuicConnection) -> tuple[Any, CryptoPair]:
    """The 1-RTT packet space and keys of a connected connection, looked up once. aioquic keys
    them by an Enum whose ``__hash__`` is Python code, so each lookup is a call, and on the
    way to every packet's system call each call counts. Both are created before the handshake
    and never replaced."""
    pair = (quic._spaces[_ONE_RTT], quic._cryptos[_ONE_RTT])
    quic._tunnel_one_rtt = pair  # type: ignore[attr-defined]
    return pair


_DATAGRAM_WITH_LENGTH = 0x31
# What a 1-RTT packet spends besides its frames: short header (1 + 8-byte CID + 2-byte packet
# number) and the AEAD tag.
_PACKET_OVERHEAD = 11 + 16


def _plainly_connected(quic: QuicConnection) -> bool:
    """Is the connection in the one state the fast senders handle: connected, handshake
    confirmed, not closing, not logging, one validated path, our 8-byte peer connection IDs?"""
    return (
        quic._state is QuicConnectionState.CONNECTED
        and quic._handshake_confirmed
        and not quic._close_pending
        and quic._quic_logger is None
        and len(quic._network_paths) == 1
        and quic._network_paths[0].is_validated
        and len(quic._peer_cid.cid) == 8
    )


def _first_byte(quic: QuicConnection, crypto: CryptoPair) -> int:
    """A 1-RTT packet's first byte: fixed bit, spin bit, key phase, 2-byte packet number
    (CryptoPair.key_phase, without the property call unless a key update is pending)."""
    phase = crypto.key_phase if crypto._update_key_requested else crypto.recv.key_phase
    return 0x40 | (quic._spin_bit << 5) | (phase << 2) | 1


def send_short_packet(
    quic: QuicConnection,
    crypto: CryptoPair,
    space: Any,
    payload: bytes,
    now: float,
    *,
    in_flight: bool,
    ack_eliciting: bool,
    delivery_handlers: list[tuple[Any, Any]] | None = None,
) -> bytes:
    """Seal ``payload`` as the connection's next 1-RTT packet and register it with aioquic's
    loss recovery as its builder registers a packet it sent: the packet number taken, a
    sent-packet record (with ``delivery_handlers``) in ``space``."""
    number = quic._packet_number
    # The key phase, per packet: sealing the first after a key update request switches it.
    packet = seal_short_packet(
        crypto, _first_byte(quic, crypto), quic._peer_cid.cid, number, payload
    )
    quic._packet_number = number + 1
    quic._loss.on_packet_sent(
        packet=QuicSentPacket(
            epoch=_ONE_RTT,
            in_flight=in_flight,
            is_ack_eliciting=ack_eliciting,
            is_crypto_packet=False,
            packet_number=number,
            packet_type=QuicPacketType.ONE_RTT,
            sent_time=now,
            sent_bytes=len(packet),
            delivery_handlers=delivery_handlers or [],
        ),
        space=space,
    )
    return packet


def build_datagram_packets(quic: QuicConnection, now: float) -> list[bytes]:
    """The DATAGRAM fast path: turn aioquic's pending datagrams into 1-RTT packets ourselves.

    aioquic builds every packet through a generic builder that considers every frame type; for
    a packet holding only DATAGRAM frames that is most of the sender's CPU. Here such packets
    are laid out directly, sealed with the same packet protection (:func:`seal_short_packet`),
    and registered with its loss recovery and congestion control exactly as its builder would
    (sent-packet record, bytes in flight, pacer, idle timer, path byte count). Whatever else is
    pending (ACKs, stream data, control frames) is left for aioquic's ``datagrams_to_send``
    (see :func:`outgoing_datagrams`), and so is everything while the connection is not in its
    plain connected state (handshake, migration, closing, logging). Reads aioquic 1.x private
    state on purpose.
    """
    pending = quic._datagrams_pending
    if not pending or not _plainly_connected(quic):
        return []
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    if crypto.send.aead is None:
        return []
    loss = quic._loss
    pacer = loss._pacer
    congestion = loss._cc
    path = quic._network_paths[0]
    # The size path MTU discovery has set for this connection (pmtu.set_datagram_size).
    frame_room = quic._max_datagram_size - _PACKET_OVERHEAD
    packets: list[bytes] = []
    while pending:
        if pacer.next_send_time(now) is not None:
            break
        # As many whole datagrams as fit one packet (small ones, such as TCP ACKs, share).
        count = 0
        used = 0
        for data in pending:
            frame = 1 + (1 if len(data) < 64 else 2) + len(data)
            if used + frame > frame_room:
                break
            used += frame
            count += 1
        if count == 0:
            break  # cannot happen with sizes checked on the way in; aioquic decides
        if congestion.congestion_window - congestion.bytes_in_flight < used + 27:
            break
        frames = []
        for _ in range(count):
            data = pending.popleft()
            size = len(data)
            length = bytes((size,)) if size < 64 else (0x4000 | size).to_bytes(2, "big")
            frames.append(b"\x31" + length + data)
        packet = send_short_packet(
            quic, crypto, space, b"".join(frames), now, in_flight=True, ack_eliciting=True
        )
        if not quic._ack_eliciting_sent_since_receipt:
            # Restart the idle timer, as aioquic does for its first ack-eliciting packet.
            quic._close_at = now + quic._idle_timeout()
            quic._ack_eliciting_sent_since_receipt = True
        pacer.update_after_send(now=now)
        path.bytes_sent += len(packet)
        packets.append(packet)
    return packets


# Enough room for far more ACK ranges than the fast path writes (see build_ack_packet).
_ACK_ROOM = 1 + 4 * 8 + 2 * 16 * 8
_ACK_FAST_RANGES = 16


def build_ack_packet(quic: QuicConnection, now: float) -> bytes | None:
    """The ACK fast path: the packet aioquic's sender makes when a due ACK of the 1-RTT space
    is all it has to send, byte for byte (same ACK frame, packet number and protection), and
    registered as it registers it (a sent packet that is neither ack-eliciting nor in flight,
    whose delivery prunes the ACK ranges; the pacer). None, having touched nothing, when no ACK
    is due or in any case this does not cover: then aioquic sends it. The caller makes sure
    nothing else is queued (:func:`outgoing_datagrams`)."""
    if not _plainly_connected(quic) or quic._remote_preferred_address is not None:
        return None
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    ack_at = space.ack_at
    if ack_at is None or ack_at > now or crypto.send.aead is None:
        return None
    ack_queue = space.ack_queue
    number = quic._packet_number
    ranges = len(ack_queue)  # (a RangeSet has no truth value)
    # aioquic adds a PING to every eighth packet whose ACK has gaps, so that the peer
    # acknowledges it and the ranges can be pruned; and it bounds the ranges by the room left
    # in the packet, which only matters for far more than these.
    if not 0 < ranges <= _ACK_FAST_RANGES or (ranges > 1 and number % 8 == 0):
        return None
    delay = int((now - space.largest_received_time) * 1000000) >> quic._local_ack_delay_exponent
    frame = Buffer(capacity=_ACK_ROOM)
    frame.push_uint_var(QuicFrameType.ACK)
    push_ack_frame(frame, ack_queue, delay, _ACK_ROOM)
    packet = send_short_packet(
        quic,
        crypto,
        space,
        frame.data,
        now,
        in_flight=False,
        ack_eliciting=False,
        delivery_handlers=[(quic._on_ack_delivery, (space, space.largest_received_packet))],
    )
    space.ack_at = None
    pacer = quic._loss._pacer
    pacer.update_after_send(now=now)
    # aioquic's sender then asks the pacer whether its next packet may go, and keeps the answer
    # for its timer.
    quic._pacing_at = pacer.next_send_time(now=now)
    quic._network_paths[0].bytes_sent += len(packet)
    return packet


class Received(enum.IntEnum):
    """What :func:`receive_datagram_fast` did with a datagram."""

    NOT_OURS = 0  # untouched: hand it to aioquic
    DONE = 1  # received (or dropped, as aioquic would have)
    # Received, and aioquic's sender has nothing to do for it but the ACK:
    DATAGRAMS_ONLY = 2  # it held nothing but DATAGRAM frames
    PING_ONLY = 3  # it held a PING and nothing else (PADDING aside): a heartbeat


def _datagram_frames(payload: bytes, max_frame_size: int | None) -> list[bytes] | None:
    """The datagrams of a payload that holds DATAGRAM frames and nothing else, each within the
    size we accept; None for anything else, malformed payloads included, which aioquic's own
    frame dispatcher then handles (and rejects) exactly as it always does."""
    if max_frame_size is None:
        return None
    datagrams = []
    i = 0
    end = len(payload)
    while i < end:
        frame_type = payload[i]
        if frame_type == 0x30:  # DATAGRAM without length: runs to the end of the packet
            start, stop = i + 1, end
        elif frame_type == _DATAGRAM_WITH_LENGTH and i + 1 < end:
            first = payload[i + 1]
            if first < 0x40:
                start = i + 2
                stop = start + first
            elif first < 0x80 and i + 2 < end:
                start = i + 3
                stop = start + (((first & 0x3F) << 8) | payload[i + 2])
            else:
                return None  # longer lengths than a packet of ours can hold
            if stop > end:
                return None
        else:
            return None
        if stop - (i + 1) >= max_frame_size:
            return None  # over our limit: aioquic closes the connection for it
        datagrams.append(payload[start:stop])
        i = stop
    return datagrams or None


def live_host_cid(quic: QuicConnection) -> bytes | None:
    """Recompute, remember and return the connection ID the fast receiver accepts: ``host_cid``
    if it is still issued (not retired by the peer), else None (every packet goes to aioquic).
    Call after aioquic handled a packet itself (frames are what change either); until the
    first call the receiver takes ``host_cid``, which a retirement cannot have touched yet
    because nothing but aioquic's own receive retires."""
    cid = quic.host_cid
    live = cid if any(issued.cid == cid for issued in quic._host_cids) else None
    quic.__dict__["_tunnel_live_cid"] = live
    return live


def receive_datagram_fast(quic: QuicConnection, data: bytes, addr: Any, now: float) -> Received:
    """The receiving half of the fast path: one 1-RTT packet for our current connection ID on
    our current, validated path, in the plain connected state. Does what aioquic's
    ``receive_datagram`` does for exactly that case (decrypt, duplicate check, spin bit, frames,
    idle timer, ACK bookkeeping) without its generic header parsing, connection-ID search and
    path handling. A payload of DATAGRAM frames only is read here; any other goes through
    aioquic's own ``_payload_received``. Returns NOT_OURS, having touched nothing, for every
    other datagram: the caller hands those to aioquic."""
    if (
        len(data) < 26
        or data[0] & 0xC0 != 0x40
        or quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
        or quic._close_pending
        or quic._quic_logger is not None
        or data[1:9] != quic.__dict__.get("_tunnel_live_cid", quic.host_cid)
    ):
        return Received.NOT_OURS
    path = quic._network_paths[0]
    if path.addr != addr or not path.is_validated:
        return Received.NOT_OURS
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    try:
        plain_header, payload, number = open_short_packet(
            crypto, data, space.expected_packet_number
        )
    except (CryptoError, KeyUnavailableError):
        return Received.DONE  # dropped, as aioquic drops it
    if number in space.received_packets:
        return Received.DONE  # duplicate
    if plain_header[0] & 0x18:
        quic.close(
            error_code=QuicErrorCode.PROTOCOL_VIOLATION,
            frame_type=QuicFrameType.PADDING,
            reason_phrase="Reserved bits must be zero",
        )
        return Received.DONE
    if number > space.expected_packet_number:
        space.expected_packet_number = number + 1
    if number > quic._spin_highest_pn:
        spin = bool(plain_header[0] & PACKET_SPIN_BIT)
        quic._spin_bit = not spin if quic._is_client else spin
        quic._spin_highest_pn = number
    datagrams = _datagram_frames(payload, quic._configuration.max_datagram_frame_size)
    if datagrams is not None:
        # The usual packet: what aioquic's dispatcher would do for it, without the dispatcher.
        events = quic._events
        for datagram in datagrams:
            events.append(DatagramFrameReceived(data=datagram))
        ack_eliciting = True
        outcome = Received.DATAGRAMS_ONLY
    elif payload.strip(b"\x00") == b"\x01":
        # A PING, padded: aioquic's handler for it does nothing; the packet is ack-eliciting.
        ack_eliciting = True
        outcome = Received.PING_ONLY
    else:
        outcome = Received.DONE
        context = QuicReceiveContext(
            epoch=_ONE_RTT,
            host_cid=quic.host_cid,
            network_path=path,
            quic_logger_frames=None,
            time=now,
            version=quic._version,
        )
        try:
            ack_eliciting, _probing = quic._payload_received(context, payload)
        except QuicConnectionError as exc:
            quic.close(
                error_code=exc.error_code,
                frame_type=exc.frame_type,
                reason_phrase=exc.reason_phrase,
            )
            return Received.DONE
        finally:
            live_host_cid(quic)  # the frames may have retired connection IDs
        if quic._state in END_STATES or quic._close_pending:
            return Received.DONE
    # Push the idle deadline back, as aioquic does on every packet; computing it walks the loss
    # recovery state, so at most once a second (60 s idle timeout: nothing to notice).
    if quic._close_at is None or quic._close_at - now < IDLE_TIMEOUT - 1.0:
        quic._close_at = now + quic._idle_timeout()
    quic._ack_eliciting_sent_since_receipt = False
    if not space.discarded:
        if number > space.largest_received_packet:
            space.largest_received_packet = number
            space.largest_received_time = now
        space.ack_queue.add(number)
        space.received_packets.add(number)
        if len(space.ack_queue) > MAX_ACK_RANGES:
            space.ack_queue.shift()
        if ack_eliciting and space.ack_at is None:
            space.ack_at = now + quic._ack_delay
    return outcome


def aioquic_has_work(quic: QuicConnection, now: float) -> bool:
    """Could aioquic's ``datagrams_to_send`` produce anything that our own API calls queued?

    Its generic builder costs more than a whole fast-path packet, so it is skipped when the
    only thing that happened since its last run is DATAGRAMs, which the fast path sends. This
    checks what our code queues through aioquic's API (stream data, a close, a PING, a
    connection-ID change) and what the fast path leaves behind (datagrams it could not send,
    a due ACK). Everything aioquic queues by itself, from received packets or its timer, is
    covered by the driver's own flag."""
    if _queued_beside_ack(quic):
        return True
    space, _ = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    ack_at = space.ack_at
    return ack_at is not None and ack_at <= now


def _queued_beside_ack(quic: QuicConnection) -> bool:
    """:func:`aioquic_has_work` but for a due ACK."""
    if (
        quic._datagrams_pending
        or quic._close_pending
        or quic._ping_pending
        or quic._retire_connection_ids
        or quic._probe_pending
        or quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
    ):
        return True
    for stream in quic._streams.values():
        sender = stream.sender
        if not sender.buffer_is_empty or sender.reset_pending or stream.receiver.stop_pending:
            return True
    return False


def outgoing_datagrams(
    quic: QuicConnection, now: float, aioquic_due: bool
) -> tuple[list[tuple[bytes, NetworkAddress]], QuicNetworkPath | None]:
    """Everything the connection has to send now, and the path it goes to (None before there is
    one; a new object when aioquic moved the peer to a new path).

    The fast path's packets come first, then, if ``aioquic_due`` (aioquic itself may have
    queued something: the driver's flag) or :func:`aioquic_has_work`, whatever aioquic's own
    ``datagrams_to_send`` returns, datagrams the fast path left included; a due ACK that is
    all there is goes through :func:`build_ack_packet` instead. What neither could
    send yet (congestion, pacing) waits for an ACK or the timer, each of which sets the
    driver's flag again."""
    fast = build_datagram_packets(quic, now)
    datagrams = []
    if aioquic_due or _queued_beside_ack(quic):
        datagrams = quic.datagrams_to_send(now=now)
    else:
        # Nothing queued but perhaps the ACK, which goes out on its own as aioquic would send
        # it (checked first: on most sends of a busy connection none is due).
        space, _ = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
        ack_at = space.ack_at
        if ack_at is not None and ack_at <= now:
            ack = build_ack_packet(quic, now)
            if ack is not None:
                fast.append(ack)
            else:  # a case the fast path leaves to aioquic
                datagrams = quic.datagrams_to_send(now=now)
    paths = quic._network_paths
    path = paths[0] if paths else None
    if fast:
        addr = path.addr  # type: ignore[union-attr]  # the fast path needs one
        datagrams = [(packet, addr) for packet in fast] + datagrams
    return datagrams, path
