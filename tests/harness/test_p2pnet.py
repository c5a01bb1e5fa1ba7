"""The hole-punching topology of :mod:`tests.support.p2pnet` is what it claims to be.

Small UDP exchanges with :mod:`tests.support.udpprobe` (a STUN-like reflector on the server,
one side of a simultaneous open in each client) prove that every client reaches the server on
both families, that the home firewalls really drop unsolicited packets (their counters go
up), that a simultaneous open gets through them, what the NATs do to source ports (measured,
not assumed), that ``block()`` cuts exactly the direct path, and that nothing is left behind.

These need root, ``ip`` and ``nft``; without them they skip, unless ``CI`` is set (then a
missing tool is a broken machine and fails). Every test is bounded by ``trio.fail_after``;
every wait is a poll for a condition, and the only timed waits are the probes' own deadlines
where the point is that nothing arrives (and then a counter shows where it died).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.support import netns as nstools
from tests.support import p2pnet as p2p
from tests.support import tool_argv
from tests.support.netns import Daemon, open_daemon_nursery, start_daemon
from tests.support.p2pnet import Home, Host, Open, P2PNet, p2pnet, wait_until

pytestmark = pytest.mark.netns

TEST_TIMEOUT = 60
STUN_PORTS = (3478, 3479, 3480)
PUNCH_SIZE = 1200  # bytes per punch datagram: larger than the server's background chatter
NO_PATH_WAIT = 1.5  # how long a punch that must fail keeps trying


def _missing_requirement() -> str | None:
    if sys.platform != "linux":
        return "the p2p topology needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the p2p topology needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return f"the p2p topology needs `{tool}` (iproute2, nftables, procps)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _environment() -> Iterator[None]:
    missing = _missing_requirement()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}", pytrace=False)
        pytest.skip(missing)
    reaped = nstools.reap_stale()
    if reaped:
        logging.getLogger("tests.support").warning("removed stale namespaces: %s", reaped)
    yield


@pytest.fixture(autouse=True)
def _debug_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tests.support")


# ---------------------------------------------------------------------------------------------
# probes


def _json(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return report


@asynccontextmanager
async def reflector(host: Host, ports: tuple[int, ...] = STUN_PORTS) -> AsyncIterator[Daemon]:
    """The STUN-like reflector (also a listener: one JSON line per datagram) in ``host``."""
    argv = tool_argv("udpprobe", "reflect", *(f"--port={p}" for p in ports))
    async with open_daemon_nursery() as nursery:
        yield await start_daemon(nursery, host.ns, argv, name=f"reflect-{host.name}")


async def ask(host: Host, to: str, bind_port: int, ports: tuple[int, ...] = STUN_PORTS) -> list:
    """What the reflector at ``to`` saw for each of ``ports``: ``[host, port]`` each."""
    argv = tool_argv("udpprobe", "ask", "--to", to, "--bind-port", str(bind_port),
                     *(f"--port={p}" for p in ports))  # fmt: skip
    report = _json(await host.run(argv, timeout=15))
    answers = [report["answers"][str(p)] for p in ports]
    assert None not in answers, (host.name, to, report)
    return answers


async def punch(host: Host, peer: str, peer_port: int, bind_port: int, wait: float = 5) -> dict:
    """One side of a simultaneous open; the report has sent, received, from and done."""
    argv = tool_argv("udpprobe", "punch", "--peer", peer, "--peer-port", str(peer_port),
                     "--bind-port", str(bind_port), "--size", str(PUNCH_SIZE),
                     "--wait", str(wait))  # fmt: skip
    return _json(await host.run(argv, timeout=wait + 10))


async def send(host: Host | p2p.Router, to: str, port: int, count: int, bind_port: int = 0) -> None:
    argv = tool_argv("udpprobe", "send", "--to", to, "--port", str(port),
                     "--count", str(count), "--bind-port", str(bind_port))  # fmt: skip
    await host.run(argv, timeout=15)


async def punch_pair(
    one: Host, two: Host, one_at: tuple[str, int], two_at: tuple[str, int],
    *, bind: tuple[int, int], wait: float = 5, first: p2p.Router | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """``one`` (bound to ``bind[0]``) and ``two`` (``bind[1]``) punch toward each other;
    ``one_at`` is where ``two`` dials ``one``, and the other way round.

    With ``first`` (the router in front of ``two``), ``one`` starts alone and ``two`` only
    once ``first``'s firewall has dropped one of ``one``'s packets: the firewall was in the
    way, and the open happens while ``one`` keeps sending."""
    results: dict[str, dict] = {}

    async def side(key: str, host: Host, peer: tuple[str, int], port: int) -> None:
        results[key] = await punch(host, peer[0], peer[1], port, wait)

    async with trio.open_nursery() as nursery:
        before = first.drops().total if first is not None else 0
        nursery.start_soon(side, "one", one, two_at, bind[0])
        if first is not None:
            await wait_until(lambda: first.drops().total > before)
        nursery.start_soon(side, "two", two, one_at, bind[1])
    return results["one"], results["two"]


async def punch_public(
    one: Host, two: Host, family: int, *, ports: tuple[int, int], **kwargs: Any
) -> tuple[dict, dict]:
    """:func:`punch_pair` between the public addresses, each side dialling the port the other
    is bound to (right for every NAT here but the hard one, which the tests measure)."""
    one_at, two_at = (_public(one, family), ports[0]), (_public(two, family), ports[1])
    return await punch_pair(one, two, one_at, two_at, bind=ports, **kwargs)


def _public(host: Host, family: int) -> str:
    return host.public4 if family == 4 else host.public6


def _nat(net: P2PNet, host: Host) -> p2p.Nat:
    for site in (net.a, net.b):
        if host in site.clients:
            return None if site.router is None else site.router.nat
    raise AssertionError(host)


def _our_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split(" ", 1)[0] for line in out.stdout.splitlines() if line.strip()}
    mine = f"{nstools.NAME_PREFIX}{p2p.NS_PREFIX}"
    return {n for n in names if n.startswith(mine) and f"-{os.getpid()}-" in n}


def _root_tables() -> set[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


# ---------------------------------------------------------------------------------------------
# reachability


LAYOUTS = {
    "nat-x-nat": dict(a=Home(), b=Home()),
    "two-behind-one-nat-x-open": dict(a=Home(clients=2), b=Open()),
    "hard-nat-x-firewall-only": dict(a=Home(nat="hard"), b=Home(nat=None)),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
async def test_every_client_reaches_the_server_over_ipv4_and_ipv6(layout: dict) -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(**layout) as net:
        async with reflector(net.server):
            for i, host in enumerate(net.a.clients + net.b.clients):
                bind = 41000 + i
                for family, to in ((4, net.server.ip4), (6, net.server.ip6)):
                    (seen,) = await ask(host, to, bind, STUN_PORTS[:1])
                    assert seen[0] == _public(host, family), (host, family, seen)
                    if family == 6 or _nat(net, host) != "hard":
                        assert seen[1] == bind, (host, family, seen)
        # and a NATed LAN is not routed on the internet: only its router's WAN address is
        for site in (net.a, net.b):
            if site.router is None:
                continue
            for host in site.clients:
                route = nstools.ip(net.inet, "route", "get", host.ip4, check=False)
                if site.router.nat is None:
                    assert route.returncode == 0, route
                else:
                    assert "unreachable" in route.stderr, (host, route)
                assert nstools.ip_json(net.inet, "-6", "route", "get", host.ip6)[0]["gateway"] == (
                    site.router.wan6
                )


# ---------------------------------------------------------------------------------------------
# the firewall


async def test_unsolicited_udp_is_dropped_by_the_firewall_and_counted() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Home()) as net:
        a0, b0, ra = net.a.client, net.b.client, net.a.router
        assert ra is not None
        async with reflector(net.server), reflector(a0, (5000,)) as listener:
            # a mapping that exists, but for the server: it does not let anyone else in
            (seen,) = await ask(a0, net.server.ip4, 5001, STUN_PORTS[:1])
            assert seen == [ra.wan4, 5001]
            for target_port in (5000, 5001):
                before = ra.drops()
                await send(b0, ra.wan4, target_port, 5)
                # to the NAT's own address: delivered locally, so the input chain drops it
                await wait_until(lambda b=before: ra.drops().input >= b.input + 5)
                assert ra.drops().forward == before.forward
            # IPv6 is routed to the client itself: the forward chain drops it
            before = ra.drops()
            await send(b0, a0.ip6, 5000, 5)
            await wait_until(lambda: ra.drops().forward >= before.forward + 5)
            # the listener was there all along: a datagram from its own router gets through
            # (router-originated, not forwarded), and it is the first thing it ever heard
            await send(ra, a0.ip6, 5000, 1)
            await wait_until(lambda: bool(listener.stdout_lines))
            assert [json.loads(line)["from"][0] for line in listener.stdout_lines] == [ra.lan6]
            print(f"\nfirewall of home a dropped {ra.drops()} (b's drops: {net.b.router.drops()})")


async def test_an_open_side_receives_unsolicited_packets_and_a_firewalled_one_does_not() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Open()) as net:
        a0, b0, ra = net.a.client, net.b.client, net.a.router
        assert ra is not None and net.b.router is None
        async with reflector(b0, (5000,)) as listener:
            await send(a0, b0.ip6, 5000, 1)
            await send(a0, b0.ip4, 5000, 1)
            await wait_until(lambda: len(listener.stdout_lines) >= 2)
            sources = sorted(json.loads(line)["from"][0] for line in listener.stdout_lines)
            assert sources == sorted([a0.ip6, ra.wan4])
        before = ra.drops()
        await send(b0, a0.ip6, 5000, 3)
        await wait_until(lambda: ra.drops().forward >= before.forward + 3)


# ---------------------------------------------------------------------------------------------
# simultaneous open


OPENS = {
    "masquerade-x-masquerade-v4": (Home(), Home(), 4),
    "firewall-x-firewall-v6": (Home(), Home(), 6),
    "firewall-only-x-firewall-only-v4": (Home(nat=None), Home(nat=None), 4),
    "masquerade-x-open-v4": (Home(), Open(), 4),
    "firewall-x-open-v6": (Home(), Open(), 6),
}


@pytest.mark.parametrize("staggered", [False, True], ids=["together", "staggered"])
@pytest.mark.parametrize(("side_a", "side_b", "family"), OPENS.values(), ids=OPENS.keys())
async def test_simultaneous_open_punches_through(
    side_a: p2p.Side, side_b: p2p.Side, family: int, staggered: bool
) -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=side_a, b=side_b) as net:
        a0, b0 = net.a.client, net.b.client
        # staggered: the side facing a firewall goes first, so that firewall drops it first
        if net.b.router is not None:
            one, two, first = a0, b0, net.b.router
        else:
            one, two, first = b0, a0, net.a.router
        before = net.server_stats()
        got_one, got_two = await punch_public(
            one, two, family, ports=(6001, 6002), first=first if staggered else None
        )
        assert got_one["done"] and got_two["done"], (got_one, got_two, net.describe())
        # each heard the other from the address and port it dialled: the NATs kept the ports
        assert got_one["from"] == [[_public(two, family), 6002]], got_one
        assert got_two["from"] == [[_public(one, family), 6001]], got_two
        # direct: not one punch datagram crossed the server's interface
        after = net.server_stats()
        assert after.rx_bytes - before.rx_bytes < PUNCH_SIZE, (before, after)
        assert after.tx_bytes - before.tx_bytes < PUNCH_SIZE, (before, after)
        drops = {s.name: s.router.drops().total for s in (net.a, net.b) if s.router}
        print(f"\nsent {got_one['sent']}+{got_two['sent']}, firewall drops {drops}")


async def test_hard_nat_cannot_be_punched_with_the_ports_dialled_but_ipv6_can() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Home(nat="hard")) as net:
        a0, b0, ra, rb = net.a.client, net.b.client, net.a.router, net.b.router
        assert ra is not None and rb is not None
        before_a, before_b = ra.drops(), rb.drops()
        got_a, got_b = await punch_public(a0, b0, 4, ports=(6001, 6002), wait=NO_PATH_WAIT)
        assert not got_a["received"] and not got_b["received"], (got_a, got_b)
        # both ends' packets died in the other's firewall (b's came from a random port)
        assert ra.drops().input > before_a.input and rb.drops().input > before_b.input
        got_a, got_b = await punch_public(a0, b0, 6, ports=(6001, 6002))
        assert got_a["done"] and got_b["done"], (got_a, got_b)


# ---------------------------------------------------------------------------------------------
# what the NATs do to ports


async def test_masquerade_keeps_the_port_and_hard_nat_picks_one_per_destination() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Home(nat="hard")) as net:
        a0, b0 = net.a.client, net.b.client
        async with reflector(net.server):
            easy = await ask(a0, net.server.ip4, 42000)
            hard = await ask(b0, net.server.ip4, 42000)
            easy6 = await ask(a0, net.server.ip6, 42000)
            hard6 = await ask(b0, net.server.ip6, 42000)
        print(f"\nmasquerade, local port 42000, seen by {len(STUN_PORTS)} destinations: {easy}")
        print(f"hard NAT, local port 42000, seen by {len(STUN_PORTS)} destinations: {hard}")
        assert easy == [[a0.public4, 42000]] * len(STUN_PORTS)
        assert {host for host, _ in hard} == {b0.public4}
        hard_ports = [port for _, port in hard]
        # a random port for every destination (two of three equal: 1 in ~64000, tolerated)
        assert len(set(hard_ports)) >= 2 and 42000 not in hard_ports, hard
        # no NAT66: IPv6 keeps address and port on both
        assert easy6 == [[a0.ip6, 42000]] * len(STUN_PORTS)
        assert hard6 == [[b0.ip6, 42000]] * len(STUN_PORTS)


async def test_two_clients_behind_one_nat_share_its_address_but_not_a_port() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(clients=2), b=Home()) as net:
        a0, a1 = net.a.clients
        async with reflector(net.server):
            (seen0,) = await ask(a0, net.server.ip4, 43000, STUN_PORTS[:1])
            (seen1,) = await ask(a1, net.server.ip4, 43000, STUN_PORTS[:1])
        print(f"\nsame local port 43000 behind one masquerade: a0 seen as {seen0}, a1 as {seen1}")
        assert seen0 == [a0.public4, 43000]
        assert seen1[0] == a1.public4 == a0.public4 and seen1[1] != 43000
        # no hairpin: dialling each other's public mapping leads nowhere ...
        got0, got1 = await punch_pair(
            a0, a1, tuple(seen0), tuple(seen1), bind=(43000, 43000), wait=NO_PATH_WAIT
        )
        assert not got0["received"] and not got1["received"], (got0, got1)
        # ... while their LAN addresses work
        got0, got1 = await punch_pair(a0, a1, (a0.ip4, 43000), (a1.ip4, 43000), bind=(43000, 43000))
        assert got0["done"] and got1["done"], (got0, got1)


# ---------------------------------------------------------------------------------------------
# block / unblock


async def test_block_cuts_the_direct_path_but_not_the_server() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Home()) as net:
        a0, b0 = net.a.client, net.b.client
        net.block("a", "b")
        sent = 0
        for family in (4, 6):
            got_a, got_b = await punch_public(a0, b0, family, ports=(7001, 7002), wait=NO_PATH_WAIT)
            assert not got_a["received"] and not got_b["received"], (family, got_a, got_b)
            sent += got_a["sent"] + got_b["sent"]
        # every datagram of both sides, both families, died in the block rule
        await wait_until(lambda: net.blocked() >= sent)
        assert net.blocked() == sent
        async with reflector(net.server):
            for host in (a0, b0):
                for family, to in ((4, net.server.ip4), (6, net.server.ip6)):
                    (seen,) = await ask(host, to, 7003, STUN_PORTS[:1])
                    assert seen == [_public(host, family), 7003]
        net.unblock("a", "b")
        for family in (4, 6):
            got_a, got_b = await punch_public(a0, b0, family, ports=(7001, 7002))
            assert got_a["done"] and got_b["done"], (family, got_a, got_b, net.describe())
        assert net.blocked() == sent


async def test_a_one_way_block_lets_only_the_other_direction_through() -> None:
    with trio.fail_after(TEST_TIMEOUT), p2pnet(a=Home(), b=Home()) as net:
        a0, b0 = net.a.client, net.b.client
        net.block("a", "b", both_ways=False)
        for family in (4, 6):
            got_a, got_b = await punch_public(a0, b0, family, ports=(7101, 7102), wait=NO_PATH_WAIT)
            # a's packets opened its own firewall and then died on the way; b's came back in
            assert got_a["received"] and not got_b["received"], (family, got_a, got_b)
            assert not got_a["done"] and not got_b["done"]
        net.unblock("a", "b", both_ways=False)
        got_a, got_b = await punch_public(a0, b0, 4, ports=(7101, 7102))
        assert got_a["done"] and got_b["done"], (got_a, got_b)


# ---------------------------------------------------------------------------------------------
# cleanup


def test_everything_is_removed_on_exit() -> None:
    # synchronous, like the setup itself: every command in it has its own subprocess timeout
    tables = _root_tables()
    with p2pnet(a=Home(clients=2), b=Open()) as net:
        names = set(net.namespaces)
        assert names <= _our_namespaces()
        assert len(names) == 6  # inet, server, router a, a0, a1, b0
        for ns, table in ((net.inet, "inet p2pblock"), (net.a.router.ns, "inet fw")):
            listed = subprocess.run(
                ns.exec_argv(["nft", "list", "tables"]), capture_output=True, text=True, timeout=30
            )
            assert f"table {table}" in listed.stdout
        net.block("a", "b")
    assert not names & _our_namespaces()
    with pytest.raises(RuntimeError, match="boom"):
        with p2pnet(a=Home(), b=Home()) as net:
            names = set(net.namespaces)
            raise RuntimeError("boom")
    assert not names & _our_namespaces()
    assert not _our_namespaces()
    # the tables lived in the namespaces; none was ever added where the tests run
    assert _root_tables() <= tables


def test_everything_is_removed_after_a_failure_halfway_through_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = p2p._nft_script
    existed: set[str] = set()

    def fail_on_nat(ns: nstools.Netns, script: str) -> None:
        if "table ip nat" in script:  # home a's firewall is in place, home b not built yet
            existed.update(_our_namespaces())
            raise RuntimeError("boom in setup")
        real(ns, script)

    monkeypatch.setattr(p2p, "_nft_script", fail_on_nat)
    with pytest.raises(RuntimeError, match="boom in setup"):
        with p2pnet(a=Home(), b=Home()):
            raise AssertionError("setup should have failed")
    assert len(existed) == 4, existed  # inet, server, router a, a0
    assert not _our_namespaces()
