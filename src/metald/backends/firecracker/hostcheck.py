"""Host checks for the Firecracker backend: a usable KVM device, a static
Firecracker binary (the jail holds no libraries), and its version."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import struct
from pathlib import Path

VERSION_RE = re.compile(r"v?(\d+\.\d+\.\d+\S*)")
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
PT_INTERP = 3
KVM_API_VERSION = 12


def kvm_unusable(path: Path) -> str | None:
    """Why ``path`` is no usable KVM device (opens read-write, answers its API version); None if it is."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path} cannot be opened read-write ({exc.strerror})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{path} is no KVM device (KVM_GET_API_VERSION: {exc.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return f"{path} speaks KVM API {version}, not {KVM_API_VERSION}"
    return None


def not_static(path: Path) -> str | None:
    """Why ``path`` is not a statically linked ELF executable; None if it is one."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF":
                return "is not an ELF executable (a script?)"
            if header[4] != 2 or header[5] != 1:
                return "is not a 64-bit little-endian ELF executable"
            (phoff,) = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if len(table) < phentsize * phnum or phentsize < 4:
        return "is a truncated ELF file"
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == PT_INTERP:
            return "is dynamically linked"
    return None


def executable(name: str) -> Path | None:
    found = shutil.which(name) if "/" not in name else name
    if found and os.path.isfile(found) and os.access(found, os.X_OK):
        return Path(found)
    return None


async def binary_version(binary: Path, timeout_s: float = 5.0) -> str | None:
    """The version ``<binary> --version`` prints (Firecracker prints "Firecracker vX.Y.Z")."""
    try:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    found = VERSION_RE.search(out.decode(errors="replace"))
    return found.group(1) if proc.returncode == 0 and found else None
