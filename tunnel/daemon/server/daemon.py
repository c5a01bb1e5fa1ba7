"""The server daemon: its objects put together, and :func:`run_server`.

Task tree (every task lives in a nursery; cancelling the top tears everything down):

    run_server
      ├─ signal watcher            SIGTERM/SIGINT -> graceful stop, SIGHUP -> reload
      ├─ control socket            `tunnel status`
      ├─ Dispatcher.udp_pump       datagrams -> session by destination CID, else admission
      ├─ Forwarder.tun_pump        packets -> session by destination address
      ├─ SessionTable.lease_reaper returns expired leases to the pools
      ├─ Forwarder.nat64_reaper    expires idle NAT64 mappings (with NAT64 on)
      └─ one task per session (ServerSession.run), in a nursery of their own, owning
           ├─ QUIC timer
           ├─ path MTU discovery (once authenticated)
           └─ handshake deadline, then the wait for the connection to end
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import attrs
import trio
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from tunnel import __version__
from tunnel.config import RunOptions, ServerConfig, load_server_config
from tunnel.core.admission import HandshakeGate
from tunnel.core.authority import Authority
from tunnel.core.identity import Identity, decode_public_id
from tunnel.core.ippool import AddressPool
from tunnel.core.nat64 import Nat64
from tunnel.core.tokens import TokenSet
from tunnel.daemon.metrics import MetricsServer, render, server_metrics
from tunnel.daemon.nft import MASQUERADE_STATE_KEY, Masquerade, Nftables
from tunnel.daemon.platform import SYSTEM, Platform
from tunnel.daemon.quic import ResetTokens, TicketStore, server_configuration
from tunnel.daemon.runtime import (
    ControlServer,
    check_ready_fd,
    control_socket_path,
    group_id,
    notify_ready,
    report_status,
    watch_signals,
)
from tunnel.daemon.sdnotify import Notifier
from tunnel.daemon.server.auth import Gatekeeper
from tunnel.daemon.server.dispatcher import Dispatcher
from tunnel.daemon.server.forwarder import Forwarder
from tunnel.daemon.server.introducer import Introducer
from tunnel.daemon.server.session import ServerSession, SessionServices
from tunnel.daemon.server.sessions import SessionTable
from tunnel.daemon.session import Channel, Drops, transmit_touched
from tunnel.daemon.statefile import state_path
from tunnel.daemon.udp import UdpEndpoint, format_address
from tunnel.errors import TunnelError
from tunnel.keyfile import read_key_file

log = logging.getLogger("tunnel.server")

# Keys a reload reads but cannot apply to a running server: reported, not silently ignored.
_RESTART_KEYS = (
    "listen_host", "listen_port", "network", "network6", "mtu", "tun_name", "nat64", "masquerade",
)  # fmt: skip

# A server under a flood of new connections: at most this many handshakes in flight from one
# source address and overall; past RETRY_ABOVE pending handshakes, new clients must prove their
# address with a QUIC Retry round trip first.
MAX_PENDING_PER_SOURCE = 16
MAX_PENDING = 1024
RETRY_ABOVE = 64
# Stateless resets and Version Negotiation are cheap to send but never worth a flood of our own.
MAX_RESETS_PER_SECOND = 100
MAX_VERSION_NEGOTIATIONS_PER_SECOND = 100


class Server:
    """One server's objects, made from its config and passed to each other explicitly:

    the dispatcher (UDP in, by connection ID or admission), the session table, the forwarder
    (sessions <-> TUN, NAT64), the gatekeeper (AuthRequests). Each owns its counters;
    :meth:`status` gathers them. Created and run by :func:`run_server`.
    """

    def __init__(
        self,
        config: ServerConfig,
        identity: Identity,
        endpoint: UdpEndpoint,
        tun: Any,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.identity = identity
        self.endpoint = endpoint
        self.tun = tun
        self.started_at = trio.current_time()
        # Operators' names for client keys ([clients]): one dict, updated in place on reload,
        # that every session reads its name from.
        self.names: dict[bytes, str] = {key: name for name, key in config.clients.items()}
        quic_config = server_configuration(identity)
        self.authority = _authority(config, identity)
        self.tickets = TicketStore()
        self.touched: set[Channel] = set()  # sessions with something to send
        self.table = SessionTable(self.authority, self.touched)
        nat64, nat64_source, nat64_prefix = _nat64(config, self.authority)
        self.introducer = Introducer(enabled=config.client_to_client)
        self.forwarder = Forwarder(
            tun,
            self.table.routes,
            self.touched,
            self.introducer,
            client_to_client=config.client_to_client,
            listen_port=config.listen_port,
            nat64=nat64,
            nat64_source=nat64_source,
            nat64_prefix=nat64_prefix,
        )
        self.gatekeeper = Gatekeeper(self.authority)
        self.gate = HandshakeGate(
            supported_versions=quic_config.supported_versions,
            max_pending=MAX_PENDING,
            max_pending_per_source=MAX_PENDING_PER_SOURCE,
            retry_above=RETRY_ABOVE,
            resets_per_second=MAX_RESETS_PER_SECOND,
            negotiations_per_second=MAX_VERSION_NEGOTIATIONS_PER_SECOND,
        )
        self.dispatcher = Dispatcher(
            endpoint,
            self.table,
            self.forwarder,
            self.gate,
            quic_config=quic_config,
            tickets=self.tickets,
            reset_tokens=ResetTokens(identity.seed),
            new_session=self._new_session,
        )
        pool4, pool6 = self.authority.pool4, self.authority.pool6
        self.services = SessionServices(
            table=self.table,
            forwarder=self.forwarder,
            gatekeeper=self.gatekeeper,
            introducer=self.introducer,
            tickets=self.tickets,
            endpoint=endpoint,
            handshake_finished=self.dispatcher.handshake_finished,
            handshake_timeout=config.handshake_timeout,
            tunnel_addresses=(
                pool4.server_ip.packed if pool4 is not None else None,
                pool6.server_ip.packed if pool6 is not None else None,
            ),
            names=self.names,
        )

    def _new_session(
        self, quic: QuicConnection, remote: Any, source: Any, tickets: list[SessionTicket]
    ) -> ServerSession:
        return ServerSession(self.services, quic, remote, source, tickets)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the pumps, and every session in a nursery of their own, until cancelled."""
        async with trio.open_nursery() as sessions, trio.open_nursery() as pumps:
            # Sessions never raise (each is its own boundary), so nothing a client does can
            # cancel the pumps; cancelling the pumps (shutdown) cancels the sessions too.
            self.dispatcher.nursery = sessions
            pumps.start_soon(self.dispatcher.udp_pump)
            pumps.start_soon(self.forwarder.tun_pump)
            pumps.start_soon(self.table.lease_reaper)
            if self.forwarder.nat64 is not None:
                pumps.start_soon(self.forwarder.nat64_reaper)
            task_status.started()

    def flush(self) -> None:
        """Send what every touched session has queued."""
        transmit_touched(self.touched)

    def reload(self, via: str = "SIGHUP") -> dict[str, Any]:
        """SIGHUP or ``tunnel reload``: re-read tokens, allowed_clients, client names,
        client_to_client and the pushed DNS; keep everything else and every session whose
        credentials still pass. Returns what changed (``error`` if the file is unusable)."""
        path = self.config_path
        if path is None:
            log.warning("%s: no config file to reload", via)
            return {"error": "the server was started without a config file"}
        try:
            fresh = load_server_config(path)
        except TunnelError as exc:
            log.error("%s: %s; keeping the running configuration", via, exc)
            return {"error": f"{exc}; keeping the running configuration"}
        old = self.config
        changed = [
            key
            for key in ("auth_tokens", "allowed_clients", "clients", "dns", "dns_search")
            if getattr(fresh, key) != getattr(old, key)
        ]
        self.authority.reload(
            tokens=TokenSet(fresh.auth_tokens),
            allowed_clients=fresh.allowed_clients,
            dns=fresh.dns,
            dns_search=fresh.dns_search,
        )
        self.names.clear()
        self.names.update({key: name for name, key in fresh.clients.items()})
        if self._reload_client_to_client(fresh.client_to_client):
            changed.append("client_to_client")
        self.config = attrs.evolve(
            old,
            auth_tokens=fresh.auth_tokens,
            allowed_clients=fresh.allowed_clients,
            clients=fresh.clients,
            dns=fresh.dns,
            dns_search=fresh.dns_search,
            client_to_client=fresh.client_to_client,
        )
        revoked = self.revoke_failing()
        ignored = [key for key in _RESTART_KEYS if getattr(fresh, key) != getattr(old, key)]
        log.info(
            "%s: reloaded %d token(s); %s changed; %d session(s) revoked%s",
            via,
            len(fresh.auth_tokens),
            ", ".join(changed) or "nothing",
            revoked,
            f"; {', '.join(ignored)} need a restart" if ignored else "",
        )
        return {
            "changed": changed,
            "tokens": len(fresh.auth_tokens),
            "revoked": revoked,
            "need_restart": ignored,
        }

    def summary(self) -> str:
        """One line for systemd's STATUS: "3 sessions, 1 handshake pending"."""
        sessions = sum(1 for _ in self.table.authenticated())
        pending = self.dispatcher.status().get("pending_handshakes", 0)
        return f"{sessions} session{'' if sessions == 1 else 's'}" + (
            f", {pending} handshake{'' if pending == 1 else 's'} pending" if pending else ""
        )

    def kick(self, target: str, reason: str = "") -> dict[str, Any]:
        """``tunnel kick``: close every session of the client named by ``target`` (a public ID
        or a name from [clients]). It may come back: kicking is not revoking."""
        key = self._client_key(target)
        closed = self.table.close_client(key, f"kicked by the operator{': ' if reason else ''}"
                                         f"{reason}")  # fmt: skip
        if not closed:
            raise TunnelError(f"no session of client {target!r}")
        self.flush()
        return {"kicked": closed}

    def _client_key(self, target: str) -> bytes:
        for key, name in self.names.items():
            if name == target:
                return key
        try:
            return decode_public_id(target)
        except (ValueError, TunnelError):
            raise TunnelError(f"{target!r} is neither a client name nor a public ID") from None

    def _reload_client_to_client(self, allowed: bool) -> bool:
        if allowed == self.forwarder.client_to_client:
            return False
        self.forwarder.client_to_client = allowed
        if allowed:
            self.introducer.enable()
        else:
            self.introducer.disable()  # and every direct path between clients ends
        self.flush()
        log.info("client_to_client is now %s", "on" if allowed else "off")
        return True

    def revoke_failing(self) -> int:
        """Close every live session whose credentials the current policy no longer admits."""
        revoked = self.table.revoke_failing(self.authority.still_admits)
        self.gatekeeper.revoked += revoked
        self.flush()
        return revoked

    @property
    def drops(self) -> Drops:
        """Every drop the server counted, by reason, gathered from the objects that drop."""
        drops = Drops(self.dispatcher.drops)
        drops.update(self.forwarder.drops)
        drops.update(tun_write=self.tun.write_drops, udp_send=self.endpoint.send_drops)
        return drops

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "role": "server",
            "id": self.identity.public_id,
            "listen": format_address(self.endpoint.local_address),
            "tun": self.tun.name,
            "uptime": round(trio.current_time() - self.started_at, 3),
            "pid": os.getpid(),
            "sessions": [s.status() for s in self.table.authenticated()],
            **self.dispatcher.status(),
            **self.gatekeeper.status(),
            **self.table.status(),
            **self.introducer.status(),
            "udp_gso": self.endpoint.gso,  # segmentation offload still in use
            "tun_merge": self.tun.merging,  # runs of TCP segments written as one packet
            "tun_merged": self.tun.merged,
            "drops": dict(self.drops),
            "nat64": self.forwarder.nat64_status(str(self.config.nat64.prefix)),
        }


