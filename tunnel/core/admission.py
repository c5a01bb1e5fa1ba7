"""What the server does with a datagram for no connection it knows: admission.

Anyone on the internet can send us datagrams, and a datagram whose connection ID matches no
session asks for work: a new handshake (memory, crypto), a Retry, a Version Negotiation or a
stateless reset. :class:`HandshakeGate` decides which, from the datagram's header, its source
address and ``now``, and keeps the counts and budgets that bound that work:

* at most ``max_pending`` handshakes in flight overall and ``max_pending_per_source`` from one
  source address; past ``retry_above`` pending, a new client must first prove it owns its
  address with a Retry round trip (RFC 9000 8.1.2), so spoofed floods cost us one packet each;
* Version Negotiation only for datagrams at least as large as a client's first Initial (we never
  answer with more than we were sent) and at most ``negotiations_per_second``;
* a stateless reset (RFC 9000 10.3) only for short-header packets large enough that the reset,
  one byte smaller, still looks like a packet (no reset loops), at most ``resets_per_second``.

An admitted handshake does not start at once: it waits in a :class:`Backlog` (first come, first
served, one entry per client connection ID however often the client retransmits) until the
:class:`WorkBudget` allows it. The budget is measured in seconds of the server's own work, so a
storm of a thousand newcomers is taken at the rate this machine can afford, and the sessions that
are already up keep the rest of the core: their heartbeats are answered while the storm lasts.
Waiting Initials count as pending, so the limits and the Retry threshold above see them.

Every decision that drops says why, as the drop counter the shell increments. Pure: no I/O, no
clock (``now`` comes in), no aioquic.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

from tunnel.core.ratelimit import Bucket, TokenBucket

__all__ = [
    "Backlog",
    "SMALLEST_INITIAL",
    "SMALLEST_RESET_TRIGGER",
    "Decision",
    "HandshakeGate",
    "PacketKind",
    "UnknownDatagram",
    "Verdict",
    "WorkBudget",
]

T = TypeVar("T")

# RFC 9000 14.1: a client's first Initial is padded to at least this many bytes.
SMALLEST_INITIAL = 1200
# The smallest stateless reset is 21 bytes and must be smaller than what triggered it.
SMALLEST_RESET_TRIGGER = 22


class PacketKind(enum.Enum):
    """The header types admission tells apart (the shell maps its parser's types here)."""

    INITIAL = "initial"
    ONE_RTT = "1-rtt"
    VERSION_NEGOTIATION = "version negotiation"
    OTHER = "other"  # 0-RTT, Handshake, Retry: never the start of a connection


class Verdict(enum.Enum):
    """What to do with the datagram."""

    ACCEPT = "accept"  # a new connection
    ACCEPT_IF_TOKEN_VALID = "accept if its Retry token is valid"
    RETRY = "retry"  # answer with a Retry; no state kept
    NEGOTIATE = "negotiate"  # answer with Version Negotiation
    RESET = "reset"  # answer with a stateless reset
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class UnknownDatagram:
    """What admission reads of a datagram no connection claimed."""

    kind: PacketKind
    version: int | None  # None for a short header
    size: int  # the whole datagram, in bytes
    has_token: bool  # an Initial carrying a (Retry) token


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    drop: str | None = None  # the drop counter this datagram goes to, if any


NEGOTIATE = Decision(Verdict.NEGOTIATE)
SILENT = Decision(Verdict.DROP)  # not worth a counter: no answer for unsolicited noise
UNKNOWN = Decision(Verdict.DROP, "udp_unknown_connection")
RESET = Decision(Verdict.RESET, "udp_unknown_connection")
LIMITED = Decision(Verdict.DROP, "handshake_limit")
RETRY = Decision(Verdict.RETRY)
ACCEPT = Decision(Verdict.ACCEPT)
ACCEPT_IF_TOKEN_VALID = Decision(Verdict.ACCEPT_IF_TOKEN_VALID)


class HandshakeGate:
    """Admission for datagrams of unknown connections, and the count of handshakes in flight.

    :meth:`decide` never changes the pending counts; the shell calls :meth:`started` when it
    does create a connection (an accepted one whose token, if any, was valid) and
    :meth:`finished` exactly once when that handshake ends, however it ends.
    """

    def __init__(
        self,
        *,
        supported_versions: frozenset[int] | set[int] | list[int],
        max_pending: int = 1024,
        max_pending_per_source: int = 16,
        retry_above: int = 64,
        resets_per_second: float = 100,
        negotiations_per_second: float = 100,
    ) -> None:
        self.supported_versions = frozenset(supported_versions)
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.retry_above = retry_above
        self._resets = TokenBucket(rate=resets_per_second, burst=resets_per_second)
        self._negotiations = TokenBucket(
            rate=negotiations_per_second, burst=negotiations_per_second
        )
        self.pending_total = 0
        self.pending_by_source: collections.Counter[str] = collections.Counter()

    def decide(self, datagram: UnknownDatagram, source: str, now: float) -> Decision:
        """The verdict on one datagram from ``source`` (its address, without the port)."""
        if datagram.version is not None and datagram.version not in self.supported_versions:
            if (
                datagram.kind is not PacketKind.VERSION_NEGOTIATION
                and datagram.size >= SMALLEST_INITIAL
                and self._negotiations.take(now)
            ):
                return NEGOTIATE
            return SILENT
        if datagram.kind is not PacketKind.INITIAL or datagram.size < SMALLEST_INITIAL:
            if (
                datagram.kind is PacketKind.ONE_RTT
                and datagram.size >= SMALLEST_RESET_TRIGGER
                and self._resets.take(now)
            ):
                return RESET
            return UNKNOWN
        if (
            self.pending_total >= self.max_pending
            or self.pending_by_source[source] >= self.max_pending_per_source
        ):
            return LIMITED
        if datagram.has_token:
            return ACCEPT_IF_TOKEN_VALID
        if self.pending_total >= self.retry_above:
            return RETRY
        return ACCEPT

    def started(self, source: str) -> None:
        """A handshake from ``source`` now holds state: it counts until :meth:`finished`."""
        self.pending_by_source[source] += 1
        self.pending_total += 1

    def finished(self, source: str) -> None:
        """A handshake from ``source`` ended (authenticated, refused, timed out or closed)."""
        if self.pending_by_source[source] <= 0:
            raise ValueError(f"no handshake from {source} is pending")
        self.pending_total -= 1
        self.pending_by_source[source] -= 1
        if not self.pending_by_source[source]:
            del self.pending_by_source[source]


class WorkBudget(Bucket):
    """Seconds of work the server may spend on new handshakes: ``share`` of every second on
    average, at most ``burst`` seconds at once.

    The shell asks :meth:`available` before it starts a waiting handshake and reports what the
    start cost with :meth:`spent` (measured, so a slower machine simply admits fewer). The level
    may go below zero by the cost of the last start; :meth:`ready_at` says when it is above
    zero again.
    """

    __slots__ = ()

    def __init__(self, *, share: float, burst: float) -> None:
        if not 0 < share <= 1 or burst <= 0:
            raise ValueError("share must be in (0, 1] and burst positive")
        super().__init__(rate=share, burst=burst)

    @property
    def share(self) -> float:
        return self.rate

    def available(self, now: float) -> bool:
        """May another handshake start now?"""
        return self._refill(now) > 0

    def spent(self, now: float, seconds: float) -> None:
        """A handshake start took ``seconds`` of work."""
        self._refill(now)
        self._level -= max(0.0, seconds)

    def ready_at(self, now: float) -> float:
        """When :meth:`available` will be true again (``now`` if it is)."""
        level = self._refill(now)
        if level > 0:
            return now
        return now + -level / self.rate + 1e-6


class Backlog(Generic[T]):
    """Admitted handshakes waiting for the :class:`WorkBudget`: first in, first out, at most
    one entry per key (the client's destination connection ID: its retransmissions of the same
    Initial are not queued twice), each dropped after ``max_age`` seconds (its client gave up,
    or will retransmit and queue again)."""

    def __init__(self, *, max_age: float) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self.max_age = max_age
        self._entries: collections.OrderedDict[bytes, tuple[float, T]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def push(self, key: bytes, item: T, now: float) -> bool:
        """Queue ``item`` under ``key``; False (and nothing queued) if ``key`` waits already."""
        if key in self._entries:
            return False
        self._entries[key] = (now, item)
        return True

    def pop(self) -> T | None:
        """The oldest waiting item, or None."""
        if not self._entries:
            return None
        _, (_, item) = self._entries.popitem(last=False)
        return item

    def expire(self, now: float) -> list[T]:
        """Remove and return the items that waited longer than ``max_age``."""
        expired: list[T] = []
        while self._entries:
            queued_at, item = next(iter(self._entries.values()))
            if now - queued_at <= self.max_age:
                break
            self._entries.popitem(last=False)
            expired.append(item)
        return expired
