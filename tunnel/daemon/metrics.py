"""The daemons' Prometheus metrics: families made from the status dict, and a small HTTP server.

Why from the status dict: ``Server.status()`` / ``Client.status()`` already gather every counter
the daemon keeps, and ``tunnel status`` shows them. Building the metrics from that one dict
(pure functions, no daemon objects) keeps a single source of truth, lets ``tunnel metrics``
render the same text from what the control socket sends, and makes the mapping testable on a
plain dict. Every key is read defensively (missing or non-numeric -> the metric is left out),
because the dict may come from a daemon of another version through JSON.

What is exported, and why no per-client series
    Only daemon-wide aggregates. A server holds up to ``max_clients`` sessions (1024 and more),
    and clients come and go: one series per client name or ID per metric would make the
    scrape's size grow with the number of clients and leave a trail of dead series in the
    time-series database at every reconnect (the per-session counters restart with each session,
    too, so those series would not even be proper counters). A threshold ("per client only
    below 64 sessions") is worse: series that vanish the moment the server grows break every
    dashboard and alert built on them. And client names and IDs are personal data that would
    leave the host for a metrics system that is often less guarded than the server. Per-session
    detail stays where it is bounded by a human asking: ``tunnel status``. Every label here has
    a fixed, code-defined set of values: drop reasons (constants in the code), refusal reasons
    (normalized: the version refusal carries the client's version number, client-chosen text
    that must not become a label value), NAT64 protocols and directions, peer path states.

Counters that must never go down
    A Prometheus counter that decreases reads as a restart of the process. The per-session
    counters restart with every session, so the traffic counters come from the daemons'
    running totals (status key ``traffic``: bytes and packets in and out, ended sessions
    included); a status without it (an older daemon) falls back to the live sessions' sum.
    ``tunnel_handshakes_total`` needs the gatekeeper's count of accepted requests (status key
    ``handshakes_accepted``): without it, it is left out rather than computed from the live
    sessions, which would go down.

There is no ``tunnel_up``: Prometheus' own ``up`` says whether the daemon answered, and
``tunnel_info`` is 1 whenever it does. The client's ``tunnel_connected`` says whether its session
to the server is up.

The HTTP server
    prometheus_client's own server runs in a thread; this one is h11 on a trio listener, in
    the daemon's thread and nursery: ``GET``/``HEAD /metrics``, 404 elsewhere, 405 for other
    methods. It may face a network, so each connection runs behind a boundary (any error closes
    that connection and is logged at debug, never reaching the server task) with bounds on
    everything a client controls: concurrent connections (the excess is closed at once), the
    request head (8 KiB), the time for one request and its response (slowloris, slow readers,
    idle keep-alive), the requests per connection; request bodies are refused with 413.
    The content type is the 0.0.4 text format's, spelled out: that is the format
    ``generate_latest`` writes (prometheus_client 0.26 moved ``CONTENT_TYPE_LATEST`` to the
    1.0.0 text format, which its own server pairs with another writer).
"""

from __future__ import annotations

import http
import logging
import math
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tunnel.core.authority import (
    REASON_FULL,
    REASON_NOT_ALLOWED,
    REASON_POOL,
    REASON_SIGNATURE,
    REASON_TOKEN_INVALID,
    REASON_TOKEN_REQUIRED,
    REASON_TOO_MANY_SESSIONS,
    REASON_VERSION,
)
from tunnel.errors import NameNotResolved, SystemSetupError

__all__ = [
    "CONTENT_TYPE",
    "MetricsServer",
    "MetricsServerStatistics",
    "client_metrics",
    "render",
    "server_metrics",
    "status_metrics",
]

