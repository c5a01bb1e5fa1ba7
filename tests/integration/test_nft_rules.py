"""The kill switch and the masquerade in real namespaces, driven through tunnel.daemon.nft.

Kill switch (``client`` is where it is engaged)::

    client 10.93.7.1 fd93:7::1  ──veth──  peer 10.93.7.2 fd93:7::2
      ks0 (TUN, 10.93.8.1/24, route 10.93.9.0/24), ks1 (TUN, route 10.93.10.0/24)

Masquerade (``server`` masquerades its pool 10.94.0.0/24, whose clients sit behind the bridge
``tnlm0`` standing in for its TUN; ``outside`` has no route back to the pool)::

    client  10.94.0.2/32 ─┐
                          ├─ tnlm0 10.94.0.1/24  server  10.93.20.1 ──veth── 10.93.20.2 outside
    client2 10.94.0.3/32 ─┘

Everything that has to happen inside a namespace (libnftables, sysctls, sockets) is done by
``nft_agent.py`` running there, one JSON request per line; SIGKILLing an agent is how a
daemon dies here.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import Netns, bridge, ip, netns, run, veth

pytestmark = pytest.mark.netns

AGENT = Path(__file__).resolve().with_name("nft_agent.py")
TEST_TIMEOUT = 60
CALL_TIMEOUT = 15
MARK = 0x5157
TUN = "ks0"
CLIENT, PEER = "10.93.7.1", "10.93.7.2"
CLIENT6, PEER6 = "fd93:7::1", "fd93:7::2"
UDP_PORT, TCP_PORT = 7000, 7001
#: A refused send comes back at once; a dropped one would take the ping timeout below.
FAST_S = 1.5
PING_WAIT_S = "3"

POOL = "10.94.0.0/24"
SERVER_TUN = "tnlm0"
SERVER_OUT, OUTSIDE = "10.93.20.1", "10.93.20.2"
CLIENT_A, CLIENT_B = "10.94.0.2", "10.94.0.3"


class Agent:
    """One ``nft_agent.py`` process inside a namespace."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        with trio.fail_after(CALL_TIMEOUT):
            await self.process.stdin.send_all(json.dumps({"op": op, **args}).encode() + b"\n")
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"agent exited ({self.process.returncode}) during {op}")
                self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer and not op.endswith("_broken"):
            raise AssertionError(f"agent {op}({args}) failed:\n{answer['error']}")
        return answer

    async def kill(self) -> None:
        """SIGKILL, as a daemon dies: nothing of what it made is undone."""
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(CALL_TIMEOUT):
            await self.process.wait()


