"""The server's admission policy: who may join, and which addresses they get.

Pure: the shell hands in a decoded request, the nonce it sent and the time; the authority answers
with the ``AuthResponse`` to send. It owns the address pools and the leases, so one object knows
which owner holds which address, including leases kept for a grace period after a session ends
so that a returning client (same identity and device_id) gets its addresses back.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

import attrs

from tunnel.core.identity import verify_signature
from tunnel.core.ippool import AddressPool
from tunnel.core.messages import PROTOCOL_VERSION, AuthRequest, AuthResponse, auth_transcript
from tunnel.core.tokens import TokenSet
from tunnel.errors import PoolExhausted

Owner = tuple[bytes, int]  # (client public key, device_id)

REASON_VERSION = "unsupported protocol version"
REASON_SIGNATURE = "invalid client signature"
REASON_TOKEN_REQUIRED = "Authentication token required"
REASON_TOKEN_INVALID = "Invalid authentication token"
REASON_NOT_ALLOWED = "client not allowed"
REASON_FULL = "Server full"
REASON_POOL = "address pool exhausted"
REASON_TOO_MANY_SESSIONS = "too many sessions for this client"
REASON_REVOKED = "credentials revoked"


@attrs.define
class Lease:
    """Addresses held by one owner; ``released_at`` is set while the owner has no session."""

    owner: Owner
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    released_at: float | None = None

    @property
    def addresses(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return tuple(a for a in (self.ipv4, self.ipv6) if a is not None)


@attrs.define
class Admission:
    """The outcome of :meth:`Authority.authorize`."""

    response: AuthResponse
    lease: Lease | None = None
    credentials_failed: bool = False
    """The request's credentials were wrong (signature, token, identity): worth rate-limiting,
    unlike "Server full", which is not the client's fault."""


