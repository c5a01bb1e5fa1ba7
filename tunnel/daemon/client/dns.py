"""The DNS servers and search domains the server pushes, applied to the host while connected.

A client that routes everything through the tunnel but keeps asking the LAN's resolver leaks
every name it looks up, and often cannot resolve the names behind the tunnel at all. So the
client hands the pushed settings to whatever manages DNS on this host, tried in this order:

1. **systemd-resolved**, over D-Bus (when ``org.freedesktop.resolve1`` has an owner on the
   system bus): per-link servers and domains for the TUN device; a full tunnel adds the
   routing domain ``~.`` and makes the link the default route for lookups. resolved forgets a
   link's settings when the link goes, so a killed client leaves nothing behind.
2. **resolvconf** (when the command is on ``PATH``): ``resolvconf -a IFNAME -m 0 -x`` with our
   lines on stdin, the way wg-quick does it; ``resolvconf -d IFNAME -f`` takes them back.
3. **the file** itself: ``/etc/resolv.conf`` replaced by
   :func:`tunnel.core.resolvconf.render_resolv_conf`, and put back byte for byte.

Everything but resolved outlives a killed client, so each change is recorded in the
:class:`~tunnel.daemon.statefile.StateFile` under ``"dns"`` *before* it is made, and
:func:`recover` (client start, ``tunnel client --cleanup``) undoes what a previous client left.

The file backend has to cope with what ``/etc/resolv.conf`` really is on hosts:

- a **symlink** (to ``/run/systemd/resolve/stub-resolv.conf``, ``../run/resolvconf/
  resolv.conf``): we record the link's target, put a regular file in its place, and put the
  symlink itself back, not a copy of what it pointed to;
- a **bind mount** (``ip netns exec NS`` mounts ``/etc/netns/NS/resolv.conf`` over it), where a
  rename over the path fails with EBUSY: so a regular file is rewritten *in place* (truncate,
  write, fsync), which also keeps its mode, owner and labels. The price is a moment in which a
  reader sees an empty file (the resolver then asks localhost), which beats failing;
- **absent**: we create it, and remove it again.

If, when we come to undo, the file is neither what we wrote nor the original (NetworkManager,
DHCP or the user rewrote it while we were connected), we leave *their* version alone and say
so in a warning: it is newer than our saved copy, and putting back a stale configuration over
a deliberate change would be the worse surprise. The same applies to a re-apply: a file
someone else changed becomes the new original.

:meth:`DnsConfigurator.restore` and :func:`recover` are synchronous on purpose: they run in a
``finally`` on the way out, where half an undo interrupted by a cancellation is the one result
that is never right. Each external step is bounded instead (D-Bus 2 s, resolvconf 5 s).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import attrs
import trio
from jeepney import (  # type: ignore[import-untyped, unused-ignore]
    DBusAddress,
    HeaderFields,
    MessageType,
    new_method_call,
)
from jeepney.bus import get_bus  # type: ignore[import-untyped, unused-ignore]
from jeepney.bus_messages import message_bus  # type: ignore[import-untyped, unused-ignore]
from jeepney.io import blocking as dbus_blocking  # type: ignore[import-untyped, unused-ignore]
from jeepney.io import trio as dbus_trio  # type: ignore[import-untyped, unused-ignore]

from tunnel.core.resolvconf import render_resolv_conf
from tunnel.daemon.statefile import StateFile
from tunnel.errors import SystemSetupError

__all__ = ["BACKENDS", "DnsConfigurator", "DnsSettings", "STATE_KEY", "recover"]

log = logging.getLogger("tunnel.client")

STATE_KEY = "dns"
BACKENDS = ("resolved", "resolvconf", "file")
DBUS_TIMEOUT_S = 2.0  # one conversation with the system bus, connecting included
RESOLVCONF_TIMEOUT_S = 5.0
MAX_RESOLV_CONF = 1 << 20  # bigger than any real resolv.conf; we keep a copy in the state file

RESOLVE1 = "org.freedesktop.resolve1"
_RESOLVE1_MANAGER = DBusAddress(
    "/org/freedesktop/resolve1", bus_name=RESOLVE1, interface="org.freedesktop.resolve1.Manager"
)
_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
# What a missing, refusing or broken bus looks like from jeepney: socket errors (TimeoutError
# included), AuthenticationError (a ValueError), an address it cannot parse or use.
_BUS_ERRORS = (OSError, ValueError, RuntimeError, EOFError)
_TRIO_BUS_ERRORS = (*_BUS_ERRORS, trio.TooSlowError, trio.BrokenResourceError, trio.EndOfChannel)
# Linux interface names (dev_valid_name), minus a leading '-': we pass them as arguments.
_IFNAME = re.compile(r"(?!\.\.?\Z)[^\s/:\-][^\s/:]{0,14}")


@attrs.frozen
class DnsSettings:
    """What the server pushed: resolvers (in order of preference) and search domains."""

    servers: tuple[IPv4Address | IPv6Address, ...]
    search: tuple[str, ...] = ()
    # Full tunnel: every lookup goes to these servers (resolved: the routing domain "~." and
    # the link as default route; resolvconf: -x, exclusive). Otherwise resolved sends them only
    # names in the search domains, and resolvconf merges them (first) with the host's. A
    # replaced resolv.conf cannot split: its servers get every lookup either way.
    route_all: bool = True


class DnsConfigurator:
    """Applies DnsSettings for one link, by the first backend that works here, and undoes it."""

    def __init__(
        self,
        state: StateFile,
        *,
        resolv_conf: Path = Path("/etc/resolv.conf"),
        backend: str | None = None,
    ) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown DNS backend {backend!r}; one of {', '.join(BACKENDS)}")
        self.state = state
        self.resolv_conf = resolv_conf
        self._chosen = backend  # detected on the first apply when None
        self._in_use: str | None = None
        self._applied: tuple[str, int, DnsSettings] | None = None

    @property
    def backend(self) -> str | None:
        """The backend holding our settings now (for status and logs); None when none does."""
        return self._in_use

    async def apply(self, ifname: str, ifindex: int, settings: DnsSettings) -> None:
        """Make ``settings`` the DNS of the host through link ``ifname`` (``ifindex``).
        Idempotent, and called on every (re)connect: the same settings again change nothing,
        other settings (or another link) replace ours. No servers means nothing to apply:
        what we applied before is undone. A failure or cancellation leaves nothing of ours
        (what an earlier call applied is undone too), and SystemSetupError says why in one
        line."""
        wanted = (ifname, ifindex, settings)
        if self._applied == wanted:
            return
        if not settings.servers:
            self.restore()
            return
        _check(ifname, ifindex, settings)
        if self._applied is None:
            # A record we did not make: a killed client's. Undo it first, or the file
            # backend would save the killed client's file as "the original".
            recover(self.state, resolv_conf=self.resolv_conf)
        elif self._applied[:2] != (ifname, ifindex):
            self.restore()
        if self._chosen is None:
            self._chosen = await _detect()
            log.info("DNS: using %s", _describe(self._chosen))
        self._applied = None
        try:
            if self._chosen == "resolved":
                await self._apply_resolved(ifname, ifindex, settings)
            elif self._chosen == "resolvconf":
                await self._apply_resolvconf(ifname, settings)
            else:
                self._apply_file(settings)
        except BaseException:
            # Cancelled or failed halfway: take back whatever part was made (sync, bounded).
            self.restore()
            raise
        self._applied = wanted
        self._in_use = self._chosen
        log.info(
            "DNS via %s on %s: %s%s%s",
            self._chosen,
            ifname,
            ", ".join(str(server) for server in settings.servers),
            f"; search {' '.join(settings.search)}" if settings.search else "",
            "; all lookups" if settings.route_all else "",
        )

    def restore(self) -> None:
        """Undo what :meth:`apply` did (the file byte for byte). Safe to call twice or without
        an apply. Never raises: a failure is logged and its record kept for :func:`recover`."""
        self._applied = None
        self._in_use = None
        try:
            record = self.state.get(STATE_KEY)
            if record is None:
                return
            _undo(record, self.resolv_conf, recovering=False)
            self.state.drop(STATE_KEY)
        except SystemSetupError as exc:
            log.error("DNS not restored: %s (tunnel client --cleanup retries)", exc)

    async def _apply_resolved(self, ifname: str, ifindex: int, settings: DnsSettings) -> None:
        self.state.put(STATE_KEY, {"backend": "resolved", "ifindex": ifindex, "ifname": ifname})
        domains = [(domain, False) for domain in settings.search]
        if settings.route_all:
            domains.append(("~.", True))
        calls = [
            ("SetLinkDNS", "ia(iay)", (ifindex, [_family_and_bytes(s) for s in settings.servers])),
            ("SetLinkDomains", "ia(sb)", (ifindex, domains)),
            ("SetLinkDefaultRoute", "ib", (ifindex, settings.route_all)),
        ]
        try:
            replies = await _dbus_calls(
                [new_method_call(_RESOLVE1_MANAGER, *call) for call in calls]
            )
        except _BusUnavailable as exc:
            raise SystemSetupError(f"systemd-resolved: not reachable over D-Bus: {exc}") from None
        for (method, _, _), reply in zip(calls, replies, strict=True):
            error = _error_of(reply)
            if error is None:
                continue
            if method == "SetLinkDefaultRoute" and error[0] == _UNKNOWN_METHOD:
                log.warning("systemd-resolved too old for SetLinkDefaultRoute (before 240)")
                continue
            raise SystemSetupError(f"systemd-resolved refused {method} for {ifname}: {error[1]}")

    async def _apply_resolvconf(self, ifname: str, settings: DnsSettings) -> None:
        command = shutil.which("resolvconf")
        if command is None:
            raise SystemSetupError("resolvconf: not found on PATH")
        self.state.put(STATE_KEY, {"backend": "resolvconf", "ifname": ifname})
        lines = render_resolv_conf(settings.servers, settings.search, b"")
        argv = [command, "-a", ifname, "-m", "0", *(["-x"] if settings.route_all else [])]
        try:
            with trio.fail_after(RESOLVCONF_TIMEOUT_S):
                result = await trio.run_process(
                    argv, stdin=lines, capture_stdout=True, capture_stderr=True, check=False
                )
        except trio.TooSlowError:
            raise SystemSetupError(
                f"resolvconf -a {ifname}: no answer in {RESOLVCONF_TIMEOUT_S:g} s"
            ) from None
        except OSError as exc:
            raise SystemSetupError(f"resolvconf -a {ifname}: {exc.strerror or exc}") from None
        if result.returncode != 0:
            raise SystemSetupError(
                f"resolvconf -a {ifname} failed (exit {result.returncode})"
                f"{_last_line(result.stderr)}"
            )

    def _apply_file(self, settings: DnsSettings) -> None:
        path = self.resolv_conf
        seen = _look(path)
        record = self.state.get(STATE_KEY)
        # Our own file already (a re-apply): its options lines are the original's, and the
        # original stays the one recorded. Anything else is the original from now on.
        content = render_resolv_conf(settings.servers, settings.search, seen.content)
        digest = _digest(content)
        if _is_ours(record, path, seen):
            written = list(dict.fromkeys([_digest(seen.content), digest]))
            record = {**record, "written": written}
        else:
            record = {**_original_record(path, seen), "written": [digest]}
        self.state.put(STATE_KEY, record)
        try:
            if seen.kind == "file":
                _write_in_place(path, content)
            else:
                _replace(path, content)
        except OSError as exc:
            raise SystemSetupError(f"{path}: cannot write: {exc.strerror or exc}") from None


def recover(state: StateFile, *, resolv_conf: Path = Path("/etc/resolv.conf")) -> bool:
    """Undo the DNS change a killed client left (recorded in ``state`` under ``"dns"``): the
    file put back byte for byte, the resolvconf entry deleted, the resolved link reverted if
    it still exists. True if there was such a record (dealt with and dropped, also when
    someone else's newer file was left alone); SystemSetupError if the undo failed (the record
    stays, for another try)."""
    record = state.get(STATE_KEY)
    if record is None:
        return False
    _undo(record, resolv_conf, recovering=True)
    state.drop(STATE_KEY)
    return True


# -- validation ---------------------------------------------------------------------------


def _check(ifname: str, ifindex: int, settings: DnsSettings) -> None:
    if _IFNAME.fullmatch(ifname) is None:
        raise SystemSetupError(f"DNS: {ifname!r} is not an interface name")
    if not 0 <= ifindex < 1 << 31:
        raise SystemSetupError(f"DNS: {ifindex} is not an interface index")
    try:
        render_resolv_conf(settings.servers, settings.search, b"")
    except ValueError as exc:
        raise SystemSetupError(f"DNS settings from the server: {exc}") from None


def _describe(backend: str) -> str:
    return {
        "resolved": "systemd-resolved (D-Bus)",
        "resolvconf": "resolvconf",
        "file": "a replaced resolv.conf",
    }[backend]


# -- undo ---------------------------------------------------------------------------------


def _undo(record: Any, resolv_conf: Path, *, recovering: bool) -> None:
    """Undo one record, or say why there is nothing to undo; SystemSetupError when that
    failed (keep the record). ``recovering``: the client that made it is gone (log at
    warning level; check its link still exists)."""
    level = logging.WARNING if recovering else logging.INFO
    backend = record.get("backend") if isinstance(record, dict) else None
    if backend == "resolved":
        ifindex, ifname = record.get("ifindex"), record.get("ifname")
        if not isinstance(ifindex, int) or not isinstance(ifname, str):
            log.warning("DNS: dropping a malformed state record: %r", record)
            return
        if recovering and not _link_is(ifindex, ifname):
            log.warning("DNS: %s is gone, and systemd-resolved forgot its settings with it", ifname)
            return
        if _revert_link(ifindex, ifname):
            log.log(level, "DNS: reverted systemd-resolved's settings for %s", ifname)
        return
    if backend == "resolvconf":
        ifname = record.get("ifname")
        if not isinstance(ifname, str) or _IFNAME.fullmatch(ifname) is None:
            log.warning("DNS: dropping a malformed state record: %r", record)
            return
        if _resolvconf_delete(ifname):
            log.log(level, "DNS: removed the resolvconf entry of %s", ifname)
        return
    if backend == "file":
        _undo_file(record, resolv_conf, level)
        return
    log.warning("DNS: dropping a state record of no known backend: %r", record)


def _undo_file(record: dict[str, Any], resolv_conf: Path, level: int) -> None:
    if record.get("path") != str(resolv_conf):
        # Not the file we were asked to look after: written by a client configured otherwise.
        raise SystemSetupError(
            f"DNS: the state file records a change to {record.get('path')!r}, not {resolv_conf}"
        )
    original = _Original.from_record(record)
    if original is None:
        log.warning("DNS: dropping a malformed state record for %s", resolv_conf)
        return
    seen = _look(resolv_conf)
    if original.matches(seen):
        log.log(level, "DNS: %s is already the original", resolv_conf)
        return
    if not _is_ours(record, resolv_conf, seen):
        log.warning(
            "DNS: %s was changed by someone else while we were connected; leaving their version",
            resolv_conf,
        )
        return
    try:
        if original.kind == "absent":
            resolv_conf.unlink()
        elif original.kind == "symlink":
            _replace_with_symlink(resolv_conf, original.target)
        else:
            _write_in_place(resolv_conf, original.content, mode=original.mode)
    except OSError as exc:
        raise SystemSetupError(
            f"{resolv_conf}: cannot put the original back: {exc.strerror or exc}"
        ) from None
    log.log(level, "DNS: put the original %s back (%s)", resolv_conf, original.describe())


# -- systemd-resolved over D-Bus ----------------------------------------------------------


class _BusUnavailable(Exception):
    """No conversation with the system bus (missing, refusing, too slow, broken)."""


async def _detect() -> str:
    """The first backend that works here."""
    try:
        (reply,) = await _dbus_calls([message_bus.NameHasOwner(RESOLVE1)])
    except _BusUnavailable as exc:
        log.debug("DNS: no system bus (%s)", exc)
    else:
        if _error_of(reply) is None and reply.body and reply.body[0] is True:
            return "resolved"
    if shutil.which("resolvconf") is not None:
        return "resolvconf"
    return "file"


async def _dbus_calls(calls: list[Any]) -> list[Any]:
    """The replies (returns or errors) to ``calls``, made in turn on a new connection to the
    system bus ($DBUS_SYSTEM_BUS_ADDRESS honoured), all within DBUS_TIMEOUT_S."""
    try:
        with trio.fail_after(DBUS_TIMEOUT_S):
            connection = await dbus_trio.open_dbus_connection(bus="SYSTEM")
            try:
                return [await _call(connection, call) for call in calls]
            finally:
                await connection.aclose()
    except* _TRIO_BUS_ERRORS as group:
        raise _BusUnavailable(_first_line(group)) from None


async def _call(connection: Any, message: Any) -> Any:
    serial = next(connection.outgoing_serial)
    await connection.send(message, serial=serial)
    while True:
        reply = await connection.receive()
        if reply.header.fields.get(HeaderFields.reply_serial) == serial:
            return reply


def _revert_link(ifindex: int, ifname: str) -> bool:
    """RevertLink, blocking and bounded; a failure is logged, not raised (False): the link,
    and with it resolved's settings, go with the TUN device right after anyway."""
    call = new_method_call(_RESOLVE1_MANAGER, "RevertLink", "i", (ifindex,))
    deadline = time.monotonic() + DBUS_TIMEOUT_S
    try:
        sock = dbus_blocking.prep_socket(get_bus("SYSTEM"), timeout=DBUS_TIMEOUT_S)
        try:
            with _DeadlineConnection(sock, deadline) as connection:
                reply = connection.send_and_get_reply(call)
        finally:
            sock.close()
    except _BUS_ERRORS as exc:
        log.warning("DNS: cannot revert systemd-resolved's settings for %s: %s", ifname, exc)
        return False
    error = _error_of(reply)
    if error is not None:
        log.info("DNS: systemd-resolved did not revert %s: %s", ifname, error[1])
        return False
    return True


