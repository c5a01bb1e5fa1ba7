"""A deterministic TCP transfer for tests, the demo and the benchmark.

    python tests/support/transfer.py serve --listen HOST:PORT [--count 1] [--ready-fd N]
    python tests/support/transfer.py send --to HOST:PORT --bytes N --seed S

The sender streams N pseudo-random bytes derived from the seed (so both sides, or a test,
can recompute them), half-closes, and waits for the receiver to close: at that point the
receiver has read everything. Each side prints one JSON line per transfer on stdout,
``{"bytes": n, "sha256": hex, "seconds": t}``; equal lines mean the bytes arrived intact.
IPv6 hosts are written ``[fd78::1]:5201``. Everything is bounded by ``--timeout``.

Plain blocking sockets on purpose: this is a measuring stick, and the simplest one is the
least likely to be the bottleneck or the bug.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import time
from collections.abc import Iterator

__all__ = ["parse_hostport", "payload_chunks", "expected_sha256", "main"]

CHUNK = 256 * 1024


def parse_hostport(text: str) -> tuple[str, int]:
    """``"10.0.0.1:80"`` or ``"[fd00::1]:80"`` -> (host, port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, port_number


def payload_chunks(nbytes: int, seed: str) -> Iterator[bytes]:
    """The ``nbytes`` deterministic bytes of ``seed``, in chunks of at most CHUNK bytes."""
    rng = random.Random(f"tunnel-transfer:{seed}")
    left = nbytes
    while left > 0:
        size = min(CHUNK, left)
        yield rng.randbytes(size)
        left -= size


def expected_sha256(nbytes: int, seed: str) -> str:
    """The SHA-256 hex digest of what ``send --bytes nbytes --seed seed`` sends."""
    digest = hashlib.sha256()
    for chunk in payload_chunks(nbytes, seed):
        digest.update(chunk)
    return digest.hexdigest()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("transfer timed out")
        return left


def _report(nbytes: int, sha256: str, seconds: float) -> None:
    line = {"bytes": nbytes, "sha256": sha256, "seconds": round(seconds, 6)}
    print(json.dumps(line), flush=True)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(host: str, port: int, count: int, timeout: float, ready_fd: int | None) -> None:
    """Accept ``count`` connections one after the other, read each to EOF, report each."""
    deadline = _Deadline(timeout)
    with socket.socket(_family(host), socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(count)
        print(f"listening on {host}:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
        if ready_fd is not None:
            os.write(ready_fd, b"\n")
            os.close(ready_fd)
        for _ in range(count):
            listener.settimeout(deadline.left())
            conn, peer = listener.accept()
            with conn:
                digest = hashlib.sha256()
                total = 0
                started = time.monotonic()
                while True:
                    conn.settimeout(deadline.left())
                    data = conn.recv(CHUNK)
                    if not data:
                        break
                    digest.update(data)
                    total += len(data)
                elapsed = time.monotonic() - started
            print(f"received {total} bytes from {peer[0]}", file=sys.stderr, flush=True)
            _report(total, digest.hexdigest(), elapsed)


def send(host: str, port: int, nbytes: int, seed: str, timeout: float, connect_wait: float) -> None:
    """Connect (retrying refused connections for ``connect_wait`` s), send, half-close, and
    wait for the receiver to close its side."""
    deadline = _Deadline(timeout)
    retry_until = time.monotonic() + connect_wait
    while True:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.settimeout(deadline.left())
        try:
            sock.connect((host, port))
            break
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() >= retry_until:
                raise
            time.sleep(0.1)
        except BaseException:
            sock.close()
            raise
    with sock:
        digest = hashlib.sha256()
        started = time.monotonic()
        for chunk in payload_chunks(nbytes, seed):
            digest.update(chunk)
            sock.settimeout(deadline.left())
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        # the receiver closes after reading EOF: only then is every byte known delivered
        while True:
            sock.settimeout(deadline.left())
            if not sock.recv(4096):
                break
        elapsed = time.monotonic() - started
    _report(nbytes, digest.hexdigest(), elapsed)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tests/support/transfer.py",
        description="Deterministic TCP transfer with a SHA-256 report on each side.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="receive transfers")
    p_serve.add_argument("--listen", required=True, help="HOST:PORT ([v6]:port for IPv6)")
    p_serve.add_argument("--count", type=int, default=1, help="transfers to accept (1)")
    p_serve.add_argument("--timeout", type=float, default=60.0, help="overall bound, s (60)")
    p_serve.add_argument("--ready-fd", type=int, help="write a newline here once listening")
    p_send = sub.add_parser("send", help="send one transfer")
    p_send.add_argument("--to", required=True, help="HOST:PORT ([v6]:port for IPv6)")
    p_send.add_argument("--bytes", type=int, required=True, help="how many bytes")
    p_send.add_argument("--seed", default="0", help="seed of the pseudo-random bytes")
    p_send.add_argument("--timeout", type=float, default=60.0, help="overall bound, s (60)")
    p_send.add_argument(
        "--connect-wait", type=float, default=10.0, help="retry refused connects this long (10)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 1 failure, 2 usage)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            host, port = parse_hostport(args.listen)
            if args.count < 1:
                parser.error("--count must be at least 1")
            serve(host, port, args.count, args.timeout, args.ready_fd)
        else:
            host, port = parse_hostport(args.to)
            if args.bytes < 0:
                parser.error("--bytes must not be negative")
            send(host, port, args.bytes, args.seed, args.timeout, args.connect_wait)
    except ValueError as exc:
        parser.error(str(exc))
    except (OSError, TimeoutError) as exc:
        print(f"transfer {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
