"""A non-blocking UDP socket driven by trio's readiness notifications.

The pumps drain the socket until it would block and send without awaiting: UDP has no
backpressure worth waiting for, and QUIC recovers what a full send buffer drops.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from typing import Any

import trio

from tunnel.core.readahead import ReadAhead
from tunnel.errors import NameNotResolved, SystemSetupError

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 65535
# UDP segmentation offload (Linux): Python's socket module lacks the names.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000


async def resolve(host: str, port: int, *, key: str) -> tuple[int, Any]:
    """(family, sockaddr) for host:port; the error names the config ``key``."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise NameNotResolved(f"{key}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class UdpEndpoint:
    """One bound UDP socket. Use :meth:`bind` to create."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.local_address = sock.getsockname()
        self.send_drops = 0
        self.read_ahead = ReadAhead()
        # GSO: a run of equal-size datagrams to one address in one sendmsg. Off for good if
        # the kernel or device refuses it.
        self.gso = True

    @classmethod
    async def bind(
        cls, host: str, port: int, *, key: str, family: int | None = None
    ) -> UdpEndpoint:
        if family is None:
            family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
            if host not in ("", "::", "0.0.0.0") and not _is_literal(host):
                family, sockaddr = await resolve(host, port, key=key)
                host = sockaddr[0]
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if family == socket.AF_INET6:
                # "[::]" serves IPv4 clients too (as v4-mapped addresses).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SystemSetupError(f"{key}: [{host}]:{port} is already in use") from exc
            raise SystemSetupError(f"{key}: cannot bind [{host}]:{port}: {exc.strerror}") from exc
        return cls(sock)

    @property
    def family(self) -> int:
        return self.sock.family

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def receive_batch(self, limit: int) -> list[tuple[bytes, Any]]:
        """Up to ``limit`` datagrams that are already waiting; never blocks. After a quiet
        spell only the first: see :mod:`tunnel.core.readahead`."""
        batch = []
        recvfrom = self.sock.recvfrom
        try:
            batch.append(recvfrom(RECV_SIZE))
            if self.read_ahead.should_drain(time.monotonic()):
                for _ in range(limit - 1):
                    batch.append(recvfrom(RECV_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # ICMP errors surface as ECONNREFUSED & co on the next call: not ours to act on;
            # QUIC notices a dead peer by itself.
            pass
        self.read_ahead.last_count = len(batch)
        return batch

    def send(self, data: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            # Full buffer (EAGAIN), unreachable network, ...: the datagram is lost like on a
            # congested link, and QUIC's loss recovery handles it.
            self.send_drops += 1

    def send_batch(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send what one QUIC flush produced, in order: runs of equal-size datagrams to one
        address (a shorter one may end a run) go out in one GSO ``sendmsg``."""
        if not self.gso or len(datagrams) == 1:
            for data, addr in datagrams:
                self.send(data, addr)
            return
        count = len(datagrams)
        i = 0
        while i < count:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            total = size
            while j < count and j - i < GSO_MAX_SEGMENTS and total + size <= GSO_MAX_BYTES:
                following, following_addr = datagrams[j]
                if following_addr != addr or len(following) > size:
                    break
                total += len(following)
                j += 1
                if len(following) < size:
                    break
            if j - i == 1:
                self.send(data, addr)
            else:
                self._send_segmented([d for d, _ in datagrams[i:j]], size, addr)
            i = j

    def _send_segmented(self, run: list[bytes], size: int, addr: Any) -> None:
        try:
            self.sock.sendmsg(run, [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))], 0, addr)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                self.gso = False  # this kernel or device cannot segment: one by one from now
                for data in run:
                    self.send(data, addr)
            else:
                self.send_drops += len(run)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


def format_address(addr: Any) -> str:
    """``host:port`` or ``[v6]:port`` for a socket address; IPv4-mapped IPv6 shown as IPv4."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    return ":" in host or host == ""
