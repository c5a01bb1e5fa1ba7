"""The client side of ``scripts/loadgen``: one process holding many real client sessions.

Run inside the load namespace by :mod:`bench.loadgen` as ``python -m bench.loadgen_worker
SETUP_JSON``. Each simulated client is a real :class:`~tunnel.daemon.client.session.ClientSession`
with its own Ed25519 identity, its own UDP socket (bound to one of the source addresses it is
given, round-robin) and the real pumps: UDP in, the QUIC timer, the heartbeat and path MTU
discovery. What a simulated client lacks is a kernel TUN device: its "TUN" only counts the
packets the server sends it, so a thousand of them cost no devices, routes or namespaces.

Commands arrive on stdin as JSON lines and each gets one JSON line on stdout:

- ``{"cmd": "connect", "count": N}``: start N clients at once (the storm); answers when every
  one is up or gave up, with each one's connect time and how many attempts it took.
- ``{"cmd": "echo"}``: every connected client sends one ICMP echo through its session to the
  server's tunnel address; answers how many were answered within the wait.
- ``{"cmd": "traffic", "clients": K, "seconds": S}``: K clients send IP/UDP packets (1200
  bytes of payload) to the server's tunnel address as fast as they can for S seconds;
  answers how many packets were handed to the sessions.
- ``{"cmd": "stats"}``: how many are up, how many were lost and why, this process's CPU time.
- ``{"cmd": "close"}``: every client closes its session (CONNECTION_CLOSE) and stops.

Logs go to stderr. EOF on stdin ends the process.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel.config import ClientConfig
from tunnel.core.identity import Identity, decode_public_id
from tunnel.core.ippacket import build_ipv4_udp, internet_checksum
from tunnel.daemon.client.session import ClientSession, SessionServices, TicketSlot
from tunnel.daemon.platform import SYSTEM
from tunnel.daemon.runtime import lone_errors_unwrapped
from tunnel.daemon.session import Drops
from tunnel.daemon.udp import UdpEndpoint
from tunnel.errors import HandshakeTimeout, TunnelError

log = logging.getLogger("loadgen.worker")

HANDSHAKE_TIMEOUT = 10.0  # what a real client waits for one attempt (ClientConfig default)
RETRY_PAUSE = 1.0  # between attempts of one client
CONNECT_DEADLINE = 120.0  # a client still not up after this gives up (and is reported)
ECHO_WAIT = 10.0
ECHO_TRIES = 3
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
TRAFFIC_PAYLOAD = 1200
TRAFFIC_PORT = 9  # discard: the server's kernel takes the packets and drops them
TRAFFIC_BURST = 16  # packets per client per round


def echo_request(source: bytes, destination: bytes, ident: int, seq: int) -> bytes:
    """An IPv4 ICMP echo request with correct checksums (both addresses packed, 4 bytes)."""
    payload = b"loadgen!" * 4
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), ident, 0, 64, 1, 0, source, destination
    )
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + icmp


def is_echo_reply(packet: bytes) -> bool:
    """Is this an IPv4 ICMP echo reply?"""
    if len(packet) < 28 or packet[9] != 1:
        return False
    return packet[(packet[0] & 0x0F) * 4] == ICMP_ECHO_REPLY


class CountingTun:
    """What a simulated client has instead of a TUN device: it counts the echo replies the
    server delivers and never has anything to read."""

    def __init__(self) -> None:
        self.writes = 0
        self.echo_replies = 0
        self.on_echo_reply: Callable[[], None] | None = None

    def write(self, packet: bytes) -> None:
        self.writes += 1
        if is_echo_reply(packet):
            self.echo_replies += 1
            if self.on_echo_reply is not None:
                self.on_echo_reply()

    queue = write  # nothing to merge: counted at once

    def flush(self) -> None:
        pass

    def read_batch(self, limit: int = 64) -> list[bytes]:
        return []


@dataclass
class SimulatedClient:
    """One client of the load: its identity and, once up, its session."""

    index: int
    source: str
    services: SessionServices
    attempts: int = 0
    connect_seconds: float | None = None
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    session: ClientSession | None = None
    tun: CountingTun = field(default_factory=CountingTun)
    assigned: bytes = b""
    server_tunnel_ip: bytes = b""
    lost: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Worker:
    """Every simulated client of this process, and the commands that drive them."""

    def __init__(self, setup: dict[str, Any]) -> None:
        host, port = setup["server"].rsplit(":", 1)
        self.server_addr = (host, int(port))
        self.config = ClientConfig(
            server_host=host,
            server_port=int(port),
            server_id=decode_public_id(setup["server_id"]),
            auth_token=setup["token"],
            heartbeat_interval=float(setup.get("heartbeat_interval", 10.0)),
            heartbeat_timeout=float(setup.get("heartbeat_timeout", 30.0)),
            peer_to_peer=False,
        )
        self.sources: list[str] = setup["sources"]
        self.drops = Drops()
        self.clients: list[SimulatedClient] = []
        self.nursery: trio.Nursery | None = None

    def _new_client(self) -> SimulatedClient:
        index = len(self.clients)
        services = SessionServices(
            config=self.config,
            identity=Identity.generate(),
            device_id=random.getrandbits(63),
            tickets=TicketSlot(),
            drops=self.drops,
            platform=SYSTEM,
        )
        client = SimulatedClient(index, self.sources[index % len(self.sources)], services)
        self.clients.append(client)
        return client

    async def connect(self, count: int) -> dict[str, Any]:
        """The storm: ``count`` new clients at once; returns once each is up or gave up."""
        assert self.nursery is not None
        began = trio.current_time()
        batch = [self._new_client() for _ in range(count)]
        done = trio.Event()
        remaining = [count]

        def one_settled() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

        for client in batch:
            self.nursery.start_soon(self._run_client, client, began, one_settled)
        if count:
            await done.wait()
        up = [c for c in batch if c.connect_seconds is not None]
        failures: collections.Counter[str] = collections.Counter()
        for client in batch:
            failures.update(client.failures)
        return {
            "event": "connected",
            "requested": count,
            "up": len(up),
            "connect_seconds": [round(c.connect_seconds or 0.0, 4) for c in up],
            "attempts": [c.attempts for c in batch],
            "failures": dict(failures),
            "storm_seconds": round(trio.current_time() - began, 3),
        }

    async def _run_client(self, client: SimulatedClient, began: float, settled: Any) -> None:
        with client.scope:
            try:
                while client.session is None:
                    if trio.current_time() - began > CONNECT_DEADLINE:
                        client.failures["gave_up"] += 1
                        return
                    client.attempts += 1
                    try:
                        await self._attempt(client, began, settled)
                    except (TunnelError, OSError) as exc:
                        if client.session is not None:
                            client.lost = type(exc).__name__
                            log.warning("client %d lost: %s", client.index, exc)
                            return
                        client.failures[type(exc).__name__] += 1
                        await trio.sleep(RETRY_PAUSE)
            finally:
                if client.connect_seconds is None:
                    settled()

    async def _attempt(self, client: SimulatedClient, began: float, settled: Any) -> None:
        endpoint = await UdpEndpoint.bind(client.source, 0, key="load", family=socket.AF_INET)
        session = ClientSession(client.services, endpoint, self.server_addr)
        try:
            with lone_errors_unwrapped():
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(session.udp_pump)
                    pumps.start_soon(session.driver.run_timer)
                    try:
                        with trio.fail_after(HANDSHAKE_TIMEOUT):
                            await session.handshake()
                            response = await session.authenticate()
                    except trio.TooSlowError:
                        raise HandshakeTimeout(
                            f"no answer within {HANDSHAKE_TIMEOUT:g} s"
                        ) from None
                    if response is None:
                        await session.wait_ended()  # raises what failed
                        return
                    assert response.assigned_ip is not None and response.server_ip is not None
                    client.assigned = response.assigned_ip.packed
                    client.server_tunnel_ip = response.server_ip.packed
                    session.own_addresses = frozenset({client.assigned})
                    session.tun = client.tun  # type: ignore[assignment]
                    client.session = session
                    client.connect_seconds = trio.current_time() - began
                    settled()
                    pumps.start_soon(session.heartbeat)
                    pumps.start_soon(session.path_mtu.run)
                    await session.wait_ended()
        finally:
            session.close()
            endpoint.close()

    async def echo(self) -> dict[str, Any]:
        """An echo request through every live session, sent again (up to
        :data:`ECHO_TRIES` in all) to those not answered within a second, as ping would: does
        every session carry packets both ways? A burst of a thousand echoes can overflow
        a kernel queue on the way, which the first-try figure shows."""
        live = [c for c in self.clients if c.session is not None and c.lost is None]
        waiting = {c.index for c in live}
        all_answered = trio.Event()

        def answered_by(client: SimulatedClient) -> Callable[[], None]:
            def answered() -> None:
                waiting.discard(client.index)
                if not waiting:
                    all_answered.set()

            return answered

        for client in live:
            client.tun.on_echo_reply = answered_by(client)
        began = trio.current_time()
        first_try = 0
        for attempt in range(1, ECHO_TRIES + 1):
            for client in live:
                if client.index not in waiting:
                    continue
                assert client.session is not None
                packet = echo_request(
                    client.assigned, client.server_tunnel_ip, client.index & 0xFFFF, attempt
                )
                client.session.send_packet(packet)
                client.session.driver.transmit()
            with trio.move_on_after(ECHO_WAIT if attempt == ECHO_TRIES else 1.0):
                if waiting:
                    await all_answered.wait()
            if attempt == 1:
                first_try = len(live) - len(waiting)
            if not waiting:
                break
        for client in live:
            client.tun.on_echo_reply = None
        return {
            "event": "echo",
            "sent": len(live),
            "answered": len(live) - len(waiting),
            "answered_first_try": first_try,
            "seconds": round(trio.current_time() - began, 3),
        }

    async def traffic(self, count: int, seconds: float) -> dict[str, Any]:
        """``count`` live clients send to the server's tunnel address for ``seconds``, a
        burst each per round; what congestion control cannot take now is dropped by the
        session (counted), like a TUN queue overflowing."""
        live = [c for c in self.clients if c.session is not None and c.lost is None][:count]
        packets = [
            build_ipv4_udp(c.assigned, c.server_tunnel_ip, 40000 + c.index % 20000,
                           TRAFFIC_PORT, b"x" * TRAFFIC_PAYLOAD)
            for c in live
        ]  # fmt: skip
        drops_before = self.drops["queue_full"]
        sent = 0
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            for client, packet in zip(live, packets, strict=True):
                session = client.session
                assert session is not None
                for _ in range(TRAFFIC_BURST):
                    session.send_packet(packet)
                sent += TRAFFIC_BURST
                session.driver.transmit()
            await trio.lowlevel.checkpoint()
        return {
            "event": "traffic",
            "clients": len(live),
            "offered_packets": sent,
            "queue_full": self.drops["queue_full"] - drops_before,
            "packet_bytes": len(packets[0]) if packets else 0,
        }

    def stats(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        lost = collections.Counter(c.lost for c in self.clients if c.lost is not None)
        return {
            "event": "stats",
            "up": sum(1 for c in self.clients if c.session is not None and c.lost is None),
            "lost": dict(lost),
            "rebinds": sum(c.session.rebinds for c in self.clients if c.session is not None),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "drops": dict(self.drops),
        }

    async def close(self) -> dict[str, Any]:
        """Every client closes its session; the close leaves before its task is cancelled."""
        closed = 0
        for client in self.clients:
            if client.session is not None and client.lost is None:
                client.session.close()
                closed += 1
            client.scope.cancel()
        await trio.lowlevel.checkpoint()
        return {"event": "closed", "closed": closed}

    async def serve(self, commands: trio.lowlevel.FdStream) -> None:
        """Read commands until EOF, answering each on stdout."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            buffered = b""
            while True:
                chunk = await commands.receive_some(65536)
                if not chunk:
                    break
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    reply = await self.handle(json.loads(line))
                    sys.stdout.write(json.dumps(reply) + "\n")
                    sys.stdout.flush()
            nursery.cancel_scope.cancel()

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command.get("cmd")
        if name == "connect":
            return await self.connect(int(command["count"]))
        if name == "echo":
            return await self.echo()
        if name == "traffic":
            return await self.traffic(int(command["clients"]), float(command["seconds"]))
        if name == "stats":
            return self.stats()
        if name == "close":
            return await self.close()
        return {"event": "error", "error": f"unknown command {name!r}"}


def _raise_fd_limit() -> None:
    # One UDP socket per client: a thousand of them pass the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    _raise_fd_limit()
    setup = json.loads(sys.argv[1])
    worker = Worker(setup)
    started = time.monotonic()
    trio.run(worker.serve, trio.lowlevel.FdStream(os.dup(0)))
    log.info("worker done after %.1f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
