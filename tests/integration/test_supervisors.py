"""The service directories in scripts/service/, under the real supervisors: s6 and runit.

Each test copies a service directory into a per-test directory, points its ``env/`` at a config
written for the test and at the ``tunnel`` console script of this venv, and starts the
supervisor itself (``s6-svscan`` or ``runsv``) inside a network namespace with ``ip netns
exec``, so the daemon's TUN device lives there. Then it drives the service with the
operator's tools (``s6-svc``, ``s6-svwait``, ``s6-svstat``, ``sv``) and looks at the result
with ``ip`` and ``tunnel status``.

Topology::

    srv: 10.77.0.1/24 ── veth ── cli: 10.77.0.2/24
         tnlsrv0                      tnlcli0

The supervisors' state changes happen in other processes, so the tests poll them (every
:data:`POLL_S`) under a deadline; each test is bounded by ``trio.fail_after``. On the way out
every supervisor is stopped (then killed), the namespaces deleted with whatever still runs in
them, and the logs of every service are echoed at DEBUG on ``tests.support``, which pytest
shows under "Captured log call" when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

from tests.support.netns import (
    Netns,
    ip_json,
    netns,
    open_daemon_nursery,
    start_daemon,
    veth,
)

# The fixtures' types (Key, TunnelFiles) live in conftest.py, which a test module cannot
# import cleanly (tests/ is not a package): they are annotated as Any here.
TunnelFiles = Any

log = logging.getLogger("tests.support.supervisors")

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "scripts" / "service"
#: the console script of the interpreter running the tests (the repo's .venv)
TUNNEL_BIN = Path(sys.executable).parent / "tunnel"

TEST_TIMEOUT = 60
POLL_S = 0.1
#: how long a service may take to become ready (interpreter start-up included)
READY_S = 20
#: SIGTERM -> exit within ~2 s per the contract, plus the finish script and scheduling slack
STOP_LIMIT_S = 5.0
#: longer than both supervisors' 1-second pause before restarting a service that died young,
#: plus an interpreter start-up: a service that was going to be restarted would have been
RESTART_WINDOW_S = 2.5
SERVER_ADDR = "10.77.0.1:4433"
SERVER_TUN, CLIENT_TUN = "tnlsrv0", "tnlcli0"

S6_TOOLS = ("s6-svscan", "s6-svscanctl", "s6-supervise", "s6-svc", "s6-svstat", "s6-svwait",
            "s6-svok", "s6-log", "s6-envdir")  # fmt: skip
RUNIT_TOOLS = ("runsv", "sv", "svlogd", "chpst")

T = TypeVar("T")


# --- requirements ----------------------------------------------------------------------------


def _require(tools: tuple[str, ...], package: str) -> None:
    """Skip when ``tools`` are missing, but fail under CI: there a missing package is a broken
    machine (scripts/test installs it), not a reason to pass by skipping."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        reason = (f"needs {', '.join(missing)} from the Debian package {package!r} "
                  "(scripts/test installs it as root)")  # fmt: skip
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but this test {reason}", pytrace=False)
        pytest.skip(reason)
    if not os.access(TUNNEL_BIN, os.X_OK):
        pytest.fail(f"no tunnel console script at {TUNNEL_BIN}: install the project into the "
                    "venv (scripts/test does)", pytrace=False)  # fmt: skip


@pytest.fixture
def s6() -> None:
    _require(S6_TOOLS, "s6")


@pytest.fixture
def runit() -> None:
    _require(RUNIT_TOOLS, "runit")


# --- the world -------------------------------------------------------------------------------


@attrs.frozen
class World:
    server: Netns
    client: Netns


@pytest.fixture
def world(files: TunnelFiles) -> Iterator[World]:
    # takes files so that it is torn down first: processes die before their directory goes
    with netns("svsrv") as srv, netns("svcli") as cli:
        veth(srv, cli, "10.77.0.1/24", "10.77.0.2/24")
        yield World(srv, cli)


