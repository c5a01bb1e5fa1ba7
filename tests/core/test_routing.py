"""Tests for tunnel.core.routing: one owner per address, both directions in one lookup."""

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.routing import RouteTable

A4 = IPv4Address("10.78.0.2").packed
A6 = IPv6Address("fd78::2").packed
B4 = IPv4Address("10.78.0.3").packed
B6 = IPv6Address("fd78::3").packed
OTHER = IPv4Address("192.0.2.1").packed


class Session:
    """An owner as the server's are: hashable, compared by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_destination_and_source_lookups():
    table: RouteTable[Session] = RouteTable()
    a, b = Session("a"), Session("b")
    assert table.add(a, [A4, A6]) == []
    assert table.add(b, [B4, B6]) == []
    assert table.owner_of(A4) is a and table.owner_of(A6) is a
    assert table.owner_of(B6) is b
    assert table.owner_of(OTHER) is None
    assert table.allows_source(a, A4) and table.allows_source(a, A6)
    assert not table.allows_source(a, B4)  # another client's address: spoofed
    assert not table.allows_source(a, OTHER)  # nobody's
    assert table.addresses_of(a) == {A4, A6}


def test_remove_forgets_every_address_of_its_owner_only():
    table: RouteTable[Session] = RouteTable()
    a, b = Session("a"), Session("b")
    table.add(a, [A4, A6])
    table.add(b, [B4])
    table.remove(a)
    assert table.owner_of(A4) is None and table.owner_of(A6) is None
    assert table.owner_of(B4) is b
    assert table.addresses_of(a) == frozenset()
    table.remove(a)  # again: nothing
    table.remove(Session("never added"))
    assert dict(table) == {B4: b}


def test_a_second_owner_takes_an_address_over_and_the_first_keeps_the_rest():
    table: RouteTable[Session] = RouteTable()
    old, new = Session("old"), Session("new")
    table.add(old, [A4, A6, B4])
    # The same client and device came back: the displaced session is named once.
    assert table.add(new, [A4, A6]) == [old]
    assert table.owner_of(A4) is new and table.owner_of(A6) is new
    assert not table.allows_source(old, A4)
    assert table.addresses_of(old) == {B4}
    # The old session ending later takes none of its successor's routes with it.
    table.remove(old)
    assert dict(table) == {A4: new, A6: new}


def test_displaced_owners_come_in_order_each_once():
    table: RouteTable[Session] = RouteTable()
    a, b, c = Session("a"), Session("b"), Session("c")
    table.add(a, [A4, A6])
    table.add(b, [B4, B6])
    assert table.add(c, [B4, A4, B6, A6]) == [b, a]
    assert table.addresses_of(a) == table.addresses_of(b) == frozenset()
    assert set(table.values()) == {c}


def test_adding_again_extends_and_never_displaces_the_owner_itself():
    table: RouteTable[Session] = RouteTable()
    a = Session("a")
    assert table.add(a, [A4]) == []
    assert table.add(a, [A4, A6]) == []
    assert table.addresses_of(a) == {A4, A6}
    assert table.add(a, []) == []
    assert table.add(Session("empty"), []) == []
    assert len(table) == 2


def test_the_table_reads_as_a_mapping():
    table: RouteTable[Session] = RouteTable()
    a = Session("a")
    table.add(a, [A4, A6])
    assert len(table) == 2
    assert set(table) == {A4, A6}
    assert A4 in table and OTHER not in table
    assert table[A6] is a
    assert a in table.values()
    with pytest.raises(KeyError):
        table[OTHER]
    assert repr(table) == "<RouteTable addresses=2 owners=1>"


ADDRESSES = [A4, A6, B4, B6, OTHER]
operations = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove"]),
        st.integers(0, 3),
        st.lists(st.sampled_from(ADDRESSES), max_size=4),
    ),
    max_size=30,
)


@given(operations)
def test_matches_the_servers_former_dict_and_own_sources(ops):
    """The reference: what the server did before the table, a dict of routes plus each
    session's own addresses (attach: take every address, closing whoever had it; detach:
    drop the routes still pointing at the session)."""
    owners = [Session(str(i)) for i in range(4)]
    table: RouteTable[Session] = RouteTable()
    routes: dict[bytes, Session] = {}
    own: dict[Session, set[bytes]] = {o: set() for o in owners}
    for op, index, addresses in ops:
        owner = owners[index]
        if op == "add":
            expected = []
            for address in addresses:
                previous = routes.get(address)
                if previous is not None and previous is not owner and previous not in expected:
                    expected.append(previous)
                routes[address] = owner
            own[owner] |= set(addresses)
            assert table.add(owner, addresses) == expected
        else:
            for address in own[owner]:
                if routes.get(address) is owner:
                    del routes[address]
            own[owner] = set()
            table.remove(owner)
        assert dict(table) == routes
        for o in owners:
            assert table.addresses_of(o) == {a for a, x in routes.items() if x is o}
            for address in ADDRESSES:
                assert table.allows_source(o, address) == (routes.get(address) is o)
                assert (table.owner_of(address) is o) == table.allows_source(o, address)
