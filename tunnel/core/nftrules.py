"""The nftables rulesets the daemons own, as libnftables JSON command objects.

Two rulesets, each in a table of its own named after the TUN device (:func:`table_name`):

- the client's kill switch (:func:`kill_switch`): an ``inet`` table whose output chain drops
  by default and lets out only loopback, the TUN device, the client's own QUIC packets (marked
  with SO_MARK, which only CAP_NET_ADMIN can set) and what keeps the underlay alive (IPv6
  neighbour discovery, DHCP). It is meant to outlive a killed client: traffic stays blocked
  until a new client takes the table over or ``tunnel client --cleanup`` removes it;
- the server's masquerade (:func:`masquerade`): an ``ip`` table that source-NATs the client
  pools on their way out of any device but the TUN.

Why a table of our own per ruleset, replaced whole: nothing else on the host (firewalld, a
distribution's ``nftables.conf``, docker) owns it or has to be merged with, and a table is
the unit nftables can swap atomically. Every ruleset starts with ``add table`` (a no-op when
it exists), ``delete table`` (which now cannot fail), ``add table``, then the chains and
rules; libnftables sends one JSON document as one netlink batch, which the kernel commits
whole or not at all. A client that restarts after being killed therefore replaces the old
kill switch with the new one without a moment in which neither is in force, and a ruleset
that fails to load leaves the old one untouched.

Why JSON objects and not ``nft`` text: nothing is parsed or quoted, so a device name is a
value, never syntax. One exception survives in the JSON syntax: an interface name ending in
``*`` is a wildcard, and ``\\`` escapes; :func:`kill_switch` and :func:`masquerade` refuse
such names (and the ``%d`` template, which names no device yet) instead of matching more
devices than the one the daemon owns.

Pure: builds dictionaries, sends nothing. :mod:`tunnel.daemon.nft` runs them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from ipaddress import IPv4Network, collapse_addresses
from typing import Any

__all__ = [
    "KILL_SWITCH",
    "MASQUERADE",
    "delete_table",
    "kill_switch",
    "masquerade",
    "table_name",
]

#: ``kind`` of :func:`table_name` for the client's kill switch (family ``inet``).
KILL_SWITCH = "killswitch"
#: ``kind`` of :func:`table_name` for the server's masquerade (family ``ip``).
MASQUERADE = "masquerade"

_TABLE_PREFIX = "tunnel"
_KIND_RE = re.compile(r"[a-z][a-z0-9]*")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_]")
_IFNAMSIZ = 16  # Linux interface names are at most 15 bytes plus NUL
_MAX_MARK = 0xFFFF_FFFF
#: The hook priority nftables calls ``srcnat``.
_SRCNAT_PRIORITY = 100
# Dynamic ports are not involved: these are the well-known ports of the protocols.
_DHCP4_CLIENT, _DHCP4_SERVER = 68, 67
_DHCP6_CLIENT, _DHCP6_SERVER = 546, 547
_NEIGHBOUR_DISCOVERY = ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit"]


def table_name(kind: str, tun_name: str) -> str:
    """``tunnel_<kind>_<tun_name>``, e.g. ``tunnel_killswitch_tun0``.

    The result is always ``[A-Za-z][A-Za-z0-9_]*``. A TUN name with other characters
    (``wg-home``, ``tun.0``, anything beyond ASCII) has each of them replaced by ``_`` and
    gets the first 8 hex digits of the SHA-256 of the original name appended (``wg-home`` ->
    ``wg_home_<8 hex>``), so that ``tun-0`` and ``tun.0`` never share, and clobber, one table.
    Raises ValueError for a ``kind`` that is not lower-case letters and digits, or a name that
    is not an interface name (empty, or longer than 15 bytes).
    """
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"table kind {kind!r} must be lower-case letters and digits")
    encoded = tun_name.encode("utf-8", "surrogatepass")
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise ValueError(f"{tun_name!r} is not an interface name (1 to 15 bytes)")
    safe = _UNSAFE_RE.sub("_", tun_name)
    if safe != tun_name:
        safe = f"{safe}_{hashlib.sha256(encoded).hexdigest()[:8]}"
    return f"{_TABLE_PREFIX}_{kind}_{safe}"


def _device(tun_name: str) -> str:
    """``tun_name`` as the literal an ``oifname`` match compares with; ValueError for a name
    that nftables would read as a pattern, or a template that names no device yet."""
    table_name(KILL_SWITCH, tun_name)  # the same length and emptiness rules
    if "%" in tun_name:
        raise ValueError(
            f"{tun_name!r} is a template (%d): rules must name the device, so it needs a fixed name"
        )
    if tun_name.endswith("*") or "\\" in tun_name:
        raise ValueError(f"{tun_name!r}: nftables reads a trailing '*' and '\\' as a pattern")
    return tun_name


def _replace_table(family: str, table: str) -> list[dict[str, Any]]:
    """The atomic-replace preamble: the table exists, is emptied by going, and comes back."""
    spec = {"family": family, "name": table}
    return [
        {"add": {"table": dict(spec)}},
        {"delete": {"table": dict(spec)}},
        {"add": {"table": dict(spec)}},
    ]


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _base_chain(
    family: str, table: str, name: str, kind: str, hook: str, prio: int, policy: str
) -> dict[str, Any]:
    """The command adding a base chain: one bound to a netfilter hook, with its policy."""
    chain = {"family": family, "table": table, "name": name, "type": kind, "hook": hook}
    return {"add": {"chain": {**chain, "prio": prio, "policy": policy}}}


def _rule(family: str, table: str, chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": list(expr)}}}


_ACCEPT: dict[str, Any] = {"accept": None}


def kill_switch(table: str, *, tun_name: str, fwmark: int) -> dict[str, Any]:
    """Create or atomically replace the ``inet`` table ``table``: an output chain (priority 0,
    policy drop) that lets out only

    - ``oifname "lo"`` (everything local, including the ICMP errors the reject below sends);
    - ``oifname tun_name``, by name: the device does not exist while the client is down or
      killed, and the next one it creates gets the same name (an index would go stale);
    - ``meta mark fwmark``: the client's QUIC sockets (SO_MARK needs CAP_NET_ADMIN, so an
      application cannot forge its way out);
    - IPv6 neighbour and router solicitation and neighbour advertisements, so that an IPv6
      underlay keeps resolving the gateway for the marked packets (ARP is not IP and never
      passes an ``inet`` hook);
    - DHCPv4 (udp 68 -> 67) and DHCPv6 (udp 546 -> 547), so the host keeps its lease;

    and rejects the rest. There is deliberately no ``ct state established,related accept``:
    a connection opened before the switch went on must stop with it, not keep leaking.

    ValueError for a ``fwmark`` outside 1..2**32-1 (0 is what every unmarked packet carries:
    accepting it would accept everything) or a ``tun_name`` nftables would read as a pattern.
    """
    device = _device(tun_name)
    if not 0 < fwmark <= _MAX_MARK:
        raise ValueError(f"fwmark {fwmark:#x} must be between 1 and {_MAX_MARK:#x}")
    family, chain = "inet", "output"
    commands = _replace_table(family, table)
    commands.append(_base_chain(family, table, chain, "filter", "output", 0, "drop"))

    def rule(*expr: dict[str, Any]) -> None:
        commands.append(_rule(family, table, chain, *expr))

    rule(_match(_meta("oifname"), "lo"), _ACCEPT)
    rule(_match(_meta("oifname"), device), _ACCEPT)
    rule(_match(_meta("mark"), fwmark), _ACCEPT)
    rule(_match(_payload("icmpv6", "type"), {"set": list(_NEIGHBOUR_DISCOVERY)}), _ACCEPT)
    for nfproto, sport, dport in (
        ("ipv4", _DHCP4_CLIENT, _DHCP4_SERVER),
        ("ipv6", _DHCP6_CLIENT, _DHCP6_SERVER),
    ):
        rule(
            _match(_meta("nfproto"), nfproto),
            _match(_payload("udp", "sport"), sport),
            _match(_payload("udp", "dport"), dport),
            _ACCEPT,
        )
    # Reject, not drop: the application gets an error at once instead of a hang. For TCP a
    # reset, because Linux treats an ICMP error as soft on an established connection (it
    # only notes it and keeps retransmitting for many minutes), while a reset ends the
    # connection on the spot and makes a new connect() fail with ECONNREFUSED. Everything
    # else gets ICMP (or ICMPv6) administratively prohibited, which the sender's own socket
    # receives over lo: sendmsg() fails with EPERM, ping says "prohibited".
    rule(_match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}})
    rule({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
    return {"nftables": commands}


def masquerade(table: str, *, tun_name: str, pools: Sequence[IPv4Network]) -> dict[str, Any]:
    """Create or atomically replace the ``ip`` table ``table``: a nat chain at postrouting
    (priority srcnat) that masquerades packets from ``pools`` leaving by any device but
    ``tun_name``. Packets that go back into the TUN (one client to another) keep their source:
    the other client must see who is talking to it.

    Overlapping pools are merged; ValueError when there is none, or for a ``tun_name``
    nftables would read as a pattern.
    """
    device = _device(tun_name)
    networks = list(collapse_addresses(pools))
    if not networks:
        raise ValueError("masquerade needs at least one address pool")
    family, chain = "ip", "postrouting"
    commands = _replace_table(family, table)
    commands.append(
        _base_chain(family, table, chain, "nat", "postrouting", _SRCNAT_PRIORITY, "accept")
    )
    for network in networks:
        prefix = {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
        commands.append(
            _rule(
                family,
                table,
                chain,
                _match(_payload("ip", "saddr"), prefix),
                _match(_meta("oifname"), device, op="!="),
                {"masquerade": None},
            )
        )
    return {"nftables": commands}


def delete_table(family: str, table: str) -> dict[str, Any]:
    """Delete the table; fails with "No such file or directory" when it is not there (which the
    caller treats as done: libnftables 1.0.6 has no ``destroy``)."""
    return {"nftables": [{"delete": {"table": {"family": family, "name": table}}}]}
