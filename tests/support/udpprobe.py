"""Small UDP tools for the hole-punching topology (:mod:`tests.support.p2pnet`).

    python tests/support/udpprobe.py reflect --port P [--port P ...] [--ready-fd N]
    python tests/support/udpprobe.py ask --to HOST --port P [--port P ...] --bind-port LP
    python tests/support/udpprobe.py punch --peer HOST --peer-port PP --bind-port LP
    python tests/support/udpprobe.py send --to HOST --port P --count N [--bind-port LP]

``reflect`` is a STUN-like observer: it answers every datagram with the source address and
port it saw, and prints one JSON line per datagram (``{"from": [host, port], "port": P,
"data": text}``) so that a test can also use it as a listener. ``ask`` sends from one socket
(one local port) to each server port until each answered, and prints what each saw.
``punch`` is one side of a simultaneous open: it keeps sending to the peer from a fixed port
until it has heard the peer *and* the peer has heard it (the packets carry a "got" flag), then
sends a few last packets carrying the flag and prints a report. ``send`` fires datagrams and
forgets them (the unsolicited-packet probe).

Every command prints exactly one JSON report on stdout (``reflect``: one line per datagram)
and is bounded by ``--wait`` or ``--timeout``. Plain blocking sockets, standard library only:
this runs by path inside ``ip netns exec``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import time

__all__ = ["main"]

ASK_RETRY_S = 0.2


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _plain(host: str) -> str:
    """A v4-mapped IPv6 address (dual-stack socket) as the IPv4 address it stands for."""
    return host[len("::ffff:") :] if host.startswith("::ffff:") and "." in host else host


def _socket_for(host: str, bind_port: int) -> socket.socket:
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", bind_port))
    return sock


def _report(data: dict[str, object]) -> None:
    print(json.dumps(data), flush=True)


def reflect(ports: list[int], timeout: float, ready_fd: int | None) -> None:
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        socks.append((sock, port))
    if ready_fd is not None:
        os.write(ready_fd, b"\n")
        os.close(ready_fd)
    selector = selectors.DefaultSelector()
    for sock, port in socks:
        selector.register(sock, selectors.EVENT_READ, (sock, port))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            sock, port = key.data
            data, peer = sock.recvfrom(65535)
            seen = [_plain(peer[0]), peer[1]]
            _report({"from": seen, "port": port, "data": data[:200].decode(errors="replace")})
            sock.sendto(json.dumps({"seen": seen, "port": port}).encode(), peer)


def ask(host: str, ports: list[int], bind_port: int, wait: float) -> None:
    sock = _socket_for(host, bind_port)
    local = sock.getsockname()
    answers: dict[int, list[object] | None] = dict.fromkeys(ports)
    deadline = time.monotonic() + wait
    next_send = 0.0
    while any(v is None for v in answers.values()) and (now := time.monotonic()) < deadline:
        if now >= next_send:
            for port in ports:
                if answers[port] is None:
                    sock.sendto(b"ask", (host, port))
            next_send = now + ASK_RETRY_S
        sock.settimeout(max(0.001, min(next_send, deadline) - time.monotonic()))
        try:
            data, peer = sock.recvfrom(65535)
        except TimeoutError:
            continue
        answer = json.loads(data)
        if answer.get("port") in answers and peer[1] == answer["port"]:
            answers[answer["port"]] = answer["seen"]
    _report({"local": [local[0], local[1]], "answers": {str(p): a for p, a in answers.items()}})


def punch(
    peer: str, peer_port: int, bind_port: int, size: int, interval: float, wait: float
) -> None:
    sock = _socket_for(peer, bind_port)
    deadline = time.monotonic() + wait
    sent = received = 0
    sources: list[list[object]] = []
    heard = peer_heard = False
    next_send = 0.0

    def send() -> None:
        nonlocal sent
        head = json.dumps({"punch": sent, "got": heard}).encode()
        sock.sendto(head + b" " * max(0, size - len(head)), (peer, peer_port))
        sent += 1

    while not peer_heard and (now := time.monotonic()) < deadline:
        if now >= next_send:
            send()
            next_send = now + interval
        sock.settimeout(max(0.001, min(next_send, deadline) - time.monotonic()))
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            continue
        try:
            message = json.loads(data)
        except ValueError:
            continue
        if not isinstance(message, dict) or "punch" not in message:
            continue
        received += 1
        heard = True
        if [_plain(source[0]), source[1]] not in sources:
            sources.append([_plain(source[0]), source[1]])
        peer_heard = bool(message.get("got"))
    if peer_heard:
        for _ in range(3):  # the peer may still be waiting for our "got"
            send()
    _report({"sent": sent, "received": received, "from": sources, "done": peer_heard})


def send_many(host: str, port: int, count: int, bind_port: int) -> None:
    sock = _socket_for(host, bind_port)
    for i in range(count):
        sock.sendto(f"unsolicited {i}".encode(), (host, port))
    _report({"sent": count, "local": list(sock.getsockname()[:2])})


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tests/support/udpprobe.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reflect", help="answer each datagram with the address it came from")
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--timeout", type=float, default=120.0, help="overall bound, s (120)")
    p.add_argument("--ready-fd", type=int, help="write a newline here once bound")
    p = sub.add_parser("ask", help="ask reflectors what they see")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--bind-port", type=int, default=0)
    p.add_argument("--wait", type=float, default=5.0, help="give up after this long, s (5)")
    p = sub.add_parser("punch", help="one side of a simultaneous open")
    p.add_argument("--peer", required=True)
    p.add_argument("--peer-port", type=int, required=True)
    p.add_argument("--bind-port", type=int, required=True)
    p.add_argument("--size", type=int, default=200, help="bytes per datagram (200)")
    p.add_argument("--interval", type=float, default=0.05, help="between sends, s (0.05)")
    p.add_argument("--wait", type=float, default=5.0, help="give up after this long, s (5)")
    p = sub.add_parser("send", help="fire datagrams and forget them")
    p.add_argument("--to", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--bind-port", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 failure, 2 usage)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "reflect":
            reflect(args.port, args.timeout, args.ready_fd)
        elif args.command == "ask":
            ask(args.to, args.port, args.bind_port, args.wait)
        elif args.command == "punch":
            punch(args.peer, args.peer_port, args.bind_port, args.size, args.interval, args.wait)
        else:
            send_many(args.to, args.port, args.count, args.bind_port)
    except OSError as exc:
        print(f"udpprobe {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
