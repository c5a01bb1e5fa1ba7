"""Hostile peers that complete the QUIC handshake and then break the protocol.

Each attack of tests/integration/hostile_peer.py runs once, on a fresh connection, from a
namespace of its own, against a server that already serves one real client::

    srv: br0 10.77.0.1/24 ─┬─ veth ── cli: 10.77.0.2/24   the real client (tnlcli0)
         tnlsrv0            └─ veth ── hos: 10.77.0.3/24   the hostile peer

The hostile peer never authenticates, so every one of its connections must end with the
server closing it: a protocol-error close (CLOSE_PROTOCOL), a QUIC transport error (such as
STREAM_LIMIT_ERROR for too many streams) or, at the latest, the handshake timeout (3 s here).
Afterwards the server still runs, never logged a traceback, holds no half-open handshakes,
let none of the flood's IP packets through, and carries the real client's 20 MB transfer
byte-identical.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Daemon,
    Netns,
    cli_status,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
)
from tests.support.netns import (
    star as netns_star,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.transfer import expected_sha256
from tunnel.core.messages import CLOSE_HANDSHAKE_TIMEOUT, CLOSE_PROTOCOL
from tunnel.daemon.control import query_status
from tunnel.errors import TunnelError

TunnelFiles = Any  # what conftest's `files` fixture gives (tests/ is not a package)

PY = sys.executable
HOSTILE_PEER = Path(__file__).resolve().with_name("hostile_peer.py")
ATTACKS = (
    "stop-sending-after-ping",
    "reset-control",
    "many-streams",
    "huge-frame",
    "ping-flood",
    "datagram-flood",
)
SERVER_ADDR = "10.77.0.1:4433"
SERVER_TUN4 = "10.78.0.1"
HANDSHAKE_TIMEOUT = 3.0
HOSTILE_TIMEOUT = 10.0  # what one hostile run may take; the server should close it sooner
TRANSFER_BYTES = 20 * 1000 * 1000
# Six attacks of at most HOSTILE_TIMEOUT, the transfer, start-up and cleanup.
TEST_TIMEOUT = 6 * (HOSTILE_TIMEOUT + 5) + 90
SINK_PORT = 9999  # where hostile_peer.py's IP-looking datagrams are addressed

# Prints every UDP payload arriving on SINK_PORT (IPv4 and IPv6), one a line.
UDP_SINK = textwrap.dedent(
    f"""
    import os, select, socket, sys
    fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
    socks = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, {SINK_PORT}))
        socks.append(s)
    os.write(fd, b"\\n")
    os.close(fd)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, peer = s.recvfrom(65535)
            print(data[:16].decode(errors="replace"), peer[0], flush=True)
    """
)


@attrs.frozen
class Lan:
    server: Netns
    client: Netns
    hostile: Netns


@pytest.fixture
def lan() -> Iterator[Lan]:
    leaves = ["10.77.0.2/24", "10.77.0.3/24"]
    with netns_star("hps", ["hpc", "hph"], "10.77.0.1/24", leaves) as (srv, (cli, hos)):
        yield Lan(srv, cli, hos)


async def ping(ns: Netns, target: str, count: int = 3) -> None:
    await run(ns, ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "2", target], timeout=20)


async def wait_for(predicate: Any, what: str, within: float) -> None:
    """Poll an async predicate until true; fail naming ``what`` after ``within`` s.

    Polling because the state lives in another process: there is no event to wait on."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.1)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def attack(lan: Lan, name: str) -> dict[str, Any]:
    """Run one attack from the hostile namespace; its report (checked to be one)."""
    argv = [PY, str(HOSTILE_PEER), "--server", SERVER_ADDR, "--attack", name,
            "--timeout", str(HOSTILE_TIMEOUT)]  # fmt: skip
    proc = await run(lan.hostile, argv, check=False, timeout=HOSTILE_TIMEOUT + 10)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"hostile peer ({name}) exited {proc.returncode}\n{out}\n{err}"
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


