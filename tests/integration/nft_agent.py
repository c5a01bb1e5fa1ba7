"""The inside of tests/integration/test_nft_rules.py: run inside a namespace, it does there what
the test asks, one JSON request per line on stdin, one JSON answer per line on stdout.

    ip netns exec NS python tests/integration/nft_agent.py

libnftables, sysctls and sockets all act on the network namespace of the calling process, so
the test cannot do these things itself; and a process that holds the objects (a
:class:`~tunnel.daemon.nft.Masquerade`, a TCP connection) across requests can also be
SIGKILLed like a daemon, leaving behind what a killed daemon leaves.

Requests are ``{"op": NAME, ...}``; answers are the op's result, or ``{"error": TEXT}`` when it
raised. Plain blocking sockets with timeouts: every op is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time
import traceback
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from tunnel.core import nftrules
from tunnel.daemon.nft import KillSwitch, Masquerade, Nftables
from tunnel.daemon.statefile import StateFile
from tunnel.daemon.tun import IFF_NO_PI, IFF_TUN, TUNSETIFF


class Agent:
    def __init__(self) -> None:
        self.nft = Nftables()
        self.masquerade: Masquerade | None = None
        self.udp: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.held: socket.socket | None = None
        self.tuns: dict[str, int] = {}

    # --- nftables ---------------------------------------------------------------------------

    def op_engage(self, tun: str, mark: int) -> dict[str, Any]:
        KillSwitch(self.nft, tun_name=tun, fwmark=mark).engage()
        return {}

    def op_release(self, tun: str, mark: int) -> dict[str, Any]:
        KillSwitch(self.nft, tun_name=tun, fwmark=mark).release()
        return {}

    def op_cleanup(self, tun: str) -> dict[str, Any]:
        return {"removed": KillSwitch.cleanup(self.nft, tun)}

    def op_engage_broken(self, tun: str, mark: int) -> dict[str, Any]:
        """The kill switch followed by a rule the kernel refuses, in the same transaction."""
        table = nftrules.table_name(nftrules.KILL_SWITCH, tun)
        document = nftrules.kill_switch(table, tun_name=tun, fwmark=mark)
        document["nftables"].append(
            {"add": {"rule": {"family": "inet", "table": table, "chain": "no_such_chain",
                              "expr": [{"accept": None}]}}}
        )  # fmt: skip
        self.nft.apply(document)
        return {}

    def op_track_connections(self) -> dict[str, Any]:
        """Make conntrack follow connections from now on, as any stateful firewall on the host
        does (otherwise it starts when the kill switch does, and sees old connections mid-
        stream as new ones). A chain of its own that only counts: no verdict, no effect."""
        table = {"family": "inet", "name": "test_conntrack"}
        self.nft.apply({"nftables": [
            {"add": {"table": table}},
            {"add": {"chain": {"family": "inet", "table": "test_conntrack", "name": "output",
                               "type": "filter", "hook": "output", "prio": -10,
                               "policy": "accept"}}},
            {"add": {"rule": {"family": "inet", "table": "test_conntrack", "chain": "output",
                              "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                                  "right": ["established", "new"]}},
                                       {"counter": None}]}}},
        ]})  # fmt: skip
        return {}

    def op_tables(self) -> dict[str, Any]:
        rc, output, error = self.nft._context.json_cmd({"nftables": [{"list": {"tables": None}}]})
        assert rc == 0, error
        found = [item["table"] for item in output["nftables"] if "table" in item]
        return {"tables": [[t["family"], t["name"]] for t in found]}

    def op_ruleset(self) -> dict[str, Any]:
        return {"text": self.nft.ruleset_text()}

    def op_masq_start(self, tun: str, pools: list[str], state: str) -> dict[str, Any]:
        self.masquerade = Masquerade(
            self.nft,
            tun_name=tun,
            pools=[IPv4Network(pool) for pool in pools],
            state=StateFile(Path(state)),
        )
        self.masquerade.start()
        return {}

    def op_masq_stop(self) -> dict[str, Any]:
        assert self.masquerade is not None
        self.masquerade.stop()
        return {}

    def op_masq_recover(self, tun: str, state: str) -> dict[str, Any]:
        return {"recovered": Masquerade.recover(self.nft, tun, StateFile(Path(state)))}

    def op_ip_forward(self) -> dict[str, Any]:
        return {"value": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}

    # --- traffic ----------------------------------------------------------------------------

    def op_tun_open(self, name: str) -> dict[str, Any]:
        """A TUN device, as the client makes it; it goes when closed (or the agent dies)."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        self.tuns[name] = fd
        return {}

    def op_tun_close(self, name: str) -> dict[str, Any]:
        os.close(self.tuns.pop(name))
        return {}

    def op_tun_wait(self, name: str, dst: str, timeout: float) -> dict[str, Any]:
        """Whether an IPv4 packet to ``dst`` comes out of the TUN within ``timeout``."""
        fd = self.tuns[name]
        wanted = socket.inet_aton(dst)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                break
            packet = os.read(fd, 65536)  # one packet (IPv6 chatter of a new device, or ours)
            if packet[:1] == b"\x45" and packet[16:20] == wanted:
                return {"arrived": True}
        return {"arrived": False}

    def op_udp_send(self, to: str, port: int, data: str, mark: int | None = None) -> dict[str, Any]:
        family = socket.AF_INET6 if ":" in to else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            try:
                sock.sendto(data.encode(), (to, port))
            except OSError as exc:
                return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
        return {"errno": None}

    def op_udp_bind(self, port: int) -> dict[str, Any]:
        self.udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.udp.bind(("::", port))
        return {}

    def op_udp_wait(self, until: str, timeout: float) -> dict[str, Any]:
        """Everything received until a datagram saying ``until`` (or the timeout)."""
        assert self.udp is not None
        got: list[list[str]] = []
        deadline = time.monotonic() + timeout
        while not any(data == until for data, _ in got):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.udp.settimeout(left)
            try:
                data, source = self.udp.recvfrom(2048)
            except TimeoutError:
                break
            host = source[0].removeprefix("::ffff:")
            got.append([data.decode(errors="replace"), host])
        return {"received": got}

    def op_tcp_listen(self, port: int) -> dict[str, Any]:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", port))
        self.listener.listen(8)  # the kernel completes handshakes without accept()
        return {}

    def op_tcp_connect(self, to: str, port: int, timeout: float, hold: bool = False) -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        started = time.monotonic()
        try:
            sock.connect((to, port))
        except TimeoutError:
            sock.close()
            return {"errno": "timeout", "seconds": time.monotonic() - started}
        except OSError as exc:
            sock.close()
            return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    "seconds": time.monotonic() - started}  # fmt: skip
        if hold:
            self.held = sock
        else:
            sock.close()
        return {"errno": None, "seconds": time.monotonic() - started}

    def op_tcp_use_held(self, timeout: float) -> dict[str, Any]:
        """Send on the connection made earlier, then wait for what the network says."""
        assert self.held is not None
        self.held.settimeout(timeout)
        started = time.monotonic()
        try:
            self.held.send(b"still there?")
            data = self.held.recv(100)
        except TimeoutError:
            return {"errno": "timeout", "seconds": time.monotonic() - started}
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                    "seconds": time.monotonic() - started}  # fmt: skip
        return {"errno": None, "data": data.decode(errors="replace")}


def main() -> None:
    agent = Agent()
    for line in sys.stdin:
        request = json.loads(line)
        op = getattr(agent, f"op_{request.pop('op')}")
        try:
            answer = op(**request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
