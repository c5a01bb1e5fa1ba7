"""The nftables rulesets as data: what the JSON says, not what a kernel does with it (that is
tests/integration/test_nft_rules.py)."""

import re
from ipaddress import IPv4Network, collapse_addresses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core import nftrules
from tunnel.core.nftrules import delete_table, kill_switch, masquerade, table_name

VALID_TABLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MARK = 0x5157


def _commands(document):
    assert list(document) == ["nftables"]
    return document["nftables"]


def _rules(document):
    return [c["add"]["rule"] for c in _commands(document) if "rule" in c.get("add", {})]


def _chains(document):
    return [c["add"]["chain"] for c in _commands(document) if "chain" in c.get("add", {})]


def _accepts(rule):
    return rule["expr"][-1] == {"accept": None}


def _matches(rule):
    return [e["match"] for e in rule["expr"] if "match" in e]


def _single_match(rule):
    (match,) = _matches(rule)
    return match


# --- table names -------------------------------------------------------------------------------


def test_table_names_of_plain_devices_are_readable():
    assert table_name("killswitch", "tun0") == "tunnel_killswitch_tun0"
    assert table_name("masquerade", "tun0") == "tunnel_masquerade_tun0"
    assert table_name(nftrules.KILL_SWITCH, "tnl_cli0") == "tunnel_killswitch_tnl_cli0"


def test_table_names_of_other_devices_are_sanitized_and_kept_apart():
    dashed = table_name("killswitch", "wg-home")
    dotted = table_name("killswitch", "wg.home")
    assert re.fullmatch(r"tunnel_killswitch_wg_home_[0-9a-f]{8}", dashed)
    assert re.fullmatch(r"tunnel_killswitch_wg_home_[0-9a-f]{8}", dotted)
    assert dashed != dotted != table_name("killswitch", "wg_home")


@pytest.mark.parametrize("kind", ["", "Kill", "kill-switch", "9lives", "kill switch"])
def test_table_name_refuses_odd_kinds(kind):
    with pytest.raises(ValueError, match="kind"):
        table_name(kind, "tun0")


@pytest.mark.parametrize("name", ["", "a" * 16, "é" * 8])
def test_table_name_refuses_what_is_not_an_interface_name(name):
    with pytest.raises(ValueError, match="not an interface name"):
        table_name("killswitch", name)


_ifnames = st.text(min_size=1, max_size=15).filter(
    lambda s: len(s.encode("utf-8", "surrogatepass")) <= 15
)


@given(kind=st.sampled_from([nftrules.KILL_SWITCH, nftrules.MASQUERADE]), name=_ifnames)
def test_table_name_is_always_a_valid_nft_identifier(kind, name):
    table = table_name(kind, name)
    assert VALID_TABLE.fullmatch(table)
    assert table.startswith(f"tunnel_{kind}_")
    assert len(table) <= 64  # far below NFT_NAME_MAXLEN (256)
    assert table == table_name(kind, name)


@given(a=_ifnames, b=_ifnames)
def test_different_devices_get_different_tables(a, b):
    if a != b:
        assert table_name("killswitch", a) != table_name("killswitch", b)


# --- atomic replace ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "family"),
    [
        (kill_switch("tunnel_killswitch_ks0", tun_name="ks0", fwmark=MARK), "inet"),
        (
            masquerade(
                "tunnel_killswitch_ks0", tun_name="ks0", pools=[IPv4Network("10.94.0.0/24")]
            ),
            "ip",
        ),
    ],
)
def test_every_ruleset_replaces_its_table_in_one_document(document, family):
    commands = _commands(document)
    table = {"family": family, "name": "tunnel_killswitch_ks0"}
    # add (a no-op if it exists) + delete (so it cannot fail) + add: one transaction that
    # swaps the old table for the new one
    assert commands[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    for command in commands[3:]:
        (verb,) = command
        assert verb == "add"
        (what,) = command["add"].values()
        assert what["family"] == family
        assert what["table"] == "tunnel_killswitch_ks0"


# --- kill switch -------------------------------------------------------------------------------


def test_kill_switch_output_chain_drops_by_default():
    document = kill_switch("ks", tun_name="ks0", fwmark=MARK)
    assert _chains(document) == [
        {
            "family": "inet",
            "table": "ks",
            "name": "output",
            "type": "filter",
            "hook": "output",
            "prio": 0,
            "policy": "drop",
        }
    ]
    assert {rule["chain"] for rule in _rules(document)} == {"output"}


def test_kill_switch_lets_out_loopback_the_tun_by_name_and_marked_packets():
    rules = _rules(kill_switch("ks", tun_name="ks0", fwmark=MARK))
    single = [_single_match(r) for r in rules if _accepts(r) and len(_matches(r)) == 1]
    oifname = {"meta": {"key": "oifname"}}
    assert {"op": "==", "left": oifname, "right": "lo"} in single
    # by name: the device comes and goes, and the next one of that name must match
    assert {"op": "==", "left": oifname, "right": "ks0"} in single
    assert {"op": "==", "left": {"meta": {"key": "mark"}}, "right": MARK} in single
    every_left = [m["left"] for r in rules for m in _matches(r)]
    assert {"meta": {"key": "oif"}} not in every_left


def test_kill_switch_keeps_the_underlay_alive():
    rules = [r for r in _rules(kill_switch("ks", tun_name="ks0", fwmark=MARK)) if _accepts(r)]
    icmpv6 = {"payload": {"protocol": "icmpv6", "field": "type"}}
    (nd,) = [r for r in rules if _matches(r)[0]["left"] == icmpv6]
    assert sorted(_single_match(nd)["right"]["set"]) == sorted(
        ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit"]
    )

    def udp(rule):
        fields = {m["left"]["payload"]["field"]: m["right"] for m in _matches(rule)[1:]}
        return _matches(rule)[0]["right"], fields.get("sport"), fields.get("dport")

    dhcp = {udp(r) for r in rules if _matches(r)[0]["left"] == {"meta": {"key": "nfproto"}}}
    assert dhcp == {("ipv4", 68, 67), ("ipv6", 546, 547)}


def test_kill_switch_rejects_the_rest_and_never_accepts_by_conntrack():
    rules = _rules(kill_switch("ks", tun_name="ks0", fwmark=MARK))
    *_, tcp, rest = rules
    assert tcp["expr"] == [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"reject": {"type": "tcp reset"}},
    ]
    assert rest["expr"] == [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]
    # a connection opened before the switch went on must not keep leaking
    lefts = [m["left"] for r in rules for m in _matches(r)]
    assert all("ct" not in left for left in lefts)


