"""The server's sessions: by connection ID (for the dispatcher) and by tunnel address (for the
forwarder), with their leases.

The table is the one place a session is added, routed, replaced and removed, so no map can keep
pointing at a session that has ended (the fuzzer checks exactly that after every hostile run).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from tunnel.core.authority import Authority
from tunnel.core.messages import CLOSE_KICKED, CLOSE_REPLACED
from tunnel.core.routing import RouteTable
from tunnel.daemon.session import Channel

if TYPE_CHECKING:
    from tunnel.daemon.server.session import ServerSession

log = logging.getLogger("tunnel.server")


class SessionTable:
    """Every live session, the connection IDs that reach it, and the addresses it leases.

    ``by_cid`` is the dispatcher's lookup (our 8-byte connection IDs -> session); ``routes`` is
    the forwarder's (tunnel address -> the authenticated session holding it); ``by_owner``
    holds the one live session of each client and device. A session is :meth:`add`-ed with its
    first connection IDs, :meth:`attach`-ed once authenticated (the same client and device's
    older session is replaced at once: closed, its routes taken, no longer listed), and
    :meth:`detach`-ed when it ends, which also returns its lease to the pools.
    """

    def __init__(self, authority: Authority, touched: set[Channel]) -> None:
        self.authority = authority
        self.sessions: set[ServerSession] = set()
        # The counters of the sessions that ended: added to the live ones, totals.
        self.ended: collections.Counter[str] = collections.Counter()
        self.by_cid: dict[bytes, ServerSession] = {}
        self._cids_of: dict[ServerSession, set[bytes]] = {}
        self.routes: RouteTable[ServerSession] = RouteTable()
        self.by_owner: dict[tuple[bytes, int], ServerSession] = {}
        self.replaced = 0  # sessions replaced by a newer one of the same client and device
        self.touched = touched
        self.lease_changed = trio.Event()
        self.failed = 0  # sessions closed for an internal error (their boundary caught it)
        self.protocol_violations = 0  # sessions closed for breaking the control protocol

    def add(self, session: ServerSession, cids: list[bytes]) -> None:
        """A new connection, reached by ``cids`` (the client's chosen one and ours)."""
        self.sessions.add(session)
        self._cids_of[session] = set()
        for cid in cids:
            self.cid_issued(session, cid)

    def cid_issued(self, session: ServerSession, cid: bytes) -> None:
        held = self._cids_of.get(session)
        if held is None:
            return  # already detached: an event delivered after the end
        self.by_cid[cid] = session
        held.add(cid)

    def cid_retired(self, session: ServerSession, cid: bytes) -> None:
        if self.by_cid.get(cid) is session:
            del self.by_cid[cid]
        self._cids_of.get(session, set()).discard(cid)

    def attach(self, session: ServerSession) -> None:
        """``session`` authenticated: its lease's addresses route to it from now on."""
        assert session.lease is not None
        owner = session.lease.owner
        previous = self.by_owner.get(owner)
        self.by_owner[owner] = session
        if previous is not None and previous is not session:
            # The same client and device came back before we noticed the old one die: one
            # identity and device, one session, one route, from this moment on.
            self._replace(previous)
        for displaced in self.routes.add(session, [a.packed for a in session.lease.addresses]):
            self._replace(displaced)  # cannot happen while leases are per owner; cheap to keep

    def _replace(self, previous: ServerSession) -> None:
        self.routes.remove(previous)
        if not previous.closing:
            self.replaced += 1
            previous.log.info("replaced by a new session")
            previous.close(CLOSE_REPLACED, "replaced by a new session")

    def detach(self, session: ServerSession) -> None:
        """``session`` ended: nothing routes to it, and its lease goes back unless another
        session (its successor) still holds the same lease."""
        if session in self.sessions and session.lease is not None:
            for key, value in session.counters().items():
                self.ended[key] += value  # totals that never go down, for the metrics
        self.sessions.discard(session)
        self.touched.discard(session)
        for cid in self._cids_of.pop(session, ()):
            if self.by_cid.get(cid) is session:
                del self.by_cid[cid]
        self.routes.remove(session)  # only what it still holds: not what a successor took
        lease = session.lease
        if lease is None:
            return
        successor = self.by_owner.get(lease.owner)
        if successor is session:
            del self.by_owner[lease.owner]
        elif successor is not None:
            return  # its successor holds the lease now
        self.authority.release(lease.owner, now=trio.current_time())
        self.lease_changed.set()

    def authenticated(self) -> list[ServerSession]:
        """The live sessions holding a lease, one per client and device (the ones status
        shows): not those closing (replaced, kicked, revoked) while their close drains."""
        return [s for s in self.by_owner.values() if not s.closing]

    def closing_count(self) -> int:
        """Sessions whose close is draining (status counts them, but does not list them)."""
        return sum(1 for s in self.sessions if s.closing)

    def revoke_failing(self, still_admits: Callable[[bytes, bytes], bool]) -> int:
        """Close every live session whose credentials ``still_admits`` refuses; how many."""
        revoked = 0
        for session in list(self.sessions):
            if session.lease is None or session.client_id is None or session.closing:
                continue
            assert session.token_digest is not None
            if not still_admits(session.client_id, session.token_digest):
                session.revoke()
                revoked += 1
        return revoked

    def close_client(self, client_id: bytes, reason: str) -> int:
        """Close every live session of ``client_id`` with ``reason`` (CLOSE_KICKED, which the
        client takes as a lost session and reconnects); how many."""
        closed = 0
        for session in list(self.sessions):
            if session.client_id == client_id and session.lease and not session.closing:
                session.log.warning("closing the session: %s", reason)
                session.close(CLOSE_KICKED, reason)
                closed += 1
        return closed

    def traffic(self) -> dict[str, int]:
        """Bytes and packets in and out since the server started, ended sessions included."""
        totals = collections.Counter(self.ended)
        for session in self.sessions:
            if session.lease is not None:  # closing ones too: totals never go down
                totals.update(session.counters())
        return {key: totals[key] for key in ("bytes_in", "bytes_out", "packets_in", "packets_out")}

    def status(self) -> dict[str, object]:
        return {
            "sessions_failed": self.failed,
            "protocol_violations": self.protocol_violations,
            "sessions_replaced": self.replaced,
            "sessions_closing": self.closing_count(),
            "traffic": self.traffic(),
        }

    async def lease_reaper(self) -> None:
        """Return leases whose grace period ran out to the pools."""
        while True:
            expiry = self.authority.next_expiry()
            self.lease_changed = trio.Event()
            with trio.move_on_at(math.inf if expiry is None else expiry):
                await self.lease_changed.wait()
            for lease in self.authority.expire(trio.current_time()):
                log.debug("lease of %s expired", ", ".join(str(a) for a in lease.addresses))
