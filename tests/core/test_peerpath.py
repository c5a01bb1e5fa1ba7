"""Tests for tunnel.core.peerpath: probing rounds, the switch to a direct path and back, in
virtual time."""

import math
import random
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tunnel.core.backoff import Backoff
from tunnel.core.peerpath import (
    CONNECT_TIMEOUT_S,
    DIRECT_TIMEOUT_S,
    KEEPALIVE_S,
    MAX_LEARNED,
    MIN_ROUND_INTERVAL_S,
    PING_INTERVAL_S,
    PINGS_PER_ROUND,
    PONG_WAIT_S,
    RETRY_BASE_S,
    RETRY_CAP_S,
    STABLE_S,
    Actions,
    PeerPath,
    State,
)

A = (IPv4Address("203.0.113.5"), 41000)  # as the server saw the peer
B = (IPv4Address("192.168.1.20"), 41000)  # the peer's LAN address
C = (IPv6Address("2001:db8::20"), 41000)
D = (IPv4Address("198.51.100.9"), 50000)  # where the peer's packets really come from
NOTHING = Actions()


def policy(initiator=True, jitter=0.0):
    backoff = Backoff(random.Random(1), base=RETRY_BASE_S, cap=RETRY_CAP_S, max_jitter=jitter)
    return PeerPath(initiator=initiator, backoff=backoff)


def run(path, now, until):
    """Poll at every wake-up from ``now`` to ``until``; returns [(time, actions)] of the polls
    that asked for something."""
    log = []
    for _ in range(10_000):
        actions = path.poll(now)
        if actions != NOTHING:
            log.append((now, actions))
        wake = path.wake_at()
        assert wake > now
        if wake > until:
            return log
        now = wake
    raise AssertionError("never settled")


def direct(initiator=True, at=0.0, address=A):
    """A policy that went direct on ``address`` at ``at``."""
    path = policy(initiator)
    path.introduced([address], at)
    path.poll(at)
    path.pong_received(address, at)
    path.poll(at)
    path.connected(address, at)
    assert path.poll(at).switch_to is State.DIRECT
    return path


# --- probing -----------------------------------------------------------------------------------


def test_a_round_pings_every_candidate_at_once_then_every_half_second():
    path = policy()
    assert path.wake_at() == math.inf  # nothing to do before an introduction
    path.introduced([A, B, C], 10.0)
    assert path.state is State.PROBING
    log = run(path, 10.0, until=14.9)
    times = [10.0 + k * PING_INTERVAL_S for k in range(PINGS_PER_ROUND)]
    assert log == [(t, Actions(ping=(A, B, C))) for t in times]
    assert times[-1] == 14.0  # 9 pings an address over 4 s


def test_a_round_without_pongs_fails_then_retries_with_backoff():
    path = policy()
    path.introduced([A], 0.0)
    run(path, 0.0, until=4.0)
    assert path.wake_at() == 4.0 + PONG_WAIT_S
    assert path.poll(5.0) == NOTHING  # the traffic never left the relay: no switch
    assert path.state is State.RELAY and path.retry_at == 7.0
    # Rounds at 7 (fails at 12), 16 (fails at 21), 29, ...: 2, 4, 8 s between them.
    starts = []
    now = 5.0
    while len(starts) < 7:
        now = path.wake_at()
        was = path.state
        path.poll(now)
        if was is State.RELAY:
            starts.append(now)
    gaps = [b - (a + 5.0) for a, b in zip([0.0, *starts], starts, strict=False)]
    assert gaps == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_jitter_stays_within_half_a_second():
    path = policy(jitter=0.5)
    path.introduced([A], 0.0)
    run(path, 0.0, until=5.0)
    assert 7.0 <= path.retry_at < 7.5


def test_a_pong_makes_the_initiator_connect_and_the_handshake_makes_it_direct():
    path = policy(initiator=True)
    path.introduced([A, B], 0.0)
    assert path.poll(0.0) == Actions(ping=(A, B))
    path.pong_received(B, 0.05)
    assert path.poll(0.05) == Actions(connect=B)
    assert path.state is State.PROBING and path.path is State.RELAY
    path.connected(B, 0.1)
    assert path.state is State.DIRECT and path.is_direct and path.endpoint == B
    assert path.poll(0.1) == Actions(switch_to=State.DIRECT)
    assert path.poll(0.2) == NOTHING  # no more pings once direct
    assert path.status(0.6) == {
        "path": "direct",
        "state": "direct",
        "endpoint": "192.168.1.20:41000",
        "since_heard": pytest.approx(0.5),
        "upgrades": 1,
        "fallbacks": 0,
    }


