"""Process plumbing: readiness notification, control socket paths, SIGHUP reload."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.config import DEFAULT_CLIENT_SOCKET, server_config_from_dict
from tunnel.core.identity import Identity, decode_public_id
from tunnel.core.tokens import new_token
from tunnel.daemon.runtime import (
    CONTROL_REQUEST_MAX,
    ControlServer,
    check_ready_fd,
    control_socket_path,
    notify_ready,
    parse_request,
)
from tunnel.daemon.server import Server
from tunnel.errors import TunnelError
from tunnel.testing.fakes import FakeNetwork, FakeTun


def test_ready_fd_gets_one_newline_and_is_closed():
    read, write = os.pipe()
    notify_ready(write)
    assert os.read(read, 10) == b"\n"
    assert os.read(read, 10) == b""  # closed: the supervisor sees EOF
    os.close(read)


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


async def test_reload_reports_what_changed_and_what_needs_a_restart(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{new_token()}\n")
    server = _server(tmp_path, tokens)
    alice = Identity.generate().public_id
    (tmp_path / "server.toml").write_text(
        f'key_file = "k"\nnetwork = "10.9.0.0/24"\nauth_tokens_file = "{tokens}"\nmtu = 1300\n'
        f'dns = ["10.9.0.1"]\n[clients]\nalice = "{alice}"\n'
    )
    answer = server.reload(via="tunnel reload")
    assert answer["changed"] == ["auth_tokens", "clients", "dns"]
    assert answer["need_restart"] == ["mtu"]
    assert answer["revoked"] == 0
    assert server.authority.dns == (ipaddress.ip_address("10.9.0.1"),)
    assert server.names == {decode_public_id(alice): "alice"}
    assert server.reload()["changed"] == []  # the second time, nothing is new


async def test_kick_names_a_client_by_name_or_id_and_refuses_strangers(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{new_token()}\n")
    server = _server(tmp_path, tokens)
    with pytest.raises(TunnelError, match="no session of client"):
        server.kick(Identity.generate().public_id)
    with pytest.raises(TunnelError, match="neither a client name nor a public ID"):
        server.kick("bob")


@given(st.binary(max_size=CONTROL_REQUEST_MAX + 10))
def test_a_control_request_is_an_object_or_an_error_message(data):
    parsed = parse_request(data)
    assert isinstance(parsed, str) or isinstance(parsed["request"], str)


@pytest.mark.parametrize(
    "data, parsed",
    [
        (b"status\n", {"request": "status"}),
        (b'{"request": "kick", "client": "alice"}\n', {"request": "kick", "client": "alice"}),
        (b'{"request": 5}', 'a request is a JSON object with a string "request"'),
        (b"[1]", 'a request is a JSON object with a string "request"'),
        (b"{", "not a JSON request"),
        (b"x" * (CONTROL_REQUEST_MAX + 1), f"request longer than {CONTROL_REQUEST_MAX} bytes"),
    ],
)
def test_control_requests_parse(data, parsed):
    assert parse_request(data) == parsed


async def test_changing_requests_need_root_or_the_daemons_own_user(tmp_path):
    control = ControlServer(tmp_path / "c.sock", lambda: {"role": "server"})
    control.handle("kick", lambda request: {"kicked": 1})
    stranger = os.geteuid() + 12345
    try:
        assert await control._reply({"request": "status"}, stranger) == {"role": "server"}
        assert "needs root" in (await control._reply({"request": "kick"}, stranger))["error"]
        assert await control._reply({"request": "kick"}, os.geteuid()) == {"kicked": 1}
        assert "unknown request" in (await control._reply({"request": "dance"}, 0))["error"]
    finally:
        control.close()


async def test_control_socket_mode_and_group_are_applied(tmp_path):
    control = ControlServer(tmp_path / "c.sock", lambda: {}, mode=0o640, group=os.getegid())
    await control.bind()
    try:
        info = (tmp_path / "c.sock").stat()
        assert info.st_mode & 0o777 == 0o640
        assert info.st_gid == os.getegid()
    finally:
        control.close()
    assert not (tmp_path / "c.sock").exists()
