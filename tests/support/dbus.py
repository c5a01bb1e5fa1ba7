"""A private D-Bus system bus for tests, optionally with a stand-in systemd-resolved on it.

:func:`private_system_bus` starts ``dbus-daemon --nofork --print-address`` with a generated
configuration (``<type>system</type>``, a unix socket in a fresh temporary directory, a
policy that allows everything, EXTERNAL authentication), waits for the address it prints,
then (unless ``resolved=False``) starts :mod:`tests.support.fake_resolved` on it (``silent``:
one that never answers) and waits for its "ready" line, which it prints once it owns
``org.freedesktop.resolve1``. Both are killed at exit. Point ``DBUS_SYSTEM_BUS_ADDRESS`` at
:attr:`PrivateBus.address` and every jeepney client in the process talks to this bus instead
of the host's.

Every wait is for a line on a pipe, with a deadline: never a guessed sleep. A plain
(synchronous) context manager, so sync fixtures and trio tests can both use it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from tests.support import tool_argv

__all__ = ["START_TIMEOUT_S", "PrivateBus", "private_system_bus", "name_has_owner"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class PrivateBus(NamedTuple):
    address: str  # a D-Bus address: unix:path=...
    record: Path | None  # fake_resolved's link state (JSON); None without it


@contextlib.contextmanager
def private_system_bus(*, resolved: bool = True, silent: bool = False) -> Iterator[PrivateBus]:
    """A throw-away system bus, with fake_resolved on it if ``resolved`` (``silent``: it
    owns the name but answers nothing)."""
    with tempfile.TemporaryDirectory(prefix="tnl-dbus-") as directory:
        here = Path(directory)
        config = here / "bus.conf"
        config.write_text(_CONFIG.format(socket=here / "bus"))
        daemon_path = shutil.which("dbus-daemon")
        if daemon_path is None:
            raise FileNotFoundError("dbus-daemon is not on PATH (Debian: apt install dbus-daemon)")
        with _started(
            [daemon_path, f"--config-file={config}", "--print-address", "--nofork"],
            here / "dbus-daemon.log",
        ) as (daemon, log):
            address = _read_line(daemon, log, "dbus-daemon")
            if not resolved:
                yield PrivateBus(address, None)
                return
            record = here / "links.json"
            argv = tool_argv("fake_resolved", "--bus", address, "--record", str(record))
            if silent:
                argv.append("--silent")
            with _started(argv, here / "fake_resolved.log") as (fake, fake_log):
                if _read_line(fake, fake_log, "fake_resolved") != "ready":
                    raise RuntimeError(f"fake_resolved: unexpected output\n{_tail(fake_log)}")
                if not name_has_owner(address, "org.freedesktop.resolve1"):
                    raise RuntimeError("fake_resolved said ready but owns no name")
                yield PrivateBus(address, record)


def name_has_owner(address: str, name: str) -> bool:
    """org.freedesktop.DBus.NameHasOwner on the bus at ``address``."""
    with open_dbus_connection(bus=address) as connection:
        reply = connection.send_and_get_reply(
            message_bus.NameHasOwner(name), timeout=START_TIMEOUT_S
        )
    return bool(reply.body[0])


@contextlib.contextmanager
def _started(argv: list[str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
    try:
        yield process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def _read_line(process: subprocess.Popen[bytes], log: Path, name: str) -> str:
    """The first line ``process`` prints, within START_TIMEOUT_S."""
    stdout: IO[bytes] | None = process.stdout
    assert stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{name}: no output in {START_TIMEOUT_S:g} s\n{_tail(log)}")
            if not selector.select(remaining):
                continue
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                process.wait(timeout=STOP_TIMEOUT_S)
                raise RuntimeError(f"{name} exited ({process.returncode})\n{_tail(log)}")
            data += chunk
    return data.split(b"\n", 1)[0].decode().strip()


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
