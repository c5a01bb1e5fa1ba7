"""A non-blocking UDP socket driven by trio's readiness notifications.

The pumps drain the socket until it would block and send without awaiting: UDP has no
backpressure worth waiting for, and QUIC recovers what a full send buffer drops.

A server bound to a wildcard address on a host with several addresses must answer each client
from the address that client sent to: the kernel would pick a source by routing, and a QUIC
client drops datagrams from an address it did not send to. With ``reply_from_target`` the
endpoint reads each datagram's destination from its IP_PKTINFO / IPV6_PKTINFO control message
(:meth:`UdpEndpoint.receive_batch_with_local`) and puts it back on the answers as their source
(``source=`` of :meth:`UdpEndpoint.send` and :meth:`UdpEndpoint.send_batch`). On a dual-stack
socket Linux reports IPv4 datagrams with IPV6_PKTINFO holding a v4-mapped address, and accepts
that as a source too, so one option and one message type serve both families there.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from tunnel.core.readahead import ReadAhead
from tunnel.errors import NameNotResolved, SystemSetupError

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 65535
# UDP segmentation offload (Linux): Python's socket module lacks the names.
SOL_UDP = 17
UDP_SEGMENT = 103
# ... and its receiving half: the kernel hands over a run of equal-size datagrams from one
# sender in one buffer, with the size in a control message (an int).
UDP_GRO = 104
GRO_SPACE = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
# What a kernel or device that cannot segment answers a GSO send with.
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
# Packet info (Linux), also missing from Python's socket module.
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
IN_PKTINFO_SIZE = 12  # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
IN6_PKTINFO_SIZE = 20  # struct in6_pktinfo { in6_addr addr; int ifindex; }
# Path MTU discovery modes (Linux <linux/in.h>, <linux/in6.h>).
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3
# Room for the control messages a receive asks for.
PKTINFO_SPACE = socket.CMSG_SPACE(IN6_PKTINFO_SIZE) + GRO_SPACE
# Distinct local addresses an endpoint keeps decoded: a host has a handful (per interface).
LOCAL_CACHE_SIZE = 64
_NO_IFINDEX = bytes(4)


async def resolve(host: str, port: int, *, key: str) -> tuple[int, Any]:
    """(family, sockaddr) for host:port; the error names the config ``key``."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise NameNotResolved(f"{key}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


@attrs.frozen(cache_hash=True)
class LocalAddress:
    """An address of this host that a datagram was sent to, as
    :meth:`UdpEndpoint.receive_batch_with_local` reports it; pass it back as ``source`` to send
    from that address. Hashable and small: keep one per connection.

    ``host`` is written the way the socket writes peer addresses: ``"198.18.0.99"``,
    ``"::ffff:198.18.0.99"`` on a dual-stack socket, ``"fd00::99"``. ``cmsgs`` is the control
    message a send carries, encoded once.
    """

    host: str
    cmsgs: tuple[tuple[int, int, bytes], ...] = attrs.field(repr=False)


def _decode_pktinfo(level: int, raw: bytes) -> LocalAddress | None:
    """The source to answer from, for the packet info of a received datagram (or ``None``
    if it is not one)."""
    if level == socket.IPPROTO_IP and len(raw) == IN_PKTINFO_SIZE:
        # spec_dst, not addr: the address to answer from (they differ for a broadcast only).
        # ifindex 0: routed as usual, only the source is fixed.
        spec_dst = raw[4:8]
        data = _NO_IFINDEX + spec_dst + bytes(4)
        return LocalAddress(socket.inet_ntop(socket.AF_INET, spec_dst),
                            ((socket.IPPROTO_IP, IP_PKTINFO, data),))  # fmt: skip
    if level == socket.IPPROTO_IPV6 and len(raw) == IN6_PKTINFO_SIZE:
        addr = raw[:16]
        # A link-local source is only valid with its interface; any other goes out as routed.
        link_local = addr[0] == 0xFE and addr[1] & 0xC0 == 0x80
        data = addr + (raw[16:] if link_local else _NO_IFINDEX)
        return LocalAddress(socket.inet_ntop(socket.AF_INET6, addr),
                            ((socket.IPPROTO_IPV6, IPV6_PKTINFO, data),))  # fmt: skip
    return None


