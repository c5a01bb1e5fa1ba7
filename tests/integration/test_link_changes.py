"""The client's link goes down for longer than the heartbeat timeout, then comes back.

    cli: 10.77.0.2/24 ── veth ── srv: 10.77.0.1/24   server on 10.77.0.1:4433

While the link is down every handshake is lost and the reconnect backoff grows; when the link
comes back the client hears it from netlink and connects at once, instead of waiting out its
backoff or a handshake whose retransmissions were spent while the link was down.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from tests.support.netns import (
    cli_status,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel
from tunnel.daemon.control import query_status

TunnelFiles = Any  # conftest's fixture types (tests/ is not a package)

TEST_TIMEOUT = 90
SERVER_IP, PORT, SERVER_TUN4 = "10.77.0.1", 4433, "10.78.0.1"
BACK_WITHIN_S = 2.0


async def state(files: TunnelFiles) -> dict[str, Any]:
    return await query_status(files.socket("client"))


async def wait_until(predicate: Any, what: str, within: float) -> None:
    """Poll the client's status (another process: no event to wait on)."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def test_tunnel_is_back_within_two_seconds_of_the_link(files: TunnelFiles) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(
        key_file=server_key.path, auth_tokens=[token], listen=f"{SERVER_IP}:{PORT}"
    )
    client_config = files.client_config(
        "client",
        server=f"{SERVER_IP}:{PORT}",
        server_id=server_key.public_id,
        auth_token=token,
        key_file=client_key.path,
        auto_reconnect=True,
        heartbeat_interval=1.0,
        heartbeat_timeout=3.0,
        handshake_timeout=10.0,
    )
    with netns("lkc") as cli, netns("lks") as srv, trio.fail_after(TEST_TIMEOUT):
        link = veth(cli, srv, "10.77.0.2/24", f"{SERVER_IP}/24")
        async with open_daemon_nursery() as nursery:
            argv = tunnel("server", "--config", str(server_config), "--log-level", "debug")
            await start_daemon(nursery, srv, argv, name="server")
            argv = tunnel("client", "--config", str(client_config), "--log-level", "debug")
            client = await start_daemon(nursery, cli, argv, name="client")
            await run(cli, ["ping", "-c", "2", "-i", "0.2", "-W", "2", SERVER_TUN4], timeout=20)

            await run(cli, ["ip", "link", "set", link.name_a, "down"])

            async def lost() -> bool:
                status = await state(files)
                return status["state"] != "connected" and status["reconnects"] >= 2

            # down past the heartbeat timeout and a few failed attempts (the backoff grows)
            await wait_until(lost, "the session to be lost and retried twice", 30)
            await run(cli, ["ip", "link", "set", link.name_a, "up"])
            up = time.monotonic()

            async def connected() -> bool:
                return (await state(files))["state"] == "connected"

            await wait_until(connected, "the tunnel to come back", 10)
            back = time.monotonic() - up
            print(f"\ntunnel back {back:.2f} s after the link")
            assert back < BACK_WITHIN_S, client.describe()
            await run(cli, ["ping", "-c", "2", "-i", "0.2", "-W", "2", SERVER_TUN4], timeout=20)
            assert (await cli_status(files.socket("client")))["state"] == "connected"
            assert client.returncode is None and "Traceback" not in client.log, client.describe()
