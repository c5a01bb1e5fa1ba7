"""Tests of tunnel.config: every validation error names the file and the key, defaults, good
configs, the loaders, and the examples in docs/CONFIG.md."""

from __future__ import annotations

import base64
import re
import tempfile
import tomllib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.config import (
    DEFAULT_CLIENT_SOCKET,
    DEFAULT_SERVER_SOCKET,
    ClientConfig,
    Nat64Config,
    RunOptions,
    ServerConfig,
    client_config_from_dict,
    load_client_config,
    load_control_socket,
    load_server_config,
    read_auth_tokens_file,
    server_config_from_dict,
)
from tunnel.core.identity import Identity
from tunnel.core.tokens import new_token
from tunnel.errors import ConfigError, TokenError

TOKEN = new_token()
TOKEN2 = new_token()
# A well-formed token whose checksum is wrong: flip the last character.
# Well-formed base64url of 34 bytes whose last two bytes are not the CRC of the first 32.
BAD_TOKEN = "v" + base64.urlsafe_b64encode(bytes(32) + b"\x00\x00").decode().rstrip("=")
SERVER_ID = Identity.from_seed(bytes(range(32))).public_id
CLIENT_ID = Identity.from_seed(bytes(32)).public_id
DELETE = object()

SERVER_BASE: dict[str, Any] = {
    "key_file": "server.key",
    "network": "10.8.0.0/24",
    "auth_tokens": [TOKEN],
}
CLIENT_BASE: dict[str, Any] = {"server": "vpn.example.net:4433", "server_id": SERVER_ID}


def changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    data = dict(base)
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def server(**changes: Any) -> ServerConfig:
    return server_config_from_dict(changed(SERVER_BASE, changes), base_dir=Path("/etc/tunnel"))


def client(**changes: Any) -> ClientConfig:
    return client_config_from_dict(changed(CLIENT_BASE, changes), base_dir=Path("/etc/tunnel"))


def assert_one_line(message: str, prefix: str, fragment: str) -> None:
    assert "\n" not in message
    assert message.startswith(prefix), message
    assert fragment in message, message


# --- server: errors ------------------------------------------------------------------------

