"""End to end: the real ``tunnel`` CLI in network namespaces, real TUN devices, real kernels.

Topology (one per test)::

    srv: br0 10.77.0.1/24 ─┬─ veth ── cla: 10.77.0.2/24   (client A, tnlcli0)
         tnlsrv0            └─ veth ── clb: 10.77.0.3/24   (client B, tnlcli0)

The server listens on 10.77.0.1:4433 and hands out 10.78.0.0/24 and fd78::/64; its own tunnel
addresses are 10.78.0.1 and fd78::1, and clients get .2/.3 (::2/::3) in connection order.
Each test is bounded by ``trio.fail_after``; daemon output is echoed at DEBUG on the
``tests.support`` logger, so a failure shows it under "Captured log call".
"""

from __future__ import annotations

import ipaddress
import json
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from tests.support.netns import (
    Daemon,
    Netns,
    cli_status,
    ip_json,
    open_daemon_nursery,
    run,
    start_daemon,
    tcp_transfer,
)
from tests.support.netns import (
    star as netns_star,
)
from tests.support.netns import tunnel_cli as tunnel
from tests.support.transfer import expected_sha256

# The fixtures' types (Key, TunnelFiles) live in conftest.py, which a test module cannot
# import cleanly (tests/ is not a package): they are annotated as Any here.
Key = Any
TunnelFiles = Any

TEST_TIMEOUT = 120
PY = sys.executable
SERVER_ADDR = "10.77.0.1:4433"
SERVER_TUN4, SERVER_TUN6 = "10.78.0.1", "fd78::1"
#: what a client's SIGTERM may take, per the contract ("within 2 s"), plus scheduling slack
STOP_LIMIT_S = 3.0
TRANSFER_BYTES = 20 * 1000 * 1000


@attrs.frozen
class Star:
    server: Netns
    a: Netns
    b: Netns


@pytest.fixture
def star() -> Iterator[Star]:
    hub = ["10.77.0.1/24", "fd77::1/64"]
    leaves = [["10.77.0.2/24", "fd77::2/64"], ["10.77.0.3/24", "fd77::3/64"]]
    with netns_star("srv", ["cla", "clb"], hub, leaves) as (srv, (cla, clb)):
        yield Star(srv, cla, clb)


@attrs.frozen
class Creds:
    server: Key
    a: Key
    b: Key
    token: str


@pytest.fixture
def creds(files: TunnelFiles) -> Creds:
    return Creds(files.key("server"), files.key("a"), files.key("b"), files.token())


def server_config(files: TunnelFiles, creds: Creds, **settings: Any) -> Any:
    return files.server_config(key_file=creds.server.path, auth_tokens=[creds.token], **settings)


def client_config(files: TunnelFiles, creds: Creds, name: str, key: Key, **settings: Any) -> Any:
    base: dict[str, Any] = {
        "server": SERVER_ADDR,
        "server_id": creds.server.public_id,
        "auth_token": creds.token,
        "key_file": key.path,
    }
    base.update(settings)
    return files.client_config(name, **base)


async def start_server(nursery: trio.Nursery, star: Star, config: Any) -> Daemon:
    argv = tunnel("server", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, star.server, argv, name="server")


async def start_client(nursery: trio.Nursery, ns: Netns, config: Any, name: str) -> Daemon:
    argv = tunnel("client", "--config", str(config), "--log-level", "debug")
    return await start_daemon(nursery, ns, argv, name=name)


async def status(files: TunnelFiles, name: str) -> dict[str, Any]:
    """``tunnel status --json`` of the daemon whose control socket is ``<name>.sock``."""
    return await cli_status(files.socket(name))


def session_of(server_status: dict[str, Any], key: Key) -> dict[str, Any]:
    for session in server_status["sessions"]:
        if session["client_id"] == key.public_id:
            return session
    raise AssertionError(f"no session for {key.public_id} in {server_status['sessions']}")


