"""Live revocation: SIGHUP after removing a client's token (or its ID from allowed_clients).

    srv: br0 10.77.0.1/24 ─┬─ veth ── rva: 10.77.0.2/24   client A (tnlcli0)
         tnlsrv0            └─ veth ── rvb: 10.77.0.3/24   client B (tnlcli0)

The server reads its tokens from ``auth_tokens_file``, one token per client. After the edit
and SIGHUP the server closes A's running session ("credentials revoked") within about a
second; A, although it would reconnect after a lost session, exits 100 (a permanent refusal)
and says why; B's session goes on untouched (no reconnect, its uptime keeps counting, its
traffic flows); and A's credentials are refused from then on.
"""

from __future__ import annotations

import os
import signal
import time
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
)
from tests.support.netns import (
    star as netns_star,
)
from tests.support.netns import tunnel_cli as tunnel
from tunnel.daemon.control import query_status

Key = Any
TunnelFiles = Any  # conftest's fixture types (tests/ is not a package)

TEST_TIMEOUT = 90
SERVER_TUN4 = "10.78.0.1"
EXIT_PERMANENT = 100
REVOKED = "credentials revoked"
#: "within about a second", with room for a loaded machine
REVOKE_WITHIN_S = 3.0


@attrs.frozen
class Star:
    server: Netns
    a: Netns
    b: Netns


@pytest.fixture
def star() -> Iterator[Star]:
    leaves = ["10.77.0.2/24", "10.77.0.3/24"]
    with netns_star("rvs", ["rva", "rvb"], "10.77.0.1/24", leaves) as (srv, (cla, clb)):
        yield Star(srv, cla, clb)


@attrs.frozen
class Creds:
    server: Key
    a: Key
    b: Key
    token_a: str
    token_b: str


@pytest.fixture
def creds(files: TunnelFiles) -> Creds:
    return Creds(files.key("server"), files.key("a"), files.key("b"), files.token(),
                 files.token())  # fmt: skip


def write_tokens(path: Path, tokens: list[str]) -> None:
    """The token file, replaced whole (the server re-reads the path on SIGHUP)."""
    fresh = path.with_suffix(".new")
    fd = os.open(fresh, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write("".join(f"{token}\n" for token in tokens))
    os.replace(fresh, path)


def server_config(files: TunnelFiles, creds: Creds, allowed: list[Key] | None) -> Path:
    path: Path = files.server_config(
        key_file=creds.server.path,
        auth_tokens_file=files.dir / "tokens",
        allowed_clients=None if allowed is None else [key.public_id for key in allowed],
    )
    return path


def client_config(files: TunnelFiles, creds: Creds, name: str, key: Key, token: str) -> Path:
    # auto_reconnect: a lost session would be retried, so exit 100 means "refused for good"
    path: Path = files.client_config(
        name, server_id=creds.server.public_id, auth_token=token, key_file=key.path,
        auto_reconnect=True,
    )  # fmt: skip
    return path


async def start_client(nursery: trio.Nursery, ns: Netns, config: Path, name: str) -> Daemon:
    argv = tunnel("client", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, ns, argv, name=name)


async def ping(ns: Netns, target: str, count: int = 3) -> None:
    await run(ns, ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "2", target], timeout=20)


async def wait_for(predicate: Any, what: str, within: float, *about: Daemon) -> float:
    """Poll ``predicate`` until true; return how long that took. Fails after ``within`` s with
    the output of the daemons in ``about``.

    Polling because the state lives in another process: there is no event to wait on."""
    started = time.monotonic()
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)
        return time.monotonic() - started
    logs = "\n".join(d.describe() for d in about)
    raise AssertionError(f"timed out after {within} s waiting for {what}\n{logs}")


def session_of(server_status: dict[str, Any], key: Key) -> dict[str, Any] | None:
    for session in server_status["sessions"]:
        if session["client_id"] == key.public_id:
            return session
    return None