SERVER_ERRORS = [
    # (changes, key named in the message, fragment of the message)
    ({"netwrk": "10.0.0.0/24"}, "unknown key 'netwrk'", ""),
    ({"nat64": {"enabeld": True}}, "unknown key 'nat64.enabeld'", ""),
    ({"listen": 4433}, "listen", "must be a string, not an integer"),
    ({"listen": "4433"}, "listen", "is not host:port"),
    ({"listen": ":4433"}, "listen", "is not host:port"),
    ({"listen": "::1:4433"}, "listen", "in brackets"),
    ({"listen": "[::1:4433"}, "listen", "unbalanced brackets"),
    ({"listen": "[10.0.0.1]:4433"}, "listen", "is not an IPv6 address"),
    ({"listen": "[::]:0"}, "listen", "port must be a number from 1 to 65535"),
    ({"listen": "[::]:65536"}, "listen", "port must be a number from 1 to 65535"),
    ({"listen": "0.0.0.0:https"}, "listen", "port must be a number"),
    ({"listen": "bad_host:4433"}, "listen", "is not a host name or IP address"),
    ({"listen": "-bad:4433"}, "listen", "is not a host name or IP address"),
    ({"listen": "10.0.0.256:4433"}, "listen", "is not an IPv4 address"),
    ({"key_file": DELETE}, "key_file", "is required"),
    ({"key_file": ""}, "key_file", "is not a file name"),
    ({"key_file": ["a"]}, "key_file", "must be a string, not an array"),
    ({"network": "10.0.0.0/33"}, "network", "'10.0.0.0/33' is not an IPv4 network"),
    ({"network": "fd00::/64"}, "network", "is not an IPv4 network"),
    ({"network": "10.0.0.1/24"}, "network", "host bits set (did you mean '10.0.0.0/24'?)"),
    ({"network": "10.0.0.0/31"}, "network", "prefix must be /30 or shorter"),
    ({"network": "10.0.0.1/32"}, "network", "prefix must be /30 or shorter"),
    ({"network": DELETE}, "network", "at least one of 'network' and 'network6'"),
    ({"server_ip": "10.9.0.1"}, "server_ip", "is not inside network '10.8.0.0/24'"),
    ({"server_ip": "10.8.0.0"}, "server_ip", "network address"),
    ({"server_ip": "10.8.0.255"}, "server_ip", "broadcast address"),
    ({"server_ip": "fd00::1"}, "server_ip", "is not an IPv4 address"),
    ({"network": DELETE, "network6": "fd00::/64", "server_ip": "10.0.0.1"}, "server_ip",
     "needs 'network'"),
    ({"network6": "fd00::/127"}, "network6", "prefix must be /126 or shorter"),
    ({"network6": "fd00::/128"}, "network6", "prefix must be /126 or shorter"),
    ({"network6": "fd00::1/64"}, "network6", "host bits set (did you mean 'fd00::/64'?)"),
    ({"network6": "10.0.0.0/8"}, "network6", "is not an IPv6 network"),
    ({"server_ip6": "fd00::1"}, "server_ip6", "needs 'network6'"),
    ({"network6": "fd00::/64", "server_ip6": "fd01::1"}, "server_ip6", "is not inside"),
    ({"network6": "fd00::/64", "server_ip6": "fd00::"}, "server_ip6", "network address"),
    ({"network6": "fd00::/64", "server_ip6": "fd00::zz"}, "server_ip6", "not an IPv6 address"),
    ({"auth_tokens": DELETE}, "auth_tokens", "one of 'auth_tokens' and 'auth_tokens_file'"),
    ({"auth_tokens_file": "tokens"}, "auth_tokens_file", "cannot be combined"),
    ({"auth_tokens": []}, "auth_tokens", "must hold at least one token"),
    ({"auth_tokens": TOKEN}, "auth_tokens", "must be an array, not a string"),
    ({"auth_tokens": [TOKEN, 5]}, "auth_tokens[1]", "must be a string, not an integer"),
    ({"auth_tokens": [TOKEN, "short"]}, "auth_tokens[1]", "must be 47 characters, got 5"),
    ({"auth_tokens": [BAD_TOKEN]}, "auth_tokens[0]", "checksum mismatch"),
    ({"allowed_clients": []}, "allowed_clients", "must not be empty"),
    ({"allowed_clients": [CLIENT_ID, "nope"]}, "allowed_clients[1]", "52 characters, got 4"),
    ({"allowed_clients": [CLIENT_ID[:-1] + "1"]}, "allowed_clients[0]", "not base32"),
    ({"mtu": "1420"}, "mtu", "must be an integer, not a string"),
    ({"mtu": True}, "mtu", "must be an integer, not a boolean"),
    ({"mtu": 1420.0}, "mtu", "must be an integer, not a float"),
    ({"mtu": 575}, "mtu", "must be from 576 to 65535, not 575"),
    ({"mtu": 65536}, "mtu", "must be from 576 to 65535, not 65536"),
    ({"network6": "fd00::/64", "mtu": 1279}, "mtu", "below 1280, the IPv6 minimum"),
    ({"max_clients": 0}, "max_clients", "must be at least 1, not 0"),
    ({"max_clients": False}, "max_clients", "must be an integer, not a boolean"),
    ({"max_sessions_per_client": 0}, "max_sessions_per_client", "must be at least 1, not 0"),
    ({"client_to_client": "yes"}, "client_to_client", "must be a boolean, not a string"),
    ({"client_to_client": 1}, "client_to_client", "must be a boolean, not an integer"),
    ({"tun_name": ""}, "tun_name", "is not an interface name"),
    ({"tun_name": ".."}, "tun_name", "is not an interface name"),
    ({"tun_name": "a" * 16}, "tun_name", "longer than 15 bytes"),
    ({"tun_name": "tun/0"}, "tun_name", "must not contain '/'"),
    ({"tun_name": "tun 0"}, "tun_name", "white space"),
    ({"tun_name": "tun:0"}, "tun_name", "must not contain"),
    ({"tun_name": "tun%s"}, "tun_name", "single '%d'"),
    ({"tun_name": "t%d%d"}, "tun_name", "single '%d'"),
    ({"control_socket": 3}, "control_socket", "must be a string"),
    ({"control_socket": "a\0b"}, "control_socket", "is not a file name"),
    ({"handshake_timeout": 0}, "handshake_timeout", "must be greater than 0, not 0"),
    ({"handshake_timeout": -1.5}, "handshake_timeout", "must be greater than 0"),
    ({"handshake_timeout": float("inf")}, "handshake_timeout", "must be a finite number"),
    ({"handshake_timeout": float("nan")}, "handshake_timeout", "must be a finite number"),
    ({"handshake_timeout": "5"}, "handshake_timeout", "must be a number, not a string"),
    ({"handshake_timeout": True}, "handshake_timeout", "must be a number, not a boolean"),
    ({"lease_grace": -1}, "lease_grace", "must not be negative, not -1"),
    ({"nat64": True}, "nat64", "must be a table, not a boolean"),
    ({"nat64": {"enabled": "true"}}, "nat64.enabled", "must be a boolean"),
    ({"nat64": {"enabled": True}}, "nat64.enabled", "needs 'network6'"),
    ({"network": DELETE, "network6": "fd00::/64", "nat64": {"enabled": True}}, "nat64.enabled",
     "needs 'nat64.source_ip' or 'network'"),
    ({"nat64": {"prefix": "64:ff9b::/64"}}, "nat64.prefix", "must be a /96"),
    ({"nat64": {"prefix": "64:ff9b::1/96"}}, "nat64.prefix", "host bits set"),
    ({"network6": "fd00::/64", "nat64": {"prefix": "fd00::/96"}}, "nat64.prefix",
     "overlaps network6"),
    ({"nat64": {"source_ip": "fd00::1"}}, "nat64.source_ip", "is not an IPv4 address"),
    ({"nat64": {"port_range": "100"}}, "nat64.port_range", "is not a range like"),
    ({"nat64": {"port_range": "200-100"}}, "nat64.port_range", "200-100 is not a port range"),
    ({"nat64": {"port_range": "0-100"}}, "nat64.port_range", "is not a port range"),
    ({"nat64": {"port_range": [1, 65536]}}, "nat64.port_range", "is not a port range"),
    ({"nat64": {"port_range": [1, 2, 3]}}, "nat64.port_range", "array [low, high]"),
    ({"nat64": {"port_range": [1, True]}}, "nat64.port_range", "array [low, high]"),
    ({"nat64": {"port_range": 5}}, "nat64.port_range", "array [low, high]"),
    ({"nat64": {"tcp_timeout": 0}}, "nat64.tcp_timeout", "must be greater than 0"),
    ({"nat64": {"udp_timeout": -1}}, "nat64.udp_timeout", "must be greater than 0"),
    ({"nat64": {"icmp_timeout": "30"}}, "nat64.icmp_timeout", "must be a number"),
    ({"nat64": {"max_mappings_per_client": 0}}, "nat64.max_mappings_per_client", "at least 1"),
    ({"dns": "10.8.0.1"}, "dns", "must be an array"),
    ({"dns": ["10.8.0"]}, "dns[0]", "is not an IP address"),
    ({"dns": ["fe80::1"]}, "dns[0]", "cannot be a resolver address"),
    ({"dns": ["10.8.0.1", "10.8.0.2", "10.8.0.3", "10.8.0.4"]}, "dns", "at most 3"),
    ({"dns": ["10.8.0.1"], "dns_search": ["corp example"]}, "dns_search[0]",
     "is not a domain name"),
    ({"dns": ["10.8.0.1"], "dns_search": ["a.b\nnameserver 1.2.3.4"]}, "dns_search[0]",
     "is not a domain name"),
    ({"dns_search": ["corp.example"]}, "dns_search", "needs 'dns'"),
    ({"masquerade": "yes"}, "masquerade", "must be a boolean"),
    ({"clients": {"alice": "abc"}}, "clients.alice", "must be 52 characters"),
    ({"clients": {"alice": 5}}, "clients.alice", "must be a public ID string"),
    ({"clients": {"bad name": CLIENT_ID}}, "clients", "is not a name"),
    ({"clients": {"a": CLIENT_ID, "b": CLIENT_ID}}, "clients.b", "names the same client as 'a'"),
    ({"clients": ["x"]}, "clients", "must be a table"),
    ({"control_socket_mode": "0666"}, "control_socket_mode", "no access for others"),
    ({"control_socket_mode": "0460"}, "control_socket_mode", "the owner needs read and write"),
    ({"control_socket_mode": "rw"}, "control_socket_mode", "is not an octal mode"),
    ({"control_socket_mode": 432}, "control_socket_mode", "must be a string"),
    ({"control_socket_group": "a b"}, "control_socket_group", "is not a group name"),
    ({"metrics_listen": "9100"}, "metrics_listen", "port"),
    ({"network": DELETE, "network6": "fd00::/64", "masquerade": True}, "masquerade",
     "needs 'network'"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "key", "fragment"), SERVER_ERRORS)