async def ping(ns: Netns, target: str, count: int = 3) -> None:
    family = "-6" if ":" in target else "-4"
    await run(ns, ["ping", family, "-c", str(count), "-i", "0.2", "-W", "2", target], timeout=20)


def tun_addresses(ns: Netns, dev: str) -> set[str]:
    """``addr/prefixlen`` of the global addresses on ``dev``."""
    found = set()
    for link in ip_json(ns, "addr", "show", "dev", dev):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                found.add(f"{info['local']}/{info['prefixlen']}")
    return found


LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")


def _link_local(text: str | None) -> bool:
    # the kernel adds fe80:: addresses and their routes on its own, whenever a link comes up
    if not text or ":" not in text or text == "default":
        return False
    return ipaddress.ip_network(text, strict=False).subnet_of(LINK_LOCAL6)


def snapshot(ns: Netns) -> dict[str, Any]:
    """What a daemon may change in a namespace: links, addresses, routes (all tables), rules.
    Volatile fields (counters, carrier flags) and kernel-made link-local entries are left
    out."""
    links = sorted(
        (link["ifname"], link.get("linkinfo", {}).get("info_kind", ""))
        for link in ip_json(ns, "-d", "link")
    )
    addrs = sorted(
        (link["ifname"], info["local"], info["prefixlen"])
        for link in ip_json(ns, "addr")
        for info in link.get("addr_info", [])
        if not _link_local(info["local"])
    )
    routes = sorted(
        json.dumps(
            {k: r.get(k) for k in ("type", "dst", "dev", "gateway", "table", "prefsrc")},
            sort_keys=True,
        )
        for family in ("-4", "-6")
        for r in ip_json(ns, family, "route", "show", "table", "all")
        if not _link_local(r.get("dst"))
    )
    rules = sorted(
        json.dumps(rule, sort_keys=True)
        for family in ("-4", "-6")
        for rule in ip_json(ns, family, "rule")
    )
    return {"links": links, "addrs": addrs, "routes": routes, "rules": rules}


def assert_nothing_of_ours(ns: Netns, tun_name: str, nets: list[str]) -> None:
    """No TUN device, no address and no route inside ``nets`` or through ``tun_name``."""
    networks = [ipaddress.ip_network(n) for n in nets]

    def ours(text: str | None) -> bool:
        if not text or text == "default":
            return False
        net = ipaddress.ip_network(text, strict=False)
        return any(net.version == n.version and net.overlaps(n) for n in networks)

    for link in ip_json(ns, "-d", "link"):
        assert link["ifname"] != tun_name, f"{tun_name} still exists: {link}"
        assert link.get("linkinfo", {}).get("info_kind") != "tun", f"TUN left: {link}"
    for link in ip_json(ns, "addr"):
        for info in link.get("addr_info", []):
            assert not ours(info["local"]), f"address left on {link['ifname']}: {info}"
    for family in ("-4", "-6"):
        for route in ip_json(ns, family, "route", "show", "table", "all"):
            assert route.get("dev") != tun_name, f"route via {tun_name} left: {route}"
            assert not ours(route.get("dst")), f"route left: {route}"


async def stop_within(daemon: Daemon, limit: float = STOP_LIMIT_S) -> float:
    """SIGTERM ``daemon``; assert it exits 0 within ``limit`` s; return how long it took."""
    started = time.monotonic()
    daemon.terminate()
    with trio.move_on_after(limit + 5):
        code = await daemon.wait()
    took = time.monotonic() - started
    assert daemon.returncode is not None, f"still running {took:.1f} s after SIGTERM"
    assert code == 0, f"exit code {code} after SIGTERM\n{daemon.describe()}"
    assert took <= limit, f"took {took:.2f} s to stop after SIGTERM (limit {limit} s)"
    return took


