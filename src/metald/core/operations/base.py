"""The shape of one lifecycle operation.

An operation says which states it runs from, builds its plan for one VM (the
steps, each undoing itself if a later one fails), and says how to finish or
roll back its intent when metald stopped in the middle of it. The runner
(``core/runner.py``) does everything around it: the VM's lock, the intent, the
plan, the rollback, the event and the observers. Adding an operation means
adding one subclass and registering it in ``core/operations/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from metald.core.context import Context
from metald.core.errors import FailedPrecondition
from metald.core.lifecycle import ReconcileReport, state_name
from metald.core.models import VmState
from metald.core.plan import Step
from metald.core.records import Intent, VmRecord

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass
class Planned(Generic[Res]):
    """One run of an operation: its steps, the intent's detail, and its answer.

    ``intent`` None: nothing is recorded before the steps (their outcome can be
    read back from the VMM, see Pause). ``answer`` is called once the plan
    succeeded and returns the result and the event's detail.
    """

    steps: Sequence[Step]
    answer: Callable[[], tuple[Res, str]]
    intent: dict[str, Any] | None = field(default_factory=dict)


@dataclass
class Recovery:
    """What reconcile found for one VM with an interrupted operation."""

    row: VmRecord
    intent: Intent
    adopted: bool  # its VMM was adopted (the handle proved it is ours)
    report: ReconcileReport


class Operation(Generic[Req, Res]):
    name: ClassVar[str]
    allowed: ClassVar[tuple[VmState, ...]]
    # reconcile re-applies the network and adopts the VMM before ``recover``
    adopts_on_recovery: ClassVar[bool] = True

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def check(self, row: VmRecord, request: Req) -> None:
        """Refuse the operation from a state it does not run from."""
        if row.state not in self.allowed:
            allowed = ", ".join(s.name for s in self.allowed)
            raise FailedPrecondition(
                f"cannot {self.verb} vm {row.vm_id}: it is {state_name(row.state)} (allowed from {allowed})"
            )

    @property
    def verb(self) -> str:
        return self.name

    def load(self, vm_id: str, request: Req) -> VmRecord:
        """The VM's record, if the operation may run from its state."""
        row = self.ctx.row(vm_id)
        self.check(row, request)
        return row

    def owner(self, request: Req) -> str | None:
        """The VM's owner to record in events before its row exists (create)."""
        return None

    async def plan(self, vm_id: str, request: Req) -> Planned[Res]:
        """Check the request against the VM and build the steps (under the VM's lock)."""
        raise NotImplementedError

    async def recover(self, found: Recovery) -> None:
        """Finish or roll back this operation's intent (metald stopped during it)."""
        raise NotImplementedError
