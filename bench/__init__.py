"""The throughput benchmark behind scripts/bench (not part of the installed package)."""
