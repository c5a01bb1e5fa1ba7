"""TUN devices: a non-blocking file descriptor that reads and writes raw IP packets.

A device opened this way (not persistent) vanishes, with every address and route on it, when its
fd is closed, so closing the fd is the last word of cleanup whatever the exit path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

import trio

from tunnel.core.readahead import ReadAhead
from tunnel.errors import SystemSetupError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
_IFREQ = "16sH"
# Larger than any MTU we configure; a read never returns more than one packet.
READ_SIZE = 65536


class TunDevice:
    """An open TUN device. Owns its fd: ``close()`` (or the context manager) removes the device."""

    def __init__(self, name: str = "tunnel%d") -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SystemSetupError(f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            ifr = fcntl.ioctl(
                fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), IFF_TUN | IFF_NO_PI)
            )
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise SystemSetupError(f"tun_name: device {name!r} is already in use") from exc
            raise SystemSetupError(
                f"tun_name: cannot create TUN device {name!r}: {exc.strerror}"
            ) from exc
        self.fd: int = fd
        self.name: str = ifr[:16].rstrip(b"\0").decode()
        self.write_drops = 0
        self.writes = 0  # packets handed to the kernel
        self.read_ahead = ReadAhead()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the fd (which deletes the device). Wakes any task waiting on it first."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def wait_readable(self) -> None:
        if self.fd < 0:
            raise trio.ClosedResourceError("TUN device is closed")
        await trio.lowlevel.wait_readable(self.fd)

    def read_batch(self, limit: int = 64) -> list[bytes]:
        """Read up to ``limit`` packets without blocking (an empty list when none is waiting).
        After a quiet spell only the first: see :mod:`tunnel.core.readahead`."""
        packets = []
        read = os.read
        fd = self.fd
        try:
            packets.append(read(fd, READ_SIZE))
            if self.read_ahead.should_drain(time.monotonic()):
                for _ in range(limit - 1):
                    packets.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        except OSError as exc:
            # EBADF after close, EIO while the device is going down: nothing more to read.
            if exc.errno not in (errno.EBADF, errno.EIO):
                raise
        self.read_ahead.last_count = len(packets)
        return packets

    def write(self, packet: bytes) -> None:
        """Hand one packet to the kernel; drop (and count) if the kernel queue is full."""
        try:
            os.write(self.fd, packet)
            self.writes += 1
        except (BlockingIOError, OSError):
            # EAGAIN: queue full; EINVAL: the kernel refused a malformed packet. Either way the
            # packet is gone, like on a congested link, and it is counted.
            self.write_drops += 1