def test_the_responder_never_connects_and_waits_for_the_connection():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    path.poll(0.0)
    path.pong_received(A, 0.05)
    assert path.poll(0.05) == NOTHING
    path.connected(A, 0.2)
    assert path.poll(0.2) == Actions(switch_to=State.DIRECT)


def test_a_connection_before_the_pong_waits_for_the_pong():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    path.poll(0.0)
    path.connected(A, 0.1)  # the peer's pong came back first; ours is still on its way
    assert path.poll(0.1) == NOTHING and path.state is State.PROBING
    path.pong_received(A, 0.15)
    assert path.state is State.DIRECT
    assert path.poll(0.15) == Actions(switch_to=State.DIRECT)


def test_a_pong_and_a_connection_on_different_addresses_are_not_enough():
    path = policy(initiator=False)
    path.introduced([A, B], 0.0)
    path.poll(0.0)
    path.pong_received(A, 0.05)
    path.connected(D, 0.1)  # from an address the peer never reported: learnt, and pinged
    assert path.state is State.PROBING
    assert path.candidates == (A, B, D)
    assert path.poll(0.1) == Actions(ping=(D,))
    path.pong_received(D, 0.15)
    assert path.endpoint == D


def test_a_ping_from_the_peer_alone_never_makes_a_path_direct():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    for t in (0.0, 0.5, 1.0, 1.5):
        path.ping_received(A, t)
        path.poll(t)
    assert path.state is State.PROBING
    run(path, 1.5, until=5.0)
    assert path.state is State.RELAY


def test_a_late_pong_after_the_round_failed_is_ignored():
    path = policy()
    path.introduced([A], 0.0)
    run(path, 0.0, until=5.0)
    assert path.state is State.RELAY
    path.pong_received(A, 5.5)
    assert path.poll(5.5) == NOTHING and path.state is State.RELAY


def test_an_initiator_whose_handshake_never_completes_gives_up_and_closes():
    path = policy()
    path.introduced([A], 0.0)
    path.poll(0.0)
    path.pong_received(A, 3.5)
    assert path.poll(3.5).connect == A
    log = run(path, 3.5, until=3.5 + CONNECT_TIMEOUT_S)
    # Pinging ends at 4 s; the handshake had until 3.5 + 5 s.
    assert (3.5 + CONNECT_TIMEOUT_S, Actions(close=True)) in log
    assert path.state is State.RELAY


def test_a_failed_connection_attempt_moves_on_to_the_next_answered_address():
    path = policy()
    path.introduced([A, B], 0.0)
    path.poll(0.0)
    path.pong_received(A, 0.05)
    path.pong_received(B, 0.06)
    assert path.poll(0.06).connect == A
    path.direct_failed(0.3)
    assert path.poll(0.3).connect == B
    path.direct_failed(0.4)
    assert path.poll(0.4).connect is None  # A and B both failed in this round
    path.connected(A, 0.45)  # ... yet a connection completed after all: it is used
    assert path.poll(0.45).switch_to is State.DIRECT


def test_the_round_waits_for_the_handshake_after_a_pong():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    path.poll(0.0)
    path.pong_received(A, 4.2)
    run(path, 4.2, until=9.1)
    assert path.state is State.PROBING  # 4.2 + 5 s for the initiator's handshake
    path.poll(4.2 + CONNECT_TIMEOUT_S)
    assert path.state is State.RELAY


def test_at_most_one_ping_per_address_per_interval_even_when_candidates_change():
    path = policy()
    path.introduced([A, B], 0.0)
    assert path.poll(0.0).ping == (A, B)
    path.candidates_changed([B, C], 0.1)
    assert path.poll(0.1).ping == (C,)
    assert path.poll(0.5).ping == (B,)
    assert path.poll(0.6).ping == (C,)


def test_candidates_are_capped_and_deduplicated():
    path = policy()
    many = [(IPv4Address(0x0A000001 + n), 4000) for n in range(50)]
    path.introduced([*many[:3], many[0], *many[3:]], 0.0)
    assert path.candidates == tuple(many[:8])


def test_an_introduction_without_candidates_waits_for_some():
    path = policy()
    path.introduced([], 0.0)
    assert path.state is State.RELAY and path.wake_at() == math.inf
    assert path.poll(0.0) == NOTHING
    path.candidates_changed([A], 3.0)
    assert path.poll(3.0).ping == (A,)


# --- retries -----------------------------------------------------------------------------------


