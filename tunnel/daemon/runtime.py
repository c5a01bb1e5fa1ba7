"""Process plumbing shared by server and client: readiness, signals, the control socket."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from tunnel.config import DEFAULT_CLIENT_SOCKET, DEFAULT_SERVER_SOCKET
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
    notification-fd), and ``READY=1`` to ``$NOTIFY_SOCKET`` (systemd) if set."""
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"\n")
            os.close(ready_fd)
        except OSError as exc:
            log.warning("--ready-fd %d: cannot write readiness: %s", ready_fd, exc.strerror)
    target = os.environ.get("NOTIFY_SOCKET")
    if target:
        address = "\0" + target[1:] if target.startswith("@") else target
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(b"READY=1", address)
        except OSError as exc:
            log.warning("NOTIFY_SOCKET %s: %s", target, exc.strerror)


def check_ready_fd(ready_fd: int | None) -> None:
    """Fail early, naming the flag, if --ready-fd is not an open descriptor."""
    if ready_fd is None:
        return
    try:
        os.fstat(ready_fd)
    except OSError as exc:
        raise TunnelError(f"--ready-fd {ready_fd}: not an open file descriptor") from exc


async def watch_signals(
    cancel_scope: trio.CancelScope, on_hup: Callable[[], None] | None = None
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


class ControlServer:
    """Answers ``status`` on a Unix socket with the daemon's JSON status."""

    def __init__(self, path: Path, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._status = status
        _prepare_socket_path(path)
        self._listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._bound = False

    async def bind(self) -> None:
        try:
            await self._listener.bind(str(self.path))
        except OSError as exc:
            self._listener.close()
            raise SystemSetupError(
                f"control_socket: cannot bind {self.path}: {exc.strerror}"
            ) from exc
        self._bound = True
        os.chmod(self.path, 0o660)
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
                request = await conn.recv(CONTROL_REQUEST_MAX)
                if request.strip() == b"status":
                    reply = json.dumps(self._status()).encode() + b"\n"
                else:
                    reply = json.dumps({"error": "unknown request"}).encode() + b"\n"
                await send_all(conn, reply)
            except OSError as exc:
                log.debug("control connection: %s", exc)
            except Exception:
                # A bug in producing the status must not take the daemon down with it.
                log.exception("control request failed")


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