class UdpEndpoint:
    """One bound UDP socket. Use :meth:`bind` to create.

    ``reply_from_target``: the socket has packet info switched on (:meth:`bind` does it), so
    :meth:`receive_batch_with_local` can say which local address each datagram was sent to.
    """

    def __init__(self, sock: socket.socket, *, reply_from_target: bool = False) -> None:
        self.sock = sock
        self.local_address = sock.getsockname()
        self.send_drops = 0
        self.read_ahead = ReadAhead()
        # GSO: a run of equal-size datagrams to one address in one sendmsg. Off for good if
        # the kernel or device refuses it.
        self.gso = True
        # GRO: runs of datagrams from one sender received in one buffer, where the kernel can.
        self.gro = _enable_gro(sock)
        self.reply_from_target = reply_from_target
        # raw packet info -> its decoded LocalAddress, so a receive decodes nothing
        self._locals: dict[bytes, LocalAddress] = {}

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        *,
        key: str,
        family: int | None = None,
        reply_from_target: bool = False,
        mark: int | None = None,
    ) -> UdpEndpoint:
        """Bind ``host:port`` (a wildcard, a literal or a name); errors name the config ``key``.

        ``reply_from_target`` (for a server): learn the local address each datagram was sent
        to, so that answers can leave from it. Only a wildcard bind needs it: a socket bound
        to one address sends from that one anyway, so elsewhere it is ignored.

        ``mark`` (SO_MARK, needs CAP_NET_ADMIN): the client's sockets carry it, so that policy
        routing sends them outside the tunnel and the kill switch lets them through.
        """
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
            _never_fragment(sock, family)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            reply_from_target = reply_from_target and host in ("", "::", "0.0.0.0")
            if reply_from_target:
                if family == socket.AF_INET6:
                    # covers the v4-mapped traffic too; IP_PKTINFO on top would only add a
                    # second message per IPv4 datagram
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise SystemSetupError(f"{key}: [{host}]:{port} is already in use") from exc
            raise SystemSetupError(f"{key}: cannot bind [{host}]:{port}: {exc.strerror}") from exc
        return cls(sock, reply_from_target=reply_from_target)

    @property
    def family(self) -> int:
        return self.sock.family

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def receive_batch(self, limit: int) -> list[tuple[bytes, Any]]:
        """Up to ``limit`` datagrams that are already waiting (a few more when the last
        receive held a run of them); never blocks. After a quiet spell only the first
        receive: see :mod:`tunnel.core.readahead`."""
        if self.gro:
            return self._receive_runs(limit)
        batch: list[tuple[bytes, Any]] = []
        recvfrom = self.sock.recvfrom

        def take() -> None:
            batch.append(recvfrom(RECV_SIZE))

        self._drain(limit, batch, take)
        return batch

    def _receive_runs(self, limit: int) -> list[tuple[bytes, Any]]:
        batch: list[tuple[bytes, Any]] = []
        recvmsg = self.sock.recvmsg

        def take() -> None:
            data, ancdata, _, addr = recvmsg(RECV_SIZE, GRO_SPACE)
            if ancdata:
                batch.extend((piece, addr) for piece in split_run(data, ancdata))
            else:
                batch.append((data, addr))

        self._drain(limit, batch, take)
        return batch

    def _drain(self, limit: int, batch: list[Any], take: Callable[[], None]) -> None:
        """``take()`` one receive into ``batch``, then, if a burst is on (see
        :mod:`tunnel.core.readahead`), more until ``limit`` or until the socket is empty."""
        try:
            take()
            if self.read_ahead.should_drain(time.monotonic()):
                while len(batch) < limit:
                    take()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # ICMP errors surface as ECONNREFUSED & co on the next call: not ours to act on;
            # QUIC notices a dead peer by itself.
            pass
        self.read_ahead.last_count = len(batch)

    def receive_batch_with_local(self, limit: int) -> list[tuple[bytes, Any, LocalAddress | None]]:
        """:meth:`receive_batch`, each datagram with the local address it was sent to: the
        ``source`` to answer it from. ``None`` where the endpoint does not know (not bound
        with ``reply_from_target``, or bound to one address): send without a source then."""
        if not self.reply_from_target:
            return [(data, addr, None) for data, addr in self.receive_batch(limit)]
        batch: list[tuple[bytes, Any, LocalAddress | None]] = []
        recvmsg = self.sock.recvmsg
        known = self._locals
        learn = self._learn

        def take() -> None:
            # The kernel puts packet info last (after a run's size): look it up directly,
            # decode only on a miss.
            data, ancdata, _, addr = recvmsg(RECV_SIZE, PKTINFO_SPACE)
            local = (known.get(ancdata[-1][2]) if ancdata else None) or learn(ancdata)
            if ancdata and ancdata[0][0] == SOL_UDP:  # a run's size comes first
                batch.extend((piece, addr, local) for piece in split_run(data, ancdata))
            else:
                batch.append((data, addr, local))

        self._drain(limit, batch, take)
        return batch

    def _learn(self, ancdata: list[tuple[int, int, bytes]]) -> LocalAddress | None:
        for level, kind, raw in ancdata:
            if kind in (IP_PKTINFO, IPV6_PKTINFO):
                local = self._locals.get(raw)
                if local is None:
                    local = _decode_pktinfo(level, raw)
                    if local is None:
                        continue
                    if len(self._locals) >= LOCAL_CACHE_SIZE:
                        self._locals.clear()  # cannot happen with a sane host: stay bounded
                    self._locals[raw] = local
                return local
        return None

    def local_for(self, host: str) -> LocalAddress:
        """The ``source`` that sends from ``host``, an address of this host (``"fe80::1%eth0"``
        for a link-local one), written as this socket's received ones are."""
        address, _, scope = host.partition("%")
        ip = ipaddress.ip_address(address)
        ifindex = _NO_IFINDEX
        if scope:
            index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
            ifindex = index.to_bytes(4, sys.byteorder)
        if ip.version == 4 and self.family == socket.AF_INET:
            local = _decode_pktinfo(socket.IPPROTO_IP, ifindex + ip.packed + ip.packed)
        else:
            if ip.version == 4:
                ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
            local = _decode_pktinfo(socket.IPPROTO_IPV6, ip.packed + ifindex)
        assert local is not None
        return local

    def send(self, data: bytes, addr: Any, source: LocalAddress | None = None) -> None:
        """Send one datagram to ``addr``, from ``source`` if given (else as routed)."""
        try:
            if source is None:
                self.sock.sendto(data, addr)
            else:
                self.sock.sendmsg((data,), source.cmsgs, 0, addr)
        except OSError:
            # Full buffer (EAGAIN), unreachable network, ...: the datagram is lost like on a
            # congested link, and QUIC's loss recovery handles it.
            self.send_drops += 1

    def send_probe(self, data: bytes, addr: Any, source: LocalAddress | None = None) -> bool:
        """Send one path MTU probe; False if the kernel refused it as larger than the link it
        would leave by (EMSGSIZE), which tells the search at once. Any other failure counts
        as a drop, like :meth:`send`'s, and the probe's timer notices."""
        try:
            if source is None:
                self.sock.sendto(data, addr)
            else:
                self.sock.sendmsg((data,), source.cmsgs, 0, addr)
        except OSError as exc:
            self.send_drops += 1
            return exc.errno != errno.EMSGSIZE
        return True

    def send_batch(
        self, datagrams: Sequence[tuple[bytes, Any]], source: LocalAddress | None = None
    ) -> None:
        """Send what one QUIC flush produced, in order: runs of equal-size datagrams to one
        address (a shorter one may end a run) go out in one GSO ``sendmsg``. All of them
        leave from ``source`` if given (else as routed)."""
        if not self.gso or len(datagrams) == 1:
            for data, addr in datagrams:
                self.send(data, addr, source)
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
                self.send(data, addr, source)
            else:
                self._send_segmented([d for d, _ in datagrams[i:j]], size, addr, source)
            i = j

    def _send_segmented(
        self, run: list[bytes], size: int, addr: Any, source: LocalAddress | None
    ) -> None:
        cmsgs = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))]
        if source is not None:
            cmsgs.extend(source.cmsgs)
        try:
            self.sock.sendmsg(run, cmsgs, 0, addr)
        except OSError as exc:
            if exc.errno not in _GSO_REFUSED:
                self.send_drops += len(run)
                return
            if source is not None:
                # EINVAL is also the answer to a source the host no longer has: one datagram
                # alone tells which of the two the kernel refused.
                try:
                    self.sock.sendmsg(run[:1], source.cmsgs, 0, addr)
                except OSError:
                    self.send_drops += len(run)
                    return
                run = run[1:]
            self.gso = False  # this kernel or device cannot segment: one by one from now
            for data in run:
                self.send(data, addr, source)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


def _never_fragment(sock: socket.socket, family: int) -> None:
    """Don't-fragment on every datagram, without the kernel's path MTU cache: QUIC finds the
    path's size itself (tunnel.daemon.pathmtu) and must never be fragmented (RFC 9000 14).
    "Probe" mode: a datagram too large for the outgoing link fails with EMSGSIZE; one too
    large for a later link is dropped there, which is what a probe must learn. An ICMP "packet
    too big", which anyone can forge, changes nothing."""
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)


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


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False  # an older kernel, or not a UDP socket of a family that has it
    return True


def split_run(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams in one received buffer: a run the kernel merged (its size in a
    ``UDP_GRO`` control message; the last may be shorter) or just the one datagram."""
    for level, kind, raw in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(raw) >= 4:
            size = int.from_bytes(raw[:4], sys.byteorder)
            if 0 < size < len(data):
                return [data[i : i + size] for i in range(0, len(data), size)]
            break
    return [data]
