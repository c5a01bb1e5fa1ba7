"""NetworkMonitor against a real kernel: a monitor process inside a namespace prints one JSON
line per batch while the test changes links, addresses and routes there with ``ip``.

    mon: vethNa 10.79.0.2/24, fd79::2/64 ── peer: vethNb 10.79.0.1/24, fd79::1/64
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator

import attrs
import pytest
import trio

from tests.support.netns import Netns, Veth, ip, ip_json, netns, run, veth
from tunnel.core.netchange import RT_TABLE_MAIN, NetworkChange, gains, matters

PY = sys.executable
WAIT_S = 10  # bound on each wait for a batch; batches come 0.2 s after a change
TUN = "tnlmon0"

MONITOR = textwrap.dedent(
    """
    import json, sys
    import attrs, trio
    from tunnel.daemon.netmonitor import NetworkMonitor

    async def main(ignore):
        with NetworkMonitor.open(ignore_ifname=ignore) as monitor:
            print(json.dumps({"ready": True}), flush=True)
            while True:
                batch = await monitor.wait_change()
                print(json.dumps({
                    "changes": [attrs.asdict(change) for change in batch],
                    "stats": attrs.asdict(monitor.statistics()),
                }), flush=True)

    trio.run(main, sys.argv[1])
    """
)


@attrs.frozen
class World:
    mon: Netns
    peer: Netns
    link: Veth


@pytest.fixture
def world() -> Iterator[World]:
    with netns("nmon") as mon, netns("npeer") as peer:
        link = veth(mon, peer, ["10.79.0.2/24", "fd79::2/64"], ["10.79.0.1/24", "fd79::1/64"])
        yield World(mon, peer, link)


@attrs.define
class Monitor:
    """The monitor process: its batches as they come, and everything it printed."""

    process: trio.Process
    batches: list[list[NetworkChange]] = attrs.field(factory=list)
    stats: dict[str, int] = attrs.field(factory=dict)
    _buffer: bytes = b""

    async def _line(self) -> bytes:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the monitor exited: {await self._stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    async def _stderr(self) -> str:
        assert self.process.stderr is not None
        with trio.move_on_after(2):
            return (await self.process.stderr.receive_some(65536)).decode(errors="replace")
        return "(no stderr)"

    async def ready(self) -> None:
        with trio.fail_after(WAIT_S):
            assert json.loads(await self._line()) == {"ready": True}

    async def until(
        self, what: str, predicate: Callable[[list[NetworkChange]], bool]
    ) -> list[NetworkChange]:
        """Read batches until one satisfies ``predicate``; return it."""
        with trio.move_on_after(WAIT_S):
            while True:
                report = json.loads(await self._line())
                batch = [NetworkChange(**change) for change in report["changes"]]
                self.batches.append(batch)
                self.stats = report["stats"]
                if predicate(batch):
                    return batch
        raise AssertionError(f"no batch with {what} in {WAIT_S} s; got {self.batches}")


@contextlib.asynccontextmanager
async def monitor_in(ns: Netns, ignore: str = TUN) -> AsyncIterator[Monitor]:
    process = await trio.lowlevel.open_process(
        ns.exec_argv([PY, "-c", MONITOR, ignore]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        monitor = Monitor(process)
        await monitor.ready()
        yield monitor
    finally:
        process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


def has(**fields: object) -> Callable[[list[NetworkChange]], bool]:
    """A predicate: some change in the batch has these field values."""
    return lambda batch: any(all(getattr(c, k) == v for k, v in fields.items()) for c in batch)


def ifindex(ns: Netns, name: str) -> int:
    (info,) = ip_json(ns, "link", "show", name)
    return int(info["ifindex"])


async def test_a_link_going_down_and_up_is_seen_and_so_is_carrier_loss(world: World) -> None:
    dev, index = world.link.name_a, ifindex(world.mon, world.link.name_a)
    async with monitor_in(world.mon) as monitor:
        ip(world.mon, "link", "set", dev, "down")
        batch = await monitor.until("our link down", has(kind="link", ifindex=index, up=False))
        assert matters(batch) and not gains(batch)
        ip(world.mon, "link", "set", dev, "up")
        batch = await monitor.until("our link up", has(kind="link", ifindex=index, up=True))
        assert gains(batch)
        # the other end going down is a cable pulled: no carrier, so not usable
        ip(world.peer, "link", "set", world.link.name_b, "down")
        await monitor.until("carrier loss", has(kind="link", ifindex=index, up=False))
        ip(world.peer, "link", "set", world.link.name_b, "up")
        await monitor.until("carrier back", has(kind="link", ifindex=index, up=True))


async def test_addresses_added_and_removed_are_seen_and_a_burst_is_one_batch(
    world: World,
) -> None:
    dev, index = world.link.name_a, ifindex(world.mon, world.link.name_a)
    async with monitor_in(world.mon) as monitor:
        ip(world.mon, "addr", "add", "10.79.0.5/24", "dev", dev)
        batch = await monitor.until(
            "10.79.0.5", has(kind="address", up=True, ifindex=index, detail="10.79.0.5/24")
        )
        assert gains(batch)
        ip(world.mon, "-6", "addr", "add", "fd79::5/64", "dev", dev, "nodad")
        await monitor.until("fd79::5", has(kind="address", up=True, detail="fd79::5/64"))
        ip(world.mon, "addr", "del", "10.79.0.5/24", "dev", dev)
        batch = await monitor.until(
            "10.79.0.5 removed", has(kind="address", up=False, detail="10.79.0.5/24")
        )
        assert matters(batch) and not gains(batch)

        # twenty addresses in one go: far fewer batches than changes
        many = {f"10.79.1.{n}/24" for n in range(1, 21)}
        script = "".join(f"addr add {a} dev {dev}\n" for a in sorted(many))
        await run(world.mon, ["ip", "-batch", "-"], stdin=script.encode())
        start = len(monitor.batches)
        seen: set[str] = set()

        def all_seen(batch: list[NetworkChange]) -> bool:
            seen.update(c.detail for c in batch if c.kind == "address" and c.detail)
            return many <= seen

        await monitor.until("all twenty addresses", all_seen)
        assert len(monitor.batches) - start <= 3, monitor.batches[start:]


async def test_default_route_changes_are_seen(world: World) -> None:
    dev, index = world.link.name_a, ifindex(world.mon, world.link.name_a)
    async with monitor_in(world.mon) as monitor:
        ip(world.mon, "route", "add", "default", "via", "10.79.0.1")
        default = has(kind="route", up=True, detail="0.0.0.0/0", table=RT_TABLE_MAIN)
        batch = await monitor.until("a default route", default)
        assert has(gateway="10.79.0.1", ifindex=index)(batch)
        assert gains(batch)
        ip(world.mon, "route", "replace", "default", "via", "10.79.0.3")
        await monitor.until("the new gateway", has(detail="0.0.0.0/0", gateway="10.79.0.3"))
        ip(world.mon, "-6", "route", "add", "default", "via", "fd79::1", "dev", dev)
        await monitor.until("an IPv6 default route", has(detail="::/0", gateway="fd79::1"))
        ip(world.mon, "route", "del", "default")
        batch = await monitor.until("no default route", has(detail="0.0.0.0/0", up=False))
        assert matters(batch)


@pytest.mark.parametrize("created", ["before", "after"])
async def test_changes_on_the_ignored_interface_are_not_reported(
    world: World, created: str
) -> None:
    """What the client does to its own TUN (up, addresses, routes, the default route's
    halves, and removal) must not wake it. A change on another interface made afterwards
    proves that the monitor had read past them all: netlink delivers in order."""
    dev = world.link.name_a

    def make_tun() -> None:
        ip(world.mon, "tuntap", "add", "mode", "tun", "dev", TUN)

    if created == "before":
        make_tun()
    async with monitor_in(world.mon) as monitor:
        if created == "after":
            make_tun()
        tun_index = ifindex(world.mon, TUN)
        ip(world.mon, "link", "set", TUN, "up")
        ip(world.mon, "addr", "add", "10.78.0.2/24", "dev", TUN)
        ip(world.mon, "-6", "addr", "add", "fd78::2/64", "dev", TUN, "nodad")
        for half in ("0.0.0.0/1", "128.0.0.0/1"):
            ip(world.mon, "route", "add", half, "dev", TUN)
        ip(world.mon, "-6", "route", "add", "::/1", "dev", TUN)
        ip(world.mon, "addr", "add", "10.79.0.7/24", "dev", dev)
        await monitor.until("the marker address", has(kind="address", detail="10.79.0.7/24"))
        ignored_before_removal = monitor.stats["ignored"]
        assert ignored_before_removal >= 6, monitor.stats

        ip(world.mon, "link", "del", TUN)
        ip(world.mon, "addr", "add", "10.79.0.8/24", "dev", dev)
        await monitor.until("the second marker", has(kind="address", detail="10.79.0.8/24"))
        assert monitor.stats["ignored"] > ignored_before_removal, monitor.stats

        own = [
            c for batch in monitor.batches for c in batch
            if c.ifname == TUN or c.ifindex == tun_index
        ]  # fmt: skip
        assert own == [], own
