"""The ``tunnel`` command: argv -> validated config -> ``trio.run(...)``; errors -> exit codes.

Subcommands: ``keygen``, ``id``, ``token``, ``server``, ``client``, ``status``. Every
:class:`tunnel.errors.TunnelError` ends the process with one line ``tunnel: <message>`` on
stderr and the error's exit code (100 permanent, 111 temporary); a bad command line exits 2
(argparse's own message). The daemon modules and trio are imported lazily, inside the
commands that need them, so that ``tunnel keygen`` works without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tunnel import __version__
from tunnel.config import (
    DEFAULT_CLIENT_SOCKET,
    DEFAULT_SERVER_SOCKET,
    RunOptions,
    load_client_config,
    load_control_socket,
    load_server_config,
)
from tunnel.core.identity import Identity
from tunnel.core.tokens import new_token
from tunnel.errors import EXIT_OK, EXIT_USAGE, ConfigError, TunnelError
from tunnel.keyfile import read_key_file, write_key_file

__all__ = ["main", "render_status"]

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_CHECK_FAILED = 1  # `tunnel check` found a problem (each is on its own line)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("tunnel")


# --- the commands --------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    write_key_file(args.out, identity, force=args.force)
    # The ID alone on the last line, so that `ID=$(tunnel keygen --out k | tail -n 1)` works.
    print(identity.public_id)
    return EXIT_OK


def _cmd_id(args: argparse.Namespace) -> int:
    print(read_key_file(args.key).public_id)
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    for _ in range(args.count):
        print(new_token())
    return EXIT_OK


def _check_ready_fd(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.fstat(fd)
    except OSError:
        raise ConfigError(f"--ready-fd {fd}: not an open file descriptor") from None


def _cmd_server(args: argparse.Namespace) -> int:
    config = load_server_config(args.config)
    _check_ready_fd(args.ready_fd)
    options = RunOptions(log_level=args.log_level, ready_fd=args.ready_fd, config_path=args.config)
    import trio

    from tunnel.daemon.server import run_server

    trio.run(run_server, config, options)
    return EXIT_OK


def _cmd_client(args: argparse.Namespace) -> int:
    config = load_client_config(args.config)
    if args.cleanup:
        from tunnel.daemon.client import cleanup_client

        removed = cleanup_client(config)
        print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
        return EXIT_OK
    _check_ready_fd(args.ready_fd)
    options = RunOptions(log_level=args.log_level, ready_fd=args.ready_fd, config_path=args.config)
    import trio

    from tunnel.daemon.client import run_client

    trio.run(run_client, config, options)
    return EXIT_OK


def _socket_exists(path: Path) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        # Most likely EACCES on /run/tunnel: say so rather than "nobody listening".
        raise TunnelError(f"{path}: {exc.strerror or exc}") from None
    return True


def _status_socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return args.socket
    from tunnel.daemon.runtime import control_socket_path

    if args.config is not None:
        return control_socket_path(load_control_socket(args.config))
    server = control_socket_path(DEFAULT_SERVER_SOCKET)
    client = control_socket_path(DEFAULT_CLIENT_SOCKET)
    return server if _socket_exists(server) else client


def _ask(args: argparse.Namespace, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the daemon that ``--socket``/``--config`` names; its answer."""
    path = _status_socket(args)
    not_listening = TunnelError(f"no daemon is listening on {path}")
    if not _socket_exists(path):
        raise not_listening
    import trio

    from tunnel.daemon.control import request

    try:
        return trio.run(request, path, message)
    except (OSError, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if all(isinstance(e, FileNotFoundError | ConnectionRefusedError) for e in leaves):
            raise not_listening from None
        if all(isinstance(e, OSError) for e in leaves):
            reason = leaves[0].strerror or leaves[0]  # type: ignore[attr-defined]
            raise TunnelError(f"{path}: cannot query the daemon: {reason}") from None
        raise


def _cmd_status(args: argparse.Namespace) -> int:
    status = _ask(args, {"request": "status"})
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status), end="")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from tunnel.check import check

    findings = check(args.config)
    for finding in findings:
        print(finding)
    return EXIT_OK if all(f.ok for f in findings) else EXIT_CHECK_FAILED