NAT64_OWNER = ("nat64", 0)  # the pool lease holding the translator's source address


def _nat64(config: ServerConfig, authority: Authority) -> tuple[Nat64 | None, bytes, bytes]:
    """The translator, its IPv4 source (packed) and its /96 prefix's first 12 bytes, or
    (None, b"", b"") when NAT64 is off. Without a configured ``source_ip`` the translator takes
    an address of its own from the IPv4 pool: it must be one the kernel routes into our TUN,
    never a local address of the server."""
    settings = config.nat64
    if not settings.enabled:
        return None, b"", b""
    source = settings.source_ip
    if source is None:
        assert authority.pool4 is not None  # the config requires source_ip or network
        allocated = authority.pool4.allocate(NAT64_OWNER)
        assert isinstance(allocated, ipaddress.IPv4Address)  # an IPv4 pool's
        source = allocated
    translator = Nat64(
        prefix=settings.prefix,
        source_ip=source,
        port_range=settings.port_range,
        tcp_timeout=settings.tcp_timeout,
        udp_timeout=settings.udp_timeout,
        icmp_timeout=settings.icmp_timeout,
        max_mappings_per_client=settings.max_mappings_per_client,
        mtu=config.mtu,
    )
    return translator, source.packed, settings.prefix.network_address.packed[:12]


