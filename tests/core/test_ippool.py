from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from tunnel.core.ippool import AddressPool
from tunnel.errors import ConfigError, PoolExhausted, TunnelError


def _all(pool):
    """Allocate until exhaustion; return the addresses in hand-out order."""
    addresses = []
    with pytest.raises(PoolExhausted, match="address pool exhausted"):
        for i in range(pool.capacity + 1):
            addresses.append(pool.allocate(i))
    return addresses


# --- construction -----------------------------------------------------------------------------


def test_defaults_ipv4():
    pool = AddressPool(IPv4Network("10.8.0.0/24"))
    assert pool.network == IPv4Network("10.8.0.0/24")
    assert pool.server_ip == IPv4Address("10.8.0.1")
    assert pool.capacity == 253
    assert len(pool) == 0


def test_defaults_ipv6():
    pool = AddressPool(IPv6Network("fd00::/64"))
    assert pool.server_ip == IPv6Address("fd00::1")
    assert pool.capacity == 2**64 - 2
    assert pool.allocate("a") == IPv6Address("fd00::2")


@pytest.mark.parametrize(
    ("network", "server_ip", "key", "message"),
    [
        ("10.0.0.0/31", None, "network", "network: 10.0.0.0/31 is too small"),
        ("10.0.0.1/32", None, "network", "network: 10.0.0.1/32 is too small"),
        ("fd00::/127", None, "network6", "network6: fd00::/127 is too small"),
        ("fd00::/128", None, "network6", "network6: fd00::/128 is too small"),
        ("10.0.0.0/24", "10.0.1.1", "network", "server_ip: 10.0.1.1 is outside network"),
        ("10.0.0.0/24", "10.0.0.0", "network", "server_ip: 10.0.0.0 is the network address"),
        ("10.0.0.0/24", "10.0.0.255", "network", "server_ip: 10.0.0.255 is the broadcast"),
        ("fd00::/64", "fd00:0:0:1::1", "network6", "server_ip6: fd00:0:0:1::1 is outside"),
        ("fd00::/64", "fd00::", "network6", "server_ip6: fd00:: is the network address"),
        ("10.0.0.0/24", "fd00::1", "network", "server_ip: fd00::1 is not an IPv4 address"),
        ("fd00::/64", "10.0.0.1", "network6", "server_ip6: 10.0.0.1 is not an IPv6 address"),
    ],
)
def test_config_errors(network, server_ip, key, message):
    server = None if server_ip is None else ip_address(server_ip)
    with pytest.raises(ConfigError) as info:
        AddressPool(ip_network(network), server, key=key)
    assert str(info.value).startswith(message)


def test_explicit_server_key():
    with pytest.raises(ConfigError, match=r"^server\.address: "):
        AddressPool(
            IPv4Network("10.0.0.0/24"), IPv4Address("10.0.0.0"), server_key="server.address"
        )


def test_pool_exhausted_is_temporary_not_config():
    assert issubclass(PoolExhausted, TunnelError)
    assert not issubclass(PoolExhausted, ConfigError)


# --- hand-out order ---------------------------------------------------------------------------


def test_smallest_ipv4_pool():
    pool = AddressPool(IPv4Network("10.0.0.0/30"))
    assert pool.capacity == 1
    assert _all(pool) == [IPv4Address("10.0.0.2")]


def test_smallest_ipv6_pool_uses_the_last_address():
    pool = AddressPool(IPv6Network("fd00::/126"))
    assert pool.capacity == 2
    assert _all(pool) == [IPv6Address("fd00::2"), IPv6Address("fd00::3")]


def test_ipv4_order_skips_network_server_broadcast():
    pool = AddressPool(IPv4Network("10.0.0.0/29"))
    assert _all(pool) == [IPv4Address(f"10.0.0.{i}") for i in range(2, 7)]


