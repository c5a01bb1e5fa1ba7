"""The client daemon: a reconnect supervisor around one session at a time.

Task tree:

    run_client
      ├─ signal watcher
      ├─ control socket
      └─ Supervisor.run
           ├─ network watcher   netlink changes -> host routes, probe, cut a backoff short
           └─ reconnect loop: backoff -> race handshakes (fail_after) -> run the session
                one nursery per attempt (every address of the server's name races):
                  ├─ UDP pump       datagrams -> QUIC -> events
                  └─ QUIC timer
                and once the winner is accepted:
                  ├─ TUN pump       packets -> QUIC datagrams
                  ├─ heartbeat      ping every interval, SessionLost after the timeout
                  └─ path MTU search

The objects, each with one job, and what they are handed:

- :class:`Client` (``daemon.py``) puts the others together and owns who we are: the
  identity, the device ID, the session ticket kept for resumption (a :class:`TicketSlot`) and
  the drop counters; its ``status()`` gathers the counters of the others for
  ``tunnel status``.
- :class:`HostNetwork` (``hostnet.py``): everything the client changes on the host (the TUN
  device, its addresses, the tunnel's routes, the policy routing of a full tunnel
  (``policyroute.py``), the host routes that keep the server reachable outside narrower
  routes, the pushed resolvers (``dns.py``)), undone by its ``close()``; what outlives a
  killed client is recorded in its state file first and undone at the next start. The TUN
  device and routes are created with the first session and kept across reconnects, so
  applications see a pause, not a vanished interface.
- :class:`Supervisor` (``supervisor.py``): the reconnect loop, the classification of failures
  (permanent or retried), the reactions to network changes, the race of handshakes and the
  start of an accepted session. It is given the :class:`HostNetwork` to apply what the server
  assigned and the :class:`SessionServices` to hand to every session it makes.
- :class:`ClientSession` (``session.py``): one QUIC connection: protocol events, pumps,
  heartbeat, rebinding, its own status. It gets what it needs from the client in one frozen
  :class:`SessionServices` (config, identity, device ID, the ticket slot, the drop counters,
  the platform for a fresh socket), and from the supervisor, once accepted, the TUN device and
  our addresses. It never sees the supervisor, the host network or other sessions.

Dependencies point one way: ``daemon`` -> ``supervisor`` -> ``session``, ``hostnet``;
``session`` takes one helper (:func:`ip_of`) from ``hostnet``. :class:`Client` and
:func:`run_client` live in ``daemon.py`` rather than here, so that this file is only the map
and the names the rest of the code imports; ``Client`` keeps read-only views (``state``,
``session``, ``tun``, ``ticket`` ...) of what the objects own, for status readers and tests.

Everything logs as ``tunnel.client``.
"""

from tunnel.daemon.client.daemon import Client, cleanup_client, run_client
from tunnel.daemon.client.session import ClientSession
from tunnel.daemon.client.supervisor import GaveUp

__all__ = ["Client", "ClientSession", "GaveUp", "cleanup_client", "run_client"]
