"""A full tunnel the wg-quick way: our own routing table, and rules that send everything there
except the client's own (marked) QUIC packets.

For each family whose default route goes through the tunnel::

    32764: from all lookup main suppress_prefixlength 0     # the LAN and other specific routes
    32765: not from all fwmark MARK lookup TABLE            # everything else: into the tunnel
    TABLE: default dev TUN

The QUIC sockets carry SO_MARK = MARK, so they skip our table and follow the main table's
default route, whichever gateway that is right now: a new gateway or interface needs nothing
from us, and no host route pins the server to the gateway seen at connect.

A family the tunnel does not carry but that would leak around a full tunnel of the other
(IPv6 beside ``routes = ["0.0.0.0/0"]``) gets the same rules with ``unreachable default`` in
our table: applications fail at once instead of talking in the clear.

Everything goes through :class:`HostChanges`, so it is undone with the rest on exit. Rules and
the unreachable route are not on the TUN device and outlive a killed client, so they are also
recorded in the state file first, and :meth:`PolicyRouting.recover` removes them on the next
start or ``tunnel client --cleanup``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from tunnel.daemon.netlink import FIB_RULE_INVERT, MAIN_TABLE, HostChanges
from tunnel.daemon.statefile import StateFile

log = logging.getLogger("tunnel.client")

STATE_KEY = "policy_routing"
SUPPRESS_PRIORITY = 32764
TABLE_PRIORITY = 32765
# Strict reverse-path filtering would look up the answers to our marked packets without the
# mark, find our table's route into the tunnel, and drop them; with this the mark counts.
SRC_VALID_MARK = "net.ipv4.conf.all.src_valid_mark"

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}


def rules_for(family: int, *, table: int, fwmark: int) -> list[dict[str, Any]]:
    """The two rules of one family (pyroute2 keywords), in the order they are added."""
    return [
        {"family": family, "priority": SUPPRESS_PRIORITY, "table": MAIN_TABLE,
         "suppress_prefixlen": 0},
        {"family": family, "priority": TABLE_PRIORITY, "table": table, "fwmark": fwmark,
         "flags": FIB_RULE_INVERT},
    ]  # fmt: skip


class PolicyRouting:
    """Installs the table and rules of a full tunnel through ``host``, recorded in ``state``."""

    def __init__(self, host: HostChanges, state: StateFile, *, table: int, fwmark: int) -> None:
        self.host = host
        self.state = state
        self.table = table
        self.fwmark = fwmark

    def install(self, tun_name: str, *, through: set[int], blocked: set[int]) -> None:
        """Default routes of the ``through`` families (4, 6) into ``tun_name``; the
        ``blocked`` families refused. Both get the rules."""
        families = sorted(through | blocked)
        if not families:
            return
        rules = [r for v in families for r in rules_for(_FAMILIES[v], table=self.table,
                                                         fwmark=self.fwmark)]  # fmt: skip
        record: dict[str, Any] = {"table": self.table, "rules": rules, "sysctl": {}}
        if 4 in families:
            record["sysctl"][SRC_VALID_MARK] = self.host.read_sysctl(SRC_VALID_MARK)
        self.state.put(STATE_KEY, record)  # before the first change, for a killed client
        if 4 in families:
            self.host.set_sysctl(SRC_VALID_MARK, "1")
        for version in families:
            if version in through:
                self.host.add_route(_DEFAULT[version], ifname=tun_name, table=self.table)
            else:
                self.host.add_route(_DEFAULT[version], table=self.table, unreachable=True)
        for rule in rules:
            self.host.add_rule(**rule)
        log.info(
            "full tunnel: table %d%s%s, everything but fwmark %#x",
            self.table,
            f", default via {tun_name} for IPv{'/IPv'.join(str(v) for v in sorted(through))}"
            if through
            else "",
            f", IPv{'/IPv'.join(str(v) for v in sorted(blocked))} refused outside the tunnel"
            if blocked
            else "",
            self.fwmark,
        )

    def forget(self) -> None:
        """After :meth:`HostChanges.undo` removed it all: nothing left to recover."""
        self.state.drop(STATE_KEY)


def recover(host: HostChanges, state: StateFile) -> bool:
    """Remove the rules, routes and sysctl changes a killed client left; True if it had."""
    record = state.get(STATE_KEY)
    if not isinstance(record, dict):
        return False
    removed = 0
    for rule in record.get("rules", []):
        if isinstance(rule, dict) and host.delete_rule(**rule):
            removed += 1
    table = record.get("table")
    if isinstance(table, int):
        for family in _FAMILIES.values():
            removed += host.flush_table(family, table)
    for name, value in (record.get("sysctl") or {}).items():
        if isinstance(name, str) and name == SRC_VALID_MARK and isinstance(value, str):
            host.write_sysctl(name, value)
    state.drop(STATE_KEY)
    log.warning("removed the policy routing a previous client left (%d rules and routes)", removed)
    return True
