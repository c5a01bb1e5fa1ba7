"""Direct paths between two clients through home routers, on real TUN devices.

The world of :mod:`tests.support.p2pnet`: an internet router, the server on it, and two homes,
each a router with a stateful nftables firewall (and IPv4 masquerade) and a client behind it.
The server introduces the clients when the first packet between them passes through it; they
punch, and traffic between them leaves the server: the test measures the bytes that cross the
server's interface during a 20 MB transfer between the clients.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.netns import (
    Daemon,
    cli_status,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.p2pnet import SERVER4, SERVER6, Home, Open, P2PNet, p2pnet, wait_until
from tunnel.core.identity import Identity

TunnelFiles = Any  # conftest's fixture types (tests/ is not a package)

TEST_TIMEOUT = 150
PORT = 4433
NBYTES = 20_000_000
A_TUN4, B_TUN4 = "10.78.0.2", "10.78.0.3"
A_TUN6, B_TUN6 = "fd78::2", "fd78::3"


async def start_all(
    nursery: trio.Nursery,
    net: P2PNet,
    files: TunnelFiles,
    family: int,
    second: Any = None,
    identities: dict[str, Identity] | None = None,
) -> dict[str, Daemon]:
    """The server, then client a, then client b (so they get .2 and .3), all ready; ``second``:
    b's host, if not side b's client (the second client behind a's router); ``identities``:
    the clients' keys, if not new ones. Returns the daemons by name."""
    identities = identities or {}
    server_key, token = files.key("server"), files.token()
    server_config = files.server_config(
        key_file=server_key.path,
        auth_tokens=[token],
        listen=f"[::]:{PORT}",
        client_to_client=True,
    )
    argv = tunnel("server", "--config", str(server_config), "--log-level", "debug")
    daemons = {"server": await start_daemon(nursery, net.server.ns, argv, name="server")}
    server = f"{SERVER4}:{PORT}" if family == 4 else f"[{SERVER6}]:{PORT}"
    for name, host in (("a", net.a.client), ("b", second or net.b.client)):
        key = files.key(name, identities.get(name))
        config = files.client_config(
            name, server=server, server_id=server_key.public_id, auth_token=token,
            key_file=key.path,
        )  # fmt: skip
        argv = tunnel("client", "--config", str(config), "--log-level", "debug")
        daemons[name] = await start_daemon(nursery, host.ns, argv, name=f"client {name}")
    return daemons


async def peer_path(files: TunnelFiles, name: str) -> dict[str, Any] | None:
    peers = (await cli_status(files.socket(name)))["peers"]
    return peers[0] if peers else None


async def wait_path(files: TunnelFiles, path: str, within: float) -> float:
    """Until both clients report ``path`` for each other; returns how long it took."""
    began = time.monotonic()
    with trio.move_on_after(within):
        while True:
            a, b = await peer_path(files, "a"), await peer_path(files, "b")
            if a and b and a["path"] == path and b["path"] == path:
                return time.monotonic() - began
            await trio.sleep(0.05)
    raise AssertionError(f"not {path} within {within} s: a sees {a}, b sees {b}")


async def introduce(net: P2PNet, target: str) -> None:
    """One ping from a to b through the server: the packet that introduces them."""
    await run(net.a.client.ns, ["ping", "-c", "3", "-i", "0.2", "-W", "3", target], timeout=20)


async def transfer(
    nursery: trio.Nursery, net: P2PNet, to: str, seed: str, receiver: Any = None
) -> dict[str, Any]:
    address = f"{to}:5201" if ":" not in to else f"[{to}]:5201"
    got, want = await tcp_transfer(
        nursery,
        receiver=(receiver or net.b.client).ns,
        sender=net.a.client.ns,
        listen=address,
        to=address,
        nbytes=NBYTES,
        seed=f"{seed}-{time.monotonic()}",
        allowed=90,
    )
    assert got["bytes"] == want["bytes"] == NBYTES
    assert got["sha256"] == want["sha256"]
    return got


def server_bytes(net: P2PNet) -> int:
    stats = net.server_stats()
    return stats.rx_bytes + stats.tx_bytes


@pytest.mark.parametrize(
    ("family", "target"),
    [(4, B_TUN4), (6, B_TUN6)],
    ids=["IPv4 NAT x NAT", "IPv6 firewall x firewall"],
)
async def test_two_clients_behind_home_routers_go_direct(
    files: TunnelFiles, family: int, target: str
) -> None:
    with p2pnet(a=Home(), b=Home()) as net, trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, family)
            await introduce(net, target)
            took = await wait_path(files, "direct", 10)
            a = await peer_path(files, "a")
            assert a is not None
            public = net.b.client.public4 if family == 4 else net.b.client.public6
            assert a["endpoint"].strip("[").startswith(public), a
            dropped = net.a.router.drops().total + net.b.router.drops().total
            before = server_bytes(net)
            got = await transfer(nursery, net, target, "direct")
            through_server = server_bytes(net) - before
            print(f"\nIPv{family}: direct after {took:.2f} s (firewall drops while punching: "
                  f"{dropped}); 20 MB in {got['seconds']:.2f} s, "
                  f"{through_server} bytes through the server")  # fmt: skip
            assert through_server < NBYTES // 10
            assert (await peer_path(files, "a"))["path"] == "direct"  # type: ignore[index]


