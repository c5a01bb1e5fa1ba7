"""Reassembly of IP fragments: bounded, time-limited, strict (sans-IO).

Used by the NAT64 translator, which must see a whole datagram: the ports it maps are only in
the first fragment, and the checksums it adjusts cover all of them. Fragments of one datagram
(same key: addresses, identification, and for IPv4 the protocol) are collected until the last
fragment has arrived and every byte before it is covered.

Strict, as RFC 5722 asks of IPv6 and Linux does for both families: a fragment that overlaps
another of its datagram, that does not fit in 65535 bytes, that is not a multiple of 8 bytes
long without being the last, or that contradicts the datagram's end, discards the whole
datagram. An exact duplicate (a fragment delivered twice) is ignored.

Bounded: at most ``max_datagrams`` incomplete datagrams, ``max_per_source`` of them from one
sender, ``max_fragments`` fragments in one (which also bounds the overlap check) and
``max_bytes`` of buffered payload; fragments beyond these are refused (the datagrams already
collecting keep their room, so a flood of new fragments cannot evict them, and one sender
cannot take all the room). An incomplete datagram is forgotten ``timeout`` seconds after its
first fragment arrived.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable

import attrs

__all__ = ["Added", "Reassembly", "Whole"]

MAX_PAYLOAD = 0xFFFF


class Added(enum.Enum):
    """What :meth:`Reassembly.add` did with a fragment that did not complete a datagram."""

    QUEUED = "queued"  # kept, waiting for the rest
    DUPLICATE = "duplicate"  # the same fragment again: ignored
    REFUSED = "refused"  # no room (a limit reached): dropped
    DISCARDED = "discarded"  # invalid: the fragment and its whole datagram dropped


@attrs.frozen
class Whole:
    """A reassembled datagram: the first fragment's ``header`` (as the caller gave it) and the
    ``payload`` of all fragments in order."""

    header: bytes
    payload: bytes


@attrs.define
class _Datagram:
    started: float
    source: Hashable
    pieces: dict[int, bytes] = attrs.field(factory=dict)  # offset -> data
    size: int = 0  # payload bytes held
    end: int | None = None  # payload length, once the last fragment is known
    header: bytes | None = None  # from the fragment at offset 0


class Reassembly:
    """Incomplete datagrams, keyed by whatever identifies a datagram for the caller."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_datagrams: int = 256,
        max_per_source: int = 64,
        max_fragments: int = 128,
        max_bytes: int = 4 << 20,
    ) -> None:
        self.timeout = timeout
        self.max_datagrams = max_datagrams
        self.max_per_source = max_per_source
        self.max_fragments = max_fragments
        self.max_bytes = max_bytes
        self._datagrams: OrderedDict[Hashable, _Datagram] = OrderedDict()  # oldest first
        self._bytes = 0
        self._per_source: dict[Hashable, int] = {}
        self.expired = 0  # datagrams forgotten incomplete
        self.completed = 0  # datagrams made whole

    def __len__(self) -> int:
        return len(self._datagrams)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def add(
        self,
        key: Hashable,
        offset: int,
        more: bool,
        data: bytes,
        header: bytes,
        now: float,
        source: Hashable = None,
    ) -> Whole | Added:
        """Take one fragment: ``offset`` in bytes into the datagram's payload, ``more`` false
        for the last fragment, ``header`` the packet's own header (kept from the fragment at
        offset 0), ``source`` who sent it (for the per-sender limit). Returns the datagram
        once it is whole."""
        self.expire(now)
        end = offset + len(data)
        if offset < 0 or end > MAX_PAYLOAD or (more and (not data or len(data) % 8)):
            return self._discard(key)
        datagram = self._datagrams.get(key)
        if datagram is None:
            if (
                len(self._datagrams) >= self.max_datagrams
                or self._per_source.get(source, 0) >= self.max_per_source
            ):
                return Added.REFUSED
            datagram = _Datagram(started=now, source=source)
        if datagram.pieces.get(offset) == data:
            return Added.DUPLICATE
        if self._bytes + len(data) > self.max_bytes or len(datagram.pieces) >= self.max_fragments:
            return Added.REFUSED
        if not more:
            if datagram.end is not None and datagram.end != end:
                return self._discard(key)
            if any(at + len(piece) > end for at, piece in datagram.pieces.items()):
                return self._discard(key)
            datagram.end = end
        if (datagram.end is not None and end > datagram.end) or _overlaps(datagram, offset, end):
            return self._discard(key)
        datagram.pieces[offset] = data
        datagram.size += len(data)
        self._bytes += len(data)
        if offset == 0:
            datagram.header = header
        if key not in self._datagrams:
            self._datagrams[key] = datagram
            self._per_source[datagram.source] = self._per_source.get(datagram.source, 0) + 1
        if datagram.size != datagram.end or datagram.header is None:
            return Added.QUEUED
        # No overlaps and as many bytes as the end: every byte is covered exactly once.
        self._forget(key)
        payload = b"".join(datagram.pieces[at] for at in sorted(datagram.pieces))
        self.completed += 1
        return Whole(datagram.header, payload)

    def expire(self, now: float) -> int:
        """Forget every datagram whose first fragment came ``timeout`` or more ago."""
        count = 0
        datagrams = self._datagrams
        while datagrams:
            key, datagram = next(iter(datagrams.items()))
            if now - datagram.started < self.timeout:
                break
            self._forget(key)
            count += 1
        self.expired += count
        return count

    def next_expiry(self) -> float | None:
        """When the oldest incomplete datagram is forgotten, if there is one."""
        for datagram in self._datagrams.values():
            return datagram.started + self.timeout
        return None

    def _discard(self, key: Hashable) -> Added:
        if key in self._datagrams:
            self._forget(key)
        return Added.DISCARDED

    def _forget(self, key: Hashable) -> None:
        datagram = self._datagrams.pop(key)
        self._bytes -= datagram.size
        left = self._per_source[datagram.source] - 1
        if left:
            self._per_source[datagram.source] = left
        else:
            del self._per_source[datagram.source]


def _overlaps(datagram: _Datagram, start: int, end: int) -> bool:
    return any(start < at + len(piece) and at < end for at, piece in datagram.pieces.items())
