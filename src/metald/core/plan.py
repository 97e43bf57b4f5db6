"""Plans made of small, checkable, undoable steps.

Every step answers three questions: is it already done (``is_done``), do it
(``do``), and undo it (``undo``). A plan runs its steps in order, skipping
those already done, so running the same plan again after a crash finishes it.
If a step fails, the steps this run performed are undone in reverse order and
:class:`StepFailed` is raised.

Plans nest: a plan run while a step of another plan is running (for example
the network or jail plan inside ``boot.vmm``) takes its name from that step,
so its steps are ``boot.network.netns`` or ``boot.vmm.jail.chroot``, and it
reports to the outer plan's observers too. Every step name is therefore a
fault point (see :mod:`metald.core.faults`) and shows up in metrics and traces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
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

# The step being run in this task (full name) and the observers of its plan.
_scope: ContextVar[tuple[str, tuple[StepObserver, ...]] | None] = ContextVar("metald_plan_scope", default=None)


def qualified(outer: str | None, name: str) -> str:
    """The full name of a plan called ``name`` run inside step ``outer``.

    ``network`` inside ``boot.network`` is ``boot.network``; ``jail`` inside
    ``boot.vmm`` is ``boot.vmm.jail``; a name that is already qualified stays.
    """
    if outer is None or name == outer or name.startswith(outer + "."):
        return name
    if outer.rsplit(".", 1)[-1] == name:
        return outer
    return f"{outer}.{name}"


def current_step() -> str | None:
    """Full name of the plan step running in this task, if any."""
    scope = _scope.get()
    return scope[0] if scope else None


@dataclass
class Plan:
    name: str
    steps: Sequence[Step]
    observers: list[StepObserver] = field(default_factory=list)

    async def run(self) -> list[str]:
        """Run the plan; return the names of the steps this run performed."""
        scope = _scope.get()
        prefix = qualified(scope[0] if scope else None, self.name)
        observers = list(self.observers)
        if scope is not None:
            observers += [o for o in scope[1] if o not in observers]
        performed: list[tuple[Step, str]] = []
        for step in self.steps:
            full = f"{prefix}.{step.name}"
            started = time.monotonic()
            token = _scope.set((full, tuple(observers)))
            try:
                try:
                    faults.check(full, "before")
                    skipped = await step.is_done()
                    if not skipped:
                        await step.do()
                finally:
                    _scope.reset(token)
            except BaseException as exc:  # noqa: BLE001 - undo then re-raise
                _notify(observers, full, "failed", started, exc)
                await self._undo(performed, observers)
                if isinstance(exc, Exception):
                    raise StepFailed(self.name, step.name, exc) from exc
                raise
            if skipped:
                _notify(observers, full, "skipped", started, None)
                continue
            performed.append((step, full))
            _notify(observers, full, "done", started, None)
            faults.check(full, "after")
        return [s.name for s, _ in performed]

    async def _undo(self, performed: list[tuple[Step, str]], observers: list[StepObserver]) -> None:
        for step, full in reversed(performed):
            token = _scope.set((f"{full}.undo", tuple(observers)))
            try:
                await step.undo()
            except Exception:
                log.exception("undo failed", extra={"plan": self.name, "step": step.name})
            finally:
                _scope.reset(token)


def _notify(
    observers: list[StepObserver], step: str, outcome: str, started: float, exc: BaseException | None
) -> None:
    for observer in observers:
        observer(step, outcome, time.monotonic() - started, exc)