def _authority(config: ServerConfig, identity: Identity) -> Authority:
    return Authority(
        server_key=identity.public_key,
        tokens=TokenSet(config.auth_tokens),
        allowed_clients=config.allowed_clients,
        max_clients=config.max_clients,
        max_sessions_per_client=config.max_sessions_per_client,
        pool4=AddressPool(config.network, config.server_ip, key="network")
        if config.network is not None
        else None,
        pool6=AddressPool(config.network6, config.server_ip6, key="network6")
        if config.network6 is not None
        else None,
        mtu=config.mtu,
        lease_grace=config.lease_grace,
        dns=config.dns,
        dns_search=config.dns_search,
    )


def _prepare_nat64(server: Server, host_changes: Any, tun_name: str) -> None:
    """Make the kernel hand replies for the translator's source address to our TUN, and say so
    plainly if this namespace does not forward IPv4 (translated packets would go nowhere)."""
    source = ipaddress.IPv4Address(server.forwarder.nat64_source)
    pool4 = server.authority.pool4
    if pool4 is None or source not in pool4.network:
        host_changes.add_route(ipaddress.IPv4Network(f"{source}/32"), ifname=tun_name)
    if not ipv4_forwarding_enabled():
        log.warning(
            "nat64: IPv4 forwarding is off in this network namespace "
            "(net.ipv4.ip_forward = 0): translated packets will not leave this host"
        )
    log.info("nat64: %s -> IPv4 from %s", server.config.nat64.prefix, source)