@attrs.frozen
class Creds:
    server_key: Path
    server_id: str
    token: str


@pytest.fixture
def creds(files: TunnelFiles) -> Creds:
    key = files.key("server")
    return Creds(key.path, key.public_id, files.token())


def server_config(files: TunnelFiles, creds: Creds, **settings: Any) -> Path:
    """A server config naming the keys the service is about (and the defaults of
    conftest for the rest)."""
    base: dict[str, Any] = {
        "listen": SERVER_ADDR,
        "key_file": creds.server_key,
        "network": "10.78.0.0/24",
        "auth_tokens": [creds.token],
        "tun_name": SERVER_TUN,
        "control_socket": files.socket("server"),
    }
    return files.server_config("server", **(base | settings))


def client_config(files: TunnelFiles, creds: Creds) -> Path:
    return files.client_config(
        "client",
        server=SERVER_ADDR,
        server_id=creds.server_id,
        auth_token=creds.token,
        key_file=files.key("client").path,
        tun_name=CLIENT_TUN,
        auto_reconnect=True,
    )


# --- service directories ---------------------------------------------------------------------


@attrs.frozen
class Service:
    """A copy of a service directory of scripts/service, configured for one test."""

    dir: Path
    log_dir: Path
    config: Path
    control_socket: Path

    def log(self) -> str:
        """What the service's logger wrote so far (``current`` of its log directory)."""
        try:
            return (self.log_dir / "current").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def install_service(
    supervisor: str, name: str, scandir: Path, config: Path, control_socket: Path
) -> Service:
    """Copy ``scripts/service/<supervisor>/<name>`` into ``scandir`` and write its ``env/``
    (the tunnel binary, the config, debug logs, the log directory)."""
    target = scandir / name
    # a service dir that was run in place holds supervise/ and event/: never copy those
    shutil.copytree(SERVICES / supervisor / name, target,
                    ignore=shutil.ignore_patterns("supervise", "event", "env"))  # fmt: skip
    log_dir = scandir.parent / f"log-{supervisor}-{name}"
    env = target / "env"
    env.mkdir()
    settings = {
        "TUNNEL": TUNNEL_BIN,
        "TUNNEL_CONFIG": config,
        "TUNNEL_LOG_LEVEL": "debug",
        "TUNNEL_LOG_DIR": log_dir,
    }
    for key, value in settings.items():
        (env / key).write_text(f"{value}\n")
    return Service(target, log_dir, config, control_socket)


def _echo_logs(services: tuple[Service, ...], supervisor_out: Path) -> None:
    for service in services:
        log.debug("--- log of %s ---\n%s", service.dir, service.log())
    with contextlib.suppress(FileNotFoundError):
        log.debug("--- supervisor output ---\n%s", supervisor_out.read_text(errors="replace"))


# --- running things --------------------------------------------------------------------------


