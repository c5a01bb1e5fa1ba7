"""The client side of the control socket: what ``tunnel status``, ``metrics``, ``kick`` and
``reload`` ask a running daemon."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import trio

from tunnel.daemon.runtime import send_all
from tunnel.errors import TunnelError


async def query_status(path: Path) -> dict[str, Any]:
    """Ask the daemon listening on ``path`` for its status."""
    return await request(path, {"request": "status"})


async def request(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the daemon listening on ``path``; its answer. An answer with an
    ``error`` raises :class:`TunnelError` with it."""
    answer = await _exchange(path, json.dumps(message).encode() + b"\n")
    if message.get("request") != "status" and isinstance(answer.get("error"), str):
        raise TunnelError(f"{path}: {answer['error']}")
    return answer


async def _exchange(path: Path, data: bytes) -> dict[str, Any]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise TunnelError(f"no daemon is listening on {path}") from exc
            raise TunnelError(f"{path}: {exc.strerror}") from exc
        with trio.fail_after(5):
            await send_all(sock, data)
            chunks = []
            while chunk := await sock.recv(65536):
                chunks.append(chunk)
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise TunnelError(f"{path}: the daemon sent an unreadable answer") from exc
    if not isinstance(answer, dict):
        raise TunnelError(f"{path}: the daemon sent an unreadable answer")
    return answer
