"""In-memory fakes (network, TUN, platform) for tests, here and in other projects."""