async def test_hard_nat_stays_on_the_relay_and_the_transfer_arrives(files: TunnelFiles) -> None:
    with p2pnet(a=Home(nat="hard"), b=Home()) as net, trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4)
            await introduce(net, B_TUN4)
            before = server_bytes(net)
            await transfer(nursery, net, B_TUN4, "hard")
            assert server_bytes(net) - before > NBYTES  # every byte through the server
            a, b = await peer_path(files, "a"), await peer_path(files, "b")
            assert a is not None and b is not None
            assert a["path"] == b["path"] == "relay"


async def test_a_direct_path_blocked_mid_transfer_falls_back_and_returns(
    files: TunnelFiles,
) -> None:
    with p2pnet(a=Home(), b=Home()) as net, trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4)
            await introduce(net, B_TUN4)
            await wait_path(files, "direct", 10)

            async def block_soon() -> None:
                await trio.sleep(0.3)
                net.block("a", "b")

            nursery.start_soon(block_soon)
            before = server_bytes(net)
            await transfer(nursery, net, B_TUN4, "blocked")  # byte-identical, asserted inside
            assert net.blocked() > 0
            assert server_bytes(net) - before > NBYTES // 2  # most of it through the server
            assert (await peer_path(files, "a"))["path"] == "relay"  # type: ignore[index]

            net.unblock("a", "b")
            # Back once the next round runs: the backoff is at most a few seconds here.
            await wait_path(files, "direct", 40)


@pytest.mark.parametrize("layout", ["behind one NAT", "one open side"])
async def test_direct_behind_one_nat_and_with_one_open_side(
    files: TunnelFiles, layout: str
) -> None:
    sides = (Home(clients=2), Open()) if layout == "behind one NAT" else (Home(), Open())
    with p2pnet(a=sides[0], b=sides[1]) as net, trio.fail_after(TEST_TIMEOUT):
        # Behind one NAT, b is a's neighbour: masquerade does not hairpin, so only their LAN
        # addresses (the candidates they report) connect them.
        b_host = net.a.clients[1] if layout == "behind one NAT" else net.b.client
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4, second=b_host)
            await introduce(net, B_TUN4)
            await wait_path(files, "direct", 10)
            a = await peer_path(files, "a")
            assert a is not None and a["endpoint"].startswith(f"{b_host.ip4}:"), a
            before = server_bytes(net)
            await transfer(nursery, net, B_TUN4, layout.replace(" ", "-"), receiver=b_host)
            assert server_bytes(net) - before < NBYTES // 10


async def test_an_idle_direct_path_outlives_the_conntrack_timeout(files: TunnelFiles) -> None:
    with p2pnet(a=Home(), b=Home()) as net, trio.fail_after(TEST_TIMEOUT):
        for site in (net.a, net.b):
            # Linux's own default for unanswered UDP flows, set here so the test does not
            # depend on what the host changed.
            await site.router.run(["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=30"])
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4)
            await introduce(net, B_TUN4)
            await wait_path(files, "direct", 10)
            await trio.sleep(35)  # idle: only keepalives cross the routers
            assert (await peer_path(files, "a"))["path"] == "direct"  # type: ignore[index]
            before = server_bytes(net)
            await transfer(nursery, net, B_TUN4, "idle")
            assert server_bytes(net) - before < NBYTES // 10


