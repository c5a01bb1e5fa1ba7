"""The `/etc/resolv.conf` text the client writes while connected, and the check on its names.

The servers and search domains come from the network (the server pushes them) and end in a
file every program on the host reads, so this is the one place that turns them into bytes, and
it refuses anything that could add a line of its own: a search domain is checked against a
strict grammar (no whitespace, no ``#`` or ``;``, no control or non-ASCII characters), and a
server address with a scope (``fe80::1%eth0``, whose scope may be any text) is refused.

Pure: no file is read or written here; the shell (:mod:`tunnel.daemon.client.dns`) hands in the
original file's bytes and writes what comes back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

__all__ = ["HEADER", "MAX_NAME_LENGTH", "render_resolv_conf", "valid_search_domain"]

HEADER = b"# written by tunnel client while connected; the original comes back when it stops"
MAX_NAME_LENGTH = 253  # RFC 1035 in text form, not counting a trailing dot

# One label: 1..63 of letters, digits, '_' and '-', not starting or ending with '-'. Spelled
# out as ASCII classes, so no Unicode letter or digit slips through.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# "options" at the start of a line, then a blank: how the resolver reads the keyword.
_OPTIONS = re.compile(rb"options[ \t]")


def valid_search_domain(name: str) -> bool:
    """Whether ``name`` may go into a ``search`` line: 1..253 characters (a single trailing dot
    not counted), dot-separated labels of 1..63 ``[A-Za-z0-9_-]`` that neither start nor end
    with '-'. Everything else (whitespace, '#', ';', control characters, non-ASCII, empty
    labels) is refused."""
    bare = name[:-1] if name.endswith(".") else name
    if not 1 <= len(bare) <= MAX_NAME_LENGTH:
        return False
    return all(_LABEL.fullmatch(label) is not None for label in bare.split("."))


def render_resolv_conf(
    servers: Iterable[IPv4Address | IPv6Address], search: Iterable[str], original: bytes
) -> bytes:
    """The replacement ``/etc/resolv.conf``: our header comment, a ``nameserver`` line per
    server in order, a ``search`` line if there are domains, then the ``options`` lines of
    ``original`` exactly as they were (``options edns0 trust-ad`` keeps working). Raises
    ValueError when there is no server, a server address has a scope, or a domain is not a
    :func:`valid_search_domain`."""
    lines = [HEADER]
    count = 0
    for server in servers:
        if not isinstance(server, IPv4Address | IPv6Address):
            raise ValueError(f"{server!r} is not an IP address")
        if isinstance(server, IPv6Address) and server.scope_id is not None:
            raise ValueError(f"{server} has a scope; a resolver address cannot")
        lines.append(b"nameserver " + str(server).encode("ascii"))
        count += 1
    if count == 0:
        raise ValueError("no DNS server to write")
    domains = list(search)
    for domain in domains:
        if not valid_search_domain(domain):
            raise ValueError(f"{domain!r} is not a domain name")
    if domains:
        lines.append(b"search " + " ".join(domains).encode("ascii"))
    lines += [line for line in original.split(b"\n") if _OPTIONS.match(line)]
    return b"\n".join(lines) + b"\n"
