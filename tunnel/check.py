"""``tunnel check --config FILE``: is this config and this host ready to run it?

Every check looks and changes nothing: the config is validated as the daemon would, the key
file read, /dev/net/tun opened without creating a device, the capabilities read from
/proc/self/status, sysctls read, libnftables loaded where the config needs it, and for a
client the server's name resolved and its pinned identity checked by a QUIC handshake that
stops before authentication (no token is sent, no address leased). Each check is one line of
the report; the exit code is 0 only if none failed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from tunnel.config import ClientConfig, ServerConfig, load_client_config, load_server_config
from tunnel.errors import TunnelError

CAP_NET_ADMIN = 12
REACH_TIMEOUT = 10.0  # seconds for the server's name and identity, together


@attrs.frozen
class Finding:
    """One line of the report."""

    ok: bool
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}: {self.detail}"


def check(path: Path) -> list[Finding]:
    """Every check for the config at ``path``; stops after the config if it does not load."""
    try:
        config = _load(path)
    except TunnelError as exc:
        return [Finding(False, "config", str(exc))]
    role = "server" if isinstance(config, ServerConfig) else "client"
    findings = [Finding(True, "config", f"{path}: a valid {role} config")]
    findings += [_run(name, probe) for name, probe in _host_checks(config)]
    if isinstance(config, ClientConfig):
        findings.append(_run("server", lambda: _server_reachable(config)))
    return findings


def _load(path: Path) -> ServerConfig | ClientConfig:
    from tunnel.config import _read_toml  # the same reader, to pick the kind

    if "server" in _read_toml(path):
        return load_client_config(path)
    return load_server_config(path)


def _run(what: str, probe: Callable[[], str]) -> Finding:
    try:
        return Finding(True, what, probe())
    except TunnelError as exc:
        return Finding(False, what, str(exc))
    except OSError as exc:
        return Finding(False, what, exc.strerror or str(exc))


def _host_checks(config: ServerConfig | ClientConfig) -> Iterator[tuple[str, Callable[[], str]]]:
    if config.key_file is not None:
        key_file = config.key_file
        yield "key", lambda: _key(key_file)
    yield "tun", _tun
    yield "capabilities", _net_admin
    if isinstance(config, ServerConfig):
        if config.nat64.enabled and not config.masquerade:
            yield "forwarding", _ipv4_forwarding
        if config.masquerade:
            yield "nftables", _nftables
    else:
        if config.kill_switch:
            yield "nftables", _nftables


def _key(path: Path) -> str:
    from tunnel.keyfile import read_key_file

    return f"{path}: identity {read_key_file(path).public_id}"


def _tun() -> str:
    # Opening the clone device creates nothing until TUNSETIFF, which we never send.
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        hint = " (load the tun module, or give the container the device)" if exc.errno in (
            errno.ENOENT, errno.ENODEV, errno.ENXIO) else ""  # fmt: skip
        raise TunnelError(f"cannot open /dev/net/tun: {exc.strerror}{hint}") from None
    os.close(fd)
    return "/dev/net/tun opens"


def _net_admin() -> str:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    effective = int(fields["CapEff"].strip(), 16)
    if not effective >> CAP_NET_ADMIN & 1:
        raise TunnelError("no CAP_NET_ADMIN: run as root or grant the capability")
    return "CAP_NET_ADMIN"


def _ipv4_forwarding() -> str:
    from tunnel.daemon.sysctl import read_sysctl, sysctl_path

    if read_sysctl(sysctl_path("net.ipv4.ip_forward")) != "1":
        raise TunnelError(
            "net.ipv4.ip_forward is 0: NAT64's translated packets would not leave this host"
            " (turn it on, or set masquerade = true)"
        )
    return "net.ipv4.ip_forward = 1"


def _nftables() -> str:
    from tunnel.daemon.nft import Nftables

    Nftables().ruleset_text()  # loads libnftables and reads the ruleset, changing nothing
    return "libnftables answers"


def _server_reachable(config: ClientConfig) -> str:
    import trio

    answer: str = trio.run(_handshake, config)
    return answer


async def _handshake(config: ClientConfig) -> str:
    """Resolve the server and race handshakes to its addresses until one presents the pinned
    key; then stop, before the tunnel handshake (nothing is sent that authenticates)."""
    import trio

    from tunnel.config import RunOptions
    from tunnel.core.identity import Identity
    from tunnel.daemon.client import Client
    from tunnel.daemon.connector import race
    from tunnel.daemon.udp import format_address

    client = Client(config, Identity.generate(), RunOptions())
    try:
        with trio.fail_after(REACH_TIMEOUT):
            candidates = await client.platform.resolve_all(
                config.server_host, config.server_port, key="server"
            )
            async with trio.open_nursery() as nursery:
                won: Any = await race(nursery, candidates, client.supervisor._attempt, delay=0.25)
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise TunnelError(
            f"no verified answer from {config.server_host}:{config.server_port} within"
            f" {REACH_TIMEOUT:g} s"
        ) from None
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise TunnelError(str(leaf)) from None
    finally:
        client.network.host.close()
    return f"{format_address(won.value.server_addr)} presents the pinned identity"
