"""The Happy Eyeballs racer and resolve_all, on trio's virtual clock."""

from __future__ import annotations

import math
import socket

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.daemon.connector import Winner, race, resolve_all
from tunnel.daemon.runtime import lone_errors_unwrapped
from tunnel.errors import (
    HandshakeTimeout,
    IdentityMismatch,
    NameNotResolved,
    PeerRejected,
    SessionLost,
    TemporaryRejection,
)

DELAY = 0.25


@attrs.frozen
class Win:
    after: float
    value: object = "session"


@attrs.frozen
class Fail:
    after: float
    error: Exception


@attrs.frozen
class Silent:
    """Never answers (and has no timeout of its own)."""


@attrs.define
class Trace:
    """What the scripted attempts did, with virtual times."""

    starts: dict[int, float] = attrs.field(factory=dict)
    failed: dict[int, float] = attrs.field(factory=dict)
    won: dict[int, float] = attrs.field(factory=dict)
    cancelled: set[int] = attrs.field(factory=set)
    cleaned: dict[int, float] = attrs.field(factory=dict)
    returned: float | None = None  # when race() returned or raised

    def alive(self):
        return set(self.starts) - set(self.cleaned)


def scripted(outcomes, trace):
    """An attempt per candidate index: wait, then win (and run until cancelled) or fail."""

    async def attempt(index, *, task_status=trio.TASK_STATUS_IGNORED):
        trace.starts[index] = trio.current_time()
        outcome = outcomes[index]
        try:
            if isinstance(outcome, Silent):
                await trio.sleep_forever()
            await trio.sleep(outcome.after)
            if isinstance(outcome, Fail):
                trace.failed[index] = trio.current_time()
                raise outcome.error
            task_status.started((index, outcome.value))
            trace.won[index] = trio.current_time()
            await trio.sleep_forever()  # the session
        except trio.Cancelled:
            trace.cancelled.add(index)
            raise
        finally:
            trace.cleaned[index] = trio.current_time()

    return attempt


async def run_race(outcomes, *, delay=DELAY):
    """Race the scripted outcomes; returns (winner or failure, trace, children left running
    in the caller's nursery when race returned). The winner is cancelled afterwards."""
    trace = Trace()
    async with trio.open_nursery() as nursery:
        try:
            result = await race(
                nursery, range(len(outcomes)), scripted(outcomes, trace), delay=delay
            )
        except Exception as exc:
            result = exc
        trace.returned = trio.current_time()
        children = set(nursery.child_tasks)
        alive = trace.alive()
        nursery.cancel_scope.cancel()
    return result, trace, children, alive


async def test_a_silent_first_address_loses_to_the_second_after_the_delay(autojump_clock):
    won, trace, children, alive = await run_race([Silent(), Win(0.01)])
    assert isinstance(won, Winner)
    assert (won.index, won.candidate, won.value) == (1, 1, (1, "session"))
    assert trace.starts == {0: 0.0, 1: DELAY}
    assert trace.won[1] == pytest.approx(DELAY + 0.01)
    # The silent one was cancelled and had cleaned up before race returned.
    assert 0 in trace.cancelled and alive == {1} and len(children) == 1
    assert won.failures == ()


async def test_a_fast_failure_starts_the_next_attempt_at_once(autojump_clock):
    refused = SessionLost("connection closed: refused")
    won, trace, _, _ = await run_race([Fail(0.05, refused), Win(0.01)])
    assert trace.starts == {0: 0.0, 1: 0.05}
    assert won.index == 1
    assert won.failures == ((0, refused),)


async def test_any_failure_frees_a_slot_for_the_next_attempt(autojump_clock):
    # 0 still silent when 1 fails at 0.3: 2 starts then, not at 0.5.
    outcomes = [Silent(), Fail(0.05, SessionLost("closed")), Win(0.01)]
    won, trace, _, _ = await run_race(outcomes)
    assert trace.starts == {0: 0.0, 1: 0.25, 2: pytest.approx(0.3)}
    assert won.index == 2


async def test_the_first_address_wins_without_starting_the_others(autojump_clock):
    won, trace, _, _ = await run_race([Win(0.1), Win(0.01), Win(0.01)])
    assert won.index == 0 and set(trace.starts) == {0}


async def test_the_winner_keeps_running_in_the_callers_nursery(autojump_clock):
    trace = Trace()
    outcomes = [Silent(), Win(0.01), Silent()]
    async with trio.open_nursery() as nursery:
        won = await race(nursery, range(3), scripted(outcomes, trace), delay=DELAY)
        assert set(trace.cleaned) == {0} and 0 in trace.cancelled  # 2 was never started
        await trio.sleep(3600)
        assert trace.alive() == {1}
        assert [t.name for t in nursery.child_tasks] == ["race attempt 1: 1"]
        nursery.cancel_scope.cancel()
    assert won.index == 1 and trace.cancelled == {0, 1}


