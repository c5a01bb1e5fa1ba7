"""Configuration of the two daemons: frozen attrs classes, their validation, and the loaders.

Validation is pure: :func:`server_config_from_dict` and :func:`client_config_from_dict` turn
an already-parsed TOML table into a config object and open nothing. The loaders
(:func:`load_server_config`, :func:`load_client_config`) read the TOML file and the token
files it names. Every error is a :class:`tunnel.errors.ConfigError` whose message is one line
starting with the file and the key, e.g. ``server.toml: network: '10.0.0.0/33' is not an
IPv4 network``. Unknown keys are errors, so a typo never silently falls back to a default.

Tokens are secrets: no message quotes one, and the config classes leave them out of repr.
docs/CONFIG.md documents every key.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any, TypeVar

import attrs

from tunnel.core.identity import decode_public_id
from tunnel.core.messages import MAX_DNS_SEARCH, MAX_DNS_SERVERS
from tunnel.core.resolvconf import valid_search_domain
from tunnel.core.tokens import parse_token_file, validate_token
from tunnel.errors import ConfigError

__all__ = [
    "DEFAULT_CLIENT_SOCKET",
    "DEFAULT_SERVER_SOCKET",
    "ClientConfig",
    "Nat64Config",
    "RunOptions",
    "ServerConfig",
    "client_config_from_dict",
    "load_client_config",
    "load_control_socket",
    "load_server_config",
    "read_auth_tokens_file",
    "server_config_from_dict",
]

T = TypeVar("T")

DEFAULT_PORT = 4433
DEFAULT_MTU = 1420
MIN_MTU = 576
MAX_MTU = 65535
IPV6_MIN_MTU = 1280
"""RFC 8200: a link carrying IPv6 must have an MTU of at least 1280."""
MAX_IPV4_PREFIX = 30
MAX_IPV6_PREFIX = 126
DEFAULT_TUN_NAME = "tunnel%d"
# Finite by default: every session costs memory, and an address pool is not a limit on a
# server with an IPv6 /64.
DEFAULT_MAX_CLIENTS = 1024
# A laptop and a phone, plus a restarted client whose old session has not yet timed out.
DEFAULT_MAX_SESSIONS_PER_CLIENT = 4
DEFAULT_SERVER_SOCKET = Path("/run/tunnel/server.sock")
DEFAULT_CLIENT_SOCKET = Path("/run/tunnel/client.sock")
# Records of host changes that outlive a killed daemon (a replaced resolv.conf, a sysctl): on
# disk that survives a reboot, because so does /etc/resolv.conf.
DEFAULT_STATE_DIR = Path("/var/lib/tunnel")
# The mark on the client's own QUIC sockets, and the number of its routing table (wg-quick's
# way: one number for both).
DEFAULT_FWMARK = 51830
DEFAULT_SOCKET_MODE = 0o660
MAX_CLIENT_NAMES = 65536
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
NAT64_WELL_KNOWN_PREFIX = IPv6Network("64:ff9b::/96")
_IFNAMSIZ = 16  # Linux interface names are at most 15 bytes plus NUL
_MAX_FILE_SIZE = 1 << 20  # config and token files are small; refuse to slurp a huge one


# --- the config classes -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Nat64Config:
    """The ``[nat64]`` table of the server config: stateful NAT64 for IPv6-only clients."""

    enabled: bool = False
    prefix: IPv6Network = NAT64_WELL_KNOWN_PREFIX
    """The /96 that embeds IPv4 addresses (RFC 6052)."""
    source_ip: IPv4Address | None = None
    """IPv4 source of translated packets; None: an address of the IPv4 pool, reserved for it."""
    port_range: tuple[int, int] = (32768, 65535)
    """Inclusive range of translated source ports (and ICMP identifiers)."""
    tcp_timeout: float = 300.0
    udp_timeout: float = 30.0
    icmp_timeout: float = 30.0
    max_mappings_per_client: int = 1024
    """Mappings one client may hold at once, so that no client can take every port."""


@attrs.frozen(kw_only=True)
class ServerConfig:
    """A validated server config (``server.toml``).

    Address fields that are None mean "not configured" (``network``/``network6``) or "the
    first host address of the network" (``server_ip``/``server_ip6``). ``auth_tokens`` holds
    the tokens after loading, whether they came inline or from ``auth_tokens_file`` (kept so
    that a reload can read the file again).
    """

    key_file: Path
    listen_host: str = "::"
    listen_port: int = DEFAULT_PORT
    network: IPv4Network | None = None
    server_ip: IPv4Address | None = None
    network6: IPv6Network | None = None
    server_ip6: IPv6Address | None = None
    auth_tokens: tuple[str, ...] = attrs.field(default=(), repr=False)
    auth_tokens_file: Path | None = None
    allowed_clients: frozenset[bytes] | None = None
    """Public keys allowed to connect; None: any client holding a valid token."""
    mtu: int = DEFAULT_MTU
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    """Sessions one client identity may hold at once (each device is one)."""
    client_to_client: bool = False
    tun_name: str = DEFAULT_TUN_NAME
    control_socket: Path = DEFAULT_SERVER_SOCKET
    handshake_timeout: float = 5.0
    lease_grace: float = 60.0
    """Seconds a released address stays reserved for the same client to come back."""
    nat64: Nat64Config = Nat64Config()
    dns: tuple[IPv4Address | IPv6Address, ...] = ()
    """Resolvers pushed to clients in the handshake."""
    dns_search: tuple[str, ...] = ()
    """Search domains pushed to clients."""
    masquerade: bool = False
    """Be the clients' exit: forward their IPv4 traffic and masquerade it with our address."""
    state_dir: Path = DEFAULT_STATE_DIR
    clients: Mapping[str, bytes] = attrs.field(factory=dict)
    """The operator's names for client keys ([clients]: name = public ID), for status, logs,
    metrics and ``tunnel kick NAME``."""
    control_socket_mode: int = DEFAULT_SOCKET_MODE
    control_socket_group: str | None = None
    """Group owning the control socket: its members may read status (not kick or reload)."""
    metrics_listen: tuple[str, int] | None = None
    """Where to serve Prometheus metrics (``/metrics``); None: nowhere."""