def _cmd_kick(args: argparse.Namespace) -> int:
    answer = _ask(args, {"request": "kick", "client": args.client, "reason": args.reason})
    print(f"closed {answer.get('kicked', 0)} session(s) of {args.client}")
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    answer = _ask(args, {"request": "reload"})
    changed = answer.get("changed") or []
    print(f"changed: {', '.join(map(str, changed)) or 'nothing'}")
    print(f"sessions revoked: {answer.get('revoked', 0)}")
    if answer.get("need_restart"):
        print(f"need a restart to apply: {', '.join(map(str, answer['need_restart']))}")
    return EXIT_OK


def _cmd_metrics(args: argparse.Namespace) -> int:
    answer = _ask(args, {"request": "metrics"})
    text = answer.get("text")
    if not isinstance(text, str):
        raise TunnelError("the daemon sent no metrics")
    print(text, end="")
    return EXIT_OK


# --- rendering the status dict -------------------------------------------------------------


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _duration(value: object) -> str:
    seconds = _number(value)
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    # Drop leading zero units, keep at most three: "2d 3h 4m", "5m 6s".
    while parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{unit}" for n, unit in parts[:3])


def _size(value: object) -> str:
    amount = _number(value)
    if amount is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _count(value: object) -> str:
    number = _number(value)
    return "?" if number is None else f"{number:g}"


def _drops(value: object) -> str:
    if not isinstance(value, Mapping):
        return "?"
    counts = [(reason, n) for reason, n in value.items() if n]
    if not counts:
        return "none"
    return ", ".join(f"{reason}={_count(n)}" for reason, n in sorted(counts, key=str))


def _text(value: object) -> str:
    if value is None:
        return "?"
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value) or "none"
    return str(value)


def _fields(pairs: Iterable[tuple[str, str]], indent: str) -> list[str]:
    pairs = list(pairs)
    width = max(len(label) for label, _ in pairs)
    return [f"{indent}{label.ljust(width)}  {text}" for label, text in pairs]


def _session_lines(session: object) -> list[str]:
    if not isinstance(session, Mapping):
        return [f"  session {session!r}"]
    get = session.get
    rtt = _number(get("rtt_ms"))
    lines = [f"  client {_text(get('client_id'))}"]
    pairs = [
        ("device", _text(get("device_id"))),
        ("addresses", _text(get("addresses"))),
        ("remote", _text(get("remote"))),
        ("uptime", _duration(get("uptime"))),
        ("rtt", "?" if rtt is None else f"{rtt:.1f} ms"),
        ("path", _path(session)),
        ("in", f"{_size(get('bytes_in'))}, {_count(get('packets_in'))} packets"),
        ("out", f"{_size(get('bytes_out'))}, {_count(get('packets_out'))} packets"),
        ("drops", _drops(get("drops"))),
    ]
    lines += _fields(pairs + _extra_pairs(session, _SESSION_KEYS), "    ")
    return lines


_STATUS_KEYS = frozenset({"role", "id", "listen", "server", "tun", "uptime", "drops", "sessions"})
_SESSION_KEYS = frozenset(
    {
        "client_id", "device_id", "addresses", "remote", "uptime", "rtt_ms", "bytes_in",
        "bytes_out", "packets_in", "packets_out", "drops", "path_mtu", "pmtu_state",
        "pmtu_probes", "pmtu_black_holes", "datagram_payload",
    }
)  # fmt: skip


