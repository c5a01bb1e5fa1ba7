"""Helpers shipped with the package for tests: network namespaces, fakes."""