def test_order_wraps_when_server_is_not_first():
    pool = AddressPool(IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.4"))
    assert _all(pool) == [IPv4Address(f"10.0.0.{i}") for i in (5, 6, 1, 2, 3)]


def test_server_on_last_host():
    pool = AddressPool(IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.6"))
    assert _all(pool) == [IPv4Address(f"10.0.0.{i}") for i in (1, 2, 3, 4, 5)]


def test_ipv6_server_on_last_address():
    pool = AddressPool(IPv6Network("fd00::/125"), IPv6Address("fd00::7"))
    assert _all(pool) == [IPv6Address(f"fd00::{i}") for i in range(1, 7)]


def test_huge_ipv6_pool_does_not_enumerate():
    pool = AddressPool(IPv6Network("fd00::/64"), IPv6Address("fd00::ffff:ffff:ffff:fffe"))
    assert pool.allocate(1) == IPv6Address("fd00::ffff:ffff:ffff:ffff")
    assert pool.allocate(2) == IPv6Address("fd00::1")
    assert pool.allocate(3) == IPv6Address("fd00::2")
    big = AddressPool(IPv6Network("fd00::/8"))
    assert big.capacity == 2**120 - 2
    assert big.allocate("x") == IPv6Address("fd00::2")


# --- leases -----------------------------------------------------------------------------------


def test_same_owner_gets_same_address():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a = pool.allocate(("client", 1))
    assert pool.allocate(("client", 1)) == a
    assert len(pool) == 1
    assert pool.address_of(("client", 1)) == a
    assert pool.owner_of(a) == ("client", 1)


def test_unknown_lookups():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    assert pool.address_of("nobody") is None
    assert pool.owner_of(IPv4Address("10.0.0.2")) is None
    assert pool.owner_of(pool.server_ip) is None
    pool.allocate("a")
    assert pool.owner_of(IPv6Address("::a00:2")) is None


def test_release_is_idempotent():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a = pool.allocate("a")
    pool.release("a")
    pool.release("a")
    pool.release("never")
    assert len(pool) == 0
    assert pool.address_of("a") is None
    assert pool.owner_of(a) is None


def test_sticky_address_after_release():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a = pool.allocate("a")
    b = pool.allocate("b")
    pool.release("a")
    pool.release("b")
    # "b" comes back first but still gets its own address, not the oldest released one.
    assert pool.allocate("b") == b
    assert pool.allocate("a") == a


def test_released_addresses_are_reused_oldest_first():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a, b, c = (pool.allocate(x) for x in "abc")
    pool.release("b")
    pool.release("a")
    assert pool.allocate("new1") == b
    assert pool.allocate("new2") == a
    assert pool.allocate("new3") == IPv4Address("10.0.0.5")
    assert pool.address_of("c") == c


def test_sticky_lost_once_someone_else_took_the_address():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a = pool.allocate("a")
    pool.release("a")
    assert pool.allocate("b") == a
    pool.allocate("c")
    assert pool.allocate("a") == IPv4Address("10.0.0.4")


def test_sticky_survives_after_the_other_owner_released_again():
    pool = AddressPool(IPv4Network("10.0.0.0/24"))
    a = pool.allocate("a")
    pool.release("a")
    assert pool.allocate("b") == a
    pool.release("b")
    # The address is free again, but it was last "b"'s: "a" gets the oldest free one, which
    # is that same address, and "b" then gets a fresh one.
    assert pool.allocate("a") == a
    assert pool.allocate("b") == IPv4Address("10.0.0.3")


def test_exhaustion_then_release_frees_one():
    pool = AddressPool(IPv4Network("10.0.0.0/29"))
    addresses = _all(pool)
    assert len(pool) == pool.capacity == 5
    pool.release(2)
    assert pool.allocate("late") == addresses[2]
    with pytest.raises(PoolExhausted):
        pool.allocate("later")
    # an owner holding an address still gets it on a full pool
    assert pool.allocate(0) == addresses[0]


def test_release_memory_stays_bounded():
    # Many short-lived owners must not grow the pool's memory without bound.
    pool = AddressPool(IPv6Network("fd00::/64"))
    for owner in range(1000):
        pool.allocate(owner)
        pool.release(owner)
    assert len(pool._free) == 1
    assert len(pool._released_by_owner) == 1


# --- properties -------------------------------------------------------------------------------

NETWORKS = [
    (IPv4Network("10.0.0.0/30"), None),
    (IPv4Network("10.0.0.0/29"), None),
    (IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.4")),
    (IPv4Network("10.0.0.0/29"), IPv4Address("10.0.0.6")),
    (IPv4Network("192.168.7.0/28"), IPv4Address("192.168.7.9")),
    (IPv6Network("fd00::/126"), None),
    (IPv6Network("fd00::/125"), IPv6Address("fd00::7")),
    (IPv6Network("fd00::/125"), IPv6Address("fd00::3")),
    (IPv6Network("fd00::/64"), None),
]


class PoolMachine(RuleBasedStateMachine):
    """Random allocate/release sequences against a model of who holds what."""

    owners = Bundle("owners")

    @initialize(choice=st.sampled_from(NETWORKS))
    def make_pool(self, choice):
        network, server_ip = choice
        self.pool = AddressPool(network, server_ip)
        self.held = {}
        self.last = {}
        self.ever_handed_out = set()
        self.peak = 0

    @rule(target=owners, owner=st.tuples(st.binary(max_size=2), st.integers(0, 3)))
    def new_owner(self, owner):
        return owner

    @rule(owner=owners)
    def allocate(self, owner):
        before = self.held.get(owner)
        free_sticky = self.last.get(owner)
        if free_sticky is not None and free_sticky in self.held.values():
            free_sticky = None
        try:
            address = self.pool.allocate(owner)
        except PoolExhausted:
            assert before is None
            assert len(self.held) == self.pool.capacity
            return
        if before is not None:
            assert address == before
        elif free_sticky is not None:
            assert address == free_sticky
        assert address not in [a for o, a in self.held.items() if o != owner]
        self.held[owner] = address
        # Whoever had this address before loses its claim to it.
        self.last = {o: a for o, a in self.last.items() if a != address}
        self.last[owner] = address
        self.ever_handed_out.add(address)
        self.peak = max(self.peak, len(self.held))

    @rule(owner=owners)
    def release(self, owner):
        self.pool.release(owner)
        self.held.pop(owner, None)

    @rule(owner=consumes(owners))
    def release_and_forget(self, owner):
        self.release(owner)

    @invariant()
    def consistent(self):
        pool = self.pool
        network = pool.network
        assert len(pool) == len(self.held)
        addresses = list(self.held.values())
        assert len(set(addresses)) == len(addresses)
        for owner, address in self.held.items():
            assert pool.address_of(owner) == address
            assert pool.owner_of(address) == owner
            assert address in network
            assert address != network.network_address
            assert address != pool.server_ip
            if network.version == 4:
                assert address != network.broadcast_address

    @invariant()
    def reuse_before_fresh(self):
        # Released addresses are reused before fresh ones: the pool never touched more
        # addresses than the most owners it ever served at once.
        assert len(self.ever_handed_out) == self.peak


PoolMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_pool_machine = PoolMachine.TestCase


@given(
    st.sampled_from(NETWORKS),
    st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60),
)
def test_allocate_release_round_trip(choice, operations):
    network, server_ip = choice
    pool = AddressPool(network, server_ip)
    for allocate, owner in operations:
        if allocate:
            try:
                pool.allocate(owner)
            except PoolExhausted:
                assert len(pool) == pool.capacity
        else:
            pool.release(owner)
    held = {owner: pool.address_of(owner) for owner in range(10)}
    held = {o: a for o, a in held.items() if a is not None}
    for owner in held:
        pool.release(owner)
    assert len(pool) == 0
    # everyone gets their old address back, whatever the order
    for owner in sorted(held, reverse=True):
        assert pool.allocate(owner) == held[owner]