async def test_the_winners_own_tasks_move_with_it(autojump_clock):
    # The client's shape: pumps in the attempt's nursery from the first packet on, started()
    # from inside it, then the session runs on.
    pumping = {}

    async def pump(index):
        pumping[index] = True
        try:
            await trio.sleep_forever()
        finally:
            pumping[index] = False

    async def attempt(index, *, task_status):
        async with trio.open_nursery() as pumps:
            pumps.start_soon(pump, index)
            await trio.sleep(1.0 if index == 0 else 0.1)
            task_status.started(index)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        won = await race(nursery, [0, 1], attempt, delay=DELAY)
        await trio.sleep(10)
        assert won.index == 1 and pumping == {0: False, 1: True}
        nursery.cancel_scope.cancel()
    assert pumping == {0: False, 1: False}


async def test_race_returns_once_the_losers_have_cleaned_up(autojump_clock):
    cleaned = []

    async def attempt(index, *, task_status):
        try:
            if index == 1:
                task_status.started("ok")
            await trio.sleep_forever()
        finally:
            if index == 0:
                with trio.move_on_after(1, shield=True):
                    await trio.sleep(0.5)  # say, a bounded goodbye to the server
            cleaned.append((index, trio.current_time()))

    async with trio.open_nursery() as nursery:
        await race(nursery, [0, 1], attempt, delay=DELAY)
        assert cleaned == [(0, DELAY + 0.5)] and trio.current_time() == DELAY + 0.5
        nursery.cancel_scope.cancel()


async def test_a_session_failure_after_the_win_surfaces_in_the_callers_nursery(autojump_clock):
    async def attempt(index, *, task_status):
        task_status.started(index)
        await trio.sleep(5)
        raise SessionLost("no heartbeat answer for 5 s")

    with pytest.raises(SessionLost), lone_errors_unwrapped():
        async with trio.open_nursery() as nursery:
            await race(nursery, [0], attempt, delay=DELAY)
            await trio.sleep_forever()


async def test_all_timing_out_raises_the_last_timeout(autojump_clock):
    timeouts = [HandshakeTimeout(f"no answer from {i}") for i in range(3)]
    failure, trace, _, _ = await run_race([Fail(10, e) for e in timeouts])
    assert failure is timeouts[2]
    assert trace.starts == {0: 0.0, 1: 0.25, 2: 0.5}


async def test_an_answer_beats_silence_whatever_the_order(autojump_clock):
    full = TemporaryRejection("server refused us for now: full")
    mismatch = IdentityMismatch("server identity mismatch")
    outcomes = [Fail(10, HandshakeTimeout("a")), Fail(0.1, full), Fail(10, trio.TooSlowError())]
    failure, _, _, _ = await run_race(outcomes)
    assert failure is full
    failure, _, _, _ = await run_race([Fail(0.1, full), Fail(0.2, mismatch), Fail(9, full)])
    assert failure is full  # equals: the latest to fail


async def test_a_bug_beats_silence_but_not_an_answer(autojump_clock):
    bug = KeyError("oops")
    failure, _, _, _ = await run_race([Fail(0.1, bug), Fail(1, HandshakeTimeout("t"))])
    assert failure is bug
    answer = SessionLost("connection closed: code 0x1")
    failure, _, _, _ = await run_race([Fail(1, answer), Fail(0.1, bug)])
    assert failure is answer


async def test_a_permanent_failure_ends_the_race_at_once(autojump_clock):
    rejected = PeerRejected("rejected by server: unknown token")
    outcomes = [Silent(), Fail(0.3, rejected), Win(1.0), Win(0.0)]
    failure, trace, children, alive = await run_race(outcomes)
    assert failure is rejected
    assert trace.starts == {0: 0.0, 1: 0.25, 2: 0.5}  # 3 never started
    assert trace.cleaned == {0: 0.55, 1: 0.55, 2: 0.55}
    assert trace.cancelled == {0, 2} and not trace.won
    assert children == set() and alive == set()


async def test_a_lone_failure_in_a_group_comes_out_as_itself(autojump_clock):
    full = TemporaryRejection("server refused us for now: full")

    async def attempt(index, *, task_status):
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep_forever)
            raise full

    async with trio.open_nursery() as nursery:
        with pytest.raises(TemporaryRejection) as caught:
            await race(nursery, [0, 1], attempt, delay=DELAY)
    assert caught.value is full


async def test_a_permanent_failure_inside_a_group_still_ends_the_race(autojump_clock):
    rejected = PeerRejected("rejected by server: revoked")

    async def attempt(index, *, task_status):
        if index == 0:
            with lone_errors_unwrapped():
                async with trio.open_nursery():
                    raise ExceptionGroup("session", [ExceptionGroup("inner", [rejected])])
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        with pytest.raises(PeerRejected) as caught:
            await race(nursery, [0, 1], attempt, delay=DELAY)
    assert caught.value is rejected


