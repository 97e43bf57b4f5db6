"""Keeping a VM's console log under its size cap (the format: core/consolelog.py).

QEMU writes the log through a file chardev opened with O_APPEND, so every
write lands at the current end of file even after the file was shortened
underneath it. Bytes QEMU writes between our read and our truncate are lost;
that window is a few microseconds once a second at most.
"""

from __future__ import annotations

from pathlib import Path

from metald.core import consolelog

TRUNCATED_MARK = consolelog.HEADER_PREFIX  # how a cut log starts (then " before offset N]")


def cap_log(path: Path, max_bytes: int) -> bool:
    """If ``path`` is over ``max_bytes``, keep only its newest half. True if cut."""
    return consolelog.cap(path, max_bytes)


def contains(path: Path, marker: bytes) -> bool:
    try:
        return marker in path.read_bytes()
    except FileNotFoundError:
        return False


def count(path: Path, marker: bytes) -> int:
    try:
        return path.read_bytes().count(marker)
    except FileNotFoundError:
        return 0


def tail_text(path: Path, max_bytes: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
