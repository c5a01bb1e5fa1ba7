"""A client that sends everything through the tunnel (routes 0.0.0.0/0 and ::/0) while its path
to the server goes through a router: the tunnel must not swallow its own path (policy routing:
the client's marked QUIC packets skip the tunnel's table).

    client 10.76.0.2 ── router 10.76.0.1 | 10.77.0.254 ── server 10.77.0.1 (+ 10.200.0.1 on lo)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Netns,
    ip,
    ip_json,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.netns import veth as make_veth

PY = sys.executable
BEHIND_SERVER = "10.200.0.1"  # only reachable through the tunnel
TunnelFiles = Any  # what the `files` fixture of conftest.py gives


@attrs.frozen
class Routed:
    client: Netns
    router: Netns
    server: Netns


@pytest.fixture
def routed() -> Iterator[Routed]:
    with netns("rtc") as client, netns("rtr") as router, netns("rts") as server:
        make_veth(client, router, "10.76.0.2/24", "10.76.0.1/24")
        make_veth(router, server, "10.77.0.254/24", "10.77.0.1/24")
        ip(client, "route", "add", "default", "via", "10.76.0.1")
        ip(server, "route", "add", "10.76.0.0/24", "via", "10.77.0.254")
        ip(server, "addr", "add", f"{BEHIND_SERVER}/32", "dev", "lo")
        run_in(router, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        yield Routed(client, router, server)


def run_in(ns: Netns, argv: list[str]) -> None:
    subprocess.run(ns.exec_argv(argv), check=True)


def routes(ns: Netns, family: str) -> list[dict[str, Any]]:
    return ip_json(ns, family, "route", "show", "table", "main")


async def test_default_route_through_the_tunnel_keeps_the_server_reachable(
    routed: Routed, files: TunnelFiles
) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(key_file=server_key.path, auth_tokens=[token])
    client_config = files.client_config(
        "client", server_id=server_key.public_id, auth_token=token, key_file=client_key.path,
        routes=["0.0.0.0/0"], routes6=["::/0"], heartbeat_interval=1.0, heartbeat_timeout=3.0,
    )  # fmt: skip
    before4, before6 = routes(routed.client, "-4"), routes(routed.client, "-6")
    with trio.fail_after(60):
        async with open_daemon_nursery() as nursery:
            await start_daemon(
                nursery, routed.server, tunnel("server", "--config", str(server_config)),
                name="server",
            )  # fmt: skip
            client = await start_daemon(
                nursery, routed.client, tunnel("client", "--config", str(client_config)),
                name="client",
            )  # fmt: skip
            # Nothing of ours in the main table but the tunnel's own network: the defaults go
            # into our table, which every packet but our marked QUIC ones looks up first.
            assert routes(routed.client, "-4") == before4 + [
                r for r in routes(routed.client, "-4") if r.get("dev") == "tnlcli0"
            ]
            for family in ("-4", "-6"):
                ours = ip_json(routed.client, family, "route", "show", "table", "51830")
                assert [(r["dst"], r.get("dev")) for r in ours] == [("default", "tnlcli0")], ours
                rules = ip_json(routed.client, family, "rule", "show")
                assert {"priority": 32765, "src": "all", "not": None, "fwmark": "0xca76",
                        "table": "51830"} in rules, rules  # fmt: skip
                assert {"priority": 32764, "src": "all", "table": "main",
                        "suppress_prefixlen": 0} in rules, rules  # fmt: skip

            # Everything goes through the tunnel, and the tunnel keeps working: pings to an
            # address that exists only behind the server, for longer than the heartbeat timeout.
            await run(routed.client, ["ping", "-c", "20", "-i", "0.25", "-W", "2",
                                      BEHIND_SERVER], timeout=30)  # fmt: skip
            proc = await run(None, tunnel("status", "--json", "--socket",
                                          str(files.socket("client"))))  # fmt: skip
            status = json.loads(proc.stdout)
            assert status["state"] == "connected" and status["reconnects"] == 0, status

            client.terminate()
            assert await client.wait() == 0, client.describe()
    assert routes(routed.client, "-4") == before4
    assert routes(routed.client, "-6") == before6
    for family in ("-4", "-6"):
        assert ip_json(routed.client, family, "route", "show", "table", "51830") == []
        assert all(r["priority"] not in (32764, 32765)
                   for r in ip_json(routed.client, family, "rule", "show"))  # fmt: skip
