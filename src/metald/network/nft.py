"""Running ``nft -f -``: one script, one atomic transaction.

Per-VM element changes from concurrent tasks are coalesced: while one ``nft``
runs, later scripts queue up and go together in the next single transaction
(deleting set elements costs one RCU grace period per transaction, about
10 ms, so 200 teardowns at once would otherwise take seconds). If a combined
transaction fails, it is bisected so that each caller gets its own result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Sequence
from typing import Any

from metald.core.errors import BackendError
from metald.network.batch import Coalescer

log = logging.getLogger(__name__)

NFT_BINARY = "nft"


class NftError(BackendError):
    def __init__(self, message: str, script: str) -> None:
        super().__init__(message)
        self.script = script


def available() -> bool:
    return shutil.which(NFT_BINARY) is not None


async def run(script: str) -> str:
    """Apply ``script`` with ``nft -f -``; NftError with nft's message on failure."""
    proc = await asyncio.create_subprocess_exec(
        NFT_BINARY,
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(script.encode())
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip().splitlines()
        first = message[0] if message else f"exit status {proc.returncode}"
        raise NftError(f"nft: {first}", script)
    return out.decode()


async def list_json(*what: str) -> list[dict[str, Any]]:
    """``nft -j list <what>`` as the list of objects under "nftables"."""
    proc = await asyncio.create_subprocess_exec(
        NFT_BINARY,
        "-j",
        "list",
        *what,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise NftError(f"nft: {err.decode(errors='replace').strip()}", " ".join(what))
    return json.loads(out or b"{}").get("nftables", [])


class Batcher:
    """Coalesce concurrent scripts into as few ``nft`` transactions as possible."""

    def __init__(self) -> None:
        self._coalescer: Coalescer[str] = Coalescer(self._apply_many)

    async def apply(self, script: str) -> None:
        if script.strip():
            await self._coalescer.submit(script)

    @classmethod
    async def _apply_many(cls, scripts: Sequence[str]) -> list[BaseException | None]:
        """One transaction; if it fails, bisect to find whose script failed."""
        try:
            await run("".join(scripts))
            return [None] * len(scripts)
        except NftError as exc:
            if len(scripts) == 1:
                return [exc]
        half = len(scripts) // 2
        return [*await cls._apply_many(scripts[:half]), *await cls._apply_many(scripts[half:])]
