"""Tests for tunnel.core.netchange: the decoder against pyroute2's encoder (an independent
implementation of the same layouts), hypothesis for robustness, and the coalescer and the
"does it matter" rules on hand-made changes."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLMSG_DONE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from tunnel.core.netchange import (
    LOST,
    NLMSG_OVERRUN,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    STATE_LIMIT,
    Coalescer,
    NetworkChange,
    decode_untrusted,
    dump_request,
    ends_dump,
    gains,
    matters,
)

AF_INET, AF_INET6, AF_BRIDGE = 2, 10, 7
IFF_UP, IFF_RUNNING = 0x1, 0x40
TENTATIVE, OPTIMISTIC = 0x40, 0x04
CLONED = 0x200


# --- encoding with pyroute2 -------------------------------------------------------------------


def link_msg(
    index: int, flags: int, name: str | None, *, kind: int = RTM_NEWLINK, family: int = 0
) -> bytes:
    msg = ifinfmsg()
    msg["header"]["type"] = kind
    msg["family"], msg["index"], msg["flags"] = family, index, flags
    msg["attrs"] = [("IFLA_IFNAME", name)] if name is not None else []
    msg.encode()
    return bytes(msg.data)


def addr_msg(
    address: str,
    prefixlen: int,
    index: int,
    *,
    kind: int = RTM_NEWADDR,
    label: str | None = None,
    flags: int = 0,
    flags_attr: int | None = None,
    local: str | None = None,
) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = kind
    msg["family"] = AF_INET6 if ":" in address else AF_INET
    msg["prefixlen"], msg["index"], msg["flags"] = prefixlen, index, flags
    attrs: list[tuple[str, object]] = [("IFA_ADDRESS", address)]
    if local is not None:
        attrs.append(("IFA_LOCAL", local))
    if label is not None:
        attrs.append(("IFA_LABEL", label))
    if flags_attr is not None:
        attrs.append(("IFA_FLAGS", flags_attr))
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def route_msg(
    family: int,
    dst: str | None,
    dst_len: int,
    *,
    kind: int = RTM_NEWROUTE,
    gateway: str | None = None,
    oif: int | None = None,
    table: int = RT_TABLE_MAIN,
    flags: int = 0,
) -> bytes:
    msg = rtmsg()
    msg["header"]["type"] = kind
    msg["family"], msg["dst_len"], msg["flags"] = family, dst_len, flags
    msg["table"] = min(table, 252)  # RT_TABLE_COMPAT, as the kernel sends for big ids
    attrs: list[tuple[str, object]] = [("RTA_TABLE", table)]
    if dst is not None:
        attrs.append(("RTA_DST", dst))
    if gateway is not None:
        attrs.append(("RTA_GATEWAY", gateway))
    if oif is not None:
        attrs.append(("RTA_OIF", oif))
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def header(length: int, msg_type: int) -> bytes:
    return struct.pack("=IHHII", length, msg_type, 0, 0, 0)


# --- decoding hand-picked messages ------------------------------------------------------------


def test_links_decode_with_their_usable_state():
    data = (
        link_msg(3, IFF_UP | IFF_RUNNING, "eth0")
        + link_msg(4, IFF_UP, "eth1")  # up but no carrier
        + link_msg(5, 0, "eth2", kind=RTM_DELLINK)
    )
    assert decode_untrusted(data) == [
        NetworkChange("link", True, 3, "eth0"),
        NetworkChange("link", False, 4, "eth1"),
        NetworkChange("link", False, 5, "eth2", "removed"),
    ]


def test_bridge_port_messages_are_not_link_changes():
    data = link_msg(3, 0, "eth0", kind=RTM_DELLINK, family=AF_BRIDGE)
    assert decode_untrusted(data) == []


def test_addresses_decode_with_prefix_label_and_local_end():
    data = (
        addr_msg("10.0.0.2", 24, 3, label="eth0")
        + addr_msg("fd00::2", 64, 3, kind=RTM_DELADDR)
        + addr_msg("10.9.0.1", 32, 4, local="10.9.0.2")  # point-to-point: IFA_LOCAL is ours
    )
    assert decode_untrusted(data) == [
        NetworkChange("address", True, 3, "eth0", "10.0.0.2/24"),
        NetworkChange("address", False, 3, None, "fd00::2/64"),
        NetworkChange("address", True, 4, None, "10.9.0.2/32"),
    ]


@pytest.mark.parametrize(
    ("kind", "flags", "flags_attr", "reported"),
    [
        (RTM_NEWADDR, TENTATIVE, None, False),
        (RTM_NEWADDR, 0, TENTATIVE, False),  # IFA_FLAGS overrides the 8-bit field
        (RTM_NEWADDR, TENTATIVE, 0, True),
        (RTM_NEWADDR, TENTATIVE | OPTIMISTIC, None, True),  # optimistic DAD: usable at once
        (RTM_DELADDR, TENTATIVE, None, True),
    ],
)
def test_an_address_in_duplicate_address_detection_is_not_news_yet(
    kind, flags, flags_attr, reported
):
    data = addr_msg("fd00::2", 64, 3, kind=kind, flags=flags, flags_attr=flags_attr)
    assert bool(decode_untrusted(data)) is reported


def test_routes_decode_with_destination_gateway_oif_and_table():
    data = (
        route_msg(AF_INET, None, 0, gateway="10.0.0.1", oif=3)
        + route_msg(AF_INET6, "fd00::", 64, kind=RTM_DELROUTE, oif=4, table=RT_TABLE_LOCAL)
        + route_msg(AF_INET, "10.8.0.0", 16, table=1000)
    )
    assert decode_untrusted(data) == [
        NetworkChange("route", True, 3, None, "0.0.0.0/0", "10.0.0.1", RT_TABLE_MAIN),
        NetworkChange("route", False, 4, None, "fd00::/64", None, RT_TABLE_LOCAL),
        NetworkChange("route", True, None, None, "10.8.0.0/16", None, 1000),
    ]


def test_cloned_routes_are_not_route_changes():
    assert decode_untrusted(route_msg(AF_INET6, "fd00::1", 128, oif=3, flags=CLONED)) == []


def test_control_messages_are_skipped_and_an_overrun_is_lost():
    done = header(20, NLMSG_DONE) + b"\0" * 4
    overrun = header(16, NLMSG_OVERRUN)
    assert decode_untrusted(done + link_msg(3, 0, "eth0")) == [
        NetworkChange("link", False, 3, "eth0")
    ]
    assert decode_untrusted(overrun) == [LOST]


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x02",  # shorter than a header
        header(8, RTM_NEWLINK),  # length smaller than the header
        header(100, RTM_NEWLINK),  # longer than the datagram
        header(20, RTM_NEWLINK) + b"\0" * 4,  # ifinfomsg cut short
        header(28, RTM_NEWADDR) + struct.pack("=BBBBI", AF_INET, 24, 0, 0, 3) + b"\x04\x00\x01\x00",
        header(28, RTM_NEWADDR) + struct.pack("=BBBBI", AF_INET, 24, 0, 0, 3) + b"\x40\x00\x01\x00",
        header(32, RTM_NEWADDR)
        + struct.pack("=BBBBI", AF_INET, 24, 0, 0, 3)
        + b"\x08\x00\x01\x00\x0a\x00\x00",  # a 3-byte IPv4 address
    ],
)
def test_unreadable_messages_are_lost(data):
    assert decode_untrusted(data)[-1:] == [LOST]


def test_dump_request_asks_for_a_dump_and_ends_dump_sees_its_end():
    request = dump_request(RTM_GETADDR, 7)
    length, msg_type, flags, seq, port = struct.unpack_from("=IHHII", request)
    assert (length, msg_type, flags & 0x301, seq, port) == (len(request), RTM_GETADDR, 0x301, 7, 0)
    assert not ends_dump(link_msg(3, 0, "eth0"))
    assert ends_dump(link_msg(3, 0, "eth0") + header(20, NLMSG_DONE) + b"\0" * 4)
    assert ends_dump(b"\x01")


# --- decoding, by property --------------------------------------------------------------------

names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), min_size=1, max_size=15)
indexes = st.integers(1, 2**31 - 1)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(IPv6Address(n)))


@st.composite
def links(draw):
    index, flags, name = draw(indexes), draw(st.integers(0, 2**32 - 1)), draw(names)
    kind = draw(st.sampled_from([RTM_NEWLINK, RTM_DELLINK]))
    if kind == RTM_DELLINK:
        want = NetworkChange("link", False, index, name, "removed")
    else:
        want = NetworkChange("link", bool(flags & IFF_UP and flags & IFF_RUNNING), index, name)
    return link_msg(index, flags, name, kind=kind), [want]


@st.composite
def addresses(draw):
    v6 = draw(st.booleans())
    address = draw(ipv6 if v6 else ipv4)
    prefixlen = draw(st.integers(0, 128 if v6 else 32))
    index, label = draw(indexes), draw(st.none() | names)
    kind = draw(st.sampled_from([RTM_NEWADDR, RTM_DELADDR]))
    flags = draw(st.integers(0, 255))
    data = addr_msg(address, prefixlen, index, kind=kind, label=label, flags=flags)
    hidden = kind == RTM_NEWADDR and flags & TENTATIVE and not flags & OPTIMISTIC
    want = NetworkChange("address", kind == RTM_NEWADDR, index, label, f"{address}/{prefixlen}")
    return data, [] if hidden else [want]


@st.composite
def routes(draw):
    v6 = draw(st.booleans())
    family = AF_INET6 if v6 else AF_INET
    dst = draw(st.none() | (ipv6 if v6 else ipv4))
    dst_len = draw(st.integers(0, 128 if v6 else 32))
    gateway = draw(st.none() | (ipv6 if v6 else ipv4))
    oif, table = draw(st.none() | indexes), draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from([RTM_NEWROUTE, RTM_DELROUTE]))
    cloned = draw(st.booleans())
    data = route_msg(
        family, dst, dst_len, kind=kind, gateway=gateway, oif=oif, table=table,
        flags=CLONED if cloned else 0,
    )  # fmt: skip
    shown = dst if dst is not None else ("::" if v6 else "0.0.0.0")
    want = NetworkChange(
        "route", kind == RTM_NEWROUTE, oif, None, f"{shown}/{dst_len}", gateway, table
    )
    return data, [] if cloned else [want]


messages = st.lists(links() | addresses() | routes(), max_size=8)


@given(messages)
def test_decoding_what_pyroute2_encoded_gives_the_fields_back(encoded):
    data = b"".join(d for d, _ in encoded)
    assert decode_untrusted(data) == [c for _, want in encoded for c in want]


@given(messages, st.data())
def test_a_truncated_datagram_keeps_the_whole_messages_and_ends_in_lost(encoded, data):
    whole = b"".join(d for d, _ in encoded)
    cut = data.draw(st.integers(0, len(whole)))
    ends, offset = [0], 0
    for d, _ in encoded:
        offset += len(d)
        ends.append(offset)
    kept = sum(1 for end in ends[1:] if end <= cut)
    want = [c for _, w in encoded[:kept] for c in w]
    if cut not in ends:
        want.append(LOST)
    assert decode_untrusted(whole[:cut]) == want


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_decode_to_changes_and_never_raise(data):
    changes = decode_untrusted(data)
    assert all(isinstance(c, NetworkChange) for c in changes)
    ends_dump(data)


@given(st.binary(min_size=4, max_size=200), st.sampled_from(sorted(
    [RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE]
)))  # fmt: skip
def test_random_payloads_of_known_types_never_raise(payload, msg_type):
    data = header(16 + len(payload), msg_type) + payload
    assert all(isinstance(c, NetworkChange) for c in decode_untrusted(data))


# --- the coalescer ----------------------------------------------------------------------------

ETH_UP = NetworkChange("link", True, 3, "eth0")
ETH_DOWN = NetworkChange("link", False, 3, "eth0")
ETH_GONE = NetworkChange("link", False, 3, "eth0", "removed")
ADDR = NetworkChange("address", True, 3, "eth0", "10.0.0.2/24")
ADDR_GONE = NetworkChange("address", False, 3, "eth0", "10.0.0.2/24")
DEFAULT = NetworkChange("route", True, 3, None, "0.0.0.0/0", "10.0.0.1", RT_TABLE_MAIN)
TUN_UP = NetworkChange("link", True, 9, "tnl0")
TUN_GONE = NetworkChange("link", False, 9, "tnl0", "removed")
TUN_ADDR = NetworkChange("address", True, 9, None, "fd78::2/64")
TUN_ROUTE = NetworkChange("route", True, 9, None, "0.0.0.0/1", None, RT_TABLE_MAIN)


def test_a_batch_is_due_settle_seconds_after_its_first_change_however_many_follow():
    c = Coalescer(0.2)
    assert c.deadline is None and not c.ready(100.0) and c.take() == []
    c.feed([ETH_UP], 10.0)
    c.feed([ADDR], 10.15)
    c.feed([DEFAULT], 10.199)
    assert c.deadline == pytest.approx(10.2)
    assert not c.ready(10.199) and c.ready(10.2)
    assert c.take() == [ETH_UP, ADDR, DEFAULT]
    assert c.deadline is None
    c.feed([ETH_DOWN], 11.0)
    assert c.deadline == pytest.approx(11.2)


def test_the_same_change_twice_in_a_burst_is_reported_once():
    c = Coalescer()
    c.feed([DEFAULT, DEFAULT, ADDR_GONE, ADDR_GONE], 0.0)
    assert c.take() == [DEFAULT, ADDR_GONE]


def test_a_link_restating_its_state_is_not_news():
    c = Coalescer()
    c.feed([ETH_UP], 0.0)
    assert c.take() == [ETH_UP]
    c.feed([ETH_UP], 1.0)  # e.g. an MTU change: same usable state
    assert c.deadline is None and c.take() == []
    c.feed([ETH_DOWN, ETH_UP], 2.0)
    assert c.take() == [ETH_DOWN, ETH_UP]
    c.feed([ETH_GONE, ETH_UP], 3.0)  # removed, then a new link got the index
    assert c.take() == [ETH_GONE, ETH_UP]
    assert c.statistics().repeats == 1


def test_an_address_refresh_is_not_news_but_removal_and_return_are():
    c = Coalescer()
    c.feed([ADDR], 0.0)
    c.take()
    c.feed([ADDR], 1.0)  # IPv6 lifetimes refreshed by a router advertisement
    assert c.take() == []
    c.feed([ADDR_GONE], 2.0)
    c.feed([ADDR], 2.1)
    assert c.take() == [ADDR_GONE, ADDR]


def test_addresses_are_forgotten_with_their_link():
    c = Coalescer()
    c.feed([ETH_UP, ADDR], 0.0)
    c.take()
    c.feed([ETH_GONE], 1.0)
    c.feed([ETH_UP, ADDR], 1.1)
    assert c.take() == [ETH_GONE, ETH_UP, ADDR]


def test_seeded_state_is_not_reported_but_changes_from_it_are():
    c = Coalescer()
    c.seed([ETH_UP, ADDR, TUN_UP])
    assert c.deadline is None
    c.feed([ETH_UP, ADDR], 0.0)
    assert c.take() == []
    c.feed([ETH_DOWN], 1.0)
    assert c.take() == [ETH_DOWN]


def test_routes_are_always_news():
    c = Coalescer()
    c.feed([DEFAULT], 0.0)
    c.take()
    c.feed([DEFAULT], 1.0)  # a replace that kept the same fields is still a change
    assert c.take() == [DEFAULT]


def test_the_ignored_interface_is_recognised_by_name_then_by_learnt_index():
    c = Coalescer(ignore_ifname="tnl0")
    c.feed([TUN_UP, TUN_ADDR, TUN_ROUTE, DEFAULT], 0.0)
    assert c.take() == [DEFAULT]
    assert c.ignore_ifindex == 9
    c.feed([TUN_GONE, NetworkChange("route", False, 9, None, "0.0.0.0/1", None, 254)], 1.0)
    assert c.take() == [] and c.ignore_ifindex == 9
    # index 9 now belongs to another link
    other = NetworkChange("link", True, 9, "eth5")
    reused = NetworkChange("address", True, 9, None, "10.5.0.1/24")
    c.feed([other, reused], 2.0)
    assert c.take() == [other, reused] and c.ignore_ifindex is None
    assert c.statistics().ignored == 5


def test_ignore_interface_with_a_known_index_and_with_none():
    c = Coalescer()
    c.ignore_interface("tnl0", 9)
    c.feed([TUN_ADDR], 0.0)
    assert c.take() == []
    c.ignore_interface(None, 9)
    assert c.ignore_ifindex is None
    c.feed([TUN_ADDR], 1.0)
    assert c.take() == [TUN_ADDR]


def test_an_ipv4_address_is_ignored_by_its_label_even_before_the_index_is_known():
    c = Coalescer(ignore_ifname="tnl0")
    c.feed([NetworkChange("address", True, 9, "tnl0", "10.78.0.2/24")], 0.0)
    assert c.take() == []


def test_a_flood_collapses_into_lost_and_stays_bounded():
    c = Coalescer(limit=3)
    flood = [NetworkChange("route", True, 3, None, f"10.{i}.0.0/16", None, 254) for i in range(50)]
    c.feed(flood[:3], 0.0)
    c.feed(flood[:3], 0.01)  # duplicates do not overflow
    assert c.take() == flood[:3]
    c.feed(flood, 1.0)
    assert c.take() == [LOST]
    assert c.statistics().overflows == 1
    c.feed(flood[:2], 2.0)
    assert c.take() == flood[:2]


def test_lost_says_everything_and_makes_the_known_state_stale():
    c = Coalescer()
    c.feed([ETH_UP], 0.0)
    c.take()
    c.feed([DEFAULT, LOST, ADDR], 1.0)
    assert c.take() == [LOST]
    c.feed([ETH_UP], 2.0)  # we may have missed a down in between
    assert c.take() == [ETH_UP]


def test_the_known_state_is_bounded():
    c = Coalescer()
    for i in range(STATE_LIMIT + 10):
        c.feed([NetworkChange("address", True, 3, None, f"fd00::{i:x}/128")], float(i))
        c.take()
    assert len(c._addresses) + len(c._links) <= STATE_LIMIT + 1


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Coalescer(-1)
    with pytest.raises(ValueError):
        Coalescer(limit=0)


# A small universe, so that repeats, removals and the ignored device all come up often.
universe = st.sampled_from(
    [ETH_UP, ETH_DOWN, ETH_GONE, ADDR, ADDR_GONE, DEFAULT, TUN_UP, TUN_GONE, TUN_ADDR, TUN_ROUTE,
     LOST, NetworkChange("link", True, 4, "eth1"), NetworkChange("route", False, None, None,
     "::/0", None, 254)]
)  # fmt: skip
steps = st.lists(st.tuples(st.lists(universe, max_size=5), st.floats(0, 1), st.booleans()))


@given(steps, st.integers(1, 6))
def test_batches_are_bounded_due_on_time_and_hold_only_what_was_fed(script, limit):
    c = Coalescer(0.2, ignore_ifname="tnl0", limit=limit)
    now, first = 0.0, None
    fed: set[NetworkChange] = set()
    unrecognised: set[NetworkChange] = set()  # fed before the TUN's index was learnt
    for changes, dt, take in script:
        now += dt
        for change in changes:
            if c.ignore_ifindex is None:
                unrecognised.add(change)
            c.feed([change], now)
        fed.update(changes)
        if first is None and c.deadline is not None:
            first = now
        if c.deadline is not None:
            assert c.deadline == pytest.approx(first + 0.2)
        if take:
            batch = c.take()
            assert (batch == []) == (first is None)
            assert len(batch) <= limit
            assert len(set(batch)) == len(batch)
            assert set(batch) <= fed | {LOST}
            assert LOST not in batch or batch == [LOST]
            assert not any(ch.ifname == "tnl0" for ch in batch)
            assert all(ch in unrecognised for ch in batch if ch.ifindex == 9)
            first = None
            assert c.deadline is None


# --- what matters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "want_matters", "want_gains"),
    [
        ([], False, False),
        ([LOST], True, True),
        ([ETH_UP], True, True),
        ([ETH_DOWN], True, False),
        ([ADDR], True, True),
        ([ADDR_GONE], True, False),
        ([DEFAULT], True, True),
        ([NetworkChange("route", False, 3, None, "0.0.0.0/0", "10.0.0.1", 254)], True, False),
        (
            [NetworkChange("route", True, 3, None, "10.0.0.2/32", None, RT_TABLE_LOCAL)],
            False,
            False,
        ),
        ([TUN_UP, TUN_ADDR, TUN_ROUTE], False, False),  # with ignore_ifindex=9
        ([TUN_ROUTE, ETH_DOWN], True, False),
    ],
)
def test_matters_and_gains(batch, want_matters, want_gains):
    assert matters(batch, ignore_ifindex=9) is want_matters
    assert gains(batch, ignore_ifindex=9) is want_gains


def test_other_tables_can_be_asked_for():
    route = NetworkChange("route", True, 3, None, "0.0.0.0/0", "10.0.0.1", 100)
    assert not matters([route])
    assert matters([route], tables=frozenset({100, RT_TABLE_MAIN}))
    assert gains([route], tables=frozenset({100}))


@given(st.lists(universe, max_size=8), st.permutations(range(8)))
def test_gains_imply_matters_order_does_not_count_nor_does_the_own_device(batch, order):
    shuffled = [batch[i] for i in order if i < len(batch)]
    assert matters(batch) == matters(shuffled)
    assert gains(batch) == gains(shuffled)
    assert not gains(batch) or matters(batch)
    own = [TUN_UP, TUN_ADDR, TUN_ROUTE, TUN_GONE]
    assert matters(batch + own, ignore_ifindex=9) == matters(
        [c for c in batch if c.ifindex != 9], ignore_ifindex=9
    )
