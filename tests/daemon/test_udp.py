"""The UDP endpoint on loopback: batches (GSO) and coalesced receives (GRO) preserve every
datagram, its boundaries and its order."""

import trio

from tunnel.daemon.udp import UdpEndpoint


async def receive(endpoint: UdpEndpoint, count: int) -> list[bytes]:
    got: list[bytes] = []
    with trio.fail_after(5):
        while len(got) < count:
            await endpoint.wait_readable()
            got.extend(data for data, _ in endpoint.receive_batch(64))
    return got


async def test_batches_arrive_as_the_same_datagrams_in_order():
    sender = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    receiver = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    try:
        to = receiver.local_address
        sizes = [1200] * 10 + [700] + [1200] * 3 + [50, 50, 1300]
        datagrams = [(bytes([i]) * size, to) for i, size in enumerate(sizes)]
        sender.send_batch(datagrams)
        got = await receive(receiver, len(datagrams))
        assert got == [d for d, _ in datagrams]
        assert sender.send_drops == 0
    finally:
        sender.close()
        receiver.close()


async def test_ipv6_dual_stack_endpoint_talks_to_ipv4_peers():
    server = await UdpEndpoint.bind("::", 0, key="test")
    client = await UdpEndpoint.bind("127.0.0.1", 0, key="test")
    try:
        client.send(b"hello", ("127.0.0.1", server.local_address[1]))
        with trio.fail_after(5):
            await server.wait_readable()
            ((data, addr),) = server.receive_batch(8)
        assert data == b"hello"
        server.send_batch([(b"back", addr), (b"again", addr)])
        assert await receive(client, 2) == [b"back", b"again"]
    finally:
        server.close()
        client.close()