def test_new_candidates_retry_at_once_and_reset_the_backoff():
    path = policy()
    path.introduced([A], 0.0)
    now = 0.0
    path.poll(now)
    while not (path.state is State.RELAY and path.retry_at == now + 16.0):
        now = path.wake_at()  # four failed rounds: the next waits 16 s
        path.poll(now)
    failed_at = now
    path.candidates_changed([A, B], failed_at + 1.0)
    assert path.state is State.PROBING
    assert path.poll(failed_at + 1.0).ping == (A, B)
    run(path, failed_at + 1.0, until=failed_at + 6.0)
    assert path.retry_at == failed_at + 6.0 + RETRY_BASE_S


def test_a_ping_from_the_peer_starts_a_round_early_but_not_too_often():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    run(path, 0.0, until=5.0)
    assert path.retry_at == 7.0
    path.ping_received(A, 5.5)  # 5.5 s after the last round started
    assert path.state is State.PROBING
    run(path, 5.5, until=10.5)
    assert path.state is State.RELAY and path.retry_at == 14.5
    path.ping_received(A, 10.6)  # the last round started 5.1 s ago
    assert path.state is State.PROBING
    # Back on the relay soon after a round started (the direct path it found closed at once):
    # the peer's pings start the next round only 5 s after that one started.
    path = direct(initiator=False, at=20.0)
    path.direct_failed(21.0)
    path.poll(21.0)
    path.ping_received(A, 22.0)
    assert path.state is State.RELAY
    path.ping_received(A, 20.0 + MIN_ROUND_INTERVAL_S)
    assert path.state is State.PROBING


def test_a_replayed_ping_is_answered_with_at_most_one_round_per_interval():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    run(path, 0.0, until=5.0)
    starts = []
    now = 5.0
    while now < 60.0:
        was = path.state
        path.ping_received(A, now)
        if was is State.RELAY and path.state is State.PROBING:
            starts.append(now)
        path.poll(now)
        now += 0.25
    assert all(b - a >= MIN_ROUND_INTERVAL_S for a, b in zip(starts, starts[1:], strict=False))


def test_learnt_addresses_are_capped_and_not_replaced_during_a_round():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    path.poll(0.0)
    strangers = [(IPv4Address(0xC6336401 + n), 9000) for n in range(10)]
    for n, address in enumerate(strangers):
        path.ping_received(address, 0.01 * n)
    assert path.candidates == (A, *strangers[:MAX_LEARNED])
    run(path, 0.1, until=6.0)
    assert path.state is State.RELAY
    path.ping_received(strangers[-1], 6.0)  # outside a round the oldest learnt one goes
    assert path.candidates == (A, *strangers[1:MAX_LEARNED], strangers[-1])


def test_a_connection_from_the_peer_while_on_the_relay_starts_a_round():
    path = policy(initiator=False)
    path.introduced([A], 0.0)
    run(path, 0.0, until=5.0)
    path.connected(A, 5.2)  # the peer's own round found a path
    assert path.state is State.PROBING
    assert path.poll(5.2).ping == (A,)
    path.pong_received(A, 5.25)
    assert path.poll(5.25).switch_to is State.DIRECT


# --- on the direct path ------------------------------------------------------------------------


def test_sent_with_nothing_heard_falls_back_after_the_timeout():
    path = direct()
    path.sent(1.0)
    path.sent(2.0)
    assert path.wake_at() == 1.0 + DIRECT_TIMEOUT_S
    assert path.poll(5.9) == NOTHING
    assert path.poll(6.0) == Actions(close=True, switch_to=State.RELAY)
    assert path.state is State.RELAY and path.endpoint is None
    assert path.retry_at == 6.0 + RETRY_BASE_S
    assert path.status(7.0) == {
        "path": "relay",
        "state": "relay",
        "endpoint": None,
        "since_heard": 7.0,
        "upgrades": 1,
        "fallbacks": 1,
    }


def test_traffic_that_is_answered_keeps_the_path():
    path = direct()
    for k in range(1, 200):
        t = k * 0.3
        path.sent(t)
        path.heard(t + 0.02)  # the ACK
        assert path.poll(t + 0.02) == NOTHING
    assert path.is_direct


def test_receiving_alone_keeps_the_path_and_needs_no_keepalive():
    path = direct()
    for k in range(1, 100):
        path.heard(k * 1.0)
        assert path.poll(k * 1.0) == NOTHING
    assert path.is_direct


