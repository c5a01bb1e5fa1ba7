"""The client's reconnect supervisor: one session at a time, and a new one when it is lost.

:class:`Supervisor` is a plain loop: pure backoff policy -> wait (cut short when the network
comes back) -> race handshakes to every address of the server (:func:`race`) -> authenticate
the winner -> run the session until it ends. Each failure is classified by one explicit rule:
permanent only for local errors and rejections the verified server sent; everything else is
retried. It also watches the host's network: a change moves the host routes to the server
(through :class:`HostNetwork`), probes a live session, and cuts a backoff or a stalled
handshake short.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import socket
from typing import Any

import trio

from tunnel.config import ClientConfig
from tunnel.core.backoff import Backoff
from tunnel.core.eyeballs import attempt_delay
from tunnel.core.messages import AuthResponse
from tunnel.core.netchange import gains, matters
from tunnel.daemon.aioquic_private.state import smoothed_rtt
from tunnel.daemon.client.hostnet import HostNetwork
from tunnel.daemon.client.session import ClientSession, SessionServices
from tunnel.daemon.connector import race
from tunnel.daemon.platform import Platform
from tunnel.daemon.runtime import lone_errors_unwrapped, notify_ready
from tunnel.daemon.udp import format_address
from tunnel.errors import (
    EXIT_PERMANENT,
    EXIT_TEMPORARY,
    HandshakeTimeout,
    IdentityMismatch,
    NameNotResolved,
    SessionLost,
    TunnelError,
)

log = logging.getLogger("tunnel.client")

RESOLVE_PATIENCE = 5.0  # seconds a fresh lookup may take when an earlier answer is at hand
SERVER_ADDRESSES_KEY = "server_addresses"  # in the state file, with a kill switch


def json_form(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


class GaveUp(TunnelError):
    """max_reconnect_attempts consecutive attempts failed."""

    exit_code = EXIT_TEMPORARY


class Supervisor:
    """Sessions one after another, and the client's state and reconnect counters."""

    def __init__(
        self,
        config: ClientConfig,
        platform: Platform,
        network: HostNetwork,
        services: SessionServices,
        *,
        ready_fd: int | None,
    ) -> None:
        self.config = config
        self.platform = platform
        self.network = network
        self.services = services  # handed to every session
        self.ready_fd = ready_fd  # told once the first session is up
        self.connected = trio.Event()  # set by the first established session
        self.session: ClientSession | None = None
        self.state = "connecting"
        self.reconnects = 0
        self.session_started_at: float | None = None  # when the latest session came up
        self.last_handshake: float | None = None  # how long its handshake took, in seconds
        self.server_addr: Any = None  # the address the latest race's winner went to
        self.monitor: Any = None  # the NetworkMonitor while it runs
        self._network_gained = trio.Event()
        self._attempt_scope: trio.CancelScope | None = None
        self._won_last: Any = None  # the address that won the last race: tried first next time
        self.ended: collections.Counter[str] = collections.Counter()  # ended sessions' counters
        self._resolved: list[Any] = self._recall()  # the server's addresses as last resolved
        self._last_rtt: float | None = None

    async def run(self) -> None:
        """Connect, run the session, and on loss reconnect with backoff until told to stop.

        Permanent, and the end of the daemon: local problems (config, key file, the host
        refusing a TUN device) and a rejection the verified server sent on the control stream.
        Everything else is temporary and retried, whatever it looks like, because the network
        can forge it: closes in Initial packets, another key presented, resets, a name that
        does not resolve, "server full", and any failure inside a session.
        """
        with lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_network)
                await self._reconnect_loop()
                nursery.cancel_scope.cancel()

    async def _reconnect_loop(self) -> None:
        backoff = Backoff()
        failures = 0
        while True:
            attempt = trio.CancelScope()
            self._attempt_scope = attempt
            try:
                with attempt:
                    await self._open_session()
            except Exception as exc:
                if _is_permanent(exc):
                    raise
                if not self.config.auto_reconnect:
                    raise SessionLost(f"{_describe(exc)} (auto_reconnect is off)") from None
                if isinstance(exc, IdentityMismatch):
                    log.error("%s", exc)
                else:
                    log.warning("%s", _describe(exc))
                if not isinstance(exc, TunnelError):
                    log.debug("the failure in full", exc_info=exc)
            finally:
                self._attempt_scope = None
                session, self.session = self.session, None
                if session is not None:
                    self.ended.update(session.counters())
            if attempt.cancelled_caught:
                # The network changed under a handshake whose retransmissions may have been
                # spent while the path was down: a fresh attempt, at once.
                log.info("network changed: connecting again now")
                self.reconnects += 1
                continue
            if session is not None and session.packets_in > 0 and session.packets_out > 0:
                # The session carried traffic: start over as if it were the first failure.
                backoff.reset()
                failures = 0
            failures += 1
            limit = self.config.max_reconnect_attempts
            if limit is not None and failures > limit:
                raise GaveUp(
                    f"gave up after {limit} failed reconnect attempts "
                    f"(max_reconnect_attempts = {limit})"
                )
            delay = backoff.next_delay()
            self.state = "reconnecting"
            log.info("reconnecting in %.1f s (attempt %d)", delay, failures)
            self._network_gained = trio.Event()
            with trio.move_on_after(delay):
                await self._network_gained.wait()
                log.info("network changed: reconnecting now")
            self.reconnects += 1

    async def _watch_network(self) -> None:
        """React to the host's network changing: follow the underlay with the host route to
        the server, cut a backoff or a stalled handshake short when something came up, and
        probe a live session at once. Without a monitor the client still works, on timers."""
        try:
            monitor = self.platform.network_monitor()
        except TunnelError as exc:
            log.warning("not watching the network (%s): reconnects wait for their timers", exc)
            return
        self.monitor = monitor
        try:
            if self.network.tun is not None:
                monitor.ignore_interface(self.network.tun.name)
            while True:
                try:
                    batch = await monitor.wait_change()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.warning("network monitor stopped: %s", exc)
                    return
                if matters(batch):
                    self.network_changed(gained=gains(batch))
        finally:
            self.monitor = None
            monitor.close()

    def network_changed(self, *, gained: bool) -> None:
        """Something in the host's network that may touch the path to the server changed."""
        log.debug("network changed%s", " (something came up)" if gained else "")
        try:
            self.network.keep_server_reachable()
        except TunnelError as exc:
            log.warning("host route to the server: %s", exc)
        if self.state == "connected":
            if self.session is not None:
                self.session.probe()
        elif gained:
            self._network_gained.set()
            if self._attempt_scope is not None and self.state == "connecting":
                self._attempt_scope.cancel()

    async def _open_session(self) -> None:
        """Resolve every address of the server and race handshakes to them (Happy Eyeballs);
        the verified winner authenticates and runs. Returns never; raises SessionLost (or a
        permanent error) when the session ends."""
        self.state = "connecting"
        candidates = await self._server_addresses()
        # Outside the tunnel before the first packet, for every address the race may try.
        self.network.keep_server_reachable([address for _, address in candidates])
        began = trio.current_time()
        with lone_errors_unwrapped():
            async with trio.open_nursery() as nursery:
                won = await race(
                    nursery, candidates, self._attempt, delay=attempt_delay(self._last_rtt)
                )
                session: ClientSession = won.value
                self._won_last = won.candidate
                self.session = session
                self.server_addr = session.server_addr
                self.network.keep_server_reachable([session.server_addr])
                left = self.config.handshake_timeout - (trio.current_time() - began)
                try:
                    with trio.fail_after(max(left, 0.0)):
                        response = await session.authenticate()
                except trio.TooSlowError:
                    raise HandshakeTimeout(
                        f"no answer from {self.config.server_host}:{self.config.server_port} "
                        f"within {self.config.handshake_timeout:g} s"
                    ) from None
                if response is not None:
                    await self._start_session(session, response, began, nursery)
                await trio.sleep_forever()  # until the session's task raises its end

    async def _server_addresses(self) -> list[Any]:
        """Every address of the server, resolved afresh; when that fails or is slow and an
        earlier answer is at hand, that one. Name lookups may be what is down: the pushed
        resolver sits behind the tunnel we are reconnecting, and a kill switch refuses the
        others, so insisting on a fresh answer could keep the client out for good."""
        config = self.config
        with trio.move_on_after(RESOLVE_PATIENCE if self._resolved else math.inf):
            try:
                found = await self.platform.resolve_all(
                    config.server_host, config.server_port, key="server", prefer=self._won_last
                )
            except NameNotResolved as exc:
                if not self._resolved:
                    raise
                log.warning("%s; trying the addresses it had before", exc)
                return self._resolved
            self.remember(found)
            return found
        log.warning(
            "server: no answer for %r within %g s; trying the addresses it had before",
            config.server_host,
            RESOLVE_PATIENCE,
        )
        return self._resolved

    def remember(self, addresses: list[Any]) -> None:
        """The server's addresses, as just resolved: used when a later lookup fails. With a
        kill switch they are also kept in the state file, for a restart while it is closed
        (the switch refuses lookups through any resolver but the tunnel's)."""
        self._resolved = addresses
        if not self.config.kill_switch:
            return
        record = {"server": self._server_name(), "addresses": [list(a) for a in addresses]}
        if self.network.state.get(SERVER_ADDRESSES_KEY) != json_form(record):
            self.network.state.put(SERVER_ADDRESSES_KEY, record)

    def _recall(self) -> list[Any]:
        record = self.network.state.get(SERVER_ADDRESSES_KEY) if self.config.kill_switch else None
        if not isinstance(record, dict) or record.get("server") != self._server_name():
            return []
        try:
            return [(int(family), tuple(address)) for family, address in record["addresses"]]
        except (KeyError, TypeError, ValueError):
            return []

    def _server_name(self) -> str:
        return f"{self.config.server_host}:{self.config.server_port}"

    async def _attempt(
        self, candidate: Any, *, task_status: trio.TaskStatus[ClientSession]
    ) -> None:
        """One address of the race: its own socket and connection; reports the session once
        the server's identity is verified, then runs its pumps until the session ends."""
        family, addr = candidate
        log.debug("handshake with %s", format_address(addr))
        endpoint = await self.platform.open_udp(
            "::" if family == socket.AF_INET6 else "0.0.0.0",
            0,
            key="server",
            family=family,
            mark=self.config.fwmark,
        )
        session = ClientSession(self.services, endpoint, addr)
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(session.udp_pump)
                pumps.start_soon(session.driver.run_timer)
                try:
                    with trio.fail_after(self.config.handshake_timeout):
                        await session.handshake()
                except trio.TooSlowError:
                    raise HandshakeTimeout(
                        f"no answer from {format_address(addr)} "
                        f"within {self.config.handshake_timeout:g} s"
                    ) from None
                task_status.started(session)
                await session.wait_ended()
        finally:
            session.close()
            session.endpoint.close()
            if self.session is session:
                self._last_rtt = smoothed_rtt(session.quic)

    async def _start_session(
        self,
        session: ClientSession,
        response: AuthResponse,
        began: float,
        nursery: trio.Nursery,
    ) -> None:
        """The server accepted us: TUN device, addresses, routes and resolvers, then the data
        pumps."""
        self.network.apply(response, monitor=self.monitor)
        await self.network.apply_dns(response)
        tun = self.network.tun
        session.own_addresses = frozenset(
            a.packed for a in (response.assigned_ip, response.assigned_ip6) if a is not None
        )
        session.tun = tun
        # What our applications send too big for the path: told so from the server.
        session.deliver_local = tun.write if tun else None
        session.icmp_source4 = response.server_ip.packed if response.server_ip else None
        session.icmp_source6 = response.server_ip6.packed if response.server_ip6 else None
        self.state = "connected"
        self.session_started_at = trio.current_time()
        self.last_handshake = self.session_started_at - began
        log.info(
            "session up: %s via %s to %s (handshake %.1f ms%s)",
            ", ".join(self.network.addresses()),
            tun.name if tun else "-",
            format_address(session.server_addr),
            self.last_handshake * 1000,
            ", resumed" if session.resumed else "",
        )
        if not self.connected.is_set():
            self.connected.set()
            notify_ready(self.ready_fd)
        assert tun is not None  # apply made it
        nursery.start_soon(session.tun_pump, tun)
        nursery.start_soon(session.heartbeat)
        nursery.start_soon(session.path_mtu.run)
        if session.control.peers:
            nursery.start_soon(session.run_peers)


def _is_permanent(exc: BaseException) -> bool:
    """Does this failure (or any failure in this group) say "do not retry"?"""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_permanent(inner) for inner in exc.exceptions)
    return isinstance(exc, TunnelError) and exc.exit_code == EXIT_PERMANENT


def _describe(exc: BaseException) -> str:
    """One line for the log: our own errors say what happened; anything else is a failure
    inside the session, named by its type."""
    if isinstance(exc, TunnelError):
        return str(exc)
    return f"session failed ({type(exc).__name__}: {exc})"
