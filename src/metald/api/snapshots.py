"""The SnapshotService RPC handlers (proto/metal/vmprovisioner/v1/snapshots.proto):
protocol <-> core, with VmService's tenancy and error mapping.

Another customer's snapshot is invisible (not_found, as for VMs). A clone
belongs to its snapshot's customer. Without the backend capability every RPC
answers unimplemented naming the backend.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from connectrpc.request import RequestContext

from metald.api import auth, convert, validate
from metald.api.service import VmServiceImpl, _engine
from metald.core.errors import InvalidArgument
from metald.core.operations import CloneRequest
from metald.core.ports import SnapshotStore
from metald.core.records import SnapshotRecord
from metald.core.specs import draft_from_dict
from metald.gen.metal.vmprovisioner.v1 import snapshots_pb2 as spb
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb

SNAPSHOT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NAME_MAX = 128
_PURPOSE = {"snapshot": spb.SNAPSHOT_PURPOSE_SNAPSHOT, "hibernation": spb.SNAPSHOT_PURPOSE_HIBERNATION}


def snapshot_id(value: str, required: bool = True) -> str:
    if not value and not required:
        return f"snap-{secrets.token_hex(6)}"
    if not value:
        raise InvalidArgument("snapshot_id", "is required")
    if not SNAPSHOT_ID_RE.match(value):
        raise InvalidArgument("snapshot_id", "must be 1-63 of a-z, 0-9 and '-', starting with a letter or digit")
    return value


class SnapshotServiceImpl:
    def __init__(self, vms: VmServiceImpl) -> None:
        self.vms = vms
        self.engine = vms.engine

    def _repo(self) -> SnapshotStore:
        return self.engine.ctx.snapshot_ports()[1]

    def _message(self, row: SnapshotRecord, repo: SnapshotStore) -> spb.Snapshot:
        config = pb.VmConfig()
        config.ParseFromString(row.config)
        info = {k: str(v) for k, v in row.manifest.items() if isinstance(v, (str, int, float)) and k != "format"}
        return spb.Snapshot(
            snapshot_id=row.snapshot_id, name=row.name, source_vm_id=row.source_vm_id, customer_id=row.customer_id,
            purpose=_PURPOSE.get(row.purpose, spb.SNAPSHOT_PURPOSE_UNSPECIFIED), config=config,
            state_size_bytes=row.state_bytes, disk_size_bytes=row.disk_bytes, created_timestamp=row.created_at,
            used_by_vm_ids=repo.users(row.snapshot_id), backend_info=info,
        )  # fmt: skip

    def _visible(self, sid: str) -> SnapshotRecord:
        """The snapshot, if the caller may see it (else not_found)."""
        return self._repo().get(snapshot_id(sid), auth.list_scope())

    async def snapshot_vm(
        self, request: spb.SnapshotVmRequest, ctx: RequestContext[Any, Any]
    ) -> spb.SnapshotVmResponse:
        async def call() -> spb.SnapshotVmResponse:
            vm_id = self.vms._vm(request.vm_id)
            sid = snapshot_id(request.snapshot_id, required=False)
            if len(request.name) > NAME_MAX or validate._has_control_chars(request.name):
                raise InvalidArgument("name", f"at most {NAME_MAX} printable characters")
            self.engine.ctx.snapshot_ports()
            row = await _engine(self.engine.snapshot, vm_id, sid, request.name, request.stop)
            state = self.engine.ctx.row(vm_id).state
            return spb.SnapshotVmResponse(snapshot=self._message(row, self._repo()), vm_state=convert.wire_state(state))

        return await self.vms._operation("snapshot", call)

    async def list_snapshots(
        self, request: spb.ListSnapshotsRequest, ctx: RequestContext[Any, Any]
    ) -> spb.ListSnapshotsResponse:
        async def call() -> spb.ListSnapshotsResponse:
            repo = self._repo()
            source = validate.vm_id(request.source_vm_id, "source_vm_id") if request.source_vm_id else None
            size = validate.page_size(request.page_size)
            customer = auth.list_scope()
            scope = f"snapshots:{customer if customer is not None else '*'}/{source or ''}"
            after = self.vms.page_tokens.decode(request.page_token, [], scope)  # HMAC, like ListVms
            rows = repo.list_snapshots(customer, source, after, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            token = self.vms.page_tokens.encode(rows[-1].seq, [], scope) if more and rows else ""
            return spb.ListSnapshotsResponse(snapshots=[self._message(r, repo) for r in rows], next_page_token=token)

        return await self.vms._operation(None, call)

    async def get_snapshot(
        self, request: spb.GetSnapshotRequest, ctx: RequestContext[Any, Any]
    ) -> spb.GetSnapshotResponse:
        async def call() -> spb.GetSnapshotResponse:
            return spb.GetSnapshotResponse(snapshot=self._message(self._visible(request.snapshot_id), self._repo()))

        return await self.vms._operation(None, call)

    async def delete_snapshot(
        self, request: spb.DeleteSnapshotRequest, ctx: RequestContext[Any, Any]
    ) -> spb.DeleteSnapshotResponse:
        async def call() -> spb.DeleteSnapshotResponse:
            row = self._visible(request.snapshot_id)
            self._repo().delete(row.snapshot_id, row.customer_id, force=request.force)
            return spb.DeleteSnapshotResponse(success=True)

        return await self.vms._operation(None, call)

    async def clone_vm(self, request: spb.CloneVmRequest, ctx: RequestContext[Any, Any]) -> spb.CloneVmResponse:
        async def call() -> spb.CloneVmResponse:
            snap = self._visible(request.snapshot_id)
            vm_id = validate.new_vm_id(request.vm_id)
            customer = auth.customer_for_create(validate.customer_id(request.customer_id)) or snap.customer_id
            if customer != snap.customer_id:
                raise InvalidArgument("customer_id", "a clone belongs to its snapshot's customer")
            metadata = _check_clone_config(request.config, snap) if request.HasField("config") else ()
            row = await _engine(self.engine.clone, vm_id, CloneRequest(snap.snapshot_id, customer, metadata))
            state = row.state
            if request.boot:
                state = await _engine(self.engine.boot, vm_id)
            return spb.CloneVmResponse(vm_id=row.vm_id, state=convert.wire_state(state))

        return await self.vms._operation("clone", call)


def _check_clone_config(config: pb.VmConfig, snap: SnapshotRecord) -> tuple[tuple[str, str], ...]:
    """A clone's config may only add metadata: its shape is the template's."""
    template = draft_from_dict(snap.spec)
    if config.cpu.vcpu_count and config.cpu.vcpu_count != template.vcpu_count:
        raise InvalidArgument("config.cpu.vcpu_count", f"the snapshot has {template.vcpu_count} vCPUs")
    if config.memory.size_bytes and config.memory.size_bytes != template.memory_bytes:
        raise InvalidArgument("config.memory.size_bytes", f"the snapshot has {template.memory_bytes} bytes")
    if config.HasField("boot"):
        raise InvalidArgument("config.boot", "a clone boots the snapshot's kernel")
    if len(config.storage):
        raise InvalidArgument("config.storage", "a clone's drives are overlays on the snapshot's")
    if len(config.network):
        raise InvalidArgument("config.network", "a clone gets the default network (options are not supported yet)")
    return validate.metadata(config.metadata, "config.metadata")