@attrs.frozen(kw_only=True)
class ClientConfig:
    """A validated client config (``client.toml``)."""

    server_host: str
    """Host name or IP literal (without brackets) of the server."""
    server_port: int
    server_id: bytes
    """The pinned 32-byte Ed25519 public key of the server."""
    auth_token: str | None = attrs.field(default=None, repr=False)
    auth_token_file: Path | None = None
    key_file: Path | None = None
    """None: a fresh ephemeral identity for each run."""
    routes: tuple[IPv4Network, ...] = ()
    routes6: tuple[IPv6Network, ...] = ()
    mtu: int = DEFAULT_MTU
    auto_reconnect: bool = True
    peer_to_peer: bool = True  # direct paths to other clients, where the server introduces them
    max_reconnect_attempts: int | None = None
    """None: retry forever."""
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 30.0
    tun_name: str = DEFAULT_TUN_NAME
    control_socket: Path = DEFAULT_CLIENT_SOCKET
    handshake_timeout: float = 10.0
    accept_dns: bool = True
    """Use the resolvers and search domains the server pushes while connected."""
    kill_switch: bool = False
    """From start until a clean stop, nothing leaves but the tunnel and QUIC to the server."""
    allow_ipv6_outside: bool = False
    """A full IPv4 tunnel without an IPv6 default lets global IPv6 use the underlay."""
    fwmark: int = DEFAULT_FWMARK
    """The mark of our QUIC sockets and the number of our routing table."""
    state_dir: Path = DEFAULT_STATE_DIR
    control_socket_mode: int = DEFAULT_SOCKET_MODE
    control_socket_group: str | None = None
    metrics_listen: tuple[str, int] | None = None

    @property
    def full_tunnel(self) -> bool:
        """Does a default route (of either family) go through the tunnel?"""
        return any(net.prefixlen == 0 for net in self.routes) or any(
            net.prefixlen == 0 for net in self.routes6
        )