@pytest.mark.parametrize("revoke", ["token", "allowed_clients"])
async def test_sighup_revokes_one_client_and_leaves_the_other_alone(
    star: Star, files: TunnelFiles, creds: Creds, revoke: str
) -> None:
    tokens = files.dir / "tokens"
    write_tokens(tokens, [creds.token_a, creds.token_b])
    both = [creds.a, creds.b] if revoke == "allowed_clients" else None
    config = server_config(files, creds, both)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_daemon(
                nursery, star.server,
                tunnel("server", "--config", str(config), "--log-level", "debug"),
                name="server",
            )  # fmt: skip
            config_a = client_config(files, creds, "a", creds.a, creds.token_a)
            client_a = await start_client(nursery, star.a, config_a, "a")
            client_b = await start_client(
                nursery, star.b, client_config(files, creds, "b", creds.b, creds.token_b), "b"
            )
            await ping(star.a, SERVER_TUN4)
            await ping(star.b, SERVER_TUN4)
            st = await cli_status(files.socket("server"))
            assert session_of(st, creds.a) and session_of(st, creds.b), st
            b_before = await cli_status(files.socket("b"))
            assert b_before["state"] == "connected" and b_before["reconnects"] == 0, b_before
            b_measured = time.monotonic()

            # revoke A: the edit, then SIGHUP
            if revoke == "token":
                write_tokens(tokens, [creds.token_b])
            else:
                server_config(files, creds, [creds.b])
            hup_lines = len(server.stderr_lines)
            server.process.send_signal(signal.SIGHUP)

            # the reload itself happens (what the server did before revocation existed)
            async def reloaded() -> bool:
                return any("SIGHUP" in line for line in server.stderr_lines[hup_lines:])

            await wait_for(reloaded, "the server to log its reload", 5, server)

            async def revoked_logged() -> bool:
                return any(REVOKED in line.lower() for line in server.stderr_lines[hup_lines:])

            took = await wait_for(revoked_logged, f"'{REVOKED}' in the server's log",
                                  REVOKE_WITHIN_S, server, client_a)  # fmt: skip
            print(f"\nSIGHUP -> '{REVOKED}' logged by the server in {took:.2f} s")

            with trio.move_on_after(5):
                await client_a.wait()
            assert client_a.returncode == EXIT_PERMANENT, client_a.describe()
            assert REVOKED in client_a.log.lower(), client_a.describe()

            async def a_gone() -> bool:
                return session_of(await query_status(files.socket("server")), creds.a) is None

            await wait_for(a_gone, "A's session to leave the server's status", 5, server)

            # B: the same session, still running, still carrying traffic
            await ping(star.b, SERVER_TUN4)
            b_after = await cli_status(files.socket("b"))
            elapsed = time.monotonic() - b_measured
            assert b_after["state"] == "connected" and b_after["reconnects"] == 0, b_after
            uptime_before = b_before["sessions"][0]["uptime"]
            uptime_after = b_after["sessions"][0]["uptime"]
            # a new session would have started from zero since the SIGHUP
            assert uptime_after >= uptime_before + elapsed - 1.0, (b_before, b_after)
            server_b = session_of(await cli_status(files.socket("server")), creds.b)
            assert server_b is not None and server_b["uptime"] >= elapsed, server_b
            assert client_b.returncode is None, client_b.describe()
            assert "reconnecting" not in client_b.log, client_b.describe()
            assert server.returncode is None and "Traceback" not in server.log, server.describe()

            # and A stays out: a fresh attempt with its credentials is refused
            proc = await run(
                star.a, tunnel("client", "--config", str(config_a), "--log-level", "debug"),
                check=False, timeout=20,
            )  # fmt: skip
            stderr = proc.stderr.decode(errors="replace")
            assert proc.returncode == EXIT_PERMANENT, stderr
            reason = "invalid authentication token" if revoke == "token" else "client not allowed"
            assert reason in stderr.lower(), stderr
