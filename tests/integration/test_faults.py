"""Faults, in network namespaces: the real daemons, a user-space relay as the bad network.

The kernel here has no netem, so the faults come from :mod:`tests.support.relay`, run in a
namespace of its own between client and server::

    cli: 10.77.1.2/24 ── veth ── rly: 10.77.1.1/24            relay listens on 10.77.1.1:4433
                                 rly: 10.77.0.2/24, 10.77.0.3/24  its upstream sockets
                                      └── veth ── srv: 10.77.0.1/24   server on 10.77.0.1:4433

The client's config names the relay as its server; the server sees the relay's upstream
sockets (one per client socket) as its clients. Nothing needs forwarding: each hop is on a
connected network. Timers are short (heartbeat every 1 s, lost after 3 s, 2 s handshakes, 2 s
lease grace) so each test stays well under a minute. Timings are printed (``pytest -s``) and
recorded with ``record_property``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from tests.support import tool_argv
from tests.support.netns import (
    Daemon,
    DaemonError,
    Netns,
    cli_status,
    netns,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
    veth,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.relay import send_command
from tests.support.transfer import expected_sha256
from tunnel.daemon.control import query_status

# conftest's fixture types cannot be imported from a test module (tests/ is not a package)
Key = Any
TunnelFiles = Any

TEST_TIMEOUT = 90  # hard bound; each test is meant to take well under a minute
PY = sys.executable
RELAY_LISTEN = "10.77.1.1:4433"
SERVER_LISTEN = "10.77.0.1:4433"
RELAY_SOURCE, RELAY_SOURCE2 = "10.77.0.2", "10.77.0.3"
SERVER_TUN4 = "10.78.0.1"
CLIENT_TUN4 = "10.78.0.2"
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 2.0
LEASE_GRACE = 2.0
TRANSFER_BYTES = 20 * 1000 * 1000


@attrs.frozen
class Line:
    client: Netns
    relay: Netns
    server: Netns


@pytest.fixture
def line() -> Iterator[Line]:
    with netns("cli") as cli, netns("rly") as rly, netns("srv") as srv:
        veth(cli, rly, "10.77.1.2/24", "10.77.1.1/24")
        veth(rly, srv, [f"{RELAY_SOURCE}/24", f"{RELAY_SOURCE2}/24"], "10.77.0.1/24")
        yield Line(cli, rly, srv)


@attrs.frozen
class Creds:
    server: Key
    client: Key
    token: str


@pytest.fixture
def creds(files: TunnelFiles) -> Creds:
    return Creds(files.key("server"), files.key("client"), files.token())


def server_config(files: TunnelFiles, creds: Creds) -> Any:
    return files.server_config(
        key_file=creds.server.path,
        auth_tokens=[creds.token],
        listen=SERVER_LISTEN,
        lease_grace=LEASE_GRACE,
    )


def client_config(files: TunnelFiles, creds: Creds) -> Any:
    return files.client_config(
        "client",
        server=RELAY_LISTEN,
        server_id=creds.server.public_id,
        auth_token=creds.token,
        key_file=creds.client.path,
        auto_reconnect=True,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )


async def start_relay(nursery: trio.Nursery, line: Line, files: TunnelFiles) -> Daemon:
    argv = [*tool_argv("relay"), "--listen", RELAY_LISTEN,
            "--upstream", SERVER_LISTEN, "--bind", RELAY_SOURCE, "--seed", "1",
            "--control", str(files.socket("relay"))]  # fmt: skip
    return await start_daemon(nursery, line.relay, argv, name="relay")


async def relay(files: TunnelFiles, **command: Any) -> dict[str, Any]:
    """Send one command to the relay's control socket; return its answer (checked ok)."""
    with trio.fail_after(5):
        answer = await send_command(files.socket("relay"), command)
    assert answer["ok"], answer
    return answer


