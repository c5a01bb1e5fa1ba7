"""Process plumbing: readiness notification, control socket paths, SIGHUP reload."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from tunnel.config import DEFAULT_CLIENT_SOCKET, server_config_from_dict
from tunnel.core.identity import Identity
from tunnel.core.tokens import new_token
from tunnel.daemon.runtime import check_ready_fd, control_socket_path, notify_ready
from tunnel.daemon.server import Server
from tunnel.errors import TunnelError
from tunnel.testing.fakes import FakeNetwork, FakeTun


def test_ready_fd_gets_one_newline_and_is_closed():
    read, write = os.pipe()
    notify_ready(write)
    assert os.read(read, 10) == b"\n"
    assert os.read(read, 10) == b""  # closed: the supervisor sees EOF
    os.close(read)


def test_notify_socket_gets_ready(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notify_ready(None)
    assert listener.recv(100) == b"READY=1"
    listener.close()


def test_a_closed_ready_fd_is_a_clear_error():
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    with pytest.raises(TunnelError, match=f"--ready-fd {write}: not an open file descriptor"):
        check_ready_fd(write)


def test_configured_control_socket_is_used_as_is():
    assert control_socket_path(Path("/tmp/x.sock")) == Path("/tmp/x.sock")


def test_default_control_socket_carries_the_namespace_unless_it_is_the_hosts():
    mine = os.stat("/proc/self/ns/net").st_ino
    path = control_socket_path(DEFAULT_CLIENT_SOCKET)
    assert path in (DEFAULT_CLIENT_SOCKET, Path(f"/run/tunnel/client-{mine}.sock"))
    assert control_socket_path(DEFAULT_CLIENT_SOCKET) == path  # `tunnel status` finds it again


def _server(tmp_path: Path, tokens_file: Path) -> Server:
    config_path = tmp_path / "server.toml"
    config_path.write_text(
        f'key_file = "k"\nnetwork = "10.9.0.0/24"\nauth_tokens_file = "{tokens_file}"\n'
    )
    config = server_config_from_dict(
        {"key_file": "k", "network": "10.9.0.0/24", "auth_tokens": [new_token()]}
    )
    endpoint = FakeNetwork().bind("192.0.2.1", 4433)
    return Server(config, Identity.generate(), endpoint, FakeTun("t"), config_path)


async def test_sighup_reload_swaps_tokens(tmp_path, caplog):
    fresh = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{fresh}  # laptop\n")
    server = _server(tmp_path, tokens)
    assert fresh not in server.authority.tokens
    with caplog.at_level(logging.INFO, logger="tunnel"):
        server.reload()
    assert fresh in server.authority.tokens
    assert "SIGHUP: reloaded 1 token(s)" in caplog.text
    assert fresh not in caplog.text  # tokens never reach the log


async def test_sighup_with_a_broken_config_keeps_the_old_one(tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{new_token()}\n")
    server = _server(tmp_path, tokens)
    before = server.authority.tokens
    tokens.write_text("not-a-token\n")
    with caplog.at_level(logging.INFO, logger="tunnel"):
        server.reload()
    assert server.authority.tokens is before
    assert "keeping the running configuration" in caplog.text
