"""The throughput benchmark behind ``scripts/bench``: our tunnel against wireguard-go and
OpenVPN, in one run, between two network namespaces joined by one veth (MTU 1500).

For each contender the harness brings the tunnel up between namespace A (the "server" side)
and namespace B (the "client" side), then measures

- ping RTT without load (after a warm-up ping, so WireGuard's handshake is not counted),
- iperf3 TCP goodput client->server (B sends to A) and server->client (``-R``), with one flow
  and with four parallel flows,
- CPU seconds per GB moved on each side: utime+stime of the tunnel processes from
  ``/proc/PID/stat`` (all threads) before and after every iperf3 run, divided by the bytes
  the iperf3 receiver counted. Kernel work done in softirq context (veth, TCP) is nobody's
  process time and is not in these figures.

Everything is synchronous on purpose: the harness starts processes and waits for them, and
plain ``subprocess`` with timeouts is the least surprising way to do that. Every process is
registered with a :class:`Bench`, started with ``PR_SET_PDEATHSIG`` (so even a SIGKILLed
harness takes its children along) and stopped in ``finally``; the namespaces come from
:mod:`tests.support.netns`, whose exit kills whatever still runs inside and deletes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from tests.support import netns

__all__ = [
    "CONTENDERS",
    "METRICS",
    "Bench",
    "BenchError",
    "Contender",
    "Endpoints",
    "cpu_seconds",
    "format_table",
    "headline",
    "main",
    "parse_iperf3",
    "parse_ping",
    "ratios",
    "reap_own_leftovers",
    "runqueue_wait_seconds",
]

UNDERLAY_A = "10.99.0.1"
UNDERLAY_B = "10.99.0.2"
UNDERLAY_PREFIX = 24
UNDERLAY_MTU = 1500
# The client-to-client contenders' server sits in a third namespace S, on a link of its own
# to each side; the clients' direct path is the A-B veth every other contender uses.
SERVER_S_A, CLIENT_A_S = "10.98.1.1", "10.98.1.2"
SERVER_S_B, CLIENT_B_S = "10.98.2.1", "10.98.2.2"
TUNNEL_MTU = 1420
IPERF_PORT = 5201
STOP_GRACE_S = 3.0
READY_TIMEOUT_S = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The peer we measure ourselves against; the ratio column and the headline are tunnel/this.
REFERENCE = "wireguard-go"
OURS = "tunnel"

#: (key, label, unit, better) for every figure in the table, in table order.
METRICS: list[tuple[str, str, str, str]] = [
    ("tcp_up_1", "TCP client->server, 1 flow", "Mbit/s", "higher"),
    ("tcp_up_4", "TCP client->server, 4 flows", "Mbit/s", "higher"),
    ("tcp_down_1", "TCP server->client, 1 flow", "Mbit/s", "higher"),
    ("tcp_down_4", "TCP server->client, 4 flows", "Mbit/s", "higher"),
    ("rtt_ms", "ping RTT avg, no load", "ms", "lower"),
    ("cpu_server_s_per_gb", "CPU s/GB, server side (A)", "s/GB", "lower"),
    ("cpu_client_s_per_gb", "CPU s/GB, client side (B)", "s/GB", "lower"),
]

#: Debian packages that provide the executables the contenders need.
PACKAGES = {
    "iperf3": "iperf3",
    "ping": "iputils-ping",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "openvpn": "openvpn",
}


class BenchError(Exception):
    """A contender could not be brought up or measured; the message says why."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: unwind through every ``finally`` like ^C does."""


# ---------------------------------------------------------------------------------------------
# processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # PR_SET_PDEATHSIG = 1: the child gets SIGKILL if the harness dies, even by SIGKILL.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


