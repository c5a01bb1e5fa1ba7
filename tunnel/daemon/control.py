"""Client side of the control socket (``tunnel status``)."""

from tunnel.daemon.runtime import query_status

__all__ = ["query_status"]