def _path(session: Mapping[str, object]) -> str:
    """The path's size: "MTU 1252 B (complete), datagrams up to 1222 B, 12 probes"."""
    get = session.get
    if get("path_mtu") is None:
        return "?"
    text = f"MTU {_count(get('path_mtu'))} B ({_text(get('pmtu_state'))})"
    text += f", datagrams up to {_count(get('datagram_payload'))} B"
    text += f", {_count(get('pmtu_probes'))} probes"
    black_holes = _number(get("pmtu_black_holes"))
    if black_holes:
        text += f", {black_holes:g} black hole" + ("s" if black_holes != 1 else "")
    return text


def _extra_pairs(mapping: Mapping[str, object], known: frozenset[str]) -> list[tuple[str, str]]:
    """Entries this renderer has no special layout for (a newer daemon, optional features such
    as NAT64): scalars as they are, tables as ``key=value`` pairs."""
    pairs = []
    for key, value in mapping.items():
        if key in known:
            continue
        if isinstance(value, str | int | float | bool):
            pairs.append((str(key), str(value)))
        elif isinstance(value, Mapping):
            pairs.append(
                (str(key), ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-")
            )
    return pairs


def render_status(status: object) -> str:
    """Render the dict a daemon's control socket returns as human-readable text.

    Missing keys show as ``?`` and values of an unexpected type are shown as they are, so a
    daemon of another version never makes ``tunnel status`` fail.
    """
    if not isinstance(status, Mapping):
        return f"{status!r}\n"
    get = status.get
    pairs = [("role", _text(get("role"))), ("id", _text(get("id")))]
    if "listen" in status or "server" not in status:
        pairs.append(("listen", _text(get("listen"))))
    if "server" in status:
        pairs.append(("server", _text(get("server"))))
    pairs += [
        ("tun", _text(get("tun"))),
        ("uptime", _duration(get("uptime"))),
        ("drops", _drops(get("drops"))),
    ]
    sessions = get("sessions")
    if isinstance(sessions, list):
        pairs.append(("sessions", str(len(sessions))))
    else:
        pairs.append(("sessions", "?"))
        sessions = []
    lines = _fields(pairs[:-1] + _extra_pairs(status, _STATUS_KEYS) + pairs[-1:], "")
    for session in sessions:
        lines += _session_lines(session)
    return "\n".join(lines) + "\n"


# --- the command line ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _fd_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a file descriptor number")
    return value


def _add_daemon_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML config")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="least severe messages to log (default: info)",
    )
    parser.add_argument(
        "--ready-fd",
        type=_fd_number,
        metavar="N",
        help="write a newline to file descriptor N and close it once ready",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object a line (default: text)",
    )
    parser.add_argument(
        "--no-timestamps",
        action="store_true",
        help="leave the time out of log lines, for a supervisor that adds its own (s6-log,"
        " svlogd); automatic under systemd (JOURNAL_STREAM)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tunnel`` command."""
    parser = argparse.ArgumentParser(
        prog="tunnel",
        description="An encrypted IP tunnel over QUIC with Ed25519 peer identities.",
    )
    parser.add_argument("--version", action="version", version=f"tunnel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="create a key file; print its public ID")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="key file")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(func=_cmd_keygen)

    ident = commands.add_parser("id", help="print the public ID of a key file")
    ident.add_argument("--key", type=Path, required=True, metavar="FILE", help="key file")
    ident.set_defaults(func=_cmd_id)

    token = commands.add_parser("token", help="print new auth tokens, one a line")
    token.add_argument("--count", type=_positive_int, default=1, metavar="N", help="default 1")
    token.set_defaults(func=_cmd_token)

    server = commands.add_parser("server", help="run the server daemon")
    _add_daemon_options(server)
    server.set_defaults(func=_cmd_server)

    client = commands.add_parser("client", help="run the client daemon")
    _add_daemon_options(client)
    client.add_argument(
        "--cleanup",
        action="store_true",
        help="remove what a killed client of this config left (kill switch, DNS, routing rules)"
        " and exit",
    )
    client.set_defaults(func=_cmd_client)

    status = commands.add_parser("status", help="show the state of a running daemon")
    status.add_argument("--json", action="store_true", help="print JSON")
    _add_socket_options(status)
    status.set_defaults(func=_cmd_status)

    check = commands.add_parser(
        "check",
        help="validate a config and this host for it (TUN, CAP_NET_ADMIN, forwarding, nftables,"
        " the server's identity), changing nothing",
    )
    check.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML config")
    check.set_defaults(func=_cmd_check)

    kick = commands.add_parser(
        "kick", help="close a client's sessions on a running server (it may connect again)"
    )
    kick.add_argument("client", metavar="CLIENT", help="public ID, or name from [clients]")
    kick.add_argument("--reason", default="", help="told to the client and logged")
    _add_socket_options(kick)
    kick.set_defaults(func=_cmd_kick)

    reload = commands.add_parser(
        "reload", help="re-read a running server's config, as SIGHUP does; say what changed"
    )
    _add_socket_options(reload)
    reload.set_defaults(func=_cmd_reload)

    metrics = commands.add_parser(
        "metrics", help="print a running daemon's metrics (Prometheus text format)"
    )
    _add_socket_options(metrics)
    metrics.set_defaults(func=_cmd_metrics)
    return parser


def _add_socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, metavar="PATH", help="control socket")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="take the control socket from this config"
    )


