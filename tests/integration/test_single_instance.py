"""One client daemon per config and network namespace: a second one with the same config in the
same namespace is refused before it touches anything; one in another namespace runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Netns,
    bridge,
    ip_json,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel

PY = sys.executable
TunnelFiles = Any  # what the `files` fixture of conftest.py gives


@attrs.frozen
class Hosts:
    server: Netns
    a: Netns
    b: Netns


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with netns("sis") as server, netns("sia") as a, netns("sib") as b:
        va = veth(server, a, None, "10.77.0.2/24")
        vb = veth(server, b, None, "10.77.0.3/24")
        bridge(server, [va.name_a, vb.name_a], "10.77.0.1/24")
        yield Hosts(server, a, b)


def default_socket_of(ns: Netns) -> Path:
    """Where a daemon in ``ns`` with the default control_socket listens."""
    inode = subprocess.run(
        ns.exec_argv(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(f"/run/tunnel/client-{inode}.sock")


async def test_same_config_twice_is_refused_but_other_namespaces_run(
    hosts: Hosts, files: TunnelFiles
) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(key_file=server_key.path, auth_tokens=[token])
    # No control_socket: the default, which carries the network namespace.
    config = files.client_config(
        "client", server_id=server_key.public_id, auth_token=token, key_file=client_key.path,
        control_socket=None, tun_name="tnlcli%d",
    )  # fmt: skip
    with trio.fail_after(60):
        async with open_daemon_nursery() as nursery:
            await start_daemon(
                nursery,
                hosts.server,
                tunnel("server", "--config", str(server_config)),
                name="server",
            )
            await start_daemon(
                nursery, hosts.a, tunnel("client", "--config", str(config)), name="first"
            )
            second = await run(hosts.a, tunnel("client", "--config", str(config)), check=False,
                               timeout=20)  # fmt: skip
            assert second.returncode == 100
            assert b"another daemon is already running" in second.stderr, second.stderr
            # The refused one left nothing: still exactly one TUN device in that namespace.
            links = [link["ifname"] for link in ip_json(hosts.a, "link")]
            assert [name for name in links if name.startswith("tnlcli")] == ["tnlcli0"]

            await start_daemon(
                nursery, hosts.b, tunnel("client", "--config", str(config)), name="elsewhere"
            )
            for ns in (hosts.a, hosts.b):
                status = await run(ns, tunnel("status", "--json"))
                assert b'"state": "connected"' in status.stdout
            assert default_socket_of(hosts.a) != default_socket_of(hosts.b)
