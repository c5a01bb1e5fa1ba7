"""The trio shell: TUN devices, netlink, UDP sockets, QUIC drivers, sessions and the daemons."""

# First, before any submodule imports aioquic: an unsupported version fails here in one line.
from tunnel.daemon.aioquic_version import check_aioquic_version

check_aioquic_version()
