"""The client daemon: :class:`Client` puts the client's objects together, and
:func:`run_client` runs it with its control socket until a signal or a permanent failure."""

from __future__ import annotations

import collections
import logging
import secrets
from typing import Any

import trio
from aioquic.tls import SessionTicket

from tunnel import __version__
from tunnel.config import ClientConfig, RunOptions
from tunnel.core.identity import Identity, encode_public_id
from tunnel.daemon.client.hostnet import HostNetwork, recover
from tunnel.daemon.client.session import ClientSession, SessionServices, TicketSlot
from tunnel.daemon.client.supervisor import RESOLVE_PATIENCE, SERVER_ADDRESSES_KEY, Supervisor
from tunnel.daemon.metrics import MetricsServer, client_metrics, render
from tunnel.daemon.nft import KillSwitch, Nftables
from tunnel.daemon.platform import SYSTEM, Platform
from tunnel.daemon.runtime import (
    ControlServer,
    check_ready_fd,
    control_socket_path,
    group_id,
    report_status,
    watch_signals,
)
from tunnel.daemon.sdnotify import Notifier
from tunnel.daemon.session import Drops
from tunnel.daemon.statefile import StateFile, state_path
from tunnel.daemon.tun import TunDevice
from tunnel.errors import NameNotResolved
from tunnel.keyfile import read_key_file

log = logging.getLogger("tunnel.client")

KILL_SWITCH_KEY = "kill_switch"  # in the state file: a table a killed client left closed


class Client:
    """The client daemon across sessions: who we are (identity, device ID, the session ticket
    for resumption, drop counters), the :class:`HostNetwork` and the :class:`Supervisor`, and
    the status that gathers them."""

    def __init__(
        self,
        config: ClientConfig,
        identity: Identity,
        options: RunOptions,
        platform: Platform = SYSTEM,
    ) -> None:
        self.config = config
        self.identity = identity
        self.options = options
        self.platform = platform
        self.device_id = secrets.randbits(64)
        self.tickets = TicketSlot()  # from the last session, for resumption
        self.drops = Drops()
        self.started_at = trio.current_time()
        self.host_state = platform.state_file(
            state_path(config.state_dir, "client", config.control_socket)
        )
        self.network = HostNetwork(config, platform, self.host_state)
        self.supervisor = Supervisor(
            config,
            platform,
            self.network,
            SessionServices(
                config=config,
                identity=identity,
                device_id=self.device_id,
                tickets=self.tickets,
                drops=self.drops,
                platform=platform,
                local_addresses=self.network.host.local_addresses,
            ),
            ready_fd=options.ready_fd,
        )

    async def supervise(self) -> None:
        """Connect, run the session, and on loss reconnect until told to stop (see
        :meth:`Supervisor.run` for what ends it)."""
        await self.supervisor.run()

    # What the client is doing now, read by status and tests: the objects own it.

    @property
    def connected(self) -> trio.Event:
        """Set once the first session is up."""
        return self.supervisor.connected

    @property
    def state(self) -> str:
        """``connecting``, ``connected`` or ``reconnecting``."""
        return self.supervisor.state

    @property
    def reconnects(self) -> int:
        """Times the client connected again: after a lost session or a failed attempt."""
        return self.supervisor.reconnects

    @property
    def session(self) -> ClientSession | None:
        """The session that won the last race, while it lasts."""
        return self.supervisor.session

    @property
    def server_addr(self) -> Any:
        """The server address the latest session went to."""
        return self.supervisor.server_addr

    @property
    def tun(self) -> TunDevice | None:
        """The TUN device, from the first accepted session on."""
        return self.network.tun

    @property
    def ticket(self) -> SessionTicket | None:
        """The session ticket kept for resumption, if a verified server gave one."""
        return self.tickets.ticket

    def addresses(self) -> list[str]:
        """Our tunnel addresses, with their prefix lengths."""
        return self.network.addresses()

    def status(self) -> dict[str, Any]:
        """The client for ``tunnel status``."""
        supervisor = self.supervisor
        session = supervisor.session
        tun = self.network.tun
        last_handshake = supervisor.last_handshake
        addresses = self.network.addresses()
        up_since = supervisor.session_started_at
        return {
            "version": __version__,
            "role": "client",
            "id": self.identity.public_id,
            "server": f"{self.config.server_host}:{self.config.server_port}",
            "server_id": encode_public_id(self.config.server_id),
            "state": supervisor.state,
            "tun": tun.name if tun else None,
            "tun_merge": tun.merging if tun else None,
            "tun_merged": tun.merged if tun else 0,
            "addresses": addresses,
            "dns": self.network.dns_status(),
            "kill_switch": self.config.kill_switch,
            "device_id": self.device_id,
            "uptime": round(trio.current_time() - self.started_at, 3),
            "reconnects": supervisor.reconnects,
            "last_handshake_ms": round(last_handshake * 1000, 3)
            if last_handshake is not None
            else None,
            "sessions": [session.status(addresses=addresses, up_since=up_since)]
            if session is not None
            else [],
            "peers": session.peers_status() if session is not None else [],
            "traffic": self.traffic(),
            "drops": dict(self.drops)
            | ({"tun_write": tun.write_drops} if tun else {})
            | ({"udp_send": session.endpoint.send_drops} if session else {}),
        }

    def traffic(self) -> dict[str, int]:
        """Bytes and packets in and out since start, over every session."""
        totals = collections.Counter(self.supervisor.ended)
        if self.supervisor.session is not None:
            totals.update(self.supervisor.session.counters())
        return {key: totals[key] for key in ("bytes_in", "bytes_out", "packets_in", "packets_out")}

    def summary(self) -> str:
        """One line for systemd's STATUS: "connected to vpn.example:4433 as 10.8.0.2/24"."""
        server = f"{self.config.server_host}:{self.config.server_port}"
        state = self.supervisor.state
        if state == "connected":
            return f"connected to {server} as {', '.join(self.network.addresses())}"
        return f"{state} to {server} (reconnects: {self.supervisor.reconnects})"

    def close(self) -> None:
        """Undo everything the client changed on the host."""
        self.network.close()


