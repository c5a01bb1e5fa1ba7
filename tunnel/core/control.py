"""What each end accepts on a tunnel connection, in each phase of the tunnel handshake.

The shell hands every QUIC event about streams and DATAGRAMs to a :class:`ServerControl` or a
:class:`ClientControl`; the machine answers with what to act on, or raises
:class:`~tunnel.errors.ProtocolViolation` carrying the close code and reason. Nothing the peer
sends is acted on outside these rules:

* The client opens bidirectional stream 0 (control) and nothing else; the server opens its
  first unidirectional stream (3) for its hello and nothing else.
* A reset, a STOP_SENDING or a FIN on either of them ends the connection: the protocol never
  finishes a stream, so any of these is a peer that wants to see what breaks.
* Server side, before authentication only one ``AuthRequest`` is accepted (no packets, pings
  or DATAGRAMs); after it, packets, pings and pongs. Client side, the server's hello comes
  first, then one ``AuthResponse``; once established a rejecting ``AuthResponse`` means the
  server revoked our credentials.
* Direct paths: once established, a client may tell the server its ``Candidates`` (if it said
  ``peers`` in its request, which the server checks), and the server may introduce other clients
  (``PeerIntro``, ``PeerGone``) to a client that said so. Neither side accepts the other's
  kind. :class:`PeerControl` holds the rules of a direct connection between two clients.
* Pings are answered with at most one pong per batch of stream data and within a budget per
  connection, so a flood of pings never becomes a flood of pongs queued for a peer that may be
  withholding flow-control credit.

Pure: no I/O, time comes in as ``now``.
"""

from __future__ import annotations

import enum

import attrs

from tunnel.core.messages import (
    CLOSE_PROTOCOL,
    AuthRequest,
    AuthResponse,
    Candidates,
    Frame,
    FrameDecoder,
    Packet,
    PeerAuth,
    PeerGone,
    PeerIntro,
    Ping,
    Pong,
    ServerHello,
)
from tunnel.core.ratelimit import TokenBucket
from tunnel.errors import DecodeError, ProtocolViolation

CONTROL_STREAM = 0  # the client's first bidirectional stream
HELLO_STREAM = 3  # the server's first unidirectional stream

# An honest client pings once per heartbeat interval (at least a second apart); this leaves it
# ten times that and answers nothing beyond.
PONG_RATE = 2.0
PONG_BURST = 8.0


class Phase(enum.Enum):
    """Where one connection is in the tunnel handshake."""

    AWAITING_HELLO = "awaiting hello"  # client: the server's nonce has not come yet
    AWAITING_AUTH = "awaiting auth"  # server: no AuthRequest yet; client: request sent
    ESTABLISHED = "established"


def _violation(reason: str) -> ProtocolViolation:
    return ProtocolViolation(reason, CLOSE_PROTOCOL)


@attrs.define
class Received:
    """What one batch of stream data asks of us."""

    packets: list[bytes] = attrs.field(factory=list)
    answer_ping: bool = False  # send one Pong
    pong_seen: bool = False  # the peer answered one of our pings
    pings_ignored: int = 0  # beyond the budget
    auth: AuthRequest | None = None  # server side
    hello: ServerHello | None = None  # client side
    response: AuthResponse | None = None  # client side
    candidates: Candidates | None = None  # server side: the latest in this batch
    intros: list[PeerIntro] = attrs.field(factory=list)  # client side
    gone: list[bytes] = attrs.field(factory=list)  # client side: peer IDs
    peer_auth: PeerAuth | None = None  # direct connection, responder side


class _Endpoint:
    """What both ends share: the control stream's decoder, the pong budget and the rules for
    resets and STOP_SENDING."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self._decoder = FrameDecoder()
        self._pongs = TokenBucket(rate=PONG_RATE, burst=PONG_BURST)

    def stream_reset(self, stream_id: int) -> None:
        """The peer reset a stream (RESET_STREAM): the protocol has no use for that."""
        raise _violation(f"stream {stream_id} reset by peer")

    def stop_sending(self, stream_id: int) -> None:
        """The peer asked us to stop sending on a stream (STOP_SENDING)."""
        raise _violation(f"STOP_SENDING on stream {stream_id}")

    def _decode(
        self, decoder: FrameDecoder, data: bytes, end_stream: bool, stream: str
    ) -> list[Frame]:
        try:
            frames = decoder.feed(data)
        except DecodeError as exc:
            raise _violation(f"malformed {stream} stream: {exc}") from None
        if end_stream:
            raise _violation(f"{stream} stream finished by peer")
        return frames

    def _data_frame(self, frame: object, received: Received, now: float) -> None:
        """What an established connection carries on the control stream, both ways."""
        if isinstance(frame, Packet):
            received.packets.append(frame.data)
        elif isinstance(frame, Ping):
            self._ping(received, now)
        elif isinstance(frame, Pong):
            received.pong_seen = True
        else:
            raise _violation(f"unexpected {type(frame).__name__}")

    def _ping(self, received: Received, now: float) -> None:
        if received.answer_ping or self._pongs.take(now):
            received.answer_ping = True
        else:
            received.pings_ignored += 1


class ServerControl(_Endpoint):
    """The server's rules for one client connection."""

    def __init__(self) -> None:
        super().__init__(Phase.AWAITING_AUTH)
        self._auth_seen = False
        self.peers = False  # the accepted client takes part in direct paths

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> Received:
        """Frames the client sent; raises ProtocolViolation for anything out of place."""
        if stream_id != CONTROL_STREAM:
            raise _violation(f"unexpected stream {stream_id}")
        received = Received()
        for frame in self._decode(self._decoder, data, end_stream, "control"):
            if isinstance(frame, AuthRequest):
                if self._auth_seen:
                    raise _violation("a second AuthRequest")
                self._auth_seen = True
                received.auth = frame
            elif self.phase is not Phase.ESTABLISHED:
                # Nothing but the request before we said yes (the frames after a request in
                # the same batch come before our answer, too).
                raise _violation(f"{type(frame).__name__} before authentication")
            elif isinstance(frame, Candidates):
                if not self.peers:
                    raise _violation("Candidates from a client that takes no peers")
                received.candidates = frame
            else:
                self._data_frame(frame, received, now)
        return received

    def established(self, *, peers: bool = False) -> None:
        """The request was accepted; ``peers``: the client takes part in direct paths."""
        self.phase = Phase.ESTABLISHED
        self.peers = peers

    def datagram(self) -> None:
        """A DATAGRAM frame arrived: only an authenticated client may send one."""
        if self.phase is not Phase.ESTABLISHED:
            raise _violation("DATAGRAM before authentication")


