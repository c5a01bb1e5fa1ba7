"""Host network changes as small events, and the pure decisions about them.

The kernel announces every change to links, addresses and routes on rtnetlink multicast
groups. This module is the sans-IO half of watching them
(:class:`tunnel.daemon.netmonitor.NetworkMonitor` owns the socket):

- :func:`decode_untrusted` turns one netlink datagram into :class:`NetworkChange` events.
  It never raises: a message it cannot read becomes a ``"lost"`` change, which means
  "anything may have changed", the same as the kernel telling us it dropped notifications.
- :class:`Coalescer` drops what the daemon did to its own TUN device and what merely restates
  the known state, and gathers the rest into one batch per settle window, in bounded memory.
- :func:`matters` and :func:`gains` decide what a batch means for the path to the server.

Netlink layouts are Linux's (``<linux/netlink.h>``, ``<linux/rtnetlink.h>``,
``<linux/if_addr.h>``) in host byte order; only the fields used here are read.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from typing import Literal

import attrs

#: How long after the first change of a burst the batch is handed out.
SETTLE_S = 0.2
#: Most distinct changes one batch holds; past that it collapses into one ``"lost"`` change.
BATCH_LIMIT = 256
#: Most links plus addresses remembered to recognise repeats; past that memory is dropped.
STATE_LIMIT = 4096

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

# <linux/netlink.h>, <linux/rtnetlink.h>
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
_AF_INET, _AF_INET6, _AF_BRIDGE = 2, 10, 7
_IFF_UP, _IFF_RUNNING = 0x1, 0x40
_IFA_F_OPTIMISTIC, _IFA_F_TENTATIVE = 0x04, 0x40
_RTM_F_CLONED = 0x200
_IFLA_IFNAME = 3
_IFA_ADDRESS, _IFA_LOCAL, _IFA_LABEL, _IFA_FLAGS = 1, 2, 3, 8
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_TABLE = 1, 4, 5, 15

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, device type, index, flags, change mask
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")

Kind = Literal["link", "address", "route", "lost"]


@attrs.frozen
class NetworkChange:
    """One change the kernel announced.

    ``kind`` is ``"link"``, ``"address"``, ``"route"``, or ``"lost"`` (notifications were
    dropped or unreadable: anything may have changed). ``up`` is, for a link, whether it is
    usable (administratively up and running; ``False`` when removed); for an address or a
    route, ``True`` when added or changed and ``False`` when removed. ``ifindex`` is the link,
    the address's link or the route's output link (``None`` for a multipath route).
    ``ifname`` is the link's name (for an address, the IPv4 label). ``detail`` is the address
    as ``"10.0.0.2/24"``, the route's destination as ``"0.0.0.0/0"``, or ``"removed"`` for a
    link that went away. ``gateway`` and ``table`` are the route's.
    """

    kind: Kind
    up: bool | None = None
    ifindex: int | None = None
    ifname: str | None = None
    detail: str | None = None
    gateway: str | None = None
    table: int | None = None


LOST = NetworkChange("lost")


class _Malformed(Exception):
    """A datagram that does not parse; never leaves this module."""


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of each netlink message in ``data``."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise _Malformed("truncated header")
        length, msg_type, flags, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise _Malformed("bad message length")
        yield msg_type, flags, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3  # messages are 4-byte aligned


def _attrs(payload: bytes, start: int) -> dict[int, bytes]:
    """Attribute type -> value for the rtattrs after a fixed header (the last one wins)."""
    out: dict[int, bytes] = {}
    offset = start
    while len(payload) - offset >= _RTATTR.size:
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size or offset + length > len(payload):
            raise _Malformed("bad attribute length")
        out[kind & 0x3FFF] = payload[offset + _RTATTR.size : offset + length]  # drop NLA_F_ flags
        offset += (length + 3) & ~3
    return out


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _ip(family: int, value: bytes) -> str:
    if family == _AF_INET and len(value) == 4:
        return str(ipaddress.IPv4Address(value))
    if family == _AF_INET6 and len(value) == 16:
        return str(ipaddress.IPv6Address(value))
    raise _Malformed("bad address length")


def _u32(value: bytes) -> int:
    if len(value) != 4:
        raise _Malformed("bad u32 attribute")
    return int(_U32.unpack(value)[0])


def _link(msg_type: int, payload: bytes) -> NetworkChange | None:
    if len(payload) < _IFINFOMSG.size:
        raise _Malformed("short ifinfomsg")
    family, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
    if family == _AF_BRIDGE:
        # a bridge port's state, sent besides the device's own message; DELLINK here means
        # "left the bridge", not "went away"
        return None
    found = _attrs(payload, _IFINFOMSG.size)
    name = _text(found[_IFLA_IFNAME]) if _IFLA_IFNAME in found else None
    if msg_type == RTM_DELLINK:
        return NetworkChange("link", False, index, name, "removed")
    usable = bool(flags & _IFF_UP) and bool(flags & _IFF_RUNNING)
    return NetworkChange("link", usable, index, name)


def _address(msg_type: int, payload: bytes) -> NetworkChange | None:
    if len(payload) < _IFADDRMSG.size:
        raise _Malformed("short ifaddrmsg")
    family, prefixlen, flags, _, index = _IFADDRMSG.unpack_from(payload)
    if family not in (_AF_INET, _AF_INET6):
        return None
    found = _attrs(payload, _IFADDRMSG.size)
    if _IFA_FLAGS in found:
        flags = _u32(found[_IFA_FLAGS])
    # IFA_LOCAL is our end on a point-to-point link; IFA_ADDRESS is then the peer's
    raw = found.get(_IFA_LOCAL, found.get(_IFA_ADDRESS))
    if raw is None:
        raise _Malformed("address without IFA_ADDRESS")
    detail = f"{_ip(family, raw)}/{prefixlen}"
    label = _text(found[_IFA_LABEL]) if _IFA_LABEL in found else None
    if msg_type == RTM_NEWADDR and flags & _IFA_F_TENTATIVE and not flags & _IFA_F_OPTIMISTIC:
        # still in duplicate address detection, so not usable yet: its news is the message
        # that clears the flag
        return None
    return NetworkChange("address", msg_type == RTM_NEWADDR, index, label, detail)


def _route(msg_type: int, payload: bytes) -> NetworkChange | None:
    if len(payload) < _RTMSG.size:
        raise _Malformed("short rtmsg")
    family, dst_len, _, _, table, _, _, _, flags = _RTMSG.unpack_from(payload)
    if family not in (_AF_INET, _AF_INET6) or flags & _RTM_F_CLONED:
        return None  # cached clones (PMTU exceptions) are not routes anyone configured
    found = _attrs(payload, _RTMSG.size)
    if _RTA_TABLE in found:
        table = _u32(found[_RTA_TABLE])  # tables past 255 only fit here
    if _RTA_DST in found:
        dst = _ip(family, found[_RTA_DST])
    else:
        dst = "0.0.0.0" if family == _AF_INET else "::"
    gateway = _ip(family, found[_RTA_GATEWAY]) if _RTA_GATEWAY in found else None
    oif = _u32(found[_RTA_OIF]) if _RTA_OIF in found else None
    return NetworkChange(
        "route", msg_type == RTM_NEWROUTE, oif, None, f"{dst}/{dst_len}", gateway, table
    )


_DECODERS = {
    RTM_NEWLINK: _link,
    RTM_DELLINK: _link,
    RTM_NEWADDR: _address,
    RTM_DELADDR: _address,
    RTM_NEWROUTE: _route,
    RTM_DELROUTE: _route,
}


def decode_untrusted(data: bytes) -> list[NetworkChange]:
    """The changes announced in one rtnetlink datagram, in order. Never raises: from the
    first message that does not parse on, the rest is reported as one :data:`LOST`."""
    out: list[NetworkChange] = []
    try:
        for msg_type, _, payload in _messages(data):
            if msg_type == NLMSG_OVERRUN:
                out.append(LOST)
                continue
            decode = _DECODERS.get(msg_type)
            if decode is None:
                continue  # NOOP, DONE, ERROR, and types we did not subscribe to
            change = decode(msg_type, payload)
            if change is not None:
                out.append(change)
    except _Malformed:
        out.append(LOST)
    return out


def dump_request(msg_type: int, seq: int) -> bytes:
    """A request to dump every link (``RTM_GETLINK``) or address (``RTM_GETADDR``)."""
    body = struct.pack("=Bxxx", 0)  # rtgenmsg: AF_UNSPEC, padded
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body  # fmt: skip


def ends_dump(data: bytes) -> bool:
    """Whether ``data`` holds the end of a dump (``NLMSG_DONE``, or an error in its place).
    Unreadable data counts as the end, so a reader never waits for more of a broken reply."""
    try:
        return any(t in (NLMSG_DONE, NLMSG_ERROR) for t, _, _ in _messages(data))
    except _Malformed:
        return True


@attrs.frozen
class CoalescerStatistics:
    """What a :class:`Coalescer` dropped: changes to the ignored device, repeats of the known
    state, and batches that overflowed into one ``"lost"``."""

    ignored: int
    repeats: int
    overflows: int


class Coalescer:
    """Gathers changes into batches: at most one per ``settle`` seconds, ready ``settle``
    seconds after the first change of a burst (a fixed window, so a steady stream of changes
    cannot postpone the batch forever).

    Dropped on the way in: changes on the ignored interface (the daemon's own TUN, whose
    addresses and routes the daemon itself adds), a link state that repeats the last one seen,
    and an address already known (IPv6 refreshes its addresses' lifetimes on every router
    advertisement). Memory is bounded: a batch holds at most ``limit`` distinct changes,
    beyond which it becomes ``[LOST]``; the known state is forgotten past :data:`STATE_LIMIT`
    entries (the next changes then all count as news, which is the safe side).

    Time enters as ``now``; nothing here reads a clock.
    """

    def __init__(
        self,
        settle: float = SETTLE_S,
        *,
        ignore_ifname: str | None = None,
        limit: int = BATCH_LIMIT,
    ) -> None:
        if settle < 0 or limit < 1:
            raise ValueError("settle must be >= 0 and limit >= 1")
        self.settle = settle
        self.limit = limit
        self.ignore_ifname = ignore_ifname
        self.ignore_ifindex: int | None = None
        self._pending: dict[NetworkChange, None] = {}  # an ordered set
        self._deadline: float | None = None
        self._links: dict[int, bool] = {}
        self._addresses: set[tuple[int | None, str | None]] = set()
        self._ignored = self._repeats = self._overflows = 0

    def ignore_interface(self, ifname: str | None, ifindex: int | None = None) -> None:
        """Drop changes on ``ifname`` from now on (``None``: drop none). ``ifindex``, if known,
        covers the messages that carry only the index; otherwise it is learnt from the link's
        next announcement."""
        self.ignore_ifname = ifname
        self.ignore_ifindex = ifindex if ifname is not None else None

    @property
    def deadline(self) -> float | None:
        """When the pending batch is due, or ``None`` when nothing is pending."""
        return self._deadline

    def ready(self, now: float) -> bool:
        """Whether a batch is pending and due at ``now``."""
        return self._deadline is not None and now >= self._deadline

    def seed(self, changes: Iterable[NetworkChange]) -> None:
        """Learn the current state (a dump of links and addresses) without reporting it."""
        for change in changes:
            if not self._is_ignored(change):
                self._is_news(change)

    def feed(self, changes: Iterable[NetworkChange], now: float) -> None:
        """Take in changes that arrived at ``now``."""
        for change in changes:
            if self._is_ignored(change):
                self._ignored += 1
            elif not self._is_news(change):
                self._repeats += 1
            else:
                self._add(change, now)

    def take(self) -> list[NetworkChange]:
        """The pending batch in arrival order (empty if none); the next burst starts afresh."""
        batch = list(self._pending)
        self._pending.clear()
        self._deadline = None
        return batch

    def statistics(self) -> CoalescerStatistics:
        """Counts of what was dropped so far."""
        return CoalescerStatistics(self._ignored, self._repeats, self._overflows)

    def _add(self, change: NetworkChange, now: float) -> None:
        if self._deadline is None:
            self._deadline = now + self.settle
        if LOST in self._pending:
            return  # it already says everything
        if change.kind == "lost":
            self._pending = {LOST: None}
        elif change not in self._pending and len(self._pending) >= self.limit:
            self._overflows += 1
            self._pending = {LOST: None}
        else:
            self._pending[change] = None

    def _is_ignored(self, change: NetworkChange) -> bool:
        name = self.ignore_ifname
        if name is None:
            return False
        if change.kind == "link":
            if change.ifname == name:
                # learn the index its addresses and routes are reported with; keep it after
                # removal, for the deletions that may trail the link's own
                self.ignore_ifindex = change.ifindex
                return True
            if change.ifname is not None and change.ifindex == self.ignore_ifindex:
                self.ignore_ifindex = None  # the index now belongs to another link
                return False
        if change.kind == "address" and change.ifname == name:
            return True
        return change.ifindex is not None and change.ifindex == self.ignore_ifindex

    def _is_news(self, change: NetworkChange) -> bool:
        if change.kind == "lost":
            # what we knew may be stale now
            self._links.clear()
            self._addresses.clear()
            return True
        if len(self._links) + len(self._addresses) > STATE_LIMIT:
            self._links.clear()
            self._addresses.clear()
        if change.kind == "link" and change.ifindex is not None:
            if change.detail == "removed":
                self._links.pop(change.ifindex, None)
                self._addresses = {a for a in self._addresses if a[0] != change.ifindex}
                return True
            if self._links.get(change.ifindex) == change.up:
                return False
            self._links[change.ifindex] = bool(change.up)
            return True
        if change.kind == "address":
            key = (change.ifindex, change.detail)
            if not change.up:
                self._addresses.discard(key)
                return True
            if key in self._addresses:
                return False
            self._addresses.add(key)
            return True
        return True  # routes: no state kept, a full routing table would not be small


def _own(change: NetworkChange, ignore_ifindex: int | None) -> bool:
    return ignore_ifindex is not None and change.ifindex == ignore_ifindex


def matters(
    changes: Iterable[NetworkChange],
    *,
    ignore_ifindex: int | None = None,
    tables: frozenset[int] = frozenset({RT_TABLE_MAIN}),
) -> bool:
    """Whether the path to the server may have changed: lost notifications, any link or
    address change, or a route change in one of ``tables``; changes on ``ignore_ifindex``
    (the TUN device) excepted. Then the host route to the server needs a fresh look and the
    session a probe."""
    for change in changes:
        if change.kind == "lost":
            return True
        if _own(change, ignore_ifindex):
            continue
        if change.kind in ("link", "address"):
            return True
        if change.kind == "route" and change.table in tables:
            return True
    return False


def gains(
    changes: Iterable[NetworkChange],
    *,
    ignore_ifindex: int | None = None,
    tables: frozenset[int] = frozenset({RT_TABLE_MAIN}),
) -> bool:
    """Whether something appeared that could let a failed connection attempt succeed now: a
    link came up, an address or a route in ``tables`` was added, or notifications were lost.
    A reconnect waiting out its backoff should try at once; a loss alone cannot help it."""
    for change in changes:
        if change.kind == "lost":
            return True
        if _own(change, ignore_ifindex) or not change.up:
            continue
        if change.kind in ("link", "address"):
            return True
        if change.kind == "route" and change.table in tables:
            return True
    return False
