"""Running nft scripts: one script, one atomic transaction.

Scripts go to libnftables (the library behind the ``nft`` command) through
ctypes, on one dedicated thread that never leaves the host's network
namespace: no process per transaction. Spawning ``nft`` costs about 3 ms, and
an ``nft`` process that deleted set elements also waits, when it exits, for
the RCU grace period that frees them (about 15 ms); the library's long-lived
socket leaves that to the kernel's background work. Without libnftables (not
loadable), ``nft -f -`` is run instead.

Per-VM element changes from concurrent tasks are coalesced: while one ``nft``
runs, later scripts queue up and go together in the next single transaction
(deleting set elements costs one RCU grace period per transaction, about
10 ms, so 200 teardowns at once would otherwise take seconds). If a combined
transaction fails, it is bisected so that each caller gets its own result.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from metald.core.errors import BackendError
from metald.network.batch import Coalescer

log = logging.getLogger(__name__)

NFT_BINARY = "nft"
LIBNFTABLES = "libnftables.so.1"
NFT_CTX_OUTPUT_JSON = 1 << 4


class NftError(BackendError):
    def __init__(self, message: str, script: str) -> None:
        super().__init__(message)
        self.script = script


def available() -> bool:
    return shutil.which(NFT_BINARY) is not None


class _Library:
    """libnftables contexts (one for scripts, one for JSON listings), used
    only from one thread, which stays in the host's network namespace."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metald-nft")
        self._ctx: dict[bool, int] = {}

    def _context(self, as_json: bool) -> int:
        ctx = self._ctx.get(as_json)
        if ctx is None:
            ctx = self._lib.nft_ctx_new(0)
            if not ctx:
                raise NftError("nft: cannot create a libnftables context", "")
            self._lib.nft_ctx_buffer_output(ctx)
            self._lib.nft_ctx_buffer_error(ctx)
            if as_json:
                self._lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
            self._ctx[as_json] = ctx
        return ctx

    def _run(self, script: str, as_json: bool) -> str:
        ctx = self._context(as_json)
        rc = self._lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (self._lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (self._lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            lines = [line for line in err.strip().splitlines() if line.strip()]
            raise NftError(f"nft: {lines[0] if lines else f'error {rc}'}", script)
        return out

    async def run(self, script: str, as_json: bool = False) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, script, as_json)


_library: _Library | None = None
_library_checked = False
_library_lock = threading.Lock()


def _load_library() -> _Library | None:
    global _library, _library_checked
    with _library_lock:
        if not _library_checked:
            _library_checked = True
            try:
                _library = _Library(ctypes.CDLL(LIBNFTABLES))
            except (OSError, AttributeError) as exc:
                log.warning("libnftables unusable, running the nft command", extra={"error": str(exc)})
        return _library


async def run(script: str) -> str:
    """Apply ``script`` as one transaction; NftError with nft's message on failure."""
    lib = _load_library()
    if lib is not None:
        return await lib.run(script)
    return await run_command(script)


async def run_command(script: str) -> str:
    """Apply ``script`` with ``nft -f -`` (the fallback without libnftables)."""
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
    lib = _load_library()
    if lib is not None:
        out = await lib.run("list " + " ".join(what), as_json=True)
        return json.loads(out or "{}").get("nftables", [])
    proc = await asyncio.create_subprocess_exec(
        NFT_BINARY,
        "-j",
        "list",
        *what,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    raw, err = await proc.communicate()
    if proc.returncode != 0:
        raise NftError(f"nft: {err.decode(errors='replace').strip()}", " ".join(what))
    return json.loads(raw or b"{}").get("nftables", [])


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
