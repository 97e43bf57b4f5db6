"""Checks on files a VM uses (kernel, initrd, drives), shared by the API and backends."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from metald.core.errors import InvalidArgument


def check_regular_file(field: str, path: Path, shown: str | None = None, writable: bool = False) -> None:
    """``path`` must be an existing, readable (and maybe writable) regular file.

    Errors name ``field`` and show ``shown`` (the caller's spelling of the path).
    """
    name = shown if shown is not None else str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidArgument(field, f"{name} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(field, f"{name} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(field, f"{name} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InvalidArgument(field, f"{name} is not readable")
    if writable and not os.access(path, os.W_OK):
        raise InvalidArgument(field, f"{name} is not writable (set read_only)")
