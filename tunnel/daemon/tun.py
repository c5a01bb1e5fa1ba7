"""TUN devices: a non-blocking file descriptor that reads and writes raw IP packets.

A device opened this way (not persistent) vanishes, with every address and route on it, when its
fd is closed, so closing the fd is the last word of cleanup whatever the exit path.

Opened with a virtio-net header (``IFF_VNET_HDR``) where the kernel allows it: every read and
write then carries 10 bytes before the packet, and a write may hand the kernel a run of TCP
segments as one packet (:mod:`tunnel.core.coalesce`), which its TCP receive path takes in one
go. Packets from the tunnel are queued (:meth:`TunDevice.queue`) and written when the batch
they came in is over (:meth:`TunDevice.flush`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

import trio

from tunnel.core.coalesce import PLAIN, VNET_HEADER_LEN, coalesce, segment, segment_count
from tunnel.core.readahead import ReadAhead
from tunnel.errors import SystemSetupError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_IFREQ = "16sH"
# Merged writes refused in a row before writing one packet per write for good.
MERGE_REFUSALS_TOLERATED = 8
# Larger than any MTU we configure; a read never returns more than one packet.
READ_SIZE = 65536


class TunDevice:
    """An open TUN device. Owns its fd: ``close()`` (or the context manager) removes the device."""

    def __init__(self, name: str = "tunnel%d", *, merge: bool = True) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SystemSetupError(f"cannot open /dev/net/tun: {exc.strerror}") from exc
        flags = IFF_TUN | IFF_NO_PI
        try:
            try:
                ifr = fcntl.ioctl(
                    fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags | IFF_VNET_HDR * merge)
                )
            except OSError as exc:
                if not merge or exc.errno != errno.EINVAL:
                    raise
                merge = False  # a kernel without virtio-net headers on TUN: plain packets
                ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise SystemSetupError(f"tun_name: device {name!r} is already in use") from exc
            raise SystemSetupError(
                f"tun_name: cannot create TUN device {name!r}: {exc.strerror}"
            ) from exc
        self.fd: int = fd
        self.name: str = ifr[:16].rstrip(b"\0").decode()
        # Whether reads and writes carry a virtio-net header, and runs of segments are merged.
        self.vnet_header: bool = merge
        self.merging: bool = merge
        self.write_drops = 0
        self.writes = 0  # packets handed to the kernel
        self.merged = 0  # of those, packets that went inside another's write
        self.merge_refusals = 0  # merged writes the kernel refused in a row
        self.read_ahead = ReadAhead()
        self._queued: list[bytes] = []

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
        if self.vnet_header:
            packets = self._strip_headers(packets)
        return packets

    @staticmethod
    def _strip_headers(raw: list[bytes]) -> list[bytes]:
        packets = []
        for data in raw:
            if data[0] or data[1]:
                # A checksum to complete or segments to cut: the kernel does not ask for either
                # without offloads turned on (TUNSETOFFLOAD), but if it does, do its part.
                try:
                    packets.extend(segment(data[:VNET_HEADER_LEN], data[VNET_HEADER_LEN:]))
                except ValueError:
                    continue
            else:
                packets.append(data[VNET_HEADER_LEN:])
        return packets

    def write(self, packet: bytes) -> None:
        """Hand one packet to the kernel now; drop (and count) if the kernel refuses it."""
        try:
            os.write(self.fd, PLAIN + packet if self.vnet_header else packet)
            self.writes += 1
        except (BlockingIOError, OSError):
            # EAGAIN: queue full; EINVAL: the kernel refused a malformed packet. Either way the
            # packet is gone, like on a congested link, and it is counted.
            self.write_drops += 1

    def queue(self, packet: bytes) -> None:
        """Hand one packet to the kernel at the next :meth:`flush` (at once when runs are not
        merged). For the packets of a batch of datagrams: whoever queues flushes."""
        if self.merging:
            self._queued.append(packet)
        else:
            self.write(packet)

    def flush(self) -> None:
        """Write what was queued, each run of TCP segments of a flow as one packet."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        if len(queued) == 1:
            self.write(queued[0])
            return
        writev = os.writev
        fd = self.fd
        for header, packet in coalesce(queued):
            if header is PLAIN:
                self.write(packet)  # type: ignore[arg-type]
                continue
            count = segment_count(header, packet)
            try:
                writev(fd, (header, packet))
                self.writes += count
                self.merged += count - 1
                self.merge_refusals = 0
            except BlockingIOError:
                self.write_drops += count
            except OSError:
                # Refused: the segments one by one instead. A kernel that refuses every merged
                # packet gets plain ones from then on; one odd run (a peer's odd segments)
                # does not turn merging off for everyone.
                self.merge_refusals += 1
                if self.merge_refusals >= MERGE_REFUSALS_TOLERATED:
                    self.merging = False
                for piece in segment(header, packet):
                    self.write(piece)
