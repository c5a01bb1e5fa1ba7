"""Both ends of test_secondary_addresses.py's socket-level check, run inside a namespace.

``serve``: a :class:`tunnel.daemon.udp.UdpEndpoint` bound to a wildcard address answers each
datagram with a GSO batch (three full segments and a short one), each segment saying which
local address the datagram arrived on; ``--plain`` answers without a source, as the kernel
routes. Writes a newline to ``--ready-fd`` once bound; runs until killed.

``ask``: sends one datagram to ``--to`` and prints, as JSON, the answers and where they came
from (``{"answers": [[text, host], ...], "error": null}``). With ``--connected`` the socket is
connected, so (like a QUIC client) it never sees answers from another address, and a wrong
source shows up as a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

SEGMENT = 1200
SEGMENTS = 4


def _answer(local: str, data: bytes, index: int) -> bytes:
    text = f"{local}|{data.decode()}|{index}".encode()
    # the last one shorter: a GSO batch may end with a short segment
    size = SEGMENT if index < SEGMENTS - 1 else SEGMENT // 2
    return text.ljust(size, b".")


async def serve(host: str, port: int, plain: bool, ready_fd: int) -> None:
    from tunnel.daemon.udp import UdpEndpoint  # with trio: only `serve` pays for it

    endpoint = await UdpEndpoint.bind(host, port, key="echo", reply_from_target=not plain)
    try:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
        while True:
            await endpoint.wait_readable()
            for data, addr, local in endpoint.receive_batch_with_local(64):
                seen = local.host if local is not None else "-"
                batch = [(_answer(seen, data, i), addr) for i in range(SEGMENTS)]
                endpoint.send_batch(batch, source=local)
    finally:
        endpoint.close()


def ask(to: str, port: int, connected: bool, wait: float) -> dict[str, object]:
    family = socket.AF_INET6 if ":" in to else socket.AF_INET
    answers: list[list[str]] = []
    error = None
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        if connected:
            sock.connect((to, port))
            sock.send(b"hello")
        else:
            sock.sendto(b"hello", (to, port))
        try:
            while len(answers) < SEGMENTS:
                data, addr = sock.recvfrom(65535)
                answers.append([data.rstrip(b".").decode(), addr[0]])
        except TimeoutError:
            error = f"timed out after {wait} s with {len(answers)} of {SEGMENTS} answers"
    return {"answers": answers, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("--listen", required=True)
    serving.add_argument("--port", type=int, required=True)
    serving.add_argument("--plain", action="store_true")
    serving.add_argument("--ready-fd", type=int, required=True)
    asking = commands.add_parser("ask")
    asking.add_argument("--to", required=True)
    asking.add_argument("--port", type=int, required=True)
    asking.add_argument("--connected", action="store_true")
    asking.add_argument("--wait", type=float, default=3.0)
    args = parser.parse_args()
    if args.command == "serve":
        import trio

        trio.run(serve, args.listen, args.port, args.plain, args.ready_fd)
    else:
        print(json.dumps(ask(args.to, args.port, args.connected, args.wait)))


if __name__ == "__main__":
    main()
