"""Watching the host's network: rtnetlink notifications in, one batch per burst out.

:class:`NetworkMonitor` subscribes to the kernel's announcements of links, IPv4/IPv6
addresses and IPv4/IPv6 routes, and hands them out through :meth:`NetworkMonitor.wait_change`
as one list per settle window, minus what the daemon did to its own TUN device. Decoding,
filtering and batching are pure (:mod:`tunnel.core.netchange`); this module only owns the
socket.

Why ``await monitor.wait_change()`` and not ``async for batch in monitor.changes()``: an async
generator that yields inside trio's cancel scopes misbehaves and needs ``aclosing`` to be
cleaned up, while a plain coroutine can be cancelled anywhere, runs nothing between calls and
lets the caller wrap it in ``move_on_after``. Cancellation loses nothing: whatever was read
stays pending and the next call returns it. Between calls nobody reads; announcements wait
in the socket's receive buffer, which the kernel bounds, and if it overflows the kernel
says ENOBUFS and the next batch is ``[LOST]`` ("anything may have changed").

Why a plain socket and not pyroute2's ``IPRoute().bind(groups=...)``: in pyroute2 0.9
``IPRoute`` runs a private asyncio loop inside every call and ``AsyncIPRoute`` needs a running
asyncio loop; neither can wait for readability inside trio. Opening and binding the socket
takes three calls, and the pure decoder is tested against pyroute2's own encoder.

The client (:mod:`tunnel.daemon.client`) asks, on a batch that
:func:`~tunnel.core.netchange.matters`, :meth:`tunnel.daemon.netlink.HostChanges.underlay_route_to`
for the way to the server again and moves its host route if the gateway or output link changed.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from types import TracebackType

import attrs
import trio

from tunnel.core.netchange import (
    BATCH_LIMIT,
    LOST,
    RTM_GETADDR,
    RTM_GETLINK,
    SETTLE_S,
    Coalescer,
    NetworkChange,
    decode_untrusted,
    dump_request,
    ends_dump,
)
from tunnel.errors import SystemSetupError

log = logging.getLogger("tunnel.netmonitor")

# <linux/rtnetlink.h> RTMGRP_*: links, IPv4 addresses, IPv4 routes, IPv6 addresses, IPv6 routes
GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
# room for a burst (the kernel caps it at net.core.rmem_max; an overflow is reported as LOST)
_RCVBUF = 1 << 20
# larger than any one netlink datagram the kernel sends (a longer one would decode as LOST)
_READ_SIZE = 1 << 16
# datagrams read per wake-up, so a flood cannot keep this task from yielding
_READS_PER_WAKE = 64
# bound on the start-up dump, which the kernel answers at once
_DUMP_TIMEOUT_S = 2.0


@attrs.frozen
class MonitorStatistics:
    """Counters of a :class:`NetworkMonitor`: datagrams read, changes decoded from them,
    times notifications were lost (ENOBUFS or unreadable), changes dropped as the ignored
    interface's or as repeats, batches that overflowed, and batches handed out."""

    datagrams: int
    changes: int
    lost: int
    ignored: int
    repeats: int
    overflows: int
    batches: int


