"""Which path carries the traffic to one introduced peer: the relay (the server) or a direct one.

One :class:`PeerPath` per introduced peer, in three states:

* ``RELAY``: traffic goes through the server. The start, and where every failure lands: a
  probing round that found nothing, a direct path that went quiet or closed. A new round
  follows after an exponential backoff (:data:`RETRY_BASE_S` doubling up to
  :data:`RETRY_CAP_S`), at once when the candidates change, and early when the peer shows it
  is probing too (below).
* ``PROBING``: traffic still goes through the server while we ping every candidate at once and
  then every :data:`PING_INTERVAL_S` (:data:`PINGS_PER_ROUND` pings per address). A pong on an
  address is a full round trip on it; the *initiator* (the peer with the smaller public key,
  the QUIC client) then opens a QUIC connection there, the other side waits for it.
* ``DIRECT``: traffic goes over that connection. Entered only once the same address has
  answered a ping in this round *and* carries the connection, whose handshake completed:
  never on one packet, so a path that works one way only never gets used. Left when the
  connection closes, or when :data:`DIRECT_TIMEOUT_S` pass after something we sent
  with nothing heard back (any packet of the connection counts, QUIC's ACKs too); an idle path
  gets a keepalive every :data:`KEEPALIVE_S`, well under Linux's 30 s conntrack timeout for
  UDP, and the peer's ACK of it is what we then hear. Silence alone is not a failure: an idle
  path hears nothing between keepalives.

Leaving ``DIRECT`` needs a new round trip and a new connection to come back, and the backoff
only resets once a direct path held for :data:`STABLE_S` (or the candidates change): a path
that answers probes but fails with data moves back and forth at most at the backoff's pace.

The two peers' rounds must overlap (the initiator connects only after its own pong, the
responder goes direct only after its own). They start together when the server introduces
them, but each side's backoff runs on its own, so a side in ``RELAY`` starts a round early
when the peer proves it is probing: an authenticated ping from it (:meth:`PeerPath.ping_received`,
at most one such round per :data:`MIN_ROUND_INTERVAL_S`, since a ping can be replayed), or a
completed connection from it (:meth:`PeerPath.connected`).

Pure, in the shape of :class:`tunnel.core.heartbeat.HeartbeatPolicy`: events record what
happened (with ``now``); :meth:`PeerPath.poll` says what to do now and counts the pings and
keepalive it asks for as sent; :meth:`PeerPath.wake_at`, asked after acting, says when to poll
next. The daemon polls after every event too. Waking early is harmless.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable

import attrs

from tunnel.core.backoff import Backoff
from tunnel.core.disco import MAX_CANDIDATES, Endpoint, format_endpoint

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DIRECT_TIMEOUT_S",
    "KEEPALIVE_S",
    "MAX_LEARNED",
    "MIN_ROUND_INTERVAL_S",
    "PINGS_PER_ROUND",
    "PING_INTERVAL_S",
    "PONG_WAIT_S",
    "RETRY_BASE_S",
    "RETRY_CAP_S",
    "RETRY_JITTER_S",
    "STABLE_S",
    "Actions",
    "PeerPath",
    "State",
]

PING_INTERVAL_S = 0.5
"""Between two pings to one address: both NATs open within a second or two, and a path that
exists is found in well under 2 s."""

PINGS_PER_ROUND = 9
"""Pings per address in one round, so a round pings for 4 s (as iroh does)."""

PONG_WAIT_S = 1.0
"""How long a round waits for a pong after its last ping."""

CONNECT_TIMEOUT_S = 5.0
"""After a pong, how long the round waits for the QUIC handshake on the punched path (a lost
Initial is retransmitted after about a second)."""

DIRECT_TIMEOUT_S = 5.0
"""With something sent and nothing heard for this long, the direct path is dead: back to the
relay."""

KEEPALIVE_S = 10.0
"""An idle direct path gets a keepalive this often: conntrack forgets an unanswered UDP flow
after 30 s, and the ACK it draws shows the path still works."""

STABLE_S = 30.0
"""A direct path that lasted this long resets the backoff when it fails: a path that flaps
does not."""

RETRY_BASE_S = 2.0
"""Delay before the first retry after a failed round or a fallback."""

RETRY_CAP_S = 60.0
"""Longest delay between rounds, as Tailscale's periodic re-probe."""

RETRY_JITTER_S = 0.5
"""Largest jitter added to a retry delay."""

MIN_ROUND_INTERVAL_S = 5.0
"""A ping from the peer starts a round early at most this often after the last round started:
a replayed ping can cost us this, and no more."""

MAX_LEARNED = 4
"""Addresses learnt from the peer's own packets (a ping or a connection from an address it did
not report), on top of the reported candidates; the oldest goes first."""


