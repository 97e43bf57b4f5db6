"""Reading /proc/self/mountinfo: which filesystems are mounted where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    super_options: frozenset[str]


def unescape(field: str) -> str:
    """Undo mountinfo's ``\\ooo`` octal escapes (space, tab, newline, backslash)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(path: Path = MOUNTINFO) -> list[Mount]:
    out = []
    for line in path.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        out.append(Mount(Path(unescape(fields[4])), tail[0], frozenset(tail[2].split(","))))
    return out
