"""The Prometheus metrics: families from the real daemons' status (in memory, virtual time),
read back through the text exposition; and the HTTP server on a real loopback socket, against
well-behaved and hostile clients."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from test_inmemory_peers import expect_permanent, running_client, running_server, v4, v6, wait_for

from tunnel.core.ippacket import build_ipv4_udp, build_ipv6_udp
from tunnel.core.tokens import new_token
from tunnel.daemon.metrics import (
    CONTENT_TYPE,
    MetricsServer,
    client_metrics,
    render,
    server_metrics,
    status_metrics,
)
from tunnel.errors import PeerRejected, SystemSetupError
from tunnel.testing.fakes import FakeNetwork

A_HOST = "198.51.100.2"

# --- reading the exposition back ---------------------------------------------------------------


def parse(text: bytes | str) -> dict[str, Any]:
    """The exposition, parsed by prometheus_client's own parser: family name -> family."""
    if isinstance(text, bytes):
        text = text.decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def scrape(metrics: Iterable[Metric]) -> dict[str, Any]:
    return parse(render(metrics))


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The one sample of family ``name`` (a counter's name without ``_total``) with ``labels``."""
    family = families[name]
    matches = [
        s.value for s in family.samples if s.labels == labels and not s.name.endswith("_created")
    ]
    assert len(matches) == 1, (name, labels, family.samples)
    return float(matches[0])


def labels_of(families: dict[str, Any], name: str, label: str) -> set[str]:
    return {s.labels[label] for s in families[name].samples}


def to_server(n: int) -> bytes:
    return build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1000, 53, bytes([n]) * 10)


def to_client(n: int) -> bytes:
    return build_ipv4_udp(v4("10.78.0.1"), v4("10.78.0.2"), 53, 1000, bytes([n]) * 20)


# --- from the real daemons' status -------------------------------------------------------------


async def test_traffic_through_the_tunnel_moves_both_daemons_counters(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, A_HOST) as client:
        server_before = scrape(server_metrics(server.status()))
        client_before = scrape(client_metrics(client.status()))
        for n in range(5):
            client.tun.inject(to_server(n))
        await server.tun.wait_written(5)
        for n in range(3):
            server.tun.inject(to_client(n))
        await client.tun.wait_written(3)
        srv = scrape(server_metrics(server.status()))
        cli = scrape(client_metrics(client.status()))

    for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
        assert srv[f"tunnel_{name}"].type == "counter"
        assert cli[f"tunnel_{name}"].type == "counter"

    def moved(after: dict[str, Any], before: dict[str, Any], name: str) -> float:
        return value(after, name) - value(before, name)

    # The server received 5 packets of 38 bytes (20 IP + 8 UDP + 10) and sent 3 of 48.
    assert moved(srv, server_before, "tunnel_rx_packets") == 5
    assert moved(srv, server_before, "tunnel_rx_bytes") == 5 * 38
    assert moved(srv, server_before, "tunnel_tx_packets") == 3
    assert moved(srv, server_before, "tunnel_tx_bytes") == 3 * 48
    # The client saw the same traffic the other way round.
    assert moved(cli, client_before, "tunnel_tx_packets") == 5
    assert moved(cli, client_before, "tunnel_tx_bytes") == 5 * 38
    assert moved(cli, client_before, "tunnel_rx_packets") == 3
    assert moved(cli, client_before, "tunnel_rx_bytes") == 3 * 48


