"""What a second server worker would buy: ``scripts/loadgen --cores``.

Two real ``tunnel client`` processes (namespaces B1 and B2) send iperf3 TCP at full speed to
the server side (namespace A) at the same time, in two layouts measured one after the other
in the same world:

- **one worker**: one ``tunnel server`` carries both clients;
- **two workers**: two ``tunnel server`` processes side by side (their own port, pool and TUN
  device), one client each: what SO_REUSEPORT workers steering by connection ID would be at
  best, with no cost for the steering and nothing shared between them.

Both run on the same cores as the clients, the iperf3 processes and the kernel's forwarding,
as any server and its load do here. The figures: aggregate goodput, and the CPU the server
side and the client side used.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import Bench, Proc, cpu_seconds, runqueue_wait_seconds, spawn_ready
from tests.support import netns

SERVER_SIDE = ("10.94.1.1", "10.94.2.1")  # A's end of the link to B1 and to B2
CLIENT_SIDE = ("10.94.1.2", "10.94.2.2")
POOLS = ("10.81.0", "10.82.0")  # one pool per worker in the two-worker layout
PORTS = (4433, 4434)
IPERF_PORTS = (5301, 5302)


class CoresBench(Bench):
    """A (the server side) joined to B1 (``b``) and to B2 (``s``)."""

    def _build(self) -> None:
        self.ns_a = self._stack.enter_context(netns.netns("bencha"))
        self.ns_b = self._stack.enter_context(netns.netns("benchb"))
        self.ns_s = self._stack.enter_context(netns.netns("benchs"))
        for ns, server, client, name in zip(
            (self.ns_b, self.ns_s), SERVER_SIDE, CLIENT_SIDE, ("1", "2"), strict=True
        ):
            netns.veth(self.ns_a, ns, f"{server}/24", f"{client}/24",
                       name_a=f"cores-{name}", name_b="cores")  # fmt: skip


def _tunnel(bench: Bench, *args: str) -> str:
    return bench.run(None, [sys.executable, "-m", "tunnel", *args]).stdout


def _daemon(bench: Bench, ns: netns.Netns, role: str, config: Path, name: str) -> Proc:
    """``tunnel server`` or ``tunnel client`` with ``config`` in ``ns``, once it is ready."""
    return spawn_ready(
        bench, ns, [sys.executable, "-m", "tunnel", role, "--config", str(config)], name
    )


def _layout(bench: CoresBench, workers: int, seconds: float, round_: int) -> dict[str, Any]:
    """Bring up ``workers`` servers and the two clients, run both flows at once, take it all
    down; the figures."""
    work = bench.workdir / f"round{round_}"
    work.mkdir()
    token = _tunnel(bench, "token").split()[-1]
    servers, clients = [], []
    ids = []
    for index in range(workers):
        key = work / f"server{index}.key"
        ids.append(_tunnel(bench, "keygen", "--out", str(key)).split()[-1])
        (work / f"server{index}.toml").write_text(
            harness._toml(
                listen=f"0.0.0.0:{PORTS[index]}",
                key_file=key,
                network=f"{POOLS[index]}.0/24",
                auth_tokens=[token],
                mtu=harness.TUNNEL_MTU,
                tun_name=f"tnc{os.getpid()}s{index}",
                control_socket=work / f"server{index}.sock",
                state_dir=work / f"server{index}-state",
            )
        )
        servers.append(_daemon(bench, bench.a, "server", work / f"server{index}.toml",
                               f"r{round_}-server{index}"))  # fmt: skip
    client_ns = (bench.b, bench.s)
    targets = []
    for index, ns in enumerate(client_ns):
        worker = index % workers
        (work / f"client{index}.toml").write_text(
            harness._toml(
                server=f"{SERVER_SIDE[index]}:{PORTS[worker]}",
                server_id=ids[worker],
                auth_token=token,
                mtu=harness.TUNNEL_MTU,
                tun_name=f"tnc{os.getpid()}c{index}",
                control_socket=work / f"client{index}.sock",
                state_dir=work / f"client{index}-state",
            )
        )
        clients.append(_daemon(bench, ns, "client", work / f"client{index}.toml",
                               f"r{round_}-client{index}"))  # fmt: skip
        target = f"{POOLS[worker]}.1"
        targets.append(target)
        harness._wait_reachable(bench, ns, target, [*servers, *clients])
    iperf_servers = [
        bench.spawn(bench.a, ["iperf3", "-s", "-p", str(port)], f"r{round_}-iperf{port}")
        for port in IPERF_PORTS
    ]
    time.sleep(0.5)  # both iperf3 servers listening (they print nothing a script could wait on)
    cpu_server = sum(cpu_seconds(p.pid) for p in servers)
    cpu_client = sum(cpu_seconds(p.pid) for p in clients)
    wait_server = sum(runqueue_wait_seconds(p.pid) for p in servers)
    flows = [
        bench.spawn(
            ns,
            ["iperf3", "-c", target, "-p", str(port), "-t", f"{seconds:g}", "-J",
             "--connect-timeout", "3000"],
            f"r{round_}-flow{index}",
        )
        for index, (ns, target, port) in enumerate(zip(client_ns, targets, IPERF_PORTS,
                                                       strict=True))
    ]  # fmt: skip
    began = time.monotonic()
    for flow in flows:
        flow.popen.wait(seconds + 30)
    took = time.monotonic() - began
    cpu_server = sum(cpu_seconds(p.pid) for p in servers) - cpu_server
    cpu_client = sum(cpu_seconds(p.pid) for p in clients) - cpu_client
    wait_server = sum(runqueue_wait_seconds(p.pid) for p in servers) - wait_server
    goodputs = [
        round(harness.parse_iperf3(flow.log_path.read_text(errors="replace"))["mbit_s"], 1)
        for flow in flows
    ]
    for proc in [*flows, *iperf_servers, *clients, *servers]:
        bench.stop(proc)
    return {
        "workers": workers,
        "flows_mbit_s": goodputs,
        "aggregate_mbit_s": round(sum(goodputs), 1),
        "server_cpu_percent": round(100 * cpu_server / took, 1),
        "clients_cpu_percent": round(100 * cpu_client / took, 1),
        # runnable but waiting for a CPU: the machine, not the server, set the pace
        "server_waiting_for_cpu_percent": round(100 * wait_server / took, 1),
    }


def measure_cores(seconds: float, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Both layouts, one worker first, in one world; each twice, alternating."""
    results = []
    with CoresBench(log) as bench:
        for round_, workers in enumerate((1, 2, 1, 2)):
            result = _layout(bench, workers, seconds, round_)
            flows = " + ".join(str(g) for g in result["flows_mbit_s"])
            log(f"  {workers} worker(s): {result['aggregate_mbit_s']} Mbit/s ({flows}), "
                f"server side {result['server_cpu_percent']} % CPU, "
                f"waiting for a CPU {result['server_waiting_for_cpu_percent']} %, "
                f"clients {result['clients_cpu_percent']} %")  # fmt: skip
            results.append(result)
    return results
