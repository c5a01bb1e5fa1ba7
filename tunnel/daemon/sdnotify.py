"""The sd_notify protocol, spoken to ``$NOTIFY_SOCKET`` without libsystemd.

Under ``Type=notify`` systemd learns from us what it cannot see from outside: when the daemon
is really ready (``READY=1``), that a SIGHUP reload is under way (``RELOADING=1``) or a stop
(``STOPPING=1``), a one-line ``STATUS=`` for ``systemctl status``, and that the event loop
still turns (``WATCHDOG=1``). The protocol is one datagram of newline-separated
``KEY=VALUE`` lines to an AF_UNIX SOCK_DGRAM socket (abstract when the path starts with
``@``); a dependency on libsystemd for that is not worth it.

Notifying is a courtesy to the supervisor, never a reason to fail: no send raises into the
daemon. A socket that went away (systemd re-executed, a test's listener closed) is logged once
at debug level and tried again on the next message. Sends do not block either: a full queue
on systemd's side drops that one message, which the next status or ping supersedes.

The watchdog ping is a trio task on purpose, not a thread: it proves that the event loop runs.
If the loop stalls, the pings stop and systemd kills and restarts us, which is the point.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("tunnel.sdnotify")

STATUS_MAX = 256  # bytes of STATUS text: one line for `systemctl status`, not a log
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")  # newlines would start another KEY=VALUE line
# The peer is gone (ECONNREFUSED: nobody bound at the name any more; ENOENT: the path itself
# went): a fresh socket may reach whoever binds the name now.
_RECONNECT = frozenset({errno.ECONNREFUSED, errno.ENOENT})


def _one_line(text: str) -> str:
    """``text`` as one STATUS line of at most :data:`STATUS_MAX` bytes, cut at a character."""
    flat = _CONTROL.sub(" ", text).strip()
    encoded = flat.encode("utf-8", "replace")
    if len(encoded) <= STATUS_MAX:
        return flat
    return encoded[: STATUS_MAX - 3].decode("utf-8", "ignore") + "..."


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when the watchdog is meant for this process (WATCHDOG_PID unset or
    ours, as sd_watchdog_enabled() decides), else None."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


class Notifier:
    """Tells systemd about the daemon's life over ``$NOTIFY_SOCKET``: ready, reloading,
    stopping, a status line, and watchdog pings.

    Built with :meth:`from_environment`; without ``NOTIFY_SOCKET`` (not under systemd, or
    not ``Type=notify``) every method is a no-op, so the daemons call them unconditionally.
    One socket, connected on the first message and kept open; never raises from a send.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """``address``: the value of ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
        socket), None to disable; ``watchdog_usec``: WATCHDOG_USEC, None for no watchdog."""
        self._target = address
        self._address = None if address is None else _socket_address(address)
        self._watchdog_usec = watchdog_usec if self._address is not None else None
        self._sock: socket.socket | None = None
        self._last_status: str | None = None
        self._failing = False  # logged the current run of failures already

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd's environment asks for: ``NOTIFY_SOCKET``, and the watchdog
        from ``WATCHDOG_USEC`` if ``WATCHDOG_PID`` is unset or this process."""
        target = environ.get("NOTIFY_SOCKET") or None
        if target is not None and not target.startswith(("/", "@")):
            # systemd 253+ may hand out vsock: addresses, for VMs; not a case for a VPN daemon.
            log.warning("NOTIFY_SOCKET=%s: not a Unix socket path; not notifying", target)
            target = None
        return cls(target, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Is there a socket to notify (NOTIFY_SOCKET was set)?"""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of WATCHDOG_USEC, as systemd advises, so one
        late ping is not yet a kill; None when there is no watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """The daemon does its job now (also: a reload is over). ``READY=1``, with
        ``STATUS=`` when ``status`` is given."""
        self._send_with_status("READY=1", status)

    def reloading(self) -> None:
        """A reload begins; :meth:`ready` ends it. MONOTONIC_USEC is what systemd 253's
        ``Type=notify-reload`` insists on, to tell this reload from an earlier one; 252
        ignores it."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """The daemon is shutting down (its cleanup may take a moment)."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """The one line ``systemctl status`` shows; sent only when it changed, so callers
        may report their state as often as they like."""
        line = _one_line(text)
        if line != self._last_status:
            self._send_with_status(None, line)

    async def run_watchdog(self) -> None:
        """Ping the watchdog every :attr:`watchdog_interval` until cancelled; returns at once
        when there is no watchdog. Run it in the daemon's main nursery."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self._send("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        """Close the socket (a later message opens it again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_with_status(self, first: str | None, status: str | None) -> None:
        lines = [] if first is None else [first]
        line = None if status is None else _one_line(status)
        if line is not None:
            lines.append(f"STATUS={line}")
        if self._send("\n".join(lines)) and line is not None:
            # Remembered only once delivered: after a failure the same text goes out again.
            self._last_status = line

    def _send(self, message: str) -> bool:
        """One datagram; True if it was sent. Never raises."""
        if self._address is None:
            return False
        data = message.encode("utf-8")
        try:
            try:
                self._connected().send(data, socket.MSG_DONTWAIT)
            except OSError as exc:
                if exc.errno not in _RECONNECT:
                    raise
                self.close()
                self._connected().send(data, socket.MSG_DONTWAIT)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:  # EAGAIN: systemd's queue is full, the socket fine
                self.close()  # a new socket for the next message, whatever broke this one
            if not self._failing:
                self._failing = True
                log.debug("NOTIFY_SOCKET %s: %s (not notifying systemd)", self._target, exc)
            return False
        if self._failing:
            self._failing = False
            log.debug("NOTIFY_SOCKET %s: reachable again", self._target)
        return True

    def _connected(self) -> socket.socket:
        if self._sock is None:
            assert self._address is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self._address)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock


def _socket_address(target: str) -> str:
    """NOTIFY_SOCKET as an AF_UNIX address: ``@name`` is the abstract ``\\0name``."""
    return "\0" + target[1:] if target.startswith("@") else target
