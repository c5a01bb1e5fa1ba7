"""The server's admission policy: credentials bound to one connection, bounded sessions, and
the re-check a reload does."""

from ipaddress import IPv4Network

from tunnel.core.authority import (
    REASON_FULL,
    REASON_POOL,
    REASON_SIGNATURE,
    REASON_TOO_MANY_SESSIONS,
    Authority,
)
from tunnel.core.identity import Identity
from tunnel.core.ippool import AddressPool
from tunnel.core.messages import PROTOCOL_VERSION, AuthRequest, auth_transcript
from tunnel.core.tokens import TokenSet, new_token, token_digest

SERVER = Identity.generate()
TOKEN = new_token()
NONCE = bytes(range(32))
BINDING = bytes(range(32, 64))


def authority(**overrides) -> Authority:
    settings = dict(
        server_key=SERVER.public_key,
        tokens=TokenSet([TOKEN]),
        allowed_clients=None,
        max_clients=10,
        pool4=AddressPool(IPv4Network("10.8.0.0/24"), None, key="network"),
        pool6=None,
        mtu=1420,
        lease_grace=30.0,
        max_sessions_per_client=2,
    )
    settings.update(overrides)
    return Authority(**settings)


def request(client: Identity, device: int, *, binding: bytes = BINDING, token=TOKEN):
    transcript = auth_transcript(NONCE, SERVER.public_key, client.public_key, device, binding)
    return AuthRequest(
        version=PROTOCOL_VERSION,
        device_id=device,
        client_id=client.public_key,
        auth_token=token,
        signature=client.sign(transcript),
        max_datagram_payload=1400,
    )


def test_a_signature_is_good_for_its_own_connection_only():
    client = Identity.generate()
    relayed = request(client, 1, binding=bytes(32))  # signed on another connection
    admission = authority().authorize(relayed, nonce=NONCE, binding=BINDING, now=0.0)
    assert admission.response.reject_reason == REASON_SIGNATURE
    assert admission.credentials_failed and not admission.response.temporary
    good = authority().authorize(request(client, 1), nonce=NONCE, binding=BINDING, now=0.0)
    assert good.response.accepted


def test_sessions_per_identity_are_bounded_and_the_refusal_is_temporary():
    policy = authority()
    client = Identity.generate()
    for device in (1, 2):
        assert policy.authorize(
            request(client, device), nonce=NONCE, binding=BINDING, now=0
        ).response.accepted
    third = policy.authorize(request(client, 3), nonce=NONCE, binding=BINDING, now=0.0)
    assert third.response.reject_reason == REASON_TOO_MANY_SESSIONS
    assert third.response.temporary and not third.credentials_failed
    # The same device coming back is no new session; another identity is not affected.
    again = policy.authorize(request(client, 2), nonce=NONCE, binding=BINDING, now=0.0)
    assert again.response.accepted
    other = policy.authorize(request(Identity.generate(), 1), nonce=NONCE, binding=BINDING, now=0)
    assert other.response.accepted
    # A session that ended frees its place.
    policy.release((client.public_key, 1), now=1.0)
    assert policy.authorize(
        request(client, 3), nonce=NONCE, binding=BINDING, now=2
    ).response.accepted


def test_full_and_exhausted_are_temporary():
    full = authority(max_clients=1)
    assert full.authorize(
        request(Identity.generate(), 1), nonce=NONCE, binding=BINDING, now=0
    ).response.accepted
    refused = full.authorize(request(Identity.generate(), 1), nonce=NONCE, binding=BINDING, now=0)
    assert refused.response.reject_reason == REASON_FULL and refused.response.temporary
    tiny = authority(pool4=AddressPool(IPv4Network("10.8.0.0/30"), None, key="network"))
    assert tiny.authorize(
        request(Identity.generate(), 1), nonce=NONCE, binding=BINDING, now=0
    ).response.accepted
    empty = tiny.authorize(request(Identity.generate(), 1), nonce=NONCE, binding=BINDING, now=0)
    assert empty.response.reject_reason == REASON_POOL and empty.response.temporary


def test_still_admits_follows_the_reloaded_policy():
    policy = authority()
    client = Identity.generate()
    digest = token_digest(TOKEN)
    assert policy.still_admits(client.public_key, digest)
    policy.reload(tokens=TokenSet([TOKEN]), allowed_clients=frozenset({bytes(32)}))
    assert not policy.still_admits(client.public_key, digest)
    policy.reload(tokens=TokenSet([new_token()]), allowed_clients=None)
    assert not policy.still_admits(client.public_key, digest)
    policy.reload(tokens=TokenSet([TOKEN]), allowed_clients=frozenset({client.public_key}))
    assert policy.still_admits(client.public_key, digest)
