"""The server daemon: one UDP endpoint, one TUN device, many client sessions.

Its objects, each with one job, and who holds whom (``daemon.Server`` makes them all):

    Dispatcher ──(known CID)──> ServerSession.driver      one boundary per connection
       │ (unknown CID)                │ its client's packets
       └─> HandshakeGate (core)       v
           verdict: accept, Retry,  Forwarder ──> TUN device, NAT64, another session
           VN, reset, drop            │ routes: SessionTable.routes (core RouteTable)
                                      v
    Gatekeeper (AuthRequests)     SessionTable: by connection ID, by address, leases

Modules: ``dispatcher`` (UDP in), ``session`` (one client), ``sessions`` (the table),
``forwarder`` (packets), ``auth`` (the gatekeeper), ``daemon`` (Server, run_server).
"""

from tunnel.daemon.server.daemon import Server, run_server
from tunnel.daemon.server.session import ServerSession

__all__ = ["Server", "ServerSession", "run_server"]
