"""IPv6-only tunnel, IPv4-only destination: the server's NAT64 in real namespaces.

    client (IPv6 underlay fd77::2)  ──  server (fd77::1 | 10.79.0.1)  ──  v4host (10.79.0.2 only)

The client gets only an IPv6 tunnel address and a route for 64:ff9b::/96; the server translates to
IPv4 from 10.80.0.77 (routed into its TUN) and the IPv4-only host routes that address back to it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Netns,
    cli_status,
    ip,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.transfer import expected_sha256

PY = sys.executable
TEST_TIMEOUT = 120
V4_HOST = "10.79.0.2"
V4_HOST_VIA_NAT64 = "64:ff9b::a4f:2"  # 10.79.0.2 embedded in the well-known prefix
NAT64_SOURCE = "10.80.0.77"
TRANSFER_BYTES = 20 * 1000 * 1000
TunnelFiles = Any  # what the `files` fixture of conftest.py gives
UDP_TIMEOUT = 3.0


@attrs.frozen
class Sites:
    client: Netns
    server: Netns
    v4host: Netns


@pytest.fixture
def sites() -> Iterator[Sites]:
    with netns("n6c") as client, netns("n6s") as server, netns("n4h") as v4host:
        veth(client, server, "fd77::2/64", "fd77::1/64")
        veth(server, v4host, "10.79.0.1/24", f"{V4_HOST}/24")
        ip(v4host, "route", "add", f"{NAT64_SOURCE}/32", "via", "10.79.0.1")
        # The IPv4 host really has no IPv6, and the server forwards IPv4.
        run_sysctl(v4host, "net.ipv6.conf.all.disable_ipv6=1")
        run_sysctl(server, "net.ipv4.ip_forward=1")
        yield Sites(client, server, v4host)


def run_sysctl(ns: Netns, setting: str) -> None:
    subprocess.run([*ns.exec_argv(["sysctl", "-q", "-w", setting])], check=True)


def configs(files: TunnelFiles) -> tuple[Any, Any]:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server = files.server_config(
        listen="[fd77::1]:4433", network=None, network6="fd78::/64",
        key_file=server_key.path, auth_tokens=[token],
    )  # fmt: skip
    with server.open("a") as toml:
        toml.write(
            f'\n[nat64]\nenabled = true\nsource_ip = "{NAT64_SOURCE}"\n'
            f"udp_timeout = {UDP_TIMEOUT}\nicmp_timeout = {UDP_TIMEOUT}\n"
        )
    client = files.client_config(
        "client", server="[fd77::1]:4433", server_id=server_key.public_id, auth_token=token,
        key_file=client_key.path, routes6=["64:ff9b::/96"],
    )  # fmt: skip
    return server, client


async def server_status(files: TunnelFiles) -> dict[str, Any]:
    return await cli_status(files.socket("server"))


UDP_ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"s.bind(('{V4_HOST}', 7007))\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    data, peer = s.recvfrom(2048)\n"
    "    s.sendto(data.upper(), peer)\n"
)
UDP_ASK = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "s.settimeout(3)\n"
    f"s.sendto(b'hello over nat64', ('{V4_HOST_VIA_NAT64}', 7007))\n"
    "print(s.recvfrom(2048)[0].decode())\n"
)


async def test_ipv6_only_client_reaches_ipv4_only_host(sites: Sites, files: TunnelFiles) -> None:
    server_config, client_config = configs(files)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_daemon(
                nursery, sites.server,
                tunnel("server", "--config", str(server_config), "--log-level", "debug"),
                name="server",
            )  # fmt: skip
            await start_daemon(
                nursery, sites.client, tunnel("client", "--config", str(client_config)),
                name="client",
            )  # fmt: skip
            status = await server_status(files)
            (session,) = status["sessions"]
            assert session["addresses"] == ["fd78::2"]  # IPv6 only
            assert status["nat64"]["source_ip"] == NAT64_SOURCE

            # ping: ICMPv6 echo <-> ICMPv4 echo
            await run(sites.client, ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                                     V4_HOST_VIA_NAT64], timeout=20)  # fmt: skip
            # 3000-byte pings: the client's kernel sends IPv6 fragments, the translator
            # reassembles them; the answer comes back as IPv4 fragments, reassembled too.
            await run(sites.client, ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2",
                                     "-s", "3000", V4_HOST_VIA_NAT64], timeout=20)  # fmt: skip
            table = (await server_status(files))["nat64"]
            assert table["fragments_reassembled_out"] >= 3, table
            assert table["fragments_reassembled_in"] >= 3, table
            assert table["fragments_waiting"] == 0, table
            assert table.get("nat64_fragment", 0) == 0, table

            # UDP echo
            nursery.start_soon(_udp_echo_server, sites.v4host)
            await trio.sleep(0.5)
            answer = await run(sites.client, [PY, "-c", UDP_ASK], timeout=10)
            assert answer.stdout.decode().strip() == "HELLO OVER NAT64"

            # 20 MB of TCP, byte-identical
            got, want = await tcp_transfer(
                nursery, receiver=sites.v4host, sender=sites.client, listen=f"{V4_HOST}:5201",
                to=f"[{V4_HOST_VIA_NAT64}]:5201", nbytes=TRANSFER_BYTES, seed="nat64",
            )  # fmt: skip
            assert got["bytes"] == TRANSFER_BYTES
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "nat64")
            rate = TRANSFER_BYTES * 8 / got["seconds"] / 1e6
            print(f"20 MB through NAT64 in {got['seconds']:.2f} s ({rate:.0f} Mbit/s)")

            # the table: mappings while in use, gone after their timeout
            table = (await server_status(files))["nat64"]
            assert table["udp"] >= 1 and table["tcp"] >= 1, table
            assert table["translated_out"] > 0 and table["translated_in"] > 0, table
            await trio.sleep(UDP_TIMEOUT + 2.5)
            table = (await server_status(files))["nat64"]
            assert table["udp"] == 0 and table["icmp"] == 0, table
            assert table["expired"] >= 2, table
            assert server.returncode is None


async def _udp_echo_server(ns: Netns) -> None:
    await run(ns, [PY, "-c", UDP_ECHO], check=False, timeout=TEST_TIMEOUT)


async def test_server_says_when_ipv4_forwarding_is_off(sites: Sites, files: TunnelFiles) -> None:
    run_sysctl(sites.server, "net.ipv4.ip_forward=0")
    server_config, _ = configs(files)
    with trio.fail_after(30):
        async with open_daemon_nursery() as nursery:
            server = await start_daemon(
                nursery, sites.server, tunnel("server", "--config", str(server_config)),
                name="server",
            )  # fmt: skip
            warnings = [line for line in server.log.splitlines() if "forwarding is off" in line]
            assert len(warnings) == 1, server.log