async def test_an_attempt_that_returns_without_starting_is_a_failure(autojump_clock):
    async def attempt(index, *, task_status):
        if index == 1:
            task_status.started("ok")
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        won = await race(nursery, [0, 1], attempt, delay=DELAY)
        nursery.cancel_scope.cancel()
    assert won.value == "ok"
    ((candidate, error),) = won.failures
    assert candidate == 0 and isinstance(error, RuntimeError)


async def test_two_handshakes_finishing_together_make_one_winner(autojump_clock):
    # 0 finishes at 0.5, 1 (started at 0.25) too: same scheduler batch.
    won, trace, children, alive = await run_race([Win(0.5), Win(0.25)])
    assert len(children) == 1 and alive == {won.index}
    loser = 1 - won.index
    assert loser in trace.cancelled and trace.cleaned[loser] == 0.5


def gated(gate, passed):
    """Attempts that all finish their handshake when ``gate`` is set: woken in one batch, not
    by cancellation, so each reaches its ``started()``."""

    async def attempt(index, *, task_status):
        await gate.wait()
        task_status.started(index)
        passed.append(index)
        await trio.sleep_forever()

    return attempt


async def test_a_loser_by_a_hair_is_cancelled_at_its_next_checkpoint(autojump_clock):
    gate, passed = trio.Event(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 1)  # keeps the nursery open; not part of the race
        racing = trio.CancelScope()

        async def open_gate():
            await trio.sleep(0.5)
            gate.set()

        nursery.start_soon(open_gate)
        with racing:
            won = await race(nursery, [0, 1], gated(gate, passed), delay=DELAY)
        assert sorted(passed) == [0, 1]  # both got past started()...
        attempts = [t for t in nursery.child_tasks if t.name.startswith("race")]
        assert [t.name for t in attempts] == [f"race attempt {won.index}: {won.index}"]
        nursery.cancel_scope.cancel()


async def test_a_win_in_the_batch_that_cancels_the_race_does_not_count(autojump_clock):
    gate, passed = trio.Event(), []
    async with trio.open_nursery() as nursery:
        racing = trio.CancelScope()

        async def open_gate_and_cancel():
            await trio.sleep(0.1)
            gate.set()
            racing.cancel()

        nursery.start_soon(open_gate_and_cancel)
        with racing:
            await race(nursery, [0, 1], gated(gate, passed), delay=0.0)
            pytest.fail("race returned")
        assert racing.cancelled_caught and sorted(passed) == [0, 1]
        assert not [t for t in nursery.child_tasks if t.name.startswith("race")]


async def test_cancelling_the_race_cancels_every_attempt(autojump_clock):
    trace = Trace()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.6) as scope:
            await race(nursery, range(4), scripted([Silent()] * 4, trace), delay=DELAY)
        assert not nursery.child_tasks
    assert scope.cancelled_caught
    assert trace.cancelled == {0, 1, 2} and set(trace.cleaned) == {0, 1, 2}


async def test_calling_started_twice_is_an_error(autojump_clock):
    async def attempt(index, *, task_status):
        task_status.started(1)
        task_status.started(2)

    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="twice")):
        async with trio.open_nursery() as nursery:
            await race(nursery, [0], attempt, delay=DELAY)
            await trio.sleep_forever()


async def test_bad_arguments_are_refused():
    async with trio.open_nursery() as nursery:
        with pytest.raises(ValueError, match="candidate"):
            await race(nursery, [], scripted([], Trace()), delay=DELAY)
        for delay in (-1.0, math.nan):
            with pytest.raises(ValueError, match="delay"):
                await race(nursery, [0], scripted([Win(0)], Trace()), delay=delay)


# --- random scripts --------------------------------------------------------------------------

