"""A stand-in for systemd-resolved's D-Bus API, so the client's resolved backend is tested
against a real bus (a private ``dbus-daemon``, :mod:`tests.support.dbus`) without touching the
host's DNS.

It owns ``org.freedesktop.resolve1`` on the bus it is given and implements the four
``org.freedesktop.resolve1.Manager`` methods the client calls, checking their signatures and
arguments the way resolved does (``InvalidArgs`` for a bad index, family or address length)::

    SetLinkDNS(i ifindex, a(iay) addresses)
    SetLinkDomains(i ifindex, a(sb) domains)
    SetLinkDefaultRoute(i ifindex, b enable)
    RevertLink(i ifindex)

After each call, *before* it replies (so a caller that got its answer reads the new state), it
writes every link's settings to the ``--record`` file atomically, as JSON::

    {"7": {"dns": ["10.0.0.1"], "domains": [["example.com", false], ["~.", true]],
           "default_route": true}}

RevertLink removes the link's entry. "ready" on stdout means the name is owned. With
``--silent`` it owns the name and never answers (a hung resolved, for the timeouts).

    python tests/support/fake_resolved.py --bus unix:path=/tmp/x/bus --record /tmp/x/links.json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

NAME = "org.freedesktop.resolve1"
PATH = "/org/freedesktop/resolve1"
INTERFACE = "org.freedesktop.resolve1.Manager"
SIGNATURES = {
    "SetLinkDNS": "ia(iay)",
    "SetLinkDomains": "ia(sb)",
    "SetLinkDefaultRoute": "ib",
    "RevertLink": "i",
}
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
DO_NOT_QUEUE = 4
PRIMARY_OWNER = 1
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class InvalidArgs(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bus", required=True, help="a D-Bus address (unix:path=...)")
    parser.add_argument("--record", required=True, type=Path, help="where to write link state")
    parser.add_argument("--silent", action="store_true", help="own the name, answer nothing")
    args = parser.parse_args(argv)
    links: dict[int, dict[str, Any]] = {}
    connection = open_dbus_connection(bus=args.bus)
    reply = connection.send_and_get_reply(message_bus.RequestName(NAME, DO_NOT_QUEUE))
    if reply.header.message_type is MessageType.error or reply.body[0] != PRIMARY_OWNER:
        print(f"fake_resolved: could not own {NAME}: {reply.body}", file=sys.stderr)
        return 1
    write_record(args.record, links)
    print("ready", flush=True)
    while True:
        try:
            message = connection.receive()
        except (ConnectionError, OSError):
            return 0  # the bus went away: the test is over
        if message.header.message_type is not MessageType.method_call:
            continue  # NameAcquired and other signals
        if args.silent:
            continue
        connection.send(handle(message, links, args.record))


def handle(message: Any, links: dict[int, dict[str, Any]], record: Path) -> Any:
    fields = message.header.fields
    method = fields.get(HeaderFields.member)
    if fields.get(HeaderFields.path) != PATH or fields.get(HeaderFields.interface) != INTERFACE:
        return new_error(message, UNKNOWN_METHOD, "s", (f"no {method} here",))
    if method not in SIGNATURES:
        return new_error(message, UNKNOWN_METHOD, "s", (f"unknown method {method}",))
    signature = fields.get(HeaderFields.signature, "")
    if signature != SIGNATURES[method]:
        return new_error(
            message, INVALID_ARGS, "s", (f"{method} takes {SIGNATURES[method]}, not {signature}",)
        )
    try:
        call(method, message.body, links)
    except InvalidArgs as exc:
        return new_error(message, INVALID_ARGS, "s", (str(exc),))
    write_record(record, links)
    return new_method_return(message)


def call(method: str, body: tuple[Any, ...], links: dict[int, dict[str, Any]]) -> None:
    ifindex = body[0]
    if ifindex <= 0:
        raise InvalidArgs("Invalid interface index")
    if method == "RevertLink":
        links.pop(ifindex, None)
        return
    link = links.setdefault(ifindex, {"dns": [], "domains": [], "default_route": None})
    if method == "SetLinkDNS":
        link["dns"] = [address_of(family, packed) for family, packed in body[1]]
    elif method == "SetLinkDomains":
        for domain, routing_only in body[1]:
            if not valid_domain(domain, routing_only):
                raise InvalidArgs(f"Invalid search domain {domain}")
        link["domains"] = [[domain, routing_only] for domain, routing_only in body[1]]
    elif method == "SetLinkDefaultRoute":
        link["default_route"] = body[1]


def address_of(family: int, packed: bytes) -> str:
    expected = {int(socket.AF_INET): 4, int(socket.AF_INET6): 16}.get(family)
    if expected is None:
        raise InvalidArgs(f"Unknown address family {family}")
    if len(packed) != expected:
        raise InvalidArgs("Invalid address size")
    return str(ipaddress.ip_address(bytes(packed)))


def valid_domain(domain: str, routing_only: bool) -> bool:
    name = domain[1:] if domain.startswith("~") else domain
    if domain.startswith("~") and not routing_only:
        return False  # resolved strips "~" into the routing flag; we insist it matches
    if name in ("", "."):
        return routing_only and name == "."
    name = name[:-1] if name.endswith(".") else name
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def write_record(path: Path, links: dict[int, dict[str, Any]]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({str(k): v for k, v in sorted(links.items())}, indent=1))
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