def test_server_errors_name_the_key(changes: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        server(**changes)
    prefix = f"server.toml: {key}" if key.startswith("unknown key") else f"server.toml: {key}: "
    assert_one_line(str(info.value), prefix, fragment)


def test_unknown_key_is_reported_before_the_error_it_causes() -> None:
    # The misspelt 'netwrk' also leaves 'network' missing; the typo is the useful message.
    with pytest.raises(ConfigError, match=r"^server.toml: unknown key 'netwrk'$"):
        server(network=DELETE, netwrk="10.0.0.0/24")


def test_source_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/tunnel/s.toml: mtu: "):
        server_config_from_dict(changed(SERVER_BASE, {"mtu": 1}), source="/etc/tunnel/s.toml")


def test_token_never_appears_in_errors() -> None:
    for changes in ({"auth_tokens": [BAD_TOKEN]}, {"auth_tokens": [BAD_TOKEN + "x"]}):
        with pytest.raises(ConfigError) as info:
            server(**changes)
        assert BAD_TOKEN not in str(info.value)
    with pytest.raises(ConfigError) as info:
        client(auth_token=BAD_TOKEN)
    assert BAD_TOKEN not in str(info.value)


def test_tokens_are_not_in_repr() -> None:
    assert TOKEN not in repr(server())
    assert TOKEN not in repr(client(auth_token=TOKEN))


# --- server: defaults and good configs -----------------------------------------------------


def test_server_defaults() -> None:
    config = server()
    assert config == ServerConfig(
        key_file=Path("/etc/tunnel/server.key"),
        network=IPv4Network("10.8.0.0/24"),
        auth_tokens=(TOKEN,),
    )
    assert config.listen_host == "::"
    assert config.listen_port == 4433
    assert config.server_ip is None
    assert config.network6 is None and config.server_ip6 is None
    assert config.auth_tokens_file is None
    assert config.allowed_clients is None
    assert config.mtu == 1420
    assert config.max_clients == 1024
    assert config.max_sessions_per_client == 4
    assert config.client_to_client is False
    assert config.tun_name == "tunnel%d"
    assert config.control_socket == DEFAULT_SERVER_SOCKET == Path("/run/tunnel/server.sock")
    assert config.handshake_timeout == 5.0
    assert config.lease_grace == 60.0
    assert config.nat64 == Nat64Config()
    assert config.nat64.enabled is False
    assert config.nat64.prefix == IPv6Network("64:ff9b::/96")
    assert config.nat64.source_ip is None
    assert config.nat64.port_range == (32768, 65535)
    assert (config.nat64.tcp_timeout, config.nat64.udp_timeout) == (300.0, 30.0)
    assert config.nat64.icmp_timeout == 30.0


def test_server_everything_set() -> None:
    config = server_config_from_dict(
        {
            "listen": "[2001:db8::1]:443",
            "key_file": "/var/lib/tunnel/server.key",
            "network": "10.8.0.0/16",
            "server_ip": "10.8.0.254",
            "network6": "fd00:8::/64",
            "server_ip6": "fd00:8::fe",
            "auth_tokens": [TOKEN, TOKEN2, TOKEN],
            "allowed_clients": [CLIENT_ID, SERVER_ID.upper()],
            "mtu": 1280,
            "max_clients": 10,
            "client_to_client": True,
            "tun_name": "vpn0",
            "control_socket": "run/server.sock",
            "handshake_timeout": 3,
            "lease_grace": 0,
            "nat64": {
                "enabled": True,
                "prefix": "64:ff9b:1::/96",
                "source_ip": "192.0.2.10",
                "port_range": [1024, 2047],
                "tcp_timeout": 60,
                "udp_timeout": 5.5,
                "icmp_timeout": 1,
            },
        },
        base_dir=Path("/etc/tunnel"),
    )
    assert (config.listen_host, config.listen_port) == ("2001:db8::1", 443)
    assert config.key_file == Path("/var/lib/tunnel/server.key")
    assert config.server_ip == IPv4Address("10.8.0.254")
    assert config.network6 == IPv6Network("fd00:8::/64")
    assert config.server_ip6 == IPv6Address("fd00:8::fe")
    assert config.auth_tokens == (TOKEN, TOKEN2)  # duplicates dropped, order kept
    assert config.allowed_clients == frozenset(
        {Identity.from_seed(bytes(32)).public_key, Identity.from_seed(bytes(range(32))).public_key}
    )
    assert (config.mtu, config.max_clients, config.client_to_client) == (1280, 10, True)
    assert config.tun_name == "vpn0"
    assert config.control_socket == Path("/etc/tunnel/run/server.sock")
    assert config.handshake_timeout == 3.0 and isinstance(config.handshake_timeout, float)
    assert config.lease_grace == 0.0
    assert config.nat64 == Nat64Config(
        enabled=True,
        prefix=IPv6Network("64:ff9b:1::/96"),
        source_ip=IPv4Address("192.0.2.10"),
        port_range=(1024, 2047),
        tcp_timeout=60.0,
        udp_timeout=5.5,
        icmp_timeout=1.0,
    )


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:4433", "0.0.0.0", 4433),
        ("[::]:1", "::", 1),
        ("[fe80::1%eth0]:65535", "fe80::1%eth0", 65535),
        ("localhost:8443", "localhost", 8443),
        ("vpn.example.net.:4433", "vpn.example.net.", 4433),
    ],
)
def test_listen_forms(listen: str, host: str, port: int) -> None:
    config = server(listen=listen)
    assert (config.listen_host, config.listen_port) == (host, port)


