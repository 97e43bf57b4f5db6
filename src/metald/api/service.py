"""The VmService RPC handlers: protocol <-> core. No business logic lives here."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from connectrpc.request import RequestContext

from metald.api import auth, convert, validate
from metald.api.errors import to_connect
from metald.api.pagetoken import PageTokens, load_key
from metald.config import Settings
from metald.core.engine import VmEngine
from metald.core.errors import AlreadyExists
from metald.gen.metal.vmprovisioner.v1 import vm_pb2 as pb

T = TypeVar("T")


# Set once a request reaches the engine, which reports its operations itself.
_in_engine: ContextVar[bool] = ContextVar("metald_in_engine", default=False)


async def _engine(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Call an engine operation (its arguments, validated, are evaluated before this runs)."""
    _in_engine.set(True)
    return await fn(*args)


class VmServiceImpl:
    def __init__(self, engine: VmEngine, settings: Settings, page_tokens: PageTokens | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.page_tokens = page_tokens or PageTokens(load_key(settings.data_dir))

    async def _operation(self, operation: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """Run a handler, turning errors into RPC errors. A lifecycle ``operation``
        refused before it reaches the engine (bad input, unknown or invisible VM)
        is reported to the engine's operation observers as "rejected", so that
        metrics count every call (reads pass None)."""
        _in_engine.set(False)
        started = time.monotonic()
        try:
            return await call()
        except Exception as exc:
            if operation is not None and not _in_engine.get():
                for observer in self.engine.operation_observers:
                    observer(operation, "rejected", time.monotonic() - started, exc)
            raise to_connect(exc) from exc

    def _vm(self, vm_id: str) -> str:
        """Validate the id and check the caller may see the VM (else not_found)."""
        vm_id = validate.vm_id(vm_id)
        row = self.engine.store.get_vm(vm_id)
        auth.check_visible(vm_id, row.customer_id if row else None)
        return vm_id

    async def create_vm(
        self, request: pb.CreateVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.CreateVmResponse:
        async def call() -> pb.CreateVmResponse:
            vm_id = validate.new_vm_id(request.vm_id)
            customer = auth.customer_for_create(validate.customer_id(request.customer_id))
            existing = self.engine.store.get_vm(vm_id)
            if existing is not None:
                # VM ids are one namespace per host: a taken id is refused the same way whoever owns it,
                # so the answer says the id is taken, never that another customer has it.
                raise AlreadyExists(f"vm {vm_id} already exists")
            limits = self.engine.backend.limits()
            draft = validate.vm_config(request.config, self.settings, request.HasField("config"), limits)
            row = await _engine(
                self.engine.create, vm_id, customer, draft, request.config.SerializeToString(deterministic=True)
            )
            return pb.CreateVmResponse(vm_id=row.vm_id, state=convert.wire_state(row.state))

        return await self._operation("create", call)

    async def delete_vm(
        self, request: pb.DeleteVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.DeleteVmResponse:
        async def call() -> pb.DeleteVmResponse:
            await _engine(self.engine.delete, self._vm(request.vm_id), request.force)
            return pb.DeleteVmResponse(success=True)

        return await self._operation("delete", call)

    async def boot_vm(
        self, request: pb.BootVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.BootVmResponse:
        async def call() -> pb.BootVmResponse:
            state = await _engine(self.engine.boot, self._vm(request.vm_id))
            return pb.BootVmResponse(success=True, state=convert.wire_state(state))

        return await self._operation("boot", call)

    async def shutdown_vm(
        self, request: pb.ShutdownVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.ShutdownVmResponse:
        async def call() -> pb.ShutdownVmResponse:
            timeout = validate.shutdown_timeout(request.timeout_seconds)
            vm_id = self._vm(request.vm_id)
            state = await _engine(self.engine.shutdown, vm_id, request.force, timeout)
            return pb.ShutdownVmResponse(success=True, state=convert.wire_state(state))

        return await self._operation("shutdown", call)

    async def pause_vm(
        self, request: pb.PauseVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.PauseVmResponse:
        async def call() -> pb.PauseVmResponse:
            state = await _engine(self.engine.pause, self._vm(request.vm_id))
            return pb.PauseVmResponse(success=True, state=convert.wire_state(state))

        return await self._operation("pause", call)

    async def resume_vm(
        self, request: pb.ResumeVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.ResumeVmResponse:
        async def call() -> pb.ResumeVmResponse:
            state = await _engine(self.engine.resume, self._vm(request.vm_id))
            return pb.ResumeVmResponse(success=True, state=convert.wire_state(state))

        return await self._operation("resume", call)

    async def reboot_vm(
        self, request: pb.RebootVmRequest, ctx: RequestContext[Any, Any]
    ) -> pb.RebootVmResponse:
        async def call() -> pb.RebootVmResponse:
            state = await _engine(self.engine.reboot, self._vm(request.vm_id), request.force)
            return pb.RebootVmResponse(success=True, state=convert.wire_state(state))

        return await self._operation("reboot", call)

    async def get_vm_info(
        self, request: pb.GetVmInfoRequest, ctx: RequestContext[Any, Any]
    ) -> pb.GetVmInfoResponse:
        async def call() -> pb.GetVmInfoResponse:
            view = await self.engine.get(self._vm(request.vm_id))
            return convert.vm_info_response(view)

        return await self._operation(None, call)

    async def list_vms(
        self, request: pb.ListVmsRequest, ctx: RequestContext[Any, Any]
    ) -> pb.ListVmsResponse:
        async def call() -> pb.ListVmsResponse:
            states = validate.state_filter(list(request.state_filter))
            size = validate.page_size(request.page_size)
            customer = auth.list_scope()
            scope = customer if customer is not None else "*"
            after = self.page_tokens.decode(request.page_token, states, scope)
            page = self.engine.list(states, size, after, customer)
            token = (
                self.page_tokens.encode(page.last_seq, states, scope)
                if page.last_seq is not None
                else ""
            )
            return pb.ListVmsResponse(
                vms=[convert.vm_info(r) for r in page.rows],
                next_page_token=token,
                total_count=page.total,
            )

        return await self._operation(None, call)
