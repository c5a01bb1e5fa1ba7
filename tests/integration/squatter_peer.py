"""A host that squats on a peer's candidate address, for the namespace tests of direct paths.

    ip netns exec NS python tests/integration/squatter_peer.py --bind 203.0.113.10:40000 \\
        --claim PUBLIC_ID --seconds 20

It stands where a client expects the introduced peer (the route to the peer's address leads
here instead): it reflects every probe back to its sender, answers each with a forged pong,
and opens a direct connection to whoever probed it, in our own protocol (ALPN
``tunnel-peer/1``) but with a key of its own, claiming in its ``PeerAuth`` to be ``--claim``.
It never knows the introduction's secret, so everything it proves is wrong; the client must
refuse all of it. It prints one JSON line when it is closed or its time is up: what it
received (``datagrams`` counts its own connection's too), whether its handshake completed,
and the close code and reason if the client closed it.
Aim it only at addresses of namespaces you created.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from typing import Any

from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

from tunnel.core.disco import MAGIC
from tunnel.core.identity import Identity, decode_public_id
from tunnel.core.messages import PeerAuth, encode_frame
from tunnel.daemon.quic import peer_configuration

CONTROL_STREAM = 0


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, type=parse_endpoint)
    parser.add_argument("--claim", required=True, help="the public ID it pretends to have")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    claimed = decode_public_id(args.claim)
    own = Identity.generate()

    family = socket.AF_INET6 if ":" in args.bind[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(args.bind)
    report: dict[str, Any] = {
        "probes": 0,
        "datagrams": 0,
        "handshake_completed": False,
        "error_code": None,
        "reason": None,
    }
    quic: QuicConnection | None = None
    target = None
    deadline = time.monotonic() + args.seconds

    def flush() -> None:
        assert quic is not None
        for data, addr in quic.datagrams_to_send(now=time.monotonic()):
            sock.sendto(data, addr)

    while time.monotonic() < deadline:
        timeout = deadline - time.monotonic()
        if quic is not None:
            timer = quic.get_timer()
            if timer is not None:
                timeout = min(timeout, max(0.0, timer - time.monotonic()))
        readable, _, _ = select.select([sock], [], [], timeout)
        now = time.monotonic()
        if readable:
            data, addr = sock.recvfrom(65536)
            report["datagrams"] += 1
            if data.startswith(MAGIC):
                report["probes"] += 1
                sock.sendto(data, addr)  # reflected
                sock.sendto(data[: len(MAGIC)] + os.urandom(max(0, len(data) - len(MAGIC))), addr)
                if quic is None:
                    target = addr
                    quic = QuicConnection(configuration=peer_configuration(own, initiator=True))
                    quic.connect(addr, now=now)
            elif quic is not None and addr == target:
                quic.receive_datagram(data, addr, now=now)
        elif quic is not None and (timer := quic.get_timer()) is not None and now >= timer:
            quic.handle_timer(now=now)
        if quic is None:
            continue
        event = quic.next_event()
        while event is not None:
            if isinstance(event, HandshakeCompleted):
                report["handshake_completed"] = True
                # What a real initiator sends first, signed by the wrong key.
                auth = PeerAuth(
                    client_id=claimed,
                    signature=own.sign(b"no introduction secret here"),
                    max_datagram_payload=1200,
                )
                quic.send_stream_data(CONTROL_STREAM, encode_frame(auth))
            elif isinstance(event, ConnectionTerminated):
                report["error_code"] = event.error_code
                report["reason"] = event.reason_phrase
                print(json.dumps(report), flush=True)
                return 0
            event = quic.next_event()
        flush()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