@attrs.frozen(kw_only=True)
class RunOptions:
    """Command-line options of ``tunnel server`` / ``tunnel client`` that are not config."""

    log_level: str = "info"
    ready_fd: int | None = None
    """File descriptor to write a newline to (and close) once the daemon is ready."""
    config_path: Path | None = None
    """The config file, for reloads."""


# --- the table reader: typed getters whose errors name the file and the key ---------------

_MISSING: Any = object()


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


class _Table:
    """One TOML table under validation.

    Checks for unknown keys up front (so a misspelt key is reported rather than the
    "missing" error it causes), then hands out typed values.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        source: str,
        base_dir: Path,
        known: frozenset[str],
        prefix: str = "",
    ) -> None:
        self.source = source
        self.base_dir = base_dir
        self._data = data
        self._prefix = prefix
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {prefix + key!r}")

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._prefix}{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def _raw(self, key: str, default: Any, check: Callable[[Any], bool], what: str) -> Any:
        if key not in self._data:
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        value = self._data[key]
        if not check(value):
            raise self.error(key, f"must be {what}, not {_toml_type(value)}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> Any:
        return self._raw(key, default, lambda v: isinstance(v, str), "a string")

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._raw(key, default, lambda v: isinstance(v, bool), "a boolean")

    def array(self, key: str, default: Any = _MISSING) -> Any:
        return self._raw(key, default, lambda v: isinstance(v, list), "an array")

    def table(self, key: str) -> Mapping[str, Any]:
        return self._raw(key, {}, lambda v: isinstance(v, dict), "a table")

    def integer(
        self, key: str, default: Any = _MISSING, *, lo: int = 0, hi: int | None = None
    ) -> Any:
        # bool is an int subclass in Python; TOML's true is not a number.
        value = self._raw(
            key,
            default,
            lambda v: isinstance(v, int) and not isinstance(v, bool),
            "an integer",
        )
        if not self.has(key):
            return value
        if value < lo or (hi is not None and value > hi):
            bounds = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
            raise self.error(key, f"must be {bounds}, not {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
        """A float (integers accepted) that is finite and > 0 (positive) or >= 0."""
        value = self._raw(
            key,
            default,
            lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            "a number",
        )
        if not self.has(key):
            return value
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, not {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be greater than 0, not {value}")
        if value < 0:
            raise self.error(key, f"must not be negative, not {value}")
        return float(value)

    def path(self, key: str, default: Any = _MISSING) -> Any:
        """A path; relative paths are taken relative to the config file's directory."""
        text = self.string(key, default)
        if not self.has(key):
            return text
        if not text or "\0" in text:
            raise self.error(key, f"{text!r} is not a file name")
        return self.base_dir / text

    def parsed(self, key: str, parse: Callable[[str], T], default: Any = _MISSING) -> T:
        """A string turned into a value by ``parse``, which raises ValueError or
        ConfigError with a message that does not name the key."""
        text = self.string(key, default)
        if not self.has(key):
            return text
        return self._parse(key, parse, text)

    def converted(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        """A value of any TOML type turned into a value by ``convert`` (as for ``parsed``)."""
        if not self.has(key):
            return default
        return self._parse(key, convert, self._data[key])

    def parsed_list(self, key: str, parse: Callable[[str], T]) -> tuple[T, ...] | None:
        """An array of strings, each turned into a value by ``parse``; None if absent.
        Errors name the element as ``key[index]``."""
        items = self.array(key, None)
        if items is None:
            return None
        values = []
        for index, item in enumerate(items):
            name = f"{key}[{index}]"
            if not isinstance(item, str):
                raise self.error(name, f"must be a string, not {_toml_type(item)}")
            values.append(self._parse(name, parse, item))
        return tuple(values)

    def _parse(self, key: str, parse: Callable[[Any], T], value: Any) -> T:
        try:
            return parse(value)
        except (ValueError, ConfigError) as exc:
            raise self.error(key, str(exc)) from None


# --- parsers of single values: raise ValueError (or ConfigError) with a keyless message ----

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_hostname(text: str) -> bool:
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return 0 < len(text) <= 253 and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def _parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host without brackets, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else None
        if inner is None:
            raise ValueError(f"{text!r}: unbalanced brackets")
        try:
            IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{text!r}: {inner!r} is not an IPv6 address") from None
        host = inner
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as '[::1]:4433'")
    elif not _is_hostname(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    elif host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        # All-numeric last label: it is meant as an IPv4 literal, so it must be one.
        try:
            IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def _network_parser(
    cls: type[IPv4Network] | type[IPv6Network], family: str
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return cls(text, strict=True)
        except ValueError:
            pass
        try:
            loose = cls(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an {family} network") from None
        raise ValueError(f"{text!r} has host bits set (did you mean '{loose}'?)")

    return parse


def _address_parser(
    cls: type[IPv4Address] | type[IPv6Address], family: str
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return cls(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an {family} address") from None

    return parse


_ipv4_network = _network_parser(IPv4Network, "IPv4")
_ipv6_network = _network_parser(IPv6Network, "IPv6")
_ipv4_address = _address_parser(IPv4Address, "IPv4")
_ipv6_address = _address_parser(IPv6Address, "IPv6")


def _tun_name(text: str) -> str:
    # The rules of the kernel's dev_valid_name() and dev_alloc_name().
    if not text or text in (".", ".."):
        raise ValueError(f"{text!r} is not an interface name")
    if len(text.encode("utf-8", "surrogatepass")) >= _IFNAMSIZ:
        raise ValueError(f"{text!r} is longer than {_IFNAMSIZ - 1} bytes")
    if any(ch == "/" or ch == ":" or ch.isspace() for ch in text):
        raise ValueError(f"{text!r} must not contain '/', ':' or white space")
    percent = text.find("%")
    if percent >= 0 and (text[percent + 1 : percent + 2] != "d" or "%" in text[percent + 2 :]):
        raise ValueError(f"{text!r}: the only '%' allowed is a single '%d'")
    return text


def _port_range(value: object) -> tuple[int, int]:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", value)
        if match is None:
            raise ValueError(f"{value!r} is not a range like '32768-65535'")
        low, high = int(match[1]), int(match[2])
    elif (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        low, high = value
    else:
        raise ValueError("must be a string 'low-high' or an array [low, high] of integers")
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{low}-{high} is not a port range (need 1 <= low <= high <= 65535)")
    return low, high


# --- cross-key checks shared by both configs -----------------------------------------------


def _check_prefix(table: _Table, key: str, net: IPv4Network | IPv6Network, limit: int) -> None:
    if net.prefixlen > limit:
        raise table.error(
            key,
            f"'{net}' is too small for a tunnel network (the prefix must be /{limit} or shorter)",
        )


def _check_server_ip(
    table: _Table,
    key: str,
    ip: IPv4Address | IPv6Address | None,
    net_key: str,
    net: IPv4Network | IPv6Network | None,
) -> None:
    if ip is None:
        return
    if net is None:
        raise table.error(key, f"needs {net_key!r}")
    if ip not in net:
        raise table.error(key, f"'{ip}' is not inside {net_key} '{net}'")
    if ip == net.network_address:
        raise table.error(key, f"'{ip}' is the network address of '{net}'")
    if isinstance(net, IPv4Network) and ip == net.broadcast_address:
        raise table.error(key, f"'{ip}' is the broadcast address of '{net}'")


def _check_mtu(table: _Table, mtu: int, ipv6_reason: str | None) -> None:
    if ipv6_reason is not None and mtu < IPV6_MIN_MTU:
        raise table.error("mtu", f"{mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum ({ipv6_reason})")


# --- the server config ---------------------------------------------------------------------

_SERVER_KEYS = frozenset(
    {
        "listen", "key_file", "network", "server_ip", "network6", "server_ip6",
        "auth_tokens", "auth_tokens_file", "allowed_clients", "mtu", "max_clients",
        "max_sessions_per_client", "client_to_client", "tun_name", "control_socket",
        "handshake_timeout", "lease_grace", "nat64", "dns", "dns_search", "masquerade",
        "state_dir", "clients", "control_socket_mode", "control_socket_group",
        "metrics_listen",
    }
)  # fmt: skip
_NAT64_KEYS = frozenset(
    {
        "enabled", "prefix", "source_ip", "port_range", "tcp_timeout", "udp_timeout",
        "icmp_timeout", "max_mappings_per_client",
    }
)  # fmt: skip


def server_config_from_dict(
    data: Mapping[str, Any], *, source: str = "server.toml", base_dir: Path = Path(".")
) -> ServerConfig:
    """Validate a parsed server TOML table. Pure: opens nothing.

    ``source`` starts every error message; relative paths are taken relative to
    ``base_dir``. With ``auth_tokens_file`` the result's ``auth_tokens`` is empty: the caller
    reads the file (:func:`load_server_config` does). Raises :class:`ConfigError`.
    """
    t = _Table(data, source=source, base_dir=base_dir, known=_SERVER_KEYS)
    listen_host, listen_port = t.parsed("listen", _parse_endpoint, ("::", DEFAULT_PORT))
    key_file = t.path("key_file")

    network = t.parsed("network", _ipv4_network, None)
    if network is not None:
        _check_prefix(t, "network", network, MAX_IPV4_PREFIX)
    server_ip = t.parsed("server_ip", _ipv4_address, None)
    _check_server_ip(t, "server_ip", server_ip, "network", network)
    network6 = t.parsed("network6", _ipv6_network, None)
    if network6 is not None:
        _check_prefix(t, "network6", network6, MAX_IPV6_PREFIX)
    server_ip6 = t.parsed("server_ip6", _ipv6_address, None)
    _check_server_ip(t, "server_ip6", server_ip6, "network6", network6)
    if network is None and network6 is None:
        raise t.error("network", "at least one of 'network' and 'network6' is required")

    auth_tokens = t.parsed_list("auth_tokens", validate_token)
    auth_tokens_file = t.path("auth_tokens_file", None)
    if auth_tokens is not None and auth_tokens_file is not None:
        raise t.error("auth_tokens_file", "cannot be combined with 'auth_tokens'")
    if auth_tokens is None and auth_tokens_file is None:
        raise t.error("auth_tokens", "one of 'auth_tokens' and 'auth_tokens_file' is required")
    if auth_tokens is not None and not auth_tokens:
        raise t.error("auth_tokens", "must hold at least one token")

    allowed = t.parsed_list("allowed_clients", decode_public_id)
    if allowed is not None and not allowed:
        raise t.error("allowed_clients", "must not be empty (leave it out to allow any client)")

    mtu = t.integer("mtu", DEFAULT_MTU, lo=MIN_MTU, hi=MAX_MTU)
    _check_mtu(t, mtu, "network6 is set" if network6 is not None else None)

    nat64 = _nat64_from_table(t, network, network6)
    masquerade = t.boolean("masquerade", False)
    if masquerade and network is None:
        raise t.error("masquerade", "masquerade translates IPv4 and needs 'network'")

    return ServerConfig(
        key_file=key_file,
        listen_host=listen_host,
        listen_port=listen_port,
        network=network,
        server_ip=server_ip,
        network6=network6,
        server_ip6=server_ip6,
        auth_tokens=tuple(dict.fromkeys(auth_tokens or ())),
        auth_tokens_file=auth_tokens_file,
        allowed_clients=None if allowed is None else frozenset(allowed),
        mtu=mtu,
        max_clients=t.integer("max_clients", DEFAULT_MAX_CLIENTS, lo=1),
        max_sessions_per_client=t.integer(
            "max_sessions_per_client", DEFAULT_MAX_SESSIONS_PER_CLIENT, lo=1
        ),
        client_to_client=t.boolean("client_to_client", False),
        tun_name=t.parsed("tun_name", _tun_name, DEFAULT_TUN_NAME),
        control_socket=t.path("control_socket", DEFAULT_SERVER_SOCKET),
        handshake_timeout=t.number("handshake_timeout", 5.0, positive=True),
        lease_grace=t.number("lease_grace", 60.0),
        nat64=nat64,
        dns=_dns_servers(t),
        dns_search=_dns_search(t),
        masquerade=masquerade,
        state_dir=t.path("state_dir", DEFAULT_STATE_DIR),
        clients=_client_names(t),
        control_socket_mode=_socket_mode(t),
        control_socket_group=_socket_group(t),
        metrics_listen=t.parsed("metrics_listen", _parse_endpoint, None),
    )


def _client_names(parent: _Table) -> dict[str, bytes]:
    table = parent.table("clients")
    if len(table) > MAX_CLIENT_NAMES:
        raise parent.error("clients", f"names {len(table)} clients; at most {MAX_CLIENT_NAMES}")
    names: dict[str, bytes] = {}
    seen: dict[bytes, str] = {}
    for name, value in table.items():
        where = f"clients.{name}" if _CLIENT_NAME.fullmatch(name) else "clients"
        if not _CLIENT_NAME.fullmatch(name):
            raise parent.error(where, f"{name!r} is not a name (letters, digits, . _ @ -)")
        if not isinstance(value, str):
            raise parent.error(where, f"must be a public ID string, not {_toml_type(value)}")
        try:
            key = decode_public_id(value)
        except (ValueError, ConfigError) as exc:
            raise parent.error(where, str(exc)) from None
        if key in seen:
            raise parent.error(where, f"names the same client as {seen[key]!r}")
        seen[key] = name
        names[name] = key
    return names


def _socket_mode(t: _Table) -> int:
    text = t.string("control_socket_mode", None)
    if text is None:
        return DEFAULT_SOCKET_MODE
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise t.error("control_socket_mode", f'{text!r} is not an octal mode like "0660"')
    mode = int(text, 8)
    if mode & 0o600 != 0o600:
        raise t.error("control_socket_mode", f"{text!r}: the owner needs read and write")
    if mode & 0o007:
        raise t.error("control_socket_mode", f"{text!r}: no access for others (use a group)")
    return mode


def _socket_group(t: _Table) -> str | None:
    group = t.string("control_socket_group", None)
    if group is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+", group):
        raise t.error("control_socket_group", f"{group!r} is not a group name or number")
    return group


def _dns_servers(t: _Table) -> tuple[IPv4Address | IPv6Address, ...]:
    servers = t.parsed_list("dns", _resolver_address) or ()
    if len(servers) > MAX_DNS_SERVERS:
        raise t.error("dns", f"lists {len(servers)} resolvers; at most {MAX_DNS_SERVERS}")
    return tuple(dict.fromkeys(servers))


def _dns_search(t: _Table) -> tuple[str, ...]:
    domains = t.parsed_list("dns_search", _search_domain) or ()
    if len(domains) > MAX_DNS_SEARCH:
        raise t.error("dns_search", f"lists {len(domains)} domains; at most {MAX_DNS_SEARCH}")
    if domains and not t.has("dns"):
        raise t.error("dns_search", "needs 'dns': clients apply search domains with resolvers")
    return tuple(dict.fromkeys(domains))


def _resolver_address(text: str) -> IPv4Address | IPv6Address:
    try:
        address = ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if address.is_unspecified or address.is_multicast or address.is_link_local:
        raise ValueError(f"{text!r} cannot be a resolver address")
    return address


def _search_domain(text: str) -> str:
    if not valid_search_domain(text):
        raise ValueError(f"{text!r} is not a domain name")
    return text


def _nat64_from_table(
    parent: _Table, network: IPv4Network | None, network6: IPv6Network | None
) -> Nat64Config:
    t = _Table(
        parent.table("nat64"),
        source=parent.source,
        base_dir=parent.base_dir,
        known=_NAT64_KEYS,
        prefix="nat64.",
    )
    enabled = t.boolean("enabled", False)
    prefix = t.parsed("prefix", _ipv6_network, NAT64_WELL_KNOWN_PREFIX)
    if prefix.prefixlen != 96:
        raise t.error("prefix", f"'{prefix}' must be a /96")
    if network6 is not None and prefix.overlaps(network6):
        raise t.error("prefix", f"'{prefix}' overlaps network6 '{network6}'")
    source_ip = t.parsed("source_ip", _ipv4_address, None)
    config = Nat64Config(
        enabled=enabled,
        prefix=prefix,
        source_ip=source_ip,
        port_range=t.converted("port_range", _port_range, (32768, 65535)),
        tcp_timeout=t.number("tcp_timeout", 300.0, positive=True),
        udp_timeout=t.number("udp_timeout", 30.0, positive=True),
        icmp_timeout=t.number("icmp_timeout", 30.0, positive=True),
        max_mappings_per_client=t.integer("max_mappings_per_client", 1024, lo=1),
    )
    if enabled and network6 is None:
        raise t.error("enabled", "NAT64 needs 'network6' (it serves IPv6 clients)")
    if enabled and source_ip is None and network is None:
        raise t.error("enabled", "NAT64 needs 'nat64.source_ip' or 'network' for its IPv4 source")
    if source_ip is not None and network is not None and source_ip in network:
        # The pool could hand it to a client, or it is the server's own address.
        raise t.error(
            "source_ip",
            f"{source_ip} is inside 'network' {network}; pick an address outside it, or leave "
            "source_ip out to take one from the pool",
        )
    return config


# --- the client config ---------------------------------------------------------------------

_CLIENT_KEYS = frozenset(
    {
        "server", "server_id", "auth_token", "auth_token_file", "key_file", "routes",
        "routes6", "mtu", "auto_reconnect", "peer_to_peer", "max_reconnect_attempts",
        "heartbeat_interval", "heartbeat_timeout", "tun_name", "control_socket",
        "handshake_timeout", "accept_dns", "kill_switch", "allow_ipv6_outside", "fwmark",
        "state_dir", "control_socket_mode", "control_socket_group", "metrics_listen",
    }
)  # fmt: skip


def client_config_from_dict(
    data: Mapping[str, Any], *, source: str = "client.toml", base_dir: Path = Path(".")
) -> ClientConfig:
    """Validate a parsed client TOML table. Pure: opens nothing.

    With ``auth_token_file`` the result's ``auth_token`` is None: the caller reads the file
    (:func:`load_client_config` does). Raises :class:`ConfigError`.
    """
    t = _Table(data, source=source, base_dir=base_dir, known=_CLIENT_KEYS)
    server_host, server_port = t.parsed("server", _parse_endpoint)
    server_id = t.parsed("server_id", decode_public_id)
    auth_token = t.parsed("auth_token", validate_token, None)
    auth_token_file = t.path("auth_token_file", None)
    if auth_token is not None and auth_token_file is not None:
        raise t.error("auth_token_file", "cannot be combined with 'auth_token'")
    routes = t.parsed_list("routes", _ipv4_network) or ()
    routes6 = t.parsed_list("routes6", _ipv6_network) or ()
    mtu = t.integer("mtu", DEFAULT_MTU, lo=MIN_MTU, hi=MAX_MTU)
    _check_mtu(t, mtu, "routes6 is not empty" if routes6 else None)
    heartbeat_interval = t.number("heartbeat_interval", 10.0, positive=True)
    heartbeat_timeout = t.number("heartbeat_timeout", 30.0, positive=True)
    if heartbeat_timeout <= heartbeat_interval:
        raise t.error(
            "heartbeat_timeout",
            f"{heartbeat_timeout} must be greater than heartbeat_interval ({heartbeat_interval})",
        )
    tun_name = t.parsed("tun_name", _tun_name, DEFAULT_TUN_NAME)
    kill_switch = t.boolean("kill_switch", False)
    if kill_switch and "%" in tun_name:
        # The firewall lets the tunnel's device through by name, before the device exists.
        raise t.error("kill_switch", f"needs a fixed 'tun_name', not the template {tun_name!r}")
    return ClientConfig(
        server_host=server_host,
        server_port=server_port,
        server_id=server_id,
        auth_token=auth_token,
        auth_token_file=auth_token_file,
        key_file=t.path("key_file", None),
        routes=routes,
        routes6=routes6,
        mtu=mtu,
        auto_reconnect=t.boolean("auto_reconnect", True),
        peer_to_peer=t.boolean("peer_to_peer", True),
        max_reconnect_attempts=t.integer("max_reconnect_attempts", None, lo=1),
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        tun_name=tun_name,
        control_socket=t.path("control_socket", DEFAULT_CLIENT_SOCKET),
        handshake_timeout=t.number("handshake_timeout", 10.0, positive=True),
        accept_dns=t.boolean("accept_dns", True),
        kill_switch=kill_switch,
        allow_ipv6_outside=t.boolean("allow_ipv6_outside", False),
        fwmark=t.integer("fwmark", DEFAULT_FWMARK, lo=1, hi=0xFFFF_FFFF),
        state_dir=t.path("state_dir", DEFAULT_STATE_DIR),
        control_socket_mode=_socket_mode(t),
        control_socket_group=_socket_group(t),
        metrics_listen=t.parsed("metrics_listen", _parse_endpoint, None),
    )


# --- the loaders: the only functions here that read files ----------------------------------


def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_SIZE:
        raise ConfigError(f"{path}: {what} is larger than {_MAX_FILE_SIZE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None


_TOML_POSITION = re.compile(r"(.*) \(at line (\d+), column \d+\)", re.DOTALL)


def _read_toml(path: Path) -> dict[str, Any]:
    text = _read_text(path, "config file")
    try:
        return tomllib.loads(text)
    except RecursionError:
        # tomllib recurses once per nesting level of arrays and inline tables.
        raise ConfigError(f"{path}: invalid TOML (nested too deeply)") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.fullmatch(message)
        if match is not None:
            raise ConfigError(f"{path}: line {match[2]}: invalid TOML ({match[1]})") from None
        message = message.removesuffix(" (at end of document)")
        raise ConfigError(f"{path}: end of file: invalid TOML ({message})") from None


def read_auth_tokens_file(path: Path) -> tuple[str, ...]:
    """Read a token file (one token a line, ``#`` comments): the tokens, maybe none.

    For the server's start and reloads. Raises :class:`ConfigError` (or its subclass
    :class:`tunnel.errors.TokenError`) naming the file and, for a bad token, the line.
    """
    return tuple(dict.fromkeys(parse_token_file(_read_text(path, "token file"), source=str(path))))


def _tokens_from_file(table_source: str, key: str, path: Path) -> tuple[str, ...]:
    try:
        return read_auth_tokens_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{table_source}: {key}: {exc}") from None


def load_server_config(path: Path) -> ServerConfig:
    """Read and validate a server config file, and the token file it names.

    Relative paths inside are taken relative to the file's directory. Raises
    :class:`ConfigError` with one line naming the file and the key.
    """
    config = server_config_from_dict(
        _read_toml(path), source=str(path), base_dir=path.absolute().parent
    )
    if config.auth_tokens_file is not None:
        tokens = _tokens_from_file(str(path), "auth_tokens_file", config.auth_tokens_file)
        if not tokens:
            raise ConfigError(
                f"{path}: auth_tokens_file: {config.auth_tokens_file} holds no tokens"
            )
        config = attrs.evolve(config, auth_tokens=tokens)
    return config


def load_client_config(path: Path) -> ClientConfig:
    """Read and validate a client config file, and the token file it names.

    Relative paths inside are taken relative to the file's directory. Raises
    :class:`ConfigError` with one line naming the file and the key.
    """
    config = client_config_from_dict(
        _read_toml(path), source=str(path), base_dir=path.absolute().parent
    )
    if config.auth_token_file is not None:
        tokens = _tokens_from_file(str(path), "auth_token_file", config.auth_token_file)
        if len(tokens) != 1:
            raise ConfigError(
                f"{path}: auth_token_file: {config.auth_token_file} holds {len(tokens)} "
                "tokens, expected exactly one"
            )
        config = attrs.evolve(config, auth_token=tokens[0])
    return config


def load_control_socket(path: Path) -> Path:
    """The control socket named by a server or client config file, for ``tunnel status``.

    Reads only the TOML and its ``control_socket`` key, so it works for a user who may not
    read the key or token files. A config with a ``server`` key is a client config.
    """
    data = _read_toml(path)
    default = DEFAULT_CLIENT_SOCKET if "server" in data else DEFAULT_SERVER_SOCKET
    table = _Table(
        {k: v for k, v in data.items() if k == "control_socket"},
        source=str(path),
        base_dir=path.absolute().parent,
        known=frozenset({"control_socket"}),
    )
    return table.path("control_socket", default)