class Authority:
    """Checks handshake requests against the server's policy and hands out addresses."""

    def __init__(
        self,
        *,
        server_key: bytes,
        tokens: TokenSet,
        allowed_clients: frozenset[bytes] | None,
        max_clients: int | None,
        pool4: AddressPool | None,
        pool6: AddressPool | None,
        mtu: int,
        lease_grace: float,
        max_sessions_per_client: int | None = None,
        dns: tuple[IPv4Address | IPv6Address, ...] = (),
        dns_search: tuple[str, ...] = (),
    ) -> None:
        if pool4 is None and pool6 is None:
            raise ValueError("an authority needs at least one address pool")
        self.server_key = server_key
        self.tokens = tokens
        self.allowed_clients = allowed_clients
        self.max_clients = max_clients
        self.max_sessions_per_client = max_sessions_per_client
        self.pool4 = pool4
        self.pool6 = pool6
        self.mtu = mtu
        self.lease_grace = lease_grace
        self.dns = dns  # pushed to every accepted client
        self.dns_search = dns_search
        self._leases: dict[Owner, Lease] = {}

    def reload(
        self,
        *,
        tokens: TokenSet,
        allowed_clients: frozenset[bytes] | None,
        dns: tuple[IPv4Address | IPv6Address, ...] | None = None,
        dns_search: tuple[str, ...] | None = None,
    ) -> None:
        """Swap the parts of the policy that may change while sessions run (the DNS settings
        reach the clients that connect from now on)."""
        self.tokens = tokens
        self.allowed_clients = allowed_clients
        if dns is not None:
            self.dns = dns
        if dns_search is not None:
            self.dns_search = dns_search

    @property
    def active_count(self) -> int:
        return sum(1 for lease in self._leases.values() if lease.released_at is None)

    def authorize(
        self, request: AuthRequest, *, nonce: bytes, binding: bytes, now: float
    ) -> Admission:
        """Decide on one request made on the connection whose channel binding is ``binding``.
        An accepted owner holds its lease until :meth:`release`."""
        reason = self._refusal(request, nonce, binding)
        if reason is not None:
            return Admission(
                AuthResponse(accepted=False, reject_reason=reason), credentials_failed=True
            )
        owner: Owner = (request.client_id, request.device_id)
        lease = self._leases.get(owner)
        if lease is None or lease.released_at is not None:
            # A new session (the same device coming back replaces its old one instead).
            if self.max_clients is not None and self.active_count >= self.max_clients:
                return _for_now(REASON_FULL)
            limit = self.max_sessions_per_client
            if limit is not None and self._active_for(request.client_id) >= limit:
                return _for_now(REASON_TOO_MANY_SESSIONS)
        if lease is None:
            try:
                lease = self._allocate(owner)
            except PoolExhausted:
                return _for_now(REASON_POOL)
            self._leases[owner] = lease
        lease.released_at = None
        return Admission(self._accepted(lease), lease)

    def _refusal(self, request: AuthRequest, nonce: bytes, binding: bytes) -> str | None:
        if request.version != PROTOCOL_VERSION:
            return f"{REASON_VERSION} {request.version}"
        transcript = auth_transcript(
            nonce, self.server_key, request.client_id, request.device_id, binding
        )
        if not verify_signature(request.client_id, transcript, request.signature):
            return REASON_SIGNATURE
        if request.auth_token is None:
            return REASON_TOKEN_REQUIRED
        if request.auth_token not in self.tokens:
            return REASON_TOKEN_INVALID
        if self.allowed_clients is not None and request.client_id not in self.allowed_clients:
            return REASON_NOT_ALLOWED
        return None

    def still_admits(self, client_id: bytes, token_digest: bytes) -> bool:
        """Would the current policy still let in a client that authenticated earlier with the
        token of this SHA-256 digest? For re-checking live sessions after a reload."""
        if not self.tokens.has_digest(token_digest):
            return False
        return self.allowed_clients is None or client_id in self.allowed_clients

    def _active_for(self, client_id: bytes) -> int:
        return sum(
            1
            for (owner_id, _), lease in self._leases.items()
            if owner_id == client_id and lease.released_at is None
        )

    def _allocate(self, owner: Owner) -> Lease:
        ipv4 = self.pool4.allocate(owner) if self.pool4 is not None else None
        try:
            ipv6 = self.pool6.allocate(owner) if self.pool6 is not None else None
        except PoolExhausted:
            if self.pool4 is not None:
                self.pool4.release(owner)
            raise
        return Lease(owner, ipv4, ipv6)  # type: ignore[arg-type]

    def _accepted(self, lease: Lease) -> AuthResponse:
        fields: dict[str, object] = {
            "accepted": True,
            "mtu": self.mtu,
            "dns": self.dns,
            "dns_search": self.dns_search,
        }
        if self.pool4 is not None:
            fields.update(
                assigned_ip=lease.ipv4, network=self.pool4.network, server_ip=self.pool4.server_ip
            )
        if self.pool6 is not None:
            fields.update(
                assigned_ip6=lease.ipv6,
                network6=self.pool6.network,
                server_ip6=self.pool6.server_ip,
            )
        return AuthResponse(**fields)  # type: ignore[arg-type]

    def release(self, owner: Owner, *, now: float) -> None:
        """The owner's session ended: keep its addresses for ``lease_grace`` seconds."""
        lease = self._leases.get(owner)
        if lease is not None and lease.released_at is None:
            lease.released_at = now
            if self.lease_grace <= 0:
                self.expire(now)

    def expire(self, now: float) -> list[Lease]:
        """Return to the pools every lease released more than ``lease_grace`` ago."""
        expired = [
            lease
            for lease in self._leases.values()
            if lease.released_at is not None and now - lease.released_at >= self.lease_grace
        ]
        for lease in expired:
            del self._leases[lease.owner]
            for pool in (self.pool4, self.pool6):
                if pool is not None:
                    pool.release(lease.owner)
        return expired

    def next_expiry(self) -> float | None:
        """When the oldest released lease expires, or None if none is waiting."""
        times = [
            lease.released_at for lease in self._leases.values() if lease.released_at is not None
        ]
        return min(times) + self.lease_grace if times else None


def _for_now(reason: str) -> Admission:
    """A refusal that is not the client's fault and may pass: it retries later."""
    return Admission(AuthResponse(accepted=False, reject_reason=reason, temporary=True))
