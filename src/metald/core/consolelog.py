"""A VM's console log file and its offsets.

The VMM appends the guest's console output to ``<run_dir>/<vm_id>/console.log``
(O_APPEND). metald keeps the file under its cap by dropping the oldest half
(:func:`cap`). So that a reader can resume at a byte offset across those cuts,
offsets count every byte the console ever wrote to the file, and a cut file
starts with one header line saying at which offset its remaining bytes begin::

    [metald: older console output dropped before offset 1048231]\\n

Without the header the file starts at offset 0. Cutting and reading take the
same (in-process) lock, so a reader never sees a half-rewritten file. A file
removed and made again (the VM's runtime files removed while it had no VMM)
starts over at offset 0.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

HEADER_MAX = 96
HEADER_PREFIX = b"[metald: older console output dropped"
_HEADER = re.compile(rb"\A\[metald: older console output dropped before offset (\d{1,20})\]\n")

# Held while a log is cut or read: the cut rewrites the file in place.
LOCK = threading.Lock()


def header(base: int) -> bytes:
    return HEADER_PREFIX + b" before offset %d]\n" % base


def parse_header(head: bytes) -> tuple[int, int]:
    """(header length, offset of the first byte after it) of a file starting with ``head``."""
    match = _HEADER.match(head)
    if match is None:
        return 0, 0
    return match.end(), int(match.group(1))


def cap(path: Path, max_bytes: int) -> bool:
    """If ``path`` is over ``max_bytes``, keep only its newest half (whole lines),
    behind a header naming the offset where it starts. True if cut."""
    with LOCK:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size <= max_bytes:
            return False
        with open(path, "r+b") as f:
            header_len, base = parse_header(f.read(HEADER_MAX))
            keep = max(1, max_bytes // 2 - HEADER_MAX)
            start = max(header_len, size - keep)
            f.seek(start)
            tail = f.read()
            newline = tail.find(b"\n")
            if 0 <= newline < len(tail) - 1:
                start += newline + 1  # start on a whole line
                tail = tail[newline + 1 :]
            data = header(base + start - header_len) + tail
            f.seek(0)
            f.write(data)
            f.truncate(len(data))
        return True


class Slice:
    """Bytes of a console log: ``data`` begins at ``offset``; ``start`` and ``end``
    are the offsets the file holds now."""

    __slots__ = ("data", "end", "offset", "start")

    def __init__(self, offset: int, data: bytes, start: int, end: int) -> None:
        self.offset = offset
        self.data = data
        self.start = start
        self.end = end


def read(path: Path, offset: int | None, max_bytes: int, tail: int = 0) -> Slice:
    """Up to ``max_bytes`` from ``offset`` (None: the last ``tail`` bytes). An offset
    the file no longer holds (dropped by a cut) starts at the oldest byte it
    holds; one past its end (the file started over) at its start as well."""
    with LOCK:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, under the lock
        except FileNotFoundError:
            at = offset or 0
            return Slice(at, b"", at, at)
        with f:
            header_len, base = parse_header(f.read(HEADER_MAX))
            size = os.fstat(f.fileno()).st_size
            end = base + max(0, size - header_len)
            if offset is None:
                offset = max(base, end - tail)
            elif offset < base or offset > end:
                offset = base
            f.seek(header_len + offset - base)
            data = f.read(max_bytes)
    return Slice(offset, data, base, end)