async def test_a_servers_families_from_its_real_status(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, A_HOST) as client:
        client.tun.inject(build_ipv4_udp(v4("10.78.0.99"), v4("10.78.0.1"), 1, 2, b"spoof"))
        client.tun.inject(build_ipv4_udp(v4("10.78.0.2"), v4("10.78.0.1"), 1, 2, b"fine"))
        await server.tun.wait_written(1)
        status = server.status()
    families = scrape(server_metrics(status))

    info = families["tunnel_info"]
    assert info.type == "gauge"
    assert [s.labels for s in info.samples] == [
        {"version": status["version"], "role": "server", "id": status["id"]}
    ]
    assert value(families, "tunnel_info", **info.samples[0].labels) == 1
    assert families["tunnel_sessions"].type == "gauge"
    assert value(families, "tunnel_sessions") == 1
    assert value(families, "tunnel_uptime_seconds") == status["uptime"]
    assert value(families, "tunnel_pending_handshakes") == 0
    assert families["tunnel_drops"].type == "counter"
    assert value(families, "tunnel_drops", reason="spoofed_source") == 1
    assert families["tunnel_handshake_failures"].type == "counter"
    assert value(families, "tunnel_handshake_failures", reason="token_invalid") == 0
    assert "tunnel_nat64_mappings" not in families  # NAT64 is off
    # No series names a client: the client's ID appears nowhere in the exposition.
    text = render(server_metrics(status)).decode()
    assert client.identity.public_id not in text
    assert "10.78.0.2" not in text
    # The same families from the JSON the control socket carries, and by role.
    assert render(status_metrics(json.loads(json.dumps(status)))) == render(server_metrics(status))


async def test_refused_clients_are_counted_by_a_bounded_reason(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server:
        await expect_permanent(
            network, "198.51.100.9", PeerRejected, "Invalid authentication token",
            auth_token=new_token(),
        )  # fmt: skip
        families = scrape(server_metrics(server.status()))
    assert value(families, "tunnel_handshake_failures", reason="token_invalid") == 1
    assert value(families, "tunnel_handshake_failures", reason="rate_limited") == 0


async def test_nat64_mappings_are_a_gauge_by_protocol(autojump_clock):
    network = FakeNetwork()
    nat64 = {"enabled": True, "source_ip": "192.0.2.77", "udp_timeout": 5.0}
    async with (
        running_server(network, network=None, nat64=nat64) as server,
        running_client(network, A_HOST) as client,
    ):
        client.tun.inject(
            build_ipv6_udp(v6("fd78::2"), v6("64:ff9b::198.51.100.7"), 5353, 53, b"q")
        )
        await server.tun.wait_written(1)
        during = scrape(server_metrics(server.status()))
        await trio.sleep(6)  # past udp_timeout
        after = scrape(server_metrics(server.status()))
    assert during["tunnel_nat64_mappings"].type == "gauge"
    assert value(during, "tunnel_nat64_mappings", proto="udp") == 1
    assert value(during, "tunnel_nat64_mappings", proto="tcp") == 0
    assert value(during, "tunnel_nat64_translated_packets", direction="out") == 1
    assert value(after, "tunnel_nat64_mappings", proto="udp") == 0
    assert value(after, "tunnel_nat64_mappings_expired") == 1


async def test_a_clients_families_follow_its_connection(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, A_HOST) as client:
        status = client.status()
        up = scrape(client_metrics(status))
        server.kick(client.identity.public_id)
        await wait_for(lambda: client.state != "connected")
        down = scrape(client_metrics(client.status()))
        await wait_for(lambda: client.state == "connected")
        back = scrape(client_metrics(client.status()))

    info = up["tunnel_info"].samples[0].labels
    assert info == {"version": status["version"], "role": "client", "id": status["id"]}
    assert up["tunnel_connected"].type == "gauge"
    assert value(up, "tunnel_connected") == 1
    assert value(up, "tunnel_sessions") == 1
    assert up["tunnel_reconnects"].type == "counter"
    assert value(up, "tunnel_reconnects") == 0
    assert value(up, "tunnel_path_mtu_bytes") > 0
    assert value(up, "tunnel_rtt_seconds") == status["sessions"][0]["rtt_ms"] / 1000
    assert labels_of(up, "tunnel_peers", "path") == {"relay", "probing", "direct"}

    assert value(down, "tunnel_connected") == 0
    assert value(down, "tunnel_sessions") == 0
    assert "tunnel_rtt_seconds" not in down

    assert value(back, "tunnel_connected") == 1
    assert value(back, "tunnel_reconnects") >= 1


async def test_traffic_counters_never_go_down_when_a_session_ends(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, A_HOST) as client:
        for n in range(5):
            client.tun.inject(to_server(n))
        await server.tun.wait_written(5)
        server_before = value(scrape(server_metrics(server.status())), "tunnel_rx_packets")
        client_before = value(scrape(client_metrics(client.status())), "tunnel_tx_packets")
        server.kick(client.identity.public_id)
        await wait_for(lambda: client.state != "connected")
        await wait_for(lambda: client.state == "connected")
        await wait_for(lambda: len(server.status()["sessions"]) == 1)
        server_after = value(scrape(server_metrics(server.status())), "tunnel_rx_packets")
        client_after = value(scrape(client_metrics(client.status())), "tunnel_tx_packets")
    assert server_after >= server_before
    assert client_after >= client_before


# --- from status dicts the daemons do not (yet) send -------------------------------------------


def test_refusal_reasons_are_normalized_and_handshakes_need_the_accepted_count():
    status = {
        "role": "server",
        "version": "0.1.0",
        "id": "x",
        "refused": {
            "unsupported protocol version 7": 2,
            "unsupported protocol version 99999": 1,  # the client picks the number
            "Invalid authentication token": 1,
            "Server full": 4,
            "something new": 1,
        },
        "rate_limited": 3,
    }
    families = scrape(server_metrics(status))
    failures = {s.labels["reason"]: s.value for s in families["tunnel_handshake_failures"].samples}
    assert failures["version"] == 3
    assert failures["token_invalid"] == 1
    assert failures["server_full"] == 4
    assert failures["other"] == 1
    assert failures["rate_limited"] == 3
    assert failures["signature"] == 0  # every known reason is there from the start
    assert "tunnel_handshakes" not in families  # not made up from the live sessions

    assert "tunnel_handshake_timeouts" not in families

    families = scrape(
        server_metrics({**status, "handshakes_accepted": 10, "handshake_timeouts": 2})
    )
    assert value(families, "tunnel_handshake_timeouts") == 2
    assert families["tunnel_handshakes"].type == "counter"
    assert value(families, "tunnel_handshakes") == 10 + 3 + 1 + 4 + 1 + 3


def test_running_traffic_totals_win_over_the_live_sessions_sum():
    sessions = [{"bytes_in": 5, "bytes_out": 6, "packets_in": 1, "packets_out": 2}]
    traffic = {"bytes_in": 500, "bytes_out": 600, "packets_in": 100, "packets_out": 200}
    for metrics in (server_metrics, client_metrics):
        live = scrape(metrics({"sessions": sessions}))
        assert value(live, "tunnel_rx_bytes") == 5
        assert value(live, "tunnel_tx_packets") == 2
        totals = scrape(metrics({"sessions": sessions, "traffic": traffic}))
        assert value(totals, "tunnel_rx_bytes") == 500
        assert value(totals, "tunnel_tx_bytes") == 600
        assert value(totals, "tunnel_rx_packets") == 100
        assert value(totals, "tunnel_tx_packets") == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=20,
)
status_keys = st.sampled_from(
    [
        "role", "version", "id", "uptime", "sessions", "drops", "refused", "rate_limited",
        "handshakes_accepted", "nat64", "traffic", "state", "reconnects", "peers",
        "last_handshake_ms", "pending_handshakes", "sessions_failed",
    ]
)  # fmt: skip


