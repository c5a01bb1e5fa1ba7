"""Integration tests: real network namespaces, real TUN devices, the real CLI.

They need root, ``ip`` (iproute2) and /dev/net/tun. Without them the tests are skipped, unless
the environment variable ``CI`` is set: CI runs as root, so a missing requirement there is a
broken machine and must fail loudly rather than pass by skipping everything.

Every test here gets the ``netns`` marker. Fixtures write keys, tokens and configs into a short
per-test directory under /tmp (unix socket paths must stay under 108 bytes, which pytest's
``tmp_path`` does not promise).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.support import netns as nstools
from tunnel.core.identity import Identity, format_key_file
from tunnel.core.tokens import new_token

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.netns)


def _missing_requirement() -> str | None:
    if sys.platform != "linux":
        return "integration tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "integration tests need /dev/net/tun"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"integration tests need `{tool}` (run scripts/test to install it)"
    return None


@pytest.fixture(scope="session")
def _netns_environment() -> Iterator[None]:
    missing = _missing_requirement()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}", pytrace=False)
        pytest.skip(missing)
    # namespaces of an earlier run that was SIGKILLed (its pid is gone) are ours to remove
    reaped = nstools.reap_stale()
    if reaped:
        logging.getLogger("tests.support").warning("removed stale namespaces: %s", reaped)
    yield


@pytest.fixture(autouse=True)
def _integration_setup(_netns_environment: None, caplog: pytest.LogCaptureFixture) -> None:
    # daemon output is echoed at DEBUG on this logger: keep it so a failure shows it
    caplog.set_level(logging.DEBUG, logger="tests.support")


@attrs.frozen
class Key:
    """An identity written to a key file."""

    path: Path
    public_id: str


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: clients = { alice = "..." }
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a flat TOML table (``None`` values are left out)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@attrs.define
class TunnelFiles:
    """Keys, tokens, configs and socket paths of one test, all under ``dir``."""

    dir: Path

    def key(self, name: str, identity: Identity | None = None) -> Key:
        """``identity`` (a new one if not given) in ``<dir>/<name>.key`` (mode 0600)."""
        identity = identity or Identity.generate()
        path = self.dir / f"{name}.key"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(format_key_file(identity))
        return Key(path, identity.public_id)

    @staticmethod
    def token() -> str:
        """A fresh, well-formed auth token."""
        return new_token()

    def socket(self, name: str) -> Path:
        """A control socket path (short enough for AF_UNIX)."""
        return self.dir / f"{name}.sock"

    def server_config(self, name: str = "server", **settings: Any) -> Path:
        """Write ``<name>.toml`` with the test defaults, overridden by ``settings``."""
        data: dict[str, Any] = {
            "listen": "10.77.0.1:4433",
            "network": "10.78.0.0/24",
            "network6": "fd78::/64",
            "max_clients": 8,
            "tun_name": "tnlsrv0",
            "control_socket": self.socket(name),
            "state_dir": str(self.dir / "state"),
        }
        data.update(settings)
        return write_toml(self.dir / f"{name}.toml", data)

    def client_config(self, name: str, **settings: Any) -> Path:
        """Write ``<name>.toml`` for a client with the test defaults, overridden by
        ``settings`` (``server_id``, ``auth_token`` and ``key_file`` are needed)."""
        data: dict[str, Any] = {
            "server": "10.77.0.1:4433",
            "tun_name": "tnlcli0",
            "control_socket": self.socket(name),
            "state_dir": str(self.dir / "state"),
            "auto_reconnect": False,
        }
        data.update(settings)
        return write_toml(self.dir / f"{name}.toml", data)


@pytest.fixture
def files() -> Iterator[TunnelFiles]:
    """A :class:`TunnelFiles` in a fresh short directory under /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="tnl-it-"))
    try:
        yield TunnelFiles(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
