"""CreateVm: record the VM, claim its addresses, check it can run, make its
root disk from a container image (if it names one), its run directory and
network. Any failure undoes every step; an interrupted
create is rolled back (the VM never existed)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from metald.core.errors import AlreadyExists, FailedPrecondition
from metald.core.models import NetworkAllocation, VmDraft, VmState
from metald.core.operations.base import Operation, Planned, Recovery
from metald.core.operations.delete import teardown
from metald.core.plan import FuncStep, Plan, Step
from metald.core.records import DuplicateVm, VmRecord
from metald.core.specs import draft_to_dict


@dataclass(frozen=True)
class CreateRequest:
    customer_id: str
    draft: VmDraft
    config: bytes  # the caller's VmConfig, kept verbatim


class Create(Operation[CreateRequest, VmRecord]):
    name = "create"
    allowed = ()
    adopts_on_recovery = False

    def owner(self, request: CreateRequest) -> str | None:
        return request.customer_id

    async def plan(self, vm_id: str, request: CreateRequest) -> Planned[VmRecord]:
        ctx, draft = self.ctx, request.draft
        if ctx.store.get_vm(vm_id) is not None:
            raise AlreadyExists(f"vm {vm_id} already exists")
        held: dict[str, NetworkAllocation] = {}
        run_dir = ctx.layout.run_dir(vm_id)
        image_steps: list[Step] = []
        if draft.image:  # a root disk from a container image: one step, undone with the VM
            if ctx.images is None:
                raise FailedPrecondition("container images are not enabled on this host")
            images = ctx.images
            draft = await images.prepare(vm_id, draft, ctx.backend.name, run_dir)
            made = draft

            async def attach_image() -> None:
                await images.attach(vm_id, made, run_dir)

            async def detach_image() -> None:
                await images.detach(vm_id, run_dir)

            image_steps.append(FuncStep("image", attach_image, detach_image))

        async def record() -> None:
            try:
                ctx.store.insert_vm(
                    vm_id,
                    request.customer_id,
                    int(VmState.CREATED),
                    request.config,
                    draft_to_dict(draft),
                    ctx.backend.name,
                    draft.vcpu_count,
                    draft.memory_bytes,
                    dict(draft.metadata),
                )
            except DuplicateVm:
                raise AlreadyExists(f"vm {vm_id} already exists") from None

        async def unrecord() -> None:
            ctx.store.delete_vm(vm_id)

        async def allocate() -> None:
            assert ctx.network is not None
            alloc = held["alloc"] = await ctx.network.allocate(vm_id, draft.nic)
            ctx.store.update_vm(vm_id, network=ctx.network.allocation_to_dict(alloc))

        async def release() -> None:
            assert ctx.network is not None
            await ctx.network.release(vm_id)

        async def validate() -> None:
            await ctx.backend.validate(ctx.spec_of(vm_id, draft, held.get("alloc")))

        async def make_run_dir() -> None:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)

        async def remove_run_dir() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)

        async def network_up() -> None:
            # built once the allocation exists: the steps depend on it
            steps = ctx.network_steps(held.get("alloc"))
            if steps:
                await Plan("network", steps).run()

        async def network_down() -> None:
            alloc = held.get("alloc")
            if alloc is not None and ctx.network is not None:
                await ctx.network.teardown(alloc)

        steps: list[Step] = [FuncStep("record", record, unrecord)]
        if ctx.network is not None:
            steps.append(FuncStep("allocate", allocate, release))
        steps += image_steps
        steps.append(FuncStep("validate", validate))
        steps.append(FuncStep("rundir", make_run_dir, remove_run_dir))
        if ctx.network is not None:
            steps.append(FuncStep("network", network_up, network_down))
        return Planned(steps, answer=lambda: (ctx.row(vm_id), ""))

    async def recover(self, found: Recovery) -> None:
        await teardown(self.ctx, found.row)
        found.report.rolled_back.append(found.row.vm_id)