async def sh(
    argv: list[str],
    *,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 30,  # noqa: ASYNC109
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` here (supervisor tools talk through fifos in the file system, so the
    network namespace does not matter), capture its output as text."""
    with trio.fail_after(timeout):
        proc = await trio.run_process(argv, cwd=cwd, stdin=b"", capture_stdout=True,
                                      capture_stderr=True, check=False)  # fmt: skip
    result = subprocess.CompletedProcess(
        argv, proc.returncode, proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"))  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited with {proc.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")  # fmt: skip
    return result


async def eventually(probe: Callable[[], Awaitable[T]], what: str, within: float = READY_S) -> T:
    """Poll ``probe`` until it returns something true; return that. Fails after ``within``."""
    with trio.move_on_after(within):
        while True:
            value = await probe()
            if value:
                return value
            await trio.sleep(POLL_S)
    raise AssertionError(f"not true after {within:g} s: {what}")


async def status(service: Service) -> dict[str, Any]:
    proc = await sh([str(TUNNEL_BIN), "status", "--json", "--socket", str(service.control_socket)])
    return json.loads(proc.stdout)


def tun_devices(ns: Netns) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


def log_count(service: Service, text: str) -> int:
    return service.log().count(text)


async def log_says(service: Service, text: str) -> None:
    async def probe() -> bool:
        return text in service.log()

    await eventually(probe, f"{service.dir.name}'s log says {text!r}")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists (a zombie included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_left(ns: Netns, service: Service, tun: str, pid: int) -> None:
    assert not pid_alive(pid), f"daemon pid {pid} still exists"
    assert tun not in tun_devices(ns), f"{tun} is still in {ns}"
    assert not service.control_socket.exists(), f"{service.control_socket} was left behind"


@contextlib.asynccontextmanager
async def supervisor(
    ns: Netns, argv: list[str], stop: Callable[[trio.Process], Awaitable[None]],
    out: Path, services: tuple[Service, ...],
) -> AsyncIterator[trio.Process]:  # fmt: skip
    """Run ``argv`` (a supervisor) inside ``ns``, its output going to ``out``. On the way out,
    ``stop`` it (bounded), kill it if that did not work, and echo every service's log."""
    with out.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            ns.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        with trio.move_on_after(STOP_LIMIT_S + 5, shield=True):
            with contextlib.suppress(trio.TooSlowError):
                await stop(proc)
            await proc.wait()
        if proc.returncode is None:
            log.warning("%s did not stop: SIGKILL (netns cleanup gets its children)", argv[0])
            proc.kill()
            with trio.move_on_after(2, shield=True):
                await proc.wait()
        log.debug("%s exited with %s", argv[0], proc.returncode)
        _echo_logs(services, out)


# --- s6 --------------------------------------------------------------------------------------


@attrs.frozen
class S6State:
    """What ``s6-svstat -o`` says about a service."""

    up: bool
    wantedup: bool
    ready: bool
    pid: int
    exitcode: int
    signal: str


async def s6_state(service: Service) -> S6State:
    proc = await sh(["s6-svstat", "-o", "up,wantedup,ready,pid,exitcode,signal", str(service.dir)])
    up, wantedup, ready, pid, exitcode, sig = proc.stdout.split()
    return S6State(up == "true", wantedup == "true", ready == "true", int(pid), int(exitcode), sig)


@contextlib.asynccontextmanager
async def s6_svscan(ns: Netns, *services: Service) -> AsyncIterator[None]:
    """``s6-svscan`` on the scan directory holding ``services``, inside ``ns``; returns once
    every service has its ``s6-supervise``. Stopped with ``s6-svscanctl -t``."""
    scandir = services[0].dir.parent

    async def stop(proc: trio.Process) -> None:
        await sh(["s6-svscanctl", "-t", str(scandir)], check=False, timeout=STOP_LIMIT_S)

    async with supervisor(ns, ["s6-svscan", str(scandir)], stop,
                          scandir.parent / "s6-svscan.out", services):  # fmt: skip
        for service in services:

            async def supervised(service: Service = service) -> bool:
                return (await sh(["s6-svok", str(service.dir)], check=False)).returncode == 0

            await eventually(supervised, f"s6-supervise runs on {service.dir}")
        yield


async def s6_wait_ready(service: Service) -> S6State:
    """``s6-svwait -U``: up and ready, which needs the service's notification-fd."""
    await sh(["s6-svwait", "-U", "-t", str(READY_S * 1000), str(service.dir)], timeout=READY_S + 5)
    state = await s6_state(service)
    assert state.up and state.ready, state
    return state


async def s6_stop(service: Service) -> S6State:
    """``s6-svc -d``, waiting until the daemon is down and ./finish has run."""
    started = time.monotonic()
    await sh(["s6-svc", "-wD", "-T", str(int(STOP_LIMIT_S * 1000)), "-d", str(service.dir)],
             timeout=STOP_LIMIT_S + 5)  # fmt: skip
    took = time.monotonic() - started
    assert took < STOP_LIMIT_S, f"s6-svc -d took {took:.1f} s"
    return await s6_state(service)


@pytest.fixture
def s6_dir(files: TunnelFiles) -> Path:
    path = files.dir / "s6"
    path.mkdir()
    return path


async def test_s6_server_becomes_ready_reloads_and_stops_cleanly(
    s6: None, world: World, files: TunnelFiles, creds: Creds, s6_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        service = install_service("s6", "tunnel-server", s6_dir,
                                  server_config(files, creds), files.socket("server"))  # fmt: skip
        async with s6_svscan(world.server, service):
            state = await s6_wait_ready(service)
            # the run script exec'd all the way down: the supervised pid is the daemon
            assert (await status(service))["pid"] == state.pid
            assert SERVER_TUN in tun_devices(world.server)

            await sh(["s6-svc", "-h", str(service.dir)])
            await log_says(service, "SIGHUP: reloaded")
            assert (await s6_state(service)).pid == state.pid, "SIGHUP must not restart"

            down = await s6_stop(service)
            assert (down.up, down.wantedup, down.exitcode) == (False, False, 0), down
            assert_nothing_left(world.server, service, SERVER_TUN, state.pid)
            await log_says(service, "tunnel-server: stopped cleanly (exit code 0)")


async def test_s6_restarts_a_crashed_server(
    s6: None, world: World, files: TunnelFiles, creds: Creds, s6_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        service = install_service("s6", "tunnel-server", s6_dir,
                                  server_config(files, creds), files.socket("server"))  # fmt: skip
        async with s6_svscan(world.server, service):
            first = await s6_wait_ready(service)
            os.kill(first.pid, signal.SIGKILL)

            async def ready_again() -> S6State | None:
                state = await s6_state(service)
                return state if state.ready and state.pid not in (first.pid, -1) else None

            second = await eventually(ready_again, "a new, ready daemon")
            assert second.wantedup
            assert (await status(service))["pid"] == second.pid
            assert SERVER_TUN in tun_devices(world.server)
            await log_says(service, "tunnel-server: killed by signal 9")

            down = await s6_stop(service)
            assert down.exitcode == 0, down
            assert_nothing_left(world.server, service, SERVER_TUN, second.pid)


async def test_s6_does_not_restart_a_permanent_failure(
    s6: None, world: World, files: TunnelFiles, creds: Creds, s6_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        config = server_config(files, creds, bogus_key=1)  # unknown key: exit 100
        service = install_service("s6", "tunnel-server", s6_dir, config, files.socket("server"))
        async with s6_svscan(world.server, service):

            async def given_up() -> S6State | None:
                state = await s6_state(service)
                return state if not state.up and not state.wantedup else None

            state = await eventually(given_up, "s6 gave up on the service")
            assert state.exitcode == 100, state
            await log_says(service, "tunnel-server: permanent failure (exit code 100)")
            # a service s6 meant to restart would have been restarted by now
            await trio.sleep(RESTART_WINDOW_S)
            assert not (await s6_state(service)).up
            assert log_count(service, "unknown key 'bogus_key'") == 1, service.log()
            assert SERVER_TUN not in tun_devices(world.server)


async def test_s6_client_is_ready_once_connected_and_stops_cleanly(
    s6: None, world: World, files: TunnelFiles, creds: Creds, s6_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server_argv = [str(TUNNEL_BIN), "server", "--config", str(server_config(files, creds))]
        async with open_daemon_nursery() as nursery:
            await start_daemon(nursery, world.server, server_argv, name="server")
            config = client_config(files, creds)
            service = install_service("s6", "tunnel-client", s6_dir, config,
                                      files.socket("client"))  # fmt: skip
            async with s6_svscan(world.client, service):
                state = await s6_wait_ready(service)
                # ready means the session is up: no polling needed
                client = await status(service)
                assert client["state"] == "connected", client
                assert CLIENT_TUN in tun_devices(world.client)

                down = await s6_stop(service)
                assert (down.up, down.exitcode) == (False, 0), down
                assert_nothing_left(world.client, service, CLIENT_TUN, state.pid)


# --- runit -----------------------------------------------------------------------------------

_SV_RUN = re.compile(r"^run: [^\n]*?: \(pid (\d+)\)")


async def sv_status(service: Service) -> str:
    return (await sh(["sv", "status", str(service.dir)], check=False)).stdout


async def sv_pid(service: Service) -> int | None:
    """The daemon's pid while runsv says ``run:``."""
    match = _SV_RUN.match(await sv_status(service))
    return int(match.group(1)) if match else None


async def check_script(service: Service) -> int:
    """Exit code of the service's ./check, run as sv runs it (from the service directory)."""
    return (await sh(["./check"], cwd=service.dir, check=False)).returncode


@contextlib.asynccontextmanager
async def runsv(ns: Netns, service: Service) -> AsyncIterator[None]:
    """``runsv`` on ``service`` inside ``ns``; returns once it answers ``sv status``.
    Stopped with SIGTERM, which runsv treats as ``sv exit``."""

    async def stop(proc: trio.Process) -> None:
        proc.terminate()
        await proc.wait()

    async with supervisor(ns, ["runsv", str(service.dir)], stop,
                          service.dir.parent / "runsv.out", (service,)):  # fmt: skip

        async def answering() -> bool:
            return (await sh(["sv", "status", str(service.dir)], check=False)).returncode == 0

        await eventually(answering, f"runsv answers on {service.dir}")
        yield


async def sv_wait_ready(service: Service) -> int:
    """Until ``sv check`` answers ``ok: run:`` (runsv says run and ./check succeeds); returns
    the daemon's pid.

    One answer is not enough: before runsv has started the service (just after runsv itself
    started, or between a crash and the restart) ``sv check`` answers at once with ``ok:
    down: ..., normally up, want up``.
    """

    async def checked() -> bool:
        proc = await sh(["sv", "-w", str(READY_S), "check", str(service.dir)], check=False,
                        timeout=READY_S + 5)  # fmt: skip
        if proc.stdout.startswith("ok: run:"):
            return True
        log.debug("sv check, not yet: %s", proc.stdout.strip() or proc.stderr.strip())
        return False

    await eventually(checked, f"sv check says ok: run: for {service.dir}")
    assert await check_script(service) == 0
    pid = await sv_pid(service)
    assert pid is not None
    return pid


async def sv_stop(service: Service) -> str:
    """``sv -w N down``: waits until runsv reports the service down."""
    started = time.monotonic()
    proc = await sh(["sv", "-w", str(int(STOP_LIMIT_S)), "down", str(service.dir)],
                    timeout=STOP_LIMIT_S + 5)  # fmt: skip
    took = time.monotonic() - started
    assert took < STOP_LIMIT_S, f"sv down took {took:.1f} s"
    assert proc.stdout.startswith("ok: down:"), proc.stdout
    return proc.stdout


@pytest.fixture
def runit_dir(files: TunnelFiles) -> Path:
    path = files.dir / "runit"
    path.mkdir()
    return path


async def test_runit_server_checks_ready_reloads_and_stops_cleanly(
    runit: None, world: World, files: TunnelFiles, creds: Creds, runit_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        service = install_service("runit", "tunnel-server", runit_dir,
                                  server_config(files, creds), files.socket("server"))  # fmt: skip
        assert await check_script(service) != 0, "./check passed with no daemon running"
        async with runsv(world.server, service):
            pid = await sv_wait_ready(service)
            assert (await sv_status(service)).startswith("run:")
            assert (await status(service))["pid"] == pid
            assert SERVER_TUN in tun_devices(world.server)

            await sh(["sv", "hup", str(service.dir)])
            await log_says(service, "SIGHUP: reloaded")
            assert await sv_pid(service) == pid, "SIGHUP must not restart"

            await sv_stop(service)
            assert_nothing_left(world.server, service, SERVER_TUN, pid)
            await log_says(service, "tunnel-server: stopped cleanly (exit code 0)")
            assert await check_script(service) != 0, "./check passed after sv down"
            assert (await sv_status(service)).startswith("down:")


async def test_runit_restarts_a_crashed_server(
    runit: None, world: World, files: TunnelFiles, creds: Creds, runit_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        service = install_service("runit", "tunnel-server", runit_dir,
                                  server_config(files, creds), files.socket("server"))  # fmt: skip
        async with runsv(world.server, service):
            first = await sv_wait_ready(service)
            os.kill(first, signal.SIGKILL)

            async def restarted() -> int | None:
                pid = await sv_pid(service)
                return pid if pid not in (None, first) else None

            await eventually(restarted, "runsv restarted the daemon")
            second = await sv_wait_ready(service)
            assert second != first
            assert (await status(service))["pid"] == second
            assert SERVER_TUN in tun_devices(world.server)
            await log_says(service, "tunnel-server: killed by signal 9")

            await sv_stop(service)
            assert_nothing_left(world.server, service, SERVER_TUN, second)


async def test_runit_does_not_restart_a_permanent_failure(
    runit: None, world: World, files: TunnelFiles, creds: Creds, runit_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        config = server_config(files, creds, bogus_key=1)  # unknown key: exit 100
        service = install_service("runit", "tunnel-server", runit_dir, config,
                                  files.socket("server"))  # fmt: skip
        async with runsv(world.server, service):

            async def given_up() -> str | None:
                # "down: DIR: 1s, normally up" -- without ", want up", which a restart pending
                # after a quick death would show
                text = await sv_status(service)
                return text if text.startswith("down:") and "want up" not in text else None

            await eventually(given_up, "runsv holds the service down")
            await log_says(service, "tunnel-server: permanent failure (exit code 100)")
            await trio.sleep(RESTART_WINDOW_S)
            assert (await sv_status(service)).startswith("down:")
            assert log_count(service, "unknown key 'bogus_key'") == 1, service.log()
            assert SERVER_TUN not in tun_devices(world.server)


async def test_runit_client_checks_ready_once_connected_and_stops_cleanly(
    runit: None, world: World, files: TunnelFiles, creds: Creds, runit_dir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server_argv = [str(TUNNEL_BIN), "server", "--config", str(server_config(files, creds))]
        async with open_daemon_nursery() as nursery:
            await start_daemon(nursery, world.server, server_argv, name="server")
            config = client_config(files, creds)
            service = install_service("runit", "tunnel-client", runit_dir, config,
                                      files.socket("client"))  # fmt: skip
            async with runsv(world.client, service):
                pid = await sv_wait_ready(service)
                client = await status(service)
                assert client["state"] == "connected", client
                assert CLIENT_TUN in tun_devices(world.client)

                await sv_stop(service)
                assert_nothing_left(world.client, service, CLIENT_TUN, pid)
                await log_says(service, "tunnel-client: stopped cleanly (exit code 0)")


# --- the service directories themselves ------------------------------------------------------

_EXPECTED = {
    "s6": ("run", "finish", "log/run"),
    "runit": ("run", "finish", "check", "log/run"),
}


@pytest.mark.parametrize("supervisor_name", sorted(_EXPECTED))
@pytest.mark.parametrize("name", ["tunnel-server", "tunnel-client"])
def test_service_dir_is_complete(supervisor_name: str, name: str) -> None:
    """Scripts present, executable, valid sh; s6 dirs have notification-fd 3; nothing left
    behind by a supervisor run in place."""
    base = SERVICES / supervisor_name / name
    for script in _EXPECTED[supervisor_name]:
        path = base / script
        assert path.is_file() and os.access(path, os.X_OK), f"{path} missing or not executable"
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)
    if supervisor_name == "s6":
        assert (base / "notification-fd").read_text() == "3\n"
    for stray in ("supervise", "event", "env", "log/supervise"):
        assert not (base / stray).exists(), f"{base / stray} should not be in the repo"
