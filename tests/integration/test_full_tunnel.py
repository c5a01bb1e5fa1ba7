"""A full tunnel on real namespaces: pushed DNS, the kill switch, a gateway change under the
tunnel, and the server as the exit to a host beyond it.

    client C  10.71.0.2 ── 10.71.0.1  router R  10.73.0.254 ── 10.73.0.1  server S
              10.72.0.2 ── 10.72.0.1  (a second uplink)        10.75.0.1 ── 10.75.0.2  outside O

The tunnel network is 10.74.0.0/24 (S is 10.74.0.1). O has no route back to it: only the
server's masquerade lets the client reach O. R stands for "the internet outside the tunnel".
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.support.dbus import private_system_bus
from tests.support.netns import (
    Daemon,
    Netns,
    ip,
    netns,
    open_daemon_nursery,
    poll_until,
    run,
    start_daemon,
    tcp_transfer,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.netns import veth as make_veth
from tunnel.daemon.control import query_status

pytestmark = pytest.mark.netns

TunnelFiles = Any  # what the `files` fixture of conftest.py gives
TEST_TIMEOUT = 90
SERVER_TUN4 = "10.74.0.1"
OUTSIDE = "10.75.0.2"  # beyond the server, no route back to the tunnel network
ROUTER = "10.71.0.1"  # outside the tunnel, one hop from the client
FWMARK = 51830  # the default mark and table
ORIGINAL_RESOLV = b"# the network's own resolver\nnameserver 10.71.0.53\noptions edns0\n"
NO_BUS = "unix:path=/nonexistent/tunnel-test-bus"  # no systemd-resolved: the file backend


@attrs.frozen
class ExitNet:
    client: Netns
    router: Netns
    server: Netns
    outside: Netns
    uplink2: str  # the client's end of the second uplink


@pytest.fixture
def exitnet() -> Iterator[ExitNet]:
    with (
        netns("ftc") as client,
        netns("ftr") as router,
        netns("fts") as server,
        netns("fto") as outside,
    ):
        make_veth(client, router, "10.71.0.2/24", "10.71.0.1/24")
        second = make_veth(client, router, "10.72.0.2/24", "10.72.0.1/24")
        make_veth(router, server, "10.73.0.254/24", "10.73.0.1/24")
        make_veth(server, outside, "10.75.0.1/24", "10.75.0.2/24")
        ip(client, "route", "add", "default", "via", ROUTER)
        ip(server, "route", "add", "10.71.0.0/24", "via", "10.73.0.254")
        ip(server, "route", "add", "10.72.0.0/24", "via", "10.73.0.254")
        sysctl(router, "net.ipv4.ip_forward", "1")
        yield ExitNet(client, router, server, outside, second.name_a)


def sysctl(ns: Netns, name: str, value: str) -> None:
    subprocess.run(ns.exec_argv(["sysctl", "-q", "-w", f"{name}={value}"]), check=True)


async def read_sysctl(ns: Netns, name: str) -> str:
    proc = await run(ns, ["cat", "/proc/sys/" + name.replace(".", "/")])
    return proc.stdout.decode().strip()


@contextlib.contextmanager
def netns_resolv_conf(ns: Netns, content: bytes) -> Iterator[Path]:
    """/etc/netns/NAME/resolv.conf, which `ip netns exec NAME` mounts over /etc/resolv.conf."""
    directory = Path("/etc/netns") / ns.name
    directory.mkdir(parents=True)
    path = directory / "resolv.conf"
    path.write_bytes(content)
    try:
        yield path
    finally:
        shutil.rmtree(directory)


def server_config(files: TunnelFiles, creds: dict[str, Any], **settings: Any) -> Path:
    return files.server_config(
        listen="10.73.0.1:4433", key_file=creds["server"].path, auth_tokens=[creds["token"]],
        network="10.74.0.0/24", **settings,
    )  # fmt: skip


def client_config(files: TunnelFiles, creds: dict[str, Any], **settings: Any) -> Path:
    values: dict[str, Any] = {
        "server": "10.73.0.1:4433", "server_id": creds["server"].public_id,
        "auth_token": creds["token"], "key_file": creds["client"].path,
        "routes": ["0.0.0.0/0"], "tun_name": "ft0", "heartbeat_interval": 0.5,
        "heartbeat_timeout": 2.0, "auto_reconnect": True,
    }  # fmt: skip
    values.update(settings)
    return files.client_config("client", **values)


@pytest.fixture
def creds(files: TunnelFiles) -> dict[str, Any]:
    return {"server": files.key("server"), "client": files.key("client"), "token": files.token()}


async def start_server(nursery: trio.Nursery, net: ExitNet, config: Path) -> Daemon:
    return await start_daemon(
        nursery, net.server, tunnel("server", "--config", str(config)), name="server"
    )


async def start_client(
    nursery: trio.Nursery, net: ExitNet, config: Path, *, bus: str = NO_BUS
) -> Daemon:
    argv = ["env", f"DBUS_SYSTEM_BUS_ADDRESS={bus}", *tunnel("client", "--config", str(config))]
    return await start_daemon(nursery, net.client, argv, name="client")


async def client_state(files: TunnelFiles) -> str | None:
    try:
        return str((await query_status(files.socket("client")))["state"])
    except OSError:
        return None


async def pings(ns: Netns, target: str, *, count: int = 1, wait: int = 2) -> bool:
    proc = await run(
        ns, ["ping", "-4", "-n", "-c", str(count), "-W", str(wait), target], check=False,
        timeout=count * wait + 10,
    )  # fmt: skip
    return proc.returncode == 0


async def nft_ruleset(ns: Netns) -> str:
    return (await run(ns, ["nft", "list", "ruleset"])).stdout.decode()


async def resolv_conf_seen(ns: Netns) -> bytes:
    """/etc/resolv.conf as the namespace's processes see it."""
    return (await run(ns, ["cat", "/etc/resolv.conf"])).stdout


