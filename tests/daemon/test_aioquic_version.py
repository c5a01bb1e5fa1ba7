"""The aioquic version check: supported range, one-line message, exit 100 through the CLI."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from tunnel.daemon import aioquic_version
from tunnel.errors import EXIT_PERMANENT, SystemSetupError


def _installed(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    def fake_version(name: str) -> str:
        assert name == "aioquic"
        return text

    monkeypatch.setattr(aioquic_version, "version", fake_version)


def test_requirement_matches_the_bounds() -> None:
    assert aioquic_version.SUPPORTED == ((1, 7, 0), (1, 8))
    assert aioquic_version.requirement() == "aioquic>=1.7.0,<1.8"


def test_pyproject_pins_the_same_range() -> None:
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    assert f'"{aioquic_version.requirement()}"' in pyproject.read_text()


@pytest.mark.parametrize("text", ["1.7.0", "1.7.1", "1.7.2", "1.7.10", "1.7.2+local"])
def test_inside_the_range_passes(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    _installed(monkeypatch, text)
    assert aioquic_version.check_aioquic_version() == text


@pytest.mark.parametrize("text", ["1.6.1", "1.5.0", "0.9.25", "1.8.0", "1.8", "2.0.0", "junk"])
def test_outside_the_range_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    _installed(monkeypatch, text)
    with pytest.raises(SystemSetupError) as info:
        aioquic_version.check_aioquic_version()
    assert str(info.value) == (
        f"aioquic {text} is installed; tunnel needs aioquic >= 1.7.0, < 1.8"
        " (pip install 'aioquic>=1.7.0,<1.8')"
    )
    assert info.value.exit_code == EXIT_PERMANENT


def test_missing_aioquic(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(aioquic_version, "version", not_found)
    with pytest.raises(SystemSetupError, match=r"^aioquic is not installed; tunnel needs"):
        aioquic_version.check_aioquic_version()


# tunnel.daemon is already imported here, so the CLI check runs in a fresh interpreter whose
# importlib.metadata.version is patched before anything imports tunnel.daemon.
_CLI_PROBE = """
import importlib.metadata, sys
real = importlib.metadata.version
importlib.metadata.version = lambda name: "1.6.1" if name == "aioquic" else real(name)
from tunnel.cli import main
sys.exit(main(["status", "--socket", sys.argv[1]]))
"""


def test_cli_prints_one_line_not_a_traceback(tmp_path) -> None:
    socket_path = tmp_path / "control.sock"
    socket_path.touch()  # exists, so the status command goes on to import the daemon
    result = subprocess.run(
        [sys.executable, "-c", _CLI_PROBE, str(socket_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_PERMANENT, result.stderr
    assert result.stderr == (
        "tunnel: aioquic 1.6.1 is installed; tunnel needs aioquic >= 1.7.0, < 1.8"
        " (pip install 'aioquic>=1.7.0,<1.8')\n"
    )
