"""Addresses, MTU and routes through netlink (pyroute2), with an undo log.

Every change the daemon makes to the host goes through :class:`HostChanges`, which remembers it
and undoes it in reverse order on ``undo()``. Changes that belong to the TUN device itself
(its addresses and routes) disappear with the device; routes through other devices (the host
route that keeps the server reachable) must be removed explicitly, and are.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tunnel.core.underlay import Route, best_route
from tunnel.daemon.sysctl import read_sysctl, sysctl_path, write_sysctl
from tunnel.errors import SystemSetupError

log = logging.getLogger("tunnel.netlink")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAIN_TABLE = 254
FIB_RULE_INVERT = 0x2  # a rule's flags: match what the selector does not match ("not")


def _family(addr: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _quiet_ipv6_autoconf(ifname: str) -> None:
    """No link-local address, router solicitations or MLD reports on our device: the tunnel
    carries only the addresses the server assigned, and chatter from others would be counted as
    spoofed. (A per-namespace sysctl; absent when IPv6 is disabled, which is fine.)"""
    for name, value in (("addr_gen_mode", "1"), ("accept_ra", "0")):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{ifname}/{name}", "w") as knob:
                knob.write(value)
        except OSError as exc:
            log.debug("%s: cannot set %s: %s", ifname, name, exc.strerror)


class HostChanges:
    """Applies network changes and remembers how to undo each of them."""

    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._undo: list[tuple[str, Callable[[], Any]]] = []
        # Routes that move while we run (the host route to the server): key -> netlink spec.
        self._moving: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self._ipr.close()

    def _do(self, what: str, action: Callable[[], Any], undo: Callable[[], Any] | None) -> None:
        try:
            action()
        except NetlinkError as exc:
            raise SystemSetupError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}") from exc
        if undo is not None:
            self._undo.append((what, undo))
        log.debug("%s", what)

    def local_addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Every address configured on this host's interfaces (in this namespace)."""
        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for message in self._ipr.get_addr():
            text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if text:
                try:
                    addresses.append(ipaddress.ip_address(text))
                except ValueError:
                    continue
        return addresses

    def link_index(self, ifname: str) -> int:
        found = self._ipr.link_lookup(ifname=ifname)
        if not found:
            raise SystemSetupError(f"no network device named {ifname!r}")
        return int(found[0])

    def bring_up(self, ifname: str, mtu: int) -> int:
        """Set the MTU and bring the device up; returns its index."""
        index = self.link_index(ifname)
        _quiet_ipv6_autoconf(ifname)
        self._do(
            f"set {ifname} mtu {mtu} up",
            lambda: self._ipr.link("set", index=index, mtu=mtu, state="up"),
            None,  # the device is ours and goes away with its fd
        )
        return index

    def add_address(self, ifname: str, address: IPAddress, prefixlen: int) -> None:
        index = self.link_index(ifname)
        kwargs: dict[str, Any] = {"index": index, "address": str(address), "prefixlen": prefixlen}
        if address.version == 6:
            # No duplicate address detection on a point-to-point tunnel: the address is usable at
            # once instead of after a second of DAD.
            kwargs["flags"] = 0x02  # IFA_F_NODAD
        self._do(
            f"add address {address}/{prefixlen} on {ifname}",
            lambda: self._ipr.addr("add", **kwargs),
            lambda: self._ipr.addr("del", index=index, address=str(address), prefixlen=prefixlen),
        )

    def add_route(
        self,
        network: IPNetwork,
        *,
        ifname: str | None = None,
        via: str | None = None,
        oif: int | None = None,
        table: int | None = None,
        unreachable: bool = False,
    ) -> None:
        """A route, in the main table or ``table``; ``unreachable``: one that refuses (an
        immediate "network unreachable" to the sender) instead of sending anywhere."""
        spec: dict[str, Any] = {
            "dst": str(network.network_address),
            "dst_len": network.prefixlen,
            "family": _family(network),
        }
        if table is not None:
            spec["table"] = table
        if unreachable:
            spec["type"] = "unreachable"
        if ifname is not None:
            spec["oif"] = self.link_index(ifname)
        if oif is not None:
            spec["oif"] = oif
        if via is not None:
            spec["gateway"] = via
        desc = (
            ("add unreachable route " if unreachable else "add route ")
            + str(network)
            + (f" via {via}" if via else "")
            + (f" dev {ifname}" if ifname else "")
            + (f" table {table}" if table is not None else "")
        )
        self._do(
            desc, lambda: self._ipr.route("add", **spec), lambda: self._ipr.route("del", **spec)
        )

    def add_rule(self, family: int, **rule: Any) -> None:
        """A policy routing rule (pyroute2's keywords: ``priority``, ``table``, ``fwmark``,
        ``flags``, ``suppress_prefixlen``), removed again by :meth:`undo`."""
        spec = {"family": family, **rule}
        self._do(
            f"add rule {describe_rule(spec)}",
            lambda: self._ipr.rule("add", **spec),
            lambda: self._ipr.rule("del", **spec),
        )

    def delete_rule(self, family: int, **rule: Any) -> bool:
        """Remove a rule a killed daemon left (False: it was not there)."""
        spec = {"family": family, **rule}
        try:
            self._ipr.rule("del", **spec)
        except NetlinkError as exc:
            log.debug("delete rule %s: %s", describe_rule(spec), exc)
            return False
        return True

    def flush_table(self, family: int, table: int) -> int:
        """Remove every route of ``table`` (a killed daemon's own table); returns how many."""
        removed = 0
        try:
            messages = self._ipr.get_routes(family=family, table=table)
        except NetlinkError as exc:
            raise SystemSetupError(f"cannot read routing table {table}: {exc.args[-1]}") from exc
        for msg in messages:
            if msg.get_attr("RTA_TABLE") != table:
                continue
            spec = {"family": family, "table": table, "dst_len": msg["dst_len"]}
            spec["type"] = msg["type"]
            if msg.get_attr("RTA_DST"):
                spec["dst"] = msg.get_attr("RTA_DST")
            try:
                self._ipr.route("del", **spec)
                removed += 1
            except NetlinkError as exc:
                log.debug("flush table %d: %s", table, exc)
        return removed

    def read_sysctl(self, name: str) -> str:
        """The value of sysctl ``name`` (``net.ipv4.conf.all.src_valid_mark``)."""
        return read_sysctl(sysctl_path(name))

    def write_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl, with no undo (for restoring what a killed daemon changed)."""
        write_sysctl(sysctl_path(name), value)
        log.debug("sysctl %s=%s", name, value)

    def set_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl; :meth:`undo` puts back the value it had."""
        old = self.read_sysctl(name)
        if old == value:
            return
        self.write_sysctl(name, value)
        self._undo.append((f"sysctl {name}={old}", lambda: self.write_sysctl(name, old)))

    def underlay_route_to(
        self, address: IPAddress, *, avoid_oif: int | None, avoid: Route | None
    ) -> Route | None:
        """The main table's way to ``address`` without our own routes (see
        :func:`tunnel.core.underlay.best_route`)."""
        try:
            messages = self._ipr.get_routes(family=_family(address), table=254)
        except NetlinkError as exc:
            raise SystemSetupError(f"cannot read the routing table: {exc.args[-1]}") from exc
        return best_route(_unicast_routes(messages), address, avoid_oif=avoid_oif, avoid=avoid)

    def set_route(self, key: str, route: Route | None) -> None:
        """Make the route known as ``key`` be ``route`` (None: no route): the new one is in
        place before the old one goes, so the destination is never left without one. Undone
        by :meth:`undo` like every other change."""
        old = self._moving.pop(key, None)
        if route is not None:
            spec: dict[str, Any] = {
                "dst": str(route.network.network_address),
                "dst_len": route.network.prefixlen,
                "family": _family(route.network),
            }
            if route.gateway is not None:
                spec["gateway"] = route.gateway
            if route.oif is not None:
                spec["oif"] = route.oif
            same_destination = old is not None and (old["dst"], old["dst_len"]) == (
                spec["dst"],
                spec["dst_len"],
            )
            verb = "replace" if same_destination else "add"
            self._do(
                f"{verb} route {route.network} ({key})", lambda: self._ipr.route(verb, **spec), None
            )
            self._moving[key] = spec
            if same_destination:
                return
        if old is not None:
            self._delete_route(key, old)

    def _delete_route(self, key: str, spec: dict[str, Any]) -> None:
        try:
            self._ipr.route("del", **spec)
        except NetlinkError as exc:
            log.debug("delete route %s/%s (%s): %s", spec["dst"], spec["dst_len"], key, exc)

    def undo(self) -> None:
        """Undo every remembered change, newest first. Errors are logged, not raised: undo runs
        on the way out, when the device may already be gone and taken its routes with it."""
        for key, spec in self._moving.items():
            self._delete_route(key, spec)
        self._moving.clear()
        while self._undo:
            what, action = self._undo.pop()
            try:
                action()
            except (NetlinkError, SystemSetupError) as exc:
                # ENODEV/ESRCH/EADDRNOTAVAIL: it went away with the device already.
                log.debug("undo %s: %s", what, exc)