@pytest.mark.parametrize(
    ("changes", "checks"),
    [
        ({"network": "10.0.0.0/30", "server_ip": "10.0.0.2"}, {"server_ip": "10.0.0.2"}),
        ({"network": DELETE, "network6": "fd00::/126"}, {"network": None}),
        ({"network": DELETE, "network6": "fd00::/64", "nat64": {"enabled": True,
          "source_ip": "192.0.2.1"}}, {}),
        ({"network6": "fd00::/64", "nat64": {"enabled": True}}, {}),
        ({"nat64": {"port_range": " 1 - 1 "}}, {}),
        ({"tun_name": "t%d"}, {"tun_name": "t%d"}),
        ({"tun_name": "a" * 15}, {"tun_name": "a" * 15}),
        ({"lease_grace": 0.5}, {"lease_grace": 0.5}),
        ({"mtu": 576}, {"mtu": 576}),
        ({"mtu": 65535}, {"mtu": 65535}),
        ({"network6": "fd00::/64", "mtu": 1280}, {"mtu": 1280}),
        ({"auth_tokens": [f"  {TOKEN}\t"]}, {"auth_tokens": (TOKEN,)}),
    ],
)  # fmt: skip
def test_server_good_configs(changes: dict[str, Any], checks: dict[str, Any]) -> None:
    config = server(**changes)
    for name, expected in checks.items():
        actual = getattr(config, name)
        assert actual == expected or str(actual) == expected