async def test_a_path_that_fails_one_way_falls_back_and_does_not_flap(files: TunnelFiles) -> None:
    """UDP from a to b dies, b to a still arrives: both fall back, and no round trip is ever
    complete, so neither goes direct again until the path heals."""
    with p2pnet(a=Home(), b=Home()) as net, trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4)
            await introduce(net, B_TUN4)
            await wait_path(files, "direct", 10)
            net.block("a", "b", both_ways=False)
            # Traffic on the direct path goes unanswered: the fallback, within seconds.
            await run(net.a.client.ns, ["ping", "-c", "40", "-i", "0.2", "-W", "1", B_TUN4],
                      check=False, timeout=20)  # fmt: skip
            await wait_path(files, "relay", 15)
            # Watch several retry rounds (the backoff starts at 2 s) with traffic both ways.
            began = time.monotonic()
            while time.monotonic() - began < 20:
                await run(net.a.client.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", B_TUN4])
                await run(net.b.client.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", A_TUN4])
                for name in ("a", "b"):
                    peer = await peer_path(files, name)
                    assert peer is not None and peer["path"] == "relay", (name, peer)
                    assert (peer["upgrades"], peer["fallbacks"]) == (1, 1), (name, peer)
            assert net.blocked() > 0
            net.unblock("a", "b", both_ways=False)
            await wait_path(files, "direct", 70)


async def test_a_host_answering_at_a_peers_address_with_another_key_is_refused(
    files: TunnelFiles,
) -> None:
    """a's home router sends everything for b's address to a squatter on a's LAN. It reflects
    and forges probes and opens a direct connection in our protocol with a key of its own,
    claiming to be b: a never takes that connection (no authenticated ping of b came from
    there), and a and b stay on the relay."""
    while True:  # b opens direct connections (the smaller key): a accepts them from b's address
        a_id, b_id = Identity.generate(), Identity.generate()
        if b_id.public_key < a_id.public_key:
            break
    with p2pnet(a=Home(clients=2), b=Open()) as net, trio.fail_after(TEST_TIMEOUT):
        squatter, b_host = net.a.clients[1], net.b.client
        await squatter.run(["ip", "addr", "add", f"{b_host.ip4}/32", "dev", "eth0"])
        assert net.a.router is not None
        await net.a.router.run(["ip", "route", "add", f"{b_host.ip4}/32", "via", squatter.ip4])
        async with open_daemon_nursery() as nursery:
            await start_all(nursery, net, files, 4, identities={"a": a_id, "b": b_id})
            port = await udp_port(b_host)
            report: dict[str, Any] = {}

            async def squat() -> None:
                argv = [sys.executable, str(SQUATTER), "--bind", f"{b_host.ip4}:{port}",
                        "--claim", b_id.public_id, "--seconds", "12"]  # fmt: skip
                proc = await squatter.run(argv, timeout=30)
                report.update(json.loads(proc.stdout.decode().strip().splitlines()[-1]))

            nursery.start_soon(squat)
            await wait_until_bound(squatter, port)
            await introduce(net, B_TUN4)
            await wait_until(lambda: bool(report))  # its 12 s are up: two rounds of a's probes
            print(f"\nsquatter: {report}")
            assert report["probes"] > 0 and report["error_code"] is None, report
            assert not report["handshake_completed"], report
            for name in ("a", "b"):
                peer = await peer_path(files, name)
                assert peer is not None and peer["path"] == "relay" and peer["upgrades"] == 0
            await introduce(net, B_TUN4)  # still carried, through the server


SQUATTER = Path(__file__).with_name("squatter_peer.py")


async def udp_port(host: Any) -> int:
    """The port of the only UDP socket in ``host``: its client's."""
    proc = await host.run(["ss", "-Hnua"])
    (line,) = proc.stdout.decode().splitlines()
    return int(line.split()[3].rpartition(":")[2])


async def wait_until_bound(host: Any, port: int) -> None:
    while True:
        proc = await host.run(["ss", "-Hnua", f"sport = :{port}"])
        if proc.stdout.strip():
            return
        await trio.sleep(0.05)
