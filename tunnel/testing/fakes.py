"""In-memory stand-ins for UDP sockets, TUN devices and netlink, so whole daemons can be run
against each other inside one trio process on virtual time.

A :class:`FakeNetwork` delivers datagrams between :class:`FakeEndpoint` objects by address,
through an optional ``policy`` (drop, partition) the test controls.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tunnel.core.eyeballs import order_addresses
from tunnel.core.netchange import NetworkChange
from tunnel.core.underlay import Route
from tunnel.daemon.statefile import StateFile
from tunnel.errors import NameNotResolved

Address = tuple[str, int]


class _Inbox:
    """A queue a pump can wait on, the way it waits for a readable fd."""

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False

    def put(self, item: Any) -> None:
        self.items.append(item)
        self._lot.unpark_all()

    async def wait(self) -> None:
        while not self.items:
            if self.closed:
                raise trio.ClosedResourceError
            await self._lot.park()

    def take(self, limit: int) -> list[Any]:
        out: list[Any] = []
        while self.items and len(out) < limit:
            out.append(self.items.popleft())
        return out

    def close(self) -> None:
        self.closed = True
        self._lot.unpark_all()


class FakeNetwork:
    """Datagrams between fake endpoints. ``policy(data, src, dst)`` returning False drops."""

    def __init__(self) -> None:
        self.endpoints: dict[Address, FakeEndpoint] = {}
        self.policy: Callable[[bytes, Address, Address], bool] = lambda data, src, dst: True
        self._next_port = 40000
        self.delivered = 0
        self.dropped = 0

    def bind(self, host: str, port: int) -> FakeEndpoint:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        addr = (host, port)
        if addr in self.endpoints:
            raise OSError(98, "Address already in use")
        endpoint = FakeEndpoint(self, addr)
        self.endpoints[addr] = endpoint
        return endpoint

    def deliver(self, data: bytes, src: Address, dst: Address) -> None:
        target = self.endpoints.get((dst[0], dst[1]))
        if target is None or not self.policy(data, src, dst):
            self.dropped += 1
            return
        self.delivered += 1
        target.inbox.put((data, src))


class FakeEndpoint:
    """The :class:`tunnel.daemon.udp.UdpEndpoint` interface over a :class:`FakeNetwork`."""

    def __init__(self, network: FakeNetwork, local_address: Address) -> None:
        self.network = network
        self.local_address = local_address
        self.inbox = _Inbox()
        self.send_drops = 0
        self.gso = False  # one datagram at a time, always
        self.family = socket.AF_INET6 if ":" in local_address[0] else socket.AF_INET

    async def wait_readable(self) -> None:
        await self.inbox.wait()

    def receive_batch(self, limit: int) -> list[tuple[bytes, Address]]:
        return self.inbox.take(limit)

    def receive_batch_with_local(self, limit: int) -> list[tuple[bytes, Address, None]]:
        # One address per fake endpoint: nothing to choose between.
        return [(data, addr, None) for data, addr in self.inbox.take(limit)]

    def send(self, data: bytes, addr: Address, source: Any = None) -> None:
        if self.inbox.closed:
            return
        self.network.deliver(bytes(data), self.local_address, addr)

    def send_probe(self, data: bytes, addr: Address, source: Any = None) -> bool:
        self.send(data, addr)
        return True

    def send_batch(self, datagrams: list[tuple[bytes, Address]], source: Any = None) -> None:
        for data, addr in datagrams:
            self.send(data, addr)

    def close(self) -> None:
        self.inbox.close()
        self.network.endpoints.pop(self.local_address, None)


class FakeTun:
    """The :class:`tunnel.daemon.tun.TunDevice` interface. ``inject`` plays the kernel sending a
    packet into the tunnel; ``written`` collects what the daemon delivered to the kernel.

    ``answer``, if given, plays the kernel's own stack answering a written packet (an echo
    reply) inside the write: what it returns is queued for reading at once, but, unlike
    ``inject``, without waking a reader: a daemon only sees it if it reads after writing."""

    def __init__(self, name: str, answer: Callable[[bytes], bytes | None] | None = None) -> None:
        self.name = name.replace("%d", "0")
        self.answer = answer
        self.inbox = _Inbox()
        self.written: list[bytes] = []
        self.queued: list[bytes] = []
        self.merging = False  # the real device's: runs of segments are merged when flushed
        self.merged = 0
        self._written_lot = trio.lowlevel.ParkingLot()
        self.write_drops = 0
        self.writes = 0

    def inject(self, packet: bytes) -> None:
        self.inbox.put(packet)

    async def wait_readable(self) -> None:
        await self.inbox.wait()

    def read_batch(self, limit: int = 64) -> list[bytes]:
        return self.inbox.take(limit)

    def queue(self, packet: bytes) -> None:
        """Held until :meth:`flush`, like the real device's merging: a daemon that forgets to
        flush loses its packets here too."""
        self.queued.append(bytes(packet))

    def flush(self) -> None:
        queued, self.queued = self.queued, []
        for packet in queued:
            self.write(packet)

    def write(self, packet: bytes) -> None:
        self.writes += 1
        self.written.append(bytes(packet))
        self._written_lot.unpark_all()
        if self.answer is not None:
            reply = self.answer(bytes(packet))
            if reply is not None:
                self.inbox.items.append(reply)

    async def wait_written(self, count: int = 1) -> None:
        while len(self.written) < count:
            await self._written_lot.park()

    @property
    def closed(self) -> bool:
        return self.inbox.closed

    def close(self) -> None:
        self.inbox.close()


class FakeHostChanges:
    """Records what the daemon would have done to the host."""

    def __init__(self) -> None:
        self.applied: list[tuple[Any, ...]] = []
        self.moving: dict[str, Any] = {}
        self.underlay: tuple[str | None, int | None] = ("192.0.2.254", 2)  # gateway, oif
        self.closed = False
        # This host's interface addresses, as a test sets them (candidates for direct paths).
        self.addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        self.sysctls: dict[str, str] = {}

    def local_addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return list(self.addresses)

    def bring_up(self, ifname: str, mtu: int) -> int:
        self.applied.append(("up", ifname, mtu))
        return 1

    def add_address(self, ifname: str, address: Any, prefixlen: int) -> None:
        self.applied.append(("address", ifname, f"{address}/{prefixlen}"))

    def add_route(
        self,
        network: Any,
        *,
        ifname: str | None = None,
        via: str | None = None,
        oif: int | None = None,
        table: int | None = None,
        unreachable: bool = False,
    ) -> None:
        if table is None and not unreachable:
            self.applied.append(("route", str(network), ifname, via))
        else:
            kind = "unreachable" if unreachable else ifname
            self.applied.append(("table route", table, str(network), kind))

    def add_rule(self, family: int, **rule: Any) -> None:
        self.applied.append(("rule", family, tuple(sorted(rule.items()))))

    def delete_rule(self, family: int, **rule: Any) -> bool:
        return False

    def flush_table(self, family: int, table: int) -> int:
        return 0

    def read_sysctl(self, name: str) -> str:
        return self.sysctls.get(name, "0")

    def write_sysctl(self, name: str, value: str) -> None:
        self.sysctls[name] = value

    def set_sysctl(self, name: str, value: str) -> None:
        self.applied.append(("sysctl", name, value))
        self.sysctls[name] = value

    def underlay_route_to(self, address: Any, *, avoid_oif: Any, avoid: Any) -> Any:
        # The test moves the underlay by changing ``underlay``.
        return Route(ipaddress.ip_network(f"{address}/{address.max_prefixlen}"), *self.underlay)

    def set_route(self, key: str, route: Any) -> None:
        self.moving[key] = route
        self.applied.append(("set route", key, route))

    def undo(self) -> None:
        self.applied.clear()
        self.moving.clear()

    def close(self) -> None:
        self.closed = True


class FakePlatform:
    """A :class:`tunnel.daemon.platform.Platform` over one :class:`FakeNetwork`. ``host`` is the
    address this platform's sockets bind to when asked for a wildcard."""

    def __init__(self, network: FakeNetwork, host: str) -> None:
        self.network = network
        self.host = host
        self.tuns: list[FakeTun] = []
        self.changes: list[FakeHostChanges] = []
        self.monitor = FakeNetworkMonitor()
        self.names: dict[str, list[str]] = {}  # host name -> addresses, for resolve_all
        self.dns = FakeDns()
        self.state = MemoryStateFile()

    async def resolve(self, host: str, port: int, *, key: str) -> tuple[int, Any]:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        return family, (host, port)

    async def resolve_all(
        self, host: str, port: int, *, key: str, prefer: Any = None
    ) -> list[tuple[int, Any]]:
        """A literal gives itself; a name, the addresses the test put in ``names`` (IPv6 as
        2-tuples: the fake network knows no flow labels or scopes)."""
        listed = self.names.get(host, [host])
        infos = [
            (socket.AF_INET6 if ipaddress.ip_address(a).version == 6 else socket.AF_INET, (a, port))
            for a in listed
        ]
        if not infos:
            raise NameNotResolved(f"{key}: cannot resolve {host!r}: no such name")
        return order_addresses(infos, prefer=prefer)

    async def open_udp(
        self,
        host: str,
        port: int,
        *,
        key: str,
        family: int | None = None,
        reply_from_target: bool = False,
        mark: int | None = None,
    ) -> FakeEndpoint:
        if host in ("", "::", "0.0.0.0"):
            host = self.host
        return self.network.bind(host, port)

    def open_tun(self, name: str) -> FakeTun:
        tun = FakeTun(name)
        self.tuns.append(tun)
        return tun

    def host_changes(self) -> FakeHostChanges:
        changes = FakeHostChanges()
        self.changes.append(changes)
        return changes

    def network_monitor(self) -> FakeNetworkMonitor:
        return self.monitor

    def dns_configurator(self, state: Any) -> FakeDns:
        return self.dns

    def state_file(self, path: Path) -> MemoryStateFile:
        return self.state


