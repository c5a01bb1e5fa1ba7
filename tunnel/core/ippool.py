"""IPv4/IPv6 address pools with sticky leases.

The server holds one address of the network (``server_ip``, by default the first host
address); clients get the others, starting just above the server address and wrapping round to
the bottom of the network. The network address, the IPv4 broadcast address and the server
address are never handed out.

A pool never enumerates its network (an IPv6 /64 holds 2**64 addresses): it keeps a cursor
over the never-used addresses and an ordered free list of released ones. Released addresses
are reused first, oldest release first, except that an owner coming back gets its previous
address again while nobody else has taken it.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable

from tunnel.errors import ConfigError, PoolExhausted

__all__ = ["AddressPool"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The smallest pools that still leave one client address: IPv4 /30 (network, server, client,
# broadcast) and IPv6 /126 (no broadcast in IPv6, so two clients).
_MAX_PREFIX = {4: 30, 6: 126}


class AddressPool:
    """Addresses of ``network`` for clients, handed out to hashable owners.

    ``server_ip`` defaults to the network address + 1. ``key`` is the configuration key that
    names the network in error messages (``network``, ``network6``...); ``server_key`` names the
    server address and defaults to ``key`` with "network" replaced by "server_ip".

    Raises :class:`tunnel.errors.ConfigError` if the network is too small (IPv4 prefix above
    30, IPv6 prefix above 126) or ``server_ip`` is of the wrong version, outside the network,
    the network address or the IPv4 broadcast address.
    """

    def __init__(
        self,
        network: IPNetwork,
        server_ip: IPAddress | None = None,
        *,
        key: str = "network",
        server_key: str | None = None,
    ) -> None:
        if server_key is None:
            server_key = key.replace("network", "server_ip") if "network" in key else "server_ip"
        if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise ConfigError(f"{key}: expected an IP network, got {type(network).__name__}")
        max_prefix = _MAX_PREFIX[network.version]
        if network.prefixlen > max_prefix:
            raise ConfigError(
                f"{key}: {network} is too small for a pool "
                f"(the prefix length must be at most {max_prefix})"
            )
        network_int = int(network.network_address)
        self._first = network_int + 1
        # IPv6 has no broadcast address: its last address is an ordinary host.
        self._last = int(network.broadcast_address) - (1 if network.version == 4 else 0)

        if server_ip is None:
            server_int = self._first
        else:
            if not isinstance(server_ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise ConfigError(
                    f"{server_key}: expected an IP address, got {type(server_ip).__name__}"
                )
            if server_ip.version != network.version:
                raise ConfigError(
                    f"{server_key}: {server_ip} is not an IPv{network.version} address "
                    f"like {key} {network}"
                )
            if server_ip not in network:
                raise ConfigError(f"{server_key}: {server_ip} is outside {key} {network}")
            server_int = int(server_ip)
            if server_int == network_int:
                raise ConfigError(
                    f"{server_key}: {server_ip} is the network address of {key} {network}"
                )
            if server_int > self._last:
                raise ConfigError(
                    f"{server_key}: {server_ip} is the broadcast address of {key} {network}"
                )

        self._network = network
        self._server_int = server_int
        self._address_class = type(network.network_address)
        self._server_ip: IPAddress = self._address_class(server_int)
        self._hosts = self._last - self._first + 1
        self._capacity = self._hosts - 1
        # Fresh addresses are numbered 0.._capacity-1 in hand-out order; _cursor is the next.
        self._cursor = 0
        self._by_owner: dict[Hashable, int] = {}
        self._by_address: dict[int, Hashable] = {}
        # Released, not yet reused addresses, oldest release first, each with the owner
        # that released it; and the reverse map for sticky re-allocation. Forgetting an owner
        # when its old address goes to someone else keeps both bounded by the peak number of
        # leases.
        self._free: OrderedDict[int, Hashable] = OrderedDict()
        self._released_by_owner: dict[Hashable, int] = {}

    @property
    def network(self) -> IPNetwork:
        """The pool's network."""
        return self._network

    @property
    def server_ip(self) -> IPAddress:
        """The server's own address, never handed to a client."""
        return self._server_ip

    @property
    def capacity(self) -> int:
        """How many client addresses the pool holds (2**64 - 2 for an IPv6 /64)."""
        return self._capacity

    def __len__(self) -> int:
        """The number of addresses currently allocated."""
        return len(self._by_owner)

    def __repr__(self) -> str:
        return (
            f"<AddressPool {self._network} server {self._server_ip}: "
            f"{len(self._by_owner)} of {self._capacity} allocated>"
        )

    def _fresh(self, index: int) -> int:
        # Hand-out order: server+1 upward to the last host, then wrap to the first host.
        return self._first + (self._server_int - self._first + 1 + index) % self._hosts

    def allocate(self, owner: Hashable) -> IPAddress:
        """Return the address leased to ``owner``, leasing one if it holds none.

        An owner that holds an address gets the same one again. An owner that released an
        address still free gets that one back; otherwise released addresses are reused, oldest
        release first, then never-used ones. Raises :class:`tunnel.errors.PoolExhausted` when
        no address is left.
        """
        address = self._by_owner.get(owner)
        if address is not None:
            return self._address_class(address)
        previous = self._released_by_owner.pop(owner, None)
        if previous is not None:
            del self._free[previous]
            address = previous
        elif self._free:
            address, previous_owner = self._free.popitem(last=False)
            del self._released_by_owner[previous_owner]
        elif self._cursor < self._capacity:
            address = self._fresh(self._cursor)
            self._cursor += 1
        else:
            raise PoolExhausted("address pool exhausted")
        self._by_owner[owner] = address
        self._by_address[address] = owner
        return self._address_class(address)

    def release(self, owner: Hashable) -> None:
        """Give back ``owner``'s address; nothing happens if it holds none."""
        address = self._by_owner.pop(owner, None)
        if address is None:
            return
        del self._by_address[address]
        self._free[address] = owner
        self._released_by_owner[owner] = address

    def address_of(self, owner: Hashable) -> IPAddress | None:
        """The address ``owner`` holds, or None."""
        address = self._by_owner.get(owner)
        return None if address is None else self._address_class(address)

    def owner_of(self, address: IPAddress) -> Hashable | None:
        """The owner holding ``address``, or None (also for an address of the other IP
        version)."""
        if not isinstance(address, self._address_class):
            return None
        return self._by_address.get(int(address))