def test_nat64_disabled_table_is_still_validated() -> None:
    with pytest.raises(ConfigError, match="nat64.prefix"):
        server(nat64={"enabled": False, "prefix": "64:ff9b::/64"})


def test_auth_tokens_file_leaves_tokens_to_the_loader() -> None:
    config = server(auth_tokens=DELETE, auth_tokens_file="tokens")
    assert config.auth_tokens == ()
    assert config.auth_tokens_file == Path("/etc/tunnel/tokens")


# --- client --------------------------------------------------------------------------------

CLIENT_ERRORS = [
    ({"servr": "x:1"}, "unknown key 'servr'", ""),
    ({"server": DELETE}, "server", "is required"),
    ({"server": "vpn.example.net"}, "server", "is not host:port"),
    ({"server": "2001:db8::1:4433"}, "server", "in brackets"),
    ({"server": "h:0"}, "server", "port must be a number from 1 to 65535"),
    ({"server": "h:-1"}, "server", "port must be a number"),
    ({"server": "h:٤٤"}, "server", "port must be a number"),  # non-ASCII digits
    ({"server": "a..b:1"}, "server", "is not a host name"),
    ({"server": "x" * 254 + ":1"}, "server", "is not a host name"),
    ({"server_id": DELETE}, "server_id", "is required"),
    ({"server_id": "abc"}, "server_id", "public ID must be 52 characters, got 3"),
    ({"server_id": 5}, "server_id", "must be a string, not an integer"),
    ({"auth_token": "x"}, "auth_token", "must be 47 characters"),
    ({"auth_token": BAD_TOKEN}, "auth_token", "checksum mismatch"),
    ({"auth_token": TOKEN, "auth_token_file": "t"}, "auth_token_file", "cannot be combined"),
    ({"key_file": 1}, "key_file", "must be a string"),
    ({"routes": "10.0.0.0/8"}, "routes", "must be an array, not a string"),
    ({"routes": ["10.0.0.0/8", "10.1.0.1/16"]}, "routes[1]", "host bits set"),
    ({"routes": ["fd00::/8"]}, "routes[0]", "is not an IPv4 network"),
    ({"routes6": ["10.0.0.0/8"]}, "routes6[0]", "is not an IPv6 network"),
    ({"routes6": [{}]}, "routes6[0]", "must be a string, not a table"),
    ({"mtu": 70000}, "mtu", "must be from 576 to 65535"),
    ({"routes6": ["::/0"], "mtu": 1200}, "mtu", "below 1280, the IPv6 minimum (routes6"),
    ({"auto_reconnect": "no"}, "auto_reconnect", "must be a boolean"),
    ({"max_reconnect_attempts": 0}, "max_reconnect_attempts", "must be at least 1"),
    ({"max_reconnect_attempts": 2.0}, "max_reconnect_attempts", "must be an integer"),
    ({"heartbeat_interval": 0}, "heartbeat_interval", "must be greater than 0"),
    ({"heartbeat_timeout": -1}, "heartbeat_timeout", "must be greater than 0"),
    ({"heartbeat_timeout": 10}, "heartbeat_timeout",
     "10.0 must be greater than heartbeat_interval (10.0)"),
    ({"heartbeat_interval": 40}, "heartbeat_timeout", "must be greater than heartbeat_interval"),
    ({"tun_name": "x" * 20}, "tun_name", "longer than 15 bytes"),
    ({"control_socket": ""}, "control_socket", "is not a file name"),
    ({"handshake_timeout": 0.0}, "handshake_timeout", "must be greater than 0"),
    ({"accept_dns": 1}, "accept_dns", "must be a boolean"),
    ({"kill_switch": True}, "kill_switch", "needs a fixed 'tun_name'"),
    ({"kill_switch": "on", "tun_name": "vpn0"}, "kill_switch", "must be a boolean"),
    ({"allow_ipv6_outside": "no"}, "allow_ipv6_outside", "must be a boolean"),
    ({"fwmark": 0}, "fwmark", "must be from 1"),
    ({"fwmark": 2**32}, "fwmark", "must be from 1"),
    ({"state_dir": ""}, "state_dir", "is not a file name"),
]  # fmt: skip


