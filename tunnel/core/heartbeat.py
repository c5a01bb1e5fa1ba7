"""The client's heartbeat: when to ping, when to try a new socket, when the session is lost.

The client pings the server every ``interval`` seconds and the server answers with a pong.
While no pong comes back:

* after ``rebind_after = min(1.5 * interval, timeout / 2)`` seconds of silence (one pong late)
  the client moves to a fresh local socket, once: the path may be dead for this socket only
  (a source address that went away, a NAT that forgot the mapping). Another rebind needs a
  pong first and then another such silence;
* after ``timeout`` seconds of silence the session is lost (the supervisor reconnects), long
  before QUIC's own idle timeout would notice.

Pure, in the shape of aioquic's ``handle_timer(now)`` / ``get_timer()``: the caller feeds
:meth:`HeartbeatPolicy.on_pong` and :meth:`HeartbeatPolicy.decide` the time, acts on the
:class:`Decision` (in the order lost, rebind, ping), then sleeps until
:meth:`HeartbeatPolicy.wake_at`, asked *after* acting: a pong that arrived while it acted
(a rebind awaits a new socket) moves the next wake-up. Waking early is harmless (the next
decision is "nothing"); the policy never needs a wake-up later than :meth:`wake_at`.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["Decision", "HeartbeatPolicy"]


@attrs.frozen
class Decision:
    """What to do now. ``lost``: nothing else matters, the session is over."""

    lost: bool = False
    rebind: bool = False
    ping: bool = False


class HeartbeatPolicy:
    """The heartbeat of one session, started at ``now``: its first decision pings at once.

    Raises ``ValueError`` unless ``interval`` and ``timeout`` are positive and finite.
    """

    __slots__ = ("interval", "timeout", "rebind_after", "last_pong", "next_ping", "_rebound_for")

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        for name, value in (("interval", interval), ("timeout", timeout)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"heartbeat {name} must be positive and finite, got {value!r}")
        self.interval = interval
        self.timeout = timeout
        # One pong late, and at most half the timeout: time for the new socket to be answered.
        self.rebind_after = min(interval * 1.5, timeout / 2)
        self.last_pong = now
        """When the last pong came (the start counts as one): the silence runs from here."""
        self.next_ping = now
        # The silence (named by the last pong before it) a rebind was already spent on.
        self._rebound_for: float | None = None

    def on_pong(self, now: float) -> None:
        """The server answered: the silence, if any, is over."""
        self.last_pong = now

    def decide(self, now: float) -> Decision:
        """What to do at ``now``; counts the ping and the rebind it asks for as done."""
        # Deadlines, not durations: ``now - last_pong >= timeout`` can be false at the very
        # instant wake_at() named (float rounding), and the caller would wake there forever.
        last_pong = self.last_pong
        if now >= last_pong + self.timeout:
            return Decision(lost=True)
        rebind = now >= last_pong + self.rebind_after and self._rebound_for != last_pong
        if rebind:
            self._rebound_for = last_pong
        ping = now >= self.next_ping
        if ping:
            self.next_ping = now + self.interval
        return Decision(rebind=rebind, ping=ping)

    def wake_at(self) -> float:
        """When the next decision may be something: the next ping, the end of the timeout,
        or the rebind if this silence has not had its rebind yet."""
        last_pong = self.last_pong
        wake = min(self.next_ping, last_pong + self.timeout)
        if self._rebound_for != last_pong:
            wake = min(wake, last_pong + self.rebind_after)
        return wake
