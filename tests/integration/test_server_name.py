"""The client names its server by a host name, and the name stops resolving during a reconnect.

    cli: 10.77.0.2/24 ── veth ── srv: 10.77.0.1/24   server on 10.77.0.1:4433

The client's config says ``server = "vpn.test:4433"``; ``vpn.test`` lives only in the client
namespace's own /etc/hosts (``ip netns exec`` bind-mounts /etc/netns/<ns>/hosts over
/etc/hosts, so the file is edited in place, never replaced: the mount follows the inode). Its
resolv.conf points at the namespace's own loopback, so a lookup that misses the hosts file
never leaves the namespace.

The server stops; the name stops resolving; the client must keep retrying (a warning and the
usual backoff, 1 s doubling), not exit; once the name and the server are back it reconnects
by itself. Short timers (heartbeat 1 s / 3 s, handshake 2 s) keep it well under a minute.
"""

from __future__ import annotations

import contextlib
import re
import shutil
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
SERVER_NAME = "vpn.test"
SERVER_IP = "10.77.0.1"
PORT = 4433
SERVER_TUN4 = "10.78.0.1"
HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, HANDSHAKE_TIMEOUT = 1.0, 3.0, 2.0
FAILED_LOOKUPS = 2
NETNS_ETC = Path("/etc/netns")
HOSTS_WITH_NAME = f"127.0.0.1 localhost\n{SERVER_IP} {SERVER_NAME}\n"
HOSTS_WITHOUT_NAME = "127.0.0.1 localhost\n"
# A line about the server's name failing to resolve (whatever the exact wording).
NOT_RESOLVING = re.compile(rf"{re.escape(SERVER_NAME)}.*resol|resol.*{re.escape(SERVER_NAME)}",
                           re.IGNORECASE)  # fmt: skip


@contextlib.contextmanager
def netns_etc(ns: Netns, files: dict[str, str]) -> Iterator[Path]:
    """Files that ``ip netns exec`` mounts over /etc for processes in ``ns``; removed on exit
    (and /etc/netns too if nothing else is left in it)."""
    made_root = not NETNS_ETC.exists()
    NETNS_ETC.mkdir(mode=0o755, exist_ok=True)
    directory = NETNS_ETC / ns.name
    directory.mkdir(mode=0o755)
    try:
        for name, text in files.items():
            (directory / name).write_text(text)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):  # someone else's namespace uses it now
                NETNS_ETC.rmdir()


def rewrite_in_place(path: Path, text: str) -> None:
    """Replace a file's content keeping its inode (the bind mount shows only that inode)."""
    with open(path, "r+") as file:
        file.truncate(0)
        file.write(text)


@attrs.frozen
class World:
    client: Netns
    server: Netns
    hosts: Path  # the client namespace's /etc/hosts


@pytest.fixture
def world() -> Iterator[World]:
    with netns("snc") as cli, netns("sns") as srv:
        veth(cli, srv, "10.77.0.2/24", f"{SERVER_IP}/24")
        etc = {"hosts": HOSTS_WITH_NAME, "resolv.conf": "nameserver 127.0.0.1\n"
               "options timeout:1 attempts:1\n"}  # fmt: skip
        with netns_etc(cli, etc) as directory:
            yield World(cli, srv, directory / "hosts")


