"""The trio shell: TUN devices, netlink, UDP sockets, QUIC drivers, sessions and the daemons."""
