"""A UDP relay that injects faults, for tests that need a bad network without netem.

    client ──> relay listen address ──(one upstream socket per client)──> upstream (the server)
    client <── relay listen address <──────────────────────────────────── upstream

Each client address gets its own upstream socket, so the server sees a distinct source per
client and its replies find their way back. Faults apply to both directions and can be changed
while the relay runs (they are plain, validated attributes):

- ``loss``       probability a datagram is dropped;
- ``delay``      seconds added to every datagram, plus ``jitter`` (uniform in [0, jitter));
- ``reorder``    probability a datagram is held back and sent right after the next one on the
  same path (or after ``reorder_timeout`` if no next one comes);
- ``duplicate``  probability a datagram is sent twice;
- ``blackhole``  drop everything, both ways (a partition), including what is still queued.

:meth:`UdpRelay.rebind` replaces the upstream sockets, so the server sees the client's packets
from a new address:port, as after a NAT rebinding. Delayed datagrams wait in one heap served by
one sender task, so a delay never blocks other datagrams; the heap holds at most
``max_queued`` datagrams (more are dropped and counted) and at most ``max_flows`` clients are
tracked (the least recently seen one is forgotten first).

Command line, for running a relay inside a network namespace (``ip netns exec``)::

    python tests/support/relay.py --listen H:P --upstream H:P [--loss 0.05] [--reorder 0.02]
        [--delay 0.001] [--jitter S] [--duplicate P] [--blackhole] [--seed N]
        [--bind HOST] [--control PATH|-] [--ready-fd N]

The control channel (a Unix socket at PATH, or stdin/stdout with ``-``, where the end of stdin
stops the relay) takes one JSON object a line and answers each with one JSON line: fault names
set faults (``{"blackhole": true}``, ``{"loss": 0.05, "delay": 0.01}``), ``{"rebind": true}``
or ``{"rebind": "10.0.0.3"}`` (bind the new sockets to that address) rebinds,
``{"stats": true}`` only reports. The answer is
``{"ok": true, "faults": {...}, "stats": {...}}`` or ``{"ok": false, "error": "..."}``; a
command with any invalid part changes nothing. :func:`send_command` is the client side.

Plain non-blocking sockets and ``trio.lowlevel.wait_readable``: a relay in the data path of a
throughput test must cost little per datagram.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

__all__ = [
    "DirectionStats",
    "RelayStats",
    "UdpRelay",
    "apply_command",
    "main",
    "send_command",
]

log = logging.getLogger("tests.support.relay")

Address = Any  # (host, port) or the 4-tuple of IPv6, exactly as the socket reports it

FAULTS = ("loss", "delay", "jitter", "reorder", "duplicate", "blackhole")
RECV_SIZE = 65535
RECV_BATCH = 64
SOCKET_BUFFER = 4 * 1024 * 1024
CONTROL_LINE_MAX = 4096


# -- validation ------------------------------------------------------------------------------


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _probability(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    number = _number(value, attribute.name)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _seconds(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if _number(value, attribute.name) < 0:
        raise ValueError(f"{attribute.name} must be >= 0 seconds, got {value!r}")


def _flag(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, got {value!r}")


def _ip_or_none(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{attribute.name} must be an IP address, got {value!r}") from None


def _positive_int(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _endpoint(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or isinstance(value[1], bool)
        or not isinstance(value[1], int)
        or not 0 <= value[1] <= 65535
    ):
        raise ValueError(f"{attribute.name} must be a (host, port) tuple, got {value!r}")


# -- statistics ------------------------------------------------------------------------------


@attrs.frozen
class DirectionStats:
    """Counters of one direction (``up``: client to server, ``down``: server to client).

    ``received`` datagrams came in; ``forwarded`` (``bytes_forwarded``) went out, duplicates
    included; ``lost`` were dropped by ``loss``, ``blackholed`` by ``blackhole``,
    ``overflowed`` because the queue was full, ``send_errors`` because the kernel refused the
    send; ``duplicated``, ``reordered`` and ``delayed`` count what those faults did.
    """

    received: int = 0
    forwarded: int = 0
    bytes_forwarded: int = 0
    lost: int = 0
    blackholed: int = 0
    overflowed: int = 0
    send_errors: int = 0
    duplicated: int = 0
    reordered: int = 0
    delayed: int = 0

    @property
    def dropped(self) -> int:
        """Every datagram the relay dropped on purpose or had to drop."""
        return self.lost + self.blackholed + self.overflowed + self.send_errors


# The relay's live, mutable counters: the same fields, snapshotted into DirectionStats.
_Counters = attrs.make_class(
    "_Counters", {field.name: attrs.field(default=0) for field in attrs.fields(DirectionStats)}
)


@attrs.frozen
class RelayStats:
    """An immutable snapshot of a relay's counters (:meth:`UdpRelay.statistics`)."""

    up: DirectionStats
    down: DirectionStats
    flows: int
    queued: int
    rebinds: int
    evicted_flows: int

    @property
    def forwarded(self) -> int:
        """Datagrams sent on, both directions."""
        return self.up.forwarded + self.down.forwarded

    @property
    def dropped(self) -> int:
        """Datagrams dropped, both directions."""
        return self.up.dropped + self.down.dropped

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (with ``dropped`` filled in)."""
        out = attrs.asdict(self)
        out["up"]["dropped"] = self.up.dropped
        out["down"]["dropped"] = self.down.dropped
        out["forwarded"] = self.forwarded
        out["dropped"] = self.dropped
        return out


# -- the relay -------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Flow:
    """One client: its address and the upstream socket that speaks for it."""

    client: Address
    sock: socket.socket
    last_seen: float
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    closed: bool = False


@attrs.define(eq=False)
class _Pending:
    """A datagram waiting for its time, going upstream (``up``) or back to ``flow.client``.
    Sent at most once, by whichever of its heap entries comes first."""

    data: bytes
    flow: _Flow
    up: bool
    sent: bool = False


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _udp_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    return sock


def _close(sock: socket.socket) -> None:
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


@attrs.define(eq=False)
class UdpRelay:
    """A fault-injecting UDP relay from ``listen`` to ``upstream`` (``(host, port)`` each;
    port 0 in ``listen`` picks a free port, see :attr:`listen_address`).

    Run it with ``await nursery.start(relay.run)``, which returns the bound listen address.
    Change faults at any time by assigning the attributes; invalid values raise ValueError.
    ``rng`` draws every random decision, so a seeded ``random.Random`` makes a run repeatable
    for the same arrival order. ``upstream_bind`` is the local address of the upstream
    sockets (default: any).
    """

    listen: tuple[str, int] = attrs.field(validator=_endpoint)
    upstream: tuple[str, int] = attrs.field(validator=_endpoint)
    rng: random.Random = attrs.field(kw_only=True, factory=random.Random)
    loss: float = attrs.field(kw_only=True, default=0.0, validator=_probability)
    delay: float = attrs.field(kw_only=True, default=0.0, validator=_seconds)
    jitter: float = attrs.field(kw_only=True, default=0.0, validator=_seconds)
    reorder: float = attrs.field(kw_only=True, default=0.0, validator=_probability)
    duplicate: float = attrs.field(kw_only=True, default=0.0, validator=_probability)
    blackhole: bool = attrs.field(kw_only=True, default=False, validator=_flag)
    reorder_timeout: float = attrs.field(kw_only=True, default=0.05, validator=_seconds)
    upstream_bind: str | None = attrs.field(kw_only=True, default=None, validator=_ip_or_none)
    max_queued: int = attrs.field(kw_only=True, default=4096, validator=_positive_int)
    max_flows: int = attrs.field(kw_only=True, default=256, validator=_positive_int)

    _listen_sock: socket.socket | None = attrs.field(init=False, default=None)
    _upstream_addr: Address = attrs.field(init=False, default=None)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _flows: dict[Address, _Flow] = attrs.field(init=False, factory=dict)
    _heap: list[tuple[float, int, _Pending]] = attrs.field(init=False, factory=list)
    _seq: Any = attrs.field(init=False, factory=itertools.count)
    _held: dict[tuple[_Flow, bool], _Pending] = attrs.field(init=False, factory=dict)
    _wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    _up: _Counters = attrs.field(init=False, factory=_Counters)
    _down: _Counters = attrs.field(init=False, factory=_Counters)
    _rebinds: int = attrs.field(init=False, default=0)
    _evicted: int = attrs.field(init=False, default=0)

    # -- public ---------------------------------------------------------------------------------

    @property
    def listen_address(self) -> Address:
        """The address clients send to (known once :meth:`run` has started)."""
        if self._listen_sock is None:
            raise RuntimeError("the relay is not running")
        return self._listen_sock.getsockname()

    def upstream_addresses(self) -> list[Address]:
        """The local addresses of the upstream sockets, one per client (what the server
        sees as sources)."""
        return [flow.sock.getsockname() for flow in self._flows.values()]

    def faults(self) -> dict[str, Any]:
        """The current faults, by name."""
        return {name: getattr(self, name) for name in FAULTS}

    def statistics(self) -> RelayStats:
        """A snapshot of the counters."""
        return RelayStats(
            up=DirectionStats(**attrs.asdict(self._up)),
            down=DirectionStats(**attrs.asdict(self._down)),
            flows=len(self._flows),
            queued=len(self._heap),
            rebinds=self._rebinds,
            evicted_flows=self._evicted,
        )

    def rebind(self, host: str | None = None) -> None:
        """Give every client a new upstream socket (a new source port; a new source address
        too if ``host``, an IP literal, is given; new clients then use it too). What was still
        in the old sockets' receive buffers is lost, as on a real NAT rebinding. Raises
        ValueError for a ``host`` that is no IP address, OSError if a socket cannot be bound;
        either way nothing changed."""
        if host is not None:
            _ip_or_none(self, attrs.fields(UdpRelay).upstream_bind, host)
        bind = self.upstream_bind if host is None else host
        flows = list(self._flows.values())
        fresh: list[socket.socket] = []
        try:
            for _ in flows:
                fresh.append(self._open_upstream(bind))
        except BaseException:
            # all or nothing: a failed rebind leaves every flow as it was
            for sock in fresh:
                sock.close()
            raise
        self.upstream_bind = bind
        for flow, sock in zip(flows, fresh, strict=True):
            old, flow.sock = flow.sock, sock
            _close(old)  # wakes the flow's reader, which moves to the new socket
        self._rebinds += 1
        log.info(
            "rebound %d upstream socket(s)%s",
            len(self._flows),
            f" to {self.upstream_bind}" if self.upstream_bind else "",
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the listen address through ``task_status``, and relay until
        cancelled. Closes every socket on the way out."""
        self._upstream_addr = await _resolve(*self.upstream)
        listen_addr = await _resolve(*self.listen)
        sock = _udp_socket(_family_of(listen_addr[0]))
        try:
            sock.bind(listen_addr)
            self._listen_sock = sock
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sender)
                task_status.started(sock.getsockname())
                await self._read_clients(sock)
        finally:
            self._nursery = None
            self._listen_sock = None
            for flow in list(self._flows.values()):
                self._forget(flow)
            _close(sock)
            self._heap.clear()
            self._held.clear()

    # -- client side ----------------------------------------------------------------------------

    async def _read_clients(self, sock: socket.socket) -> None:
        recvfrom = sock.recvfrom
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(RECV_BATCH):
                try:
                    data, client = recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    # an ICMP error from an earlier send to a client: nothing to do about it
                    continue
                self._up.received += 1
                if self.blackhole:
                    # no flow either: a partition must not make the relay open sockets
                    self._up.blackholed += 1
                    continue
                flow = self._flows.get(client)
                if flow is None:
                    try:
                        flow = self._new_flow(client, now)
                    except OSError as exc:
                        log.warning("no upstream socket for %s: %s", client, exc)
                        self._up.send_errors += 1
                        continue
                flow.last_seen = now
                self._ingress(data, flow, True, self._up, now)

    def _new_flow(self, client: Address, now: float) -> _Flow:
        if len(self._flows) >= self.max_flows:
            oldest = min(self._flows.values(), key=lambda f: f.last_seen)
            self._forget(oldest)
            self._evicted += 1
        flow = _Flow(client, self._open_upstream(self.upstream_bind), now)
        self._flows[client] = flow
        assert self._nursery is not None
        self._nursery.start_soon(self._read_upstream, flow)
        return flow

    def _open_upstream(self, bind: str | None) -> socket.socket:
        sock = _udp_socket(_family_of(self._upstream_addr[0]))
        try:
            sock.bind((bind or "", 0))
            # connected: the kernel keeps out everything not from the upstream
            sock.connect(self._upstream_addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _forget(self, flow: _Flow) -> None:
        flow.closed = True
        flow.scope.cancel()
        _close(flow.sock)
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]
        self._held.pop((flow, True), None)
        self._held.pop((flow, False), None)

    # -- upstream side --------------------------------------------------------------------------

    async def _read_upstream(self, flow: _Flow) -> None:
        with flow.scope:
            while not flow.closed:
                sock = flow.sock
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    continue  # rebound (read the new socket) or forgotten (the loop ends)
                now = trio.current_time()
                recv = sock.recv
                for _ in range(RECV_BATCH):
                    try:
                        data = recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        # ECONNREFUSED & co: the upstream is down (a killed server); keep
                        # listening, it may come back on the same port
                        continue
                    self._down.received += 1
                    if self.blackhole:
                        self._down.blackholed += 1
                        continue
                    self._ingress(data, flow, False, self._down, now)

    # -- faults and scheduling ------------------------------------------------------------------

    def _ingress(self, data: bytes, flow: _Flow, up: bool, counters: _Counters, now: float) -> None:
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            counters.lost += 1
            return
        copies = 1
        if self.duplicate and rng.random() < self.duplicate:
            copies = 2
            counters.duplicated += 1
        for _ in range(copies):
            due = now + self.delay
            if self.jitter:
                due += rng.random() * self.jitter
            if due > now:
                counters.delayed += 1
            key = (flow, up)
            held = self._held.pop(key, None)
            pending = _Pending(data, flow, up)
            if held is None and self.reorder and rng.random() < self.reorder:
                # hold this one back until the next datagram on the path has gone out
                counters.reordered += 1
                self._held[key] = pending
                self._schedule(due + self.reorder_timeout, pending, counters)
                continue
            self._emit(due, pending, now, counters)
            if held is not None:
                self._emit(due, held, now, counters)

    def _emit(self, due: float, pending: _Pending, now: float, counters: _Counters) -> None:
        if due <= now:
            self._send(pending)
        else:
            self._schedule(due, pending, counters)

    def _schedule(self, due: float, pending: _Pending, counters: _Counters) -> None:
        heap = self._heap
        if len(heap) >= self.max_queued:
            counters.overflowed += 1
            pending.sent = True  # a held datagram's other heap entry must not send it either
            return
        heapq.heappush(heap, (due, next(self._seq), pending))
        if heap[0][2] is pending:
            self._wakeup.set()  # new earliest deadline: the sender must sleep less

    def _send(self, pending: _Pending) -> None:
        if pending.sent:
            return
        pending.sent = True
        counters = self._up if pending.up else self._down
        if self.blackhole:
            counters.blackholed += 1
            return
        flow = pending.flow
        try:
            if pending.up:
                flow.sock.send(pending.data)
            else:
                assert self._listen_sock is not None
                self._listen_sock.sendto(pending.data, flow.client)
        except OSError:
            # full buffer, closed (forgotten) flow, ICMP error: lost like on a real link
            counters.send_errors += 1
            return
        counters.forwarded += 1
        counters.bytes_forwarded += len(pending.data)

    async def _sender(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            due = heap[0][0]
            if due > trio.current_time():
                self._wakeup = trio.Event()
                with trio.move_on_at(due):
                    await self._wakeup.wait()
                continue
            _, _, pending = heapq.heappop(heap)
            if not pending.sent and pending.flow.closed:
                pending.sent = True
                (self._up if pending.up else self._down).send_errors += 1
                continue
            self._send(pending)


async def _resolve(host: str, port: int) -> Address:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return infos[0][4]


# -- control channel -------------------------------------------------------------------------


def apply_command(relay: UdpRelay, command: Any) -> dict[str, Any]:
    """Carry out one control command (a decoded JSON value) and return the answer.

    Never raises for a bad command: the answer says ``{"ok": false, "error": ...}`` and nothing
    was changed. See the module docstring for the commands.
    """
    if not isinstance(command, dict):
        return {"ok": False, "error": "a command is a JSON object"}
    fields = attrs.fields_dict(UdpRelay)
    changes: dict[str, Any] = {}
    rebind: str | None | bool = False
    for key, value in command.items():
        if key in FAULTS:
            validator = fields[key].validator
            assert validator is not None
            try:
                validator(relay, fields[key], value)
            except ValueError as exc:
                return {"ok": False, "error": str(exc)}
            changes[key] = value
        elif key == "rebind":
            if value is True:
                rebind = None
            elif isinstance(value, str) and value:
                rebind = value
            elif value is not False:
                return {"ok": False, "error": "rebind must be true or a local address"}
        elif key != "stats":
            return {"ok": False, "error": f"unknown command key {key!r}"}
    if rebind is not False:
        # first, as the one part that can still fail
        try:
            relay.rebind(rebind)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": f"rebind failed: {exc}"}
    for key, value in changes.items():
        setattr(relay, key, float(value) if key != "blackhole" else value)
    if changes or rebind is not False:
        log.info("control: %s", json.dumps(command, sort_keys=True))
    return {"ok": True, "faults": relay.faults(), "stats": relay.statistics().as_dict()}


def _answer_line(relay: UdpRelay, line: bytes) -> bytes:
    try:
        command = json.loads(line)
    except ValueError as exc:
        answer: dict[str, Any] = {"ok": False, "error": f"not JSON: {exc}"}
    else:
        answer = apply_command(relay, command)
    return json.dumps(answer).encode() + b"\n"


async def _serve_lines(relay: UdpRelay, receive: Any, send: Callable[[bytes], Any]) -> None:
    """Answer JSON lines read by ``receive()`` until EOF; each answer goes to ``send``."""
    buf = b""
    while True:
        chunk = await receive()
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        if len(buf) > CONTROL_LINE_MAX:
            await send(json.dumps({"ok": False, "error": "line too long"}).encode() + b"\n")
            return
        for line in lines:
            if line.strip():
                await send(_answer_line(relay, line))


async def _serve_control_socket(
    relay: UdpRelay, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    _unlink(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(str(path))
        listener.listen(8)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(_serve_connection, relay, conn)
        finally:
            _unlink(path)


def _unlink(path: Path) -> None:
    # a leftover of an earlier run would make bind() fail
    path.unlink(missing_ok=True)


async def _serve_connection(relay: UdpRelay, conn: trio.socket.SocketType) -> None:
    async def send(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await conn.send(view) :]

    with conn:
        try:
            await _serve_lines(relay, lambda: conn.recv(CONTROL_LINE_MAX), send)
        except OSError as exc:
            log.debug("control connection: %s", exc)


async def _serve_stdin(relay: UdpRelay, stop: trio.CancelScope) -> None:
    """Answer commands from stdin on stdout; EOF on stdin (the controller is gone) stops
    the relay."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    async with stdin, stdout:
        await _serve_lines(relay, lambda: stdin.receive_some(CONTROL_LINE_MAX), stdout.send_all)
    log.info("control: end of stdin, stopping")
    stop.cancel()


async def send_command(path: str | os.PathLike[str], command: dict[str, Any]) -> dict[str, Any]:
    """Send one command to the control socket of a relay run with ``--control PATH`` and
    return its answer. Raises OSError if nobody listens there, ValueError on a garbled
    answer. Wrap it in ``fail_after`` if a hung relay must not hang the caller."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(os.fspath(path))
        data = json.dumps(command).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[await sock.send(view) :]
        buf = b""
        while b"\n" not in buf:
            chunk = await sock.recv(65536)
            if not chunk:
                raise ValueError("the relay closed the control connection without answering")
            buf += chunk
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise ValueError(f"unexpected answer from the relay: {answer!r}")
    return answer


# -- command line ----------------------------------------------------------------------------


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tests/support/relay.py",
        description="A UDP relay that drops, delays, reorders, duplicates and black-holes.",
    )
    parser.add_argument(
        "--listen",
        type=_hostport,
        required=True,
        help="HOST:PORT clients send to ([v6]:port for IPv6)",
    )
    parser.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--bind", help="local address of the upstream sockets (default: any)")
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability (0)")
    parser.add_argument("--delay", type=float, default=0.0, help="added delay, s (0)")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra random delay, s (0)")
    parser.add_argument("--reorder", type=float, default=0.0, help="reorder probability (0)")
    parser.add_argument("--duplicate", type=float, default=0.0, help="duplication probability (0)")
    parser.add_argument("--blackhole", action="store_true", help="start partitioned")
    parser.add_argument("--seed", type=int, help="seed of the random decisions")
    parser.add_argument(
        "--max-queued", type=int, default=4096, help="most datagrams waiting at once (4096)"
    )
    parser.add_argument("--control", help="control channel: a Unix socket path, or - for stdin")
    parser.add_argument("--ready-fd", type=int, help="write a newline here once relaying")
    return parser


async def _main(args: argparse.Namespace, relay: UdpRelay) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(relay.run)
        if args.control == "-":
            nursery.start_soon(_serve_stdin, relay, nursery.cancel_scope)
        elif args.control:
            await nursery.start(_serve_control_socket, relay, Path(args.control))
        log.info("relaying %s -> %s:%d (%s)", address, *args.upstream, json.dumps(relay.faults()))
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"\n")
            os.close(args.ready_fd)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: relay until SIGTERM/SIGINT; exit 0, 2 on a usage error, 1 if
    the sockets cannot be set up. The final counters go to stderr as one JSON line."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="relay: %(message)s")
    try:
        relay = UdpRelay(
            args.listen,
            args.upstream,
            rng=random.Random(args.seed),
            loss=args.loss,
            delay=args.delay,
            jitter=args.jitter,
            reorder=args.reorder,
            duplicate=args.duplicate,
            blackhole=args.blackhole,
            upstream_bind=args.bind,
            max_queued=args.max_queued,
        )
    except ValueError as exc:
        parser.error(str(exc))
    failure: BaseException | None = None
    try:
        trio.run(_main, args, relay)
    except* OSError as group:
        failure = group.exceptions[0]
    if failure is not None:
        print(f"relay: {failure}", file=sys.stderr, flush=True)
        return 1
    print("relay: stats " + json.dumps(relay.statistics().as_dict()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
