"""The namespace world of the direct client-to-client (hole punching) tests.

One "internet" router, the server on it, and two sides, ``a`` and ``b``. A side is either a
home (:class:`Home`: a router with ``wan0`` toward the internet and a bridge ``lan0`` with one
or more clients behind it) or an open host (:class:`Open`: a client directly on the internet,
no firewall, no NAT)::

                        server (eth0) 198.51.100.10  2001:db8:100::10
                          |
                        srv0 198.51.100.1  2001:db8:100::1
        to-a 192.0.2.1  2001:db8:a::1 ---- inet ---- to-b 203.0.113.1  2001:db8:b::1
          |                                             |
        wan0 192.0.2.2  2001:db8:a::2    home a       wan0 203.0.113.2  2001:db8:b::2    home b
        lan0 10.1.0.1   2001:db8:a:1::1  (router)     lan0 10.2.0.1     2001:db8:b:1::1  (router)
          |                                             |
        a0 (eth0) 10.1.0.10  2001:db8:a:1::10         b0 (eth0) 10.2.0.10  2001:db8:b:1::10
        a1 (eth0) 10.1.0.11  2001:db8:a:1::11         (a second client: Home(clients=2))

    An open side sits on the link itself: a0 (eth0) 192.0.2.10  2001:db8:a::10.

Routing is the realistic one. For IPv4 the internet knows only the links (so a NATed LAN is
unreachable from outside: the other side's 10.x is "network unreachable" at ``inet``); a home
without NAT (``nat=None``) gets its LAN prefix routed, like a public LAN. For IPv6 every LAN
/64 is routed to its home router, no NAT66: the clients' addresses are global-ish, and the
home firewalls are what stands between them (firewall x firewall is the IPv6 case).

A home router's firewall (``firewall=True``) is the stateful one of P2P.md, in one ``inet``
table for both families: the forward chain exactly as written there, whose last rule counts
what falls through to the drop policy, plus an input chain of the same shape (ICMP and what
comes from ``lan0`` allowed). The input chain matters for NAT: an unsolicited packet to the
router's own WAN address (no NAT mapping for it) is delivered locally, never forwarded, so
only the input chain sees it; and accepting it there would leave a conntrack entry that makes
the router's next masquerade of the same 4-tuple pick another port. :meth:`Router.drops`
reads both counters.

NAT (``nat=``): ``"masquerade"`` (keeps the source port when it can: measure it),
``"hard"`` (``masquerade random,fully-random``: a new random port for every destination) or
``None``.

:meth:`P2PNet.block` drops UDP between two sides' internet-facing addresses in the internet
router (a named set per family in ``table inet p2pblock``), leaving both free to reach the
server; :meth:`P2PNet.unblock` undoes it; :meth:`P2PNet.blocked` counts what it dropped.

Every namespace comes from :func:`tests.support.netns.netns` (``tnl-p2p.<role>-<pid>-<n>``),
so names never clash between runs and :func:`~tests.support.netns.reap_stale` removes what a
killed run left. The nftables tables live inside those namespaces and go with them; nothing
is ever added to the namespace the tests run in. Interface names are fixed per namespace
(``srv0``, ``to-a``, ``wan0``, ``lan0``, ``lanp0``, ``eth0``), well under 15 characters.
Setup is synchronous, like the rest of :mod:`tests.support.netns`; everything is undone by
one ``ExitStack``, whatever the exit path, including an exception halfway through setup.
It returns only when the world is usable at once: DAD is off in every namespace (a router
whose link-local address is tentative holds forwarded IPv6 packets for seconds) and every
link is UP (a veth end may get its carrier, and so IPv6, up to a second late). That wait
makes setup take about a second.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import attrs
import trio

from tests.support.netns import CommandFailed, Netns, exec_argv, ip, ip_json, netns, run, veth

__all__ = [
    "NS_PREFIX",
    "Nat",
    "SERVER4",
    "SERVER6",
    "Drops",
    "Home",
    "Host",
    "IfStats",
    "Open",
    "P2PNet",
    "Router",
    "Side",
    "Site",
    "p2pnet",
    "wait_until",
]

#: Every namespace of this topology is named ``tnl-p2p.<role>-<pid>-<n>``.
NS_PREFIX = "p2p."
SERVER4, SERVER6 = "198.51.100.10", "2001:db8:100::10"
_INET_SERVER4, _INET_SERVER6 = "198.51.100.1", "2001:db8:100::1"

Nat = Literal["masquerade", "hard"] | None


@attrs.frozen
class _Plan:
    """Prefixes of one side (without the host part)."""

    wan4: str  # the link between the internet router and this side, a /24
    wan6: str  # ... and its /64
    lan4: str  # the home LAN, a /24
    lan6: str  # ... and its /64


_PLANS = {
    "a": _Plan(wan4="192.0.2.", wan6="2001:db8:a::", lan4="10.1.0.", lan6="2001:db8:a:1::"),
    "b": _Plan(wan4="203.0.113.", wan6="2001:db8:b::", lan4="10.2.0.", lan6="2001:db8:b:1::"),
}
_FIRST_CLIENT = 10  # clients are .10, .11, ... (and ::10, ::11, ...)
_MAX_CLIENTS = 8
_LINK_UP_S = 10.0


def _check_clients(_: object, __: object, value: int) -> None:
    if not 1 <= value <= _MAX_CLIENTS:
        raise ValueError(f"a home has 1 to {_MAX_CLIENTS} clients, not {value}")


def _check_nat(_: object, __: object, value: object) -> None:
    if value not in ("masquerade", "hard", None):
        raise ValueError(f"nat must be 'masquerade', 'hard' or None, not {value!r}")


@attrs.frozen
class Home:
    """A side behind a home router (``wan0`` toward the internet, bridge ``lan0`` inside)."""

    firewall: bool = True
    nat: Nat = attrs.field(default="masquerade", validator=_check_nat)
    clients: int = attrs.field(default=1, validator=_check_clients)


@attrs.frozen
class Open:
    """A side that is one client directly on the internet: no router, firewall or NAT."""


Side = Home | Open


@attrs.frozen
class Host:
    """A namespace with one interface ``eth0``; ``public4`` is the IPv4 source address the
    internet sees from it (its router's WAN address behind NAT, else its own)."""

    name: str
    ns: Netns
    ip4: str
    ip6: str
    public4: str

    @property
    def public6(self) -> str:
        """No NAT66 anywhere: the internet sees the host's own IPv6 address."""
        return self.ip6

    async def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """:func:`tests.support.netns.run` inside this host."""
        return await run(self.ns, argv, **kwargs)


@attrs.frozen
class Drops:
    """Packets that reached a home firewall's drop policy: ``forward`` (toward the LAN, e.g.
    IPv6 to a client) and ``input`` (to the router itself, e.g. IPv4 to its NAT address)."""

    forward: int
    input: int

    @property
    def total(self) -> int:
        return self.forward + self.input


@attrs.frozen
class Router:
    """A home router: ``wan0`` (``wan4``, ``wan6``) and ``lan0`` (``lan4``, ``lan6``)."""

    name: str
    ns: Netns
    wan4: str
    wan6: str
    lan4: str
    lan6: str
    firewall: bool
    nat: Nat

    def drops(self) -> Drops:
        """The firewall's counters of dropped unsolicited packets (packets, not bytes)."""
        if not self.firewall:
            raise ValueError(f"router {self.name} has no firewall")
        counts = {}
        for chain in ("forward", "input"):
            (rule,) = (r for r in _rules(self.ns, "inet", "fw", chain) if _is_drop_counter(r))
            counts[chain] = _counter_packets(rule)
        return Drops(**counts)

    async def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """:func:`tests.support.netns.run` inside this router."""
        return await run(self.ns, argv, **kwargs)

    def ruleset(self) -> str:
        """``nft list ruleset`` of this router, for failure messages."""
        return _nft(self.ns, ["list", "ruleset"]).stdout


@attrs.frozen
class Site:
    """One side: ``router`` is ``None`` for an open host."""

    name: str
    router: Router | None
    clients: tuple[Host, ...]

    @property
    def client(self) -> Host:
        """The first (usually only) client."""
        return self.clients[0]

    def internet_addresses4(self) -> list[str]:
        """This side's IPv4 addresses as the internet sees them (what :meth:`P2PNet.block`
        matches)."""
        if self.router is None:
            return [self.client.ip4]
        if self.router.nat is None:
            return [self.router.wan4, *(host.ip4 for host in self.clients)]
        return [self.router.wan4]

    def internet_addresses6(self) -> list[str]:
        """This side's IPv6 addresses as the internet sees them."""
        wan = [] if self.router is None else [self.router.wan6]
        return [*wan, *(host.ip6 for host in self.clients)]


@attrs.frozen
class IfStats:
    """Counters of one interface (``ip -s link``)."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@attrs.define(eq=False)
class P2PNet:
    """The world built by :func:`p2pnet`."""

    inet: Netns
    server: Host
    a: Site
    b: Site
    _blocked: set[tuple[str, str]] = attrs.field(factory=set)

    def site(self, name: str) -> Site:
        if name not in ("a", "b"):
            raise ValueError(f"sides are 'a' and 'b', not {name!r}")
        site: Site = getattr(self, name)
        return site

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of this world (they are all deleted when :func:`p2pnet` exits)."""
        names = [self.inet.name, self.server.ns.name]
        for site in (self.a, self.b):
            if site.router is not None:
                names.append(site.router.ns.name)
            names.extend(host.ns.name for host in site.clients)
        return tuple(names)

    def server_stats(self) -> IfStats:
        """Counters of the server's only interface: what crossed the server."""
        (link,) = ip_json(self.server.ns, "-s", "link", "show", "dev", "eth0")
        stats = link["stats64"]
        return IfStats(
            rx_bytes=stats["rx"]["bytes"],
            rx_packets=stats["rx"]["packets"],
            tx_bytes=stats["tx"]["bytes"],
            tx_packets=stats["tx"]["packets"],
        )

    def block(self, src: str, dst: str, *, both_ways: bool = True) -> None:
        """Drop UDP from side ``src``'s internet-facing addresses to side ``dst``'s (and
        back, unless ``both_ways=False``) in the internet router. The server stays reachable.
        Blocking a direction twice is harmless."""
        directions = [(src, dst), (dst, src)] if both_ways else [(src, dst)]
        new = [d for d in directions if d not in self._blocked]
        if new:
            _nft_script(self.inet, self._elements("add", new))
            self._blocked.update(new)

    def unblock(self, src: str, dst: str, *, both_ways: bool = True) -> None:
        """Undo :meth:`block` (a direction that is not blocked is left alone)."""
        directions = [(src, dst), (dst, src)] if both_ways else [(src, dst)]
        old = [d for d in directions if d in self._blocked]
        if old:
            _nft_script(self.inet, self._elements("delete", old))
            self._blocked.difference_update(old)

    def blocked(self) -> int:
        """Packets dropped so far by :meth:`block` (both families)."""
        rules = _rules(self.inet, "inet", _BLOCK_TABLE, "forward")
        return sum(_counter_packets(r) for r in rules if _comment(r) == "blocked")

    def _elements(self, verb: str, directions: Sequence[tuple[str, str]]) -> str:
        lines = []
        for src, dst in directions:
            s, d = self.site(src), self.site(dst)
            pairs4 = [
                f"{x} . {y}" for x in s.internet_addresses4() for y in d.internet_addresses4()
            ]
            pairs6 = [
                f"{x} . {y}" for x in s.internet_addresses6() for y in d.internet_addresses6()
            ]
            lines.append(f"{verb} element inet {_BLOCK_TABLE} v4 {{ {', '.join(pairs4)} }}")
            lines.append(f"{verb} element inet {_BLOCK_TABLE} v6 {{ {', '.join(pairs6)} }}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """Addresses, routes and rulesets of every router, for failure messages."""
        parts = []
        routers = [self.inet] + [s.router.ns for s in (self.a, self.b) if s.router is not None]
        for ns in routers:
            addrs = ip(ns, "-br", "addr", check=False).stdout
            routes = ip(ns, "route", check=False).stdout + ip(ns, "-6", "route", check=False).stdout
            rules = _nft(ns, ["list", "ruleset"], check=False).stdout
            parts.append(f"=== {ns.name}\n{addrs}{routes}{rules}")
        return "\n".join(parts)


async def wait_until(predicate: Callable[[], bool], *, interval: float = 0.02) -> None:
    """Return once ``predicate()`` is true, polling every ``interval`` seconds. No deadline of
    its own: wrap it in ``trio.fail_after``."""
    while not predicate():  # noqa: ASYNC110 (kernel counters are polled, they fire no events)
        await trio.sleep(interval)


# ---------------------------------------------------------------------------------------------
# nftables


_BLOCK_TABLE = "p2pblock"


def _firewall_script() -> str:
    # the forward chain is P2P.md's, verbatim; the input chain is its twin for the router itself
    return """
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iifname "lan0" accept
        counter comment "unsolicited"
    }
    chain input {
        type filter hook input priority filter; policy drop;
        meta l4proto { icmp, ipv6-icmp } accept
        ct state established,related accept
        ct state invalid drop
        iifname { "lo", "lan0" } accept
        counter comment "unsolicited"
    }
}
"""


def _nat_script(nat: Literal["masquerade", "hard"]) -> str:
    how = "masquerade" if nat == "masquerade" else "masquerade random,fully-random"
    return f"""
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "wan0" {how}
    }}
}}
"""


def _block_script() -> str:
    return f"""