async def answers(socket_path: Path) -> bool:
    """Does the daemon still answer on its control socket? (A crashed one closed it.)"""
    try:
        await query_status(socket_path)
    except (TunnelError, trio.TooSlowError):
        return False
    return True


def close_problem(report: dict[str, Any]) -> str | None:
    """What is wrong with how the server ended a hostile connection, or None."""
    if not (report.get("handshake") and report.get("server_hello")):
        return "the QUIC handshake or the ServerHello did not happen (test setup?)"
    if report.get("closed_by") != "server":
        return f"the server did not close the connection (closed_by {report.get('closed_by')})"
    code = report["error_code"]
    if report["close_kind"] == "application":
        if code not in (CLOSE_PROTOCOL, CLOSE_HANDSHAKE_TIMEOUT):
            return f"closed with application code {code:#x}, not a protocol error or timeout"
    elif code == 0:
        return "closed with transport NO_ERROR, not an error"
    if report.get("close_after_s", 0) > HANDSHAKE_TIMEOUT + 2:
        took = report["close_after_s"]
        return f"closed only after {took} s (handshake timeout {HANDSHAKE_TIMEOUT:g} s)"
    return None


async def test_hostile_peers_do_not_hurt_the_server_or_its_client(
    lan: Lan, files: TunnelFiles
) -> None:
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(
        key_file=server_key.path, auth_tokens=[token], handshake_timeout=HANDSHAKE_TIMEOUT
    )
    client_config = files.client_config(
        "client", server_id=server_key.public_id, auth_token=token, key_file=client_key.path
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server: Daemon = await start_daemon(
                nursery, lan.server,
                tunnel("server", "--config", str(server_config), "--log-level", "debug"),
                name="server",
            )  # fmt: skip
            client: Daemon = await start_daemon(
                nursery, lan.client,
                tunnel("client", "--config", str(client_config), "--log-level", "debug"),
                name="client",
            )  # fmt: skip
            sink = await start_daemon(nursery, lan.server, [PY, "-c", UDP_SINK], name="sink")
            await ping(lan.client, SERVER_TUN4)

            reports: dict[str, dict[str, Any]] = {}
            for name in ATTACKS:
                reports[name] = await attack(lan, name)
                print(f"\n{name}: {json.dumps(reports[name], sort_keys=True)}")
                if not await answers(files.socket("server")):
                    break  # the rest would only fail to connect
            summary = "\n".join(f"  {name}: {report}" for name, report in reports.items())
            assert server.returncode is None and await answers(files.socket("server")), (
                f"the server stopped answering after {list(reports)[-1]}\n{summary}\n"
                f"{server.describe()}"
            )
            assert "Traceback" not in server.log, f"{summary}\n{server.describe()}"

            async def handshakes_cleaned_up() -> bool:
                return (await query_status(files.socket("server")))["pending_handshakes"] == 0

            await wait_for(handshakes_cleaned_up, "the hostile handshakes to be dropped",
                           within=HANDSHAKE_TIMEOUT + 3)  # fmt: skip
            st = await cli_status(files.socket("server"))
            assert [s["client_id"] for s in st["sessions"]] == [client_key.public_id], st

            assert client.returncode is None, client.describe()
            cst = await cli_status(files.socket("client"))
            assert cst["state"] == "connected" and cst["reconnects"] == 0, cst
            got, want = await tcp_transfer(
                nursery, receiver=lan.server, sender=lan.client,
                listen=f"{SERVER_TUN4}:5201", to=f"{SERVER_TUN4}:5201",
                nbytes=TRANSFER_BYTES, seed="hostile",
            )  # fmt: skip
            assert got["bytes"] == TRANSFER_BYTES
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "hostile")

            # nothing the unauthenticated flood sent reached the server's network stack
            assert not sink.stdout_lines, f"packets leaked: {sink.stdout_lines[:5]}"
            problems = {name: p for name, r in reports.items() if (p := close_problem(r))}
            assert not problems, f"{problems}\n{summary}"
            assert server.returncode is None and "Traceback" not in server.log, server.describe()
            final = await cli_status(files.socket("server"))
            assert "sessions_failed" in final, f"no sessions_failed counter in {sorted(final)}"