async def wait_for(predicate: Any, what: str, within: float, client: Daemon) -> None:
    """Poll ``predicate`` until true; fail after ``within`` s, or at once if the client exits.

    Polling because the state lives in another process: there is no event to wait on."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            if client.returncode is not None:
                raise AssertionError(
                    f"the client exited while waiting for {what}\n{client.describe()}"
                )
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}\n{client.describe()}")


async def ping(ns: Netns, target: str, count: int = 3) -> None:
    await run(ns, ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "2", target], timeout=20)


async def start_server(nursery: trio.Nursery, world: World, config: Any) -> Daemon:
    argv = tunnel("server", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, world.server, argv, name="server")


def configs(files: TunnelFiles, handshake_timeout: float) -> tuple[Any, Any]:
    """A server on SERVER_IP and a client that names it SERVER_NAME, short heartbeats."""
    server_key, client_key, token = files.key("server"), files.key("client"), files.token()
    server_config = files.server_config(
        key_file=server_key.path, auth_tokens=[token], listen=f"{SERVER_IP}:{PORT}"
    )
    client_config = files.client_config(
        "client",
        server=f"{SERVER_NAME}:{PORT}",
        server_id=server_key.public_id,
        auth_token=token,
        key_file=client_key.path,
        auto_reconnect=True,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        handshake_timeout=handshake_timeout,
    )
    return server_config, client_config


async def test_server_name_stops_resolving_during_a_reconnect(
    world: World, files: TunnelFiles
) -> None:
    server_config, client_config = configs(files, HANDSHAKE_TIMEOUT)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_server(nursery, world, server_config)
            client = await start_daemon(
                nursery, world.client,
                tunnel("client", "--config", str(client_config), "--log-level", "debug"),
                name="client",
            )  # fmt: skip
            await ping(world.client, SERVER_TUN4)
            before = await cli_status(files.socket("client"))
            assert before["state"] == "connected" and before["reconnects"] == 0, before
            assert before["server"] == f"{SERVER_NAME}:{PORT}", before
            assert before["sessions"][0]["remote"].startswith(SERVER_IP), before

            # The name goes first: a connected client does not look it up, and this way its
            # first retry (1 s after the loss) cannot race the edit.
            rewrite_in_place(world.hosts, HOSTS_WITHOUT_NAME)
            # the server goes away, and the client notices at once (the server closed)
            server.terminate()
            assert await server.wait() == 0, server.describe()
            stopped = time.monotonic()

            async def reconnecting() -> bool:
                return (await query_status(files.socket("client")))["state"] != "connected"

            await wait_for(reconnecting, "the client to notice the server stopped", 5, client)

            def lookup_failures() -> list[str]:
                return [line for line in client.stderr_lines if NOT_RESOLVING.search(line)]

            async def failed_enough() -> bool:
                return len(lookup_failures()) >= FAILED_LOOKUPS

            # retries after 1 s and 2 s more (the backoff)
            await wait_for(failed_enough, f"{FAILED_LOOKUPS} failed lookups of {SERVER_NAME}",
                           20, client)  # fmt: skip
            failed_at = time.monotonic()
            print(f"\n{len(lookup_failures())} failed lookups logged "
                  f"{failed_at - stopped:.1f} s after the stop: {lookup_failures()}")  # fmt: skip
            assert client.returncode is None, client.describe()

            # name and server back: the client reconnects by itself
            rewrite_in_place(world.hosts, HOSTS_WITH_NAME)
            server = await start_server(nursery, world, server_config)

            async def connected() -> bool:
                return (await query_status(files.socket("client")))["state"] == "connected"

            # the next retry comes at most 4 s (the backoff) + a handshake later
            await wait_for(connected, "the client to reconnect", 20, client)
            print(f"reconnected {time.monotonic() - failed_at:.1f} s after the lookups failed")
            await ping(world.client, SERVER_TUN4)
            after = await cli_status(files.socket("client"))
            assert after["state"] == "connected", after
            assert after["reconnects"] >= 1, after
            assert after["addresses"] == before["addresses"], (before, after)
            assert after["sessions"][0]["remote"].startswith(SERVER_IP), after
            assert client.returncode is None, client.describe()
            assert "Traceback" not in client.log, client.describe()


DEAD_IPV6 = "fd77::99"  # on the link, but nobody has it: its handshake goes unanswered


async def test_a_name_whose_first_address_is_dead_connects_through_the_next(
    world: World, files: TunnelFiles
) -> None:
    """The name lists an IPv6 address first that never answers (as a broken IPv6 path
    looks) and the server's IPv4 address second: Happy Eyeballs connects through the second
    well within one handshake timeout, and again after a reconnect."""
    await run(world.client, ["ip", "-6", "addr", "add", "fd77::2/64", "dev", "lo"])
    rewrite_in_place(
        world.hosts, f"127.0.0.1 localhost\n{DEAD_IPV6} {SERVER_NAME}\n{SERVER_IP} {SERVER_NAME}\n"
    )
    # the default timeout: a client that waited it out would show
    server_config, client_config = configs(files, 10.0)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_server(nursery, world, server_config)
            started = time.monotonic()
            client = await start_daemon(
                nursery, world.client,
                tunnel("client", "--config", str(client_config), "--log-level", "debug"),
                name="client",
            )  # fmt: skip
            took = time.monotonic() - started
            print(f"\nconnected {took:.2f} s after the start (handshake timeout 10 s)")
            assert took < 5.0, client.describe()
            # The dead address was tried first, and lost the race.
            assert any(DEAD_IPV6 in line for line in client.stderr_lines), client.describe()
            status = await cli_status(files.socket("client"))
            assert status["sessions"][0]["remote"].startswith(SERVER_IP), status
            await ping(world.client, SERVER_TUN4)
            # A server restart: the client is back as quickly (the winner goes first now).
            server.terminate()
            assert await server.wait() == 0, server.describe()
            lost = time.monotonic()
            server = await start_server(nursery, world, server_config)

            async def connected() -> bool:
                return (await query_status(files.socket("client")))["state"] == "connected"

            await wait_for(connected, "the client to reconnect", 20, client)
            print(f"reconnected {time.monotonic() - lost:.2f} s after the server stopped")
            await ping(world.client, SERVER_TUN4)
            assert "Traceback" not in client.log, client.describe()
