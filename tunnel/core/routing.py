"""Which owner (a client's session) holds a tunnel address: the routing and anti-spoofing table.

One table answers the two questions a packet asks, each with one dictionary lookup, the way
wireguard-go's allowed-IPs table does (cryptokey routing):

* a packet from the TUN device goes to the owner of its *destination* address
  (:attr:`RouteTable.owner_of`, ``None``: nobody here);
* a packet from a client goes on only if its *source* address is owned by that very client
  (:meth:`RouteTable.allows_source`, or ``owner_of(source) is sender`` on the hot path): a
  client may send from its own leased addresses and from nothing else.

Addresses are packed single addresses (4 or 16 ``bytes``, as :mod:`tunnel.core.ippacket`
returns them). A lease is a handful of host addresses, not prefixes, so an exact-match ``dict``
does what wireguard-go's trie does, in one C-level lookup. Owners are any hashable objects
compared by identity; the table never calls them.

An address has at most one owner. A second owner takes it over: :meth:`RouteTable.add`
returns the owners it displaced, and the caller decides what becomes of them (the server
closes them: the same client and device came back before its old session was seen to die).
:meth:`RouteTable.remove` gives up only what the owner still holds, so a displaced owner
going away later cannot take its successor's routes with it.

The table is a read-only ``Mapping`` from address to owner for everything else (status,
tests); only :meth:`add` and :meth:`remove` change it. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TypeVar

__all__ = ["RouteTable"]

Owner = TypeVar("Owner", bound=Hashable)


class RouteTable(Mapping[bytes, Owner]):
    """Tunnel address (packed) -> owner, and owner -> the addresses it holds."""

    __slots__ = ("_owner", "_addresses", "owner_of")

    def __init__(self) -> None:
        self._owner: dict[bytes, Owner] = {}
        self._addresses: dict[Owner, set[bytes]] = {}
        self.owner_of: Callable[[bytes], Owner | None] = self._owner.get
        """The owner of ``address``, or ``None``. The hot path's lookup: the dictionary's own
        bound ``get``, so a packet pays one C call and no Python frame."""

    def add(self, owner: Owner, addresses: Iterable[bytes]) -> list[Owner]:
        """Give ``addresses`` to ``owner`` (added to what it already holds). Returns the other
        owners that held any of them, each once, in the order they were displaced; they keep
        whatever else they hold."""
        displaced: list[Owner] = []
        held = self._addresses.setdefault(owner, set())
        for address in addresses:
            previous = self._owner.get(address)
            if previous is not None and previous is not owner:
                left = self._addresses[previous]
                left.discard(address)
                if not left:
                    del self._addresses[previous]
                if previous not in displaced:
                    displaced.append(previous)
            self._owner[address] = owner
            held.add(address)
        if not held:
            del self._addresses[owner]
        return displaced

    def remove(self, owner: Owner) -> None:
        """Forget every address ``owner`` still holds (none: nothing happens)."""
        for address in self._addresses.pop(owner, ()):
            del self._owner[address]

    def allows_source(self, owner: Owner, address: bytes) -> bool:
        """May ``owner`` send packets from ``address``? Only if it holds it."""
        return self._owner.get(address) is owner

    def addresses_of(self, owner: Owner) -> frozenset[bytes]:
        """The addresses ``owner`` holds now (empty for an owner the table does not know)."""
        return frozenset(self._addresses.get(owner, ()))

    # -- Mapping -------------------------------------------------------------------------------

    def __getitem__(self, address: bytes) -> Owner:
        return self._owner[address]

    def __contains__(self, address: object) -> bool:
        return address in self._owner

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __repr__(self) -> str:
        return f"<RouteTable addresses={len(self._owner)} owners={len(self._addresses)}>"
