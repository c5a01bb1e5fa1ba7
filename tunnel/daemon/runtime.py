"""Process plumbing shared by server and client: readiness, signals, the control socket."""

from __future__ import annotations

import contextlib
import grp
import inspect
import json
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from tunnel.config import DEFAULT_CLIENT_SOCKET, DEFAULT_SERVER_SOCKET
from tunnel.daemon.sdnotify import Notifier
from tunnel.errors import SystemSetupError, TunnelError

log = logging.getLogger("tunnel")

CONTROL_REQUEST_MAX = 1024


def _lone_tunnel_error(group: BaseExceptionGroup[BaseException]) -> TunnelError | None:
    if len(group.exceptions) != 1:
        return None
    inner = group.exceptions[0]
    if isinstance(inner, BaseExceptionGroup):
        return _lone_tunnel_error(inner)
    return inner if isinstance(inner, TunnelError) else None


@contextlib.contextmanager
def lone_errors_unwrapped() -> Iterator[None]:
    """Let a single TunnelError out of the nurseries inside as itself, so callers can catch
    ``SessionLost`` or ``PeerRejected`` by type. Anything else stays grouped."""
    try:
        yield
    except BaseExceptionGroup as group:
        lone = _lone_tunnel_error(group)
        if lone is None:
            raise
        raise lone from None


def notify_ready(ready_fd: int | None) -> None:
    """Tell the supervisor we are really ready: one newline on ``ready_fd`` (s6's
    notification-fd). systemd hears it from :class:`tunnel.daemon.sdnotify.Notifier`."""
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"\n")
            os.close(ready_fd)
        except OSError as exc:
            log.warning("--ready-fd %d: cannot write readiness: %s", ready_fd, exc.strerror)


async def report_status(notifier: Notifier, summary: Callable[[], str], every: float = 2.0) -> None:
    """Keep systemd's STATUS line current (the notifier sends only changes)."""
    while True:
        notifier.status(summary())
        await trio.sleep(every)


def check_ready_fd(ready_fd: int | None) -> None:
    """Fail early, naming the flag, if --ready-fd is not an open descriptor."""
    if ready_fd is None:
        return
    try:
        os.fstat(ready_fd)
    except OSError as exc:
        raise TunnelError(f"--ready-fd {ready_fd}: not an open file descriptor") from exc


