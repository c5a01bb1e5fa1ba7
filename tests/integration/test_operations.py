"""Running it like infrastructure, on real namespaces: `tunnel kick` ends one session and not
another, JSON log lines, `tunnel check` against a real server, and `tunnel reload` saying
what changed.

    client alice 10.77.0.2 ─┐
                            ├─ bridge ─ server 10.77.0.1 (tunnel 10.78.0.0/24)
    client bob   10.77.0.3 ─┘
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.netns import Daemon, Netns, open_daemon_nursery, poll_until, run, start_daemon
from tests.support.netns import star as netns_star
from tests.support.netns import tunnel_cli as tunnel
from tunnel.daemon.control import query_status

pytestmark = pytest.mark.netns

TunnelFiles = Any  # what the `files` fixture of conftest.py gives
TEST_TIMEOUT = 60


@attrs.frozen
class Lan:
    server: Netns
    alice: Netns
    bob: Netns


@pytest.fixture
def lan() -> Iterator[Lan]:
    with netns_star("ops", ["opa", "opb"], "10.77.0.1/24", ["10.77.0.2/24", "10.77.0.3/24"]) as (
        server,
        (alice, bob),
    ):
        yield Lan(server, alice, bob)


@pytest.fixture
def creds(files: TunnelFiles) -> dict[str, Any]:
    return {
        "server": files.key("server"),
        "alice": files.key("alice"),
        "bob": files.key("bob"),
        "token": files.token(),
    }


def server_config(files: TunnelFiles, creds: dict[str, Any], **settings: Any) -> Path:
    values: dict[str, Any] = {
        "key_file": creds["server"].path, "auth_tokens": [creds["token"]],
        "clients": {"alice": creds["alice"].public_id, "bob": creds["bob"].public_id},
    }  # fmt: skip
    return files.server_config(**{**values, **settings})


def client_config(files: TunnelFiles, creds: dict[str, Any], name: str, **settings: Any) -> Path:
    return files.client_config(
        name, server_id=creds["server"].public_id, auth_token=creds["token"],
        key_file=creds[name].path, auto_reconnect=True, heartbeat_interval=1.0,
        heartbeat_timeout=3.0, **settings,
    )  # fmt: skip


async def start(nursery: trio.Nursery, ns: Netns, role: str, config: Path, name: str,
                *extra: str) -> Daemon:  # fmt: skip
    return await start_daemon(nursery, ns, tunnel(role, "--config", str(config), *extra), name=name)


async def test_kick_ends_one_clients_session_and_not_anothers(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start(nursery, lan.server, "server", server_config(files, creds),
                                 "server")  # fmt: skip
            alice = await start(nursery, lan.alice, "client",
                                client_config(files, creds, "alice"), "alice")  # fmt: skip
            await start(nursery, lan.bob, "client", client_config(files, creds, "bob"), "bob")
            status = await query_status(files.socket("server"))
            assert sorted(s["name"] for s in status["sessions"]) == ["alice", "bob"], status
            bob_before = await query_status(files.socket("bob"))

            kick = await run(None, tunnel("kick", "alice", "--reason", "maintenance",
                                          "--socket", str(files.socket("server"))))  # fmt: skip
            assert b"closed 1 session(s) of alice" in kick.stdout, kick

            async def alice_came_back() -> bool:
                state = await query_status(files.socket("alice"))
                return state["reconnects"] >= 1 and state["state"] == "connected"

            await poll_until(alice_came_back, "alice to reconnect", 20)
            assert "kicked by the operator: maintenance" in alice.log, alice.log
            assert "[alice] closing the session: kicked by the operator" in server.log
            bob_after = await query_status(files.socket("bob"))
            assert bob_after["reconnects"] == bob_before["reconnects"] == 0, bob_after
            assert bob_after["sessions"][0]["uptime"] > bob_before["sessions"][0]["uptime"]

            # A stranger's ID: a clear error, nothing closed.
            missing = await run(
                None, tunnel("kick", creds["server"].public_id, "--socket",
                             str(files.socket("server"))), check=False,
            )  # fmt: skip
            assert missing.returncode != 0 and b"no session of client" in missing.stderr


async def test_json_logs_are_one_object_a_line_with_the_client_on_session_lines(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start(nursery, lan.server, "server", server_config(files, creds),
                                 "server", "--log-format", "json")  # fmt: skip
            client = await start(nursery, lan.alice, "client",
                                 client_config(files, creds, "alice"), "alice",
                                 "--log-format", "json")  # fmt: skip
            await run(lan.alice, ["ping", "-c", "1", "-W", "5", "10.78.0.1"])
            client.terminate()
            assert await client.wait() == 0
            server.terminate()
            assert await server.wait() == 0
    for daemon in (server, client):
        lines = [json.loads(line) for line in daemon.stderr_lines if line.strip()]
        assert lines, daemon.describe()
        assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    session_up = [line for line in map(json.loads, server.stderr_lines) if "session up" in
                  line["message"]]  # fmt: skip
    assert session_up and session_up[0]["client"] == "alice", server.stderr_lines


async def test_check_reports_the_host_and_the_servers_identity(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    good = client_config(files, creds, "alice")
    wrong = files.client_config(
        "wrong", server_id=creds["bob"].public_id, auth_token=creds["token"],
    )  # fmt: skip
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start(nursery, lan.server, "server", server_config(files, creds), "server")
            report = await run(lan.alice, tunnel("check", "--config", str(good)))
            text = report.stdout.decode()
            assert "ok    tun: /dev/net/tun opens" in text, text
            assert "ok    server: 10.77.0.1:4433 presents the pinned identity" in text, text
            bad = await run(lan.alice, tunnel("check", "--config", str(wrong)), check=False,
                            timeout=40)  # fmt: skip
            assert bad.returncode == 1, bad
            assert "FAIL  server:" in bad.stdout.decode(), bad
            status = await query_status(files.socket("server"))
            assert status["sessions"] == [], "check must not authenticate"
    assert not list(files.dir.glob("state/*.json"))


async def test_reload_over_the_control_socket_reports_the_change(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            config = server_config(files, creds)
            await start(nursery, lan.server, "server", config, "server")
            await start(nursery, lan.alice, "client", client_config(files, creds, "alice"),
                        "alice")  # fmt: skip
            server_config(files, creds, auth_tokens=[files.token()], mtu=1300)
            answer = await run(None, tunnel("reload", "--config", str(config)))
            out = answer.stdout.decode()
            assert "changed: auth_tokens" in out, out
            assert "sessions revoked: 1" in out, out
            assert "need a restart to apply: mtu" in out, out


async def test_systemd_hears_ready_reload_watchdog_and_stopping(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    """The notify protocol against a socket standing in for systemd's NOTIFY_SOCKET."""
    path = files.dir / "notify"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(str(path))
    heard: list[str] = []

    async def listen() -> None:
        while True:
            heard.append((await listener.recv(4096)).decode())

    def says(prefix: str) -> Any:
        async def predicate() -> bool:
            return any(m.startswith(prefix) for m in heard)

        return predicate

    env = ["env", f"NOTIFY_SOCKET={path}", "WATCHDOG_USEC=400000"]
    with listener, trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            nursery.start_soon(listen)
            server = await start_daemon(
                nursery, lan.server,
                [*env, *tunnel("server", "--config", str(server_config(files, creds)))],
                name="server",
            )  # fmt: skip
            await poll_until(says("READY=1"), "READY=1", 10)
            assert heard[0] == "READY=1\nSTATUS=0 sessions", heard
            await poll_until(says("WATCHDOG=1"), "the watchdog", 10)
            await start(nursery, lan.alice, "client", client_config(files, creds, "alice"),
                        "alice")  # fmt: skip
            await poll_until(says("STATUS=1 session"), "the STATUS line to count it", 10)
            mark = len(heard)
            server.process.send_signal(signal.SIGHUP)
            await poll_until(lambda: _after(heard, mark, "READY=1"), "the reload's end", 10)
            reload = [m for m in heard[mark:] if not m.startswith(("WATCHDOG", "STATUS"))]
            assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC="), reload
            assert reload[1].startswith("READY=1"), reload
            server.terminate()
            assert await server.wait() == 0, server.describe()
            assert heard[-1] == "STOPPING=1", heard
            nursery.cancel_scope.cancel()