def ipv4_forwarding_enabled() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as knob:
            return knob.read().strip() == "1"
    except OSError:
        return True  # cannot tell: do not warn


async def _serve_metrics(
    listen: tuple[str, int], server: Server, *, task_status: trio.TaskStatus[Any]
) -> None:
    metrics = MetricsServer(*listen, lambda: server_metrics(server.status()))
    await metrics.serve(task_status=task_status)


def _text(request: dict[str, Any], key: str) -> str:
    value = request.get(key, "")
    if not isinstance(value, str) or len(value) > 200:
        raise TunnelError(f"{key!r} must be a string of at most 200 characters")
    return value


def _status(server: Server | None) -> dict[str, Any]:
    # The control socket is served only once the server exists.
    assert server is not None
    return server.status()


async def run_server(
    config: ServerConfig, options: RunOptions, platform: Platform = SYSTEM
) -> None:
    """Run the server until SIGTERM/SIGINT (or until cancelled)."""
    check_ready_fd(options.ready_fd)
    identity = read_key_file(config.key_file)
    server: Server | None = None
    # First, so that a second daemon with the same config is refused before touching anything.
    control = ControlServer(
        control_socket_path(config.control_socket),
        lambda: _status(server),
        mode=config.control_socket_mode,
        group=group_id(config.control_socket_group),
    )
    with contextlib.ExitStack() as undo:
        # Synchronous undo on purpose: it cannot be cancelled halfway.
        undo.callback(control.close)
        await control.bind()
        state = platform.state_file(state_path(config.state_dir, "server", config.control_socket))
        if state.get(MASQUERADE_STATE_KEY) is not None and Masquerade.recover(
            Nftables(), config.tun_name, state
        ):
            log.warning("removed the masquerade and forwarding a previous server left")
        tun = platform.open_tun(config.tun_name)
        undo.callback(tun.close)
        host_changes = platform.host_changes()
        undo.callback(host_changes.close)
        undo.callback(host_changes.undo)
        endpoint = await platform.open_udp(
            config.listen_host, config.listen_port, key="listen", reply_from_target=True
        )
        undo.callback(endpoint.close)
        server = Server(config, identity, endpoint, tun, options.config_path)
        control.handle(
            "kick", lambda request: server.kick(_text(request, "client"), _text(request, "reason"))
        )
        host_changes.bring_up(tun.name, config.mtu)
        pools = [p for p in (server.authority.pool4, server.authority.pool6) if p is not None]
        for pool in pools:
            host_changes.add_address(tun.name, pool.server_ip, pool.network.prefixlen)
        if config.masquerade and pools:
            masquerade = Masquerade(
                Nftables(),
                tun_name=tun.name,
                pools=[p.network for p in pools if p.network.version == 4],
                state=state,
            )
            masquerade.start()
            undo.callback(masquerade.stop)
        if server.forwarder.nat64 is not None:
            _prepare_nat64(server, host_changes, tun.name)
        log.info(
            "server %s listening on %s, %s up (%s)",
            identity.public_id,
            format_address(endpoint.local_address),
            tun.name,
            ", ".join(f"{p.server_ip}/{p.network.prefixlen}" for p in pools),
        )
        running = server
        notifier = Notifier.from_environment()

        def reload(via: str) -> dict[str, Any]:
            notifier.reloading()
            try:
                return running.reload(via=via)
            finally:
                notifier.ready(status=running.summary())

        control.handle("reload", lambda _request: reload("tunnel reload"))
        control.handle(
            "metrics", lambda _request: {"text": render(server_metrics(running.status())).decode()}
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, nursery.cancel_scope, lambda: reload("SIGHUP"))
            nursery.start_soon(control.serve)
            await nursery.start(server.run)
            if config.metrics_listen is not None:
                await nursery.start(_serve_metrics, config.metrics_listen, server)
            notify_ready(options.ready_fd)
            notifier.ready(status=server.summary())
            nursery.start_soon(notifier.run_watchdog)
            nursery.start_soon(report_status, notifier, server.summary)
        notifier.stopping()
        log.info("server stopped")
