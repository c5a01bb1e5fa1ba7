"""Reading and writing key files: the I/O side of :mod:`tunnel.core.identity`.

A key file holds a secret seed, so it is created with mode 0600 from the start (never
written first and chmod-ed after), and reading one that other users may read logs a warning.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from tunnel.core.identity import Identity, format_key_file, parse_key_file
from tunnel.errors import KeyFileError

__all__ = ["read_key_file", "write_key_file"]

logger = logging.getLogger("tunnel")

_MAX_KEY_FILE_SIZE = 64 * 1024  # a key file is ~120 bytes; anything huge is not one
_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) with mode 0600 and write ``data``; on failure
    remove what was created."""
    fd = os.open(path, _OPEN_FLAGS, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_key_file(path: Path, identity: Identity, *, force: bool) -> None:
    """Write ``identity`` to a new key file at ``path`` with mode 0600.

    Without ``force`` an existing file is never touched. With ``force`` the new file is
    written next to it under a temporary name and renamed over it, so a reader sees either
    the old key or the new one, never half a file. Raises :class:`KeyFileError` naming the
    path.
    """
    data = format_key_file(identity).encode("ascii")
    if not force:
        try:
            _write_new(path, data)
        except FileExistsError:
            raise KeyFileError(f"{path}: already exists (use --force to overwrite it)") from None
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot write key file: {_why(exc)}") from None
        return
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _write_new(temp, data)
        try:
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write key file: {_why(exc)}") from None


def read_key_file(path: Path) -> Identity:
    """Read the identity stored in the key file at ``path``.

    Raises :class:`KeyFileError` naming the path if the file is missing, unreadable or
    malformed. Logs a warning on the ``tunnel`` logger if group or others may read it.
    """
    try:
        # O_NONBLOCK: opening a FIFO put where the key should be must not hang; it has no
        # effect on a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"{path}: not a regular file")
            data = file.read(_MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {_why(exc)}") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning(f"{path}: key file is readable by other users; chmod 600 it")
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path}: too large for a key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: key file is not UTF-8 text") from None
    return parse_key_file(text, source=str(path))
