"""Tests for tunnel.core.admission: what a datagram of no known connection may cost us."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tunnel.core.admission import (
    SMALLEST_INITIAL,
    SMALLEST_RESET_TRIGGER,
    Backlog,
    HandshakeGate,
    PacketKind,
    UnknownDatagram,
    Verdict,
    WorkBudget,
)

V1 = 0x00000001
UNSUPPORTED = 0x1A2A3A4A


def gate(**limits: int) -> HandshakeGate:
    return HandshakeGate(supported_versions={V1}, **limits)


def initial(size: int = SMALLEST_INITIAL, *, token: bool = False) -> UnknownDatagram:
    return UnknownDatagram(PacketKind.INITIAL, V1, size, token)


def short(size: int = 100) -> UnknownDatagram:
    return UnknownDatagram(PacketKind.ONE_RTT, None, size, False)


def test_a_full_sized_initial_starts_a_handshake():
    decision = gate().decide(initial(), "192.0.2.1", 0.0)
    assert decision.verdict is Verdict.ACCEPT and decision.drop is None


def test_an_initial_smaller_than_a_client_may_send_is_dropped():
    decision = gate().decide(initial(SMALLEST_INITIAL - 1), "192.0.2.1", 0.0)
    assert (decision.verdict, decision.drop) == (Verdict.DROP, "udp_unknown_connection")


@pytest.mark.parametrize("kind", [PacketKind.OTHER, PacketKind.VERSION_NEGOTIATION])
def test_long_headers_that_cannot_start_a_connection_are_dropped(kind):
    decision = gate().decide(UnknownDatagram(kind, V1, 1500, False), "192.0.2.1", 0.0)
    assert (decision.verdict, decision.drop) == (Verdict.DROP, "udp_unknown_connection")


def test_an_unknown_short_header_gets_a_stateless_reset_within_the_budget():
    admission = gate(resets_per_second=3)
    verdicts = [admission.decide(short(), "192.0.2.1", 0.0).verdict for _ in range(5)]
    assert verdicts == [Verdict.RESET] * 3 + [Verdict.DROP] * 2
    # The budget comes back with time: one a third of a second.
    assert admission.decide(short(), "192.0.2.1", 0.34).verdict is Verdict.RESET
    # Counted as unknown either way.
    assert admission.decide(short(), "192.0.2.1", 0.34).drop == "udp_unknown_connection"


def test_a_packet_too_small_to_answer_without_a_reset_loop_gets_no_reset():
    admission = gate()
    assert admission.decide(short(SMALLEST_RESET_TRIGGER - 1), "h", 0.0).verdict is Verdict.DROP
    assert admission.decide(short(SMALLEST_RESET_TRIGGER), "h", 0.0).verdict is Verdict.RESET


def test_an_unsupported_version_gets_version_negotiation_only_when_large_enough():
    admission = gate(negotiations_per_second=2)

    def unsupported(size: int) -> UnknownDatagram:
        return UnknownDatagram(PacketKind.INITIAL, UNSUPPORTED, size, False)

    small = admission.decide(unsupported(SMALLEST_INITIAL - 1), "h", 0.0)
    assert (small.verdict, small.drop) == (Verdict.DROP, None)  # never answer with more
    verdicts = [admission.decide(unsupported(1200), "h", 0.0).verdict for _ in range(3)]
    assert verdicts == [Verdict.NEGOTIATE, Verdict.NEGOTIATE, Verdict.DROP]


def test_a_version_negotiation_packet_is_never_answered():
    vn = UnknownDatagram(PacketKind.VERSION_NEGOTIATION, 0, 1500, False)
    assert gate().decide(vn, "h", 0.0).verdict is Verdict.DROP


def test_handshakes_in_flight_are_bounded_per_source_and_overall():
    admission = gate(max_pending=3, max_pending_per_source=2, retry_above=100)
    for source in ("a", "a"):
        assert admission.decide(initial(), source, 0.0).verdict is Verdict.ACCEPT
        admission.started(source)
    limited = admission.decide(initial(), "a", 0.0)
    assert (limited.verdict, limited.drop) == (Verdict.DROP, "handshake_limit")
    assert admission.decide(initial(), "b", 0.0).verdict is Verdict.ACCEPT
    admission.started("b")
    assert admission.decide(initial(), "c", 0.0).drop == "handshake_limit"  # all 3 taken
    admission.finished("a")
    assert admission.decide(initial(), "c", 0.0).verdict is Verdict.ACCEPT
    assert admission.pending_total == 2 and dict(admission.pending_by_source) == {"a": 1, "b": 1}


def test_past_the_retry_threshold_new_clients_prove_their_address_first():
    admission = gate(retry_above=1)
    admission.started("a")
    assert admission.decide(initial(), "b", 0.0).verdict is Verdict.RETRY
    answered = admission.decide(initial(token=True), "b", 0.0)
    assert answered.verdict is Verdict.ACCEPT_IF_TOKEN_VALID
    # A token never gets past the limits, valid or not.
    full = gate(max_pending=1)
    full.started("a")
    assert full.decide(initial(token=True), "b", 0.0).verdict is Verdict.DROP


def test_finishing_a_handshake_that_never_started_is_a_bug_not_a_negative_count():
    admission = gate()
    with pytest.raises(ValueError, match="no handshake from a is pending"):
        admission.finished("a")
    assert admission.pending_total == 0 and not admission.pending_by_source


# As a header parser reports them: a short header (1-RTT) has no version, a long one has.
long_headers = st.builds(
    UnknownDatagram,
    kind=st.sampled_from([PacketKind.INITIAL, PacketKind.VERSION_NEGOTIATION, PacketKind.OTHER]),
    version=st.sampled_from([0, V1, UNSUPPORTED]),
    size=st.integers(0, 1500),
    has_token=st.booleans(),
)
short_headers = st.builds(
    UnknownDatagram,
    kind=st.just(PacketKind.ONE_RTT),
    version=st.none(),
    size=st.integers(0, 1500),
    has_token=st.just(False),
)
datagrams = st.one_of(long_headers, short_headers)
sources = st.sampled_from(["a", "b", "c", "d"])


class GateUnderFlood(RuleBasedStateMachine):
    """Any mix of datagrams, handshakes started and ended, and time: the counts stay exact and
    within their limits, and answers never exceed their budgets."""

    MAX_PENDING, PER_SOURCE, RETRY_ABOVE, RESETS = 5, 2, 3, 4

    def __init__(self) -> None:
        super().__init__()
        self.gate = gate(
            max_pending=self.MAX_PENDING,
            max_pending_per_source=self.PER_SOURCE,
            retry_above=self.RETRY_ABOVE,
            resets_per_second=self.RESETS,
            negotiations_per_second=self.RESETS,
        )
        self.now = 0.0
        self.live: list[str] = []  # sources of the handshakes the shell has running
        self.resets_now = 0  # resets since the clock last moved

    @rule(datagram=datagrams, source=sources)
    def arrives(self, datagram, source):
        decision = self.gate.decide(datagram, source, self.now)
        verdict = decision.verdict
        if verdict in (Verdict.ACCEPT, Verdict.ACCEPT_IF_TOKEN_VALID):
            assert datagram.kind is PacketKind.INITIAL and datagram.size >= SMALLEST_INITIAL
            assert (verdict is Verdict.ACCEPT_IF_TOKEN_VALID) == datagram.has_token
            assert self.gate.pending_total < self.MAX_PENDING
            assert self.gate.pending_by_source[source] < self.PER_SOURCE
            self.gate.started(source)
            self.live.append(source)
        elif verdict is Verdict.RETRY:
            assert not datagram.has_token and self.gate.pending_total >= self.RETRY_ABOVE
        elif verdict is Verdict.RESET:
            assert datagram.kind is PacketKind.ONE_RTT and datagram.version is None
            self.resets_now += 1
            assert self.resets_now <= self.RESETS
        elif verdict is Verdict.NEGOTIATE:
            assert datagram.version not in (V1, None) and datagram.size >= SMALLEST_INITIAL

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100))
    def handshake_ends(self, index):
        self.gate.finished(self.live.pop(index % len(self.live)))

    @rule(seconds=st.floats(0.01, 2.0))
    def time_passes(self, seconds):
        self.now += seconds
        self.resets_now = 0  # a rough bound below: the burst, not the refill, is checked

    @invariant()
    def counts_are_exact(self):
        assert self.gate.pending_total == len(self.live) <= self.MAX_PENDING
        expected = {s: self.live.count(s) for s in set(self.live)}
        assert dict(self.gate.pending_by_source) == expected
        assert all(n <= self.PER_SOURCE for n in expected.values())


TestGateUnderFlood = GateUnderFlood.TestCase
TestGateUnderFlood.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


@given(datagram=datagrams, source=sources, now=st.floats(0, 1e6))
def test_decide_alone_never_changes_the_counts(datagram, source, now):
    admission = gate()
    admission.decide(datagram, source, now)
    assert admission.pending_total == 0 and not admission.pending_by_source


# -- the work budget and the backlog: how a storm of newcomers waits its turn ------------------


def test_the_budget_allows_a_burst_then_its_share_of_each_second():
    budget = WorkBudget(share=0.5, burst=0.1)
    starts = 0
    while budget.available(0.0):
        budget.spent(0.0, 0.03)
        starts += 1
    assert starts == 4  # 0.1 s of burst, the last start taking it below zero
    assert budget.ready_at(0.0) == pytest.approx(0.02 / 0.5, abs=1e-5)
    assert not budget.available(0.03)
    assert budget.available(0.05)
    # Idle time refills it, never past the burst.
    assert budget.ready_at(100.0) == 100.0
    budget.spent(100.0, 0.2)
    assert budget.ready_at(100.0) == pytest.approx(100.0 + 0.1 / 0.5, abs=1e-5)


def test_a_budget_rejects_nonsense():
    for share, burst in ((0, 1), (1.5, 1), (0.5, 0)):
        with pytest.raises(ValueError):
            WorkBudget(share=share, burst=burst)


def test_the_backlog_serves_first_come_first_and_queues_a_retransmission_once():
    backlog: Backlog[str] = Backlog(max_age=5.0)
    assert backlog.push(b"a", "first", 0.0)
    assert backlog.push(b"b", "second", 1.0)
    assert not backlog.push(b"a", "again", 2.0)  # the same connection ID keeps its place
    assert len(backlog) == 2 and b"a" in backlog
    assert backlog.pop() == "first"
    assert backlog.pop() == "second"
    assert backlog.pop() is None


def test_the_backlog_drops_what_waited_too_long_oldest_first():
    backlog: Backlog[str] = Backlog(max_age=5.0)
    backlog.push(b"a", "old", 0.0)
    backlog.push(b"b", "newer", 3.0)
    assert backlog.expire(5.0) == []
    assert backlog.expire(5.5) == ["old"]
    assert len(backlog) == 1 and b"a" not in backlog


@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.floats(0, 2)),
        max_size=40,
    )
)
def test_the_backlog_holds_each_key_once_in_arrival_order(arrivals):
    backlog: Backlog[bytes] = Backlog(max_age=3.0)
    now, expected, out = 0.0, [], []
    for key, step in arrivals:
        now += step
        for item in backlog.expire(now):
            out.append(item)
        if backlog.push(key, key, now):
            expected.append(key)
    while (item := backlog.pop()) is not None:
        out.append(item)
    assert out == expected  # everything leaves exactly once, first in first out
