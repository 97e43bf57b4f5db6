"""Coalescing of concurrent requests into one operation.

Some kernel operations cost about one RCU grace period each whatever their
size (deleting nft set elements, unregistering network devices). When many
VMs are torn down at once, the requests that arrive while one operation runs
are handed together to the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

# Applies a batch; returns, per item, None (done) or the exception for it.
ApplyMany = Callable[[Sequence[T]], Awaitable[Sequence[BaseException | None]]]


class Coalescer(Generic[T]):
    def __init__(self, apply_many: ApplyMany[T]) -> None:
        self._apply_many = apply_many
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Wait until ``item`` was applied (raises its error, if any)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        await fut

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await self._apply_many([item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - hand the error to every caller
                results = [exc] * len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if result is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(result)
