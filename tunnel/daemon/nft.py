"""nftables for the daemons: one libnftables context, the client's kill switch and the
server's masquerade.

The rulesets themselves are built by :mod:`tunnel.core.nftrules`; this module runs them
through libnftables (the ``nftables`` module of pip-nftables or the distribution's
python3-nftables, a ctypes binding over ``libnftables.so.1``, the library ``nft`` itself is
built on). Going through the library instead of the ``nft`` program needs no executable on
PATH, and a JSON document in one call is one kernel transaction, which is what makes
:meth:`KillSwitch.engage` an atomic takeover. The binding is imported when the first
:class:`Nftables` is made, so a daemon that uses neither object never needs it.

The calls are synchronous and short (one netlink batch each); the daemons make them at
start and stop, not per packet.

What outlives a killed daemon, and how it is found again:

- the kill switch is the point of outliving the client, and its table name is derived from
  the TUN name, so :meth:`KillSwitch.cleanup` (``tunnel client --cleanup``) finds it without
  a record;
- the masquerade table goes the same way, but the ``ip_forward`` value it replaced is only
  known to the server that changed it, so :meth:`Masquerade.start` writes it to the
  :class:`~tunnel.daemon.statefile.StateFile` before changing anything, and
  :meth:`Masquerade.recover` puts it back on the next start.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from tunnel.core import nftrules
from tunnel.daemon.statefile import StateFile
from tunnel.daemon.sysctl import read_sysctl as _read_sysctl
from tunnel.daemon.sysctl import write_sysctl as _write_sysctl
from tunnel.errors import ConfigError, SystemSetupError

__all__ = ["MASQUERADE_STATE_KEY", "KillSwitch", "Masquerade", "Nftables"]

log = logging.getLogger("tunnel.nft")

#: The state file key under which :class:`Masquerade` records what it changed.
MASQUERADE_STATE_KEY = "masquerade"

_IP_FORWARD = Path("net/ipv4/ip_forward")
_ENOENT = "No such file or directory"
# libnftables prefixes each error with where in the input it is; for JSON that says nothing.
_LOCATION_RE = re.compile(r"^internal:\d+:\d+-\d+:\s*")


def _first_line(error: str) -> str:
    for line in error.splitlines():
        line = _LOCATION_RE.sub("", line.strip())
        if line:
            return line
    return "failed without saying why"


class Nftables:
    """One libnftables context: JSON in, JSON out, no handles in listings.

    Raises :class:`SystemSetupError` with a one-line message when the ``nftables`` module or
    ``libnftables.so.1`` is missing. Errors of the calls below are SystemSetupError too
    (``nftables: Operation not permitted`` without CAP_NET_ADMIN, for one).
    """

    def __init__(self) -> None:
        try:
            binding = importlib.import_module("nftables")
        except ImportError:
            raise SystemSetupError(
                "nftables: the Python module 'nftables' is missing"
                " (install pip-nftables, or the distribution's python3-nftables)"
            ) from None
        try:
            context = binding.Nftables()
        except OSError as exc:
            raise SystemSetupError(
                f"nftables: cannot load libnftables.so.1 (install libnftables1): {exc}"
            ) from None
        context.set_json_output(True)
        context.set_handle_output(False)
        self._context: Any = context

    def _run(self, commands: dict[str, Any]) -> tuple[int, str]:
        rc, _output, error = self._context.json_cmd(commands)
        return int(rc), str(error or "")

    def apply(self, commands: dict[str, Any]) -> None:
        """Run ``commands`` (one transaction: all of it or nothing)."""
        rc, error = self._run(commands)
        if rc != 0:
            raise SystemSetupError(f"nftables: {_first_line(error)}")

    def delete_table(self, family: str, table: str) -> bool:
        """Delete the table; False when it was not there."""
        rc, error = self._run(nftrules.delete_table(family, table))
        if rc == 0:
            return True
        if _ENOENT in error:
            return False
        raise SystemSetupError(f"nftables: {_first_line(error)}")

    def has_table(self, family: str, table: str) -> bool:
        """Whether the table exists."""
        listing = {"nftables": [{"list": {"table": {"family": family, "name": table}}}]}
        rc, error = self._run(listing)
        if rc == 0:
            return True
        if _ENOENT in error:
            return False
        raise SystemSetupError(f"nftables: {_first_line(error)}")

    def ruleset_text(self) -> str:
        """``nft list ruleset`` as text (no handles): what an operator would see."""
        self._context.set_json_output(False)
        try:
            rc, output, error = self._context.cmd("list ruleset")
        finally:
            self._context.set_json_output(True)
        if rc != 0:
            raise SystemSetupError(f"nftables: {_first_line(str(error or ''))}")
        return str(output or "")


def _config_error(what: str, exc: ValueError) -> ConfigError:
    return ConfigError(f"{what}: tun_name: {exc}")


class KillSwitch:
    """While engaged, nothing leaves this host but loopback, ``tun_name`` and packets marked
    ``fwmark`` (see :func:`tunnel.core.nftrules.kill_switch`).

    The table is meant to outlive a client that is killed or crashes: then the host stays
    closed until the next client engages (and takes the table over) or ``tunnel client
    --cleanup`` runs :meth:`cleanup`. Only a clean stop calls :meth:`release`.
    """

    FAMILY = "inet"

    def __init__(self, nft: Nftables, *, tun_name: str, fwmark: int) -> None:
        try:
            self.table = nftrules.table_name(nftrules.KILL_SWITCH, tun_name)
            self._commands = nftrules.kill_switch(self.table, tun_name=tun_name, fwmark=fwmark)
        except ValueError as exc:
            raise _config_error("kill switch", exc) from None
        self._nft = nft
        self.tun_name = tun_name
        self.fwmark = fwmark

    def engage(self) -> None:
        """Create the table, or replace one left behind, in one transaction (no gap)."""
        self._nft.apply(self._commands)
        log.info(
            "kill switch on: only lo, %s and packets marked %#x leave this host (table %s %s)",
            self.tun_name,
            self.fwmark,
            self.FAMILY,
            self.table,
        )

    def release(self) -> None:
        """Delete the table (a clean stop); nothing to do if it is gone already."""
        removed = self._nft.delete_table(self.FAMILY, self.table)
        log.info("kill switch off%s", "" if removed else " (it was not on)")

    @staticmethod
    def cleanup(nft: Nftables, tun_name: str) -> bool:
        """Delete the kill switch a killed client left for ``tun_name``; True if there was one."""
        try:
            table = nftrules.table_name(nftrules.KILL_SWITCH, tun_name)
        except ValueError as exc:
            raise _config_error("kill switch", exc) from None
        removed = nft.delete_table(KillSwitch.FAMILY, table)
        if removed:
            log.info("removed the kill switch left for %s (table %s)", tun_name, table)
        return removed


def _restore_forwarding(path: Path, previous: str) -> None:
    """Put ``previous`` back, writing only if it differs: every write of ip_forward also resets
    each interface's forwarding setting, which is not ours to touch for nothing."""
    if _read_sysctl(path) != previous:
        _write_sysctl(path, previous)
        log.info("%s restored to %s", path, previous)


