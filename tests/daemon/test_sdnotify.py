"""The sd_notify client, against a real AF_UNIX datagram socket standing in for systemd.

Each test binds a listener (a path in tmp, or an abstract ``@name``), builds a Notifier from a
fake environment pointing at it, and asserts the exact datagrams. The watchdog runs on trio's
virtual clock: a receiver task stamps each ping with the time it arrived.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

import tunnel.daemon.sdnotify as sdnotify
from tunnel.daemon.sdnotify import STATUS_MAX, Notifier


@attrs.define
class Listener:
    """systemd's end: a bound datagram socket and the NOTIFY_SOCKET value that names it."""

    target: str
    sock: socket.socket

    @classmethod
    def bind(cls, target: str) -> Listener:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind("\0" + target[1:] if target.startswith("@") else target)
        sock.setblocking(False)
        return cls(target, sock)

    def drain(self) -> list[bytes]:
        """Every datagram queued so far."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096))
            except BlockingIOError:
                return received

    async def receive(self) -> bytes:
        await trio.lowlevel.wait_readable(self.sock)
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()
        if not self.target.startswith("@"):
            Path(self.target).unlink(missing_ok=True)

    def environ(self, **more: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.target, **more}


def _target(kind: str, tmp_path: Path) -> str:
    if kind == "path":
        return str(tmp_path / "notify")
    return f"@tunnel-test-{os.getpid()}-{uuid.uuid4().hex}"


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    bound = Listener.bind(_target(request.param, tmp_path))
    yield bound
    bound.close()


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    """Notifiers to close at the end (an open socket left to the collector warns)."""
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close()


@pytest.fixture
def make(notifiers: list[Notifier]):
    def make(environ: dict[str, str]) -> Notifier:
        notifier = Notifier.from_environment(environ)
        notifiers.append(notifier)
        return notifier

    return make


@pytest.fixture
def sockets_made(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """Every datagram socket made while the test runs: the notifier's (trio's own wakeup
    sockets, made under the same patch, are stream sockets)."""
    made: list[socket.socket] = []
    real = socket.socket

    def counting(*args: object, **kwargs: object) -> socket.socket:
        sock = real(*args, **kwargs)
        if sock.type == socket.SOCK_DGRAM:
            made.append(sock)
        return sock

    monkeypatch.setattr(sdnotify.socket, "socket", counting)
    return made


def test_ready(listener, make):
    notifier = make(listener.environ())
    assert notifier.enabled
    notifier.ready()
    notifier.ready(status="serving 0 clients")
    assert listener.drain() == [b"READY=1", b"READY=1\nSTATUS=serving 0 clients"]


def test_status_is_sent_only_when_it_changed(listener, make):
    notifier = make(listener.environ())
    notifier.status("connecting")
    notifier.status("connecting")
    notifier.status("connected")
    notifier.status("connected")
    notifier.status("connecting")
    assert listener.drain() == [b"STATUS=connecting", b"STATUS=connected", b"STATUS=connecting"]


def test_the_status_ready_carried_counts_as_sent(listener, make):
    notifier = make(listener.environ())
    notifier.ready(status="serving")
    notifier.status("serving")
    assert listener.drain() == [b"READY=1\nSTATUS=serving"]


def test_status_is_one_line(listener, make):
    notifier = make(listener.environ())
    notifier.status("reconnecting:\nserver full\r\n")
    notifier.status("reconnecting: server full")  # the same line: not sent again
    notifier.ready(status="a\tb\0c")
    assert listener.drain() == [b"STATUS=reconnecting: server full", b"READY=1\nSTATUS=a b c"]


def test_a_long_status_is_cut_at_a_character(listener, make):
    notifier = make(listener.environ())
    notifier.status("é" * 1000)
    [message] = listener.drain()
    text = message.decode("utf-8")  # still valid UTF-8: cut between characters
    assert text.startswith("STATUS=éé") and text.endswith("...")
    assert len(message) <= len("STATUS=") + STATUS_MAX


def test_reloading_carries_the_monotonic_clock(listener, make):
    notifier = make(listener.environ())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = listener.drain()
    first, second = message.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping(listener, make):
    notifier = make(listener.environ())
    notifier.stopping()
    assert listener.drain() == [b"STOPPING=1"]


async def test_watchdog_pings_at_half_its_timeout(listener, make, autojump_clock):
    notifier = make(listener.environ(WATCHDOG_USEC="2000000"))
    assert notifier.watchdog_interval == 1.0
    arrivals: list[float] = []
    start = trio.current_time()

    async def record() -> None:
        while True:
            assert await listener.receive() == b"WATCHDOG=1"
            arrivals.append(trio.current_time() - start)

    with trio.move_on_after(10.5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            nursery.start_soon(notifier.run_watchdog)
    assert arrivals == [float(second) for second in range(11)]


async def test_watchdog_of_this_process(listener, make, autojump_clock):
    notifier = make(listener.environ(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid())))
    assert notifier.watchdog_interval == 15.0
    with trio.move_on_after(1):
        await notifier.run_watchdog()
    assert listener.drain() == [b"WATCHDOG=1"]


@pytest.mark.parametrize(
    "watchdog",
    [
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)},  # another process's
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "not a pid"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {},
    ],
)
async def test_no_watchdog(listener, make, autojump_clock, watchdog):
    notifier = make(listener.environ(**watchdog))
    assert notifier.watchdog_interval is None
    start = trio.current_time()
    await notifier.run_watchdog()  # returns at once
    assert trio.current_time() == start
    assert listener.drain() == []


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "2000000"}])
async def test_without_notify_socket_everything_is_a_no_op(
    make, sockets_made, autojump_clock, environ
):
    notifier = make(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready(status="serving")
    notifier.status("serving")
    notifier.reloading()
    notifier.stopping()
    start = trio.current_time()
    await notifier.run_watchdog()
    assert trio.current_time() == start
    assert sockets_made == []


def test_a_socket_of_another_kind_disables_notifying(make, sockets_made, caplog):
    notifier = make({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()
    assert sockets_made == []
    assert "not a Unix socket path" in caplog.text


def test_one_socket_for_every_message(listener, make, sockets_made):
    notifier = make(listener.environ())
    for n in range(5):
        notifier.status(f"serving {n} clients")
    assert len(listener.drain()) == 5
    assert len(sockets_made) == 1


def test_a_vanished_socket_is_logged_once_and_reached_again(listener, make, caplog):
    caplog.set_level(logging.DEBUG, logger="tunnel.sdnotify")
    notifier = make(listener.environ())
    notifier.ready(status="serving")
    assert listener.drain() == [b"READY=1\nSTATUS=serving"]
    listener.close()
    notifier.status("serving 1 client")  # none of these raises
    notifier.status("serving 2 clients")
    notifier.reloading()
    notifier.stopping()
    failures = [r for r in caplog.records if "not notifying systemd" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.DEBUG

    again = Listener.bind(listener.target)  # systemd is back at the same name
    try:
        notifier.status("serving 2 clients")  # not delivered before: sent, not de-duplicated
        notifier.status("serving 2 clients")
        assert again.drain() == [b"STATUS=serving 2 clients"]
    finally:
        again.close()
    assert "reachable again" in caplog.text


def test_a_socket_that_never_existed(tmp_path, make):
    notifier = make({"NOTIFY_SOCKET": str(tmp_path / "nobody"), "WATCHDOG_USEC": "2000000"})
    assert notifier.enabled
    notifier.ready(status="serving")
    notifier.stopping()


def test_a_full_queue_drops_messages_and_keeps_the_socket(listener, make, sockets_made):
    notifier = make(listener.environ())
    for n in range(200):  # far more than net.unix.max_dgram_qlen: nobody reads
        notifier.status(f"serving {n} clients")
    assert 0 < len(listener.drain()) < 200
    notifier.status("serving 1000 clients")
    assert listener.drain() == [b"STATUS=serving 1000 clients"]
    assert len(sockets_made) == 1


async def test_what_a_daemon_sends_arrives_in_order(listener, make, autojump_clock):
    """The server's life: ready, a status change, a SIGHUP reload, stop; pings throughout."""
    notifier = make(listener.environ(WATCHDOG_USEC="4000000"))
    received: list[bytes] = []

    async def record() -> None:
        while True:
            received.append(await listener.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record)
        nursery.start_soon(notifier.run_watchdog)
        await trio.sleep(1)
        notifier.ready(status="serving 0 clients")
        await trio.sleep(5)
        notifier.status("serving 1 client")
        await trio.sleep(5)
        notifier.reloading()
        notifier.ready(status="serving 1 client")
        await trio.sleep(5)
        notifier.stopping()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()

    pings = [m for m in received if m == b"WATCHDOG=1"]
    assert len(pings) == 9  # at 0, 2, 4, ... 16 s
    rest = [m for m in received if m != b"WATCHDOG=1"]
    assert [m.split(b"\n")[0] for m in rest] == [
        b"READY=1",
        b"STATUS=serving 1 client",
        b"RELOADING=1",
        b"READY=1",
        b"STOPPING=1",
    ]
    assert rest[0] == b"READY=1\nSTATUS=serving 0 clients"
    assert rest[2].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert rest[3] == b"READY=1\nSTATUS=serving 1 client"  # after a reload: ready again
