"""The namespace harness itself: namespaces, veths, daemons under a nursery, the transfer tool.

If these fail, the end-to-end tests cannot be trusted either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from tests.support import netns as nstools
from tests.support import tool_argv
from tests.support.netns import DaemonError, netns, open_daemon_nursery, run, start_daemon, veth
from tests.support.transfer import expected_sha256

TEST_TIMEOUT = 60


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split(" ", 1)[0] for line in out.stdout.splitlines() if line.strip()}


async def test_two_namespaces_ping_over_veth_v4_and_v6() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with netns("ha") as a, netns("hb") as b:
            assert a.name != b.name
            assert {a.name, b.name} <= _namespaces()
            pair = veth(a, b, ["10.77.9.1/24", "fd77:9::1/64"], ["10.77.9.2/24", "fd77:9::2/64"])
            links = {link["ifname"]: link for link in nstools.ip_json(a, "link")}
            assert links[pair.name_a]["mtu"] == 1500
            assert "UP" in links["lo"]["flags"]
            await run(a, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.9.2"])
            await run(b, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.9.1"])
            await run(a, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "fd77:9::2"])
            await run(b, ["ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", "fd77:9::1"])
            # nothing leaks into the namespace we run in
            assert pair.name_a not in {link["ifname"] for link in nstools.ip_json(None, "link")}
        assert not {a.name, b.name} & _namespaces()


def test_namespace_is_deleted_and_its_processes_killed_on_error() -> None:
    sleeper: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with netns("hc") as ns:
                sleeper = subprocess.Popen(ns.exec_argv(["sleep", "600"]))
                deadline = time.monotonic() + 5
                while sleeper.pid not in ns.pids():
                    assert time.monotonic() < deadline, "sleep never showed up in the namespace"
                    time.sleep(0.02)
                raise RuntimeError("boom")
        assert ns.name not in _namespaces()
        # the context manager killed it before deleting the namespace
        assert sleeper.wait(timeout=10) == -9
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()


def test_bridge_joins_three_namespaces() -> None:
    with netns("hs") as hub, netns("h1") as one, netns("h2") as two:
        v1 = veth(hub, one, None, "10.77.8.2/24")
        v2 = veth(hub, two, None, "10.77.8.3/24")
        nstools.bridge(hub, [v1.name_a, v2.name_a], "10.77.8.1/24")
        for ns, peer in ((one, "10.77.8.3"), (two, "10.77.8.1"), (hub, "10.77.8.2")):
            subprocess.run(
                ns.exec_argv(["ping", "-c", "1", "-W", "2", peer]),
                check=True,
                capture_output=True,
                timeout=10,
            )


# A stand-in daemon: optional delay, readiness line on --ready-fd, SIGTERM -> exit 0.
FAKE_DAEMON = textwrap.dedent(
    """
    import os, signal, sys, time
    args = sys.argv[1:]
    fd = int(args[args.index("--ready-fd") + 1])
    mode = args[0]
    print("fake daemon starting", file=sys.stderr, flush=True)
    if mode == "fail":
        print("fatal: config is broken", file=sys.stderr, flush=True)
        sys.exit(100)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if mode != "mute":
        os.write(fd, b"\\n")
        os.close(fd)
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


def _fake(mode: str) -> list[str]:
    return [sys.executable, "-c", FAKE_DAEMON, mode]


async def test_start_daemon_ready_terminate_and_logs() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with netns("hd") as ns:
            async with open_daemon_nursery() as nursery:
                daemon = await start_daemon(nursery, ns, _fake("ok"), name="fake")
                assert daemon.pid in ns.pids()
                assert daemon.returncode is None
                daemon.terminate()
                assert await daemon.wait() == 0
                assert "fake daemon starting" in daemon.log
                assert daemon.stdout_lines == ["ready"]


async def test_start_daemon_reports_exit_before_ready() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            with pytest.raises(DaemonError, match=r"exited with 100(?s:.*)config is broken"):
                await start_daemon(nursery, None, _fake("fail"), name="fake")


async def test_start_daemon_times_out_and_kills() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with netns("he") as ns:
            async with open_daemon_nursery() as nursery:
                with pytest.raises(DaemonError, match="not ready after 1 s"):
                    await start_daemon(nursery, ns, _fake("mute"), name="mute", ready_timeout=1)
            assert ns.pids() == []


async def test_cancelled_nursery_kills_a_daemon_ignoring_sigterm() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with netns("hf") as ns:
            started = trio.current_time()
            async with open_daemon_nursery() as nursery:
                daemon = await start_daemon(nursery, ns, _fake("stubborn"), name="stubborn")
            assert daemon.returncode == -9
            assert trio.current_time() - started >= nstools.KILL_AFTER_S
            assert ns.pids() == []


async def test_transfer_tool_over_veth_v4_and_v6() -> None:
    tool = tool_argv("transfer")
    with trio.fail_after(TEST_TIMEOUT):
        with netns("hg") as a, netns("hh") as b:
            veth(a, b, ["10.77.7.1/24", "fd77:7::1/64"], ["10.77.7.2/24", "fd77:7::2/64"])
            for target in ("10.77.7.1:5201", "[fd77:7::1]:5201"):
                async with open_daemon_nursery() as nursery:
                    receiver = await start_daemon(
                        nursery, a, [*tool, "serve", "--listen", target], name="recv"
                    )
                    sent = await run(
                        b, [*tool, "send", "--to", target, "--bytes", "3000000", "--seed", "s"]
                    )
                    assert await receiver.wait() == 0
                got = json.loads(receiver.stdout_lines[-1])
                want = json.loads(sent.stdout.decode().strip().splitlines()[-1])
                assert got["bytes"] == want["bytes"] == 3_000_000
                assert got["sha256"] == want["sha256"] == expected_sha256(3_000_000, "s")