def test_an_idle_path_gets_keepalives_and_survives_if_they_are_answered():
    path = direct()
    assert path.wake_at() == KEEPALIVE_S
    assert path.poll(KEEPALIVE_S) == Actions(keepalive=True)
    path.heard(10.05)
    assert path.wake_at() == 10.05 + KEEPALIVE_S
    assert path.poll(20.05) == Actions(keepalive=True)
    # The next one goes unanswered: back to the relay 5 s later.
    assert path.wake_at() == 20.05 + DIRECT_TIMEOUT_S
    assert path.poll(25.05) == Actions(close=True, switch_to=State.RELAY)


def test_silence_on_an_idle_path_is_not_a_failure():
    path = direct()
    log = run(path, 0.0, until=9.99)
    assert log == [] and path.is_direct


def test_a_closed_connection_falls_back_at_once():
    path = direct()
    path.direct_failed(3.0)
    assert path.state is State.RELAY
    assert path.poll(3.0) == Actions(switch_to=State.RELAY)  # already closed: no close
    assert path.retry_at == 3.0 + RETRY_BASE_S


def test_coming_back_after_a_fallback_needs_a_new_round_trip():
    path = direct()
    path.direct_failed(3.0)
    path.poll(3.0)
    path.poll(5.0)  # the retry
    assert path.state is State.PROBING
    path.connected(A, 5.1)  # a new connection, but no pong in this round yet
    assert path.state is State.PROBING
    path.pong_received(A, 5.2)
    assert path.poll(5.2).switch_to is State.DIRECT


def test_a_flapping_path_backs_off_and_a_stable_one_resets_the_backoff():
    path = direct()
    now, waits = 0.0, []
    for _ in range(5):  # each direct spell dies after 1 s
        path.direct_failed(now + 1.0)
        path.poll(now + 1.0)
        waits.append(path.retry_at - (now + 1.0))
        now = path.retry_at
        path.poll(now)
        path.pong_received(A, now)
        path.poll(now)
        path.connected(A, now)
        assert path.poll(now).switch_to is State.DIRECT
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0]
    path.direct_failed(now + STABLE_S)  # this one held
    assert path.retry_at == now + STABLE_S + RETRY_BASE_S


def test_candidates_changing_while_direct_keep_the_path():
    path = direct()
    path.candidates_changed([B], 1.0)
    assert path.poll(1.0) == NOTHING and path.endpoint == A
    assert path.candidates == (B,)


def test_status_before_anything_was_heard():
    path = policy()
    assert path.status(5.0) == {
        "path": "relay",
        "state": "relay",
        "endpoint": None,
        "since_heard": None,
        "upgrades": 0,
        "fallbacks": 0,
    }
    path.introduced([C], 0.0)
    assert path.status(0.0)["state"] == "probing"
    assert path.status(0.0)["path"] == "relay"


def test_an_ipv6_endpoint_in_the_status():
    path = direct(address=C)
    assert path.status(0.0)["endpoint"] == "[2001:db8::20]:41000"


# --- properties --------------------------------------------------------------------------------

POOL = (A, B, C, D)
addresses = st.sampled_from(POOL)
candidate_lists = st.lists(addresses, max_size=4)


