"""Which route of the main table the kernel would take to an address, leaving ours aside.

A full-tunnel client keeps one host route to its server outside the tunnel. To follow the
underlay when it changes (a new gateway, another interface), it must ask "how would the
kernel get there without the routes we added?": a ``route get`` answers with our own host
route. This picks among the routes of the table as the kernel does for one table: longest
prefix first, then the lowest metric.

Pure: the shell hands in the table's routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import attrs


@attrs.frozen
class Route:
    """One unicast route: where to, through which gateway (None: on-link) and interface."""

    network: IPv4Network | IPv6Network
    gateway: str | None
    oif: int | None
    metric: int = 0


def best_route(
    routes: Iterable[Route],
    address: IPv4Address | IPv6Address,
    *,
    avoid_oif: int | None = None,
    avoid: Route | None = None,
) -> Route | None:
    """The route the kernel would choose for ``address``, ignoring routes through
    ``avoid_oif`` (our TUN device) and the route ``avoid`` (our own host route, whatever
    metric the kernel gave it); None if nothing but those leads there."""
    best: Route | None = None
    for route in routes:
        if route.network.version != address.version or address not in route.network:
            continue
        if route.oif is not None and route.oif == avoid_oif:
            continue
        if avoid is not None and (route.network, route.gateway, route.oif) == (
            avoid.network,
            avoid.gateway,
            avoid.oif,
        ):
            continue
        if best is None or (route.network.prefixlen, -route.metric) > (
            best.network.prefixlen,
            -best.metric,
        ):
            best = route
    return best