async def run_client(config: ClientConfig, options: RunOptions) -> None:
    """Run the client until SIGTERM/SIGINT, a permanent failure, or giving up.

    With ``kill_switch`` the firewall closes before anything else and opens again only on a
    clean stop (a signal): a client that fails, or is killed, leaves it closed for the next
    start to take over, or for ``tunnel client --cleanup`` to remove."""
    check_ready_fd(options.ready_fd)
    identity = read_key_file(config.key_file) if config.key_file else Identity.generate()
    client = Client(config, identity, options)
    control = ControlServer(
        control_socket_path(config.control_socket),
        client.status,
        mode=config.control_socket_mode,
        group=group_id(config.control_socket_group),
    )
    kill_switch = _kill_switch(config)
    stopped_cleanly = False
    try:
        await control.bind()  # first: a second client on the same socket stops here
        control.handle(
            "metrics", lambda _request: {"text": render(client_metrics(client.status())).decode()}
        )
        if kill_switch is not None:
            if client.host_state.get(KILL_SWITCH_KEY) is None:
                await _resolve_before_closing(client)
            client.host_state.put(KILL_SWITCH_KEY, {"tun_name": config.tun_name})
            kill_switch.engage()  # or take over the one a previous run left
        elif client.host_state.get(KILL_SWITCH_KEY) is not None:
            KillSwitch.cleanup(Nftables(), config.tun_name)
            client.host_state.drop(KILL_SWITCH_KEY)
            log.warning("removed the kill switch a previous client left (kill_switch is off)")
        for what in recover(client.platform, client.host_state):
            log.warning("restored the %s a previous client left", what)
        log.info(
            "client %s connecting to %s:%d",
            identity.public_id,
            config.server_host,
            config.server_port,
        )
        # systemd's READY means "running and connecting" (see tunnel-client@.service): a
        # server down at boot must not hold the unit in "activating"; the STATUS line says
        # where the session is. --ready-fd still waits for the first session.
        notifier = Notifier.from_environment()
        notifier.ready(status=client.summary())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, nursery.cancel_scope, None)
            nursery.start_soon(control.serve)
            nursery.start_soon(notifier.run_watchdog)
            nursery.start_soon(report_status, notifier, client.summary)
            if config.metrics_listen is not None:
                metrics = MetricsServer(
                    *config.metrics_listen, lambda: client_metrics(client.status())
                )
                await nursery.start(metrics.serve)
            await client.supervise()
            nursery.cancel_scope.cancel()
        notifier.stopping()
        stopped_cleanly = True
        log.info("client stopped")
    finally:
        # Synchronous on purpose: undoing our changes to the host cannot be cancelled halfway.
        control.close()
        client.close()
        if kill_switch is not None:
            if stopped_cleanly:
                kill_switch.release()
                client.host_state.drop(SERVER_ADDRESSES_KEY)
                client.host_state.drop(KILL_SWITCH_KEY)
            else:
                log.warning(
                    "the kill switch stays on; `tunnel client --cleanup --config FILE` removes it"
                )


async def _resolve_before_closing(client: Client) -> None:
    """Look the server's name up once before the kill switch closes: once closed, the only
    resolver it lets through is the one behind the tunnel (a restart while closed uses the
    addresses kept in the state file)."""
    config = client.config
    with trio.move_on_after(RESOLVE_PATIENCE):
        try:
            found = await client.platform.resolve_all(
                config.server_host, config.server_port, key="server"
            )
        except NameNotResolved as exc:
            log.warning("%s (before the kill switch closes)", exc)
            return
        client.supervisor.remember(found)


def _kill_switch(config: ClientConfig) -> KillSwitch | None:
    if not config.kill_switch:
        return None
    return KillSwitch(Nftables(), tun_name=config.tun_name, fwmark=config.fwmark)


def cleanup_client(config: ClientConfig) -> list[str]:
    """``tunnel client --cleanup``: remove what a killed client left on this host (its kill
    switch, resolver configuration, policy routing). Returns what was removed."""
    state = StateFile(state_path(config.state_dir, "client", config.control_socket))
    removed = recover(SYSTEM, state)
    if KillSwitch.cleanup(Nftables(), config.tun_name):
        removed.append("kill switch")
    state.drop(KILL_SWITCH_KEY)
    return removed
