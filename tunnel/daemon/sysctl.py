"""Reading and writing /proc/sys: the one place the daemons touch sysctls (the server's
net.ipv4.ip_forward with masquerade, the client's src_valid_mark for a full tunnel)."""

from __future__ import annotations

from pathlib import Path

from tunnel.errors import SystemSetupError

PROC_SYS = Path("/proc/sys")


def sysctl_path(name: str, root: Path = PROC_SYS) -> Path:
    """``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``."""
    return root / name.replace(".", "/")


def read_sysctl(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise SystemSetupError(f"{path}: cannot read: {exc.strerror}") from None


def write_sysctl(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n", encoding="ascii")
    except OSError as exc:
        raise SystemSetupError(f"{path}: cannot write {value!r}: {exc.strerror}") from None
