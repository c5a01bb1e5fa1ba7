"""The server as introducer: it tells two clients that talk through it how to reach each other
directly.

The first packet one client sends another through the server introduces the pair: each is sent
a :class:`~tunnel.core.messages.PeerIntro` with the other's key, tunnel addresses and
endpoints (the one the server observes first, then the ones the client reported), and a
secret fresh for this pair, which keys their probes and binds their direct connection. A
client that reports new candidates is introduced again to every peer it knows, with the same
secret; a session that ends, or the policy turned off, sends ``PeerGone``. Only clients that
asked for introductions (and only while ``client_to_client`` is on) take part.

Bounded per client: introductions and re-introductions spend a token bucket each, so a client
sending to every address of the pool costs the server a few frames a second, not a storm.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

from tunnel.core.disco import socket_endpoint
from tunnel.core.messages import (
    MAX_ENDPOINTS,
    Candidates,
    Endpoint,
    PeerGone,
    PeerIntro,
)
from tunnel.core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from tunnel.daemon.server.session import ServerSession

log = logging.getLogger("tunnel.server")

INTRO_RATE = 10.0  # introductions a client may cause a second, on average
INTRO_BURST = 20.0
UPDATE_RATE = 1.0  # re-introductions after new candidates, a second
UPDATE_BURST = 4.0
SECRET_SIZE = 32


class PeerState:
    """What the introducer keeps of one session taking part in direct paths."""

    __slots__ = ("candidates", "secrets", "intro_budget", "update_budget")

    def __init__(self) -> None:
        self.candidates: tuple[Endpoint, ...] = ()  # as the client reported them
        self.secrets: dict[ServerSession, bytes] = {}  # the peers it was introduced to
        self.intro_budget = TokenBucket(rate=INTRO_RATE, burst=INTRO_BURST)
        self.update_budget = TokenBucket(rate=UPDATE_RATE, burst=UPDATE_BURST)


class Introducer:
    """Introduces pairs of sessions that relay traffic to each other."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._peers: dict[ServerSession, PeerState] = {}
        self.introductions = 0  # pairs introduced
        self.limited = 0  # introductions or updates refused by a client's budget

    def joined(self, session: ServerSession) -> None:
        """An authenticated session that takes introductions."""
        if self.enabled:
            self._peers[session] = PeerState()

    def takes_part(self, session: ServerSession) -> bool:
        return session in self._peers

    def introduced(self, a: ServerSession, b: ServerSession) -> bool:
        """Has the pair been introduced, or can it never be? (The forwarder's cheap check.)"""
        state = self._peers.get(a)
        return state is None or b in state.secrets or b not in self._peers

    def relayed(self, a: ServerSession, b: ServerSession) -> None:
        """``a`` sent ``b`` a packet through us: introduce them, if they are not already."""
        state_a, state_b = self._peers.get(a), self._peers.get(b)
        if state_a is None or state_b is None or b in state_a.secrets or a is b:
            return
        now = trio.current_time()
        if not state_a.intro_budget.take(now):
            self.limited += 1
            return
        secret = secrets.token_bytes(SECRET_SIZE)
        state_a.secrets[b] = secret
        state_b.secrets[a] = secret
        self.introductions += 1
        a.log.debug("introduced to %s", b.log.extra["client"] if b.log.extra else "-")
        self._introduce(a, b, secret)
        self._introduce(b, a, secret)

    def candidates(self, session: ServerSession, reported: Candidates) -> None:
        """``session`` reported its endpoints: remember them and tell its peers, within budget."""
        state = self._peers.get(session)
        if state is None:
            return
        state.candidates = reported.endpoints
        if not state.secrets:
            return
        if not state.update_budget.take(trio.current_time()):
            self.limited += 1
            return
        for peer, secret in state.secrets.items():
            self._introduce(peer, session, secret)

    def left(self, session: ServerSession) -> None:
        """``session`` ended: its peers hear that it is gone."""
        state = self._peers.pop(session, None)
        if state is None:
            return
        for peer in state.secrets:
            peer_state = self._peers.get(peer)
            if peer_state is not None:
                peer_state.secrets.pop(session, None)
                self._gone(peer, session)

    def disable(self) -> None:
        """``client_to_client`` was turned off: every direct path ends, nobody is introduced."""
        self.enabled = False
        peers, self._peers = self._peers, {}
        for session, state in peers.items():
            for peer in state.secrets:
                self._gone(session, peer)

    def enable(self) -> None:
        """Turned on again: sessions that connect from now on take part."""
        self.enabled = True

    def _introduce(self, to: ServerSession, about: ServerSession, secret: bytes) -> None:
        intro = self._intro(about, secret)
        if intro is not None:
            to.send_frame(intro)  # dropped (counted) if its stream is full: it re-reports

    def _gone(self, to: ServerSession, about: ServerSession) -> None:
        if about.client_id is not None:
            to.send_frame(PeerGone(about.client_id))

    def _intro(self, about: ServerSession, secret: bytes) -> PeerIntro | None:
        if about.client_id is None or about.lease is None:
            return None
        endpoints: list[Endpoint] = []
        observed = socket_endpoint(about.current_remote())
        state = self._peers.get(about)
        for endpoint in ([observed] if observed else []) + list(state.candidates if state else ()):
            if endpoint not in endpoints:
                endpoints.append(endpoint)
        return PeerIntro(
            peer_id=about.client_id,
            addresses=tuple(about.lease.addresses),
            endpoints=tuple(endpoints[:MAX_ENDPOINTS]),
            secret=secret,
        )

    def status(self) -> dict[str, int]:
        return {"introductions": self.introductions, "introductions_limited": self.limited}
