"""A server under a flood of garbage and bogus handshakes keeps serving its real client.

client 10.77.0.2 ─┐
                  ├─ bridge in the server namespace, server 10.77.0.1:4433
attacker 10.77.0.9┘
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from tests.support import tool_argv
from tests.support.netns import (
    Netns,
    bridge,
    cli_status,
    netns,
    open_daemon_nursery,
    start_daemon,
    tcp_transfer,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.transfer import expected_sha256

PY = sys.executable
TRANSFER_BYTES = 20 * 1000 * 1000
FLOOD_SECONDS = 15
TunnelFiles = Any  # what the `files` fixture of conftest.py gives


@attrs.frozen
class Lan:
    server: Netns
    client: Netns
    attacker: Netns


@pytest.fixture
def lan() -> Iterator[Lan]:
    with netns("fls") as server, netns("flc") as client, netns("fla") as attacker:
        to_client = veth(server, client, None, "10.77.0.2/24")
        to_attacker = veth(server, attacker, None, "10.77.0.9/24")
        bridge(server, [to_client.name_a, to_attacker.name_a], "10.77.0.1/24")
        yield Lan(server, client, attacker)


async def status(files: TunnelFiles, name: str) -> dict[str, Any]:
    return await cli_status(files.socket(name))


async def test_transfer_survives_a_flood_of_garbage_and_bogus_handshakes(
    lan: Lan, files: TunnelFiles
) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(key_file=server_key.path, auth_tokens=[token])
    client_config = files.client_config(
        "client", server_id=server_key.public_id, auth_token=token, key_file=client_key.path
    )
    with trio.fail_after(120):
        async with open_daemon_nursery() as nursery:
            server = await start_daemon(
                nursery, lan.server, tunnel("server", "--config", str(server_config)),
                name="server",
            )  # fmt: skip
            await start_daemon(
                nursery, lan.client, tunnel("client", "--config", str(client_config)),
                name="client",
            )  # fmt: skip
            flooder = await start_daemon(
                nursery, lan.attacker,
                [*tool_argv("flood"), "--target", "10.77.0.1:4433",
                 "--seconds", str(FLOOD_SECONDS), "--rate", "3000"],
                name="flood",
            )  # fmt: skip
            await trio.sleep(2)  # the flood is in full swing
            got, want = await tcp_transfer(
                nursery, receiver=lan.server, sender=lan.client, listen="10.78.0.1:5201",
                to="10.78.0.1:5201", nbytes=TRANSFER_BYTES, seed="flood",
            )  # fmt: skip
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "flood")
            during = await status(files, "server")
            assert await flooder.wait() == 0, flooder.describe()
            flood = json.loads(flooder.stdout_lines[-1])
            rate = TRANSFER_BYTES * 8 / got["seconds"] / 1e6
            print(f"20 MB during the flood in {got['seconds']:.2f} s ({rate:.0f} Mbit/s); "
                  f"flood sent {flood}; server drops {during['drops']}")  # fmt: skip

            assert sum(flood.values()) > 1000, flood
            drops = during["drops"]
            assert drops.get("udp_garbage", 0) + drops.get("udp_unknown_connection", 0) > 0
            assert drops.get("handshake_limit", 0) > 0, drops  # bogus handshakes were capped
            assert during["pending_handshakes"] <= 16, during
            client = await status(files, "client")
            assert client["state"] == "connected" and client["reconnects"] == 0, client
            assert server.returncode is None
