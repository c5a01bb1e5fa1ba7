"""The systemd units in scripts/systemd/, checked by systemd's own parser.

``systemd-analyze verify`` loads a unit the way PID 1 would (it needs neither a running
systemd nor root) and reports unknown keys, bad values and missing programs. It insists that
ExecStart's program exists, and the units name /usr/local/bin/tunnel, where an install puts
it, not where a test finds it; ``--root`` does not help (systemd 252 then looks for the unit
file under the root as well). So each unit is verified as a copy, under its own name, with
only that path rewritten to this venv's ``tunnel``.

systemd-analyze ships with systemd: missing, the verify tests skip, unless ``CI`` is set,
where a missing tool is a broken machine and fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.errors import EXIT_PERMANENT

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "scripts" / "systemd").glob("*.service"))
INSTALLED_TUNNEL = "/usr/local/bin/tunnel"


@pytest.fixture(autouse=True)
def _integration_setup() -> None:
    """Overrides the netns requirements of conftest.py: these tests need neither root nor
    namespaces, only systemd-analyze (see :func:`systemd_analyze`)."""


@pytest.fixture
def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but systemd-analyze is missing", pytrace=False)
        pytest.skip("systemd-analyze is missing (it comes with systemd)")
    return found


def _tunnel_here() -> str:
    script = Path(sys.executable).parent / "tunnel"
    return str(script) if script.exists() else sys.executable


def _verify(systemd_analyze: str, unit: Path, directory: Path, text: str | None = None) -> str:
    """``systemd-analyze verify`` on a copy of ``unit`` (or ``text`` under its name) that
    runs an existing program; what it printed, with its exit status if not 0."""
    text = unit.read_text() if text is None else text
    assert INSTALLED_TUNNEL in text
    copy = directory / unit.name
    copy.write_text(text.replace(INSTALLED_TUNNEL, _tunnel_here()))
    result = subprocess.run(
        [systemd_analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        # A pager or colours would only get in the way of reading the output.
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        output += f"\n(exit status {result.returncode})"
    return output


def _about(output: str, unit: Path) -> list[str]:
    """The lines that concern ``unit``: they name it (as the template or as the instance
    systemd-analyze makes of it, ``tunnel-server@i.service``) or its copy."""
    stem = unit.name.removesuffix("@.service")
    return [line for line in output.splitlines() if stem in line or "exit status" in line]


def test_there_are_units():
    assert {unit.name for unit in UNITS} == {"tunnel-server@.service", "tunnel-client@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_systemd_analyze_verify_says_nothing(systemd_analyze, unit, tmp_path):
    output = _verify(systemd_analyze, unit, tmp_path)
    assert _about(output, unit) == [], output


def test_verify_would_report_a_mistake(systemd_analyze, tmp_path):
    """The check above can fail: a misspelt key in the unit is reported, naming it."""
    unit = REPO / "scripts" / "systemd" / "tunnel-server@.service"
    broken = unit.read_text().replace("RestartSec=", "RestartSecs=")
    output = _verify(systemd_analyze, unit, tmp_path, broken)
    assert any("RestartSecs" in line for line in _about(output, unit)), output


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_restart_prevent_exit_status_is_exit_permanent(unit):
    values = [
        value
        for line in unit.read_text().splitlines()
        if (match := re.fullmatch(r"\s*RestartPreventExitStatus=(.*)", line))
        for value in match.group(1).split()
    ]
    assert values, f"{unit.name}: no RestartPreventExitStatus="
    assert all(value == str(EXIT_PERMANENT) for value in values), values


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_runs_the_installed_tunnel_with_the_instance_config(unit):
    role = "server" if "server" in unit.name else "client"
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [f"ExecStart={INSTALLED_TUNNEL} {role} --config /etc/tunnel/%i.toml"]