# --- DNS --------------------------------------------------------------------------------------


async def test_pushed_dns_is_applied_and_restored_on_sigterm_and_after_sigkill(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    assert shutil.which("resolvconf") is None, "this test covers the file backend"
    with netns_resolv_conf(exitnet.client, ORIGINAL_RESOLV), trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(
                nursery, exitnet,
                server_config(files, creds, dns=[SERVER_TUN4], dns_search=["corp.example"]),
            )  # fmt: skip
            config = client_config(files, creds)
            client = await start_client(nursery, exitnet, config)
            seen = await resolv_conf_seen(exitnet.client)
            assert f"nameserver {SERVER_TUN4}\n".encode() in seen, seen
            assert b"search corp.example\n" in seen, seen
            assert b"10.71.0.53" not in seen, seen
            assert b"options edns0\n" in seen, seen
            status = await query_status(files.socket("client"))
            assert status["dns"] == {
                "servers": [SERVER_TUN4], "search": ["corp.example"], "backend": "file",
            }, status  # fmt: skip

            client.terminate()
            assert await client.wait() == 0, client.describe()
            assert await resolv_conf_seen(exitnet.client) == ORIGINAL_RESOLV

            client = await start_client(nursery, exitnet, config)
            assert b"corp.example" in await resolv_conf_seen(exitnet.client)
            client.kill()
            assert await client.wait() == -signal.SIGKILL
            assert b"corp.example" in await resolv_conf_seen(exitnet.client)  # nobody undid it

            # The next run restores it first (then applies it again once connected) ...
            client = await start_client(nursery, exitnet, config)
            assert "restored the DNS configuration a previous client left" in client.log
            client.kill()
            assert await client.wait() == -signal.SIGKILL
            # ... and so does --cleanup, without connecting.
            cleanup = await run(
                exitnet.client, tunnel("client", "--cleanup", "--config", str(config))
            )
            assert b"DNS configuration" in cleanup.stdout, cleanup
            assert await resolv_conf_seen(exitnet.client) == ORIGINAL_RESOLV
            assert not any((files.dir / "state").glob("*.json")), "a state file was left"


async def test_pushed_dns_goes_to_systemd_resolved_over_dbus(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    with private_system_bus() as (bus, record), trio.fail_after(TEST_TIMEOUT):
        assert record is not None
        async with open_daemon_nursery() as nursery:
            await start_server(
                nursery, exitnet,
                server_config(files, creds, dns=[SERVER_TUN4], dns_search=["corp.example"]),
            )  # fmt: skip
            client = await start_client(nursery, exitnet, client_config(files, creds), bus=bus)
            status = await query_status(files.socket("client"))
            assert status["dns"]["backend"] == "resolved", status
            links = json_file(record)
            index = tun_index(exitnet.client, "ft0")
            assert links[str(index)]["dns"] == [SERVER_TUN4], links
            assert ["corp.example", False] in links[str(index)]["domains"], links
            assert ["~.", True] in links[str(index)]["domains"], links  # a full tunnel
            assert links[str(index)]["default_route"] is True, links
            client.terminate()
            assert await client.wait() == 0, client.describe()
            assert str(index) not in json_file(record), "the link was not reverted"


def json_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def tun_index(ns: Netns, name: str) -> int:
    proc = ip(ns, "-j", "link", "show", name)
    return int(json.loads(proc.stdout)[0]["ifindex"])


# --- the kill switch ----------------------------------------------------------------------------


async def test_kill_switch_holds_while_reconnecting_and_after_sigkill_and_opens_on_stop(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    c = exitnet.client
    before = await nft_ruleset(c)
    assert await pings(c, ROUTER), "the test network itself does not work"
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            s_config = server_config(files, creds)
            server = await start_server(nursery, exitnet, s_config)
            config = client_config(files, creds, kill_switch=True)
            client = await start_client(nursery, exitnet, config)
            assert await pings(c, SERVER_TUN4), "no ping through the tunnel"
            assert not await pings(c, ROUTER, wait=1), "the kill switch let a ping out"

            server.kill()
            assert await server.wait() == -signal.SIGKILL
            await poll_until(
                lambda: _state_is(files, "reconnecting"), "the client to notice", within=20
            )
            assert not await pings(c, ROUTER, wait=1), "out in the clear while reconnecting"
            assert not await pings(c, OUTSIDE, wait=1)

            client.kill()
            assert await client.wait() == -signal.SIGKILL
            assert not await pings(c, ROUTER, wait=1), "out in the clear after SIGKILL"

            # A new run takes the switch over (never a gap), and a clean stop opens it.
            server = await start_server(nursery, exitnet, s_config)
            client = await start_client(nursery, exitnet, config)
            assert await pings(c, SERVER_TUN4)
            assert not await pings(c, ROUTER, wait=1)
            client.terminate()
            assert await client.wait() == 0, client.describe()
            assert await pings(c, ROUTER), "still closed after a clean stop"
    assert await nft_ruleset(c) == before


async def test_cleanup_removes_the_kill_switch_a_killed_client_left(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    c = exitnet.client
    before = await nft_ruleset(c)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(nursery, exitnet, server_config(files, creds))
            config = client_config(files, creds, kill_switch=True)
            client = await start_client(nursery, exitnet, config)
            client.kill()
            assert await client.wait() == -signal.SIGKILL
        assert not await pings(c, ROUTER, wait=1)
        cleanup = await run(c, tunnel("client", "--cleanup", "--config", str(config)))
        assert b"kill switch" in cleanup.stdout, cleanup
        assert await pings(c, ROUTER)
    assert await nft_ruleset(c) == before


async def _state_is(files: TunnelFiles, wanted: str) -> bool:
    return await client_state(files) == wanted


# --- routing ------------------------------------------------------------------------------------


async def test_full_tunnel_uses_policy_routing_and_survives_a_gateway_change(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    c = exitnet.client
    rules_before = ip(c, "rule", "show").stdout + ip(c, "-6", "rule", "show").stdout
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(nursery, exitnet, server_config(files, creds))
            client = await start_client(nursery, exitnet, client_config(files, creds))
            rules = ip(c, "rule", "show").stdout
            assert f"not from all fwmark {FWMARK:#x} lookup {FWMARK}" in rules, rules
            assert "from all lookup main suppress_prefixlength 0" in rules, rules
            assert "default dev ft0" in ip(c, "route", "show", "table", str(FWMARK)).stdout
            # No IPv6 default through the tunnel: IPv6 is refused, not sent in the clear.
            six = ip(c, "-6", "route", "show", "table", str(FWMARK)).stdout
            assert "unreachable default" in six, six
            # No host route pins the server to the gateway of the moment.
            assert "10.73.0.1" not in ip(c, "route", "show", "table", "main").stdout
            assert await pings(c, SERVER_TUN4)

            # The underlay's gateway moves to the second uplink; the first one goes dark.
            ip(c, "route", "replace", "default", "via", "10.72.0.1", "dev", exitnet.uplink2)
            ip(c, "link", "set", first_uplink(c, exitnet.uplink2), "down")
            assert await pings(c, SERVER_TUN4, count=1, wait=10), client.describe()
            assert await client_state(files) == "connected"
            client.terminate()
            assert await client.wait() == 0, client.describe()
    assert ip(c, "rule", "show").stdout + ip(c, "-6", "rule", "show").stdout == rules_before


def first_uplink(ns: Netns, other: str) -> str:
    links = json.loads(ip(ns, "-j", "link", "show").stdout)
    names = [link["ifname"] for link in links if link["ifname"].startswith("veth")]
    (first,) = [name for name in names if name != other]
    return str(first)


# --- the exit node ------------------------------------------------------------------------------


async def test_server_as_exit_node_masquerades_to_a_host_with_no_route_back(
    exitnet: ExitNet, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    s = exitnet.server
    ruleset_before = await nft_ruleset(s)
    assert await read_sysctl(s, "net.ipv4.ip_forward") == "0"
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_server(
                nursery, exitnet, server_config(files, creds, masquerade=True)
            )
            assert await read_sysctl(s, "net.ipv4.ip_forward") == "1"
            await start_client(nursery, exitnet, client_config(files, creds))
            got, sent = await send_to_outside(nursery, exitnet)
            assert got["bytes"] == sent["bytes"] == FIVE_MB, (got, sent)
            assert got["sha256"] == sent["sha256"], (got, sent)
            server.terminate()
            assert await server.wait() == 0, server.describe()
    assert await nft_ruleset(s) == ruleset_before
    assert await read_sysctl(s, "net.ipv4.ip_forward") == "0"


FIVE_MB = 5 * 1024 * 1024


async def send_to_outside(
    nursery: trio.Nursery, net: ExitNet
) -> tuple[dict[str, Any], dict[str, Any]]:
    """5 MB from the client to the outside host, over a connection the client opens: the
    outside host only ever sees the server's address, and has no route to the tunnel."""
    return await tcp_transfer(
        nursery, receiver=net.outside, sender=net.client, listen="10.75.0.2:5202",
        to="10.75.0.2:5202", nbytes=FIVE_MB, seed="exit-node",
    )  # fmt: skip