TIMES = st.integers(0, 12).map(lambda n: n * 0.05)  # coarse: ties happen, on purpose
OUTCOMES = st.one_of(
    st.builds(Win, TIMES),
    st.builds(Fail, TIMES, st.just(SessionLost("closed"))),
    st.builds(Fail, TIMES, st.just(TemporaryRejection("full"))),
    st.builds(Fail, TIMES.map(lambda t: t + 1.0), st.just(HandshakeTimeout("silent"))),
    st.builds(Fail, TIMES, st.just(PeerRejected("rejected"))),
    st.builds(Fail, TIMES, st.just(ValueError("bug"))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    outcomes=st.lists(OUTCOMES, min_size=1, max_size=6),
    delay=st.sampled_from([0.0, 0.1, 0.25, 1.0, math.inf]),
)
def test_random_races_have_one_winner_or_one_failure_and_leave_nothing_behind(outcomes, delay):
    async def scenario():
        return await run_race(outcomes, delay=delay)

    result, trace, children, alive = trio.run(
        scenario, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    started = sorted(trace.starts)
    assert started == list(range(len(started)))  # in order, none skipped
    assert trace.starts[0] == 0.0
    for i in started[1:]:
        gap = trace.starts[i] - trace.starts[i - 1]
        assert gap <= delay + 1e-9
        if gap < delay - 1e-9:
            assert trace.starts[i] in trace.failed.values()  # early only after a failure
    assert not isinstance(result, BaseExceptionGroup)
    if isinstance(result, Winner):
        # Exactly one task lives on, the winner's; every other attempt has finished.
        assert alive == {result.index} and len(children) == 1
        assert isinstance(outcomes[result.index], Win)
        assert result.value == (result.index, "session")
        won_at = trace.won[result.index]
        assert won_at == pytest.approx(trace.starts[result.index] + outcomes[result.index].after)
        for i in started:
            if i != result.index and i not in trace.failed:
                assert i in trace.cancelled
        # Nothing permanent came before the win; nobody won earlier.
        assert all(
            t >= won_at
            for i, t in trace.failed.items()
            if isinstance(outcomes[i].error, PeerRejected)
        )
        assert all(t >= won_at for t in trace.won.values())
        assert trace.returned == won_at
    else:
        assert children == set() and alive == set()
        assert not trace.won
        if isinstance(result, PeerRejected):
            # The first permanent failure ended it: nothing started or ran on after that.
            ended = min(
                t for i, t in trace.failed.items() if isinstance(outcomes[i].error, PeerRejected)
            )
            assert trace.returned == ended
            assert max(trace.starts.values()) <= ended
            assert max(trace.cleaned.values()) == ended
        else:
            # Lost without a permanent failure: everything was tried and failed.
            assert set(trace.failed) == set(range(len(outcomes)))
            assert not any(isinstance(o.error, PeerRejected) for o in outcomes)
            kinds = {type(o.error) for o in outcomes}
            answers = kinds & {SessionLost, TemporaryRejection}
            if answers:
                assert type(result) in answers
            elif ValueError in kinds:
                assert isinstance(result, ValueError)
            else:
                assert isinstance(result, HandshakeTimeout)
            assert trace.returned == max(trace.failed.values())


# --- resolve_all -----------------------------------------------------------------------------


def fake_getaddrinfo(entries=None, error=None):
    calls = []

    async def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        calls.append((host, port, type))
        if error is not None:
            raise error
        return [(fam, socket.SOCK_DGRAM, 17, "", addr) for fam, addr in entries]

    return getaddrinfo, calls


V4A = (socket.AF_INET, ("192.0.2.1", 4433))
V4B = (socket.AF_INET, ("192.0.2.2", 4433))
V6A = (socket.AF_INET6, ("2001:db8::1", 4433, 0, 0))
V6B = (socket.AF_INET6, ("2001:db8::2", 4433, 0, 0))


async def test_resolve_all_orders_and_deduplicates(monkeypatch):
    fake, calls = fake_getaddrinfo([V4A, V4B, V4A, V6A, V6B, V6A])
    monkeypatch.setattr(trio.socket, "getaddrinfo", fake)
    assert await resolve_all("vpn.example", 4433, key="server") == [V6A, V4A, V6B, V4B]
    assert calls == [("vpn.example", 4433, socket.SOCK_DGRAM)]
    assert await resolve_all("vpn.example", 4433, key="server", prefer=V4B) == [
        V4B,
        V6A,
        V4A,
        V6B,
    ]


async def test_resolve_all_failure_names_the_key(monkeypatch):
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    fake, _ = fake_getaddrinfo(error=error)
    monkeypatch.setattr(trio.socket, "getaddrinfo", fake)
    with pytest.raises(NameNotResolved) as caught:
        await resolve_all("vpn.example", 4433, key="server")
    assert str(caught.value) == "server: cannot resolve 'vpn.example': Name or service not known"
    assert caught.value.__cause__ is error


async def test_resolve_all_without_an_ip_address_is_not_resolved(monkeypatch):
    fake, _ = fake_getaddrinfo([(socket.AF_UNIX, "/nowhere")])
    monkeypatch.setattr(trio.socket, "getaddrinfo", fake)
    with pytest.raises(NameNotResolved, match="^server: cannot resolve 'vpn.example': no IPv4"):
        await resolve_all("vpn.example", 4433, key="server")


async def test_resolve_all_gives_a_literal_itself():
    assert await resolve_all("192.0.2.7", 4433, key="server") == [
        (socket.AF_INET, ("192.0.2.7", 4433))
    ]
    ((family, sockaddr),) = await resolve_all("2001:db8::7", 4433, key="server")
    assert family == socket.AF_INET6 and sockaddr[:2] == ("2001:db8::7", 4433)
