"""From an unpacked root filesystem to the cached ext4 image."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from metald.images import guestconfig
from metald.images.tools import need, run

# The root filesystem is the content plus HEADROOM_FRACTION of it plus
# HEADROOM_BYTES: room for the filesystem's own metadata and for what the
# guest writes (its writes go to the VM's overlay, but inside this size).
HEADROOM_FRACTION = 0.25
HEADROOM_BYTES = 64 << 20
INIT_DIR = ".metald"


def content_size(root: Path) -> tuple[int, int]:
    """(bytes the tree takes in 4 KiB blocks, number of inodes)."""
    total = 0
    inodes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += 1 + len(dirnames)
        total += 4096
        for name in filenames:
            inodes += 1
            st = os.lstat(os.path.join(dirpath, name))
            total += max(4096, -(-st.st_size // 4096) * 4096)
    return total, inodes


def install_init(root: Path, init_binary: Path, config: dict[str, Any]) -> None:
    """Put metald-init and the image's settings at /.metald (off the image's PATH)."""
    target = root / INIT_DIR
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    target.mkdir(mode=0o755)
    shutil.copyfile(init_binary, target / "init")
    os.chmod(target / "init", 0o755)
    (target / "config").write_text(guestconfig.image_config(config))
    (target / "image.json").write_text(json.dumps(config.get("config") or {}, indent=1))
    for name in ("proc", "sys", "dev", "run", "tmp", "etc"):
        path = root / name
        if not path.exists() and not path.is_symlink():
            path.mkdir(mode=0o1777 if name == "tmp" else 0o755)


async def make_ext4(root: Path, out: Path) -> int:
    """``mkfs.ext4 -d`` (no mount): returns the image's size in bytes."""
    content, inodes = content_size(root)
    size = content + int(content * HEADROOM_FRACTION) + HEADROOM_BYTES
    size = math.ceil(size / (1 << 20)) << 20
    argv = [need("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-L", "metald-image", "-m", "0"]
    argv += ["-N", str(inodes + inodes // 4 + 4096), "-E", "root_owner=0:0", "-d", str(root)]
    argv += [str(out), f"{size >> 10}K"]
    await run(argv)
    return size