class _DeadlineConnection(dbus_blocking.DBusConnection):  # type: ignore[misc]
    """jeepney's blocking connection with one deadline for every wait, its Hello included."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.deadline = deadline
        super().__init__(sock)

    def send_and_get_reply(self, message: Any, *, timeout: float | None = None) -> Any:
        remaining = max(0.0, self.deadline - time.monotonic())
        return super().send_and_get_reply(message, timeout=remaining)


def _error_of(reply: Any) -> tuple[str, str] | None:
    """(error name, message) of an error reply; None for a method return."""
    if reply.header.message_type is not MessageType.error:
        return None
    name = str(reply.header.fields.get(HeaderFields.error_name, "unknown error"))
    body = reply.body
    text = body[0] if body and isinstance(body[0], str) else name
    return name, text


def _family_and_bytes(address: IPv4Address | IPv6Address) -> tuple[int, bytes]:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return int(family), address.packed


def _link_is(ifindex: int, ifname: str) -> bool:
    try:
        return socket.if_indextoname(ifindex) == ifname
    except OSError:
        return False


def _first_line(group: BaseExceptionGroup[Any]) -> str:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return f"no answer in {DBUS_TIMEOUT_S:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- resolvconf ---------------------------------------------------------------------------


def _resolvconf_delete(ifname: str) -> bool:
    """``resolvconf -d IFNAME -f``; False (with a warning) if resolvconf is gone."""
    command = shutil.which("resolvconf")
    if command is None:
        log.warning("DNS: resolvconf is gone; cannot remove the entry of %s", ifname)
        return False
    try:
        result = subprocess.run(
            [command, "-d", ifname, "-f"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RESOLVCONF_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemSetupError(
            f"resolvconf -d {ifname}: no answer in {RESOLVCONF_TIMEOUT_S:g} s"
        ) from None
    except OSError as exc:
        raise SystemSetupError(f"resolvconf -d {ifname}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        raise SystemSetupError(
            f"resolvconf -d {ifname} failed (exit {result.returncode}){_last_line(result.stderr)}"
        )
    return True


def _last_line(output: bytes) -> str:
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


# -- the file -----------------------------------------------------------------------------


@attrs.frozen
class _Seen:
    """What is at the path now."""

    kind: str  # "absent" | "symlink" | "file"
    content: bytes = b""  # a file's bytes; for a symlink what it points at (b"" if nothing)
    target: str = ""  # a symlink's target
    mode: int = 0  # a file's permission bits


@attrs.frozen
class _Original:
    """What was at the path before we wrote it, as the state file records it."""

    kind: str  # "absent" | "symlink" | "file"
    content: bytes = b""
    target: str = ""
    mode: int = 0o644

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> _Original | None:
        if record.get("absent") is True:
            return cls("absent")
        target = record.get("symlink")
        if isinstance(target, str):
            return cls("symlink", target=target)
        text, mode = record.get("original"), record.get("mode")
        if not isinstance(text, str) or not isinstance(mode, int):
            return None
        try:
            content = base64.b64decode(text, validate=True)
        except binascii.Error:
            return None
        return cls("file", content=content, mode=stat.S_IMODE(mode))

    def matches(self, seen: _Seen) -> bool:
        if self.kind != seen.kind:
            return False
        if self.kind == "symlink":
            return self.target == seen.target
        return self.content == seen.content

    def describe(self) -> str:
        if self.kind == "symlink":
            return f"the symlink to {self.target}"
        if self.kind == "absent":
            return "there was none: removed ours"
        return f"{len(self.content)} bytes, mode {self.mode:04o}"


def _original_record(path: Path, seen: _Seen) -> dict[str, Any]:
    if seen.kind == "absent":
        return {"backend": "file", "path": str(path), "absent": True}
    if seen.kind == "symlink":
        return {"backend": "file", "path": str(path), "symlink": seen.target}
    return {
        "backend": "file",
        "path": str(path),
        "original": base64.b64encode(seen.content).decode("ascii"),
        "mode": seen.mode,
    }


def _is_ours(record: Any, path: Path, seen: _Seen) -> bool:
    """Whether ``seen`` is a file this record says we wrote."""
    if not isinstance(record, dict) or record.get("backend") != "file":
        return False
    if record.get("path") != str(path) or seen.kind != "file":
        return False
    written = record.get("written")
    return isinstance(written, list) and _digest(seen.content) in written


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _look(path: Path) -> _Seen:
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(path)
            try:
                content = _read(path, follow=True)
            except OSError:
                content = b""  # dangling, or pointing at something unreadable
            return _Seen("symlink", content=content, target=target)
        if not stat.S_ISREG(info.st_mode):
            raise SystemSetupError(f"{path}: neither a file nor a symlink")
        return _Seen("file", content=_read(path, follow=False), mode=stat.S_IMODE(info.st_mode))
    except FileNotFoundError:
        return _Seen("absent")
    except OSError as exc:
        raise SystemSetupError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read(path: Path, *, follow: bool) -> bytes:
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if os.fstat(fd).st_size > MAX_RESOLV_CONF:
            raise SystemSetupError(f"{path}: over {MAX_RESOLV_CONF} bytes; not a resolv.conf")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _write_in_place(path: Path, content: bytes, *, mode: int | None = None) -> None:
    """Rewrite the file at ``path`` without replacing it: a bind mount cannot be renamed
    over, and its mode, owner and labels stay as they are."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        _write_all(fd, content)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.tunnel-tmp")
    try:
        temporary.unlink()  # a killed client's
    except FileNotFoundError:
        pass
    return temporary


def _replace(path: Path, content: bytes) -> None:
    """A new regular file (mode 0644) at ``path``, in place of a symlink or nothing."""
    temporary = _temporary(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: every program reads it
            _write_all(fd, content)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _replace_with_symlink(path: Path, target: str) -> None:
    temporary = _temporary(path)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