@pytest.mark.parametrize(("changes", "key", "fragment"), CLIENT_ERRORS)
def test_client_errors_name_the_key(changes: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        client(**changes)
    prefix = f"client.toml: {key}" if key.startswith("unknown key") else f"client.toml: {key}: "
    assert_one_line(str(info.value), prefix, fragment)


def test_client_defaults() -> None:
    config = client()
    assert config == ClientConfig(
        server_host="vpn.example.net",
        server_port=4433,
        server_id=Identity.from_seed(bytes(range(32))).public_key,
    )
    assert config.auth_token is None and config.auth_token_file is None
    assert config.key_file is None
    assert config.routes == () and config.routes6 == ()
    assert config.mtu == 1420
    assert config.auto_reconnect is True
    assert config.max_reconnect_attempts is None
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (10.0, 30.0)
    assert config.tun_name == "tunnel%d"
    assert config.control_socket == DEFAULT_CLIENT_SOCKET == Path("/run/tunnel/client.sock")
    assert config.handshake_timeout == 10.0


def test_client_everything_set() -> None:
    config = client_config_from_dict(
        {
            "server": "[2001:db8::1]:4433",
            "server_id": SERVER_ID,
            "auth_token": TOKEN,
            "key_file": "client.key",
            "routes": ["0.0.0.0/0", "192.168.1.7"],
            "routes6": ["::/0"],
            "mtu": 1300,
            "auto_reconnect": False,
            "max_reconnect_attempts": 3,
            "heartbeat_interval": 1,
            "heartbeat_timeout": 1.5,
            "tun_name": "vpn%d",
            "control_socket": "/tmp/c.sock",
            "handshake_timeout": 2.5,
        },
        base_dir=Path("/home/me"),
    )
    assert (config.server_host, config.server_port) == ("2001:db8::1", 4433)
    assert config.auth_token == TOKEN
    assert config.key_file == Path("/home/me/client.key")
    assert config.routes == (IPv4Network("0.0.0.0/0"), IPv4Network("192.168.1.7/32"))
    assert config.routes6 == (IPv6Network("::/0"),)
    assert config.mtu == 1300
    assert config.auto_reconnect is False
    assert config.max_reconnect_attempts == 3
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (1.0, 1.5)
    assert config.tun_name == "vpn%d"
    assert config.control_socket == Path("/tmp/c.sock")
    assert config.handshake_timeout == 2.5


def test_client_server_may_be_an_ip_literal() -> None:
    config = client(server="192.0.2.1:4433")
    assert (config.server_host, config.server_port) == ("192.0.2.1", 4433)


def test_run_options_defaults() -> None:
    options = RunOptions()
    assert (options.log_level, options.ready_fd, options.config_path) == ("info", None, None)


# --- pure validation never fails with anything but ConfigError -----------------------------

_toml_scalars = (
    st.text(max_size=20)
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.sampled_from(["10.0.0.0/24", "fd00::/64", "[::]:1", "h:1", SERVER_ID, TOKEN])
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
_SERVER_KEY_NAMES = sorted(
    {*SERVER_BASE, "listen", "server_ip", "network6", "server_ip6", "auth_tokens_file",
     "allowed_clients", "mtu", "max_clients", "max_sessions_per_client", "client_to_client",
     "tun_name", "control_socket", "handshake_timeout", "lease_grace", "nat64", "dns",
     "dns_search", "masquerade", "state_dir", "clients", "control_socket_mode",
     "control_socket_group", "metrics_listen"}
)  # fmt: skip
_CLIENT_KEY_NAMES = sorted(
    {*CLIENT_BASE, "auth_token", "auth_token_file", "key_file", "routes", "routes6", "mtu",
     "auto_reconnect", "max_reconnect_attempts", "heartbeat_interval", "heartbeat_timeout",
     "tun_name", "control_socket", "handshake_timeout", "accept_dns", "kill_switch",
     "allow_ipv6_outside", "fwmark", "state_dir", "control_socket_mode", "control_socket_group",
     "metrics_listen"}
)  # fmt: skip


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*_SERVER_KEY_NAMES, "bogus"]), _toml_values))
def test_server_validation_raises_only_config_error(changes: dict[str, Any]) -> None:
    try:
        server_config_from_dict(changed(SERVER_BASE, changes))
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([*_CLIENT_KEY_NAMES, "bogus"]), _toml_values))
def test_client_validation_raises_only_config_error(changes: dict[str, Any]) -> None:
    try:
        client_config_from_dict(changed(CLIENT_BASE, changes))
    except ConfigError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_loading_random_bytes_raises_only_config_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "server.toml"
        path.write_bytes(data)
        try:
            load_server_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}: ")
            assert "\n" not in str(exc)


