"""Tests of the ``tunnel`` command line, run in-process through ``main([...])``."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import tunnel
from tunnel import cli
from tunnel.cli import build_parser, log_formatter, main, render_status
from tunnel.config import ClientConfig, RunOptions, ServerConfig
from tunnel.core.identity import Identity, decode_public_id
from tunnel.core.tokens import new_token, validate_token
from tunnel.errors import PeerRejected, SystemSetupError
from tunnel.keyfile import read_key_file, write_key_file

REPO = Path(tunnel.__file__).resolve().parent.parent
SERVER_ID = Identity.from_seed(bytes(range(32))).public_id


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, fragment: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tunnel: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


# --- keygen and id -------------------------------------------------------------------------


def test_keygen_writes_0600_and_prints_the_id_last(capsys, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    code, out, err = run(capsys, "keygen", "--out", str(key))
    assert code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public_id = out.splitlines()[-1]
    assert len(decode_public_id(public_id)) == 32
    assert read_key_file(key).public_id == public_id
    assert err == ""


def test_keygen_refuses_to_overwrite_without_force(capsys, tmp_path: Path) -> None:
    key = tmp_path / "k"
    assert run(capsys, "keygen", "--out", str(key))[0] == 0
    before = key.read_bytes()
    code, out, err = run(capsys, "keygen", "--out", str(key))
    assert code == 100
    assert out == ""
    assert_one_error_line(err, f"{key}: already exists (use --force")
    assert key.read_bytes() == before

    code, out, err = run(capsys, "keygen", "--out", str(key), "--force")
    assert code == 0
    assert key.read_bytes() != before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert read_key_file(key).public_id == out.splitlines()[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temporary file left


def test_keygen_into_missing_directory(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "keygen", "--out", str(tmp_path / "no" / "k"))
    assert code == 100
    assert_one_error_line(err, "cannot write key file: No such file or directory")


def test_id_prints_the_same_id(capsys, tmp_path: Path) -> None:
    key = tmp_path / "k"
    _, out, _ = run(capsys, "keygen", "--out", str(key))
    code, id_out, err = run(capsys, "id", "--key", str(key))
    assert (code, err) == (0, "")
    assert id_out == out.splitlines()[-1] + "\n"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"garbage\n", ":1: unknown line"),
        (b"# only a comment\n", "no ed25519-seed line"),
        (b"ed25519-seed abc\n", ":1: ed25519-seed must be 52 characters"),
        (b"\xff\xfe", "key file is not UTF-8 text"),
        (b"x" * 70000, "too large for a key file"),
    ],
)
def test_corrupt_key_file_is_one_line_exit_100(
    capsys, tmp_path: Path, content: bytes, fragment: str
) -> None:
    key = tmp_path / "k"
    key.write_bytes(content)
    key.chmod(0o600)
    code, out, err = run(capsys, "id", "--key", str(key))
    assert (code, out) == (100, "")
    assert_one_error_line(err, fragment)
    assert str(key) in err


def test_missing_key_file(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "id", "--key", str(tmp_path / "nope"))
    assert code == 100
    assert_one_error_line(err, "nope: key file does not exist")


def test_key_file_that_is_a_directory(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "id", "--key", str(tmp_path))
    assert code == 100
    assert_one_error_line(err, f"{tmp_path}: ")


def test_world_readable_key_warns(capsys, tmp_path: Path) -> None:
    key = tmp_path / "k"
    write_key_file(key, Identity.generate(), force=False)
    key.chmod(0o644)
    code, out, err = run(capsys, "id", "--key", str(key))
    assert code == 0
    assert out.strip() == read_key_file(key).public_id
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(f"WARNING tunnel: {key}: key file is readable by other users; "
                             "chmod 600 it")  # fmt: skip


def test_private_key_does_not_warn(capsys, tmp_path: Path) -> None:
    key = tmp_path / "k"
    write_key_file(key, Identity.generate(), force=False)
    key.chmod(0o600)
    assert run(capsys, "id", "--key", str(key))[2] == ""


def test_write_key_file_with_force_replaces_atomically(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("old")
    key.chmod(0o644)
    identity = Identity.generate()
    write_key_file(key, identity, force=True)
    assert read_key_file(key) == identity
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# --- token ---------------------------------------------------------------------------------


def test_token_prints_one_valid_token(capsys) -> None:
    code, out, err = run(capsys, "token")
    assert (code, err) == (0, "")
    (token,) = out.splitlines()
    assert validate_token(token) == token


def test_token_count(capsys) -> None:
    code, out, _ = run(capsys, "token", "--count", "5")
    tokens = out.splitlines()
    assert code == 0
    assert len(set(tokens)) == 5
    assert all(validate_token(t) == t for t in tokens)


def test_python_m_tunnel_token() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "tunnel", "token", "--count", "2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    tokens = result.stdout.splitlines()
    assert len(tokens) == 2 and all(validate_token(t) == t for t in tokens)
    assert result.stderr == ""


# --- the command line itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["--bogus"],
        ["keygen"],
        ["keygen", "--out"],
        ["keygen", "--out", "k", "--frce"],
        ["id"],
        ["token", "--count", "0"],
        ["token", "--count", "-3"],
        ["token", "--count", "many"],
        ["server"],
        ["client", "--config"],
        ["server", "--config", "s.toml", "--log-level", "loud"],
        ["client", "--config", "c.toml", "--ready-fd", "-1"],
        ["client", "--config", "c.toml", "--ready-fd", "x"],
        ["status", "--socket"],
    ],
)
def test_bad_command_lines_exit_2(capsys, argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "usage: tunnel" in err
    assert "Traceback" not in err


def test_version(capsys) -> None:
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"tunnel {tunnel.__version__}\n")


def test_help_exits_0(capsys) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("keygen", "id", "token", "server", "client", "status"):
        assert command in out


def test_keyboard_interrupt_exits_130(capsys, monkeypatch) -> None:
    def interrupted() -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "new_token", interrupted)
    code, out, err = run(capsys, "token")
    assert (code, out, err) == (130, "", "")


# --- server and client ---------------------------------------------------------------------


def write_server_toml(directory: Path, extra: str = "") -> Path:
    path = directory / "server.toml"
    path.write_text(
        f'key_file = "server.key"\nnetwork = "10.8.0.0/24"\nauth_tokens = ["{new_token()}"]\n'
        + extra
    )
    return path


def write_client_toml(directory: Path) -> Path:
    path = directory / "client.toml"
    path.write_text(f'server = "127.0.0.1:4433"\nserver_id = "{SERVER_ID}"\n')
    return path


def fake_module(monkeypatch, name: str, **attributes: Any) -> None:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_server_runs_run_server_with_config_and_options(capsys, monkeypatch, tmp_path) -> None:
    seen: list[Any] = []

    async def run_server(config: ServerConfig, options: RunOptions) -> None:
        seen.append((config, options))

    fake_module(monkeypatch, "tunnel.daemon.server", run_server=run_server)
    path = write_server_toml(tmp_path)
    code, _, err = run(capsys, "server", "--config", str(path), "--log-level", "DEBUG")
    assert (code, err) == (0, "")
    ((config, options),) = seen
    assert isinstance(config, ServerConfig)
    assert config.key_file == tmp_path / "server.key"
    assert options == RunOptions(log_level="debug", ready_fd=None, config_path=path)


def test_client_runs_run_client(capsys, monkeypatch, tmp_path) -> None:
    seen: list[Any] = []

    async def run_client(config: ClientConfig, options: RunOptions) -> None:
        seen.append((config, options))

    fake_module(monkeypatch, "tunnel.daemon.client", run_client=run_client)
    path = write_client_toml(tmp_path)
    read_end, write_end = os.pipe()
    try:
        code, _, err = run(capsys, "client", "--config", str(path), "--ready-fd", str(write_end))
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (code, err) == (0, "")
    ((config, options),) = seen
    assert isinstance(config, ClientConfig)
    assert options.ready_fd == write_end and options.log_level == "info"


def test_daemon_logs_go_to_stderr_one_line_each(capsys, monkeypatch, tmp_path) -> None:
    import logging

    async def run_server(config: ServerConfig, options: RunOptions) -> None:
        logging.getLogger("tunnel.daemon.server").info("listening")
        logging.getLogger("tunnel.daemon.server").debug("not shown at info")

    fake_module(monkeypatch, "tunnel.daemon.server", run_server=run_server)
    code, _, err = run(capsys, "server", "--config", str(write_server_toml(tmp_path)))
    assert code == 0
    (line,) = err.splitlines()
    # 2024-05-01T12:00:00.123+00:00 INFO tunnel.daemon.server: listening
    stamp, level, rest = line.split(" ", 2)
    assert stamp[4] == "-" and stamp[10] == "T" and stamp[19] == "."
    assert (level, rest) == ("INFO", "tunnel.daemon.server: listening")


def test_server_bad_config_is_one_line_exit_100(capsys, tmp_path) -> None:
    path = write_server_toml(tmp_path, "netwrk = 1\n")
    code, out, err = run(capsys, "server", "--config", str(path))
    assert (code, out) == (100, "")
    assert_one_error_line(err, f"{path}: unknown key 'netwrk'")


def test_client_missing_config_exit_100(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "client", "--config", str(tmp_path / "client.toml"))
    assert code == 100
    assert_one_error_line(err, "cannot read config file: No such file or directory")


def test_ready_fd_must_be_open(capsys, tmp_path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    path = write_server_toml(tmp_path)
    code, _, err = run(capsys, "server", "--config", str(path), "--ready-fd", str(write_end))
    assert code == 100
    assert_one_error_line(err, f"--ready-fd {write_end}: not an open file descriptor")


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (PeerRejected("server rejected us: bad token"), 100),
        (SystemSetupError("cannot create TUN device: Operation not permitted"), 100),
    ],
)
def test_daemon_errors_in_exception_groups_are_one_line(
    capsys, monkeypatch, tmp_path, error: Exception, exit_code: int
) -> None:
    async def run_client(config: ClientConfig, options: RunOptions) -> None:
        raise ExceptionGroup("nursery", [ExceptionGroup("inner", [error])])

    fake_module(monkeypatch, "tunnel.daemon.client", run_client=run_client)
    code, _, err = run(capsys, "client", "--config", str(write_client_toml(tmp_path)))
    assert code == exit_code
    assert_one_error_line(err, str(error))


def test_bugs_still_raise(capsys, monkeypatch, tmp_path) -> None:
    async def run_client(config: ClientConfig, options: RunOptions) -> None:
        raise ExceptionGroup("nursery", [PeerRejected("x"), ZeroDivisionError()])

    fake_module(monkeypatch, "tunnel.daemon.client", run_client=run_client)
    with pytest.raises(ExceptionGroup):
        main(["client", "--config", str(write_client_toml(tmp_path))])


# --- status --------------------------------------------------------------------------------

STATUS = {
    "role": "server",
    "id": SERVER_ID,
    "listen": "[::]:4433",
    "uptime": 3725.0,
    "tun": "tunnel0",
    "sessions": [
        {
            "client_id": "c" * 52,
            "device_id": 7,
            "addresses": ["10.8.0.2", "fd00:8::2"],
            "remote": "192.0.2.1:50000",
            "bytes_in": 2048,
            "bytes_out": 10,
            "packets_in": 2,
            "packets_out": 1,
            "rtt_ms": 12.25,
            "datagram_payload": 1222,
            "path_mtu": 1252,
            "pmtu_state": "complete",
            "pmtu_probes": 12,
            "pmtu_black_holes": 1,
            "uptime": 42.0,
            "drops": {"queue_full": 3, "spoofed": 0},
        }
    ],
    "drops": {"no_route": 1},
}


def fake_query_status(monkeypatch, result: Any = None, error: BaseException | None = None):
    """A stand-in control client: records the socket each request went to (and the request,
    in ``asked.requests``) and answers ``result`` or raises ``error``."""
    asked: Any = _Asked()

    async def request(socket_path: Path, message: dict[str, Any]) -> Any:
        asked.append(socket_path)
        asked.requests.append(message)
        if error is not None:
            raise error
        return result

    fake_module(monkeypatch, "tunnel.daemon.control", request=request)
    return asked


class _Asked(list):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []


def test_kick_reload_and_metrics_send_their_requests(capsys, monkeypatch, tmp_path) -> None:
    sock = tmp_path / "s.sock"
    sock.touch()
    asked = fake_query_status(monkeypatch, {"kicked": 2})
    assert main(["kick", "alice", "--reason", "rotating keys", "--socket", str(sock)]) == 0
    assert asked.requests[-1] == {"request": "kick", "client": "alice", "reason": "rotating keys"}
    assert "closed 2 session(s) of alice" in capsys.readouterr().out
    asked = fake_query_status(
        monkeypatch, {"changed": ["auth_tokens"], "revoked": 1, "need_restart": ["mtu"]}
    )
    assert main(["reload", "--socket", str(sock)]) == 0
    assert asked.requests[-1] == {"request": "reload"}
    out = capsys.readouterr().out
    assert "changed: auth_tokens" in out and "revoked: 1" in out and "restart" in out
    fake_query_status(monkeypatch, {"text": "tunnel_sessions 3\n"})
    assert main(["metrics", "--socket", str(sock)]) == 0
    assert capsys.readouterr().out == "tunnel_sessions 3\n"


def test_status_text(capsys, monkeypatch, tmp_path) -> None:
    sock = tmp_path / "s.sock"
    sock.touch()
    asked = fake_query_status(monkeypatch, STATUS)
    code, out, err = run(capsys, "status", "--socket", str(sock))
    assert (code, err) == (0, "")
    assert asked == [sock]
    assert "server" in out and SERVER_ID in out and "[::]:4433" in out
    assert "1h 2m 5s" in out
    assert "10.8.0.2, fd00:8::2" in out
    assert "2.0 KiB, 2 packets" in out
    assert "12.2 ms" in out or "12.3 ms" in out
    assert "MTU 1252 B (complete), datagrams up to 1222 B, 12 probes, 1 black hole" in out
    assert "pmtu_state" not in out  # shown once, in the path line
    assert "queue_full=3" in out and "spoofed" not in out
    assert "no_route=1" in out


def test_status_json(capsys, monkeypatch, tmp_path) -> None:
    sock = tmp_path / "s.sock"
    sock.touch()
    fake_query_status(monkeypatch, STATUS)
    code, out, _ = run(capsys, "status", "--json", "--socket", str(sock))
    assert code == 0
    assert json.loads(out) == STATUS


def test_status_socket_from_config(capsys, monkeypatch, tmp_path) -> None:
    sock = tmp_path / "run" / "c.sock"
    sock.parent.mkdir()
    sock.touch()
    (tmp_path / "client.toml").write_text('server = "h:1"\ncontrol_socket = "run/c.sock"\n')
    asked = fake_query_status(monkeypatch, {"role": "client"})
    code, _, _ = run(capsys, "status", "--config", str(tmp_path / "client.toml"))
    assert code == 0
    assert asked == [sock]


def test_status_default_sockets(capsys, monkeypatch, tmp_path) -> None:
    server_sock, client_sock = tmp_path / "server.sock", tmp_path / "client.sock"
    monkeypatch.setattr(cli, "DEFAULT_SERVER_SOCKET", server_sock)
    monkeypatch.setattr(cli, "DEFAULT_CLIENT_SOCKET", client_sock)
    asked = fake_query_status(monkeypatch, {})
    code, _, err = run(capsys, "status")
    assert code == 111
    assert_one_error_line(err, f"no daemon is listening on {client_sock}")
    client_sock.touch()
    assert run(capsys, "status")[0] == 0
    server_sock.touch()
    assert run(capsys, "status")[0] == 0
    assert asked == [client_sock, server_sock]


def test_status_no_socket_file(capsys, tmp_path) -> None:
    sock = tmp_path / "nope.sock"
    code, out, err = run(capsys, "status", "--socket", str(sock))
    assert (code, out) == (111, "")
    assert err == f"tunnel: no daemon is listening on {sock}\n"


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connection refused"), FileNotFoundError(2, "No such file")],
)
def test_status_connection_refused(capsys, monkeypatch, tmp_path, error: OSError) -> None:
    sock = tmp_path / "s.sock"
    sock.touch()
    fake_query_status(monkeypatch, error=error)
    code, _, err = run(capsys, "status", "--socket", str(sock))
    assert code == 111
    assert err == f"tunnel: no daemon is listening on {sock}\n"


def test_status_other_os_error(capsys, monkeypatch, tmp_path) -> None:
    sock = tmp_path / "s.sock"
    sock.touch()
    fake_query_status(monkeypatch, error=PermissionError(13, "Permission denied"))
    code, _, err = run(capsys, "status", "--socket", str(sock))
    assert code == 111
    assert_one_error_line(err, "cannot query the daemon: Permission denied")


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"role": "client", "server": "vpn:4433"},
        {"sessions": [{}, None, 5, {"drops": [], "uptime": "x", "addresses": "a"}]},
        {"sessions": "many", "drops": None, "uptime": None, "extra": {"nested": 1}},
        {"uptime": 0, "sessions": [{"uptime": 90061.5, "bytes_in": 10**13}]},
        [],
        None,
    ],
)
def test_render_status_tolerates_missing_and_odd_keys(status: Any) -> None:
    text = render_status(status)
    assert text.endswith("\n")


def test_render_status_shows_unknown_scalars() -> None:
    text = render_status({"role": "server", "pid": 42, "sessions": []})
    assert "pid" in text and "42" in text
    assert "1d 1h 1m" in render_status({"uptime": 90061.5})


def test_status_against_a_socket_nobody_listens_on(capsys, tmp_path) -> None:
    # The real query_status: a bound but not listening Unix socket refuses connections.
    import socket

    pytest.importorskip("tunnel.daemon.control")
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        code, out, err = run(capsys, "status", "--socket", str(path))
    assert (code, out) == (111, "")
    assert err == f"tunnel: no daemon is listening on {path}\n"


def _record(message: str, client: str | None = None) -> logging.LogRecord:
    record = logging.LogRecord("tunnel.server", logging.WARNING, __file__, 1, message, (), None)
    if client is not None:
        record.client = client
    return record


def test_json_log_lines_carry_level_message_and_the_client(monkeypatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    args = build_parser().parse_args(["server", "--config", "s.toml", "--log-format", "json"])
    formatter = log_formatter(args)
    line = json.loads(formatter.format(_record("session up", client="alice")))
    assert line["level"] == "warning" and line["message"] == "session up"
    assert line["client"] == "alice" and "time" in line
    assert "client" not in json.loads(formatter.format(_record("listening")))


def test_timestamps_are_left_to_the_journal_or_to_the_flag(monkeypatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    args = build_parser().parse_args(["client", "--config", "c.toml"])
    assert log_formatter(args).format(_record("hi", client="bob")) == (
        "WARNING tunnel.server: [bob] hi"
    )
    json_args = build_parser().parse_args(["client", "--config", "c.toml", "--log-format", "json"])
    assert "time" not in json.loads(log_formatter(json_args).format(_record("hi")))
    monkeypatch.delenv("JOURNAL_STREAM")
    flagged = build_parser().parse_args(["client", "--config", "c.toml", "--no-timestamps"])
    assert log_formatter(flagged).format(_record("hi")) == "WARNING tunnel.server: hi"
    timed = log_formatter(build_parser().parse_args(["client", "--config", "c.toml"]))
    assert timed.format(_record("hi")).endswith(" WARNING tunnel.server: hi")
    assert timed.format(_record("hi"))[:4].isdigit()  # the year first


def test_the_man_page_and_completions_are_current() -> None:
    """share/ is generated from build_parser(): a new flag without `scripts/gen-docs` fails."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "gen-docs"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