log = logging.getLogger("tunnel.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The HTTP server's bounds (see the module's docstring).
MAX_CONNECTIONS = 32
MAX_HEAD = 8 * 1024
REQUEST_DEADLINE = 10.0  # seconds for one request: its head in, its response out
MAX_REQUESTS_PER_CONNECTION = 100
READ_SIZE = 4096
BACKLOG = 64
METRICS_PATH = b"/metrics"

# The gatekeeper's refusal reasons -> label values. The version refusal is matched by prefix:
# its text ends in the client's version number.
_REFUSALS = {
    REASON_VERSION: "version",
    REASON_SIGNATURE: "signature",
    REASON_TOKEN_REQUIRED: "token_required",
    REASON_TOKEN_INVALID: "token_invalid",
    REASON_NOT_ALLOWED: "not_allowed",
    REASON_FULL: "server_full",
    REASON_POOL: "pool_exhausted",
    REASON_TOO_MANY_SESSIONS: "too_many_sessions",
    "rejected": "rejected",  # a refusal without a reason (the gatekeeper's name for it)
}
_PEER_PATHS = ("relay", "probing", "direct")
_TRAFFIC = (
    # Counted as they arrive, before the checks that may drop them (tunnel_drops_total).
    ("tunnel_rx_bytes", "bytes_in", "Bytes of IP packets received through the tunnel."),
    ("tunnel_tx_bytes", "bytes_out", "Bytes of IP packets sent through the tunnel."),
    ("tunnel_rx_packets", "packets_in", "IP packets received through the tunnel."),
    ("tunnel_tx_packets", "packets_out", "IP packets sent through the tunnel."),
)


# --- status dict -> metric families ----------------------------------------------------------


def status_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """The families for either daemon's status, by its ``role``."""
    if status.get("role") == "client":
        return client_metrics(status)
    return server_metrics(status)


def server_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """The server's metric families, from ``Server.status()`` (or its JSON round trip)."""
    sessions = _mappings(status.get("sessions"))
    out = _common(status, "server")
    out += _gauge("tunnel_sessions", "Authenticated sessions.", len(sessions))
    out += _gauge(
        "tunnel_pending_handshakes",
        "QUIC handshakes in progress.",
        status.get("pending_handshakes"),
    )
    out += _gauge(
        "tunnel_waiting_handshakes",
        "Admitted QUIC Initials waiting for the handshake work budget.",
        status.get("waiting_handshakes"),
    )
    out += _traffic(status, sessions)
    out += _drops(status)
    out += _handshakes(status)
    for name, key, doc in (
        ("tunnel_sessions_failed", "sessions_failed", "Sessions closed for an internal error."),
        (
            "tunnel_sessions_replaced",
            "sessions_replaced",
            "Sessions replaced by a newer one of the same client and device.",
        ),
        (
            "tunnel_protocol_violations",
            "protocol_violations",
            "Sessions closed for breaking the control protocol.",
        ),
        (
            "tunnel_sessions_revoked",
            "revoked",
            "Live sessions closed because a reload withdrew their credentials.",
        ),
        (
            "tunnel_handshake_timeouts",
            "handshake_timeouts",  # not kept by the daemon yet: left out until it is
            "Connections dropped for not authenticating within handshake_timeout.",
        ),
        ("tunnel_quic_retries_sent", "retries_sent", "QUIC Retry packets sent."),
        ("tunnel_quic_resets_sent", "resets_sent", "QUIC stateless resets sent."),
        ("tunnel_introductions", "introductions", "Client-to-client introductions sent."),
        (
            "tunnel_introductions_limited",
            "introductions_limited",
            "Client-to-client introductions refused by the rate limit.",
        ),
    ):
        out += _counter(name, doc, status.get(key))
    nat64 = status.get("nat64")
    if isinstance(nat64, Mapping):
        out += _nat64(nat64)
    return out


def client_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """The client's metric families, from ``Client.status()`` (or its JSON round trip)."""
    sessions = _mappings(status.get("sessions"))
    out = _common(status, "client")
    out += _gauge(
        "tunnel_connected",
        "1 while a session to the server is up, else 0.",
        1 if status.get("state") == "connected" else 0,
    )
    out += _gauge("tunnel_sessions", "Sessions to the server (0 or 1).", len(sessions))
    out += _counter(
        "tunnel_reconnects", "Reconnects since the daemon started.", status.get("reconnects")
    )
    out += _traffic(status, sessions)
    out += _drops(status)
    out += _gauge(
        "tunnel_last_handshake_seconds",
        "How long the latest handshake took.",
        _scaled(status.get("last_handshake_ms"), 1e-3),
    )
    if sessions:
        session = sessions[0]
        out += _gauge(
            "tunnel_rtt_seconds",
            "Smoothed round-trip time to the server.",
            _scaled(session.get("rtt_ms"), 1e-3),
        )
        out += _gauge(
            "tunnel_path_mtu_bytes",
            "The path MTU to the server, as discovery sees it.",
            session.get("path_mtu"),
        )
    peers = _mappings(status.get("peers"))
    paths = dict.fromkeys(_PEER_PATHS, 0)
    for peer in peers:
        path = peer.get("path")
        label = path if isinstance(path, str) and path in _PEER_PATHS else "other"
        paths[label] = paths.get(label, 0) + 1
    out += _labelled(
        GaugeMetricFamily,
        "tunnel_peers",
        "Introduced peers, by where their traffic goes.",
        "path",
        paths,
    )
    return out


def _common(status: Mapping[str, Any], role: str) -> list[Metric]:
    info = GaugeMetricFamily(
        "tunnel_info",
        "The daemon: its version, role and public ID.",
        labels=["version", "role", "id"],
    )
    info.add_metric([str(status.get("version", "")), role, str(status.get("id", ""))], 1)
    return [
        info,
        *_gauge("tunnel_uptime_seconds", "Seconds since the daemon started.", status.get("uptime")),
    ]


def _traffic(status: Mapping[str, Any], sessions: list[Mapping[str, Any]]) -> list[Metric]:
    """The running totals in ``traffic`` when the daemon keeps them, else the live sessions'
    sum (which goes down when a session ends: see the module's docstring)."""
    totals = status.get("traffic")
    out: list[Metric] = []
    for name, key, doc in _TRAFFIC:
        if isinstance(totals, Mapping):
            value = _number(totals.get(key))
        else:
            value = sum(_number(s.get(key)) or 0.0 for s in sessions)
        out += _counter(name, doc, value)
    return out


def _drops(status: Mapping[str, Any]) -> list[Metric]:
    drops = status.get("drops")
    return _labelled(
        CounterMetricFamily,
        "tunnel_drops",
        "Packets dropped, by reason.",
        "reason",
        drops if isinstance(drops, Mapping) else {},
    )


def _handshakes(status: Mapping[str, Any]) -> list[Metric]:
    """Authentication attempts that reached the gatekeeper, and the ones refused by reason
    (``rate_limited``: refused unseen after too many failures)."""
    # Every known reason from the start, at 0: a first failure is then an increase.
    failures = dict.fromkeys([*_REFUSALS.values(), "rate_limited"], 0.0)
    refused = status.get("refused")
    for reason, count in refused.items() if isinstance(refused, Mapping) else ():
        number = _number(count)
        if number is not None and number >= 0:
            label = _refusal_label(str(reason))
            failures[label] = failures.get(label, 0.0) + number
    rate_limited = _number(status.get("rate_limited"))
    if rate_limited is not None and rate_limited >= 0:
        failures["rate_limited"] = rate_limited
    out = _labelled(
        CounterMetricFamily,
        "tunnel_handshake_failures",
        "Authentication requests refused, by reason.",
        "reason",
        failures,
    )
    accepted = _number(status.get("handshakes_accepted"))
    if accepted is not None:
        out += _counter(
            "tunnel_handshakes",
            "Authentication requests decided (accepted or refused).",
            accepted + sum(failures.values()),
        )
    return out


def _refusal_label(reason: str) -> str:
    for text, label in _REFUSALS.items():
        if reason == text or reason.startswith(text + " "):
            return label
    return "other"


def _nat64(nat64: Mapping[str, Any]) -> list[Metric]:
    """The translator's state and counters; its drops are among the server's (``nat64_*``)."""
    out = _labelled(
        GaugeMetricFamily,
        "tunnel_nat64_mappings",
        "NAT64 mappings held, by protocol.",
        "proto",
        {proto: nat64.get(proto) for proto in ("tcp", "udp", "icmp")},
    )
    out += _labelled(
        CounterMetricFamily,
        "tunnel_nat64_translated_packets",
        "Packets NAT64 translated: out (IPv6 to IPv4), in (IPv4 to IPv6).",
        "direction",
        {"out": nat64.get("translated_out"), "in": nat64.get("translated_in")},
    )
    out += _labelled(
        CounterMetricFamily,
        "tunnel_nat64_icmp_errors",
        "ICMP errors NAT64 generated (sent), or held back by its rate limit (suppressed).",
        "outcome",
        {"sent": nat64.get("icmp_errors_sent"), "suppressed": nat64.get("icmp_errors_suppressed")},
    )
    out += _counter(
        "tunnel_nat64_mappings_expired", "NAT64 mappings expired.", nat64.get("expired")
    )
    out += _gauge(
        "tunnel_nat64_fragments_waiting",
        "Datagrams NAT64 holds fragments of.",
        nat64.get("fragments_waiting"),
    )
    out += _labelled(
        CounterMetricFamily,
        "tunnel_nat64_fragments_reassembled",
        "Datagrams NAT64 made whole from fragments, by direction.",
        "direction",
        {
            "out": nat64.get("fragments_reassembled_out"),
            "in": nat64.get("fragments_reassembled_in"),
        },
    )
    out += _counter(
        "tunnel_nat64_fragments_expired",
        "Datagrams NAT64 gave up on, incomplete.",
        nat64.get("fragments_expired"),
    )
    return out


def _number(value: object) -> float | None:
    """A finite number, else None (bools, None, strings: not a measurement)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past a float's range
        return None
    return number if math.isfinite(number) else None


def _scaled(value: object, factor: float) -> float | None:
    number = _number(value)
    return number * factor if number is not None else None


def _mappings(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _gauge(name: str, doc: str, value: object) -> list[Metric]:
    number = _number(value)
    return [GaugeMetricFamily(name, doc, value=number)] if number is not None else []


def _counter(name: str, doc: str, value: object) -> list[Metric]:
    number = _number(value)
    if number is None or number < 0:
        return []
    return [CounterMetricFamily(name, doc, value=number)]


def _labelled(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[Any, object],
) -> list[Metric]:
    """One family, one sample per key with a numeric value (sorted: a stable exposition)."""
    family = kind(name, doc, labels=[label])
    for key in sorted(values, key=str):
        number = _number(values[key])
        if number is not None and (number >= 0 or kind is GaugeMetricFamily):
            family.add_metric([str(key)], number)
    return [family]


# --- exposition ------------------------------------------------------------------------------


class _Collector:
    """The one collector of a registry: whatever ``collect`` returns at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def _registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    # auto_describe=False: registering must not call collect (the daemon may not be up yet).
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(collect))
    return registry


