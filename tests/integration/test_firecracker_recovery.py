"""The Firecracker backend's side of the recovery contract (``VmmRecovery``):
run state from its API, why an adoption failed, discarding a VMM. With these,
an interrupted pause/resume on Firecracker is settled from the VMM's own state
as on QEMU (the engine's side: tests/unit/test_engine_operations.py)."""

from __future__ import annotations

import asyncio

from tests.integration.test_firecracker_backend import Env, _alive, _reap
from tests.integration.test_firecracker_backend import env as env  # the fixture


async def _gone(pid: int) -> bool:
    for _ in range(200):
        _reap(pid)
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_vmm_status_follows_pause_and_resume(env: Env) -> None:  # noqa: F811
    backend = env.backend()
    spec = env.spec()
    await backend.boot(spec)
    assert await backend.vmm_status(spec.vm_id) == "running"
    await backend.pause(spec.vm_id)
    assert await backend.vmm_status(spec.vm_id) == "paused"
    await backend.resume(spec.vm_id)
    assert await backend.vmm_status(spec.vm_id) == "running"


async def test_adopted_paused_vmm_reports_paused_and_failed_adoptions_say_why(env: Env) -> None:  # noqa: F811
    first = env.backend()
    spec = env.spec()
    handle = await first.boot(spec)
    await first.pause(spec.vm_id)
    await first.close()  # metald "restarts" after the pause, before recording it

    second = env.backend()
    assert not await second.adopt(spec, {**handle, "start_time": handle["start_time"] + 1})
    assert second.adopt_error(spec.vm_id)
    assert await second.adopt(spec, handle)
    assert second.adopt_error(spec.vm_id) is None
    assert await second.vmm_status(spec.vm_id) == "paused"

    assert await second.discard(spec.vm_id) == []
    assert await _gone(handle["pid"]) and not second.is_running(spec.vm_id)


async def test_discard_kills_an_untracked_vmm_of_the_vm(env: Env) -> None:  # noqa: F811
    first = env.backend()
    spec = env.spec()
    handle = await first.boot(spec)
    await first.close()
    fresh = env.backend()
    await fresh.discard(spec.vm_id)  # not adopted: found by its command line
    assert await _gone(handle["pid"])
