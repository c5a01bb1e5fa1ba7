"""Network-namespace tooling for integration tests, the demo and the benchmark.

This is test tooling, not the daemon: it shells out to ``ip`` on purpose, because the point
is to build a throw-away world the way an operator would, and to look at it afterwards with
the operator's tools.

- :func:`netns` makes a uniquely named namespace (``tnl-<prefix>-<pid>-<n>``) and always
  removes it, killing whatever still runs inside first.
- :func:`veth` and :func:`bridge` wire namespaces together.
- :func:`start_daemon` runs a long-lived process inside a namespace under a trio nursery,
  waits for its readiness line on a pipe (``--ready-fd N``), keeps its output, and stops it
  (SIGTERM, then SIGKILL after :data:`KILL_AFTER_S`) when the nursery is cancelled.
- :func:`run` runs a short command inside a namespace and captures its output.

Every name carries ``tnl-``, the pid and a counter, so concurrent runs never collide and
:func:`reap_stale` can safely delete the leftovers of a run that was SIGKILLed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import attrs
import trio

from tests.support import tool_argv

__all__ = [
    "KILL_AFTER_S",
    "Daemon",
    "DaemonError",
    "CommandFailed",
    "Netns",
    "Veth",
    "netns",
    "veth",
    "bridge",
    "exec_argv",
    "ip",
    "ip_json",
    "reap_stale",
    "start_daemon",
    "open_daemon_nursery",
    "pid_alive",
    "run",
]

log = logging.getLogger("tests.support")

#: Every namespace this module creates starts with this, so leftovers are recognisable.
NAME_PREFIX = "tnl-"
#: Grace period between SIGTERM and SIGKILL when a daemon is stopped by cancellation.
KILL_AFTER_S = 3.0
#: Bound on how long we wait for the processes of a namespace to die before deleting it.
_NS_KILL_WAIT_S = 5.0

_counter = itertools.count(1)
_NAME_RE = re.compile(r"^tnl-[A-Za-z0-9_.]+-(\d+)-(\d+)$")


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; ``str()`` shows its argv, exit code, stdout and stderr."""

    def __str__(self) -> str:
        def text(data: Any) -> str:
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            return (data or "").strip()

        return (
            f"command {self.cmd!r} exited with {self.returncode}\n"
            f"--- stdout ---\n{text(self.stdout)}\n--- stderr ---\n{text(self.stderr)}"
        )


class DaemonError(Exception):
    """A daemon did not become ready (exited first, closed its ready fd, or timed out).
    The message carries its captured output."""