@attrs.define(eq=False)
class Proc:
    """A long-running process the harness started; its output goes to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """Pid of the process itself (``ip netns exec`` execs it)."""
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, SIGKILL after :data:`STOP_GRACE_S`; returns once it is reaped."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.terminate()
        try:
            self.popen.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5)


class Bench:
    """The world of one benchmark run: a temp dir, two namespaces joined by a veth, and every
    process started in it. Use as a context manager; leaving it removes everything."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.procs: list[Proc] = []
        self._stack = contextlib.ExitStack()
        self.workdir = Path(".")
        self.ns_a: netns.Netns | None = None
        self.ns_b: netns.Netns | None = None
        self.ns_s: netns.Netns | None = None

    def __enter__(self) -> Bench:
        try:
            self.workdir = Path(
                self._stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=f"tnl-bench-{os.getpid()}-")
                )
            )
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        """The namespaces and links of this world (a subclass may build another)."""
        self.ns_a = self._stack.enter_context(netns.netns("bencha"))
        self.ns_b = self._stack.enter_context(netns.netns("benchb"))
        netns.veth(
            self.ns_a,
            self.ns_b,
            f"{UNDERLAY_A}/{UNDERLAY_PREFIX}",
            f"{UNDERLAY_B}/{UNDERLAY_PREFIX}",
            mtu=UNDERLAY_MTU,
            name_a="bench-a",
            name_b="bench-b",
        )
        self.ns_s = self._stack.enter_context(netns.netns("benchs"))
        for ns, server, client, name in (
            (self.ns_a, SERVER_S_A, CLIENT_A_S, "a"),
            (self.ns_b, SERVER_S_B, CLIENT_B_S, "b"),
        ):
            netns.veth(self.ns_s, ns, f"{server}/24", f"{client}/24", mtu=UNDERLAY_MTU,
                       name_a=f"bench-s{name}", name_b="bench-s")  # fmt: skip

    def close(self) -> None:
        """Stop every process, delete the namespaces and the temp dir (idempotent). Signals
        are ignored meanwhile: a second ^C must not leave half the world behind, and every
        step is bounded."""
        with _signals_ignored():
            try:
                for proc in reversed(self.procs):
                    proc.stop()
                self.procs.clear()
            finally:
                self._stack.close()

    @property
    def a(self) -> netns.Netns:
        assert self.ns_a is not None
        return self.ns_a

    @property
    def b(self) -> netns.Netns:
        assert self.ns_b is not None
        return self.ns_b

    @property
    def s(self) -> netns.Netns:
        """The third namespace: the server of the client-to-client contenders."""
        assert self.ns_s is not None
        return self.ns_s

    def spawn(
        self,
        ns: netns.Netns,
        argv: Sequence[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Proc:
        """Start ``argv`` inside ``ns``; output to ``<workdir>/<name>.log``."""
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                netns.exec_argv(ns, list(argv)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=tuple(pass_fds),
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """Stop one process and forget it."""
        proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def run(
        self,
        ns: netns.Netns | None,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command (inside ``ns`` unless None) and capture its output."""
        cmd = netns.exec_argv(ns, list(argv))
        proc = subprocess.run(
            cmd,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            preexec_fn=_die_with_parent,
        )
        if check and proc.returncode != 0:
            raise BenchError(
                f"{' '.join(cmd)} exited with {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_LEFTOVER_NS_RE = re.compile(r"^tnl-bench[abs]-(\d+)-\d+$")
_LEFTOVER_DIR_RE = re.compile(r"^tnl-bench-(\d+)-")
_LEFTOVER_SOCK_RE = re.compile(r"^wgb(\d+)[ab]\.sock$")


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap_own_leftovers(log: Callable[[str], None]) -> None:
    """Remove what an earlier benchmark run killed with SIGKILL left behind: its namespaces,
    temp dir and wireguard-go sockets. Only names this module makes, carrying the pid of a
    process that no longer exists, are touched. (Its processes died with it: PDEATHSIG.)"""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _LEFTOVER_NS_RE.match(name)
        if match and _pid_gone(int(match.group(1))):
            for pid in netns.Netns(name).pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
            log(f"removed namespace {name} left by an earlier run")
    tmp = Path(tempfile.gettempdir())
    for path in tmp.glob("tnl-bench-*"):
        match = _LEFTOVER_DIR_RE.match(path.name)
        if match and path.is_dir() and _pid_gone(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        for path in Path("/var/run/wireguard").iterdir():
            match = _LEFTOVER_SOCK_RE.match(path.name)
            if match and _pid_gone(int(match.group(1))):
                path.unlink(missing_ok=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # comm (field 2) may hold spaces and parentheses: the fields we want follow the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (``schedstat``), in
    seconds: high means the figures were limited by other load on the machine, not by the
    contender. 0.0 where the kernel keeps no schedstats."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total / 1e9


def _wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, proc: Sequence[Proc] = ()
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in proc:
            if p.popen.poll() is not None:
                raise BenchError(
                    f"{p.name} exited with {p.popen.returncode} while waiting "
                    f"for {what}:\n{p.log_tail()}"
                )
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name} ---\n{p.log_tail()}" for p in proc)
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{tails}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# contenders


@attrs.frozen
class Endpoints:
    """What a running contender offers the measurements: tunnel addresses on each side and
    the processes whose CPU time counts."""

    addr_a: str
    addr_b: str
    pids_a: tuple[int, ...]
    pids_b: tuple[int, ...]


def _toml(**values: Any) -> str:
    """A flat TOML document: strings, paths, booleans, integers and lists of strings (JSON's
    spelling of each is TOML's)."""
    return "".join(
        f"{key} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n" for key, v in values.items()
    )


def spawn_ready(bench: Bench, ns: netns.Netns, argv: list[str], name: str) -> Proc:
    """Start one of our daemons in ``ns`` with ``--ready-fd`` and wait until it says it is
    ready; its log tail is in the error when it exits or stays silent."""
    read_fd, write_fd = os.pipe()
    try:
        proc = bench.spawn(ns, [*argv, "--ready-fd", str(write_fd)], name, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    f"{name} not ready after {READY_TIMEOUT_S:g} s:\n{proc.log_tail()}"
                )
            readable, _, _ = select.select([read_fd], [], [], left)
            if readable:
                chunk = os.read(read_fd, 64)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(2)
                    raise BenchError(
                        f"{name} exited ({proc.popen.returncode}) before "
                        f"becoming ready:\n{proc.log_tail()}"
                    )
                buf += chunk
    finally:
        os.close(read_fd)
    return proc


class Contender:
    """One way of carrying IP between the namespaces. Subclasses set ``name``, ``needs``
    (executables) and implement :meth:`start`; :meth:`stop` undoes it."""

    name = ""
    needs: tuple[str, ...] = ()
    description = ""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def missing(self) -> list[str]:
        """Executables this contender needs that are not installed."""
        return [exe for exe in self.needs if shutil.which(exe) is None]

    def start(self, bench: Bench) -> Endpoints:
        raise NotImplementedError

    def extra(self, bench: Bench) -> dict[str, Any]:
        """Anything worth keeping in the JSON after the measurements (counters, versions)."""
        return {}

    def stop(self, bench: Bench) -> None:
        for proc in reversed(self.procs):
            bench.stop(proc)
        self.procs.clear()


class TunnelContender(Contender):
    """Our daemon: ``tunnel server`` in A, ``tunnel client`` in B."""

    name = OURS
    description = "tunnel (QUIC DATAGRAM, aioquic + trio), TUN MTU 1420"
    network = "10.78.0"

    def _tunnel(self, bench: Bench, *args: str) -> str:
        return bench.run(None, [sys.executable, "-m", "tunnel", *args]).stdout

    def _start_ready(self, bench: Bench, ns: netns.Netns, argv: list[str], name: str) -> Proc:
        proc = spawn_ready(bench, ns, argv, name)
        self.procs.append(proc)
        return proc

    def start(self, bench: Bench) -> Endpoints:
        work = bench.workdir
        server_key, client_key = work / "server.key", work / "client.key"
        server_id = self._tunnel(bench, "keygen", "--out", str(server_key)).split()[-1]
        self._tunnel(bench, "keygen", "--out", str(client_key))
        token = self._tunnel(bench, "token").split()[-1]
        pid = os.getpid()
        (work / "server.toml").write_text(
            _toml(
                listen=f"{UNDERLAY_A}:4433",
                key_file=server_key,
                network=f"{self.network}.0/24",
                auth_tokens=[token],
                mtu=TUNNEL_MTU,
                tun_name=f"tnb{pid}s",
                control_socket=work / "server.sock",
            )
        )
        (work / "client.toml").write_text(
            _toml(
                server=f"{UNDERLAY_A}:4433",
                server_id=server_id,
                auth_token=token,
                key_file=client_key,
                mtu=TUNNEL_MTU,
                tun_name=f"tnb{pid}c",
                control_socket=work / "client.sock",
            )
        )
        server = self._start_ready(
            bench,
            bench.a,
            [sys.executable, "-m", "tunnel", "server", "--config", str(work / "server.toml")],
            "tunnel-server",
        )
        client = self._start_ready(
            bench,
            bench.b,
            [sys.executable, "-m", "tunnel", "client", "--config", str(work / "client.toml")],
            "tunnel-client",
        )
        return Endpoints(f"{self.network}.1", f"{self.network}.2", (server.pid,), (client.pid,))

    def extra(self, bench: Bench) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for side in ("server", "client"):
            proc = bench.run(
                None,
                [
                    sys.executable,
                    "-m",
                    "tunnel",
                    "status",
                    "--json",
                    "--socket",
                    str(bench.workdir / f"{side}.sock"),
                ],
                check=False,
                timeout=10,
            )
            try:
                status = json.loads(proc.stdout)
            except ValueError:
                out[f"{side}_status"] = f"unavailable: {proc.stderr.strip()[-300:]}"
                continue
            sessions = status.get("sessions") or [{}]
            out[f"{side}_status"] = {
                "drops": status.get("drops"),
                "session_drops": sessions[0].get("drops"),
                "packets_in": sessions[0].get("packets_in"),
                "packets_out": sessions[0].get("packets_out"),
                "rtt_ms": sessions[0].get("rtt_ms"),
            }
        return out


class ClientToClientContender(TunnelContender):
    """Two of our clients, one in A and one in B, with the server in S: traffic between them
    goes direct over the A-B veth once they punched (``tunnel-p2p``), or through the server
    (``tunnel-relay``, ``peer_to_peer = false``). CPU counts the two clients only; the
    relay's server work is in ``extra``."""

    name = "tunnel-p2p"
    description = "tunnel client to client, direct path (server in S), TUN MTU 1420"
    network = "10.81.0"
    peer_to_peer = True
    path = "direct"
    port = 4434
    tag = "p"  # in TUN names: the two contenders run side by side in the same namespaces

    def start(self, bench: Bench) -> Endpoints:
        work = bench.workdir / self.name
        work.mkdir()
        keys = {}
        for name in ("server", "a", "b"):
            keys[name] = work / f"{name}.key"
            out = self._tunnel(bench, "keygen", "--out", str(keys[name]))
            if name == "server":
                server_id = out.split()[-1]
        token = self._tunnel(bench, "token").split()[-1]
        pid = os.getpid()
        (work / "server.toml").write_text(
            _toml(
                listen=f"0.0.0.0:{self.port}",
                key_file=keys["server"],
                network=f"{self.network}.0/24",
                auth_tokens=[token],
                client_to_client=True,
                mtu=TUNNEL_MTU,
                tun_name=f"tnb{pid}{self.tag}s",
                control_socket=work / "server.sock",
            )
        )
        self.server = self._start_ready(
            bench, bench.s,
            [sys.executable, "-m", "tunnel", "server", "--config", str(work / "server.toml")],
            f"{self.name}-server",
        )  # fmt: skip
        clients = []
        for name, ns, server in (("a", bench.a, SERVER_S_A), ("b", bench.b, SERVER_S_B)):
            config = work / f"{name}.toml"
            config.write_text(
                _toml(
                    server=f"{server}:{self.port}",
                    server_id=server_id,
                    auth_token=token,
                    key_file=keys[name],
                    peer_to_peer=self.peer_to_peer,
                    mtu=TUNNEL_MTU,
                    tun_name=f"tnb{pid}{self.tag}{name}",
                    control_socket=work / f"{name}.sock",
                )
            )
            argv = [sys.executable, "-m", "tunnel", "client", "--config", str(config)]
            clients.append(self._start_ready(bench, ns, argv, f"{self.name}-{name}"))
        # a got .2, b .3; the first packets introduce them, then wait for the path we measure.
        addr_a, addr_b = f"{self.network}.2", f"{self.network}.3"
        bench.run(bench.b, ["ping", "-c", "3", "-i", "0.2", "-W", "3", addr_a], check=False)
        _wait_for(
            lambda: self._paths(bench) == [self.path] * 2,
            READY_TIMEOUT_S,
            f"{self.name}: both clients on the {self.path} path",
            [*clients, self.server],
        )
        return Endpoints(addr_a, addr_b, (clients[0].pid,), (clients[1].pid,))

    def _status(self, bench: Bench, name: str) -> dict[str, Any]:
        sock = bench.workdir / self.name / f"{name}.sock"
        proc = bench.run(None, [sys.executable, "-m", "tunnel", "status", "--json", "--socket",
                                str(sock)], check=False, timeout=10)  # fmt: skip
        try:
            status: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            return {}
        return status

    def _paths(self, bench: Bench) -> list[str | None]:
        paths = []
        for name in ("a", "b"):
            # Not introduced (peer_to_peer off, or not yet): through the server.
            peers = self._status(bench, name).get("peers") or [{"path": "relay"}]
            paths.append(peers[0].get("path"))
        return paths

    def extra(self, bench: Bench) -> dict[str, Any]:
        """The path each client saw at the end (a run that fell back shows it here) and the
        server's CPU time."""
        return {
            "paths_at_end": self._paths(bench),
            "peers_a": self._status(bench, "a").get("peers"),
            "server_cpu_s": cpu_seconds(self.server.pid),
        }


class RelayedClientToClientContender(ClientToClientContender):
    """The same two clients, every packet through the server."""

    name = "tunnel-relay"
    description = "tunnel client to client through the server in S (peer_to_peer = false)"
    network = "10.82.0"
    peer_to_peer = False
    path = "relay"
    port = 4435
    tag = "r"


class WireguardContender(Contender):
    """Userspace WireGuard: one ``wireguard-go -f`` per side, configured with ``wg set``."""

    name = "wireguard-go"
    needs = ("wireguard-go", "wg")
    description = "wireguard-go (userspace WireGuard), MTU 1420"
    network = "10.79.0"
    port = 51820

    def start(self, bench: Bench) -> Endpoints:
        pid = os.getpid()
        # The UAPI socket lives in /var/run/wireguard/<ifname>.sock for every namespace
        # alike: names must be unique on the host, not just in the namespace.
        self.ifnames = (f"wgb{pid}a", f"wgb{pid}b")
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL="error")
        keys = []
        for side in "ab":
            private = bench.run(None, ["wg", "genkey"]).stdout.strip()
            public = bench.run(None, ["wg", "pubkey"], input=private.encode()).stdout.strip()
            path = bench.workdir / f"wg-{side}.key"
            path.write_text(private + "\n")
            path.chmod(0o600)
            keys.append((path, public))
        sides = [
            (bench.a, self.ifnames[0], UNDERLAY_B, 1, 2),
            (bench.b, self.ifnames[1], UNDERLAY_A, 2, 1),
        ]
        pids = []
        for index, (ns, ifname, peer_underlay, me, peer) in enumerate(sides):
            proc = bench.spawn(
                ns, ["wireguard-go", "-f", ifname], f"wireguard-go-{ifname}", env=env
            )
            self.procs.append(proc)
            sock = Path(f"/var/run/wireguard/{ifname}.sock")
            _wait_for(sock.exists, READY_TIMEOUT_S, f"{sock}", [proc])
            bench.run(
                ns,
                [
                    "wg",
                    "set",
                    ifname,
                    "private-key",
                    str(keys[index][0]),
                    "listen-port",
                    str(self.port),
                    "peer",
                    keys[1 - index][1],
                    "allowed-ips",
                    f"{self.network}.{peer}/32",
                    "endpoint",
                    f"{peer_underlay}:{self.port}",
                ],
            )
            netns.ip(ns, "addr", "add", f"{self.network}.{me}/24", "dev", ifname)
            netns.ip(ns, "link", "set", ifname, "mtu", str(TUNNEL_MTU), "up")
            pids.append(proc.pid)
        return Endpoints(f"{self.network}.1", f"{self.network}.2", (pids[0],), (pids[1],))

    def stop(self, bench: Bench) -> None:
        try:
            super().stop(bench)
        finally:
            for ifname in getattr(self, "ifnames", ()):
                # wireguard-go removes its socket on a clean exit; not after SIGKILL.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/var/run/wireguard/{ifname}.sock")


class OpenvpnContender(Contender):
    """OpenVPN 2.6 point-to-point over UDP with a static key (deprecated in 2.6, still
    works; the only mode without a PKI). AES-256-CBC + HMAC-SHA256, TUN, no DCO."""

    name = "openvpn"
    needs = ("openvpn",)
    description = "OpenVPN 2.6 static key, UDP, AES-256-CBC/SHA256, default tun-mtu/mssfix"
    network = "10.80.0"
    port = 1194

    def start(self, bench: Bench) -> Endpoints:
        key = bench.workdir / "openvpn-static.key"
        bench.run(None, ["openvpn", "--genkey", "secret", str(key)])
        pid = os.getpid()
        sides = [
            (bench.a, f"ovb{pid}a", UNDERLAY_A, UNDERLAY_B, 1, 2, "0"),
            (bench.b, f"ovb{pid}b", UNDERLAY_B, UNDERLAY_A, 2, 1, "1"),
        ]
        procs = []
        for ns, dev, local, remote, me, peer, direction in sides:
            proc = bench.spawn(
                ns,
                [
                    "openvpn",
                    "--dev",
                    dev,
                    "--dev-type",
                    "tun",
                    "--proto",
                    "udp",
                    "--local",
                    local,
                    "--lport",
                    str(self.port),
                    "--remote",
                    remote,
                    str(self.port),
                    "--ifconfig",
                    f"{self.network}.{me}",
                    f"{self.network}.{peer}",
                    "--secret",
                    str(key),
                    direction,
                    "--cipher",
                    "AES-256-CBC",
                    "--auth",
                    "SHA256",
                    "--verb",
                    "3",
                ],
                f"openvpn-{dev}",
            )
            self.procs.append(proc)
            procs.append(proc)
        for proc in procs:

            def initialised(proc: Proc = proc) -> bool:
                return "Initialization Sequence Completed" in proc.log_path.read_text(
                    errors="replace"
                )

            _wait_for(initialised, READY_TIMEOUT_S, f"{proc.name} to initialise", procs)
        return Endpoints(f"{self.network}.1", f"{self.network}.2", (procs[0].pid,), (procs[1].pid,))


class VethContender(Contender):
    """No tunnel at all: the bare veth, for scale (not run unless asked for)."""

    name = "veth"
    description = "bare veth, no tunnel (no CPU figures: nothing of ours runs)"

    def start(self, bench: Bench) -> Endpoints:
        return Endpoints(UNDERLAY_A, UNDERLAY_B, (), ())


#: Every contender by name, in run order.
CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        TunnelContender,
        ClientToClientContender,
        RelayedClientToClientContender,
        WireguardContender,
        OpenvpnContender,
        VethContender,
    )
}
DEFAULT_CONTENDERS = ("tunnel", "tunnel-p2p", "tunnel-relay", "wireguard-go", "openvpn")


# ---------------------------------------------------------------------------------------------
# measurements

_RTT_RE = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_LOSS_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")


def parse_ping(text: str) -> dict[str, float]:
    """min/avg/max/mdev (ms) and loss from ``ping -q`` output; BenchError if absent."""
    rtt = _RTT_RE.search(text)
    loss = _LOSS_RE.search(text)
    if rtt is None or loss is None:
        raise BenchError(f"cannot parse ping output: {text.strip()[-300:]!r}")
    sent, got = int(loss.group(1)), int(loss.group(2))
    mn, avg, mx, mdev = (float(g) for g in rtt.groups())
    return {
        "min_ms": mn,
        "avg_ms": avg,
        "max_ms": mx,
        "mdev_ms": mdev,
        "sent": sent,
        "received": got,
    }


def parse_iperf3(text: str) -> dict[str, float]:
    """Goodput (receiver side), bytes and retransmits from ``iperf3 -J`` output; BenchError
    with iperf3's own message on failure."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"iperf3 printed no JSON: {text.strip()[-300:]!r}") from exc
    if not isinstance(data, dict):
        raise BenchError("iperf3 printed unexpected JSON")
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    try:
        received = data["end"]["sum_received"]
        sent = data["end"]["sum_sent"]
        return {
            "mbit_s": received["bits_per_second"] / 1e6,
            "bytes": float(received["bytes"]),
            "seconds": float(received["seconds"]),
            "retransmits": float(sent.get("retransmits", 0)),
        }
    except (KeyError, TypeError) as exc:
        raise BenchError(f"iperf3 JSON lacks {exc}") from exc


def _ping(bench: Bench, ns: netns.Netns, addr: str, count: int) -> dict[str, float]:
    proc = bench.run(
        ns,
        ["ping", "-q", "-n", "-c", str(count), "-i", "0.05", "-W", "1", addr],
        check=False,
        timeout=count * 0.05 + 15,
    )
    return parse_ping(proc.stdout)


def _wait_reachable(bench: Bench, ns: netns.Netns, addr: str, procs: Sequence[Proc]) -> None:
    def answered() -> bool:
        return (
            bench.run(ns, ["ping", "-q", "-n", "-c", "1", "-W", "1", addr], check=False).returncode
            == 0
        )

    _wait_for(answered, READY_TIMEOUT_S, f"{addr} to answer ping", procs)


def _cpu_total(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _wait_total(pids: Sequence[int]) -> float:
    return sum(runqueue_wait_seconds(pid) for pid in pids)


def _iperf3(
    bench: Bench, ep: Endpoints, *, reverse: bool, flows: int, seconds: float
) -> dict[str, float]:
    argv = [
        "iperf3",
        "-c",
        ep.addr_a,
        "-p",
        str(IPERF_PORT),
        "-t",
        f"{seconds:g}",
        "-P",
        str(flows),
        "-J",
        "--connect-timeout",
        "3000",
        *(["-R"] if reverse else []),
    ]
    for attempt in range(3):
        cpu_a, cpu_b = _cpu_total(ep.pids_a), _cpu_total(ep.pids_b)
        wait_a, wait_b = _wait_total(ep.pids_a), _wait_total(ep.pids_b)
        proc = bench.run(bench.b, argv, check=False, timeout=seconds + 30)
        cpu_a, cpu_b = _cpu_total(ep.pids_a) - cpu_a, _cpu_total(ep.pids_b) - cpu_b
        wait_a, wait_b = _wait_total(ep.pids_a) - wait_a, _wait_total(ep.pids_b) - wait_b
        try:
            result = parse_iperf3(proc.stdout)
        except BenchError as exc:
            # A test can trip over the end of the previous one ("server is busy").
            if attempt < 2 and "busy" in str(exc):
                time.sleep(1)
                continue
            raise
        gb = result["bytes"] / 1e9
        result["cpu_server_s"] = cpu_a
        result["cpu_client_s"] = cpu_b
        result["runqueue_wait_server_s"] = wait_a
        result["runqueue_wait_client_s"] = wait_b
        if ep.pids_a and gb > 0:
            result["cpu_server_s_per_gb"] = cpu_a / gb
            result["cpu_client_s_per_gb"] = cpu_b / gb
        return result
    raise AssertionError("unreachable")


# Pings per contender per round of the interleaved RTT measurement.
PING_ROUND = 10


def combine_pings(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """One figure from several ``ping`` runs: the average over every answered ping."""
    received = sum(r["received"] for r in rounds)
    if not received:
        raise BenchError("no ping was answered")
    return {
        "avg_ms": sum(r["avg_ms"] * r["received"] for r in rounds) / received,
        "min_ms": min(r["min_ms"] for r in rounds),
        "max_ms": max(r["max_ms"] for r in rounds),
        "sent": sum(r["sent"] for r in rounds),
        "received": received,
        "rounds": len(rounds),
    }


def turn_order(names: Sequence[str], round_index: int) -> list[str]:
    """The contenders in the order they take a round (of pings, of one throughput figure):
    each goes first in turn."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def measure_rtt(
    bench: Bench,
    running: dict[str, tuple[Contender, Endpoints]],
    pings: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, float] | BenchError]:
    """Idle ping RTT of every running contender, interleaved: rounds of PING_ROUND pings to
    each, in rotating order, so a slow spell of the machine falls on all of them alike (run
    one after the other, the same figure moved by a quarter from minute to minute)."""
    live: list[str] = []
    outcome: dict[str, dict[str, float] | BenchError] = {}
    for name, (contender, ep) in running.items():
        try:
            _wait_reachable(bench, bench.b, ep.addr_a, contender.procs)
            _ping(bench, bench.b, ep.addr_a, 5)  # warm caches, paths and handshakes
            live.append(name)
        except BenchError as exc:
            outcome[name] = exc
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in live}
    for index in range(-(-pings // PING_ROUND)):
        count = min(PING_ROUND, pings - index * PING_ROUND)
        for name in turn_order(live, index) if live else []:
            if isinstance(outcome.get(name), BenchError):
                continue
            try:
                rounds[name].append(_ping(bench, bench.b, running[name][1].addr_a, count))
            except BenchError as exc:
                outcome[name] = exc
    for name in live:
        if name not in outcome:
            try:
                outcome[name] = combine_pings(rounds[name])
            except BenchError as exc:
                outcome[name] = exc
        result = outcome[name]
        if isinstance(result, BenchError):
            log(f"  {name}: ping FAILED: {result}")
        else:
            log(
                f"  {name}: avg {result['avg_ms']:.3f} ms (min {result['min_ms']:.3f}, "
                f"max {result['max_ms']:.3f}, {result['received']:.0f}/{result['sent']:.0f} "
                f"answered, {result['rounds']:.0f} rounds)"
            )
    return outcome


# The throughput figures: (key, reverse, flows). "up" is client->server (B sends to A).
FIGURES = (("tcp_up_1", False, 1), ("tcp_up_4", False, 4),
           ("tcp_down_1", True, 1), ("tcp_down_4", True, 4))  # fmt: skip


def throughput_schedule(names: Sequence[str]) -> list[tuple[str, bool, int, str]]:
    """The iperf3 runs in order, (figure, reverse, flows, contender): figure by figure, every
    contender in turn, a different one first for each figure, so a slow minute of the machine
    falls on one figure of all of them rather than on all figures of one."""
    return [(key, reverse, flows, name)
            for index, (key, reverse, flows) in enumerate(FIGURES)
            for name in turn_order(names, index)]  # fmt: skip


def _log_run(
    log: Callable[[str], None], name: str, key: str, result: dict[str, float], seconds: float
) -> None:
    secs = result["seconds"] or seconds
    per_gb = (
        f", CPU {result['cpu_server_s_per_gb']:.1f}/"
        f"{result['cpu_client_s_per_gb']:.1f} s/GB server/client; busy "
        f"{result['cpu_server_s'] / secs:.0%}/"
        f"{result['cpu_client_s'] / secs:.0%}, waiting for a CPU "
        f"{result['runqueue_wait_server_s'] / secs:.0%}/"
        f"{result['runqueue_wait_client_s'] / secs:.0%} of the time"
        if "cpu_server_s_per_gb" in result
        else ""
    )
    log(
        f"  {name} {key}: {result['mbit_s']:.0f} Mbit/s "
        f"({result['retransmits']:.0f} retransmits{per_gb})"
    )


def throughput_metrics(runs: dict[str, dict[str, float]], has_pids: bool) -> dict[str, float]:
    """Goodput per figure, and CPU seconds per GB on each side over all the runs."""
    metrics = {key: run["mbit_s"] for key, run in runs.items()}
    gb = sum(run["bytes"] for run in runs.values()) / 1e9
    if has_pids and gb > 0:
        metrics["cpu_server_s_per_gb"] = sum(r["cpu_server_s"] for r in runs.values()) / gb
        metrics["cpu_client_s_per_gb"] = sum(r["cpu_client_s"] for r in runs.values()) / gb
    return metrics


def measure_throughput(
    bench: Bench,
    running: dict[str, tuple[Contender, Endpoints]],
    *,
    seconds: float,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any] | BenchError]:
    """iperf3 both ways, 1 and 4 flows, with CPU per GB, for every running contender in the
    order of :func:`throughput_schedule` (one at a time: the others sit idle meanwhile).
    Returns ``{"metrics", "runs"}`` per contender, or the error that stopped it."""
    outcome: dict[str, dict[str, Any] | BenchError] = {}
    if shutil.which("iperf3") is None:
        log("  iperf3: skipped: iperf3 not installed")
        return {
            name: {"metrics": {}, "runs": {"iperf3": "skipped: iperf3 not installed"}}
            for name in running
        }
    # One server in A answers every contender: it listens on all of A's addresses.
    server = bench.spawn(bench.a, ["iperf3", "-s", "-p", str(IPERF_PORT)], "iperf3-server")
    runs: dict[str, dict[str, dict[str, float]]] = {name: {} for name in running}
    try:

        def listening() -> bool:
            out = bench.run(bench.a, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"], check=False)
            return str(IPERF_PORT) in out.stdout

        _wait_for(listening, 10, "the iperf3 server", [server])
        for key, reverse, flows, name in throughput_schedule(list(running)):
            if name in outcome:
                continue  # failed earlier
            ep = running[name][1]
            try:
                result = _iperf3(bench, ep, reverse=reverse, flows=flows, seconds=seconds)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                log(f"  {name} {key}: FAILED: {exc}")
                outcome[name] = exc if isinstance(exc, BenchError) else BenchError(str(exc))
                continue
            runs[name][key] = result
            _log_run(log, name, key, result, seconds)
    finally:
        bench.stop(server)
    for name, (_, ep) in running.items():
        if name not in outcome:
            outcome[name] = {
                "metrics": throughput_metrics(runs[name], bool(ep.pids_a)),
                "runs": runs[name],
            }
    return outcome


# ---------------------------------------------------------------------------------------------
# reporting


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tunnel / wireguard-go for every metric both have."""
    ours = results.get(OURS, {}).get("metrics") or {}
    ref = results.get(REFERENCE, {}).get("metrics") or {}
    out = {}
    for key, *_ in METRICS:
        a, b = ours.get(key), ref.get(key)
        if a is not None and b:
            out[key] = a / b
    return out


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f}"
    if unit == "s/GB":
        return f"{value:.1f}"
    return f"{value:.0f}"


def format_table(results: dict[str, dict[str, Any]], names: Sequence[str]) -> str:
    """The table: one row a metric, one column a contender, then the ratio to wireguard-go."""
    ratio = ratios(results)
    header = ["metric", *names, f"{OURS}/{REFERENCE}"]
    rows = [header]
    for key, label, unit, better in METRICS:
        row = [f"{label} ({unit}, {better} is better)"]
        for name in names:
            res = results.get(name, {})
            if res.get("status") != "ok":
                row.append(res.get("status", "-").split(":")[0])
            else:
                row.append(_cell(res["metrics"].get(key), unit))
        row.append(f"{ratio[key]:.2f}x" if key in ratio else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name in names:
        status = results.get(name, {}).get("status", "not run")
        if status != "ok":
            reason = results.get(name, {}).get("reason", "")
            lines.append(f"{name}: {status}{': ' + reason.splitlines()[0] if reason else ''}")
    return "\n".join(lines)


def headline(results: dict[str, dict[str, Any]]) -> str:
    """One line: how the tunnel compares with wireguard-go in this run."""
    ratio = ratios(results)
    goodput = [ratio[k] for k in ("tcp_up_1", "tcp_up_4", "tcp_down_1", "tcp_down_4") if k in ratio]
    if not goodput:
        missing = [n for n in (OURS, REFERENCE) if results.get(n, {}).get("status") != "ok"]
        return f"HEADLINE: no ratio to {REFERENCE}: " + ", ".join(
            f"{n} {results.get(n, {}).get('status', 'not run')}" for n in missing
        )
    geo = math.exp(sum(math.log(r) for r in goodput) / len(goodput))
    labels = {
        "tcp_up_1": "client->server 1 flow",
        "tcp_up_4": "client->server 4 flows",
        "tcp_down_1": "server->client 1 flow",
        "tcp_down_4": "server->client 4 flows",
    }
    parts = ", ".join(f"{label} {ratio[k]:.2f}x" for k, label in labels.items() if k in ratio)
    ours = results[OURS]["metrics"].get("rtt_ms")
    ref = results[REFERENCE]["metrics"].get("rtt_ms")
    rtt = (
        f"; RTT {ours:.3f} ms vs {ref:.3f} ms ({ours - ref:+.3f} ms)"
        if ours is not None and ref is not None
        else ""
    )
    return f"HEADLINE: tunnel TCP goodput = {geo:.2f}x wireguard-go (geometric mean; {parts}){rtt}"


# ---------------------------------------------------------------------------------------------
# entry point


def _install_missing(needed: set[str], log: Callable[[str], None]) -> None:
    missing = sorted({PACKAGES[exe] for exe in needed if shutil.which(exe) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        log(f"cannot install {', '.join(missing)}: no apt-get")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    log(f"installing {' '.join(missing)} (apt-get install)")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        log("apt-get install failed; apt-get update and one more try")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        # One package may be unknown here; install the others one by one.
        for package in missing:
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                env=env,
                capture_output=True,
                check=False,
            )


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind through every ``finally`` like ^C (KeyboardInterrupt) does.
    SIGINT gets Python's own handler even if we were started with it ignored (``cmd &``)."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _parse_args(argv: Sequence[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="TCP goodput, RTT and CPU/GB of tunnel vs wireguard-go vs OpenVPN between "
        "two network namespaces (needs root).",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_CONTENDERS),
        help="comma-separated contenders to run, in order "
        f"(known: {', '.join(CONTENDERS)}; default: %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="length of each iperf3 run (default: %(default)s)",
    )
    parser.add_argument(
        "--pings",
        type=int,
        default=60,
        help="pings (0.05 s apart) to each contender for the RTT figure, "
        f"in interleaved rounds of {PING_ROUND} (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        help="where to write the results (default: "
        "bench-results/bench-<timestamp>.json in the repository)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        parser.error(
            f"--only: unknown contender(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(CONTENDERS)}"
        )
    if not (0 < args.seconds <= 3600):
        parser.error("--seconds must be > 0 and at most 3600")
    if not (1 <= args.pings <= 10000):
        parser.error("--pings must be between 1 and 10000")
    args.names = list(dict.fromkeys(names))
    return args


def _machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def _versions() -> dict[str, str]:
    out = {}
    for exe, argv in (
        ("iperf3", ["iperf3", "--version"]),
        ("wireguard-go", ["wireguard-go", "--version"]),
        ("openvpn", ["openvpn", "--version"]),
    ):
        if shutil.which(exe):
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
            out[exe] = (
                (proc.stdout or proc.stderr).strip().splitlines()[0]
                if (proc.stdout or proc.stderr).strip()
                else "?"
            )
    return out


def _run_contenders(
    bench: Bench,
    contenders: Sequence[Contender],
    args: Any,
    results: dict[str, dict[str, Any]],
    log: Callable[[str], None],
) -> bool:
    """Bring every contender up side by side (distinct addresses and ports), measure their
    idle RTT and then their throughput, both interleaved (one contender measured at a time
    while the others sit idle); take them all down however it ends. Fills ``results``;
    returns whether one failed."""
    failed = False
    running: dict[str, tuple[Contender, Endpoints]] = {}
    errors = (BenchError, netns.CommandFailed, subprocess.TimeoutExpired, OSError)
    try:
        for contender in contenders:
            log(f"== {contender.name}: {contender.description}")
            missing = contender.missing()
            if missing:
                reason = f"skipped: {', '.join(missing)} not installed"
                log(f"  {reason}")
                results[contender.name] = {"status": reason}
                continue
            try:
                ep = contender.start(bench)
            except errors as exc:
                failed = True
                log(f"  FAILED: {exc}")
                results[contender.name] = {"status": "failed", "reason": str(exc)[-4000:]}
                contender.stop(bench)
                continue
            running[contender.name] = (contender, ep)
            log(f"  up: {ep.addr_b} (B) -> {ep.addr_a} (A); pids A {ep.pids_a}, B {ep.pids_b}")
        if not running:
            return failed
        log(
            f"== ping RTT without load: {args.pings} pings 0.05 s apart to each, in rounds "
            f"of {PING_ROUND}, contenders taking turns"
        )
        rtts = measure_rtt(bench, running, args.pings, log)
        for name, rtt in rtts.items():
            if isinstance(rtt, BenchError):
                failed = True
                results[name] = {"status": "failed", "reason": f"ping: {rtt}"}
        measured = {name: running[name] for name in running if name not in results}
        if not measured:
            return failed
        log(
            "== TCP goodput and CPU: figure by figure, the contenders taking turns (the "
            "others idle meanwhile)"
        )
        try:
            throughputs = measure_throughput(bench, measured, seconds=args.seconds, log=log)
        except errors as exc:
            log(f"  FAILED: {exc}")
            throughputs = {name: BenchError(str(exc)) for name in measured}
        for name, outcome in throughputs.items():
            if isinstance(outcome, BenchError):
                failed = True
                results[name] = {"status": "failed", "reason": str(outcome)[-4000:]}
                continue
            contender = measured[name][0]
            rtt = rtts[name]
            assert not isinstance(rtt, BenchError)
            outcome["metrics"] = {"rtt_ms": rtt["avg_ms"], **outcome["metrics"]}
            outcome["runs"]["ping"] = rtt
            try:
                outcome["extra"] = contender.extra(bench)
            except errors as exc:
                outcome["extra"] = {"error": str(exc)[-1000:]}
            outcome["status"] = "ok"
            outcome["description"] = contender.description
            results[name] = outcome
    finally:
        for contender, _ in reversed(list(running.values())):
            contender.stop(bench)
    return failed


def main(argv: Sequence[str], repo: Path) -> int:
    """``scripts/bench``: returns the exit code (0 when every requested contender that could
    run was measured, 1 if one failed, 2 on bad usage)."""
    args = _parse_args(argv)

    def log(text: str) -> None:
        # A closed pipe (`scripts/bench | head`) must not abort a run half-way.
        with contextlib.suppress(BrokenPipeError):
            print(text, flush=True)

    if os.geteuid() != 0:
        log("scripts/bench: needs root for network namespaces and TUN devices: sudo scripts/bench")
        return 1
    if not Path("/dev/net/tun").exists():
        log("scripts/bench: /dev/net/tun is missing (modprobe tun)")
        return 1
    reap_own_leftovers(log)
    contenders = [CONTENDERS[name]() for name in args.names]
    needed = {"ping", "iperf3"} | {exe for c in contenders for exe in c.needs}
    _install_missing(needed, log)

    started = datetime.datetime.now(datetime.UTC).astimezone()
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "seconds": args.seconds,
            "pings": args.pings,
            "underlay": f"veth, MTU {UNDERLAY_MTU}",
            "contenders": args.names,
        },
        "results": {},
    }
    results: dict[str, dict[str, Any]] = report["results"]
    failed = False
    with _signals_unwind():
        try:
            log(
                f"== namespaces joined by a veth (MTU {UNDERLAY_MTU}): "
                f"{UNDERLAY_A} <-> {UNDERLAY_B}"
            )
            with Bench(log) as bench:
                log(f"   {bench.a.name} (server side A), {bench.b.name} (client side B)")
                failed = _run_contenders(bench, contenders, args, results, log)
        except (KeyboardInterrupt, Interrupted):
            log("interrupted: cleaning up")
            return 130
    report["machine"]["loadavg_after"] = os.getloadavg()
    report["ratios_to_wireguard_go"] = ratios(results)
    report["headline"] = headline(results)
    shown = list(args.names)
    log("")
    log(
        f"Results ({started:%Y-%m-%d %H:%M %Z}, {report['machine']['cores']} cores, "
        f"load {report['machine']['loadavg'][0]:.2f} before / "
        f"{report['machine']['loadavg_after'][0]:.2f} after; iperf3 {args.seconds:g} s "
        f"per figure):"
    )
    log(format_table(results, shown))
    log("")
    log(report["headline"])
    path = args.json or repo / "bench-results" / f"bench-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"JSON: {path}")
    return 1 if failed else 0
