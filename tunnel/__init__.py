"""tunnel: an encrypted IP tunnel (VPN) over QUIC with cryptographic peer identities."""

__version__ = "0.1.0"