# --- the loaders ---------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_server_config_resolves_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path / "server.toml",
        'key_file = "keys/server.key"\nnetwork = "10.8.0.0/24"\n'
        f'auth_tokens = ["{TOKEN}"]\ncontrol_socket = "/run/x.sock"\n',
    )
    config = load_server_config(path)
    assert config.key_file == tmp_path / "keys" / "server.key"
    assert config.control_socket == Path("/run/x.sock")
    assert config.auth_tokens == (TOKEN,)


def test_load_server_config_reads_the_tokens_file(tmp_path: Path) -> None:
    write(tmp_path / "tokens", f"# clients\n{TOKEN}  # laptop\n\n{TOKEN2}\n")
    path = write(
        tmp_path / "server.toml",
        'key_file = "k"\nnetwork = "10.8.0.0/24"\nauth_tokens_file = "tokens"\n',
    )
    config = load_server_config(path)
    assert config.auth_tokens == (TOKEN, TOKEN2)
    assert config.auth_tokens_file == tmp_path / "tokens"
    assert read_auth_tokens_file(tmp_path / "tokens") == (TOKEN, TOKEN2)


@pytest.mark.parametrize(
    ("tokens", "fragment"),
    [
        (None, "auth_tokens_file: {dir}/tokens: cannot read token file: No such file"),
        ("# nothing yet\n", "auth_tokens_file: {dir}/tokens holds no tokens"),
        (f"{TOKEN}\nvbad\n", "auth_tokens_file: {dir}/tokens:2: auth token must be 47"),
    ],
)
def test_load_server_config_tokens_file_errors(
    tmp_path: Path, tokens: str | None, fragment: str
) -> None:
    if tokens is not None:
        write(tmp_path / "tokens", tokens)
    path = write(
        tmp_path / "server.toml",
        'key_file = "k"\nnetwork = "10.8.0.0/24"\nauth_tokens_file = "tokens"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert_one_line(str(info.value), f"{path}: ", fragment.format(dir=tmp_path))


def test_read_auth_tokens_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens", f"{TOKEN}\n{BAD_TOKEN}\n")
    with pytest.raises(TokenError, match=rf"^{re.escape(str(path))}:2: .*checksum"):
        read_auth_tokens_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('key_file = "k"\nnetwork = \n', "line 2: invalid TOML (Invalid value)"),
        ('key_file = "k"\nnetwork = "10.0.0.0/24"\nmtu = 1\nmtu = 2\n', "invalid TOML"),
        ('key_file = "k"\n[nat64]\nenabled = true\n[nat64]\n', "line 4: invalid TOML"),
        ('key_file = "k"\nnetwork = "10.0.0.0/24"\nauth_tokens = ["x"\n', "invalid TOML"),
        ('key_file = "k"\nnetwrk = "10.0.0.0/24"\n', "unknown key 'netwrk'"),
        ('key_file = "k"\nnetwork = "10.0.0.0/33"\n', "network: '10.0.0.0/33' is not an IPv4"),
    ],
)
def test_load_server_config_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "server.toml", text)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert_one_line(str(info.value), f"{path}: ", message)


