"""NetworkMonitor's socket handling on virtual time: a socketpair plays the kernel, so the
timing of batches, cancellation, closing and lost notifications are checked without netlink.
The real socket is in tests/integration/test_netmonitor.py."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from tunnel.core.netchange import LOST, RTM_NEWADDR, RTM_NEWLINK, NetworkChange
from tunnel.daemon.netmonitor import NetworkMonitor

SETTLE = 0.2


def address(n: int, index: int = 3) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = RTM_NEWADDR
    msg["family"], msg["prefixlen"], msg["index"] = 2, 32, index
    msg["attrs"] = [("IFA_ADDRESS", f"10.1.{n // 256}.{n % 256}")]
    msg.encode()
    return bytes(msg.data)


def link(index: int, name: str, up: bool = True) -> bytes:
    msg = ifinfmsg()
    msg["header"]["type"] = RTM_NEWLINK
    msg["index"], msg["flags"] = index, 0x41 if up else 0
    msg["attrs"] = [("IFLA_IFNAME", name)]
    msg.encode()
    return bytes(msg.data)


def addr_change(n: int, index: int = 3) -> NetworkChange:
    return NetworkChange("address", True, index, None, f"10.1.{n // 256}.{n % 256}/32")


@pytest.fixture
def pair() -> Iterator[tuple[NetworkMonitor, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    monitor = NetworkMonitor(ours, ignore_ifname="tnl-no-such0", settle=SETTLE)
    try:
        yield monitor, kernel
    finally:
        monitor.close()
        kernel.close()


async def test_a_burst_comes_out_as_one_batch_settle_seconds_after_its_first_change(
    autojump_clock, pair
):
    monitor, kernel = pair

    async def kernel_side() -> None:
        kernel.send(address(1))
        await trio.sleep(0.05)
        kernel.send(address(2) + address(3))
        await trio.sleep(0.1)
        kernel.send(address(4))
        await trio.sleep(0.5)  # after the batch: the start of the next one
        kernel.send(address(5))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel_side)
        with trio.fail_after(5):
            first = await monitor.wait_change()
            first_at = trio.current_time()
            second = await monitor.wait_change()
            second_at = trio.current_time()
    assert first == [addr_change(n) for n in (1, 2, 3, 4)]
    assert first_at - start == pytest.approx(SETTLE)
    assert second == [addr_change(5)]
    assert second_at - start == pytest.approx(0.65 + SETTLE)
    stats = monitor.statistics()
    assert (stats.datagrams, stats.changes, stats.batches, stats.lost) == (4, 5, 2, 0)


async def test_cancelling_a_wait_loses_nothing(autojump_clock, pair):
    monitor, kernel = pair
    kernel.send(address(1))
    with trio.move_on_after(SETTLE / 2) as scope:
        await monitor.wait_change()
    assert scope.cancelled_caught
    kernel.send(address(2))
    with trio.fail_after(5):
        assert await monitor.wait_change() == [addr_change(1), addr_change(2)]


async def test_a_flood_collapses_into_lost_without_growing(autojump_clock, pair):
    monitor, kernel = pair
    for start in range(0, 600, 150):  # 600 distinct changes, more than a batch holds
        kernel.send(b"".join(address(n) for n in range(start, start + 150)))
    with trio.fail_after(5):
        assert await monitor.wait_change() == [LOST]
    assert monitor.statistics().overflows == 1
    kernel.send(address(1) + address(1000))  # a repeat, and news
    with trio.fail_after(5):
        assert await monitor.wait_change() == [addr_change(1000)]


async def test_the_ignored_interface_is_dropped(autojump_clock, pair):
    monitor, kernel = pair
    monitor.ignore_interface("tnl0")
    kernel.send(link(9, "tnl0") + address(1, index=9) + address(2, index=3))
    with trio.fail_after(5):
        assert await monitor.wait_change() == [addr_change(2, index=3)]
    assert monitor.statistics().ignored == 2


class _Flaky(socket.socket):
    """A socket whose next recv fails with the errors queued in ``errors``."""

    errors: list[int]

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().recv(size, flags)


def _flaky_pair(errors: list[int]) -> tuple[_Flaky, socket.socket]:
    a, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    flaky = _Flaky(fileno=a.detach())
    flaky.errors = errors
    return flaky, kernel


async def test_enobufs_reports_lost_and_the_monitor_goes_on(autojump_clock):
    flaky, kernel = _flaky_pair([errno.ENOBUFS])
    with NetworkMonitor(flaky, settle=SETTLE) as monitor, kernel:
        kernel.send(address(1))
        with trio.fail_after(5):
            assert await monitor.wait_change() == [LOST]
        kernel.send(address(2))
        with trio.fail_after(5):
            assert await monitor.wait_change() == [addr_change(2)]
        assert monitor.statistics().lost == 1


async def test_another_socket_error_is_broken_resource(autojump_clock):
    flaky, kernel = _flaky_pair([errno.EIO])
    with NetworkMonitor(flaky, settle=SETTLE) as monitor, kernel:
        kernel.send(address(1))
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
            await monitor.wait_change()


async def test_close_wakes_a_waiter_with_closed_resource_and_is_idempotent(pair):
    monitor, _ = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await monitor.wait_change()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            monitor.close()
    monitor.close()
    assert monitor.closed
    with pytest.raises(trio.ClosedResourceError):
        await monitor.wait_change()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_the_real_monitor_opens_and_closes_without_leaking_fds():
    before = _open_fds()
    for _ in range(3):
        with NetworkMonitor.open(ignore_ifname="lo") as monitor:
            assert not monitor.closed
            with trio.move_on_after(0.01):
                await monitor.wait_change()  # nothing is expected; it must just wait
        assert monitor.closed
    assert _open_fds() == before