table inet {_BLOCK_TABLE} {{
    set v4 {{ type ipv4_addr . ipv4_addr; }}
    set v6 {{ type ipv6_addr . ipv6_addr; }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        meta l4proto udp ip saddr . ip daddr @v4 counter drop comment "blocked"
        meta l4proto udp ip6 saddr . ip6 daddr @v6 counter drop comment "blocked"
    }}
}}
"""


def _nft(ns: Netns, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = exec_argv(ns, ["nft", *args])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _nft_script(ns: Netns, script: str) -> None:
    argv = exec_argv(ns, ["nft", "-f", "-"])
    proc = subprocess.run(
        argv, input=script, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, script + proc.stdout, proc.stderr)


def _rules(ns: Netns, family: str, table: str, chain: str) -> list[dict[str, Any]]:
    out = _nft(ns, ["-j", "list", "chain", family, table, chain]).stdout
    return [item["rule"] for item in json.loads(out)["nftables"] if "rule" in item]


def _comment(rule: dict[str, Any]) -> str | None:
    comment = rule.get("comment")
    return comment if isinstance(comment, str) else None


def _is_drop_counter(rule: dict[str, Any]) -> bool:
    return _comment(rule) == "unsolicited"


def _counter_packets(rule: dict[str, Any]) -> int:
    for expr in rule["expr"]:
        if "counter" in expr:
            return int(expr["counter"]["packets"])
    raise ValueError(f"rule without a counter: {rule}")


# ---------------------------------------------------------------------------------------------
# building


def _sysctl(ns: Netns, *settings: str) -> None:
    # -e: a key this kernel lacks (the bridge ones without br_netfilter) is not an error
    argv = exec_argv(ns, ["sysctl", "-q", "-e", "-w", *settings])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, proc.stdout, proc.stderr)


def _make_router_ns(ns: Netns) -> None:
    _sysctl(
        ns,
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        # a LAN bridge is a switch, not a second firewall hop
        "net.bridge.bridge-nf-call-iptables=0",
        "net.bridge.bridge-nf-call-ip6tables=0",
    )


def _default_routes(ns: Netns, via4: str, via6: str) -> None:
    ip(ns, "route", "add", "default", "via", via4)
    ip(ns, "-6", "route", "add", "default", "via", via6)


def _build_site(make: Callable[[str], Netns], inet: Netns, name: str, side: Side) -> Site:
    plan = _PLANS[name]
    inet4, inet6 = f"{plan.wan4}1", f"{plan.wan6}1"
    if isinstance(side, Open):
        ns = make(f"{name}0")
        host4, host6 = f"{plan.wan4}{_FIRST_CLIENT}", f"{plan.wan6}{_FIRST_CLIENT}"
        veth(inet, ns, [f"{inet4}/24", f"{inet6}/64"], [f"{host4}/24", f"{host6}/64"],
             name_a=f"to-{name}", name_b="eth0")  # fmt: skip
        _default_routes(ns, inet4, inet6)
        return Site(name, None, (Host(f"{name}0", ns, host4, host6, host4),))

    router_ns = make(f"r{name}")
    _make_router_ns(router_ns)
    router = Router(
        name=f"r{name}", ns=router_ns,
        wan4=f"{plan.wan4}2", wan6=f"{plan.wan6}2", lan4=f"{plan.lan4}1", lan6=f"{plan.lan6}1",
        firewall=side.firewall, nat=side.nat,
    )  # fmt: skip
    wan_inet, wan_router = (
        [f"{inet4}/24", f"{inet6}/64"],
        [f"{router.wan4}/24", f"{router.wan6}/64"],
    )
    veth(inet, router_ns, wan_inet, wan_router, name_a=f"to-{name}", name_b="wan0")
    _default_routes(router_ns, inet4, inet6)
    # the internet routes the LAN's IPv6 prefix, and its IPv4 prefix only when it is not NATed
    ip(inet, "-6", "route", "add", f"{plan.lan6}/64", "via", router.wan6)
    if side.nat is None:
        ip(inet, "route", "add", f"{plan.lan4}0/24", "via", router.wan4)

    clients = []
    ports = []
    for i in range(side.clients):
        host_name = f"{name}{i}"
        ns = make(host_name)
        host4 = f"{plan.lan4}{_FIRST_CLIENT + i}"
        host6 = f"{plan.lan6}{_FIRST_CLIENT + i}"
        ports.append(veth(router_ns, ns, None, [f"{host4}/24", f"{host6}/64"],
                          name_a=f"lanp{i}", name_b="eth0").name_a)  # fmt: skip
        _default_routes(ns, router.lan4, router.lan6)
        public4 = host4 if side.nat is None else router.wan4
        clients.append(Host(host_name, ns, host4, host6, public4))
    ip(router_ns, "link", "add", "lan0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
    for port in ports:
        ip(router_ns, "link", "set", port, "master", "lan0")
    ip(router_ns, "addr", "add", f"{router.lan4}/24", "dev", "lan0")
    ip(router_ns, "-6", "addr", "add", f"{router.lan6}/64", "dev", "lan0", "nodad")
    ip(router_ns, "link", "set", "lan0", "up")

    if side.firewall:
        _nft_script(router_ns, _firewall_script())
    if side.nat is not None:
        _nft_script(router_ns, _nat_script(side.nat))
    return Site(name, router, tuple(clients))


def _wait_links_up(namespaces: Sequence[Netns]) -> None:
    """A bounded poll (setup is synchronous) until every link in ``namespaces`` is UP.

    The kernel may announce a veth's carrier up to a second late (linkwatch defers the event
    when the device's ifindex happens to equal its peer's), and IPv6 on a link starts only
    then: until it does, that end answers no neighbour solicitation."""
    deadline = time.monotonic() + _LINK_UP_S
    for ns in namespaces:
        while True:
            down = [
                link for link in ip_json(ns, "link", "show")
                if link["ifname"] != "lo" and link.get("operstate") != "UP"
            ]  # fmt: skip
            if not down:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"links of {ns.name} not up after {_LINK_UP_S:g} s: {down}")
            time.sleep(0.01)


@contextlib.contextmanager
def p2pnet(*, a: Side, b: Side) -> Iterator[P2PNet]:
    """Build the world (see the module doc) and remove all of it on exit.

    ``p2pnet(a=Home(), b=Home())``: NAT x NAT for IPv4, firewall x firewall for IPv6;
    ``Home(clients=2)``: two clients behind one NAT; ``b=Open()``: one side without a router;
    ``Home(nat="hard")``: endpoint-dependent NAT; ``Home(nat=None)``: a firewall only.
    """
    with contextlib.ExitStack() as stack:

        def make(role: str) -> Netns:
            ns = stack.enter_context(netns(f"{NS_PREFIX}{role}"))
            # No DAD on the interfaces to come (their link-local addresses included): a router
            # whose link-local address is still tentative sends no neighbour solicitation for
            # a forwarded packet, which holds the first IPv6 packets through it for ~2 s.
            _sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
            return ns

        inet = make("inet")
        _make_router_ns(inet)
        server_ns = make("srv")
        veth(inet, server_ns, [f"{_INET_SERVER4}/24", f"{_INET_SERVER6}/64"],
             [f"{SERVER4}/24", f"{SERVER6}/64"], name_a="srv0", name_b="eth0")  # fmt: skip
        _default_routes(server_ns, _INET_SERVER4, _INET_SERVER6)
        server = Host("server", server_ns, SERVER4, SERVER6, SERVER4)
        site_a = _build_site(make, inet, "a", a)
        site_b = _build_site(make, inet, "b", b)
        _nft_script(inet, _block_script())
        world = P2PNet(inet=inet, server=server, a=site_a, b=site_b)
        _wait_links_up([Netns(name) for name in world.namespaces])
        yield world
