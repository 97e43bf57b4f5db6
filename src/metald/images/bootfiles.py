"""metald-init, built from its C source, and the bundled initramfs with it as /init.

The init is compiled once per source version (``gcc -static``) into the cache.
The bundled kernel has virtio as modules, which its initramfs loads; Linux
unpacks concatenated cpio archives in order, later files replacing earlier
ones, so the bundled initramfs followed by a small archive holding metald-init
as ``/init`` gives an initramfs that loads the modules with the bundled
module list, mounts the image's disk and hands over to ``/.metald/init``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from pathlib import Path

from metald.images.tools import need, run

SOURCE = Path(__file__).parent / "init" / "metald-init.c"
CFLAGS = ("-static", "-O2", "-s", "-Wall")


def _newc(name: str, data: bytes, mode: int) -> bytes:
    """One entry of a cpio "newc" archive."""
    fields = [1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def cpio(files: list[tuple[str, bytes, int]]) -> bytes:
    body = b"".join(_newc(name, data, mode) for name, data, mode in files)
    return body + _newc("TRAILER!!!", b"", 0)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class BootFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = asyncio.Lock()

    async def init_binary(self) -> Path:
        """The static metald-init for this source and these flags, compiled if missing."""
        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
        path = self.directory / f"metald-init-{key}"
        async with self._lock:
            if not path.is_file():
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
                gcc = need("gcc", "gcc, libc6-dev")
                await run([gcc, *CFLAGS, "-o", str(tmp), str(SOURCE)])
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)
        return path

    async def initramfs(self, bundled: Path) -> Path:
        """``bundled`` followed by a cpio archive with metald-init as /init."""
        init = (await self.init_binary()).read_bytes()
        base = bundled.read_bytes()
        digest = hashlib.sha256(base + init).hexdigest()[:16]
        path = self.directory / f"initramfs-image-{digest}.cpio.gz"
        if not path.is_file():
            extra = gzip.compress(cpio([("init", init, 0o100755)]), mtime=0)
            _atomic_write(path, base + extra, 0o644)
        return path