class MemoryStateFile(StateFile):
    """A :class:`StateFile` that never touches the disk."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/memory-state.json"))
        self.data: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        return dict(self.data)

    def _write(self, data: dict[str, Any]) -> None:
        self.data = dict(data)

    def drop(self, key: str) -> None:
        self.data.pop(key, None)


class FakeDns:
    """Records the resolver settings a client applies (a :class:`DnsConfigurator` stand-in)."""

    backend = "fake"

    def __init__(self) -> None:
        self.applied: list[tuple[str, int, Any]] = []  # (ifname, ifindex, settings)
        self.current: Any = None
        self.restores = 0

    async def apply(self, ifname: str, ifindex: int, settings: Any) -> None:
        self.applied.append((ifname, ifindex, settings))
        self.current = settings

    def restore(self) -> None:
        if self.current is not None:
            self.restores += 1
        self.current = None


class FakeNetworkMonitor:
    """The host's network changes as the test announces them with :meth:`announce`."""

    def __init__(self) -> None:
        self._inbox = _Inbox()
        self.ignored: str | None = None

    def announce(self, *changes: NetworkChange) -> None:
        self._inbox.put(list(changes))

    def ignore_interface(self, ifname: str | None) -> None:
        self.ignored = ifname

    async def wait_change(self) -> list[NetworkChange]:
        await self._inbox.wait()
        return [change for batch in self._inbox.take(1 << 30) for change in batch]

    def close(self) -> None:
        self._inbox.close()