async def start_server(nursery: trio.Nursery, line: Line, config: Any) -> Daemon:
    argv = tunnel("server", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, line.server, argv, name="server")


async def start_client(nursery: trio.Nursery, line: Line, config: Any) -> Daemon:
    argv = tunnel("client", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, line.client, argv, name="client")


async def start_tunnel(
    nursery: trio.Nursery, line: Line, files: TunnelFiles, creds: Creds
) -> tuple[Daemon, Daemon]:
    """Relay, server and client up, and a ping through the tunnel answered: (server, client)."""
    await start_relay(nursery, line, files)
    server = await start_server(nursery, line, server_config(files, creds))
    client = await start_client(nursery, line, client_config(files, creds))
    await ping(line.client, SERVER_TUN4)
    return server, client


async def status(files: TunnelFiles, name: str) -> dict[str, Any]:
    """The daemon's status, straight from its control socket (what ``tunnel status --json``
    prints, without starting a process: the polling loops below want it fast)."""
    return await query_status(files.socket(name))


async def operator_status(files: TunnelFiles, name: str) -> dict[str, Any]:
    """``tunnel status --json``, the operator's view."""
    return await cli_status(files.socket(name))


async def wait_for(predicate: Any, what: str, within: float, every: float = 0.05) -> float:
    """Poll an async predicate every ``every`` s until true; return when
    (``time.monotonic()``) it became so.

    Polling because the state lives in another process: there is no event to wait on."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(every)
        return time.monotonic()
    raise AssertionError(f"timed out after {within} s waiting for {what}")


async def first_ping(ns: Netns, target: str, within: float) -> float:
    """Ping ``target`` every 0.1 s until the first answer; return when it came."""
    proc = await run(
        ns,
        ["ping", "-4", "-n", "-c", "1", "-i", "0.1", "-w", str(int(within)), target],
        check=False,
        timeout=within + 5,
    )
    answered = time.monotonic()
    assert proc.returncode == 0, f"no answer from {target} within {within} s: {proc.stdout!r}"
    return answered


async def ping(ns: Netns, target: str, count: int = 3) -> None:
    await run(ns, ["ping", "-4", "-c", str(count), "-i", "0.2", "-W", "2", target], timeout=20)


def report(record_property: Any, name: str, seconds: float, text: str) -> None:
    record_property(name, round(seconds, 3))
    print(f"\n{text}: {seconds:.2f} s")


def the_session(server_status: dict[str, Any], key: Key) -> dict[str, Any]:
    sessions = server_status["sessions"]
    assert len(sessions) == 1, f"expected exactly one session: {sessions}"
    assert sessions[0]["client_id"] == key.public_id, sessions
    return sessions[0]


async def transfer(
    nursery: trio.Nursery, line: Line, nbytes: int, seed: str, allowed: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``nbytes`` of TCP from the client's namespace to the server's tunnel address; returns
    the receiver's and the sender's reports."""
    address = f"{SERVER_TUN4}:5201"
    return await tcp_transfer(
        nursery, receiver=line.server, sender=line.client, listen=address, to=address,
        nbytes=nbytes, seed=seed, allowed=allowed,
    )  # fmt: skip


# --- server killed and restarted --------------------------------------------------------------


