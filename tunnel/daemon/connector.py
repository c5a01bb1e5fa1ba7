"""Reach a server by any of its addresses: resolve them all, race the handshakes (Happy
Eyeballs, RFC 8305 section 5), keep the first that completes.

The shape of the race
---------------------
:func:`race` is :meth:`trio.Nursery.start` over several candidates::

    async with trio.open_nursery() as nursery:
        won = await race(nursery, addresses, attempt, delay=attempt_delay())
        # won.value is what the winning attempt passed to task_status.started();
        # the winner goes on running inside `nursery`.

Each attempt is an ordinary trio "start" function: it connects, calls
``task_status.started(value)`` when it is worth keeping (handshake done, server verified),
then runs its session until it ends. Every attempt runs through ``nursery.start()``, so
until it calls ``started()`` it lives inside the race, under the race's cancel scope, and
cancelling the losers is cancelling that scope. The ``started()`` of the first winner moves its
task, with everything it opened (its own nursery of pumps, its sockets), into ``nursery``, the
way trio moves any started task; :func:`race` then cancels the rest, waits for their cleanup,
and returns. Nothing outlives the race except the winner, and the winner lives exactly as long
as the caller's nursery lets it: a session failure later surfaces in ``nursery`` like any
child's.

Why not return a connected object instead? A QUIC session is not an object that can be handed
over: its UDP pump and timer must run from the first packet on, so they belong to the attempt's
task, and trio's only way to keep a task running past the call that started it is
``nursery.start``.

A loser's ``started()`` (two handshakes completing in one scheduler batch) returns quietly and
the attempt is cancelled at its next checkpoint, as trio does for any start whose nursery is
cancelled. So the code between ``started()`` and the attempt's next ``await`` runs in losers
too: keep it free of side effects, and do what belongs to the winner (TUN device, routes, the
client's ``session`` attribute) in the caller, after :func:`race` returns. The same goes
for a step whose effect at the far end a later attempt's would undo: a server that replaces a
device's older session with its newer one must see only the winner authenticate, so call
``started()`` before that step and take it in the caller.

Timing: attempt ``i + 1`` starts ``delay`` after attempt ``i`` started, or at once when any
running attempt fails (a failure frees the slot it held, so no more attempts are in flight than
the delay alone would allow: the RFC's "one at a time"). Candidates never started when the race
is decided are not tried.

Failures: an attempt's failure is any ``Exception`` (the other addresses may well work); a
permanent one (``exit_code`` 100: a verified server rejected our credentials, and every address
is that same server) ends the race at once and is raised. When all fail, the most informative
failure is raised (an answer beats a bug beats silence; among equals, the latest), as itself,
never wrapped in an exception group.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import attrs
import trio

from tunnel.core.eyeballs import Address, order_addresses
from tunnel.errors import EXIT_PERMANENT, HandshakeTimeout, NameNotResolved, TunnelError

__all__ = ["Winner", "race", "resolve_all"]

log = logging.getLogger("tunnel.connector")

C = TypeVar("C")
T = TypeVar("T")


async def resolve_all(
    host: str, port: int, *, key: str, prefer: Address | None = None
) -> list[Address]:
    """Every ``(family, sockaddr)`` of host:port in the order to try them (see
    :func:`tunnel.core.eyeballs.order_addresses`; ``prefer`` is last race's winner, if any).
    An IP literal gives itself. Raises :class:`NameNotResolved` naming the config ``key``."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise NameNotResolved(f"{key}: cannot resolve {host!r}: {exc.strerror}") from exc
    found = [
        (family, sockaddr)
        for family, _, _, _, sockaddr in infos
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    if not found:
        raise NameNotResolved(f"{key}: cannot resolve {host!r}: no IPv4 or IPv6 address")
    return order_addresses(found, prefer=prefer)


@attrs.frozen
class Winner(Generic[C, T]):
    """The outcome of a won :func:`race`."""

    index: int
    """Position of the winning candidate in the list given to the race."""
    candidate: C
    value: T
    """What the winning attempt passed to ``task_status.started()``."""
    failures: tuple[tuple[C, Exception], ...]
    """Attempts that failed before the race was decided, in the order they failed."""


async def race(
    nursery: trio.Nursery,
    candidates: Iterable[C],
    attempt: Callable[..., Awaitable[object]],
    *,
    delay: float,
) -> Winner[C, Any]:
    """Race ``attempt(candidate, task_status=...)`` over ``candidates`` (Happy Eyeballs);
    return the first to call ``task_status.started()``, left running inside ``nursery``.

    ``attempt`` has trio's start-function shape with the candidate as its one positional
    argument: ``async def attempt(candidate, *, task_status=trio.TASK_STATUS_IGNORED)``.

    The next candidate starts ``delay`` seconds after the previous one, or as soon as a
    running attempt fails. The others are cancelled once there is a winner, and have finished
    their cleanup when this returns. A permanent failure (``exit_code`` 100) ends the race at
    once and is raised; when every attempt fails, the most informative failure is raised.
    See the module docstring for why the race has this shape.
    """
    listed = list(candidates)
    if not listed:
        raise ValueError("race needs at least one candidate")
    if not delay >= 0:  # also rejects NaN
        raise ValueError(f"delay must be >= 0, got {delay}")
    state: _Race[C, Any] = _Race(nursery, attempt)
    async with trio.open_nursery() as racers:
        state.scope = racers.cancel_scope
        for index, candidate in enumerate(listed):
            state.progress = trio.Event()
            racers.start_soon(state.run, index, candidate, name=f"race start {index}")
            if index + 1 < len(listed):
                with trio.move_on_after(delay):
                    await state.progress.wait()
    if state.winner is not None:
        return state.winner
    raise state.verdict()


class _Race(Generic[C, T]):
    """The shared state of one :func:`race`."""

    def __init__(self, target: trio.Nursery, attempt: Callable[..., Awaitable[object]]) -> None:
        self.target = target
        self.attempt = attempt
        self.scope = trio.CancelScope()  # the racers' nursery scope, set once it is open
        self.progress = trio.Event()  # set by a failure: start the next attempt now
        self.decided = False
        self.winner: Winner[C, T] | None = None
        self.fatal: Exception | None = None
        self.failures: list[tuple[int, C, Exception]] = []

    async def run(self, index: int, candidate: C) -> None:
        try:
            await self.target.start(
                self._attempt_task, index, candidate, name=f"race attempt {index}: {candidate}"
            )
        except Exception as exc:
            self._failed(index, candidate, _lone(exc))

    async def _attempt_task(
        self, index: int, candidate: C, *, task_status: trio.TaskStatus[Any]
    ) -> None:
        gate = _Gate(self, index, candidate, task_status, trio.lowlevel.current_task())
        await self.attempt(candidate, task_status=gate)

    def _failed(self, index: int, candidate: C, failure: Exception) -> None:
        log.debug("attempt %d (%s) failed: %s", index, candidate, failure)
        self.failures.append((index, candidate, failure))
        if self.decided:
            return  # a loser's cleanup went wrong: no longer ours to report
        if _is_permanent(failure):
            self.decided = True
            self.fatal = failure
            self.scope.cancel()
            return
        self.progress.set()

    def won(self, index: int, candidate: C, value: T) -> None:
        self.decided = True
        self.winner = Winner(
            index, candidate, value, tuple((c, exc) for _, c, exc in self.failures)
        )
        self.scope.cancel()

    def verdict(self) -> Exception:
        """The failure to raise for a lost race."""
        if self.fatal is not None:
            return self.fatal
        # max() keeps the first of equals: scan from the latest failure back.
        return max((exc for _, _, exc in reversed(self.failures)), key=_informativeness)


class _Gate(trio.TaskStatus[Any]):
    """The ``task_status`` an attempt sees: only the race's first ``started()`` goes through
    to trio's, which moves the attempt into the caller's nursery."""

    def __init__(
        self,
        race: _Race[Any, Any],
        index: int,
        candidate: Any,
        status: trio.TaskStatus[Any],
        task: trio.lowlevel.Task,
    ) -> None:
        self._race = race
        self._index = index
        self._candidate = candidate
        self._status = status
        self._task = task
        self._used = False

    def started(self, value: Any = None) -> None:
        if self._used:
            raise RuntimeError("called 'started' twice on the same task status")
        self._used = True
        if self._race.decided:
            return  # lost by a hair: cancelled at the next checkpoint
        self._status.started(value)
        if self._task.parent_nursery is not self._race.target:
            return  # trio did not move us: the whole race is being cancelled
        self._race.won(self._index, self._candidate, value)


def _lone(exc: Exception) -> Exception:
    """The one exception inside nested single-member groups, else ``exc`` itself."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_permanent(inner) for inner in exc.exceptions)
    return getattr(exc, "exit_code", None) == EXIT_PERMANENT


def _informativeness(exc: Exception) -> int:
    """Higher says more about why we could not connect: a permanent error, then an answer
    (a rejection, an identity mismatch, a closed connection), then a bug, then silence."""
    if _is_permanent(exc):
        return 3
    if isinstance(exc, HandshakeTimeout | trio.TooSlowError):
        return 0
    if isinstance(exc, TunnelError):
        return 2
    return 1