async def wait_for(predicate: Any, what: str, within: float = 5.0) -> None:
    """Poll an async predicate until true; fail naming ``what`` after ``within`` s.

    Polling because the state lives in another process (a daemon's counters): there is no
    event to wait on."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(0.1)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


# --- (a) two clients: addresses, ping both ways, a 20 MB transfer ---------------------------


async def test_two_clients_get_addresses_ping_both_ways_and_transfer(
    star: Star, files: TunnelFiles, creds: Creds
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            server = await start_server(nursery, star, server_config(files, creds))
            await start_client(nursery, star.a, client_config(files, creds, "a", creds.a), "a")
            await start_client(nursery, star.b, client_config(files, creds, "b", creds.b), "b")

            st = await status(files, "server")
            assert st["role"] == "server"
            assert st["id"] == creds.server.public_id
            assert len(st["sessions"]) == 2, st
            sa, sb = session_of(st, creds.a), session_of(st, creds.b)
            assert set(sa["addresses"]) == {"10.78.0.2", "fd78::2"}, sa
            assert set(sb["addresses"]) == {"10.78.0.3", "fd78::3"}, sb
            for key in ("remote", "bytes_in", "bytes_out", "packets_in", "packets_out", "drops"):
                assert key in sa, f"session status lacks {key!r}: {sa}"
            assert isinstance(st["drops"], dict)

            assert tun_addresses(star.server, "tnlsrv0") == {"10.78.0.1/24", "fd78::1/64"}
            assert tun_addresses(star.a, "tnlcli0") == {"10.78.0.2/24", "fd78::2/64"}
            assert tun_addresses(star.b, "tnlcli0") == {"10.78.0.3/24", "fd78::3/64"}

            cst = await status(files, "a")
            assert cst["role"] == "client"
            assert cst["id"] == creds.a.public_id

            # ping both ways, IPv4 and IPv6
            for ns in (star.a, star.b):
                await ping(ns, SERVER_TUN4)
                await ping(ns, SERVER_TUN6)
            for target in ("10.78.0.2", "10.78.0.3", "fd78::2", "fd78::3"):
                await ping(star.server, target)

            # 20 MB TCP, client A -> the server's tunnel address, byte-identical
            before = session_of(await status(files, "server"), creds.a)["bytes_in"]
            got, want = await tcp_transfer(
                nursery, receiver=star.server, sender=star.a, listen=f"{SERVER_TUN4}:5201",
                to=f"{SERVER_TUN4}:5201", nbytes=TRANSFER_BYTES, seed="e2e",
            )  # fmt: skip
            assert got["bytes"] == TRANSFER_BYTES
            assert got["sha256"] == want["sha256"] == expected_sha256(TRANSFER_BYTES, "e2e")
            rate = TRANSFER_BYTES * 8 / got["seconds"] / 1e6
            print(f"20 MB through the tunnel in {got['seconds']:.2f} s ({rate:.0f} Mbit/s)")

            server_status = await status(files, "server")
            after = session_of(server_status, creds.a)["bytes_in"]
            # Segments in sequence arrive in runs, and runs reach the kernel as one packet.
            assert server_status["tun_merge"] is True
            assert server_status["tun_merged"] > 0
            assert after - before >= TRANSFER_BYTES, "the transfer did not go through the tunnel"
            assert server.returncode is None


async def test_client_to_client(star: Star, files: TunnelFiles, creds: Creds) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(nursery, star, server_config(files, creds, client_to_client=True))
            await start_client(nursery, star.a, client_config(files, creds, "a", creds.a), "a")
            await start_client(nursery, star.b, client_config(files, creds, "b", creds.b), "b")
            await ping(star.a, "10.78.0.3")
            await ping(star.b, "10.78.0.2")
            await ping(star.a, "fd78::3")
            await ping(star.b, "fd78::2")


# --- (b) rejections: wrong token, unknown client, wrong server identity ---------------------


async def test_rejected_clients_exit_with_reason_and_server_keeps_serving(
    star: Star, files: TunnelFiles, creds: Creds
) -> None:
    stranger = files.key("stranger")
    impostor = files.key("impostor")
    # Rejections by the verified server are permanent (100); another key on the path may be a
    # forgery, so a mismatch is temporary (111: here auto_reconnect is off, so it ends at once).
    cases = [
        (
            "wrong-token",
            creds.b,
            {"auth_token": files.token()},
            "Invalid authentication token",
            100,
        ),
        ("unknown-client", stranger, {}, "client not allowed", 100),
        (
            "wrong-server-id",
            creds.b,
            {"server_id": impostor.public_id},
            "server identity mismatch",
            111,
        ),
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            allowed = [creds.a.public_id, creds.b.public_id]
            server = await start_server(
                nursery, star, server_config(files, creds, allowed_clients=allowed)
            )
            await start_client(nursery, star.a, client_config(files, creds, "a", creds.a), "a")
            before = snapshot(star.b)

            for name, key, overrides, reason, code in cases:
                config = client_config(files, creds, name, key, **overrides)
                started = time.monotonic()
                proc = await run(
                    star.b,
                    tunnel("client", "--config", str(config), "--log-level", "debug"),
                    check=False,
                    timeout=20,
                )
                took = time.monotonic() - started
                stderr = proc.stderr.decode(errors="replace")
                assert proc.returncode == code, f"{name}: exit {proc.returncode}\n{stderr}"
                assert reason.lower() in stderr.lower(), f"{name}: no {reason!r} in\n{stderr}"
                assert took < 10, f"{name}: took {took:.1f} s to fail"
                assert server.returncode is None, f"server died on {name}\n{server.describe()}"
                assert snapshot(star.b) == before, f"{name}: left something in its namespace"

            # the server keeps serving: the established client and a new one
            await ping(star.a, SERVER_TUN4)
            await start_client(nursery, star.b, client_config(files, creds, "b", creds.b), "b")
            await ping(star.b, SERVER_TUN4)
            st = await status(files, "server")
            assert len(st["sessions"]) == 2, st
            # rejected attempts never held an address
            assert "10.78.0.3" in session_of(st, creds.b)["addresses"]


# --- (c) spoofed sources are dropped and counted --------------------------------------------

# Sends hand-built UDP packets through the client's TUN route with raw sockets: the kernel
# takes our IP header as is (IP_HDRINCL / IPPROTO_RAW), source address included.
RAW_SENDER = textwrap.dedent(
    """
    import ipaddress, socket, struct, sys

    def csum(data):
        if len(data) % 2:
            data += b"\\0"
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    def packet(src, dst, payload, port=9999):
        src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        udp_len = 8 + len(payload)
        if src.version == 4:
            udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0x4000, 64, 17, 0,
                              src.packed, dst.packed)
            return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + udp
        pseudo = src.packed + dst.packed + struct.pack("!IxxxB", udp_len, 17)
        udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
        check = csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", check) + udp[8:]
        return struct.pack("!IHBB16s16s", 0x60000000, udp_len, 17, 64, src.packed, dst.packed) + udp

    v4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    v4.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for spec in sys.argv[1:]:
        src, dst, payload = spec.split(",")
        sock = v6 if ":" in dst else v4
        sock.sendto(packet(src, dst, payload.encode()), (dst, 0))
    """
)

# Prints every UDP payload arriving on port 9999 (IPv4 and IPv6), one a line.
UDP_SINK = textwrap.dedent(
    """
    import os, select, socket, sys
    fd = int(sys.argv[sys.argv.index("--ready-fd") + 1])
    socks = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, 9999))
        socks.append(s)
    os.write(fd, b"\\n")
    os.close(fd)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, peer = s.recvfrom(65535)
            print(data.decode(errors="replace"), peer[0], flush=True)
    """
)


async def test_spoofed_and_unroutable_packets_are_dropped_and_counted(
    star: Star, files: TunnelFiles, creds: Creds
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(nursery, star, server_config(files, creds))
            await start_client(nursery, star.a, client_config(files, creds, "a", creds.a), "a")
            await start_client(nursery, star.b, client_config(files, creds, "b", creds.b), "b")
            sink = await start_daemon(nursery, star.server, [PY, "-c", UDP_SINK], name="sink")
            drops0 = (await status(files, "server"))["drops"]

            spoofed = [
                "10.78.0.99,10.78.0.1,spoof-v4",
                "10.78.0.3,10.78.0.1,spoof-as-b",  # client B's address, sent by A
                "10.99.0.1,10.78.0.1,spoof-outside",
                "fd78::99,fd78::1,spoof-v6",
                "fd78::3,fd78::1,spoof-v6-as-b",
            ]
            legit = ["10.78.0.2,10.78.0.1,legit-v4", "fd78::2,fd78::1,legit-v6"]
            await run(star.a, [PY, "-c", RAW_SENDER, *spoofed, *legit])

            async def legit_arrived() -> bool:
                payloads = {line.split()[0] for line in sink.stdout_lines if line}
                return {"legit-v4", "legit-v6"} <= payloads

            await wait_for(legit_arrived, "the legitimate raw packets to arrive at the server")

            async def counted() -> bool:
                drops = (await status(files, "server"))["drops"]
                grown = drops.get("spoofed_source", 0) - drops0.get("spoofed_source", 0)
                return grown >= len(spoofed)

            await wait_for(counted, f"drops['spoofed_source'] to grow by {len(spoofed)}")

            # a packet the server's kernel routes into the TUN for an address no client holds
            for target in ("10.78.0.77", "fd78::77"):
                await run(star.server, ["ping", "-c", "1", "-W", "1", target], check=False)

            async def no_route_counted() -> bool:
                drops = (await status(files, "server"))["drops"]
                return drops.get("no_route", 0) - drops0.get("no_route", 0) >= 2

            await wait_for(no_route_counted, "drops['no_route'] to grow")

            leaked = [line for line in sink.stdout_lines if line.startswith("spoof")]
            assert not leaked, f"spoofed packets reached the server's stack: {leaked}"
            session_drops = session_of(await status(files, "server"), creds.a)["drops"]
            assert session_drops.get("spoofed_source", 0) >= len(spoofed), session_drops


# --- (d) SIGTERM leaves nothing behind ------------------------------------------------------


async def test_client_sigterm_exits_0_and_leaves_nothing(
    star: Star, files: TunnelFiles, creds: Creds
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            await start_server(nursery, star, server_config(files, creds))
            before = snapshot(star.a)
            config = client_config(
                files, creds, "a", creds.a, routes=["10.79.0.0/24"], routes6=["fd79::/64"]
            )
            client = await start_client(nursery, star.a, config, "a")
            await ping(star.a, SERVER_TUN4)

            # the things that must go away are really there first
            during = snapshot(star.a)
            assert ("tnlcli0", "tun") in during["links"]
            dsts = {json.loads(r)["dst"] for r in during["routes"]}
            assert {"10.79.0.0/24", "fd79::/64"} <= dsts, during["routes"]

            await stop_within(client)
            assert_nothing_of_ours(
                star.a, "tnlcli0", ["10.78.0.0/24", "fd78::/64", "10.79.0.0/24", "fd79::/64"]
            )
            assert snapshot(star.a) == before

            # the server learns at once that the client left
            async def session_gone() -> bool:
                return not (await status(files, "server"))["sessions"]

            await wait_for(session_gone, "the server to drop the closed session", within=3)


async def test_server_sigterm_exits_0_and_leaves_nothing(
    star: Star, files: TunnelFiles, creds: Creds
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_daemon_nursery() as nursery:
            before = snapshot(star.server)
            server = await start_server(nursery, star, server_config(files, creds))
            client = await start_client(
                nursery, star.a, client_config(files, creds, "a", creds.a), "a"
            )
            await ping(star.server, "10.78.0.2")
            assert ("tnlsrv0", "tun") in snapshot(star.server)["links"]

            # with a live session to close
            await stop_within(server)
            assert_nothing_of_ours(star.server, "tnlsrv0", ["10.78.0.0/24", "fd78::/64"])
            assert snapshot(star.server) == before

            # the client learns at once (its QUIC connection was closed, not timed out)
            with trio.move_on_after(5):
                await client.wait()
            assert client.returncode is not None, "client still running 5 s after server stop"
