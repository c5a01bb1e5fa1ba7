"""The server's gatekeeper for AuthRequests: the authority's verdict, the brake on repeated
failures, and the counts of what was refused and why."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from tunnel.core.authority import Admission, Authority
from tunnel.core.messages import AuthRequest
from tunnel.core.ratelimit import FailureLimiter
from tunnel.core.tokens import token_digest

log = logging.getLogger("tunnel.server")

FailureKey = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One AuthRequest from one source, as the gatekeeper keys it."""

    request: AuthRequest
    source: str  # the client's address, without the port
    digest: bytes  # the token's digest (tokens never stay in memory, nor reach a log)

    @property
    def failure_keys(self) -> tuple[FailureKey, FailureKey]:
        """Repeated failures count against the source address, and against this identity
        with this token."""
        return (("source", self.source), ("credentials", self.request.client_id, self.digest))


class Gatekeeper:
    """Admits or refuses each authenticated session's AuthRequest, and counts the outcome."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.limiter = FailureLimiter()
        self.auth_failures = 0  # requests whose credentials failed
        self.rate_limited = 0  # requests not even looked at: too many failures before
        self.refused: collections.Counter[str] = collections.Counter()  # by reason
        self.revoked = 0  # live sessions closed because a reload withdrew their credentials
        self.admitted = 0  # tunnel handshakes accepted

    def attempt(self, request: AuthRequest, source: str) -> Attempt:
        digest = token_digest(request.auth_token) if request.auth_token is not None else b""
        return Attempt(request, source, digest)

    def blocked(self, attempt: Attempt, now: float) -> bool:
        """Too many recent failures from this source or with these credentials: refuse
        without looking (counted)."""
        if any(self.limiter.blocked(key, now) for key in attempt.failure_keys):
            self.rate_limited += 1
            return True
        return False

    def admit(self, attempt: Attempt, *, nonce: bytes, binding: bytes, now: float) -> Admission:
        """The authority's verdict; a refusal is counted, a credentials failure also feeds the
        limiter."""
        admission = self.authority.authorize(attempt.request, nonce=nonce, binding=binding, now=now)
        response = admission.response
        if response.accepted:
            self.admitted += 1
        else:
            self.refused[response.reject_reason or "rejected"] += 1
            if admission.credentials_failed:
                self.auth_failures += 1
                for key in attempt.failure_keys:
                    if self.limiter.failed(key, now):
                        log.warning(
                            "repeated failures from %s: rate limited",
                            attempt.source if key[0] == "source" else "this identity and token",
                        )
        return admission

    def status(self) -> dict[str, object]:
        return {
            "handshakes_accepted": self.admitted,
            "auth_failures": self.auth_failures,
            "rate_limited": self.rate_limited,
            "refused": dict(self.refused),
            "revoked": self.revoked,
        }
