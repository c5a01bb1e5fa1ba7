"""The load generator behind ``scripts/loadgen``: how one ``tunnel server`` holds up under
hundreds or thousands of clients.

For each size N the harness builds a fresh world of three namespaces:

- A, the server: a real ``tunnel server`` (one process, pool 10.80.0.0/20);
- B, the witness: a real ``tunnel client`` with a kernel TUN device, whose ping and iperf3
  through the tunnel show what one ordinary user sees while the others come and go;
- S, the load: one :mod:`bench.loadgen_worker` process holding N real client sessions, each
  with its own identity and UDP socket, spread over :data:`LOAD_SOURCES` source addresses
  (a crowd of clients behind one address is limited to 16 handshakes at a time, by design).

and measures, in this order:

1. the witness alone: goodput (iperf3, one flow, B to A) and idle RTT;
2. the storm: all N clients start at once; each one's connect time (p50/p99/max), the
   attempts and Retries it took, the server's CPU meanwhile, and the witness's ping RTT
   (every 0.2 s) all through the storm; the witness session must survive it;
3. correctness: the server lists N+1 sessions, every client once, every address once;
4. idle: the server's RSS per session (against before the storm) and its CPU over
   ``--idle-seconds`` with everyone sending only heartbeats;
5. the witness again, with N idle sessions around it: goodput and RTT;
6. data: one ICMP echo through every session to the server's tunnel address;
7. the close: every client closes, and the time until the server lists only the witness.

It prints a table and writes JSON (default ``bench-results/loadgen-<timestamp>.json``).
Everything it creates is removed however it ends (see :class:`bench.harness.Bench`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import harness
from bench.cores import measure_cores
from bench.harness import Bench, BenchError, Proc, cpu_seconds, spawn_ready
from bench.loadgen_worker import TRAFFIC_PORT
from tests.support import netns

SERVER_UNDERLAY = "10.96.0.1"  # A's end of the link to the load namespace (a /16)
LOAD_SOURCES = 64  # source addresses of the simulated clients: 10.96.1.1 ...
WITNESS_SERVER, WITNESS_CLIENT = "10.95.0.1", "10.95.0.2"  # the A-B link
PORT = 4433
POOL = "10.80.0.0/20"
SERVER_TUNNEL_IP = "10.80.0.1"
STORM_PING_INTERVAL = 0.2
SETTLE_S = 3.0  # after the storm, before memory is read: the last handshakes' garbage goes
REPLY_TIMEOUT_S = 240.0
CLOSE_TIMEOUT_S = 60.0
_TIME_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


class LoadBench(Bench):
    """The three namespaces: A (server) joined to B (witness) and to S (the load)."""

    def _build(self) -> None:
        self.ns_a = self._stack.enter_context(netns.netns("bencha"))
        self.ns_b = self._stack.enter_context(netns.netns("benchb"))
        self.ns_s = self._stack.enter_context(netns.netns("benchs"))
        netns.veth(self.ns_a, self.ns_b, f"{WITNESS_SERVER}/24", f"{WITNESS_CLIENT}/24",
                   name_a="load-w", name_b="load-w")  # fmt: skip
        netns.veth(self.ns_a, self.ns_s, f"{SERVER_UNDERLAY}/16", load_sources(LOAD_SOURCES),
                   name_a="load-s", name_b="load-s")  # fmt: skip


def load_sources(count: int) -> list[str]:
    """The source addresses of the load namespace, as CIDRs on the /16 of the server's link."""
    return [f"10.96.{1 + i // 250}.{1 + i % 250}/16" for i in range(count)]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def parse_ping_lines(text: str) -> dict[str, Any]:
    """RTTs and loss from ``ping`` output line by line (the summary is missing when ping is
    stopped by a signal before it prints one)."""
    seen: dict[int, float] = {}
    for match in _TIME_RE.finditer(text):
        seen[int(match.group(1))] = float(match.group(2))
    sent = max(seen, default=0)
    transmitted = re.search(r"(\d+) packets transmitted", text)
    if transmitted:
        sent = int(transmitted.group(1))
    times = list(seen.values())
    return {
        "sent": sent,
        "answered": len(times),
        "rtt_p50_ms": percentile(times, 0.5),
        "rtt_p99_ms": percentile(times, 0.99),
        "rtt_max_ms": max(times, default=None),
    }


class _Pinger:
    result: dict[str, Any]


