"""Choosing the underlay's route to the server, our own routes left aside."""

from ipaddress import ip_address, ip_network

from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.underlay import Route, best_route

SERVER = ip_address("203.0.113.5")
DEFAULT = Route(ip_network("0.0.0.0/0"), "192.0.2.1", 2, 100)
OURS = Route(ip_network("203.0.113.5/32"), "192.0.2.1", 2, 0)
TUN_HALF = Route(ip_network("0.0.0.0/1"), None, 9)


def test_longest_prefix_wins_then_the_lowest_metric():
    lan = Route(ip_network("203.0.113.0/24"), None, 3, 600)
    lan_better = Route(ip_network("203.0.113.0/24"), None, 4, 100)
    assert best_route([DEFAULT, lan], SERVER) == lan
    assert best_route([DEFAULT, lan, lan_better], SERVER) == lan_better
    assert best_route([DEFAULT], ip_address("2001:db8::1")) is None


def test_our_tun_and_our_host_route_are_left_aside():
    moved = Route(ip_network("0.0.0.0/0"), "192.0.2.9", 5, 50)
    # Our host route is the longest match, whatever metric the kernel reports for it.
    reported = Route(OURS.network, OURS.gateway, OURS.oif, 1024)
    table = [DEFAULT, moved, reported, TUN_HALF]
    assert best_route(table, SERVER, avoid_oif=9, avoid=OURS) == moved
    assert best_route(table, SERVER, avoid_oif=9) == reported
    assert best_route([TUN_HALF], SERVER, avoid_oif=9) is None


routes = st.builds(
    Route,
    st.sampled_from(["0.0.0.0/0", "203.0.0.0/8", "203.0.113.0/24", "10.0.0.0/8"]).map(ip_network),
    st.sampled_from([None, "192.0.2.1", "192.0.2.2"]),
    st.integers(1, 4),
    st.integers(0, 1000),
)


@given(st.lists(routes, max_size=12), st.integers(1, 4))
def test_the_choice_covers_the_address_and_no_better_one_exists(table, avoid_oif):
    chosen = best_route(table, SERVER, avoid_oif=avoid_oif)
    usable = [r for r in table if SERVER in r.network and r.oif != avoid_oif]
    if chosen is None:
        assert not usable
        return
    assert chosen in usable
    assert all(
        (r.network.prefixlen, -r.metric) <= (chosen.network.prefixlen, -chosen.metric)
        for r in usable
    )