async def watch_signals(
    cancel_scope: trio.CancelScope, on_hup: Callable[[], object] | None = None
) -> None:
    """SIGINT/SIGTERM end the daemon cleanly (cancel its scope); SIGHUP calls ``on_hup``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if on_hup is not None:
                    on_hup()
                continue
            log.info("%s received: shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


def _netns_inode(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def control_socket_path(configured: Path) -> Path:
    """Where the control socket really lives.

    A socket path is global, but network namespaces are not: two daemons with the default
    path in two namespaces must not collide. Outside the host's own namespace the default
    path gets the namespace's inode as a suffix (``client-4026532281.sock``); a path set in
    the config is used as it is.
    """
    if configured not in (DEFAULT_SERVER_SOCKET, DEFAULT_CLIENT_SOCKET):
        return configured
    mine, hosts = _netns_inode("self"), _netns_inode("1")
    if mine is None or mine == hosts:
        return configured
    return configured.with_name(f"{configured.stem}-{mine}{configured.suffix}")


def _prepare_socket_path(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemSetupError(
            f"control_socket: cannot create {path.parent}: {exc.strerror}"
        ) from exc
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemSetupError(f"control_socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # stale, left by a daemon that was killed
    else:
        raise SystemSetupError(f"control_socket: {path}: another daemon is already running there")
    finally:
        probe.close()


Handler = Callable[[dict[str, Any]], Any]
"""A control request's handler: the request object in, a JSON-able dict out (or an awaitable
of one); a :class:`TunnelError` becomes ``{"error": message}``."""

# Requests that change the daemon: only root or the daemon's own user may send them, whoever
# else the socket's mode and group let read the status.
PRIVILEGED_REQUESTS = frozenset({"kick", "reload"})


class ControlServer:
    """Answers JSON requests on a Unix socket, one a connection: ``{"request": "status"}``
    (also the bare word ``status``, as earlier versions sent it) and whatever else the daemon
    registers (``metrics``, ``kick``, ``reload``). The socket's mode and group are the
    config's; the requests in :data:`PRIVILEGED_REQUESTS` need the peer to be root or the
    daemon's own user (SO_PEERCRED), so a group may read status without being able to kick."""

    def __init__(
        self,
        path: Path,
        status: Callable[[], dict[str, Any]],
        *,
        mode: int = 0o660,
        group: int | None = None,
    ) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {"status": lambda _request: status()}
        self.mode = mode
        self.group = group
        _prepare_socket_path(path)
        self._listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._bound = False

    def handle(self, name: str, handler: Handler) -> None:
        """Answer requests named ``name`` with ``handler``."""
        self.handlers[name] = handler

    async def bind(self) -> None:
        try:
            await self._listener.bind(str(self.path))
        except OSError as exc:
            self._listener.close()
            raise SystemSetupError(
                f"control_socket: cannot bind {self.path}: {exc.strerror}"
            ) from exc
        self._bound = True
        try:
            if self.group is not None:
                os.chown(self.path, -1, self.group)
            os.chmod(self.path, self.mode)
        except OSError as exc:
            self.close()
            raise SystemSetupError(
                f"control_socket: cannot set the owner or mode of {self.path}: {exc.strerror}"
            ) from exc
        self._listener.listen(16)

    def close(self) -> None:
        self._listener.close()
        if self._bound:
            self.path.unlink(missing_ok=True)
            self._bound = False

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self._listener.accept()
                nursery.start_soon(self._answer, conn)

    async def _answer(self, conn: trio.socket.SocketType) -> None:
        with conn, trio.move_on_after(5):
            try:
                request = parse_request(await _read_request(conn))
                reply = await self._reply(request, _peer_uid(conn))
                await send_all(conn, json.dumps(reply).encode() + b"\n")
            except OSError as exc:
                log.debug("control connection: %s", exc)
            except Exception:
                # A bug in producing an answer must not take the daemon down with it.
                log.exception("control request failed")

    async def _reply(self, request: dict[str, Any] | str, uid: int | None) -> dict[str, Any]:
        if isinstance(request, str):
            return {"error": request}
        name = request["request"]
        handler = self.handlers.get(name)
        if handler is None:
            return {"error": f"unknown request {name!r}"}
        if name in PRIVILEGED_REQUESTS and uid not in (0, os.geteuid()):
            return {"error": f"{name!r} needs root or the daemon's own user"}
        try:
            answer = handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
        except TunnelError as exc:
            return {"error": str(exc)}
        return dict(answer)


async def _read_request(conn: trio.socket.SocketType) -> bytes:
    """One line (or everything until the peer shuts its side), at most CONTROL_REQUEST_MAX."""
    data = b""
    while b"\n" not in data and len(data) <= CONTROL_REQUEST_MAX:
        chunk = await conn.recv(CONTROL_REQUEST_MAX + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


def parse_request(data: bytes) -> dict[str, Any] | str:
    """A control request: a JSON object with a string ``request``, or the bare word
    ``status``; anything else is an error message (a str) to send back."""
    if len(data) > CONTROL_REQUEST_MAX:
        return f"request longer than {CONTROL_REQUEST_MAX} bytes"
    line = data.split(b"\n", 1)[0].strip()
    if line == b"status":
        return {"request": "status"}
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return "not a JSON request"
    if not isinstance(request, dict) or not isinstance(request.get("request"), str):
        return 'a request is a JSON object with a string "request"'
    return request


def group_id(group: str | None) -> int | None:
    """The number of the ``control_socket_group`` (a name or a number); None for none."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SystemSetupError(f"control_socket_group: no group named {group!r}") from None


def _peer_uid(conn: trio.socket.SocketType) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
