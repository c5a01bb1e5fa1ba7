"""A real TUN device takes a merged run of TCP segments: the kernel's TCP reads exactly the
data of the run and acknowledges all of it (the far end is tun_merge_peer.py, in a namespace)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio

from tests.support.netns import netns, run

PEER = str(Path(__file__).resolve().parent / "tun_merge_peer.py")


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
async def test_the_kernel_reads_and_acknowledges_a_merged_run_as_the_segments_it_holds(
    version: int,
) -> None:
    with trio.fail_after(60), netns("tunmerge") as ns:
        argv = [sys.executable, PEER, "--count", "30", "--ip", str(version)]
        proc = await run(ns, argv, timeout=30)
        result = json.loads(proc.stdout)
        assert result["data_ok"], result
        assert result["acked"] == result["sent"] == 30 * 1000, result
        # 30 segments in one write (the SYN and the ACK before them went one by one).
        assert result["merged"] == 29, result
        assert result["writes"] == 32 and result["drops"] == 0, result