def _run_sync(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


@attrs.frozen
class Netns:
    """A network namespace created by :func:`netns`; ``name`` is what ``ip netns`` knows."""

    name: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return exec_argv(self, argv)

    def pids(self) -> list[int]:
        """Pids of the processes whose network namespace is this one."""
        proc = _run_sync(["ip", "netns", "pids", self.name], check=False)
        return [int(word) for word in proc.stdout.split() if word.isdigit()]

    def __str__(self) -> str:
        return self.name


NsLike = Netns | str | None


def _ns_name(ns: NsLike) -> str | None:
    if ns is None:
        return None
    return ns.name if isinstance(ns, Netns) else ns


def exec_argv(ns: NsLike, argv: Sequence[str]) -> list[str]:
    """``["ip", "netns", "exec", name, *argv]``; ``ns=None`` means the current namespace."""
    name = _ns_name(ns)
    if name is None:
        return list(argv)
    return ["ip", "netns", "exec", name, *argv]


def ip(ns: NsLike, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip -n NS ARGS...`` synchronously (for setup and inspection)."""
    name = _ns_name(ns)
    argv = ["ip", *(["-n", name] if name else []), *args]
    return _run_sync(argv, check=check)


def ip_json(ns: NsLike, *args: str) -> list[dict[str, Any]]:
    """``ip -j -n NS ARGS...`` parsed (``[]`` for empty output)."""
    name = _ns_name(ns)
    argv = ["ip", "-j", *(["-n", name] if name else []), *args]
    out = _run_sync(argv).stdout.strip()
    return json.loads(out) if out else []


def _kill_all_in(ns: Netns) -> None:
    """SIGKILL every process in ``ns`` and wait (bounded) until none is left."""
    deadline = time.monotonic() + _NS_KILL_WAIT_S
    while True:
        pids = ns.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes %s still alive in %s; deleting it anyway", pids, ns.name)
            return
        time.sleep(0.05)


def _delete(name: str) -> None:
    proc = _run_sync(["ip", "netns", "delete", name], check=False)
    if proc.returncode != 0 and "No such file" not in proc.stderr:
        log.warning("ip netns delete %s failed: %s", name, proc.stderr.strip())


@contextlib.contextmanager
def netns(prefix: str) -> Iterator[Netns]:
    """Create a namespace named ``tnl-<prefix>-<pid>-<n>`` with ``lo`` up.

    On exit, whatever happened, every process still inside is killed and the namespace is
    deleted (which also destroys the veth ends and TUN devices living in it).
    """
    if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
        raise ValueError(f"namespace prefix {prefix!r} must be [A-Za-z0-9_.]+")
    ns = Netns(f"{NAME_PREFIX}{prefix}-{os.getpid()}-{next(_counter)}")
    _run_sync(["ip", "netns", "add", ns.name])
    try:
        ip(ns, "link", "set", "lo", "up")
        yield ns
    finally:
        try:
            _kill_all_in(ns)
        finally:
            _delete(ns.name)


def reap_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone (e.g. SIGKILLed pytest).

    Only names of the form ``tnl-<prefix>-<pid>-<n>`` whose pid no longer exists are touched.
    Returns the names deleted.
    """
    listing = _run_sync(["ip", "netns", "list"], check=False).stdout
    reaped = []
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME_RE.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass  # owner is gone: ours to clean
        except PermissionError:
            continue
        else:
            continue
        _kill_all_in(Netns(name))
        _delete(name)
        reaped.append(name)
    return reaped


@attrs.frozen
class Veth:
    """A veth pair: ``name_a`` lives in ``ns_a``, ``name_b`` in ``ns_b``."""

    ns_a: Netns
    name_a: str
    ns_b: Netns
    name_b: str


def _as_list(addrs: str | Sequence[str] | None) -> list[str]:
    if addrs is None:
        return []
    if isinstance(addrs, str):
        return [addrs]
    return list(addrs)


def _add_addresses(ns: NsLike, dev: str, addrs: Sequence[str]) -> None:
    for cidr in addrs:
        if ":" in cidr:
            # nodad: the address is usable at once instead of "tentative" for a second or two
            ip(ns, "-6", "addr", "add", cidr, "dev", dev, "nodad")
        else:
            ip(ns, "addr", "add", cidr, "dev", dev)


def veth(
    ns_a: Netns,
    ns_b: Netns,
    addr_a: str | Sequence[str] | None,
    addr_b: str | Sequence[str] | None,
    mtu: int = 1500,
    *,
    name_a: str | None = None,
    name_b: str | None = None,
) -> Veth:
    """Join two namespaces with a veth pair, address both ends and bring them up.

    ``addr_a``/``addr_b`` are CIDR strings (``"10.77.0.1/24"``, ``"fd77::1/64"``), a list of
    them, or ``None``/``[]`` for an unaddressed end (e.g. a bridge port). IPv6 addresses are
    added with ``nodad``. Interface names default to ``veth<n>a``/``veth<n>b``.
    """
    n = next(_counter)
    name_a = name_a or f"veth{n}a"
    name_b = name_b or f"veth{n}b"
    ip(ns_a, "link", "add", name_a, "mtu", str(mtu), "type", "veth",
       "peer", "name", name_b, "mtu", str(mtu), "netns", ns_b.name)  # fmt: skip
    _add_addresses(ns_a, name_a, _as_list(addr_a))
    _add_addresses(ns_b, name_b, _as_list(addr_b))
    ip(ns_a, "link", "set", name_a, "up")
    ip(ns_b, "link", "set", name_b, "up")
    return Veth(ns_a, name_a, ns_b, name_b)


def bridge(
    ns: Netns,
    ports: Sequence[str],
    addrs: str | Sequence[str] | None = None,
    *,
    name: str = "br0",
) -> str:
    """Create a bridge ``name`` in ``ns`` (STP off, no forward delay), enslave ``ports``,
    give it ``addrs`` and bring it up. Returns the bridge name."""
    ip(ns, "link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    for port in ports:
        ip(ns, "link", "set", port, "master", name)
    _add_addresses(ns, name, _as_list(addrs))
    ip(ns, "link", "set", name, "up")
    return name


@contextlib.contextmanager
def star(
    hub_prefix: str,
    leaf_prefixes: Sequence[str],
    hub_addrs: str | Sequence[str],
    leaf_addrs: Sequence[str | Sequence[str]],
) -> Iterator[tuple[Netns, list[Netns]]]:
    """A hub namespace whose bridge joins one veth to each leaf namespace: the LAN of a
    server and its clients. ``leaf_addrs[i]`` addresses leaf ``i``; all are removed after."""
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(netns(hub_prefix))
        leaves = [stack.enter_context(netns(prefix)) for prefix in leaf_prefixes]
        pairs = zip(leaves, leaf_addrs, strict=True)
        ports = [veth(hub, leaf, None, addrs).name_a for leaf, addrs in pairs]
        bridge(hub, ports, hub_addrs)
        yield hub, leaves


# ---------------------------------------------------------------------------------------------
# processes


async def run(
    ns: NsLike,
    argv: Sequence[str],
    *,
    check: bool = True,
    # a per-command bound is the point of this wrapper (a hung `ping` must not stall a test)
    timeout: float = 30,  # noqa: ASYNC109
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` inside ``ns`` (``None``: here), capturing stdout and stderr.

    Raises :class:`CommandFailed` (with the output in its message) on a non-zero exit when
    ``check``; ``trio.TooSlowError`` after ``timeout`` seconds (the process is killed).
    """
    cmd = exec_argv(ns, argv)
    log.debug("run %s", " ".join(cmd))
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            cmd,
            stdin=stdin if stdin is not None else b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


@attrs.define(eq=False)
class Daemon:
    """A process started by :func:`start_daemon`.

    ``stderr_lines`` and ``stdout_lines`` fill up as the process writes (decoded, without
    newlines); ``log`` is the stderr text.
    """

    name: str
    process: trio.Process
    stderr_lines: list[str] = attrs.field(factory=list)
    stdout_lines: list[str] = attrs.field(factory=list)
    _exited: trio.Event = attrs.field(factory=trio.Event)
    _output_done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        """The daemon's pid (``ip netns exec`` execs it, so it is the daemon itself)."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or ``None`` while it runs (negative: killed by that signal)."""
        return self.process.returncode

    @property
    def log(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return "\n".join(self.stderr_lines)

    @property
    def stdout(self) -> str:
        """Everything the daemon wrote to stdout so far."""
        return "\n".join(self.stdout_lines)

    def terminate(self) -> None:
        """Send SIGTERM (no-op once it has exited)."""
        if self.process.returncode is None:
            log.debug("[%s] SIGTERM", self.name)
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL (no-op once it has exited)."""
        if self.process.returncode is None:
            log.debug("[%s] SIGKILL", self.name)
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait for the process to exit and its output to be collected; return the code."""
        await self._exited.wait()
        # the pipes hit EOF right after exit, unless a grandchild still holds them
        with trio.move_on_after(1):
            await self._output_done.wait()
        code = self.process.returncode
        assert code is not None
        return code

    def describe(self) -> str:
        """A report for failure messages: name, pid, exit code and the captured output."""
        out = f"\n--- {self.name} stdout ---\n{self.stdout}" if self.stdout_lines else ""
        return (
            f"{self.name} (pid {self.pid}, returncode {self.returncode})\n"
            f"--- {self.name} stderr ---\n{self.log}{out}"
        )

    async def _pump(self, stream: trio.abc.ReceiveStream, lines: list[str], tag: str) -> None:
        buf = b""
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                self._add_line(raw, lines, tag)
        if buf:
            self._add_line(buf, lines, tag)

    def _add_line(self, raw: bytes, lines: list[str], tag: str) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        lines.append(line)
        log.debug("[%s%s] %s", self.name, tag, line)

    async def _collect_output(self) -> None:
        assert self.process.stdout is not None and self.process.stderr is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, self.process.stdout, self.stdout_lines, ":out")
                nursery.start_soon(self._pump, self.process.stderr, self.stderr_lines, "")
        finally:
            self._output_done.set()

    async def _reap(self) -> None:
        await self.process.wait()
        log.debug("[%s] exited with %s", self.name, self.process.returncode)
        self._exited.set()

    async def _stop(self) -> None:
        """SIGTERM, then SIGKILL after KILL_AFTER_S; returns once the process is reaped."""
        if self.process.returncode is not None:
            return
        self.terminate()
        with trio.move_on_after(KILL_AFTER_S):
            await self.process.wait()
            return
        log.warning("[%s] still running %.0f s after SIGTERM: SIGKILL", self.name, KILL_AFTER_S)
        self.kill()
        await self.process.wait()


async def _wait_ready(ready: trio.lowlevel.FdStream) -> bool:
    """True once a newline arrives; False on EOF (the writer exited or closed the fd)."""
    while True:
        try:
            chunk = await ready.receive_some(4096)
        except trio.BrokenResourceError:
            return False
        if not chunk:
            return False
        if b"\n" in chunk:
            return True


async def _supervise(
    ns: NsLike,
    argv: Sequence[str],
    name: str,
    ready_timeout: float,
    *,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    read_fd, write_fd = os.pipe()
    try:
        cmd = exec_argv(ns, [*argv, "--ready-fd", str(write_fd)])
        log.debug("[%s] start %s", name, " ".join(cmd))
        process = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        # the child has its copy; ours must go, or EOF would never come
        os.close(write_fd)
    daemon = Daemon(name=name, process=process)
    failure: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon._collect_output)
            nursery.start_soon(daemon._reap)
            ok = False
            async with trio.lowlevel.FdStream(read_fd) as ready_stream:
                with trio.move_on_after(ready_timeout) as ready_scope:
                    ok = await _wait_ready(ready_stream)
            if ok:
                log.debug("[%s] ready (pid %d)", name, daemon.pid)
                task_status.started(daemon)
                await daemon.wait()
            else:
                if ready_scope.cancelled_caught:
                    failure = f"was not ready after {ready_timeout:g} s"
                else:
                    # EOF on the ready pipe: normally because the process is exiting
                    with trio.move_on_after(KILL_AFTER_S):
                        await daemon.wait()
                    if daemon.returncode is not None:
                        failure = f"exited with {daemon.returncode} before becoming ready"
                    else:
                        failure = "closed its ready fd without signalling readiness"
                with trio.move_on_after(KILL_AFTER_S + 2):
                    await daemon._stop()
                    await daemon.wait()  # and its last words
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(KILL_AFTER_S + 2, shield=True):
            await daemon._stop()
        if daemon.returncode is None:
            log.error("[%s] pid %d could not be reaped", name, daemon.pid)
    if failure is not None:
        # raised outside the nursery so the caller of start() sees DaemonError itself
        raise DaemonError(f"daemon {failure}: {daemon.describe()}")


async def start_daemon(
    nursery: trio.Nursery,
    ns: NsLike,
    argv: Sequence[str],
    *,
    name: str,
    ready_timeout: float = 15,
) -> Daemon:
    """Start ``argv + ["--ready-fd", N]`` inside ``ns`` as a task of ``nursery``; return once
    the process wrote a newline to fd N.

    Raises :class:`DaemonError` (with the captured output) if it exits, closes the fd, or is
    not ready within ``ready_timeout`` seconds. When ``nursery`` is cancelled, a daemon still
    running gets SIGTERM, then SIGKILL after :data:`KILL_AFTER_S` seconds.
    """
    return await nursery.start(_supervise, ns, list(argv), name, ready_timeout)


@contextlib.asynccontextmanager
async def open_daemon_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for :func:`start_daemon` that is cancelled when the block ends, so the
    daemons still running are stopped (SIGTERM, then SIGKILL) instead of waited for."""
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        finally:
            nursery.cancel_scope.cancel()


async def poll_until(predicate: Any, what: str, within: float, every: float = 0.1) -> None:
    """Poll the async ``predicate`` until it is true, or fail after ``within`` seconds naming
    ``what``. Polling because the state lives in another process: no event to wait on."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(every)
        return
    raise AssertionError(f"timed out after {within} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def tunnel_cli(*args: str) -> list[str]:
    """argv of the ``tunnel`` command line, run by this interpreter (``python -m tunnel``)."""
    return [sys.executable, "-m", "tunnel", *args]


async def cli_status(socket_path: os.PathLike[str] | str) -> dict[str, Any]:
    """What ``tunnel status --json --socket PATH`` prints, parsed: the operator's view."""
    proc = await run(None, tunnel_cli("status", "--json", "--socket", str(socket_path)))
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


async def tcp_transfer(
    nursery: trio.Nursery,
    *,
    receiver: NsLike,
    sender: NsLike,
    listen: str,
    to: str,
    nbytes: int,
    seed: str,
    allowed: float = 90,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``nbytes`` of TCP with :mod:`tests.support.transfer`: a receiver listening on ``listen``
    in one namespace, a sender to ``to`` in another. Returns the receiver's and the sender's
    reports (``bytes``, ``sha256``, ``seconds``) for the caller to compare. ``allowed`` is what
    the two tools are told they may take (they stop themselves), not a deadline for this call."""
    serving = await start_daemon(
        nursery,
        receiver,
        tool_argv("transfer", "serve", "--listen", listen, "--timeout", str(allowed + 5)),
        name="recv",
    )  # fmt: skip
    sent = await run(
        sender,
        tool_argv("transfer", "send", "--to", to,
                  "--bytes", str(nbytes), "--seed", seed, "--timeout", str(allowed)),
        timeout=allowed + 10,
    )  # fmt: skip
    assert await serving.wait() == 0, serving.describe()
    got: dict[str, Any] = json.loads(serving.stdout_lines[-1])
    want: dict[str, Any] = json.loads(sent.stdout.decode().strip().splitlines()[-1])
    return got, want
