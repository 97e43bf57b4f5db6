"""Plans made of small, checkable, undoable steps.

Every step answers three questions: is it already done (``is_done``), do it
(``do``), and undo it (``undo``). A plan runs its steps in order, skipping
those already done, so running the same plan again after a crash finishes it.
If a step fails, the steps this run performed are undone in reverse order and
:class:`StepFailed` is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from metald.core import faults
from metald.core.errors import StepFailed

log = logging.getLogger(__name__)


class Step(Protocol):
    name: str

    async def is_done(self) -> bool: ...

    async def do(self) -> None: ...

    async def undo(self) -> None: ...


@dataclass
class FuncStep:
    """A step built from three callables; the usual way to write one."""

    name: str
    do_fn: Callable[[], Awaitable[None]]
    undo_fn: Callable[[], Awaitable[None]] | None = None
    is_done_fn: Callable[[], Awaitable[bool]] | None = None

    async def is_done(self) -> bool:
        return await self.is_done_fn() if self.is_done_fn else False

    async def do(self) -> None:
        await self.do_fn()

    async def undo(self) -> None:
        if self.undo_fn:
            await self.undo_fn()


StepObserver = Callable[[str, str, float, BaseException | None], None]


@dataclass
class Plan:
    name: str
    steps: Sequence[Step]
    observers: list[StepObserver] = field(default_factory=list)

    async def run(self) -> list[str]:
        """Run the plan; return the names of the steps this run performed."""
        performed: list[Step] = []
        for step in self.steps:
            full = f"{self.name}.{step.name}"
            started = time.monotonic()
            try:
                faults.check(full, "before")
                if await step.is_done():
                    self._notify(full, "skipped", started, None)
                    continue
                await step.do()
            except BaseException as exc:  # noqa: BLE001 - undo then re-raise
                self._notify(full, "failed", started, exc)
                await self._undo(performed)
                if isinstance(exc, Exception):
                    raise StepFailed(self.name, step.name, exc) from exc
                raise
            performed.append(step)
            self._notify(full, "done", started, None)
            faults.check(full, "after")
        return [s.name for s in performed]

    async def _undo(self, performed: list[Step]) -> None:
        for step in reversed(performed):
            try:
                await step.undo()
            except Exception:
                log.exception(
                    "undo failed", extra={"plan": self.name, "step": step.name}
                )

    def _notify(
        self, step: str, outcome: str, started: float, exc: BaseException | None
    ) -> None:
        for observer in self.observers:
            observer(step, outcome, time.monotonic() - started, exc)
