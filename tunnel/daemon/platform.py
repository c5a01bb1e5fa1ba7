"""The host resources a daemon asks for, behind one seam.

Daemons get UDP sockets, TUN devices, netlink changes, the network monitor and the resolver
configurator from a :class:`Platform`; tests hand them
:class:`tunnel.testing.fakes.FakePlatform` instead and run two in-memory peers on virtual time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunnel.daemon.connector import resolve_all
from tunnel.daemon.netlink import HostChanges
from tunnel.daemon.netmonitor import NetworkMonitor
from tunnel.daemon.statefile import StateFile
from tunnel.daemon.tun import TunDevice
from tunnel.daemon.udp import UdpEndpoint, resolve

if TYPE_CHECKING:
    from tunnel.daemon.client.dns import DnsConfigurator


class Platform:
    """The real thing: sockets, /dev/net/tun and netlink."""

    async def resolve(self, host: str, port: int, *, key: str) -> tuple[int, Any]:
        return await resolve(host, port, key=key)

    async def resolve_all(
        self, host: str, port: int, *, key: str, prefer: Any = None
    ) -> list[tuple[int, Any]]:
        return await resolve_all(host, port, key=key, prefer=prefer)

    async def open_udp(
        self,
        host: str,
        port: int,
        *,
        key: str,
        family: int | None = None,
        reply_from_target: bool = False,
        mark: int | None = None,
    ) -> UdpEndpoint:
        return await UdpEndpoint.bind(
            host, port, key=key, family=family, reply_from_target=reply_from_target, mark=mark
        )

    def open_tun(self, name: str) -> TunDevice:
        return TunDevice(name)

    def host_changes(self) -> HostChanges:
        return HostChanges()

    def network_monitor(self) -> NetworkMonitor:
        return NetworkMonitor.open()

    def dns_configurator(self, state: StateFile) -> DnsConfigurator:
        # Imported here: the client package imports this module.
        from tunnel.daemon.client.dns import DnsConfigurator

        return DnsConfigurator(state)

    def state_file(self, path: Path) -> StateFile:
        return StateFile(path)


SYSTEM = Platform()