class NetworkMonitor:
    """Announcements of link, address and route changes, batched; see the module docstring.

    Build one with :meth:`open`; the constructor takes over an already bound socket (tests
    give it one end of a socketpair). Usable as a context manager, which closes it.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        ignore_ifname: str | None = None,
        settle: float = SETTLE_S,
        limit: int = BATCH_LIMIT,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._coalescer = Coalescer(settle, limit=limit)
        self._datagrams = self._changes = self._lost = self._batches = 0
        self.ignore_interface(ignore_ifname)

    @classmethod
    def open(cls, ignore_ifname: str | None = None, *, settle: float = SETTLE_S) -> NetworkMonitor:
        """Subscribe to the current network namespace's link, address and route changes,
        dropping those on ``ignore_ifname`` (the daemon's TUN device, which need not exist
        yet). Raises :class:`~tunnel.errors.SystemSetupError` if netlink refuses."""
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
        except OSError as exc:
            raise SystemSetupError(f"cannot open a netlink socket: {exc.strerror}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, GROUPS))
        except OSError as exc:
            sock.close()
            raise SystemSetupError(f"cannot subscribe to netlink: {exc.strerror}") from exc
        monitor = cls(sock, ignore_ifname=ignore_ifname, settle=settle)
        # after bind, so a change made meanwhile is at worst reported, never missed
        monitor._coalescer.seed(_dump_links_and_addresses())
        return monitor

    def ignore_interface(self, ifname: str | None) -> None:
        """Drop changes on ``ifname`` from now on (``None``: drop none). Give the device's
        real name (``TunDevice.name``), not a ``%d`` pattern."""
        index = None
        if ifname is not None:
            try:
                index = socket.if_nametoindex(ifname)
            except OSError:
                index = None  # not there yet: learnt from the link's first announcement
        self._coalescer.ignore_interface(ifname, index)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sock.fileno() < 0

    async def wait_change(self) -> list[NetworkChange]:
        """Wait for changes and return them as one batch, ``settle`` seconds after the first
        of the burst. Never returns an empty list.

        Raises :class:`trio.ClosedResourceError` once :meth:`close` was called (a task waiting
        here is woken with it), :class:`trio.BrokenResourceError` if the socket fails."""
        while True:
            self._read_available()
            if self._coalescer.ready(trio.current_time()):
                await trio.lowlevel.checkpoint()  # if cancelled here, the batch stays pending
                self._batches += 1
                return self._coalescer.take()
            deadline = self._coalescer.deadline
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await trio.lowlevel.wait_readable(self._sock)

    def statistics(self) -> MonitorStatistics:
        """A snapshot of the counters."""
        dropped = self._coalescer.statistics()
        return MonitorStatistics(
            datagrams=self._datagrams,
            changes=self._changes,
            lost=self._lost,
            ignored=dropped.ignored,
            repeats=dropped.repeats,
            overflows=dropped.overflows,
            batches=self._batches,
        )

    def close(self) -> None:
        """Close the socket (idempotent); a task in :meth:`wait_change` gets
        :class:`trio.ClosedResourceError`."""
        if self._sock.fileno() < 0:
            return
        try:
            trio.lowlevel.notify_closing(self._sock)
        except RuntimeError:
            pass  # outside trio.run nobody can be waiting on it
        self._sock.close()

    def __enter__(self) -> NetworkMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read_available(self) -> None:
        if self._sock.fileno() < 0:
            raise trio.ClosedResourceError("the network monitor is closed")
        now = trio.current_time()
        for _ in range(_READS_PER_WAKE):
            try:
                data = self._sock.recv(_READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise trio.BrokenResourceError(f"netlink: {exc.strerror}") from exc
                # the kernel dropped announcements for want of room; the socket still works
                self._lost += 1
                self._coalescer.feed([LOST], now)
                continue
            self._datagrams += 1
            changes = decode_untrusted(data)
            self._changes += len(changes)
            self._lost += changes.count(LOST)
            self._coalescer.feed(changes, now)


def _dump_links_and_addresses() -> list[NetworkChange]:
    """Every link and address there is now, so that their next restatement is not news."""
    changes: list[NetworkChange] = []
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        ) as sock:
            sock.settimeout(_DUMP_TIMEOUT_S)
            for seq, msg_type in enumerate((RTM_GETLINK, RTM_GETADDR), start=1):
                sock.send(dump_request(msg_type, seq))
                while True:
                    data = sock.recv(_READ_SIZE)
                    changes.extend(decode_untrusted(data))
                    if ends_dump(data):
                        break
    except OSError as exc:
        # Without it, the first restatement of each link or address wakes the client once
        # more than needed; no change is missed.
        log.debug("netlink dump failed, starting without the current state: %s", exc)
        return []
    return changes
