"""Paths smaller than 1500 bytes: a router in the middle whose onward link is smaller.

    cli ── 1500 ── rtr ── MTU ── srv        server on 10.77.2.2 / fd77:2::2, port 4433
    10.77.1.2      10.77.1.1 / 10.77.2.1    the tunnel: 10.78.0.2 (client), 10.78.0.1 (server)

Both ends of the small link have its MTU, so the two directions meet it differently: the
client's datagrams reach the router, which drops what is too large (and says so with an ICMP
error that our sockets ignore); the server's own kernel refuses to send anything larger than
its link (EMSGSIZE). Each end must find the path's size on its own, and carry bulk TCP at a
goodput of the same order as over 1500 bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.support.netns import (
    Daemon,
    Netns,
    cli_status,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel

TunnelFiles = Any  # conftest's fixture types (tests/ is not a package)

TEST_TIMEOUT = 120
PORT = 4433
SERVER_TUN4, SERVER_TUN6 = "10.78.0.1", "fd78::1"
CLIENT_TUN4 = "10.78.0.2"
NBYTES = 20_000_000
UNDERLAY = {4: ("10.77.2.2", "10.77.2.2:4433"), 6: ("fd77:2::2", "[fd77:2::2]:4433")}
# The UDP payload path MTU discovery must settle on: the link's MTU less the IP and UDP
# headers, or our maximum (1452) where the path carries more.
EXPECTED = {
    (4, 1280): 1252,
    (6, 1280): 1232,
    (4, 1492): 1452,
    (6, 1492): 1444,
    (4, 1500): 1452,
}


@contextlib.contextmanager
def routed_path(mtu: int) -> Iterator[tuple[Netns, Netns, Netns, Any]]:
    """Client, router and server namespaces; the router-server link has ``mtu``."""
    with netns("pmc") as cli, netns("pmr") as rtr, netns("pms") as srv:
        veth(cli, rtr, ["10.77.1.2/24", "fd77:1::2/64"], ["10.77.1.1/24", "fd77:1::1/64"])
        small = veth(rtr, srv, ["10.77.2.1/24", "fd77:2::1/64"],
                     ["10.77.2.2/24", "fd77:2::2/64"], mtu=mtu)  # fmt: skip
        yield cli, rtr, srv, small


async def start_routing(cli: Netns, rtr: Netns, srv: Netns) -> None:
    await run(rtr, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    for ns, gateway4, gateway6 in (
        (cli, "10.77.1.1", "fd77:1::1"),
        (srv, "10.77.2.1", "fd77:2::1"),
    ):
        await run(ns, ["ip", "route", "add", "default", "via", gateway4])
        await run(ns, ["ip", "-6", "route", "add", "default", "via", gateway6])


async def start_tunnel(
    nursery: trio.Nursery, cli: Netns, srv: Netns, server_config: Any, client_config: Any
) -> tuple[Daemon, Daemon]:
    """The server in ``srv`` and the client in ``cli``, both ready."""
    argv = tunnel("server", "--config", str(server_config), "--log-level", "debug")
    server = await start_daemon(nursery, srv, argv, name="server")
    argv = tunnel("client", "--config", str(client_config), "--log-level", "debug")
    client = await start_daemon(nursery, cli, argv, name="client")
    return server, client


def configs(files: TunnelFiles, family: int) -> tuple[Any, Any]:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server = files.server_config(
        key_file=server_key.path, auth_tokens=[token], listen=f"[::]:{PORT}"
    )
    client = files.client_config(
        "client",
        server=UNDERLAY[family][1],
        server_id=server_key.public_id,
        auth_token=token,
        key_file=client_key.path,
    )
    return server, client


async def session_status(files: TunnelFiles) -> dict[str, Any]:
    status = await cli_status(files.socket("client"))
    (session,) = status["sessions"]
    return session


async def wait_settled(files: TunnelFiles, want: int, within: float) -> dict[str, Any]:
    """Poll the client's status until its search has settled on ``want``."""
    with trio.move_on_after(within):
        while True:
            session = await session_status(files)
            if session["pmtu_state"] == "complete" and session["path_mtu"] == want:
                return session
            await trio.sleep(0.1)
    raise AssertionError(f"path MTU not settled on {want} within {within} s: {session}")


async def ping_sizes(cli: Netns, target: str, sizes: list[int]) -> None:
    """Pings of these total IP sizes get answers. The kernel's default PMTU mode: the first
    of a size may only bring "packet too big" back (from the tunnel), then it fragments."""
    header = 28 if ":" not in target else 48
    for size in sizes:
        proc = await run(
            cli,
            ["ping", "-c", "4", "-i", "0.2", "-W", "2", "-s", str(size - header), target],
            check=False,
            timeout=20,
        )
        out = proc.stdout.decode()
        assert " 0 received" not in out and proc.returncode in (0, 1), out


async def transfer(
    nursery: trio.Nursery, sender: Netns, receiver: Netns, to: str, port: int = 5201
) -> float:
    """20 MB over TCP through the tunnel; returns the goodput in Mbit/s."""
    address = f"{to}:{port}" if ":" not in to else f"[{to}]:{port}"
    got, want = await tcp_transfer(
        nursery,
        receiver=receiver,
        sender=sender,
        listen=address,
        to=address,
        nbytes=NBYTES,
        seed=f"pmtu-{time.monotonic()}",
        allowed=60,
    )
    assert got["bytes"] == want["bytes"] == NBYTES
    assert got["sha256"] == want["sha256"]
    return NBYTES * 8 / got["seconds"] / 1e6


