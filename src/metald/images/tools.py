"""Running the external tools (skopeo, umoci, mkfs.ext4, qemu-img, gcc)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

from metald.core.errors import FailedPrecondition


class ToolFailed(Exception):
    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{argv[0]} exited with {returncode}: {stderr.strip()[-600:]}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FailedPrecondition(f"{tool} is not installed (Debian package {package}; run make deps)")
    return path


async def run(argv: list[str], cwd: str | None = None, stdin: bytes | None = None) -> str:
    """Run ``argv``; returns stdout. The process is killed if the caller is cancelled."""
    return (await run_bytes(argv, cwd, stdin)).decode(errors="replace")


async def run_bytes(argv: list[str], cwd: str | None = None, stdin: bytes | None = None) -> bytes:
    """Run ``argv``; returns stdout as bytes (see :func:`run`)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate(stdin)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise ToolFailed(argv, proc.returncode or 0, err.decode(errors="replace"))
    return out
