"""A bounded flood of hostile datagrams at a tunnel server, for tests in namespaces.

    python tests/support/flood.py --target 10.77.0.1:4433 --seconds 10 --rate 2000

Each round sends a mix of: random bytes, truncated QUIC Initials, complete QUIC Initials of
connections that never finish their handshake (a fresh source port each, so the server sees many
would-be clients), and replays of earlier Initials. It stops by itself after ``--seconds`` or
``--count`` datagrams and prints what it sent as one JSON line. Aim it only at addresses of
namespaces you created.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

from aioquic.quic.connection import QuicConnection

from tunnel.daemon.quic import client_configuration

SOCKETS = 64  # source ports to spread the bogus handshakes over


def initial_datagrams(target: tuple[str, int]) -> list[bytes]:
    quic = QuicConnection(configuration=client_configuration())
    quic.connect(target, now=time.monotonic())
    return [data for data, _ in quic.datagrams_to_send(now=time.monotonic())]


def flood(
    target: tuple[str, int], *, seconds: float, rate: float, count: int, seed: int
) -> dict[str, int]:
    rng = random.Random(seed)
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sockets = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(SOCKETS)]
    for sock in sockets:
        sock.setblocking(False)
    sent = {
        "garbage": 0,
        "truncated_initial": 0,
        "initial": 0,
        "replayed_initial": 0,
        "send_errors": 0,
    }
    recorded: list[bytes] = []
    interval = 1.0 / rate
    deadline = time.monotonic() + seconds
    next_send = time.monotonic()
    total = 0
    try:
        while time.monotonic() < deadline and total < count:
            kind = rng.choice(("garbage", "truncated_initial", "initial", "replayed_initial"))
            if kind == "garbage":
                datagrams = [rng.randbytes(rng.randint(1, 1500))]
            elif kind == "initial" or not recorded:
                kind = "initial"
                datagrams = initial_datagrams(target)
                recorded = (recorded + datagrams)[-32:]
            elif kind == "truncated_initial":
                whole = rng.choice(recorded)
                datagrams = [whole[: rng.randint(1, len(whole) - 1)]]
            else:
                datagrams = [rng.choice(recorded)]
            sock = rng.choice(sockets)
            for data in datagrams:
                try:
                    sock.sendto(data, target)
                    sent[kind] += 1
                except OSError:
                    sent["send_errors"] += 1
                total += 1
            next_send += interval
            pause = next_send - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    finally:
        for sock in sockets:
            sock.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/support/flood.py")
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="datagrams per second")
    parser.add_argument("--count", type=int, default=1_000_000, help="stop after this many")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ready-fd", type=int, help="write a newline here once started")
    args = parser.parse_args(argv)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"\n")
        os.close(args.ready_fd)
    host, _, port = args.target.rpartition(":")
    target = (host.strip("[]"), int(port))
    result = flood(target, seconds=args.seconds, rate=args.rate, count=args.count, seed=args.seed)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
