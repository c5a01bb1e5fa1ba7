"""Everything the client changes on the host, and its undo.

:class:`HostNetwork` owns the TUN device (opened with the first accepted session and kept
across reconnects, so applications see a pause, not a vanished interface), its addresses, the
tunnel's routes, the policy routing of a full tunnel (:mod:`.policyroute`), the host routes
that keep each server address reachable outside narrower routes that cover it, and the
resolvers the server pushed (:mod:`.dns`). Every change goes through the platform's host
changes recorder or the DNS configurator, which :meth:`HostNetwork.close` undoes; what would
outlive a killed client is written to its state file first (:func:`recover` undoes it).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import trio

from tunnel.config import ClientConfig
from tunnel.core.messages import AuthResponse
from tunnel.core.underlay import Route
from tunnel.daemon.client import dns, policyroute
from tunnel.daemon.client.dns import DnsSettings
from tunnel.daemon.client.policyroute import PolicyRouting
from tunnel.daemon.platform import Platform
from tunnel.daemon.statefile import StateFile
from tunnel.daemon.tun import TunDevice
from tunnel.errors import TunnelError

log = logging.getLogger("tunnel.client")

SERVER_ROUTE = "server"  # the keys of host routes to the server in HostChanges: "server IP"
DNS_PATIENCE = 10.0  # seconds for the resolver configuration to answer before we go on without


class HostNetwork:
    """The TUN device, addresses and routes of the client, made and undone in one place."""

    def __init__(self, config: ClientConfig, platform: Platform, state: StateFile) -> None:
        self.config = config
        self.platform = platform
        self.state = state
        self.host = platform.host_changes()
        self.policy = PolicyRouting(self.host, state, table=config.fwmark, fwmark=config.fwmark)
        self.dns = platform.dns_configurator(state)
        self.dns_applied: DnsSettings | None = None
        self.tun: TunDevice | None = None
        self.tun_index: int | None = None
        self.response: AuthResponse | None = None  # the one whose addresses are applied
        self._tunnel_routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # Host routes outside the tunnel, by server address, and the addresses we may use.
        self._server_routes: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Route] = {}
        self._server_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()

    def apply(self, response: AuthResponse, *, monitor: Any = None) -> None:
        """Create the TUN device and routes on the first session; update addresses later.
        ``monitor``: the network monitor, if one runs, told to ignore the TUN device as soon
        as it exists (our own changes to it are not news)."""
        if self.response is not None and _same_addresses(self.response, response):
            self.response = response
            return
        if self.tun is None:
            mtu = min(self.config.mtu, response.mtu or self.config.mtu)
            self.tun = self.platform.open_tun(self.config.tun_name)
            if monitor is not None:
                monitor.ignore_interface(self.tun.name)
            self.tun_index = self.host.bring_up(self.tun.name, mtu)
            self._add_addresses(response)
            self._add_routes(response)
        else:
            # The server gave us other addresses (our lease expired): swap them.
            self.host.undo()
            self.policy.forget()
            self._server_routes.clear()
            self._add_addresses(response)
            self._add_routes(response)
        self.response = response

    def _add_addresses(self, response: AuthResponse) -> None:
        assert self.tun is not None
        if response.assigned_ip is not None and response.network is not None:
            self.host.add_address(self.tun.name, response.assigned_ip, response.network.prefixlen)
        if response.assigned_ip6 is not None and response.network6 is not None:
            self.host.add_address(self.tun.name, response.assigned_ip6, response.network6.prefixlen)

    def _add_routes(self, response: AuthResponse) -> None:
        assert self.tun is not None
        wanted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        if response.assigned_ip is not None:
            wanted += self.config.routes
        if response.assigned_ip6 is not None:
            wanted += self.config.routes6
        # Default routes go into our own table (policy routing); the rest into the main table,
        # where a host route keeps the server outside any of them that covers it.
        through: set[int] = {net.version for net in wanted if net.prefixlen == 0}
        blocked: set[int] = set()
        if 4 in through and 6 not in through and not self.config.allow_ipv6_outside:
            blocked.add(6)
        self._tunnel_routes = [net for net in wanted if net.prefixlen != 0]
        self.keep_server_reachable()
        self.policy.install(self.tun.name, through=through, blocked=blocked)
        for net in self._tunnel_routes:
            self.host.add_route(net, ifname=self.tun.name)

    async def apply_dns(self, response: AuthResponse) -> None:
        """Use the resolvers the server pushed (if we accept them), or stop using them when a
        later session brings none. A failure is logged, not fatal: the tunnel still works."""
        if self.tun is None or self.tun_index is None:
            return
        wanted = (
            DnsSettings(
                servers=response.dns, search=response.dns_search, route_all=self.config.full_tunnel
            )
            if self.config.accept_dns and response.dns
            else None
        )
        if wanted == self.dns_applied:
            return
        try:
            with trio.fail_after(DNS_PATIENCE):
                if wanted is None:
                    self.dns.restore()
                else:
                    await self.dns.apply(self.tun.name, self.tun_index, wanted)
        except TunnelError as exc:
            log.error("DNS from the server not applied: %s", exc)
            return
        except trio.TooSlowError:
            log.error("DNS from the server not applied: no answer within %g s", DNS_PATIENCE)
            return
        self.dns_applied = wanted
        if wanted is not None:
            log.info(
                "DNS: %s%s (%s)",
                ", ".join(str(a) for a in wanted.servers),
                f", search {' '.join(wanted.search)}" if wanted.search else "",
                self.dns.backend,
            )

    def keep_server_reachable(self, addresses: list[Any] | None = None) -> None:
        """Full tunnel: keep a host route outside the tunnel to each server address we may
        use (every candidate during a race, then the winner's), through whatever reaches it
        now: the underlay may have moved (another gateway or interface), the name may resolve
        elsewhere. None: the addresses of last time. Nothing where the tunnel's routes miss
        the server."""
        if addresses is not None:
            self._server_ips = {ip_of(address) for address in addresses}
        if self.tun is None:
            return
        wanted_ips = {
            ip
            for ip in self._server_ips
            if any(ip in net for net in self._tunnel_routes if net.version == ip.version)
        }
        for ip in list(self._server_routes):
            if ip not in wanted_ips:
                self.host.set_route(f"{SERVER_ROUTE} {ip}", None)
                del self._server_routes[ip]
        for ip in wanted_ips:
            current = self._server_routes.get(ip)
            underlay = self.host.underlay_route_to(ip, avoid_oif=self.tun_index, avoid=current)
            if underlay is None:
                log.warning("no route to the server %s outside the tunnel", ip)
                continue
            wanted = Route(
                ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"), underlay.gateway, underlay.oif
            )
            if wanted != current:
                self.host.set_route(f"{SERVER_ROUTE} {ip}", wanted)
                self._server_routes[ip] = wanted
                log.info(
                    "server %s reached outside the tunnel%s (interface %s)",
                    ip,
                    f" via {wanted.gateway}" if wanted.gateway else "",
                    wanted.oif,
                )

    def dns_status(self) -> dict[str, Any] | None:
        """The resolvers in use from the server, for status (None: none applied)."""
        applied = self.dns_applied
        if applied is None:
            return None
        return {
            "servers": [str(a) for a in applied.servers],
            "search": list(applied.search),
            "backend": self.dns.backend,
        }

    def addresses(self) -> list[str]:
        """The tunnel addresses the server gave us, with their prefix lengths."""
        r = self.response
        if r is None:
            return []
        out = []
        if r.assigned_ip is not None and r.network is not None:
            out.append(f"{r.assigned_ip}/{r.network.prefixlen}")
        if r.assigned_ip6 is not None and r.network6 is not None:
            out.append(f"{r.assigned_ip6}/{r.network6.prefixlen}")
        return out

    def close(self) -> None:
        """Undo every change to the host and close the TUN device."""
        self.dns.restore()
        self.host.undo()
        self.policy.forget()
        self.host.close()
        if self.tun is not None:
            self.tun.close()


def recover(platform: Platform, state: StateFile) -> list[str]:
    """Undo what a killed client left on the host (its resolver configuration, its policy
    routing); returns what was undone, for the log and ``--cleanup``."""
    undone = []
    if dns.recover(state):
        undone.append("DNS configuration")
    host = platform.host_changes()
    try:
        if policyroute.recover(host, state):
            undone.append("policy routing")
    finally:
        host.close()
    return undone


def ip_of(address: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP of a socket address (a scope such as ``%eth0`` left off)."""
    return ipaddress.ip_address(address[0].split("%", 1)[0])


def _same_addresses(a: AuthResponse, b: AuthResponse) -> bool:
    return (a.assigned_ip, a.network, a.assigned_ip6, a.network6) == (
        b.assigned_ip,
        b.network,
        b.assigned_ip6,
        b.network6,
    )
