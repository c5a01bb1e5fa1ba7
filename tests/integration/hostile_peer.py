"""A hostile QUIC peer for the namespace tests: handshakes, never authenticates, misbehaves.

    ip netns exec NS python tests/integration/hostile_peer.py --server 10.77.0.1:4433 \\
        --attack ping-flood

It completes the QUIC handshake with ALPN ``tunnel/1`` and DATAGRAM support, sends no token
and no AuthRequest, performs one attack, waits (bounded) for the server to close the
connection, and prints one JSON line saying what happened: whether the handshake completed,
whether the ServerHello arrived, who closed the connection, with which error code and
reason, and how much it sent. It exits 0 whenever it printed that report; the caller judges
the report. Aim it only at addresses of namespaces you created.

Built on aioquic's sans-IO ``QuicConnection`` with a plain blocking UDP socket and
``select``, on purpose independent of the tunnel package: the wire bits it needs (ALPN,
frame bytes, stream numbers) are written out here from tunnel/core/messages.py, so a change
there cannot silently make this peer polite. The two aioquic internals it touches (flow
control credit and the peer's stream limits) are what a hostile implementation would
simply ignore.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    PingAcknowledged,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

ALPN = "tunnel/1"
CONTROL_STREAM = 0  # the client's first bidirectional stream
SERVER_HELLO_STREAM = 3  # the server's first unidirectional stream
FRAME_PACKET = 0x00
PING = b"\x01"
PONG = 0x02
FRAME_SERVER_HELLO = 0x10
FRAME_AUTH_REQUEST = 0x11
TRANSPORT_CLOSE, APPLICATION_CLOSE = 0x1C, 0x1D

# The real client's tunnel addresses (the first lease of the test networks): the flood's
# IP-looking datagrams claim them, as an unauthenticated injector would.
SPOOF_SRC4, SPOOF_DST4 = "10.78.0.2", "10.78.0.1"
SPOOF_SRC6, SPOOF_DST6 = "fd78::2", "fd78::1"
SINK_PORT = 9999  # where the test listens for anything that leaked through
SPOOF_MARK = b"hostile"

ATTACKS = (
    "stop-sending-after-ping",
    "reset-control",
    "many-streams",
    "huge-frame",
    "ping-flood",
    "datagram-flood",
)
STREAMS_PER_KIND = 300
PINGS = 20_000
DATAGRAMS = 3_000
# Receive credit of ping-flood: room for the ServerHello and a few hundred Pongs, never more.
FLOOD_MAX_DATA = 1024
FLOOD_MAX_STREAM_DATA = 512
HANDSHAKE_LIMIT_S = 5.0
RESET_PING_UID = 1


class TrafficBudgetExceeded(Exception):
    """The peer would send more than ``--max-bytes``: it stops instead."""


class HostileConnection(QuicConnection):
    """A client connection that notes how the server closed it and, when told, never
    grants the server more receive credit than the initial transport parameters."""

    freeze_credit = False
    peer_close: dict[str, Any] | None = None

    def _handle_connection_close_frame(self, context: Any, frame_type: int, buf: Buffer) -> None:
        # Parsed here because aioquic's event does not say whether the close was the
        # application's or the transport's.
        if self.peer_close is None:
            start = buf.tell()
            code = buf.pull_uint_var()
            offending = buf.pull_uint_var() if frame_type == TRANSPORT_CLOSE else None
            reason = buf.pull_bytes(buf.pull_uint_var()).decode("utf-8", "replace")
            buf.seek(start)
            self.peer_close = {
                "kind": "application" if frame_type == APPLICATION_CLOSE else "transport",
                "error_code": code,
                "frame_type": offending,
                "reason": reason,
            }
        super()._handle_connection_close_frame(context, frame_type, buf)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        if not self.freeze_credit:
            super()._write_connection_limits(builder=builder, space=space)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if not self.freeze_credit:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)


class Peer:
    """One connection to the server and the blocking loop that drives it."""

    def __init__(self, server: tuple[str, int], *, attack: str, deadline: float,
                 max_bytes: int) -> None:  # fmt: skip
        self.attack = attack
        self.deadline = deadline
        self.max_bytes = max_bytes
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.connect(server)
        self.server = self.sock.getpeername()
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            verify_mode=ssl.CERT_NONE,  # the server's identity is not what is tested here
            max_datagram_frame_size=65535,
            idle_timeout=max(1.0, deadline - time.monotonic()),
        )
        if attack == "ping-flood":
            config.max_data = FLOOD_MAX_DATA
            config.max_stream_data = FLOOD_MAX_STREAM_DATA
        self.quic = HostileConnection(configuration=config)
        self.quic.freeze_credit = attack == "ping-flood"
        self.handshake = False
        self.server_hello = b""
        self.pongs = 0
        self.other_stream_bytes = 0
        self.datagrams_received = 0
        self.stream_resets: list[int] = []
        self.stop_sending: list[int] = []
        self.pings_acked: set[int] = set()
        self.terminated: ConnectionTerminated | None = None
        self.bytes_sent = 0
        self.packets_sent = 0

    # -- driving aioquic --------------------------------------------------------------------

    def transmit(self) -> None:
        for data, _addr in self.quic.datagrams_to_send(now=time.monotonic()):
            if self.bytes_sent + len(data) > self.max_bytes:
                raise TrafficBudgetExceeded(f"over the budget of {self.max_bytes} bytes")
            try:
                self.sock.send(data)
            except OSError:
                continue  # e.g. ECONNREFUSED from an earlier ICMP error: UDP, move on
            self.bytes_sent += len(data)
            self.packets_sent += 1

    def _events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake = True
            elif isinstance(event, StreamDataReceived):
                if event.stream_id == SERVER_HELLO_STREAM:
                    self.server_hello += event.data
                elif event.stream_id == CONTROL_STREAM:
                    self.pongs += event.data.count(PONG)
                else:
                    self.other_stream_bytes += len(event.data)
            elif isinstance(event, DatagramFrameReceived):
                self.datagrams_received += 1
            elif isinstance(event, StreamReset):
                self.stream_resets.append(event.stream_id)
            elif isinstance(event, StopSendingReceived):
                self.stop_sending.append(event.stream_id)
            elif isinstance(event, PingAcknowledged):
                self.pings_acked.add(event.uid)
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event

    @property
    def closed(self) -> bool:
        """The server closed the connection, or it ended on our side."""
        return self.quic.peer_close is not None or self.terminated is not None

    def run_until(self, done: Callable[[], bool], limit: float | None = None) -> bool:
        """Drive the connection until ``done()`` or the connection ends; False if the time
        (``limit``, at most the overall deadline) ran out first."""
        until = self.deadline if limit is None else min(limit, self.deadline)
        while True:
            self.transmit()
            self._events()
            if done():
                return True
            if self.closed:
                return False
            now = time.monotonic()
            if now >= until:
                return False
            wait = until - now
            timer = self.quic.get_timer()
            if timer is not None:
                wait = max(0.0, min(wait, timer - now))
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                self._receive_all()
            timer = self.quic.get_timer()
            if timer is not None and time.monotonic() >= timer:
                self.quic.handle_timer(now=time.monotonic())

    def _receive_all(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP error queued on the socket: nothing to read
            self.quic.receive_datagram(data, self.server, now=time.monotonic())

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        report: dict[str, Any] = {"attack": self.attack}
        try:
            self.quic.connect(self.server, now=started)
            self.run_until(lambda: self.handshake, started + HANDSHAKE_LIMIT_S)
            if self.handshake:
                # The ServerHello comes with the handshake flight; wait for it briefly.
                self.run_until(self._hello_complete, time.monotonic() + 1.0)
                attacked = time.monotonic()
                ATTACK_FUNCTIONS[self.attack](self)
                self.run_until(lambda: self.closed)
                report["close_after_s"] = round(time.monotonic() - attacked, 3)
        except TrafficBudgetExceeded as exc:
            report["budget_exceeded"] = str(exc)
        report.update(self._outcome())
        report["seconds"] = round(time.monotonic() - started, 3)
        self._leave()
        return report

    def _hello_complete(self) -> bool:
        hello = self.server_hello
        if len(hello) < 5 or hello[0] != FRAME_SERVER_HELLO:
            return False
        return len(hello) >= 5 + struct.unpack_from(">I", hello, 1)[0]

    def _outcome(self) -> dict[str, Any]:
        close = self.quic.peer_close
        out: dict[str, Any] = {
            "handshake": self.handshake,
            "server_hello": self._hello_complete(),
            "closed_by": None,
            "close_kind": None,
            "error_code": None,
            "frame_type": None,
            "reason": None,
        }
        if close is not None:
            out.update(closed_by="server", close_kind=close["kind"],
                       error_code=close["error_code"], frame_type=close["frame_type"],
                       reason=close["reason"])  # fmt: skip
        elif self.terminated is not None:
            # aioquic ended it on our side: an idle timeout, or it refused the server's bytes
            event = self.terminated
            out.update(closed_by="local", error_code=event.error_code,
                       frame_type=event.frame_type, reason=event.reason_phrase)  # fmt: skip
        if out["error_code"] is not None:
            out["error_code_hex"] = f"{out['error_code']:#x}"
        out.update(
            pongs=self.pongs,
            datagrams_received=self.datagrams_received,
            stream_resets=self.stream_resets[:10],
            stop_sending=self.stop_sending[:10],
            other_stream_bytes=self.other_stream_bytes,
            bytes_sent=self.bytes_sent,
            packets_sent=self.packets_sent,
            datagrams_unsent=len(self.quic._datagrams_pending),
        )
        return out

    def _leave(self) -> None:
        """Close our side if the server did not, so it does not wait for us; bounded."""
        if not self.closed:
            self.quic.close(error_code=0, reason_phrase="hostile peer done")
            # The close goes out whatever the budget says: it is one small packet.
            self.max_bytes += 4096
            try:
                self.transmit()
            except TrafficBudgetExceeded:
                pass
        self.sock.close()


# --- the attacks: each queues its misbehaviour; Peer.run sends it and waits for the close ----


def stop_sending_after_ping(peer: Peer) -> None:
    """A Ping on stream 0 and STOP_SENDING for stream 0 in the same flight: the server must
    answer a Ping on a stream it may no longer write to."""
    peer.quic.send_stream_data(CONTROL_STREAM, PING)
    peer.quic.stop_stream(CONTROL_STREAM, 0x0)


def reset_control(peer: Peer) -> None:
    """Half an AuthRequest on stream 0, then RESET_STREAM once the server has it: the server
    holds a partial frame for a stream that will never complete."""
    partial = bytes((FRAME_AUTH_REQUEST,)) + struct.pack(">I", 200) + b'{"version":'
    peer.quic.send_stream_data(CONTROL_STREAM, partial)
    # The reset must not overtake the data (aioquic would then never send it): a PING in the
    # same packet, and its ACK says the data arrived.
    peer.quic.send_ping(RESET_PING_UID)
    peer.run_until(lambda: RESET_PING_UID in peer.pings_acked, time.monotonic() + 1.0)
    if not peer.closed:
        peer.quic.reset_stream(CONTROL_STREAM, 0x0)


def many_streams(peer: Peer) -> None:
    """Hundreds of bidirectional and unidirectional streams with one byte each, far past the
    server's stream limits."""
    quic = peer.quic
    # aioquic holds streams past the peer's MAX_STREAMS back; a hostile peer does not.
    quic._remote_max_streams_bidi = quic._remote_max_streams_uni = 1 << 20
    quic.send_stream_data(CONTROL_STREAM, PING)
    for _ in range(STREAMS_PER_KIND):
        for uni in (False, True):
            quic.send_stream_data(quic.get_next_available_stream_id(is_unidirectional=uni), PING)


