"""What a daemon changed on the host that outlives the daemon, written down before the change.

Most of what a daemon changes goes away with its TUN device. Some does not: a replaced
``/etc/resolv.conf``, a sysctl it turned on, policy routing rules. A daemon killed with SIGKILL
cannot undo those, so it records each one in a :class:`StateFile` before making it, and the
next start of the same daemon (or ``tunnel client --cleanup``) reads the file and undoes what
is listed. The file is one JSON object, one key per kind of change, rewritten atomically
(temporary file, fsync, rename) so a crash mid-write leaves the old version, never half.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from tunnel.errors import SystemSetupError

log = logging.getLogger("tunnel.state")


class StateFile:
    """A small JSON object on disk: record ``key`` before a lasting change, drop it after the
    undo. The directory is created (mode 0700) on the first record; the file is removed when
    its last key is dropped, so a clean stop leaves nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        """Everything recorded (empty when there is no file). A file that is not a JSON
        object is reported and treated as empty: it is ours, but we cannot act on it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SystemSetupError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("%s: not a state file of ours; ignoring it", self.path)
            return {}
        return data

    def get(self, key: str) -> Any:
        """The record under ``key``, or None."""
        return self.read().get(key)

    def put(self, key: str, value: Any) -> None:
        """Record ``value`` under ``key``, on disk before this returns."""
        data = self.read()
        data[key] = value
        self._write(data)

    def drop(self, key: str) -> None:
        """Forget ``key``; the file goes when nothing is left in it."""
        data = self.read()
        if key not in data:
            return
        del data[key]
        if data:
            self._write(data)
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SystemSetupError(f"{self.path}: cannot remove: {exc.strerror}") from None

    def _write(self, data: dict[str, Any]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as exc:
            raise SystemSetupError(f"{self.path}: cannot write: {exc.strerror}") from None


def state_path(state_dir: Path, role: str, control_socket: Path) -> Path:
    """The state file of one daemon: named after its control socket, which is unique per
    running daemon on a host (two daemons cannot share one), so two clients never share a file."""
    name = str(control_socket).strip("/").replace("/", "-") or "default"
    return state_dir / f"{role}-{name}.json"
