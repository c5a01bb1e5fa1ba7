"""A server bound to a wildcard address on a host with several addresses answers each client
from the address that client sent to, on IPv4, IPv4-mapped (dual-stack) and IPv6.

    client 198.18.0.2, fd18::2 ── server 198.18.0.1 + 198.18.0.99, fd18::1 + fd18::99

The kernel would answer a datagram to 198.18.0.99 from 198.18.0.1 (routing picks the primary
address), and one to fd18::99 from fd18::1 (of equally good candidates, the address added
last); a connected UDP socket, like a QUIC client, drops those answers. First the socket layer
alone (an echo on :class:`tunnel.daemon.udp.UdpEndpoint`, see pktinfo_echo.py), then the real
daemons.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Netns,
    ip_json,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel

PY = sys.executable
ECHO = str(Path(__file__).resolve().parent / "pktinfo_echo.py")
PORT = 4433
PRIMARY4, SECONDARY4 = "198.18.0.1", "198.18.0.99"
PRIMARY6, SECONDARY6 = "fd18::1", "fd18::99"
SERVER_ADDRESSES = (PRIMARY4, SECONDARY4, PRIMARY6, SECONDARY6)
CLIENT4, CLIENT6 = "198.18.0.2", "fd18::2"
SERVER_TUN4 = "10.78.0.1"
TunnelFiles = Any  # what the `files` fixture of conftest.py gives


@attrs.frozen
class Pair:
    server: Netns
    client: Netns


@pytest.fixture
def pair() -> Iterator[Pair]:
    with netns("sas") as server, netns("sac") as client:
        veth(
            server, client,
            # IPv4: the first address of a subnet is its primary; IPv6: the last one added wins
            [f"{PRIMARY4}/24", f"{SECONDARY4}/24", f"{SECONDARY6}/64", f"{PRIMARY6}/64"],
            [f"{CLIENT4}/24", f"{CLIENT6}/64"],
        )  # fmt: skip
        # Without the routed source being the primary, this file would test nothing.
        for client_address, primary in ((CLIENT4, PRIMARY4), (CLIENT6, PRIMARY6)):
            (route,) = ip_json(server, "route", "get", client_address)
            assert route["prefsrc"] == primary, route
        yield Pair(server, client)


async def ask(ns: Netns, target: str, *, connected: bool) -> dict[str, Any]:
    argv = [PY, ECHO, "ask", "--to", target, "--port", str(PORT), "--wait", "3"]
    proc = await run(ns, [*argv, "--connected"] if connected else argv, timeout=15)
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def seen_as(listen: str, target: str) -> str:
    """How the echo names the local address ``target`` (v4-mapped on a dual-stack socket)."""
    return f"::ffff:{target}" if listen == "::" and ":" not in target else target


@pytest.mark.parametrize(
    ("listen", "targets"),
    [("::", SERVER_ADDRESSES), ("0.0.0.0", (PRIMARY4, SECONDARY4))],
    ids=["dual-stack", "ipv4"],
)
async def test_answers_leave_from_each_address_the_client_sent_to(
    pair: Pair, listen: str, targets: tuple[str, ...]
) -> None:
    with trio.fail_after(60):
        async with open_daemon_nursery() as nursery:
            await start_daemon(
                nursery, pair.server, [PY, ECHO, "serve", "--listen", listen, "--port", str(PORT)],
                name="echo",
            )  # fmt: skip
            for target in targets:
                got = await ask(pair.client, target, connected=True)
                assert got["error"] is None, (target, got)
                local = seen_as(listen, target)
                # a GSO batch of four, every one from the target, in order
                assert got["answers"] == [[f"{local}|hello|{i}", target] for i in range(4)]


async def test_without_packet_info_answers_leave_from_the_routed_address(pair: Pair) -> None:
    # The control: in this topology the kernel's own choice is wrong for the secondaries.
    with trio.fail_after(60):
        async with open_daemon_nursery() as nursery:
            await start_daemon(
                nursery, pair.server,
                [PY, ECHO, "serve", "--listen", "::", "--port", str(PORT), "--plain"],
                name="echo",
            )  # fmt: skip
            for target, routed in ((SECONDARY4, PRIMARY4), (SECONDARY6, PRIMARY6)):
                got = await ask(pair.client, target, connected=False)
                assert got["error"] is None, (target, got)
                assert {host for _, host in got["answers"]} == {routed}, (target, got)


@pytest.mark.parametrize(
    "server",
    [f"{PRIMARY4}:{PORT}", f"{SECONDARY4}:{PORT}", f"[{SECONDARY6}]:{PORT}"],
    ids=["primary-v4", "secondary-v4", "secondary-v6"],
)
async def test_a_client_of_a_secondary_address_connects_and_pings(
    pair: Pair, files: TunnelFiles, server: str
) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(
        key_file=server_key.path, auth_tokens=[token], listen=f"[::]:{PORT}"
    )
    client_config = files.client_config(
        "client", server=server, server_id=server_key.public_id, auth_token=token,
        key_file=client_key.path,
    )  # fmt: skip
    with trio.fail_after(60):
        async with open_daemon_nursery() as nursery:
            await start_daemon(
                nursery, pair.server,
                tunnel("server", "--config", str(server_config), "--log-level", "debug"),
                name="server",
            )  # fmt: skip
            client = await start_daemon(
                nursery, pair.client,
                tunnel("client", "--config", str(client_config), "--log-level", "debug"),
                name="client",
            )  # fmt: skip
            await run(pair.client, ["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_TUN4],
                      timeout=20)  # fmt: skip
            client.terminate()
            assert await client.wait() == 0, client.describe()
