"""Path MTU discovery for one connection: :class:`tunnel.core.pmtu.PmtuSearch` fed by aioquic.

A :class:`PathMtu` is one task in a session's nursery. It waits until the connection's
handshake is confirmed, then starts the search and does what the search decides: sends each
probe (a PING padded to the size, outside congestion control; see
:mod:`tunnel.daemon.aioquic_private.pmtu`), passes on what became of it, reports the losses and
acknowledgements of ordinary packets for black-hole detection, notices a new path (a client
that migrated or rebound, a NAT that changed the client's port) and applies every new size to
the connection: aioquic's sender, the fast path, the pacer and congestion controller, and the
channel's largest datagram payload.

It sleeps until something needs it: the search's own deadline, a probe result or a loss
(each wakes it through :meth:`wake`), or a call to :meth:`path_changed`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio
from aioquic.quic.connection import QuicConnection

from tunnel.core.pmtu import BASE_SIZE, DEFAULT_MAXIMUM, PmtuSearch, PmtuState
from tunnel.daemon.aioquic_private.pmtu import (
    PacketTally,
    probe_timeout,
    send_probe,
    set_datagram_size,
)
from tunnel.daemon.aioquic_private.state import (
    has_ended,
    is_closing,
    is_established,
    is_open,
)

__all__ = ["PathMtu", "SendProbe", "SizeChanged"]

log = logging.getLogger("tunnel.pmtu")

SendProbe = Callable[[bytes, Any], bool]
"""Sends one probe datagram to an address; False only if the host itself refused it as larger
than its link (EMSGSIZE): a loss known at once."""

SizeChanged = Callable[[int, list[bytes]], None]
"""Told the new UDP payload size and the queued datagrams that no longer fit one packet."""

# Until the handshake is confirmed (the client learns it from HANDSHAKE_DONE), look this often.
_START_POLL = 0.05


class PathMtu:
    """Runs a :class:`PmtuSearch` on one aioquic connection (see the module docstring).

    ``send`` sends a probe (a :data:`SendProbe`); ``on_size`` (a :data:`SizeChanged`) hears
    every change of the size in use, after aioquic already follows it; ``transmit`` sends
    what the connection has queued (the driver's). ``maximum`` is the largest UDP payload
    ever tried.
    """

    def __init__(
        self,
        quic: QuicConnection,
        send: SendProbe,
        on_size: SizeChanged,
        transmit: Callable[[], None],
        *,
        maximum: int = DEFAULT_MAXIMUM,
        label: str = "-",
    ) -> None:
        self.quic = quic
        self.search = PmtuSearch(maximum=maximum)
        self._send = send
        self._transmit = transmit
        self._on_size = on_size
        self._label = label
        self._tally: PacketTally | None = None
        self._results: list[tuple[int, bool]] = []
        self._path_changed = False
        self._scope: trio.CancelScope | None = None
        self._woken = False
        self.applied = BASE_SIZE
        self._settled = 0  # the size last logged as settled
        self.refused_by_host = 0  # probes the host refused as larger than its own link

    @property
    def current(self) -> int:
        """The UDP payload size in use on this path now."""
        return self.applied

    @property
    def searching(self) -> bool:
        """Is the size still being looked for (started and not settled)? While it is, a packet
        that does not fit is better carried than answered with "packet too big": the answer
        would make its sender settle for the base size."""
        return self.search.state is not PmtuState.COMPLETE

    def wake(self) -> None:
        """Something for the search happened: run it soon. Safe from inside aioquic."""
        self._woken = True
        scope = self._scope
        if scope is not None:
            scope.deadline = -math.inf

    def path_changed(self) -> None:
        """The path changed (aioquic moved the peer to a new address, which the driver
        reports, or the client moved to a new local socket): search again from the base."""
        self._path_changed = True
        self.wake()

    def status(self) -> dict[str, Any]:
        stats = self.search.statistics()
        return {
            "path_mtu": self.applied,
            "pmtu_state": stats.state.value,
            "pmtu_probes": stats.probes_sent,
            "pmtu_black_holes": stats.black_holes,
        }

    async def run(self) -> None:
        """Run until cancelled or the connection has ended."""
        quic = self.quic
        while not is_established(quic):
            if is_closing(quic):
                await trio.sleep_forever()
            await trio.sleep(_START_POLL)
        now = trio.current_time()
        self._tally = PacketTally(quic)
        self._tally.on_loss = self.wake
        self._path_changed = False  # changes during the handshake: this search is new anyway
        self.search.start(now)
        while not has_ended(quic):
            self._woken = False
            self.step(trio.current_time())
            deadline = self.search.deadline
            with trio.CancelScope(deadline=math.inf if deadline is None else deadline) as scope:
                self._scope = scope
                if self._woken:  # woken while stepping: go round again at once
                    scope.deadline = -math.inf
                await trio.sleep_forever()
            self._scope = None
        await trio.sleep_forever()

    def step(self, now: float) -> None:
        """Feed the search everything that happened since the last step, send the probes it
        asks for and apply its size."""
        quic = self.quic
        search = self.search
        if not is_open(quic):
            return
        if self._path_changed:
            self._path_changed = False
            self._results.clear()
            search.path_changed(now)
            log.debug("[%s] path changed: path MTU search starts again", self._label)
        results, self._results = self._results, []
        for size, acked in results:
            if acked:
                search.probe_acked(size, now)
            else:
                search.probe_lost(size, now)
        assert self._tally is not None
        lost, largest_acked = self._tally.take()
        if lost or largest_acked:
            if search.packet_loss_report(now, lost=lost, largest_acked=largest_acked):
                log.info(
                    "[%s] packets of %d bytes stopped arriving: back to %d, searching again",
                    self._label,
                    self.applied,
                    search.current,
                )
        search.timer(now)
        pto = probe_timeout(quic)
        sent = False
        while (probe := search.next_probe(now, pto=pto)) is not None:
            packet = send_probe(quic, probe, now, self._result)
            if packet is None:
                continue  # cannot carry one now (closing, path in validation): it times out
            if self._send(packet, quic.get_peer_address()):
                sent = True
            else:
                self.refused_by_host += 1
                search.probe_lost(probe, now)
        if sent:
            # A small ack-eliciting packet right behind: once it is acknowledged, aioquic's
            # loss detection declares a probe that did not arrive lost within about an RTT
            # (RFC 9002 time threshold), long before the probe timer would.
            quic.send_ping(0)
            self._transmit()
        self._apply(search.current)
        if search.state is PmtuState.COMPLETE and self._settled != self.applied:
            self._settled = self.applied
            log.info("[%s] path MTU: %d bytes of UDP payload", self._label, self.applied)

    def _result(self, size: int, acked: bool) -> None:
        # Called by aioquic from inside receive_datagram or handle_timer: note it, run later.
        self._results.append((size, acked))
        self.wake()

    def _apply(self, size: int) -> None:
        if size == self.applied:
            return
        self.applied = size
        self._on_size(size, set_datagram_size(self.quic, size))