@settings(max_examples=300)
@given(st.dictionaries(status_keys | st.text(max_size=10), json_values, max_size=12))
def test_any_status_dict_gives_a_parseable_exposition(status):
    for metrics in (server_metrics, client_metrics, status_metrics):
        families = scrape(metrics(status))
        assert "tunnel_info" in families
        for family in families.values():
            for sample in family.samples:
                assert math.isfinite(sample.value)
                if family.type == "counter":
                    assert sample.value >= 0


# --- the HTTP server ---------------------------------------------------------------------------


class Scrapes:
    """A collector that counts its calls, so a test sees each scrape call it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> list[Metric]:
        self.count += 1
        return [CounterMetricFamily("tunnel_scrapes", "Scrapes so far.", value=self.count)]


@asynccontextmanager
async def serving(
    collect: Callable[[], Iterable[Metric]] | None = None, **limits: Any
) -> AsyncIterator[tuple[MetricsServer, tuple[str, int]]]:
    server = MetricsServer("127.0.0.1", 0, collect or Scrapes(), **limits)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(server.serve)
        yield server, address
        nursery.cancel_scope.cancel()


async def connect(address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address)


async def read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the server closes; a reset ends it too (what came before counts)."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def raw(address: tuple[str, int], request: bytes) -> bytes:
    """Send ``request``, half-close, read the answer to the end."""
    with trio.fail_after(5):
        stream = await connect(address)
        async with stream:
            await stream.send_all(request)
            await stream.send_eof()
            return await read_to_end(stream)


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, field = line.partition(":")
        headers[name.strip().lower()] = field.strip()
    return int(status_line.split()[1]), headers, body


class Client:
    """An h11 client on one keep-alive connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str = "GET", target: str = "/metrics") -> tuple[Any, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        request = h11.Request(method=method, target=target, headers=[("host", "localhost")])
        for event in (request, h11.EndOfMessage()):
            data = self.conn.send(event)
            assert data is not None
            await self.stream.send_all(data)
        response, body = None, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return response, body
            else:
                raise AssertionError(event)


def header(response: Any, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def test_get_metrics_returns_the_exposition():
    scrapes = Scrapes()
    async with serving(scrapes) as (server, address):
        status, headers, body = split(
            await raw(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["content-length"]) == len(body)
        families = parse(body)
        assert families["tunnel_scrapes"].type == "counter"
        assert value(families, "tunnel_scrapes") == 1
        # A query string is allowed (Prometheus may add params); collect runs at every scrape.
        _, _, body = split(await raw(address, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"))
        assert value(parse(body), "tunnel_scrapes") == 2
        assert server.statistics().requests == 2


async def test_head_has_the_length_and_no_body_and_keep_alive_is_bounded():
    async with serving(max_requests=3) as (_, address):
        async with await connect(address) as stream:
            client = Client(stream)
            with trio.fail_after(5):
                response, body = await client.request("GET")
                assert response.status_code == 200
                length = int(header(response, b"content-length"))
                response, head_body = await client.request("HEAD")
                assert response.status_code == 200
                assert head_body == b""
                # (the second scrape's value has the same length: 1 vs 2)
                assert int(header(response, b"content-length")) == length
                response, _ = await client.request("GET")
                assert response.status_code == 200
                assert header(response, b"connection") == b"close"  # the third and last
                assert await read_to_end(stream) == b""


async def test_pipelined_requests_are_answered_in_order():
    async with serving() as (_, address):
        two = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await raw(address, two)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert b"\nHTTP/1.1 404 " in answer


async def test_other_paths_are_404_and_other_methods_405():
    async with serving() as (_, address):
        async with await connect(address) as stream:
            client = Client(stream)
            with trio.fail_after(5):
                response, _ = await client.request("GET", "/")
                assert response.status_code == 404
                response, _ = await client.request("GET", "/metricsx")
                assert response.status_code == 404
                response, _ = await client.request("DELETE", "/metrics")
                assert response.status_code == 405
                assert header(response, b"allow") == b"GET, HEAD"
                response, _ = await client.request("POST", "/metrics")
                assert response.status_code == 405
                # the connection is still good after the errors
                response, _ = await client.request("GET", "/metrics")
                assert response.status_code == 200


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello"]
)
async def test_a_request_body_is_refused_and_the_connection_closed(framing):
    async with serving() as (server, address):
        answer = await raw(address, b"POST /metrics HTTP/1.1\r\nHost: x\r\n" + framing)
        assert split(answer)[0] == 413
        assert server.statistics().connections == 0


async def test_a_request_head_over_8_kib_is_refused():
    async with serving() as (server, address):
        fits = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 7000 + b"\r\n\r\n"
        assert split(await raw(address, fits))[0] == 200
        big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000
        answer = await raw(address, big)  # no end of the head: the size alone refuses it
        assert answer == b"" or split(answer)[0] == 431
        assert server.statistics().requests in (1, 2)


async def test_a_client_that_stalls_mid_request_is_closed_at_the_deadline():
    deadline = 0.3
    async with serving(request_deadline=deadline) as (server, address):
        async with await connect(address) as stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and nothing more
            start = trio.current_time()
            with trio.fail_after(5):
                assert await read_to_end(stream) == b""
            assert trio.current_time() - start >= deadline * 0.9
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().timed_out == 1
        assert server.statistics().connections == 0


async def test_a_trickling_client_is_closed_at_the_deadline_too():
    # A byte at a time keeps an idle timer alive forever; the deadline is for the whole request.
    deadline = 0.3
    async with serving(request_deadline=deadline) as (server, address):
        async with await connect(address) as stream:
            start = trio.current_time()

            async def trickle() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    for byte in b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 1000:
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.01)  # the client's pace, not a wait for the server

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                with trio.fail_after(5):
                    assert await read_to_end(stream) == b""
            assert trio.current_time() - start < deadline + 1
        assert server.statistics().timed_out == 1


async def test_an_idle_keep_alive_connection_is_closed_at_the_deadline():
    async with serving(request_deadline=0.3) as (server, address):
        async with await connect(address) as stream:
            client = Client(stream)
            with trio.fail_after(5):
                response, _ = await client.request()
                assert response.status_code == 200
                assert await read_to_end(stream) == b""
        assert server.statistics().timed_out == 1


async def test_connections_past_the_limit_are_closed_at_once():
    async with serving(max_connections=4) as (server, address):
        streams = [await connect(address) for _ in range(4)]
        clients = [Client(stream) for stream in streams]
        with trio.fail_after(5):
            for client in clients:  # each is being served: each got an answer
                response, _ = await client.request()
                assert response.status_code == 200
            assert server.statistics().connections == 4
            async with await connect(address) as excess:
                assert await read_to_end(excess) == b""  # closed at once, nothing read
            assert server.statistics().refused == 1
            # The held connections still work; once one goes, a new one is served.
            response, _ = await clients[0].request()
            assert response.status_code == 200
            await streams[0].aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().connections == 3
            async with await connect(address) as stream:
                response, _ = await Client(stream).request()
                assert response.status_code == 200
        for stream in streams[1:]:
            await stream.aclose()


async def test_a_failing_collect_is_a_500_and_the_next_scrape_works():
    calls = 0

    def collect() -> list[Metric]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in status")
        return []

    async with serving(collect) as (_, address):
        assert split(await raw(address, b"GET /metrics HTTP/1.0\r\n\r\n"))[0] == 500
        assert split(await raw(address, b"GET /metrics HTTP/1.0\r\n\r\n"))[0] == 200


async def test_a_port_in_use_is_a_one_line_setup_error():
    taken = trio.socket.socket()
    with taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = MetricsServer("127.0.0.1", port, list, key="metrics_listen")
        with pytest.raises(
            SystemSetupError, match=f"metrics_listen: cannot listen on 127.0.0.1:{port}"
        ):
            await server.serve()


async def test_serve_reports_the_bound_address_of_an_ipv6_listener():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = MetricsServer("::1", 0, list)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve)
            assert host == "::1" and port > 0
            answer = await raw((host, port), b"GET /metrics HTTP/1.0\r\n\r\n")
            assert split(answer)[0] == 200
            nursery.cancel_scope.cancel()
    except SystemSetupError:
        pytest.skip("no IPv6 loopback")


# Request-ish bytes: random, or random after a plausible start, so the fuzzer reaches the
# header and body parsers and not only the request line's.
request_bytes = st.one_of(
    st.binary(max_size=2000),
    st.tuples(
        st.sampled_from(
            [
                b"GET /metrics HTTP/1.1\r\n",
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: ",
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ",
                b"HEAD /metrics HTTP/1.0\r\n",
                b"GET ",
            ]
        ),
        st.binary(max_size=500),
        st.sampled_from([b"", b"\r\n", b"\r\n\r\n"]),
    ).map(b"".join),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(request_bytes, st.booleans()), min_size=1, max_size=4))
def test_arbitrary_bytes_never_disturb_the_server(requests):
    async def scenario() -> None:
        # The server task runs in the nursery: anything escaping it would fail this test.
        async with serving(request_deadline=0.5) as (server, address):
            for data, half_close in requests:
                with trio.fail_after(5):
                    async with await connect(address) as stream:
                        try:
                            await stream.send_all(data)
                            if half_close:
                                await stream.send_eof()
                                await read_to_end(stream)
                        except trio.BrokenResourceError:
                            pass  # the server closed on us mid-send: its right
            answer = await raw(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert split(answer)[0] == 200
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().connections <= len(requests)

    trio.run(scenario)