async def test_server_sigkill_and_restart_client_comes_back_by_itself(
    line: Line, files: TunnelFiles, creds: Creds, record_property: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server, client = await start_tunnel(nursery, line, files, creds)
            before = await status(files, "client")
            assert before["state"] == "connected"
            assert f"{CLIENT_TUN4}/24" in before["addresses"], before

            server.kill()
            assert await server.wait() == -9
            killed = time.monotonic()

            server = await start_server(nursery, line, server_config(files, creds))
            ready = time.monotonic()
            answered = await first_ping(line.client, SERVER_TUN4, within=30)
            report(
                record_property,
                "server_ready_to_first_ping_s",
                answered - ready,
                "restarted server ready -> first ping through the tunnel",
            )
            report(
                record_property,
                "server_kill_to_first_ping_s",
                answered - killed,
                "SIGKILL -> first ping through the tunnel (restart included)",
            )

            after = await operator_status(files, "client")
            assert after["state"] == "connected", after
            assert after["addresses"] == before["addresses"], (before, after)
            assert after["reconnects"] >= 1, after
            session = the_session(await operator_status(files, "server"), creds.client)
            assert CLIENT_TUN4 in session["addresses"], session
            await ping(line.client, SERVER_TUN4)
            await ping(line.server, CLIENT_TUN4)
            assert client.returncode is None, client.describe()
            # The restarted server answers the old session's packets with a stateless reset.
            assert "no longer knows this session" in client.log, client.log


# --- full partition ---------------------------------------------------------------------------

PARTITION_S = 5.0  # longer than the heartbeat timeout


async def test_partition_longer_than_heartbeat_timeout(
    line: Line, files: TunnelFiles, creds: Creds, record_property: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            _, client = await start_tunnel(nursery, line, files, creds)
            before = the_session(await status(files, "server"), creds.client)

            await relay(files, blackhole=True)
            cut = time.monotonic()

            async def client_noticed() -> bool:
                return (await status(files, "client"))["state"] != "connected"

            noticed = await wait_for(
                client_noticed, "the client to notice the partition", within=HEARTBEAT_TIMEOUT + 3
            )
            report(
                record_property,
                "partition_detected_s",
                noticed - cut,
                f"partition noticed by the client (heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)",
            )
            # the last answer came at most one interval before the cut: the timeout counts
            # from there; 0.5 s for polling and scheduling
            assert noticed - cut <= HEARTBEAT_TIMEOUT + 0.5
            assert noticed - cut >= HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL - 0.1

            async def logged() -> bool:
                return "no heartbeat answer" in client.log

            await wait_for(logged, "'no heartbeat answer' in the client's log", within=2)

            await trio.sleep(max(0.0, cut + PARTITION_S - time.monotonic()))
            await relay(files, blackhole=False)
            healed = time.monotonic()
            answered = await first_ping(line.client, SERVER_TUN4, within=20)
            report(
                record_property,
                "heal_to_first_ping_s",
                answered - healed,
                "partition healed -> first ping through the tunnel",
            )

            after = await status(files, "client")
            assert after["state"] == "connected", after
            assert after["addresses"] and set(after["addresses"]) == set(
                (await operator_status(files, "client"))["addresses"]
            )
            assert f"{CLIENT_TUN4}/24" in after["addresses"], after
            assert after["reconnects"] >= 1, after

            # the old session is gone for good once the lease grace has passed
            await trio.sleep(max(0.0, healed + LEASE_GRACE + 0.5 - time.monotonic()))
            server_after = await operator_status(files, "server")
            session = the_session(server_after, creds.client)
            assert server_after["pending_handshakes"] == 0, server_after
            assert set(session["addresses"]) == set(before["addresses"])
            # it is the new session: younger than the time since the partition began
            assert session["uptime"] < time.monotonic() - cut, (session, before)
            await ping(line.server, CLIENT_TUN4)
            stats = (await relay(files, stats=True))["stats"]
            print(
                f"relay: {stats['up']['blackholed']} up / {stats['down']['blackholed']} down "
                f"datagrams black-holed, {stats['flows']} flows"
            )


# --- loss and reordering ----------------------------------------------------------------------


async def test_transfer_through_loss_and_reordering_is_byte_identical(
    line: Line, files: TunnelFiles, creds: Creds, record_property: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            _, client = await start_tunnel(nursery, line, files, creds)

            await relay(files, loss=0.05, reorder=0.05, delay=0.001)
            got, want = await transfer(nursery, line, TRANSFER_BYTES, "lossy", allowed=70)
            assert got["bytes"] == TRANSFER_BYTES
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "lossy")
            rate = TRANSFER_BYTES * 8 / got["seconds"] / 1e6
            report(
                record_property,
                "lossy_transfer_s",
                got["seconds"],
                f"20 MB through 5% loss + 5% reordering ({rate:.1f} Mbit/s)",
            )

            stats = (await relay(files, stats=True))["stats"]
            up, down = stats["up"], stats["down"]
            print(
                f"relay: up {up['received']} in, {up['lost']} lost, {up['reordered']} "
                f"reordered; down {down['received']} in, {down['lost']} lost, "
                f"{down['reordered']} reordered"
            )
            # the faults really happened, at about the configured rates
            for direction in (up, down):
                assert 0.03 < direction["lost"] / direction["received"] < 0.07, stats
                assert direction["reordered"] > 0, stats
            cst = await status(files, "client")
            print(f"client: reconnects {cst['reconnects']}, state {cst['state']}")
            assert client.returncode is None, client.describe()


# --- the client's address changes mid-transfer (NAT rebinding) ---------------------------------


async def test_address_change_mid_transfer_needs_no_reconnect(
    line: Line, files: TunnelFiles, creds: Creds, record_property: Any
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            _, client = await start_tunnel(nursery, line, files, creds)
            first_remote = the_session(await status(files, "server"), creds.client)["remote"]
            assert first_remote.startswith(RELAY_SOURCE + ":"), first_remote

            result: dict[str, Any] = {}

            async def run_transfer() -> None:
                result["got"], result["want"] = await transfer(
                    nursery, line, TRANSFER_BYTES, "roam", allowed=60
                )

            async def up_bytes() -> int:
                return (await relay(files, stats=True))["stats"]["up"]["bytes_forwarded"]

            start = await up_bytes()
            nursery.start_soon(run_transfer)
            rebinds = []
            # first a new port (NAT rebinding), then a new address too
            # (early enough that even a fast run, 20 MB in well under a second, is still on)
            for at_bytes, host in ((2_000_000, True), (6_000_000, RELAY_SOURCE2)):

                async def moved_enough(at_bytes: int = at_bytes) -> bool:
                    return await up_bytes() - start >= at_bytes

                await wait_for(
                    moved_enough, f"{at_bytes} bytes through the relay", within=30, every=0.005
                )
                assert "got" not in result, "the transfer ended before the address changed"
                answer = await relay(files, rebind=host)
                rebinds.append(answer["stats"]["up"]["bytes_forwarded"])
                print(f"relay rebound ({host}) after {rebinds[-1] - start} bytes")

            async def done() -> bool:
                return "got" in result

            await wait_for(done, "the transfer to finish", within=60)
            got, want = result["got"], result["want"]
            assert got["bytes"] == TRANSFER_BYTES
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "roam")
            report(
                record_property,
                "roaming_transfer_s",
                got["seconds"],
                "20 MB with two address changes on the way",
            )

            final = await up_bytes()
            assert final - rebinds[-1] >= 1_000_000, "too little went over the last address"
            cst = await operator_status(files, "client")
            assert cst["reconnects"] == 0, cst
            assert cst["state"] == "connected", cst
            sst = await operator_status(files, "server")
            session = the_session(sst, creds.client)
            print(f"server's view of the client: {session['remote']} (first {first_remote})")
            # the server's QUIC connection followed the client to its new address
            assert session["remote"].startswith(RELAY_SOURCE2 + ":"), session
            await ping(line.client, SERVER_TUN4)
            assert "reconnecting" not in client.log


# --- a relay that cannot start fails loudly ---------------------------------------------------


async def test_relay_daemon_refuses_an_address_it_does_not_have(
    line: Line, files: TunnelFiles
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            argv = [*tool_argv("relay"), "--listen", "10.99.0.1:4433",
                    "--upstream", SERVER_LISTEN]  # fmt: skip
            with pytest.raises(DaemonError, match="exited with 1"):
                await start_daemon(nursery, line.relay, argv, name="relay")