def render(metrics: Iterable[Metric]) -> bytes:
    """The text exposition (format 0.0.4, :data:`CONTENT_TYPE`) of ``metrics``."""
    families = list(metrics)
    return generate_latest(_registry(lambda: families))


# --- the HTTP server -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsServerStatistics:
    """What :meth:`MetricsServer.statistics` reports."""

    connections: int  # open now
    accepted: int  # connections served (behind the limit)
    refused: int  # connections closed at once: the limit was reached
    timed_out: int  # connections closed at a request's deadline
    failed: int  # connections ended by an error (the client's or ours), logged at debug
    requests: int  # responses sent, whatever their status


class MetricsServer:
    """Serves ``GET``/``HEAD /metrics`` from ``collect`` over HTTP/1.1 (h11) on a TCP listener.

    ``host`` is an address or a name (the first address it resolves to is bound; "" or "::"
    for every address). The bounds default to the module's constants; tests shorten them.
    """

    def __init__(
        self,
        host: str,
        port: int,
        collect: Callable[[], Iterable[Metric]],
        *,
        key: str = "metrics",
        max_connections: int = MAX_CONNECTIONS,
        max_head: int = MAX_HEAD,
        request_deadline: float = REQUEST_DEADLINE,
        max_requests: int = MAX_REQUESTS_PER_CONNECTION,
    ) -> None:
        self.host = host
        self.port = port
        self.key = key  # the config key errors name
        self.registry = _registry(collect)
        self.max_connections = max_connections
        self.max_head = max_head
        self.request_deadline = request_deadline
        self.max_requests = max_requests
        self._connections = 0
        self._accepted = 0
        self._refused = 0
        self._timed_out = 0
        self._failed = 0
        self._requests = 0

    def statistics(self) -> MetricsServerStatistics:
        return MetricsServerStatistics(
            connections=self._connections,
            accepted=self._accepted,
            refused=self._refused,
            timed_out=self._timed_out,
            failed=self._failed,
            requests=self._requests,
        )

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound ``(host, port)`` through ``task_status``, serve until
        cancelled. A failure to bind raises :class:`SystemSetupError` (or
        :class:`NameNotResolved`) naming :attr:`key`."""
        listener = await self._bind()
        address = listener.socket.getsockname()
        async with trio.open_nursery() as nursery:
            # serve_listeners rides out EMFILE and friends, and closes each stream after us.
            await nursery.start(trio.serve_listeners, self._connection, [listener])
            log.info("metrics on http://%s/metrics", _format(address))
            task_status.started((address[0], address[1]))

    async def _bind(self) -> trio.SocketListener:
        host = self.host or None
        try:
            infos = await trio.socket.getaddrinfo(
                host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise NameNotResolved(
                f"{self.key}: cannot resolve {self.host!r}: {exc.strerror}"
            ) from exc
        family, kind, proto, _, address = infos[0]
        sock = trio.socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4
            await sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise SystemSetupError(
                f"{self.key}: cannot listen on {_format(address)}: {exc.strerror}"
            ) from exc
        return trio.SocketListener(sock)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client, behind its boundary: nothing it does reaches the server task."""
        if self._connections >= self.max_connections:
            self._refused += 1
            return  # serve_listeners closes it now
        self._connections += 1
        self._accepted += 1
        try:
            await self._converse(stream)
        except Exception as exc:  # the client's trouble (or a bug): this connection only
            self._failed += 1
            log.debug("metrics connection closed: %s: %s", type(exc).__name__, exc)
        finally:
            self._connections -= 1

    async def _converse(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        for served in range(1, self.max_requests + 1):
            with trio.move_on_after(self.request_deadline) as deadline:
                again = await self._exchange(stream, conn, last=served == self.max_requests)
            if deadline.cancelled_caught:
                self._timed_out += 1
                log.debug("metrics connection closed: no complete request in time")
                return
            if not again:
                return
            conn.start_next_cycle()

    async def _exchange(
        self, stream: trio.SocketStream, conn: h11.Connection, *, last: bool
    ) -> bool:
        """One request and its response; whether the connection may carry another."""
        try:
            request = await _next_event(stream, conn)
            if not isinstance(request, h11.Request):
                return False  # closed by the client (or something h11 will not take)
            if _has_body(request):
                await self._respond(stream, conn, request, 413, b"no request bodies\n", close=True)
                return False
            # The end of the (empty) body, so that the next cycle can start.
            if not isinstance(await _next_event(stream, conn), h11.EndOfMessage):
                return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._respond(
                    stream, conn, None, exc.error_status_hint, b"bad request\n", close=True
                )
            return False
        status, body, extra = self._answer(request)
        await self._respond(stream, conn, request, status, body, close=last, extra=extra)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _answer(self, request: h11.Request) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        path = request.target.split(b"?", 1)[0]
        if path != METRICS_PATH:
            return 404, b"not found: try /metrics\n", []
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")]
        try:
            return 200, generate_latest(self.registry), []
        except Exception as exc:  # a bug in collect: this scrape fails, the daemon goes on
            log.warning("metrics: collecting failed: %s: %s", type(exc).__name__, exc)
            log.debug("the failure in full", exc_info=exc)
            return 500, b"collecting the metrics failed\n", []

    async def _respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        request: h11.Request | None,
        status: int,
        body: bytes,
        *,
        close: bool,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"content-type", CONTENT_TYPE.encode() if status == 200 else b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            *(extra or []),
        ]
        if close:
            headers.append((b"connection", b"close"))
        reason = http.HTTPStatus(status).phrase.encode() if status in _STATUSES else b""
        await _send(stream, conn, h11.Response(status_code=status, headers=headers, reason=reason))
        if body and (request is None or request.method != b"HEAD"):
            await _send(stream, conn, h11.Data(data=body))
        await _send(stream, conn, h11.EndOfMessage())
        self._requests += 1


_STATUSES = frozenset(s.value for s in http.HTTPStatus)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    """h11's next event, reading as it needs (an end of the stream is told to h11)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(READ_SIZE))


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


def _has_body(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and int(value) != 0:  # h11 checked it is digits
            return True
    return False


def _format(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