class PathMachine(RuleBasedStateMachine):
    """The daemon, as any order of events and time: the policy never goes direct without a
    round trip and a connection on the same address since it was last on the relay, never
    leaves a direct path on a timer before DIRECT_TIMEOUT, never pings an address twice within
    the interval, and always names a wake-up in the future."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.step = 0
        self.relay_mark = 0  # the step at which the policy was last seen on the relay
        self.pongs = {}  # address -> step of its last pong_received
        self.connections = {}  # address -> step of its last connected (until it failed)
        self.last_ping = {}
        self.direct_since = None
        self.failed_now = False  # the event of this step was direct_failed
        self.was_state = State.RELAY

    @initialize(initiator=st.booleans(), jitter=st.sampled_from([0.0, 0.5]))
    def start(self, initiator, jitter):
        self.path = policy(initiator, jitter)

    def after(self, event=None):
        """Poll, as the daemon does after every event, and check what it asks."""
        self.step += 1
        state_after_event = self.path.state
        actions = self.path.poll(self.now)
        for state in (state_after_event, self.path.state):
            self.observe(state)
        for address in actions.ping:
            assert self.path.state is State.PROBING
            last = self.last_ping.get(address)
            assert last is None or self.now >= last + PING_INTERVAL_S
            self.last_ping[address] = self.now
        if actions.connect is not None:
            assert self.path.initiator
            assert self.pongs.get(actions.connect, -1) > self.relay_mark
        if actions.keepalive:
            assert self.path.state is State.DIRECT
        if actions.close:
            self.connections.clear()
        if actions.switch_to is not None:
            assert actions.switch_to is self.path.path
        wake = self.path.wake_at()
        assert wake > self.now
        self.failed_now = False

    def observe(self, state):
        if state is State.RELAY:
            if self.was_state is State.DIRECT and not self.failed_now:
                # Left on a timer: only after the timeout (sent-then-silent) at the earliest.
                assert self.now >= self.direct_since + DIRECT_TIMEOUT_S
            self.relay_mark = self.step
        if state is State.DIRECT and self.was_state is not State.DIRECT:
            endpoint = self.path.endpoint
            assert self.pongs.get(endpoint, -1) > self.relay_mark
            assert self.connections.get(endpoint, -1) > self.relay_mark
            self.direct_since = self.now
        self.was_state = state

    @rule(candidates=candidate_lists)
    def introduced(self, candidates):
        self.path.introduced(candidates, self.now)
        self.after()

    @rule(candidates=candidate_lists)
    def candidates_changed(self, candidates):
        self.path.candidates_changed(candidates, self.now)
        self.after()

    @rule(address=addresses)
    def pong_anywhere(self, address):
        self.pongs[address] = self.step + 1
        self.path.pong_received(address, self.now)
        self.after()

    @precondition(lambda self: self.last_ping)
    @rule(data=st.data())
    def pong_to_a_ping(self, data):
        address = data.draw(st.sampled_from(sorted(self.last_ping, key=str)))
        self.pong_anywhere(address)

    @rule(address=addresses)
    def ping_received(self, address):
        self.path.ping_received(address, self.now)
        self.after()

    @precondition(lambda self: not self.connections)
    @rule(address=addresses)
    def connected(self, address):
        self.connections[address] = self.step + 1
        self.path.connected(address, self.now)
        self.after()

    @rule()
    def heard(self):
        self.path.heard(self.now)
        self.after()

    @rule()
    def sent(self):
        self.path.sent(self.now)
        self.after()

    @rule()
    def direct_failed(self):
        self.connections.clear()
        self.failed_now = True
        self.path.direct_failed(self.now)
        self.after()

    @rule(seconds=st.floats(0.0, 3.0))
    def time_passes(self, seconds):
        self.now += seconds
        self.after()

    @rule()
    def sleep_until_wake(self):
        wake = self.path.wake_at()
        if wake != math.inf:
            self.now = max(self.now, wake)
        self.after()

    @invariant()
    def consistent(self):
        if not hasattr(self, "path"):
            return
        status = self.path.status(self.now)
        assert status["path"] == self.path.path.value
        assert (self.path.endpoint is None) == (self.path.state is not State.DIRECT)
        assert len(self.path.candidates) <= 8 + MAX_LEARNED
        # Every move to a direct path is undone by exactly one fallback before the next.
        assert self.path.upgrades - self.path.fallbacks == int(self.path.is_direct)


TestPathMachine = PathMachine.TestCase
TestPathMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


one_way_events = st.lists(
    st.one_of(
        st.tuples(st.just("introduced"), candidate_lists),
        st.tuples(st.just("candidates_changed"), candidate_lists),
        st.tuples(st.just("ping_received"), addresses),
        st.tuples(st.just("connected"), addresses),
        st.tuples(st.just("heard"), st.none()),
        st.tuples(st.just("sent"), st.none()),
        st.tuples(st.just("direct_failed"), st.none()),
        st.tuples(st.just("wait"), st.floats(0.0, 20.0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(st.booleans(), one_way_events)
def test_a_one_way_path_never_switches(initiator, events):
    # Pings go out, the peer's pings and even connections come in, but no pong ever does.
    path = policy(initiator)
    now = 0.0
    for name, arg in events:
        if name == "wait":
            now += arg
        elif name in ("introduced", "candidates_changed", "ping_received", "connected"):
            getattr(path, name)(arg, now)
        else:
            getattr(path, name)(now)
        actions = path.poll(now)
        assert actions.switch_to is None and actions.connect is None
        assert path.state is not State.DIRECT


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30))
def test_a_round_trip_and_a_connection_always_end_on_the_direct_path(delays):
    # Whenever the round trip and the handshake happen, the path goes direct within the round.
    path = policy(initiator=True)
    path.introduced([A, B], 0.0)
    now = 0.0
    for delay in delays:  # failed rounds, at whatever times the daemon polls
        now += delay
        path.poll(now)
    if path.state is State.RELAY:
        now = path.retry_at
        path.poll(now)
    assert path.state is State.PROBING
    path.pong_received(B, now)
    assert path.poll(now).connect == B
    path.connected(B, now + 0.05)
    assert path.poll(now + 0.05).switch_to is State.DIRECT
