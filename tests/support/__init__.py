"""Test tooling that is not part of the installed package: network namespaces
(:mod:`tests.support.netns`), a fault-injecting UDP relay (:mod:`tests.support.relay`), a TCP
transfer checker (:mod:`tests.support.transfer`) and a handshake flood
(:mod:`tests.support.flood`). The in-memory fakes stay in :mod:`tunnel.testing.fakes`.

Import these as ``tests.support.X`` with the repository root on ``sys.path`` (pytest's
``pythonpath`` setting does that). The command-line tools (relay, transfer, flood) run by
path, so they work from any cwd and inside ``ip netns exec``: :func:`tool_argv`.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tool_argv(tool: str, *args: str) -> list[str]:
    """argv running ``tests/support/<tool>.py`` with this interpreter, whatever the cwd."""
    return [sys.executable, str(HERE / f"{tool}.py"), *args]