class ClientControl(_Endpoint):
    """The client's rules for its connection to the server."""

    def __init__(self) -> None:
        super().__init__(Phase.AWAITING_HELLO)
        self._hello_decoder = FrameDecoder()
        self._hello_seen = False
        self.peers = False

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> Received:
        """Frames the server sent; raises ProtocolViolation for anything out of place."""
        received = Received()
        if stream_id == HELLO_STREAM:
            for frame in self._decode(self._hello_decoder, data, end_stream, "hello"):
                if not isinstance(frame, ServerHello):
                    raise _violation(f"unexpected {type(frame).__name__} on the hello stream")
                if self._hello_seen:
                    raise _violation("a second ServerHello on the hello stream")
                self._hello_seen = True
                received.hello = frame
            return received
        if stream_id != CONTROL_STREAM:
            raise _violation(f"unexpected stream {stream_id}")
        for frame in self._decode(self._decoder, data, end_stream, "control"):
            if isinstance(frame, AuthResponse):
                if self.phase is Phase.ESTABLISHED and frame.accepted:
                    raise _violation("a second accepting AuthResponse")
                if self.phase is Phase.AWAITING_HELLO:
                    raise _violation("AuthResponse before we asked")
                received.response = frame
                if frame.accepted:
                    self.phase = Phase.ESTABLISHED
                else:
                    return received  # rejected or revoked: nothing after it matters
            elif self.phase is not Phase.ESTABLISHED:
                raise _violation(f"{type(frame).__name__} before the AuthResponse")
            elif isinstance(frame, PeerIntro):
                if not self.peers:
                    raise _violation("PeerIntro, but we take no peers")
                received.intros.append(frame)
            elif isinstance(frame, PeerGone):
                if not self.peers:
                    raise _violation("PeerGone, but we take no peers")
                received.gone.append(frame.peer_id)
            else:
                self._data_frame(frame, received, now)
        return received

    def request_sent(self, *, peers: bool = False) -> None:
        """We answered the hello with our AuthRequest (``peers``: asking for introductions)."""
        self.phase = Phase.AWAITING_AUTH
        self.peers = peers


class PeerControl(_Endpoint):
    """The rules of a direct connection between two clients, on its bidirectional stream 0.

    The initiator (QUIC client) sends one ``PeerAuth`` first, then a ping, and sends packets
    only once the pong came back (a full round trip on the direct path). The responder accepts
    nothing before the ``PeerAuth`` (no packets, pings or DATAGRAMs), and nothing but packets,
    pings and pongs after it; the shell checks ``received.peer_auth`` before it acts on
    anything else of the same batch, and closes the connection if it fails. The initiator
    accepts packets, pings and pongs, and no ``PeerAuth``. No other stream.
    """

    def __init__(self, *, initiator: bool) -> None:
        super().__init__(Phase.ESTABLISHED if initiator else Phase.AWAITING_AUTH)
        self.initiator = initiator
        self._auth_seen = False

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool, now: float) -> Received:
        """Frames the peer sent; raises ProtocolViolation for anything out of place."""
        if stream_id != CONTROL_STREAM:
            raise _violation(f"unexpected stream {stream_id}")
        received = Received()
        for frame in self._decode(self._decoder, data, end_stream, "peer"):
            if isinstance(frame, PeerAuth):
                if self.initiator or self._auth_seen:
                    raise _violation("an unexpected PeerAuth")
                self._auth_seen = True
                received.peer_auth = frame
                self.phase = Phase.ESTABLISHED  # provisionally: the shell verifies it first
            elif self.phase is not Phase.ESTABLISHED:
                raise _violation(f"{type(frame).__name__} before the PeerAuth")
            else:
                self._data_frame(frame, received, now)
        return received

    def datagram(self) -> None:
        """A DATAGRAM frame arrived: only once the peer is authenticated."""
        if self.phase is not Phase.ESTABLISHED:
            raise _violation("DATAGRAM before the PeerAuth")
