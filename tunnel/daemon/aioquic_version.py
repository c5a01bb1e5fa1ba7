"""The aioquic versions the daemon supports, checked once when :mod:`tunnel.daemon` is imported.

The modules in :mod:`tunnel.daemon.aioquic_private` import names that appear only in aioquic
1.7.0 and read private connection state checked against 1.7.x, so any other version fails in
confusing ways (an ``ImportError`` deep in a traceback at best). This module turns that into
one line that says what is installed and what to install instead. The bounds live here and
nowhere else; keep them in step with ``pyproject.toml``.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from tunnel.errors import SystemSetupError

__all__ = ["SUPPORTED", "check_aioquic_version", "requirement"]

# (lowest supported release, first release not supported): >= 1.7.0, < 1.8
SUPPORTED: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 7, 0), (1, 8))

_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def requirement() -> str:
    """The supported range as a pip requirement, e.g. ``aioquic>=1.7.0,<1.8``."""
    low, high = SUPPORTED
    return f"aioquic>={_dotted(low)},<{_dotted(high)}"


def _release(text: str) -> tuple[int, ...] | None:
    # Only the release segment counts; a local suffix such as 1.7.2+deb is a distro build.
    match = _RELEASE.match(text)
    return tuple(int(part) for part in match.group().split(".")) if match else None


def check_aioquic_version() -> str:
    """Return the installed aioquic version; raise :class:`SystemSetupError` with a one-line
    message if aioquic is missing or outside :data:`SUPPORTED`."""
    low, high = SUPPORTED
    wanted = f"tunnel needs aioquic >= {_dotted(low)}, < {_dotted(high)}"
    fix = f"(pip install '{requirement()}')"
    try:
        installed = version("aioquic")
    except PackageNotFoundError:
        raise SystemSetupError(f"aioquic is not installed; {wanted} {fix}") from None
    release = _release(installed)
    if release is None or not low <= release < high:
        raise SystemSetupError(f"aioquic {installed} is installed; {wanted} {fix}")
    return installed