class State(enum.Enum):
    """Where the peer's traffic goes; ``PROBING`` still goes through the relay."""

    RELAY = "relay"
    PROBING = "probing"
    DIRECT = "direct"


@attrs.frozen
class Actions:
    """What to do now, in this order.

    ``close``: close (or abandon the attempt at) the direct connection, if there is one.
    ``ping``: send a probe Ping to each of these addresses. ``connect``: open the direct QUIC
    connection to this address (only ever for the initiator). ``switch_to``: traffic moves to
    ``State.DIRECT`` (over the connection at :attr:`PeerPath.endpoint`) or ``State.RELAY``.
    ``keepalive``: send an ack-eliciting packet (a QUIC PING) on the direct connection.
    """

    close: bool = False
    ping: tuple[Endpoint, ...] = ()
    connect: Endpoint | None = None
    switch_to: State | None = None
    keepalive: bool = False


@attrs.define
class _Candidate:
    learned: bool  # from the peer's packets, not its report
    pings: int = 0  # sent in this round
    pong: bool = False  # answered in this round


class PeerPath:
    """The path policy towards one peer. ``initiator``: we have the smaller public key and open
    the direct connection. ``backoff`` spaces the rounds (default: 2 s doubling to 60 s, plus
    up to 0.5 s of jitter); pass one without jitter for exact times in tests.

    Discard the object when the server says the peer is gone; a repeated introduction is
    :meth:`candidates_changed`.
    """

    def __init__(self, *, initiator: bool, backoff: Backoff | None = None) -> None:
        self.initiator = initiator
        self._backoff = (
            backoff
            if backoff is not None
            else Backoff(base=RETRY_BASE_S, cap=RETRY_CAP_S, max_jitter=RETRY_JITTER_S)
        )
        self.state = State.RELAY
        self._told = State.RELAY  # the path the daemon was last told to use
        self._candidates: dict[Endpoint, _Candidate] = {}  # reported first, then learned
        # When each address was last pinged, across rounds: never twice within the interval.
        self._last_ping: dict[Endpoint, float] = {}
        self._retry_at = math.inf  # RELAY: when the next round starts
        self._last_round_start = -math.inf
        # PROBING
        self._round_start = -math.inf
        self._last_ping_in_round = -math.inf
        self._await_until = -math.inf  # after a pong or a connect: time for the handshake
        self._connecting: Endpoint | None = None  # initiator: the attempt in flight
        self._failed: set[Endpoint] = set()  # initiator: attempts that failed in this round
        self._connect_pending: Endpoint | None = None  # to report in the next poll
        # The direct connection whose handshake completed (PROBING or DIRECT).
        self._connection: Endpoint | None = None
        self._close_pending = False
        # DIRECT
        self._direct_since = -math.inf
        self._last_heard: float | None = None
        self._last_sent = -math.inf
        self._awaiting_since: float | None = None  # the first send nothing was heard after
        # How often the path moved to a direct one and back: a flapping path shows here.
        self.upgrades = 0
        self.fallbacks = 0

    # --- events --------------------------------------------------------------------------------

    def introduced(self, candidates: Iterable[Endpoint], now: float) -> None:
        """The server introduced the peer, with the endpoints to try (best first, already
        filtered: :func:`tunnel.core.disco.order_candidates`): probe at once."""
        self.candidates_changed(candidates, now)

    def candidates_changed(self, candidates: Iterable[Endpoint], now: float) -> None:
        """The peer's endpoints changed (a new introduction), or ours did (our network
        changed): the backoff starts again, and a round starts at once unless one is running
        (the new addresses join it) or the direct path is up (it stays while it works)."""
        reported: dict[Endpoint, _Candidate] = {}
        for endpoint in candidates:
            if len(reported) >= MAX_CANDIDATES:
                break
            old = self._candidates.get(endpoint)
            reported.setdefault(endpoint, _Candidate(False) if old is None else old)
        for candidate in reported.values():
            candidate.learned = False
        learned = {e: c for e, c in self._candidates.items() if c.learned and e not in reported}
        self._candidates = reported | learned
        self._prune_pings(now)
        self._backoff.reset()
        if self.state is State.RELAY and self._candidates:
            self._start_round(now)

    def pong_received(self, address: Endpoint, now: float) -> None:
        """A pong came from ``address`` for a ping we sent there (the daemon matched the txid
        and the source): a full round trip. Counts in a running round only."""
        candidate = self._candidates.get(address)
        if self.state is not State.PROBING or candidate is None:
            return
        if not any(c.pong for c in self._candidates.values()):
            self._await_until = max(self._await_until, now + CONNECT_TIMEOUT_S)
        candidate.pong = True
        if self._connection == address:
            self._go_direct(address, now)

    def ping_received(self, address: Endpoint, now: float) -> None:
        """An authenticated ping from the peer came from ``address`` (the daemon answers it; it
        passes only addresses :func:`tunnel.core.disco.usable_candidate` accepts). An address
        the peer did not report becomes a candidate; in ``RELAY``, the peer is probing, so we
        start a round too (at most one per :data:`MIN_ROUND_INTERVAL_S`).

        A ping can be replayed from any source address, so what this costs is bounded: while
        a round runs, no learnt address is replaced (at most :data:`MAX_LEARNED` get pinged
        per round), and rounds it starts are spaced out."""
        self._learn(address, evict=self.state is not State.PROBING)
        if (
            self.state is State.RELAY
            and self._candidates
            and now >= self._last_round_start + MIN_ROUND_INTERVAL_S
        ):
            self._start_round(now)

    def connected(self, address: Endpoint, now: float) -> None:
        """The direct QUIC connection with the peer at ``address`` completed its handshake (and
        the peer proved its key). There is at most one: the daemon reports the old one's end
        (:meth:`direct_failed`) before a new one. Direct once ``address`` answered a ping in
        this round; in ``RELAY`` the peer found a path, so a round starts at once to confirm
        it."""
        if self.state is State.DIRECT:
            if address == self.endpoint:
                self.heard(now)
            return
        self._learn(address, evict=True)
        self._connection = address
        self._connecting = None
        if self.state is State.RELAY:
            self._start_round(now)
        candidate = self._candidates.get(address)
        if candidate is not None and candidate.pong:
            self._go_direct(address, now)

    def heard(self, now: float) -> None:
        """A packet of the direct connection arrived (data, an ACK, a keepalive)."""
        self._last_heard = now
        self._awaiting_since = None

    def sent(self, now: float) -> None:
        """We sent something ack-eliciting on the direct connection (a tunnel packet): if
        nothing is heard back within :data:`DIRECT_TIMEOUT_S`, the path is dead."""
        if self.state is not State.DIRECT:
            return
        self._last_sent = now
        if self._awaiting_since is None:
            self._awaiting_since = now

    def direct_failed(self, now: float) -> None:
        """The direct connection closed, failed its handshake or could not be opened."""
        address = self._connection or self._connecting
        self._connection = self._connecting = None
        if self.state is State.DIRECT:
            self._fall_back(now)
        elif self.state is State.PROBING and address is not None:
            self._failed.add(address)  # the next ponged address, if any, gets its turn

    # --- decisions -----------------------------------------------------------------------------

    def poll(self, now: float) -> Actions:
        """What to do at ``now``; counts the pings and the keepalive it asks for as sent."""
        ping: list[Endpoint] = []
        keepalive = False
        if self.state is State.RELAY and now >= self._retry_at and self._candidates:
            self._start_round(now)
        if self.state is State.PROBING:
            for address, candidate in self._candidates.items():
                if candidate.pings < PINGS_PER_ROUND and now >= self._next_ping(address):
                    candidate.pings += 1
                    self._last_ping[address] = now
                    self._last_ping_in_round = now
                    ping.append(address)
            if self.initiator and self._connecting is None and self._connection is None:
                for address, candidate in self._candidates.items():
                    if candidate.pong and address not in self._failed:
                        self._connecting = self._connect_pending = address
                        self._await_until = max(self._await_until, now + CONNECT_TIMEOUT_S)
                        break
            if now >= self._round_end():
                self._fail_round(now)
        elif self.state is State.DIRECT:
            if self._awaiting_since is not None and now >= (
                self._awaiting_since + DIRECT_TIMEOUT_S
            ):
                self._close_pending = True
                self._fall_back(now)
            elif now >= self._idle_deadline():
                keepalive = True
                self._last_sent = now
                if self._awaiting_since is None:
                    self._awaiting_since = now
        switch = None
        if self.path is not self._told:
            switch = self._told = self.path
        connect = self._connect_pending if self.state is State.PROBING else None
        actions = Actions(
            close=self._close_pending,
            ping=tuple(ping),
            connect=connect,
            switch_to=switch,
            keepalive=keepalive,
        )
        self._close_pending = False
        self._connect_pending = None
        return actions

    def wake_at(self) -> float:
        """When the next poll may have something to do (``math.inf``: only after an event)."""
        if self.state is State.RELAY:
            return self._retry_at if self._candidates else math.inf
        if self.state is State.DIRECT:
            wake = self._idle_deadline()
            if self._awaiting_since is not None:
                wake = min(wake, self._awaiting_since + DIRECT_TIMEOUT_S)
            return wake
        wake = self._round_end()
        for address, candidate in self._candidates.items():
            if candidate.pings < PINGS_PER_ROUND:
                wake = min(wake, self._next_ping(address))
        if self.initiator and self._connecting is None and self._connection is None:
            if any(c.pong and a not in self._failed for a, c in self._candidates.items()):
                wake = -math.inf  # a connect is due: poll at once
        return wake

    # --- what the daemon reads -----------------------------------------------------------------

    @property
    def path(self) -> State:
        """``State.DIRECT`` or ``State.RELAY``: where traffic goes now."""
        return State.DIRECT if self.state is State.DIRECT else State.RELAY

    @property
    def is_direct(self) -> bool:
        """Traffic takes the direct connection now."""
        return self.state is State.DIRECT

    @property
    def endpoint(self) -> Endpoint | None:
        """The peer's address on the direct path, while direct."""
        return self._connection if self.state is State.DIRECT else None

    @property
    def candidates(self) -> tuple[Endpoint, ...]:
        """The addresses probed: the reported ones first, then the learnt ones."""
        return tuple(self._candidates)

    @property
    def retry_at(self) -> float:
        """In ``RELAY``: when the next round starts (``math.inf``: none is planned)."""
        return self._retry_at if self.state is State.RELAY else math.inf

    def status(self, now: float) -> dict[str, object]:
        """For the status socket and logs: the ``path`` ("direct" or "relay"), the ``state``,
        the ``endpoint`` while direct (``"ip:port"``, else None), ``since_heard``: seconds
        since the direct connection was last heard (None if never), and how many times the
        path went direct (``upgrades``) and fell back (``fallbacks``)."""
        endpoint = self.endpoint
        return {
            "path": self.path.value,
            "state": self.state.value,
            "endpoint": None if endpoint is None else format_endpoint(endpoint),
            "since_heard": None if self._last_heard is None else now - self._last_heard,
            "upgrades": self.upgrades,
            "fallbacks": self.fallbacks,
        }

    # --- internals -----------------------------------------------------------------------------

    def _learn(self, address: Endpoint, *, evict: bool) -> None:
        if address in self._candidates:
            return
        learned = [e for e, c in self._candidates.items() if c.learned]
        if len(learned) >= MAX_LEARNED:
            if not evict:
                return
            busy = {self._connection, self._connecting}
            victim = next((e for e in learned if e not in busy), None)
            if victim is None:
                return
            del self._candidates[victim]
        self._candidates[address] = _Candidate(True)

    def _next_ping(self, address: Endpoint) -> float:
        last = self._last_ping.get(address)
        if last is None:
            return self._round_start
        return max(self._round_start, last + PING_INTERVAL_S)

    def _prune_pings(self, now: float) -> None:
        # Keep the memory bounded: only the candidates and the pings still within the interval.
        self._last_ping = {
            a: t
            for a, t in self._last_ping.items()
            if a in self._candidates or now < t + PING_INTERVAL_S
        }

    def _round_end(self) -> float:
        """When the running round has failed: every address pinged out and no pong for
        :data:`PONG_WAIT_S`, and the time after a pong or a connect attempt run out."""
        if any(c.pings < PINGS_PER_ROUND for c in self._candidates.values()):
            return math.inf
        return max(self._last_ping_in_round + PONG_WAIT_S, self._await_until)

    def _start_round(self, now: float) -> None:
        self.state = State.PROBING
        self._round_start = self._last_round_start = now
        self._last_ping_in_round = -math.inf
        self._await_until = -math.inf
        self._retry_at = math.inf
        self._failed = set()
        for candidate in self._candidates.values():
            candidate.pings = 0
            candidate.pong = False
        self._prune_pings(now)

    def _fail_round(self, now: float) -> None:
        if self._connection is not None or self._connecting is not None:
            self._close_pending = True
        self._to_relay(now)

    def _go_direct(self, address: Endpoint, now: float) -> None:
        self.state = State.DIRECT
        self.upgrades += 1
        self._connection = address
        self._connecting = None
        self._connect_pending = None
        self._direct_since = now
        self._last_heard = now  # the handshake just completed: heard
        self._last_sent = -math.inf
        self._awaiting_since = None

    def _fall_back(self, now: float) -> None:
        self.fallbacks += 1
        if now >= self._direct_since + STABLE_S:
            self._backoff.reset()
        self._to_relay(now)

    def _to_relay(self, now: float) -> None:
        self.state = State.RELAY
        self._connection = self._connecting = self._connect_pending = None
        self._awaiting_since = None
        for candidate in self._candidates.values():
            candidate.pong = False
        self._retry_at = now + self._backoff.next_delay()

    def _idle_deadline(self) -> float:
        last_heard = -math.inf if self._last_heard is None else self._last_heard
        return max(last_heard, self._last_sent, self._direct_since) + KEEPALIVE_S
