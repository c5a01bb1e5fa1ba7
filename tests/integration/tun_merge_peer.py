"""test_tun_merge.py's far end, run inside a namespace: a TCP peer played through a real TUN.

Opens a :class:`tunnel.daemon.tun.TunDevice`, listens on its address, connects to the listener
from a made-up peer by writing the peer's SYN and ACK into the device, then queues ``--count``
data segments in sequence and flushes them (merged into one write where the kernel takes
that). Prints JSON: how many packets went inside another's write, whether the listener read
exactly the data sent, and the highest acknowledgement the kernel sent back. ``--ip 6`` does
the same over IPv6.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.tcpseg import ACK, PSH, SYN, tcp_packet  # noqa: E402
from tunnel.daemon.tun import TunDevice  # noqa: E402

ADDRESSES = {4: ("10.231.0.1", "10.231.0.2", 24), 6: ("fd31::1", "fd31::2", 64)}
PORT, PEER_PORT = 5555, 40000
SEGMENT = 1000


def _from_listener(tun: TunDevice, local: bytes, deadline: float) -> bytes:
    """The TCP header and payload of the next segment the kernel sends from the listener."""
    while time.monotonic() < deadline:
        select.select([tun.fd], [], [], max(0.0, deadline - time.monotonic()))
        for packet in tun.read_batch():
            if len(packet) >= 40 and packet[0] >> 4 == 4 and packet[9] == 6:
                source, tcp = packet[12:16], packet[20:]
            elif len(packet) >= 60 and packet[0] >> 4 == 6 and packet[6] == 6:
                source, tcp = packet[8:24], packet[40:]
            else:
                continue  # router solicitations and the like
            if source == local and int.from_bytes(tcp[0:2], "big") == PORT:
                return tcp
    raise TimeoutError("the kernel sent nothing from the listener")


def exchange(tun: TunDevice, count: int, version: int) -> dict[str, object]:
    """Connect to a listener on the device's address, send ``count`` segments as one run."""
    deadline = time.monotonic() + 10
    local, remote, prefix = ADDRESSES[version]
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    subprocess.run(["ip", "addr", "add", f"{local}/{prefix}", "dev", tun.name,
                    *(["nodad"] if version == 6 else [])], check=True)  # fmt: skip
    subprocess.run(["ip", "link", "set", tun.name, "up"], check=True)
    listener = socket.create_server((local, PORT), family=family)
    local_packed = socket.inet_pton(family, local)
    peer = dict(src=socket.inet_pton(family, remote), dst=local_packed, sport=PEER_PORT,
                dport=PORT, options=b"", window=65535, v6=version == 6)  # fmt: skip
    seq = 1000
    tun.write(tcp_packet(b"", seq=seq, ack=0, flags=SYN, **peer))
    syn_ack = _from_listener(tun, local_packed, deadline)
    their_seq = int.from_bytes(syn_ack[4:8], "big")
    seq += 1
    tun.write(tcp_packet(b"", seq=seq, ack=their_seq + 1, **peer))
    listener.settimeout(5)
    conn, _ = listener.accept()
    data = (bytes(range(256)) * (count * SEGMENT // 256 + 1))[: count * SEGMENT]
    for i in range(count):
        flags = ACK | (PSH if i == count - 1 else 0)
        piece = data[i * SEGMENT : (i + 1) * SEGMENT]
        tun.queue(tcp_packet(piece, seq=seq + i * SEGMENT, ack=their_seq + 1, flags=flags,
                             ip_id=100 + i, **peer))  # fmt: skip
    tun.flush()
    conn.settimeout(5)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    acked = 0
    while acked < seq + len(data):
        reply = _from_listener(tun, local_packed, deadline)
        acked = max(acked, int.from_bytes(reply[8:12], "big"))
    conn.close()
    listener.close()
    return {
        "merged": tun.merged,
        "writes": tun.writes,
        "drops": tun.write_drops,
        "data_ok": got == data,
        "acked": acked - seq,
        "sent": len(data),
    }


async def main() -> None:
    # A TunDevice closes through trio (it wakes any task waiting on it): trio owns it here,
    # the exchange itself blocks plainly, as nothing else runs in this process.
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--ip", type=int, choices=(4, 6), default=4)
    args = parser.parse_args()
    with TunDevice("tnmerge%d") as tun:
        result = exchange(tun, args.count, args.ip)
    print(json.dumps(result))


if __name__ == "__main__":
    trio.run(main)