def huge_frame(peer: Peer) -> None:
    """A Packet frame header claiming 0xFFFFFFFF bytes, then some of them."""
    body = random.Random(1).randbytes(4000)
    peer.quic.send_stream_data(CONTROL_STREAM, bytes((FRAME_PACKET,)) + b"\xff" * 4 + body)


def ping_flood(peer: Peer) -> None:
    """Thousands of Pings on stream 0; the Pongs are never read (no credit is granted)."""
    peer.quic.send_stream_data(CONTROL_STREAM, PING * PINGS)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# Valid checksums: a packet that leaked past the server would reach a socket, not be dropped
# by the kernel, so the test's sink can tell.
def _ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", 40000, SINK_PORT, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, s, d)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + udp


def _ipv6_udp(src: str, dst: str, payload: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    size = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, SINK_PORT, size, 0) + payload
    check = _checksum(s + d + struct.pack("!IxxxB", size, 17) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    return struct.pack("!IHBB16s16s", 0x60000000, size, 17, 64, s, d) + udp


def datagram_flood(peer: Peer) -> None:
    """Thousands of DATAGRAM frames before any authentication: garbage, IP packets claiming the
    real client's tunnel addresses, and datagram pings."""
    rng = random.Random(2)
    for i in range(DATAGRAMS):
        kind = i % 4
        payload = SPOOF_MARK + rng.randbytes(rng.randrange(0, 1000))
        if kind == 0:
            data = rng.randbytes(rng.randrange(1, 1100))
        elif kind == 1:
            data = _ipv4_udp(SPOOF_SRC4, SPOOF_DST4, payload)
        elif kind == 2:
            data = _ipv6_udp(SPOOF_SRC6, SPOOF_DST6, payload)
        else:
            data = PING
        peer.quic.send_datagram_frame(data)
    # Keep driving until aioquic has sent them all (congestion control paces them).
    peer.run_until(lambda: not peer.quic._datagrams_pending)


ATTACK_FUNCTIONS: dict[str, Callable[[Peer], None]] = {
    "stop-sending-after-ping": stop_sending_after_ping,
    "reset-control": reset_control,
    "many-streams": many_streams,
    "huge-frame": huge_frame,
    "ping-flood": ping_flood,
    "datagram-flood": datagram_flood,
}


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: HOST must be an IP address") from None


def main(argv: list[str] | None = None) -> int:
    """Run one attack and print its report as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", type=_endpoint, required=True, help="HOST:PORT")
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds the whole run may take (default 10)")  # fmt: skip
    parser.add_argument("--max-bytes", type=int, default=8_000_000,
                        help="bytes it may send at most (default 8 MB)")  # fmt: skip
    args = parser.parse_args(argv)
    peer = Peer(args.server, attack=args.attack, deadline=time.monotonic() + args.timeout,
                max_bytes=args.max_bytes)  # fmt: skip
    print(json.dumps(peer.run(), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
