"""The per-connection driver: one aioquic ``QuicConnection`` run from trio.

aioquic is sans-IO. A :class:`QuicDriver` owns one ``QuicConnection`` and does the three things
every user of it must: after any input, hand the produced events to their handler and send the
produced datagrams; keep exactly one timer armed at ``get_timer()``; never let a remote error
escape as an exception (aioquic already turns them into ``ConnectionTerminated``). Packets of
DATAGRAM frames take the fast path (:mod:`tunnel.daemon.aioquic_private.fastpath`) both ways.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent
from aioquic.quic.recovery import K_MICRO_SECOND

from tunnel.core.messages import CLOSE_INTERNAL
from tunnel.daemon.aioquic_private.fastpath import (
    Received,
    live_host_cid,
    outgoing_datagrams,
    receive_datagram_fast,
)
from tunnel.daemon.aioquic_private.state import event_queue
from tunnel.daemon.quic import Address

__all__ = ["QuicDriver"]

log = logging.getLogger("tunnel.quic")


class QuicDriver:
    """Drives one QuicConnection: events out to ``handle_event``, datagrams out through ``send``
    (a whole batch at a time, so the socket can send it in one system call), and one timer task
    (:meth:`run_timer`) that must run in the owning session's nursery.

    It is also the connection's fault boundary: every way into the connection (a received
    datagram, its events, a transmit, the timer) goes through here, and an exception on any of
    them closes this connection alone with ``CLOSE_INTERNAL`` and is handed to ``on_failure``;
    nothing raises into the pump that called. A failed driver ignores everything after.
    """

    def __init__(
        self,
        quic: QuicConnection,
        send: Callable[[list[tuple[bytes, Address]]], None],
        handle_event: Callable[[QuicEvent], None],
        on_failure: Callable[[Exception], None],
    ) -> None:
        self.quic = quic
        # What next_event() pops, kept to drain it without a call per event.
        self._events = event_queue(quic)
        self._send = send
        self._handle_event = handle_event
        self._on_failure = on_failure
        self._timer_scope: trio.CancelScope | None = None
        self._clock: trio.abc.Clock | None = None
        # Whether aioquic itself may have queued something (from a received packet or its
        # timer) that only its generic send path sends.
        self._aioquic_due = True
        self.failed = False
        # Called when the connection's current path changes (aioquic moved the peer to a new
        # address): path MTU discovery starts again there.
        self.on_path_change: Callable[[], None] | None = None
        self._path: object | None = None

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one UDP datagram. Call :meth:`pump` once after a batch of these."""
        if self.failed:
            return
        try:
            received = receive_datagram_fast(self.quic, data, addr, now)
            if received is Received.NOT_OURS:
                self.quic.receive_datagram(data, addr, now)
                live_host_cid(self.quic)
        except Exception as exc:
            self.fail(exc)
            return
        if received <= Received.DONE:  # aioquic handled frames: its sender may have work
            self._aioquic_due = True

    def deliver_events(self) -> None:
        """Hand every pending event to its handler. The caller sends afterwards (once per batch,
        with whatever else the batch queued)."""
        events = self._events
        handle = self._handle_event
        try:
            while events and not self.failed:
                handle(events.popleft())
        except Exception as exc:
            self.fail(exc)

    def pump(self) -> None:
        """Deliver pending events, then send whatever the connection has to send."""
        self.deliver_events()
        self.transmit()

    def transmit(self) -> None:
        """Send everything the connection has queued, and re-arm the timer."""
        if self.failed:
            return
        try:
            clock = self._clock
            if clock is None:
                # The run's clock, read directly: trio.current_time() is three calls deep.
                clock = self._clock = trio.lowlevel.current_clock()
            # Whatever this cannot send yet (congestion, pacing) waits for an ACK or the
            # timer, and each of those sets the flag again.
            datagrams, path = outgoing_datagrams(self.quic, clock.current_time(), self._aioquic_due)
            self._aioquic_due = False
            if path is not self._path:
                self._path = path
                if self.on_path_change is not None:
                    self.on_path_change()
            if datagrams:
                self._send(datagrams)
            scope = self._timer_scope
            if scope is not None:
                timer = self.quic.get_timer()
                scope.deadline = math.inf if timer is None else timer
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        """Close this connection for an internal error (once), tell the owner, and try to let
        the peer know. Never raises."""
        if self.failed:
            return
        self.failed = True
        if self._timer_scope is not None:
            self._timer_scope.deadline = math.inf
        try:
            self.quic.close(error_code=CLOSE_INTERNAL, reason_phrase="internal error")
            self._send(self.quic.datagrams_to_send(now=trio.current_time()))
        except Exception:  # the connection's state is what failed: the peer will time out
            log.debug("could not send the close of a failed connection", exc_info=True)
        self._on_failure(exc)

    async def run_timer(self) -> None:
        """Fire aioquic's timer whenever it is due. Runs until cancelled."""
        while not self.failed:
            timer = self.quic.get_timer()
            with trio.CancelScope(deadline=math.inf if timer is None else timer) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            if self.failed:
                break
            timer = self.quic.get_timer()
            now = trio.current_time()
            if timer is not None and now >= timer:
                try:
                    self.quic.handle_timer(now)
                except Exception as exc:
                    self.fail(exc)
                    break
                self._aioquic_due = True
                self.pump()
                if self.quic.get_timer() == timer:
                    # Nothing moved it: aioquic's loss timer is `sent + delay` but the check
                    # is `now - delay >= sent`, which rounding can keep false at exactly that
                    # time. A moment later it holds (on virtual time this would spin forever).
                    await trio.sleep(K_MICRO_SECOND)
        await trio.sleep_forever()