async def _after(heard: list[str], mark: int, prefix: str) -> bool:
    return any(m.startswith(prefix) for m in heard[mark:])


async def scrape(ns: Netns, url: str) -> dict[str, float]:
    """GET ``url`` from inside ``ns``; the samples of the exposition it answers."""
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
    text = (await run(ns, [sys.executable, "-c", code])).stdout.decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_metrics_endpoint_moves_with_traffic(
    lan: Lan, files: TunnelFiles, creds: dict[str, Any]
) -> None:
    url = "http://10.77.0.1:9100/metrics"
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            config = server_config(files, creds, metrics_listen="10.77.0.1:9100")
            await start(nursery, lan.server, "server", config, "server")
            await start(nursery, lan.alice, "client", client_config(files, creds, "alice"),
                        "alice")  # fmt: skip
            before = await scrape(lan.server, url)
            assert before["tunnel_sessions"] == 1, before
            await run(lan.alice, ["ping", "-c", "20", "-i", "0.05", "-W", "2", "10.78.0.1"])
            after = await scrape(lan.server, url)
            assert after["tunnel_rx_packets_total"] >= before["tunnel_rx_packets_total"] + 20
            assert after["tunnel_tx_bytes_total"] > before["tunnel_tx_bytes_total"]
            assert after["tunnel_uptime_seconds"] > before["tunnel_uptime_seconds"]
            cli = await run(None, tunnel("metrics", "--socket", str(files.socket("alice"))))
            assert b"tunnel_connected 1.0" in cli.stdout, cli