@contextlib.asynccontextmanager
async def agent(ns: Netns) -> AsyncIterator[Agent]:
    process = await trio.lowlevel.open_process(
        ns.exec_argv([sys.executable, str(AGENT)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield Agent(process)
    finally:
        with trio.move_on_after(5, shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


async def ping(ns: Netns, to: str) -> tuple[bool, float, str]:
    """(answered, seconds, output) of one ping."""
    started = trio.current_time()
    proc = await run(ns, ["ping", "-n", "-c", "1", "-W", PING_WAIT_S, to], check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.returncode == 0, trio.current_time() - started, output


async def assert_closed(client: Netns) -> None:
    for to in (PEER, PEER6):
        answered, seconds, output = await ping(client, to)
        assert not answered, output
        assert seconds < FAST_S, f"ping {to} took {seconds:.1f} s to fail: {output}"
        assert "not permitted" in output or "rohibited" in output, output


async def assert_open(client: Netns) -> None:
    for to in (PEER, PEER6):
        answered, _, output = await ping(client, to)
        assert answered, output


def tun_routes(ns: Netns, name: str, address: str | None, route: str) -> None:
    if address:
        ip(ns, "addr", "add", address, "dev", name)
    ip(ns, "link", "set", name, "up")
    ip(ns, "route", "add", route, "dev", name)


@attrs.frozen
class Pair:
    client: Netns
    peer: Netns


@pytest.fixture
def pair() -> Iterator[Pair]:
    with netns("ksc") as client, netns("ksp") as peer:
        veth(client, peer, [f"{CLIENT}/24", f"{CLIENT6}/64"], [f"{PEER}/24", f"{PEER6}/64"])
        yield Pair(client, peer)


async def test_kill_switch_lets_out_only_lo_the_tun_and_marked_packets(pair: Pair) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with agent(pair.client) as inside, agent(pair.peer) as peer:
            await peer.call("udp_bind", port=UDP_PORT)
            await peer.call("tcp_listen", port=TCP_PORT)
            await inside.call("track_connections")
            await assert_open(pair.client)
            # a connection from before the switch, which must not survive it
            opened = await inside.call("tcp_connect", to=PEER, port=TCP_PORT, timeout=3, hold=True)
            assert opened["errno"] is None

            await inside.call("engage", tun=TUN, mark=MARK)
            await assert_closed(pair.client)

            # unmarked UDP is refused on the spot; marked UDP gets through, over IPv6 too (after
            # neighbour discovery, which the switch lets out: the neighbours are forgotten first)
            ip(pair.client, "neigh", "flush", "all")
            for to in (PEER, PEER6):
                leak = await inside.call("udp_send", to=to, port=UDP_PORT, data=f"leak {to}")
                assert leak["errno"] == "EPERM"
                marked = await inside.call(
                    "udp_send", to=to, port=UDP_PORT, data=f"marked {to}", mark=MARK
                )
                assert marked["errno"] is None
                got = await peer.call("udp_wait", until=f"marked {to}", timeout=5)
                assert got["received"] == [[f"marked {to}", CLIENT if to == PEER else CLIENT6]]

            # TCP: a new connection is reset at once, and so is the one opened before
            refused = await inside.call("tcp_connect", to=PEER, port=TCP_PORT, timeout=5)
            assert refused["errno"] == "ECONNREFUSED"
            assert refused["seconds"] < FAST_S
            reset = await inside.call("tcp_use_held", timeout=5)
            assert reset["errno"] == "ECONNRESET", reset

            # the TUN is matched by name: a device made after the switch went on, and its
            # successor of the same name (another index); another name stays closed
            for generation in range(2):
                await inside.call("tun_open", name=TUN)
                tun_routes(pair.client, TUN, "10.93.8.1/24", "10.93.9.0/24")
                sent = await inside.call("udp_send", to="10.93.9.9", port=UDP_PORT, data="in")
                assert sent["errno"] is None, generation
                got = await inside.call("tun_wait", name=TUN, dst="10.93.9.9", timeout=5)
                assert got["arrived"], generation
                await inside.call("tun_close", name=TUN)
            await inside.call("tun_open", name="ks1")
            tun_routes(pair.client, "ks1", None, "10.93.10.0/24")
            other = await inside.call("udp_send", to="10.93.10.9", port=UDP_PORT, data="out")
            assert other["errno"] == "EPERM"

            await inside.call("release", tun=TUN, mark=MARK)
            await assert_open(pair.client)


async def test_kill_switch_takeover_keeps_it_closed_and_release_restores_the_ruleset(
    pair: Pair,
) -> None:
    table = ["inet", f"tunnel_killswitch_{TUN}"]
    with trio.fail_after(TEST_TIMEOUT):
        async with agent(pair.client) as first:
            before = (await first.call("ruleset"))["text"]
            await first.call("engage", tun=TUN, mark=MARK)
            engaged = (await first.call("ruleset"))["text"]
            assert engaged != before
            await first.call("engage", tun=TUN, mark=MARK)  # the same client again
            assert (await first.call("tables"))["tables"] == [table]
            await first.kill()
        # the client is gone; its kill switch is not
        await assert_closed(pair.client)
        async with agent(pair.client) as second:
            await second.call("engage", tun=TUN, mark=MARK)
            assert (await second.call("tables"))["tables"] == [table]
            assert (await second.call("ruleset"))["text"] == engaged
            await assert_closed(pair.client)

            # a replacement the kernel refuses changes nothing: one transaction
            broken = await second.call("engage_broken", tun=TUN, mark=MARK)
            assert "error" in broken
            assert (await second.call("ruleset"))["text"] == engaged
            await assert_closed(pair.client)

            await second.call("release", tun=TUN, mark=MARK)
            await assert_open(pair.client)
            assert (await second.call("ruleset"))["text"] == before
            await second.call("release", tun=TUN, mark=MARK)  # twice is fine


async def test_cleanup_removes_what_a_killed_client_left(pair: Pair) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with agent(pair.client) as client:
            before = (await client.call("ruleset"))["text"]
            await client.call("engage", tun=TUN, mark=MARK)
            await client.kill()
        await assert_closed(pair.client)
        async with agent(pair.client) as cleanup:
            assert (await cleanup.call("cleanup", tun=TUN))["removed"] is True
            assert (await cleanup.call("cleanup", tun=TUN))["removed"] is False
            assert (await cleanup.call("ruleset"))["text"] == before
        await assert_open(pair.client)


# --- masquerade --------------------------------------------------------------------------------


@attrs.frozen
class Sites:
    client: Netns
    client2: Netns
    server: Netns
    outside: Netns


def _client_behind(server: Netns, client: Netns, address: str) -> str:
    """A client with only its own /32 and a default route through the server, the way a TUN
    client is; returns the server's end of the link (a port of the bridge)."""
    link = veth(server, client, None, f"{address}/32")
    ip(client, "route", "add", "10.94.0.1", "dev", link.name_b)
    ip(client, "route", "add", "default", "via", "10.94.0.1")
    return link.name_a


@pytest.fixture
def sites() -> Iterator[Sites]:
    with (
        netns("mqc") as client,
        netns("mqc2") as client2,
        netns("mqs") as server,
        netns("mqo") as outside,
    ):
        ports = [
            _client_behind(server, client, CLIENT_A),
            _client_behind(server, client2, CLIENT_B),
        ]
        bridge(server, ports, "10.94.0.1/24", name=SERVER_TUN)
        veth(server, outside, f"{SERVER_OUT}/24", f"{OUTSIDE}/24")
        # forwarding off, as on a host that never routed; and no redirects that would send
        # one client straight to the other, around the server's nat hook
        for knob in ("net.ipv4.ip_forward=0", "net.ipv4.conf.all.send_redirects=0",
                     f"net.ipv4.conf.{SERVER_TUN}.send_redirects=0"):  # fmt: skip
            subprocess.run(server.exec_argv(["sysctl", "-qw", knob]), check=True, timeout=10)
        yield Sites(client, client2, server, outside)


async def assert_masqueraded(sites: Sites, client: Agent, outside: Agent, client2: Agent) -> None:
    answered, _, output = await ping(sites.client, OUTSIDE)
    assert answered, output  # the outside answers the server's address: it has no route to us
    await client.call("udp_send", to=OUTSIDE, port=UDP_PORT, data="out")
    got = await outside.call("udp_wait", until="out", timeout=5)
    assert got["received"] == [["out", SERVER_OUT]]
    # one client to another goes back into the TUN and keeps its source
    await client.call("udp_send", to=CLIENT_B, port=UDP_PORT, data="across")
    got = await client2.call("udp_wait", until="across", timeout=5)
    assert got["received"] == [["across", CLIENT_A]]


async def test_masquerade_start_and_stop(sites: Sites, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            agent(sites.server) as server,
            agent(sites.client) as client,
            agent(sites.client2) as client2,
            agent(sites.outside) as outside,
        ):
            await outside.call("udp_bind", port=UDP_PORT)
            await client2.call("udp_bind", port=UDP_PORT)
            before = (await server.call("ruleset"))["text"]
            assert (await server.call("ip_forward"))["value"] == "0"
            answered, _, output = await ping(sites.client, OUTSIDE)
            assert not answered, output

            await server.call("masq_start", tun=SERVER_TUN, pools=[POOL], state=str(state))
            assert (await server.call("ip_forward"))["value"] == "1"
            assert json.loads(state.read_text())["masquerade"]["ip_forward"] == "0"
            await assert_masqueraded(sites, client, outside, client2)

            await server.call("masq_stop")
            assert (await server.call("ip_forward"))["value"] == "0"
            assert (await server.call("ruleset"))["text"] == before
            assert not state.exists()
            answered, _, output = await ping(sites.client, OUTSIDE)
            assert not answered, output


async def test_masquerade_recover_after_a_kill(sites: Sites, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with trio.fail_after(TEST_TIMEOUT):
        async with agent(sites.server) as first:
            before = (await first.call("ruleset"))["text"]
            await first.call("masq_start", tun=SERVER_TUN, pools=[POOL], state=str(state))
            await first.kill()
        async with (
            agent(sites.server) as second,
            agent(sites.client) as client,
            agent(sites.client2) as client2,
            agent(sites.outside) as outside,
        ):
            await outside.call("udp_bind", port=UDP_PORT)
            await client2.call("udp_bind", port=UDP_PORT)
            # what the killed server left still works (and is still recorded)
            assert (await second.call("ip_forward"))["value"] == "1"
            assert state.exists()
            await assert_masqueraded(sites, client, outside, client2)

            recovered = await second.call("masq_recover", tun=SERVER_TUN, state=str(state))
            assert recovered["recovered"] is True
            assert (await second.call("ip_forward"))["value"] == "0"
            assert (await second.call("ruleset"))["text"] == before
            assert not state.exists()
            again = await second.call("masq_recover", tun=SERVER_TUN, state=str(state))
            assert again["recovered"] is False