@contextlib.contextmanager
def pinging(bench: Bench, name: str) -> Iterator[_Pinger]:
    """The witness pings the server's tunnel address every :data:`STORM_PING_INTERVAL` while
    the block runs; the RTTs and loss are in the yielded object's ``result`` after it."""
    log_path = bench.workdir / f"{name}-ping.log"
    pinger = _Pinger()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            netns.exec_argv(bench.b, ["ping", "-n", "-i", str(STORM_PING_INTERVAL), "-W", "2",
                                      SERVER_TUNNEL_IP]),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=harness._die_with_parent,
        )  # fmt: skip
    try:
        yield pinger
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    pinger.result = parse_ping_lines(log_path.read_text(errors="replace"))


def link_counters(bench: Bench, ns: netns.Netns, device: str) -> dict[str, int]:
    """The kernel's packet and byte counters of one interface."""
    (link,) = netns.ip_json(ns, "-s", "link", "show", "dev", device)
    stats = link["stats64"]
    return {
        "rx_packets": stats["rx"]["packets"],
        "rx_bytes": stats["rx"]["bytes"],
        "tx_packets": stats["tx"]["packets"],
        "tx_bytes": stats["tx"]["bytes"],
    }


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


class Worker:
    """The load process in S, driven by JSON lines."""

    def __init__(self, bench: Bench, setup: dict[str, Any], repo: Path) -> None:
        log_path = bench.workdir / "loadgen-worker.log"
        env = {**os.environ, "PYTHONPATH": str(repo)}
        with open(log_path, "wb") as err:
            popen = subprocess.Popen(
                netns.exec_argv(
                    bench.s, [sys.executable, "-m", "bench.loadgen_worker", json.dumps(setup)]
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                preexec_fn=harness._die_with_parent,
                start_new_session=True,
            )
        self.proc = Proc("loadgen-worker", popen, log_path)
        bench.procs.append(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, command: dict[str, Any], timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        popen = self.proc.popen
        assert popen.stdin is not None and popen.stdout is not None
        popen.stdin.write((json.dumps(command) + "\n").encode())
        popen.stdin.flush()
        import select

        readable, _, _ = select.select([popen.stdout], [], [], timeout)
        line = popen.stdout.readline() if readable else b""
        if not line:
            raise BenchError(
                f"the load worker did not answer {command['cmd']!r} "
                f"(exit {popen.poll()}):\n{self.proc.log_tail()}"
            )
        reply: dict[str, Any] = json.loads(line)
        if reply.get("event") == "error":
            raise BenchError(f"load worker: {reply.get('error')}")
        return reply


def _tunnel(bench: Bench, *args: str) -> str:
    return bench.run(None, [sys.executable, "-m", "tunnel", *args]).stdout


def _status(bench: Bench, name: str) -> dict[str, Any]:
    out = bench.run(
        None,
        [sys.executable, "-m", "tunnel", "status", "--json", "--socket",
         str(bench.workdir / f"{name}.sock")],
        timeout=30,
    ).stdout  # fmt: skip
    status: dict[str, Any] = json.loads(out)
    return status


def _start_tunnel(bench: Bench, clients: int) -> dict[str, Any]:
    """``tunnel server`` in A and the witness ``tunnel client`` in B; returns what the load
    needs to reach the server (its address, identity, token) and the two pids."""
    work = bench.workdir
    server_key, witness_key = work / "server.key", work / "witness.key"
    server_id = _tunnel(bench, "keygen", "--out", str(server_key)).split()[-1]
    _tunnel(bench, "keygen", "--out", str(witness_key))
    token = _tunnel(bench, "token").split()[-1]
    pid = os.getpid()
    (work / "server.toml").write_text(
        harness._toml(
            listen=f"0.0.0.0:{PORT}",
            key_file=server_key,
            network=POOL,
            auth_tokens=[token],
            mtu=harness.TUNNEL_MTU,
            max_clients=clients + 16,
            tun_name=f"tnl{pid}s",
            control_socket=work / "server.sock",
            state_dir=work / "server-state",
        )
    )
    (work / "witness.toml").write_text(
        harness._toml(
            server=f"{WITNESS_SERVER}:{PORT}",
            server_id=server_id,
            auth_token=token,
            key_file=witness_key,
            mtu=harness.TUNNEL_MTU,
            tun_name=f"tnl{pid}w",
            control_socket=work / "witness.sock",
            state_dir=work / "witness-state",
        )
    )
    server = spawn_ready(
        bench, bench.a,
        [sys.executable, "-m", "tunnel", "server", "--config", str(work / "server.toml")],
        "tunnel-server",
    )  # fmt: skip
    witness = spawn_ready(
        bench, bench.b,
        [sys.executable, "-m", "tunnel", "client", "--config", str(work / "witness.toml")],
        "tunnel-witness",
    )  # fmt: skip
    harness._wait_reachable(bench, bench.b, SERVER_TUNNEL_IP, [server, witness])
    return {
        "server_id": server_id,
        "token": token,
        "server_pid": server.pid,
        "witness_pid": witness.pid,
        "procs": [server, witness],
    }


def _goodput(bench: Bench, seconds: float) -> float:
    """One iperf3 TCP flow from the witness to the server's tunnel address, Mbit/s. Tried
    again when the server is not listening yet or still busy with the previous run."""
    for attempt in range(5):
        proc = bench.run(
            bench.b,
            ["iperf3", "-c", SERVER_TUNNEL_IP, "-p", str(harness.IPERF_PORT), "-t",
             f"{seconds:g}", "-J", "--connect-timeout", "3000"],
            check=False,
            timeout=seconds + 30,
        )  # fmt: skip
        try:
            return round(harness.parse_iperf3(proc.stdout)["mbit_s"], 1)
        except BenchError as exc:
            if attempt == 4 or not ("busy" in str(exc) or "refused" in str(exc)):
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _idle_rtt(bench: Bench) -> dict[str, Any]:
    proc = bench.run(
        bench.b,
        ["ping", "-n", "-c", "40", "-i", "0.05", "-W", "1", SERVER_TUNNEL_IP],
        check=False,
        timeout=30,
    )
    return parse_ping_lines(proc.stdout)


def _sessions_check(status: dict[str, Any], expected: int) -> dict[str, Any]:
    """Does the server list exactly the sessions it should, each client and address once?"""
    sessions = status.get("sessions") or []
    owners = [(s.get("client_id"), s.get("device_id")) for s in sessions]
    addresses = [a for s in sessions for a in s.get("addresses", [])]
    return {
        "listed": len(sessions),
        "expected": expected,
        "duplicate_owners": len(owners) - len(set(owners)),
        "duplicate_addresses": len(addresses) - len(set(addresses)),
        "ok": len(sessions) == expected
        and len(owners) == len(set(owners))
        and len(addresses) == len(set(addresses)),
    }


def measure_size(
    bench: LoadBench, clients: int, args: Any, repo: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Everything the module docstring lists, for one size."""
    result: dict[str, Any] = {"clients": clients}
    up = _start_tunnel(bench, clients)
    server_pid = up["server_pid"]
    bench.spawn(bench.a, ["iperf3", "-s", "-B", SERVER_TUNNEL_IP, "-p", str(harness.IPERF_PORT)],
                "iperf3-server")  # fmt: skip
    result["alone"] = {"goodput_mbps": _goodput(bench, args.seconds), **_idle_rtt(bench)}
    log(f"  witness alone: {result['alone']['goodput_mbps']} Mbit/s, "
        f"RTT p50 {result['alone']['rtt_p50_ms']} ms")  # fmt: skip

    worker = Worker(
        bench,
        {
            "server": f"{SERVER_UNDERLAY}:{PORT}",
            "server_id": up["server_id"],
            "token": up["token"],
            "sources": [cidr.split("/")[0] for cidr in load_sources(LOAD_SOURCES)],
            "heartbeat_interval": args.heartbeat,
        },
        repo,
    )
    rss_before = rss_kib(server_pid)
    cpu_before = cpu_seconds(server_pid)
    with pinging(bench, "storm") as storm_ping:
        time.sleep(0.5)  # a few pings before the storm
        storm_began = time.monotonic()
        storm = worker.ask({"cmd": "connect", "count": clients})
        storm_wall = time.monotonic() - storm_began
        time.sleep(1.0)  # and a few after
    storm_cpu = cpu_seconds(server_pid) - cpu_before
    times = storm["connect_seconds"]
    attempts = storm["attempts"]
    server_status = _status(bench, "server")
    witness_status = _status(bench, "witness")
    witness_session = (witness_status.get("sessions") or [{}])[0]
    result["storm"] = {
        "up": storm["up"],
        "seconds": round(storm_wall, 2),
        "connect_p50_s": percentile(times, 0.5),
        "connect_p99_s": percentile(times, 0.99),
        "connect_max_s": max(times, default=None),
        "attempts_max": max(attempts, default=0),
        "clients_retrying": sum(1 for a in attempts if a > 1),
        "failures": storm["failures"],
        "retries_sent": server_status.get("retries_sent"),
        "server_cpu_s": round(storm_cpu, 2),
        "handshakes_per_server_cpu_s": round(clients / storm_cpu, 1) if storm_cpu else None,
        "drops": {k: v for k, v in (server_status.get("drops") or {}).items() if v},
        "witness_ping": storm_ping.result,
        "witness_state": witness_status.get("state"),
        "witness_reconnects": witness_status.get("reconnects"),
        "witness_uptime_s": witness_session.get("uptime"),
        "witness_rebinds": witness_session.get("rebinds"),
    }
    s = result["storm"]
    log(f"  storm: {s['up']}/{clients} up in {s['seconds']} s (connect p50 {s['connect_p50_s']} "
        f"p99 {s['connect_p99_s']} max {s['connect_max_s']} s), server CPU {s['server_cpu_s']} s, "
        f"witness ping p99 {s['witness_ping']['rtt_p99_ms']} ms "
        f"({s['witness_ping']['answered']}/{s['witness_ping']['sent']})")  # fmt: skip
    result["sessions"] = _sessions_check(server_status, clients + 1)

    time.sleep(SETTLE_S)
    rss_after = rss_kib(server_pid)
    cpu0, worker_cpu0 = cpu_seconds(server_pid), cpu_seconds(worker.pid)
    wire0 = link_counters(bench, bench.a, "load-s")
    time.sleep(args.idle_seconds)
    idle_cpu = cpu_seconds(server_pid) - cpu0
    worker_cpu = cpu_seconds(worker.pid) - worker_cpu0
    wire1 = link_counters(bench, bench.a, "load-s")
    per_session_s = clients * args.idle_seconds
    result["idle"] = {
        "server_rss_before_kib": rss_before,
        "server_rss_after_kib": rss_after,
        "kib_per_session": round((rss_after - rss_before) / clients, 1) if clients else None,
        "seconds": args.idle_seconds,
        "heartbeat_interval_s": args.heartbeat,
        "server_cpu_percent": round(100 * idle_cpu / args.idle_seconds, 2),
        "server_us_per_session_s": round(1e6 * idle_cpu / args.idle_seconds / clients, 2)
        if clients
        else None,
        "load_cpu_percent": round(100 * worker_cpu / args.idle_seconds, 2),
        "datagrams_in_per_session_s": round(
            (wire1["rx_packets"] - wire0["rx_packets"]) / per_session_s, 3),
        "datagrams_out_per_session_s": round(
            (wire1["tx_packets"] - wire0["tx_packets"]) / per_session_s, 3),
    }  # fmt: skip
    i = result["idle"]
    log(f"  idle: {i['kib_per_session']} KiB/session, server {i['server_cpu_percent']} % of a "
        f"core ({i['server_us_per_session_s']} us per session per second)")  # fmt: skip

    result["loaded"] = {"goodput_mbps": _goodput(bench, args.seconds), **_idle_rtt(bench)}
    log(f"  witness among {clients}: {result['loaded']['goodput_mbps']} Mbit/s, "
        f"RTT p50 {result['loaded']['rtt_p50_ms']} ms")  # fmt: skip
    result["active"] = measure_active(bench, worker, server_pid, min(args.active, clients), args)
    a = result["active"]
    log(f"  {a['clients']} active: server took {a['server_mbit_s']} Mbit/s "
        f"({a['server_pps']} packets/s), witness ping p50 {a['witness_ping']['rtt_p50_ms']} "
        f"p99 {a['witness_ping']['rtt_p99_ms']} ms")  # fmt: skip
    result["echo"] = worker.ask({"cmd": "echo"})
    result["load_stats"] = worker.ask({"cmd": "stats"})
    log(f"  echo: {result['echo']['answered']}/{result['echo']['sent']} answered; "
        f"lost sessions: {result['load_stats']['lost'] or 'none'}")  # fmt: skip

    began = time.monotonic()
    worker.ask({"cmd": "close"})
    deadline = began + CLOSE_TIMEOUT_S
    while True:
        listed = len(_status(bench, "server").get("sessions") or [])
        if listed <= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    result["close"] = {
        "seconds_to_one": round(time.monotonic() - began, 2),
        "listed_after": listed,
        "server_rss_after_close_kib": rss_kib(server_pid),
    }
    log(f"  close: {listed} listed after {result['close']['seconds_to_one']} s")
    return result


# Takes the active clients' packets and never reads them: the kernel drops them when its small
# buffer is full, without the "port unreachable" it would send for a port nobody holds.
_UDP_SINK = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.bind(("{address}", {port}))
time.sleep(1e9)
"""


def start_udp_sink(bench: LoadBench) -> None:
    """The sink of the active phase, in A; returns once it is bound."""
    code = _UDP_SINK.format(address=SERVER_TUNNEL_IP, port=TRAFFIC_PORT)
    sink = bench.spawn(bench.a, [sys.executable, "-c", code], "udp-sink")

    def bound() -> bool:
        out = bench.run(bench.a, ["ss", "-Hunl", f"sport = :{TRAFFIC_PORT}"], check=False)
        return SERVER_TUNNEL_IP in out.stdout

    harness._wait_for(bound, 10, "the UDP sink to bind", [sink])


def measure_active(
    bench: LoadBench, worker: Worker, server_pid: int, active: int, args: Any
) -> dict[str, Any]:
    """``active`` load clients send as fast as they can while the witness pings: what the
    server takes from them into its TUN device (the kernel's count), and the witness's RTT."""
    start_udp_sink(bench)
    tun = f"tnl{os.getpid()}s"
    before = link_counters(bench, bench.a, tun)
    cpu0 = cpu_seconds(server_pid)
    with pinging(bench, "active") as ping:
        began = time.monotonic()
        offered = worker.ask({"cmd": "traffic", "clients": active, "seconds": args.seconds},
                             timeout=args.seconds + 60)  # fmt: skip
        took = time.monotonic() - began
    after = link_counters(bench, bench.a, tun)
    cpu = cpu_seconds(server_pid) - cpu0
    delivered = after["rx_bytes"] - before["rx_bytes"]
    return {
        "clients": offered["clients"],
        "seconds": round(took, 2),
        "offered_packets": offered["offered_packets"],
        "dropped_at_sender": offered["queue_full"],
        "server_packets": after["rx_packets"] - before["rx_packets"],
        "server_mbit_s": round(delivered * 8 / took / 1e6, 1),
        "server_pps": round((after["rx_packets"] - before["rx_packets"]) / took),
        "server_cpu_percent": round(100 * cpu / took, 1),
        "witness_ping": ping.result,
    }


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per measured quantity, one column per size."""
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("clients up", lambda r: f"{r['storm']['up']}/{r['clients']}"),
        ("storm: all up (s)", lambda r: _cell(r["storm"]["seconds"])),
        ("connect p50 / p99 (s)",
         lambda r: f"{_cell(r['storm']['connect_p50_s'], '{:.2f}')} / "
                   f"{_cell(r['storm']['connect_p99_s'], '{:.2f}')}"),
        ("handshakes per server CPU s", lambda r: _cell(r["storm"]["handshakes_per_server_cpu_s"])),
        ("Retries sent", lambda r: _cell(r["storm"]["retries_sent"])),
        ("clients that retried", lambda r: _cell(r["storm"]["clients_retrying"])),
        ("witness RTT in storm p50/p99/max (ms)",
         lambda r: "{} / {} / {}".format(*(
             _cell(r["storm"]["witness_ping"][k], "{:.1f}")
             for k in ("rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms")))),
        ("witness pings answered in storm",
         lambda r: "{answered}/{sent}".format(**r["storm"]["witness_ping"])),
        ("sessions listed, no duplicates",
         lambda r: f"{r['sessions']['listed']} {'ok' if r['sessions']['ok'] else 'WRONG'}"),
        ("server RSS per idle session (KiB)", lambda r: _cell(r["idle"]["kib_per_session"])),
        ("server CPU, all idle (% of a core)", lambda r: _cell(r["idle"]["server_cpu_percent"])),
        ("  per session (us/s)", lambda r: _cell(r["idle"]["server_us_per_session_s"])),
        ("  datagrams per session per s in/out",
         lambda r: f"{r['idle']['datagrams_in_per_session_s']} / "
                   f"{r['idle']['datagrams_out_per_session_s']}"),
        ("witness goodput alone / loaded (Mbit/s)",
         lambda r: f"{r['alone']['goodput_mbps']} / {r['loaded']['goodput_mbps']}"),
        ("witness RTT p50 alone / loaded (ms)",
         lambda r: f"{_cell(r['alone']['rtt_p50_ms'])} / {_cell(r['loaded']['rtt_p50_ms'])}"),
        ("active clients: server takes (Mbit/s)",
         lambda r: f"{r['active']['clients']}: {r['active']['server_mbit_s']}"),
        ("witness RTT among active p50/p99 (ms)",
         lambda r: f"{_cell(r['active']['witness_ping']['rtt_p50_ms'])} / "
                   f"{_cell(r['active']['witness_ping']['rtt_p99_ms'])}"),
        ("echo through every session (1st try)",
         lambda r: f"{r['echo']['answered']}/{r['echo']['sent']} "
                   f"({r['echo'].get('answered_first_try', '-')})"),
        ("close: until 1 listed (s)", lambda r: _cell(r["close"]["seconds_to_one"])),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    header = f"{'':{width}}  " + "  ".join(f"{r['clients']:>18}" for r in results)
    lines = [header]
    for name, cell in rows:
        lines.append(f"{name:{width}}  " + "  ".join(f"{cell(r):>18}" for r in results))
    return "\n".join(lines)


def _parse_args(argv: Sequence[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="scripts/loadgen",
        description="Hundreds or thousands of real client sessions against one tunnel server "
        "in network namespaces: storm, idle cost, a witness's view, close (needs root).",
    )
    parser.add_argument("--clients", default="100,300,1000",
                        help="comma-separated sizes to measure, each in a fresh world "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="window for the idle CPU figure (default: %(default)s)")  # fmt: skip
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="heartbeat interval of the simulated clients, s (default: "
                        "%(default)s, the client's default)")  # fmt: skip
    parser.add_argument("--active", type=int, default=50,
                        help="clients that send at full speed in the active phase "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="length of each iperf3 run of the witness (default: %(default)s)",
    )
    parser.add_argument("--cores", action="store_true",
                        help="instead: what a second server worker buys (two clients at full "
                        "speed, one server vs two; see bench/cores.py)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", type=Path,
                        help="where to write the results (default: "
                        "bench-results/loadgen-<timestamp>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(part) for part in args.clients.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--clients: {args.clients!r} is not a comma-separated list of integers")
    if not args.sizes or any(n < 1 for n in args.sizes):
        parser.error("--clients: every size must be at least 1")
    if args.idle_seconds <= 0 or args.heartbeat <= 0 or args.seconds <= 0 or args.active < 1:
        parser.error("--idle-seconds, --heartbeat, --seconds and --active must be positive")
    return args


def main(argv: Sequence[str], repo: Path) -> int:
    args = _parse_args(argv)

    def log(text: str) -> None:
        print(text, flush=True)

    if os.geteuid() != 0:
        log("scripts/loadgen: needs root (network namespaces)")
        return 2
    harness.reap_own_leftovers(log)
    harness._install_missing({"iperf3"}, log)
    started = datetime.datetime.now().astimezone()
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": harness._machine(),
        "settings": {
            "sizes": args.sizes,
            "idle_seconds": args.idle_seconds,
            "heartbeat_interval": args.heartbeat,
            "load_sources": LOAD_SOURCES,
        },
        "results": [],
    }
    failed = False
    with harness._signals_unwind():
        try:
            if args.cores:
                log("== one server worker vs two, two clients at full speed")
                report["cores"] = measure_cores(args.seconds, log)
            for clients in [] if args.cores else args.sizes:
                log(f"== {clients} clients")
                try:
                    with LoadBench(log) as bench:
                        report["results"].append(measure_size(bench, clients, args, repo, log))
                except (BenchError, netns.CommandFailed, subprocess.TimeoutExpired, OSError) as exc:
                    failed = True
                    log(f"  FAILED: {exc}")
                    report.setdefault("failures", {})[str(clients)] = str(exc)[-4000:]
        except (KeyboardInterrupt, harness.Interrupted):
            log("interrupted: cleaning up")
            return 130
    report["machine"]["loadavg_after"] = os.getloadavg()
    if report["results"]:
        log("")
        log(f"Results ({started:%Y-%m-%d %H:%M %Z}, {report['machine']['cores']} cores, "
            f"heartbeat every {args.heartbeat:g} s):")  # fmt: skip
        log(format_table(report["results"]))
    path = args.json or repo / "bench-results" / f"loadgen-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"JSON: {path}")
    return 1 if failed else 0