@pytest.mark.parametrize(
    ("family", "mtu"),
    # 1500: the same run over a link of full size, the goodput to compare with.
    [(4, 1280), (6, 1280), (4, 1492), (6, 1492), (4, 1500)],
    ids=lambda v: str(v),
)
async def test_a_smaller_link_on_the_way_is_found_and_bulk_transfers_flow(
    files: TunnelFiles, family: int, mtu: int
) -> None:
    server_config, client_config = configs(files, family)
    with routed_path(mtu) as (cli, rtr, srv, _), trio.fail_after(TEST_TIMEOUT):
        await start_routing(cli, rtr, srv)
        async with open_daemon_nursery() as nursery:
            server, client = await start_tunnel(nursery, cli, srv, server_config, client_config)
            expected = EXPECTED[(family, mtu)]
            session = await wait_settled(files, expected, 30)
            print(f"\nIPv{family} over a {mtu}-byte link: path MTU {expected}, "
                  f"datagram payload {session['datagram_payload']}, "
                  f"{session['pmtu_probes']} probes")  # fmt: skip

            await ping_sizes(cli, SERVER_TUN4, [1200, 1300, 1420])
            await ping_sizes(cli, SERVER_TUN6, [1280, 1420])
            up = await transfer(nursery, cli, srv, SERVER_TUN4)
            down = await transfer(nursery, srv, cli, CLIENT_TUN4)
            print(f"goodput: client to server {up:.0f} Mbit/s, server to client {down:.0f} Mbit/s")
            # Of the same order as over 1500 bytes (hundreds of Mbit/s here), not a stall.
            assert up > 30 and down > 30

            status = await cli_status(files.socket("server"))
            (seen,) = status["sessions"]
            assert seen["path_mtu"] == expected and seen["pmtu_state"] == "complete", seen
            for daemon in (client, server):
                assert daemon.returncode is None, daemon.describe()
                assert "Traceback" not in daemon.log, daemon.describe()


async def test_a_link_that_shrinks_under_a_transfer_is_noticed_and_the_transfer_completes(
    files: TunnelFiles,
) -> None:
    server_config, client_config = configs(files, 4)
    with routed_path(1500) as (cli, rtr, srv, small), trio.fail_after(TEST_TIMEOUT):
        await start_routing(cli, rtr, srv)
        async with open_daemon_nursery() as nursery:
            server, client = await start_tunnel(nursery, cli, srv, server_config, client_config)
            before = await wait_settled(files, 1452, 30)
            goodput: dict[str, float] = {}
            done = trio.Event()

            async def both_ways() -> None:
                async with trio.open_nursery() as transfers:

                    async def one(way: str, sender: Netns, receiver: Netns, to: str) -> None:
                        port = 5201 if way == "up" else 5202
                        goodput[way] = await transfer(nursery, sender, receiver, to, port)

                    transfers.start_soon(one, "up", cli, srv, SERVER_TUN4)
                    transfers.start_soon(one, "down", srv, cli, CLIENT_TUN4)
                done.set()

            nursery.start_soon(both_ways)
            # A few MB in, the router's onward link (both ends) drops to 1280.
            with trio.move_on_after(30):
                # another process's counter: nothing to wait on but the status
                while (await session_status(files))["bytes_out"] < before["bytes_out"] + 4e6:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert not done.is_set(), "the transfer ended before the link changed"
            await run(rtr, ["ip", "link", "set", small.name_a, "mtu", "1280"])
            await run(srv, ["ip", "link", "set", small.name_b, "mtu", "1280"])
            changed = time.monotonic()
            session = await wait_settled(files, 1252, 40)
            found = time.monotonic() - changed
            await done.wait()
            server_status = await cli_status(files.socket("server"))
            (seen,) = server_status["sessions"]
            print(
                f"\nlink 1500 -> 1280 mid-transfer: client 1452 -> 1252 in {found:.1f} s, "
                f"black holes: client {session['pmtu_black_holes']}, server "
                f"{seen['pmtu_black_holes']}; goodput up {goodput['up']:.0f}, down "
                f"{goodput['down']:.0f} Mbit/s"
            )
            # Both ends saw full-size packets vanish: the client's at the router, the
            # server's in its own kernel (EMSGSIZE); both came down and searched again.
            assert session["pmtu_black_holes"] >= 1 and seen["pmtu_black_holes"] >= 1, seen
            assert seen["path_mtu"] == 1252 and seen["pmtu_state"] == "complete", seen
            # Its batches of segments too large for its link (refused with EMSGSIZE) did
            # not cost it segmentation offload.
            assert server_status["udp_gso"] is True
            status = await cli_status(files.socket("client"))
            assert status["reconnects"] == 0 and status["state"] == "connected"
            for daemon in (client, server):
                assert daemon.returncode is None, daemon.describe()
                assert "Traceback" not in daemon.log, daemon.describe()