def describe_rule(spec: dict[str, Any]) -> str:
    """A rule the way ``ip rule`` shows it, for logs and errors."""
    words = [f"{spec['priority']}:" if "priority" in spec else ""]
    if spec.get("flags", 0) & FIB_RULE_INVERT:
        words.append("not")
    if "fwmark" in spec:
        words.append(f"fwmark {spec['fwmark']:#x}")
    else:
        words.append("from all")
    words.append(f"lookup {'main' if spec.get('table') == MAIN_TABLE else spec.get('table')}")
    if "suppress_prefixlen" in spec:
        words.append(f"suppress_prefixlength {spec['suppress_prefixlen']}")
    return " ".join(w for w in words if w)


def _unicast_routes(messages: Any) -> list[Route]:
    """Plain unicast routes of a netlink dump (multipath routes are left out: we could not
    say which of their hops the kernel takes)."""
    routes = []
    for msg in messages:
        if msg.get("type") != 1 or msg.get_attr("RTA_MULTIPATH") is not None:  # RTN_UNICAST
            continue
        family_any = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
        dst = msg.get_attr("RTA_DST") or family_any
        routes.append(
            Route(
                network=ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False),
                gateway=msg.get_attr("RTA_GATEWAY"),
                oif=msg.get_attr("RTA_OIF"),
                metric=msg.get_attr("RTA_PRIORITY") or 0,
            )
        )
    return routes
