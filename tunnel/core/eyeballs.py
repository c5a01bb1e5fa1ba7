"""Happy Eyeballs policy (RFC 8305): which server address to try in which order, and how long
to give one attempt before starting the next. Pure: the racer in
:mod:`tunnel.daemon.connector` does the waiting.

Addresses are ``(family, sockaddr)`` pairs as ``getaddrinfo`` gives them. The family number is
only used to group addresses; whether a group is IPv6 is read from its socket addresses (an
IPv6 host always contains ``:``), so this module needs no ``socket`` constants.

History (RFC 8305 section 4 allows it): the address that won the last race can be passed as
``prefer``; it goes first and its family leads the interleaving. A dead favourite costs one
attempt delay before the others start, never more.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

__all__ = [
    "DEFAULT_ATTEMPT_DELAY_S",
    "MAX_ATTEMPT_DELAY_S",
    "MIN_ATTEMPT_DELAY_S",
    "attempt_delay",
    "is_ipv6",
    "order_addresses",
]

Address = tuple[int, Any]
"""``(family, sockaddr)``, as in the first and last fields of a ``getaddrinfo`` entry."""

DEFAULT_ATTEMPT_DELAY_S = 0.25
"""Connection Attempt Delay without RTT history (RFC 8305 section 5 recommends 250 ms)."""

MIN_ATTEMPT_DELAY_S = 0.1
"""Lower bound of the attempt delay (RFC 8305 section 5: recommended minimum 100 ms)."""

MAX_ATTEMPT_DELAY_S = 2.0
"""Upper bound of the attempt delay (RFC 8305 section 5: should not exceed 2 s)."""

# Our "connection" is the QUIC handshake plus the tunnel's auth round trip: about two RTTs.
_RTTS_PER_ATTEMPT = 2.0


def is_ipv6(address: Address) -> bool:
    """Is this ``(family, sockaddr)`` an IPv6 address?"""
    return ":" in str(address[1][0])


def order_addresses(infos: Iterable[Address], *, prefer: Address | None = None) -> list[Address]:
    """The order to try addresses in: duplicates dropped, families interleaved (RFC 8305
    section 4, First Address Family Count 1), each family keeping its own order.

    IPv6 leads when present, otherwise the family seen first. If ``prefer`` (say, last
    race's winner) is among ``infos``, it goes first and its family leads instead.
    """
    families: dict[Hashable, list[Address]] = {}
    seen: set[Address] = set()
    for family, sockaddr in infos:
        entry = (family, sockaddr)
        if entry in seen:
            continue
        seen.add(entry)
        families.setdefault(family, []).append(entry)
    if not families:
        return []
    groups = list(families.values())
    if prefer is not None and prefer in seen:
        lead = families[prefer[0]]
        lead.remove(prefer)
        lead.insert(0, prefer)
    else:
        lead = next((g for g in groups if is_ipv6(g[0])), groups[0])
    groups.remove(lead)
    groups.insert(0, lead)
    ordered: list[Address] = []
    for rank in range(max(len(g) for g in groups)):
        ordered.extend(g[rank] for g in groups if rank < len(g))
    return ordered


def attempt_delay(rtt: float | None = None) -> float:
    """Seconds to give one attempt before starting the next: the RFC's 250 ms without
    history; with a measured ``rtt`` (seconds, from the last session), about the time one
    attempt needs, kept within RFC 8305's 100 ms to 2 s."""
    if rtt is None or not math.isfinite(rtt) or rtt < 0:
        return DEFAULT_ATTEMPT_DELAY_S
    return min(max(rtt * _RTTS_PER_ATTEMPT, MIN_ATTEMPT_DELAY_S), MAX_ATTEMPT_DELAY_S)