def test_load_config_deeply_nested_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "server.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"server.toml: invalid TOML \(nested too deeply\)$"):
        load_server_config(path)


def test_load_config_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.toml: cannot read config file: No such file"):
        load_server_config(tmp_path / "server.toml")
    with pytest.raises(ConfigError, match=r"cannot read config file: Is a directory"):
        load_client_config(tmp_path)
    (tmp_path / "client.toml").write_bytes(b'server = "\xff"\n')
    with pytest.raises(ConfigError, match=r"client.toml: config file is not UTF-8 text"):
        load_client_config(tmp_path / "client.toml")


def test_load_client_config(tmp_path: Path) -> None:
    write(tmp_path / "token", f"# issued by ops\n{TOKEN}\n")
    path = write(
        tmp_path / "client.toml",
        f'server = "h:1"\nserver_id = "{SERVER_ID}"\nauth_token_file = "token"\n'
        'key_file = "client.key"\n',
    )
    config = load_client_config(path)
    assert config.auth_token == TOKEN
    assert config.auth_token_file == tmp_path / "token"
    assert config.key_file == tmp_path / "client.key"


@pytest.mark.parametrize(("tokens", "count"), [("", 0), (f"{TOKEN}\n{TOKEN2}\n", 2)])
def test_load_client_config_token_file_needs_one_token(
    tmp_path: Path, tokens: str, count: int
) -> None:
    write(tmp_path / "token", tokens)
    path = write(
        tmp_path / "client.toml",
        f'server = "h:1"\nserver_id = "{SERVER_ID}"\nauth_token_file = "token"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert_one_line(
        str(info.value), f"{path}: auth_token_file: ", f"holds {count} tokens, expected exactly"
    )


def test_load_control_socket(tmp_path: Path) -> None:
    server_toml = write(tmp_path / "server.toml", 'control_socket = "s.sock"\nkey_file = 3\n')
    assert load_control_socket(server_toml) == tmp_path / "s.sock"
    assert load_control_socket(write(tmp_path / "a.toml", "")) == DEFAULT_SERVER_SOCKET
    assert load_control_socket(write(tmp_path / "b.toml", 'server = "x"')) == DEFAULT_CLIENT_SOCKET
    with pytest.raises(ConfigError, match=r"c.toml: control_socket: must be a string"):
        load_control_socket(write(tmp_path / "c.toml", "control_socket = 1"))


# --- the documented examples are valid -----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


README = DOCS.parent.parent / "README.md"


def _doc_examples(doc: Path) -> dict[str, str]:
    """The ```toml blocks of a document whose first line is '# <name>.toml'."""
    text = doc.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    return {block.split("\n", 1)[0].lstrip("# ").strip(): block for block in blocks}


@pytest.mark.parametrize("doc", [DOCS, README], ids=["CONFIG.md", "README.md"])
def test_doc_examples_are_valid_configs(doc: Path) -> None:
    examples = _doc_examples(doc)
    # from_dict: the examples name key and token files that do not exist here.
    config = server_config_from_dict(tomllib.loads(examples["server.toml"]))
    assert config.network is not None and config.network6 is not None
    assert config.auth_tokens_file == Path("tokens")
    assert config.allowed_clients is not None and len(config.allowed_clients) == 2
    assert config.nat64.enabled
    client_config = client_config_from_dict(tomllib.loads(examples["client.toml"]))
    assert client_config.routes and client_config.routes6
    assert client_config.auth_token is not None


def test_doc_tables_list_every_key() -> None:
    text = DOCS.read_text()
    for key in [*_SERVER_KEY_NAMES, *_CLIENT_KEY_NAMES, "enabled", "prefix", "source_ip",
                "port_range", "tcp_timeout", "udp_timeout", "icmp_timeout",
                "max_mappings_per_client"]:  # fmt: skip
        assert f"| `{key}` |" in text or f"| `[{key}]` |" in text, key


def test_nat64_source_ip_inside_the_pool_is_refused() -> None:
    data = changed(
        SERVER_BASE, {"network6": "fd00::/64", "nat64": {"enabled": True, "source_ip": "10.8.0.9"}}
    )
    with pytest.raises(ConfigError, match=r"nat64\.source_ip: 10\.8\.0\.9 is inside 'network'"):
        server_config_from_dict(data)