def _recorded(record: Any) -> tuple[str | None, str | None]:
    """(previous ip_forward, table) from a state record, None for what is not usable."""
    if not isinstance(record, dict):
        return None, None
    forward = record.get("ip_forward")
    table = record.get("table")
    return (
        forward if isinstance(forward, str) and forward.isdigit() else None,
        table if isinstance(table, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", table) else None,
    )


class Masquerade:
    """The server's way out for its clients: IPv4 forwarding on, and the pools masqueraded
    behind whichever address the host leaves by (see :func:`tunnel.core.nftrules.masquerade`).

    The state record is ``{"ip_forward": "<value before>", "table": "<table>"}`` under
    :data:`MASQUERADE_STATE_KEY`; the table name is kept so that :meth:`recover` also finds a
    table left under a TUN name the configuration no longer has.
    """

    FAMILY = "ip"

    def __init__(
        self,
        nft: Nftables,
        *,
        tun_name: str,
        pools: Sequence[IPv4Network],
        state: StateFile,
        sysctl_dir: Path = Path("/proc/sys"),
    ) -> None:
        try:
            self.table = nftrules.table_name(nftrules.MASQUERADE, tun_name)
            self._commands = nftrules.masquerade(self.table, tun_name=tun_name, pools=pools)
        except ValueError as exc:
            raise _config_error("masquerade", exc) from None
        self._nft = nft
        self._state = state
        self._forward = sysctl_dir / _IP_FORWARD
        self._previous: str | None = None
        self.tun_name = tun_name
        self.pools = tuple(pools)

    def start(self) -> None:
        """Record the current ip_forward, turn forwarding on, apply the table.

        A record left by a killed server is kept as it is: its value is the one from before
        any server touched the host (ours would be the "1" that server wrote). If applying
        the table fails, forwarding is put back and the record dropped before the error
        propagates.
        """
        previous, _ = _recorded(self._state.get(MASQUERADE_STATE_KEY))
        if previous is None:
            previous = _read_sysctl(self._forward)
        self._state.put(MASQUERADE_STATE_KEY, {"ip_forward": previous, "table": self.table})
        self._previous = previous
        try:
            if _read_sysctl(self._forward) != "1":
                _write_sysctl(self._forward, "1")
            self._nft.apply(self._commands)
        except BaseException:
            self._undo(previous)
            raise
        log.info(
            "masquerading %s out of every device but %s (table %s %s); ip_forward was %s",
            ", ".join(str(pool) for pool in self.pools),
            self.tun_name,
            self.FAMILY,
            self.table,
            previous,
        )

    def stop(self) -> None:
        """Delete the table, restore ip_forward, drop the record. Nothing to do if not started."""
        previous = self._previous
        if previous is None:
            return
        self._nft.delete_table(self.FAMILY, self.table)
        self._undo(previous)
        log.info("masquerade off; ip_forward back to %s", previous)

    def _undo(self, previous: str) -> None:
        try:
            _restore_forwarding(self._forward, previous)
        finally:
            self._previous = None
            self._state.drop(MASQUERADE_STATE_KEY)

    @staticmethod
    def recover(
        nft: Nftables,
        tun_name: str,
        state: StateFile,
        *,
        sysctl_dir: Path = Path("/proc/sys"),
    ) -> bool:
        """At server start: undo what a killed server left, i.e. the masquerade table for
        ``tun_name`` (and the one named in the record, if another) and ip_forward as the record
        says. True if anything was there."""
        try:
            table = nftrules.table_name(nftrules.MASQUERADE, tun_name)
        except ValueError as exc:
            raise _config_error("masquerade", exc) from None
        record = state.get(MASQUERADE_STATE_KEY)
        previous, recorded_table = _recorded(record)
        tables = [table]
        if recorded_table is not None and recorded_table != table:
            tables.append(recorded_table)
        removed = [name for name in tables if nft.delete_table(Masquerade.FAMILY, name)]
        if removed:
            log.info("removed the masquerade left by an earlier server: %s", ", ".join(removed))
        if previous is not None:
            _restore_forwarding(sysctl_dir / _IP_FORWARD, previous)
        elif record is not None:
            log.warning("state %r is not a masquerade record; dropping it", record)
        if record is not None:
            state.drop(MASQUERADE_STATE_KEY)
        return bool(removed) or record is not None