def log_formatter(args: argparse.Namespace) -> logging.Formatter:
    """The daemons' log format: ``--log-format``, with timestamps unless ``--no-timestamps``
    or the journal (``JOURNAL_STREAM``) adds its own."""
    timestamps = not (args.no_timestamps or os.environ.get("JOURNAL_STREAM"))
    if args.log_format == "json":
        return JsonFormatter(timestamps=timestamps)
    return TextFormatter(timestamps=timestamps)


class TextFormatter(logging.Formatter):
    """One line per event, with an ISO 8601 local time to the millisecond (or none); a
    session's lines start with ``[client]``."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__(_LOG_FORMAT if timestamps else _LOG_FORMAT.split(" ", 1)[1])

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _local_time(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        client = getattr(record, "client", None)
        if client is not None:
            record.message = f"[{client}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per event: ``time`` (unless left out), ``level``, ``logger``,
    ``message``, and ``client`` on the lines of one session (its name or short ID)."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {}
        if self.timestamps:
            entry["time"] = _local_time(record)
        entry["level"] = record.levelname.lower()
        entry["logger"] = record.name
        entry["message"] = record.getMessage()
        client = getattr(record, "client", None)
        if client is not None:
            entry["client"] = client
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _local_time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _report(error: TunnelError) -> int:
    message = " ".join(str(error).splitlines()) or type(error).__name__
    print(f"tunnel: {message}", file=sys.stderr)
    return error.exit_code


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except TunnelError as exc:
        return _report(exc)
    except BaseExceptionGroup as group:
        # trio nurseries wrap what their tasks raise; unwrap when all of it is ours.
        leaves = _leaves(group)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_INTERRUPTED
        if all(isinstance(leaf, TunnelError) for leaf in leaves):
            return _report(leaves[0])  # type: ignore[arg-type]
        raise
    except KeyboardInterrupt:
        # The daemons handle SIGINT themselves; this is ^C during another command.
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tunnel`` command with ``argv`` (default ``sys.argv[1:]``); return the exit
    code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    daemon = args.command in ("server", "client")
    level = args.log_level if daemon else "warning"

    # A handler made now writes to the current sys.stderr (which tests may have replaced);
    # removed again on the way out so repeated calls do not stack handlers.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(args) if daemon else TextFormatter(timestamps=True))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        code = _run(args.func, args)
        if not daemon:
            sys.stdout.flush()
        return code
    except BrokenPipeError:
        if daemon:
            raise
        # `tunnel token --count 9 | head -n 1`: the reader left; stop without a traceback, and
        # point stdout at /dev/null so the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