@pytest.mark.parametrize("fwmark", [0, -1, 2**32])
def test_kill_switch_refuses_a_mark_every_packet_has_or_none_can(fwmark):
    with pytest.raises(ValueError, match="fwmark"):
        kill_switch("ks", tun_name="ks0", fwmark=fwmark)


@pytest.mark.parametrize("name", ["tun%d", "ks*", "k\\s", ""])
def test_rulesets_refuse_device_names_nftables_reads_as_patterns(name):
    with pytest.raises(ValueError):
        kill_switch("ks", tun_name=name, fwmark=MARK)
    with pytest.raises(ValueError):
        masquerade("m", tun_name=name, pools=[IPv4Network("10.94.0.0/24")])


# --- masquerade --------------------------------------------------------------------------------


def test_masquerade_is_a_srcnat_chain_for_the_pools_not_back_into_the_tun():
    document = masquerade("m", tun_name="tnlsrv0", pools=[IPv4Network("10.94.0.0/24")])
    assert _chains(document) == [
        {
            "family": "ip",
            "table": "m",
            "name": "postrouting",
            "type": "nat",
            "hook": "postrouting",
            "prio": 100,
            "policy": "accept",
        }
    ]
    (rule,) = _rules(document)
    assert rule["expr"] == [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "10.94.0.0", "len": 24}},
            }
        },
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "tnlsrv0"}},
        {"masquerade": None},
    ]


def test_masquerade_merges_overlapping_pools_and_needs_one():
    pools = [IPv4Network("10.94.0.0/25"), IPv4Network("10.94.0.0/24"), IPv4Network("10.95.0.7/32")]
    rules = _rules(masquerade("m", tun_name="t0", pools=pools))
    assert [r["expr"][0]["match"]["right"]["prefix"] for r in rules] == [
        {"addr": "10.94.0.0", "len": 24},
        {"addr": "10.95.0.7", "len": 32},
    ]
    with pytest.raises(ValueError, match="pool"):
        masquerade("m", tun_name="t0", pools=[])


@given(
    pools=st.lists(
        st.builds(
            lambda address, length: IPv4Network((address, length), strict=False),
            st.integers(0, 2**32 - 1),
            st.integers(8, 32),
        ),
        min_size=1,
        max_size=8,
    ),
    name=_ifnames.filter(lambda s: "%" not in s and "\\" not in s and not s.endswith("*")),
)
def test_masquerade_covers_exactly_the_pools(pools, name):
    document = masquerade(table_name("masquerade", name), tun_name=name, pools=pools)
    assert VALID_TABLE.fullmatch(_commands(document)[0]["add"]["table"]["name"])
    prefixes = [r["expr"][0]["match"]["right"]["prefix"] for r in _rules(document)]
    covered = [IPv4Network((p["addr"], p["len"])) for p in prefixes]
    # every pool address is in one rule's prefix, and every rule's prefix is pool addresses
    for pool in pools:
        assert sum(pool.subnet_of(net) for net in covered) == 1
    for net in covered:
        inside = [pool for pool in collapse_addresses(pools) if pool.subnet_of(net)]
        assert sum(pool.num_addresses for pool in inside) == net.num_addresses
    assert all(r["expr"][1]["match"]["right"] == name for r in _rules(document))


# --- delete ------------------------------------------------------------------------------------


def test_delete_table_is_one_command():
    assert delete_table("inet", "tunnel_killswitch_tun0") == {
        "nftables": [{"delete": {"table": {"family": "inet", "name": "tunnel_killswitch_tun0"}}}]
    }
