"""The server under many clients, in one process (fake network, fake TUN, virtual time):
new handshakes wait their turn in the work budget while established sessions stay answered,
and a client that comes back replaces its old session at once."""

from __future__ import annotations

import itertools

import trio
from test_inmemory_peers import client_config, running_client, running_server, wait_for

from tunnel.config import RunOptions
from tunnel.core.identity import Identity
from tunnel.daemon.client import Client
from tunnel.daemon.server.dispatcher import HANDSHAKE_SHARE
from tunnel.testing.fakes import FakeNetwork, FakePlatform

STORM = 40
COST = 0.05  # seconds of work each new handshake pretends to take


async def test_a_storm_of_new_clients_waits_its_turn_and_the_sessions_up_stay_answered(
    autojump_clock,
):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        first_session = a.session
        # Each start of a waiting handshake costs COST of the process's time: the budget
        # (HANDSHAKE_SHARE of a core) allows one every COST / HANDSHAKE_SHARE seconds.
        ticks = itertools.count(0.0, COST)
        server.dispatcher.work_clock = lambda: next(ticks)
        clients = [
            Client(
                client_config(handshake_timeout=20.0),
                Identity.generate(),
                RunOptions(),
                FakePlatform(network, f"203.0.113.{1 + i % 4}"),
            )
            for i in range(STORM)
        ]
        most_waiting = 0
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.supervise)
            with trio.fail_after(60):
                while not all(c.connected.is_set() for c in clients):
                    most_waiting = max(most_waiting, server.status()["waiting_handshakes"])
                    await trio.sleep(0.05)
            took = trio.current_time() - began
            status = server.status()
            witness_kept_its_session = a.session is first_session and a.reconnects == 0
            nursery.cancel_scope.cancel()

    assert most_waiting > STORM // 2  # they queued rather than all starting at once
    assert took >= 0.8 * STORM * COST / HANDSHAKE_SHARE  # the budget held
    # The witness kept its session: heartbeats were answered all through the storm.
    assert witness_kept_its_session
    sessions = status["sessions"]
    assert len(sessions) == STORM + 1
    assert len({s["client_id"] for s in sessions}) == STORM + 1
    addresses = [address for s in sessions for address in s["addresses"]]
    assert len(addresses) == len(set(addresses))
    assert status["waiting_handshakes"] == 0 and status["pending_handshakes"] == 0
    assert all(c.reconnects == 0 for c in clients)  # none had to try twice


async def test_a_waiting_handshake_whose_client_went_away_expires(autojump_clock):
    from aioquic.quic.connection import QuicConnection
    from test_inmemory_peers import SERVER_ADDR

    from tunnel.daemon.quic import client_configuration

    network = FakeNetwork()
    async with running_server(network) as server:
        server.dispatcher.budget.spent(trio.current_time(), 30.0)  # busy for a minute
        endpoint = network.bind("198.51.100.66", 5000)
        quic = QuicConnection(configuration=client_configuration())
        quic.connect(SERVER_ADDR, now=trio.current_time())
        initial = quic.datagrams_to_send(now=trio.current_time())
        for _ in range(3):  # the client retransmits: it keeps its one place
            endpoint.send_batch(initial)
            await trio.sleep(0.5)
        status = server.status()
        assert status["waiting_handshakes"] == 1 and status["pending_handshakes"] == 1
        await wait_for(lambda: server.status()["waiting_handshakes"] == 0)
        assert server.status()["pending_handshakes"] == 0
        assert server.drops["handshake_expired"] == 1
        assert not server.table.sessions


async def test_a_client_that_comes_back_replaces_its_old_session_at_once(autojump_clock):
    network = FakeNetwork()
    async with running_server(network) as server, running_client(network, "198.51.100.2") as a:
        first = a.addresses()
        network.policy = lambda data, src, dst: False  # the path dies
        await wait_for(lambda: a.state != "connected")
        network.policy = lambda data, src, dst: True
        await wait_for(lambda: a.state == "connected")
        # Long before the old session's idle timeout, the server shows one session: the new.
        status = server.status()
        assert [s["addresses"] for s in status["sessions"]] == [[a.split("/")[0] for a in first]]
        assert status["sessions_replaced"] == 1
        assert a.addresses() == first
        # Its close drains, and the lease stays with the new session when it ends.
        await wait_for(lambda: server.status()["sessions_closing"] == 0)
        assert len(server.table.sessions) == 1
        assert a.addresses() == first


def test_the_collector_waits_out_a_storm_but_not_for_ever():
    import gc

    from tunnel.daemon.memory import CollectorPause

    pause = CollectorPause(longest=30.0)
    assert gc.isenabled()
    try:
        pause.hold(0.0)
        assert not gc.isenabled()
        pause.hold(10.0)
        assert not gc.isenabled()
        pause.hold(30.0)  # the storm lasted too long: it runs again, for as long again
        assert gc.isenabled()
        pause.hold(40.0)
        assert gc.isenabled()
        pause.hold(61.0)
        assert not gc.isenabled()
        pause.release(62.0)  # over
        assert gc.isenabled()
        assert pause.pauses == 2
    finally:
        gc.enable()
